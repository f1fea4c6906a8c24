"""Expert load of ``zoo.nn.MoE``: tokens per expert under token choice and expert choice, same router, same tokens.

One MoE layer (E = 8 experts, dim 192, hidden 768: a ViT-Ti MLP) at its random initialisation routes 8 sequences of
197 tokens. The tokens are Gaussian around a common mean direction (x = m + z, ||m|| about ||z||), as the tokens of
a Transformer share a large common component; the router's scores S = softmax(W_r x) then favour some experts for
most tokens. The three routings use the same weights and the same tokens and plot ``stats["tokens_per_expert"]``:

* token choice, k = 1, no capacity limit (``capacity_factor=None``): what the router asks of each expert;
* token choice, k = 1, capacity factor 1.25 (Switch): C = ceil(1.25 T / E) slots per expert, assignments beyond C
  dropped (``stats["dropped_fraction"]``);
* expert choice, capacity factor 1 (Zhou et al.): each expert takes its 197 / 8 ~ 25 best tokens of each
  sequence, so every expert processes the same number of tokens by construction (tokens no expert takes are the
  ``dropped_fraction``).

    python benchmarks/figures/moe_load.py
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # figure_common beside this script, the benchmarks above it
import figure_common as fc  # noqa: E402

from zoo.nn.moe import MoE  # noqa: E402

NAME = "moe_load"
DIM, HIDDEN, EXPERTS = 192, 768, 8
SETTINGS = {
    "token choice, no capacity limit": {"router": "token_choice", "k": 1, "capacity_factor": None},
    "token choice, capacity factor 1.25": {"router": "token_choice", "k": 1, "capacity_factor": 1.25},
    "expert choice, capacity factor 1": {"router": "expert_choice", "capacity_factor": 1.0},
}
COLOURS = ("0.6", "tab:blue", "tab:orange")


def tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    """(batch, seq, DIM) Gaussian tokens around one common random mean of the same norm as the noise.

    Args:
        batch: sequences.
        seq: tokens per sequence.
        seed: the generator's seed.
    """
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(DIM, generator=gen)
    return mean + torch.randn(batch, seq, DIM, generator=gen)


def loads(batch: int, seq: int, seed: int) -> list[dict]:
    """One row per (setting, expert): tokens the expert processes, and the setting's dropped fraction.

    Args:
        batch: sequences.
        seq: tokens per sequence.
        seed: seed of the weights and of the tokens.
    """
    x = tokens(batch, seq, seed)
    torch.manual_seed(seed)
    reference = MoE(DIM, HIDDEN, num_experts=EXPERTS).state_dict()
    rows = []
    for name, options in SETTINGS.items():
        moe = MoE(DIM, HIDDEN, num_experts=EXPERTS, **options)
        moe.load_state_dict(reference)  # the same experts and router for every routing
        with torch.no_grad():
            moe(x)
        load = moe.stats["tokens_per_expert"].tolist()
        dropped = float(moe.stats["dropped_fraction"])
        for expert, n in enumerate(load):
            rows.append({"routing": name, "expert": expert, "tokens": int(n), "dropped_fraction": dropped})
    return rows


def plot(rows: list[dict], batch: int, seq: int, footnote: str) -> fc.plt.Figure:
    """Grouped bars: tokens per expert for each routing, the balanced load T / E as a line.

    Args:
        rows: the rows of :func:`loads`.
        batch: sequences.
        seq: tokens per sequence.
        footnote: the machine line.
    """
    fig, ax = fc.plt.subplots(figsize=(6.8, 3.9))
    width = 0.8 / len(SETTINGS)
    for i, (name, colour) in enumerate(zip(SETTINGS, COLOURS, strict=True)):
        mine = [r for r in rows if r["routing"] == name]
        xs = [r["expert"] - 0.4 + (i + 0.5) * width for r in mine]
        ax.bar(
            xs,
            [r["tokens"] for r in mine],
            width,
            color=colour,
            label=f"{name} (dropped {mine[0]['dropped_fraction']:.0%})",
        )
    ax.axhline(batch * seq / EXPERTS, color="k", lw=1, ls="--", label=f"balanced: T / E = {batch * seq / EXPERTS:.0f}")
    ax.set_xticks(range(EXPERTS))
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens processed (count)")
    ax.set_title(f"MoE expert load, E = {EXPERTS}, {batch} x {seq} tokens, router at initialisation", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def main(argv: list[str] | None = None) -> list:
    args = fc.parser(__doc__.splitlines()[0]).parse_args(argv)
    batch, seq = (2, 64) if args.small else (8, 197)
    with fc.torch_threads(args.threads):
        rows = loads(batch, seq, seed=0)
    footnote = f"zoo.nn.MoE, dim {DIM}, hidden {HIDDEN}, float32; {fc.machine(args.threads)}"
    csv_path = fc.write_csv(
        args.out / f"{NAME}.csv",
        rows,
        f"tokens per expert, {batch} x {seq} tokens\n{fc.command('moe_load.py', args.small)}\n{footnote}",
    )
    png_path = fc.save_png(plot(rows, batch, seq, footnote), args.out / f"{NAME}.png", footnote)
    fc.report([csv_path, png_path])
    return [csv_path, png_path]


if __name__ == "__main__":
    main()
