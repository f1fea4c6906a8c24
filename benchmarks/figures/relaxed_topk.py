"""The relaxed top-k worked example: x(s) = (3, 1, -1 + s, s), k = 2, the sum of the 2nd and 3rd mask entries vs s.

For the hard mask (``zoo.ops.topk.topk_mask``) the sum is a step (1 for s < 1, 0 between 1 and 4, 1 beyond: the
2nd entry leaves the top 2 at s = 1, the 3rd enters at s = 4); the relaxed masks (``soft_topk_mask``, lam = 1)
are continuous and piecewise linear for p = 2, continuously differentiable for p = 4/3, and both exactly 0 on
[2, 3], where no pooled block reaches the 2nd or 3rd entry: the relaxation is sparse.

    python benchmarks/figures/relaxed_topk.py            # docs/figures/relaxed_topk.{png,csv}
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # figure_common beside this script, the benchmarks above it
import figure_common as fc  # noqa: E402

from zoo.ops.topk import soft_topk_mask, topk_mask  # noqa: E402

NAME = "relaxed_topk"
K = 2
LAM = 1.0
S_RANGE = (-1.0, 6.0)


def worked_example(points: int, lam: float = LAM) -> dict[str, torch.Tensor]:
    """s and the sum of the 2nd and 3rd mask entries of x(s) for hard, p = 2 and p = 4/3 (float64).

    Args:
        points: grid points over s in [-1, 6].
        lam: the relaxations' regularisation strength.
    """
    s = torch.linspace(*S_RANGE, points, dtype=torch.float64)
    x = torch.stack([torch.full_like(s, 3.0), torch.ones_like(s), s - 1, s], -1)
    return {
        "s": s,
        "hard": topk_mask(x, K)[:, 1:3].sum(-1),
        "p=2": soft_topk_mask(x, K, p=2.0, lam=lam)[:, 1:3].sum(-1),
        "p=4/3": soft_topk_mask(x, K, p=4.0 / 3.0, lam=lam)[:, 1:3].sum(-1),
    }


def main(argv: list[str] | None = None) -> list:
    args = fc.parser(__doc__.splitlines()[0]).parse_args(argv)
    with fc.torch_threads(args.threads):
        curves = worked_example(141 if args.small else 701)
    footnote = f"zoo.ops.topk, lam = {LAM}, float64; {fc.machine(args.threads)}"
    rows = [
        {"s": float(s), "hard": float(h), "p2": float(a), "p4_3": float(b)}
        for s, h, a, b in zip(curves["s"], curves["hard"], curves["p=2"], curves["p=4/3"], strict=True)
    ]
    csv_path = fc.write_csv(
        args.out / f"{NAME}.csv",
        rows,
        f"topk_mask(x(s))_2 + topk_mask(x(s))_3, x(s) = (3, 1, -1 + s, s), k = {K}, lam = {LAM}\n"
        f"{fc.command('relaxed_topk.py', args.small)}\n{footnote}",
    )

    fig, ax = fc.plt.subplots(figsize=(6.4, 3.6))
    s = curves["s"].numpy()
    ax.plot(s, curves["hard"].numpy(), color="0.2", lw=1.5, drawstyle="steps-mid", label="hard (topk_mask)")
    ax.plot(s, curves["p=2"].numpy(), color="tab:blue", lw=1.8, label="relaxed, p = 2")
    ax.plot(s, curves["p=4/3"].numpy(), color="tab:orange", lw=1.8, ls="--", label="relaxed, p = 4/3")
    ax.axvspan(2.0, 3.0, color="tab:green", alpha=0.12, lw=0, label="both relaxed = 0 exactly")
    ax.set_xlabel("s (dimensionless)")
    ax.set_ylabel("mask$_2$ + mask$_3$ (dimensionless)")
    ax.set_title("Relaxed top-k mask: x(s) = (3, 1, -1 + s, s), k = 2, lam = 1", fontsize=10)
    ax.set_xlim(*S_RANGE)
    ax.set_ylim(-0.05, 1.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    png_path = fc.save_png(fig, args.out / f"{NAME}.png", footnote)
    fc.report([csv_path, png_path])
    return [csv_path, png_path]


if __name__ == "__main__":
    main()
