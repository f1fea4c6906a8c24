"""Relative gradient error of adjoint backpropagation against full backprop vs depth, Euler (ResNet) and Heun.

The tiny CIFAR net of ``benchmarks/adjoint_memory.py`` (``zoo.depth_scaled_tiny``: a 5x5 convolution to 16
channels pooled to 10x10, then N pre-activation blocks with step 1/N), random weights, train-mode BatchNorm, the
last BatchNorm of each block NOT at zero (at zero every block is 0 at initialisation and the rebuild is exact), one
random batch of 32 CIFAR-shaped inputs. For each depth, rule and seed, ``adjoint_memory.compare`` builds the same
weights in ``memory="full"`` and ``memory="adjoint"`` and returns ||g_adjoint - g_full|| / ||g_full|| over all
parameters. The figure plots the median over the seeds with the min-max range, log-log, with 1/N and 1/N^2 guides.

    python benchmarks/figures/adjoint_gradient_error.py     # depths 4 .. 256, 3 seeds (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # figure_common beside this script, the benchmarks above it
import adjoint_memory  # noqa: E402  (benchmarks/adjoint_memory.py)
import figure_common as fc  # noqa: E402

NAME = "adjoint_gradient_error"
RULES = ("euler", "heun")
COLOURS = {"euler": "tab:blue", "heun": "tab:orange"}
LABELS = {"euler": "Euler (ResNet, depth-scaled)", "heun": "Heun (HeunNet)"}


def measure(depths: list[int], seeds: list[int], batch: int) -> list[dict]:
    """One row per (rule, depth, seed): the relative gradient error of the adjoint.

    Args:
        depths: numbers of residual blocks N.
        seeds: weight and batch seeds.
        batch: batch size of the random CIFAR-shaped batch.
    """
    device = torch.device("cpu")
    rows = []
    for rule in RULES:
        for depth in depths:
            for seed in seeds:
                args = argparse.Namespace(zero_init_last=False, seed=seed, batch=batch)
                err = adjoint_memory.compare(depth, rule, args, device)["grad_rel_err"]
                rows.append({"rule": rule, "depth": depth, "seed": seed, "grad_rel_err": err})
                print(f"  {rule} N={depth} seed={seed}: {err:.3e}", file=sys.stderr, flush=True)
    return rows


def plot(rows: list[dict], footnote: str, batch: int) -> fc.plt.Figure:
    """Median over seeds with the min-max band, per rule, against depth (log-log).

    Args:
        rows: the rows of :func:`measure`.
        footnote: the machine line.
        batch: the batch size (for the title).
    """
    fig, ax = fc.plt.subplots(figsize=(6.4, 4.2))
    for rule in RULES:
        depths = sorted({r["depth"] for r in rows if r["rule"] == rule})
        errs = [[r["grad_rel_err"] for r in rows if r["rule"] == rule and r["depth"] == d] for d in depths]
        med = [statistics.median(e) for e in errs]
        ax.fill_between(depths, [min(e) for e in errs], [max(e) for e in errs], color=COLOURS[rule], alpha=0.18, lw=0)
        ax.plot(depths, med, "o-", color=COLOURS[rule], lw=1.8, ms=4, label=LABELS[rule])
    depths = sorted({r["depth"] for r in rows})
    first = statistics.median(r["grad_rel_err"] for r in rows if r["rule"] == "euler" and r["depth"] == depths[0])
    for power, style in ((1, ":"), (2, "-.")):
        guide = [first * (depths[0] / d) ** power for d in depths]
        ax.plot(depths, guide, style, color="0.5", lw=1, label=f"slope 1/N{'^2' if power == 2 else ''} (guide)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth N (residual blocks)")
    ax.set_ylabel("relative gradient error (dimensionless)")
    ax.set_title(f"Adjoint vs full backprop, tiny CIFAR net, batch {batch}: error falls with depth", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def main(argv: list[str] | None = None) -> list:
    p = fc.parser(__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=None, help="depths N (default 4 8 ... 256)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per point (default 3)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32)")
    args = p.parse_args(argv)
    depths = args.depths or ([2, 4] if args.small else [4, 8, 16, 32, 64, 128, 256])
    seeds = list(range(args.seeds or (1 if args.small else 3)))
    batch = args.batch or (4 if args.small else 32)
    t0 = time.perf_counter()
    with fc.torch_threads(args.threads):
        rows = measure(depths, seeds, batch)
    footnote = f"median and min-max over {len(seeds)} seed(s), float32 CPU; {fc.machine(args.threads)}"
    csv_path = fc.write_csv(
        args.out / f"{NAME}.csv",
        rows,
        "||g_adjoint - g_full|| / ||g_full||, zoo.depth_scaled_tiny, train-mode BN, last BN not at zero, "
        f"batch {batch}\n{fc.command('adjoint_gradient_error.py', args.small)}\n{footnote}",
    )
    png_path = fc.save_png(plot(rows, footnote, batch), args.out / f"{NAME}.png", footnote)
    fc.report([csv_path, png_path])
    print(f"({time.perf_counter() - t0:.0f} s)")
    return [csv_path, png_path]


if __name__ == "__main__":
    main()
