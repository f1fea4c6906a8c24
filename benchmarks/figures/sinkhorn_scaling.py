"""Time and peak memory of Sinkhorn attention vs sequence length, against SDPA (forward + backward, CPU).

Measured with the functions of ``benchmarks/sinkhorn_attention.py`` (imported, so both report the same thing): q, k,
v of shape (2, 4, seq, 64), float32, ``n_iter`` = 3 half-steps, for

* ``sdpa``: ``F.scaled_dot_product_attention`` (softmax attention, the baseline);
* ``zoo``: ``zoo.ops.sinkhorn_attention`` as it chooses its kernel;
* ``naive``: the log-domain loop (S2) with plain autograd, which keeps every half-step's score matrix (up to
  ``--naive-max-seq``).

Time: median of ``--steps`` forward + backward steps after a warm-up step, every method of one length interleaved
in one process (``time_all``). Memory: the working memory of one forward + backward above the inputs, each (method,
length) in a fresh process (``run_worker``: VmHWM reset before the step, ``MALLOC_MMAP_THRESHOLD_=65536``); with
``--small`` in this process instead (quicker, for the test suite). Both panels are log-log.

    python benchmarks/figures/sinkhorn_scaling.py          # seq 256 .. 4096, 1 torch thread (a few minutes)
"""

from __future__ import annotations

import gc
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # figure_common beside this script, the benchmarks above it
import figure_common as fc  # noqa: E402
import sinkhorn_attention as bench  # noqa: E402  (benchmarks/sinkhorn_attention.py)
from common import peak_working_bytes  # noqa: E402

NAME = "sinkhorn_scaling"
WANTED = ("sdpa", "zoo", "naive")
STYLE = {
    "sdpa": ("0.2", "s-", "SDPA (softmax)"),
    "zoo": ("tab:blue", "o-", "zoo.ops.sinkhorn_attention"),
    "naive": ("tab:red", "^--", "naive log-domain loop, autograd"),
}


def bench_args(args, seqs: list[int]):
    """The benchmark's own options (its ``parse_args``), for the shapes of this figure."""
    return bench.parse_args(
        [
            "--seqs",
            *map(str, seqs),
            "--n-iters",
            str(args.n_iter),
            "--batch",
            str(args.batch),
            "--heads",
            str(args.heads),
            "--head-dim",
            str(args.head_dim),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
            "--device",
            "cpu",
        ]
    )


def memory_here(method: str, seq: int, n_iter: int, options) -> int:
    """Working bytes of one forward + backward in this process, after a warm-up step (``--small`` only)."""
    device = torch.device("cpu")
    q, k, v, grad = bench.make_inputs(options, seq, device)
    bench.step(method, q, k, v, n_iter, grad)
    gc.collect()
    return int(peak_working_bytes(lambda: bench.step(method, q, k, v, n_iter, grad), device)["peak_bytes"])


def measure(args) -> list[dict]:
    """One row per (method, seq): the median step time (s) and the peak working memory (bytes).

    Args:
        args: this script's options.
    """
    methods = [m for m in WANTED if m in bench.METHODS]
    options = bench_args(args, args.seqs)
    rows = []
    for seq in args.seqs:
        cells = [
            (m, 1 if m == "sdpa" else args.n_iter) for m in methods if not (m == "naive" and seq > args.naive_max_seq)
        ]
        if args.small:
            mem = {c: memory_here(c[0], seq, c[1], options) for c in cells}
        else:  # fresh processes first, so this one stays small while they run
            mem = {c: int(bench.run_worker(c[0], seq, c[1], options)["peak_bytes"]) for c in cells}
        times = bench.time_all(seq, cells, options)
        for c in cells:
            rows.append({"method": c[0], "seq": seq, "n_iter": c[1], "time_s": times[c], "peak_mib": mem[c] / fc.MIB})
        print(f"  seq {seq} done", file=sys.stderr, flush=True)
    return rows


def plot(rows: list[dict], args, footnote: str) -> fc.plt.Figure:
    """Two log-log panels: step time and peak working memory against the sequence length.

    Args:
        rows: the rows of :func:`measure`.
        args: this script's options (shapes, for the title).
        footnote: the machine line.
    """
    fig, (ax_t, ax_m) = fc.plt.subplots(1, 2, figsize=(8.4, 3.9))
    for method, (colour, style, label) in STYLE.items():
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        seqs = [r["seq"] for r in mine]
        ax_t.plot(seqs, [r["time_s"] * 1e3 for r in mine], style, color=colour, ms=4, lw=1.6, label=label)
        ax_m.plot(seqs, [max(r["peak_mib"], 1e-2) for r in mine], style, color=colour, ms=4, lw=1.6, label=label)
    for ax, unit in ((ax_t, "forward + backward time (ms)"), (ax_m, "peak working memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3, which="both")
    ax_t.legend(fontsize=8, frameon=False)
    fig.suptitle(
        f"Sinkhorn attention (n_iter = {args.n_iter}) vs SDPA, q/k/v ({args.batch}, {args.heads}, seq, "
        f"{args.head_dim}) float32",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def main(argv: list[str] | None = None) -> list:
    p = fc.parser(__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="lengths (default 256 512 1024 2048 4096)")
    p.add_argument("--n-iter", type=int, default=3, help="Sinkhorn half-steps (default 3)")
    p.add_argument("--naive-max-seq", type=int, default=2048, help="skip the naive loop above this length")
    args = p.parse_args(argv)
    args.seqs = args.seqs or ([32, 64] if args.small else [256, 512, 1024, 2048, 4096])
    args.batch, args.heads, args.head_dim = (1, 2, 16) if args.small else (2, 4, 64)
    args.steps = 1 if args.small else 3
    t0 = time.perf_counter()
    with fc.torch_threads(args.threads):
        rows = measure(args)
    footnote = (
        f"time: median of {args.steps} step(s), interleaved; memory: "
        f"{'this process' if args.small else 'fresh process each'}; {fc.machine(args.threads)}"
    )
    csv_path = fc.write_csv(
        args.out / f"{NAME}.csv",
        rows,
        f"Sinkhorn attention vs SDPA, q/k/v ({args.batch}, {args.heads}, seq, {args.head_dim}) float32, forward + "
        f"backward\n{fc.command('sinkhorn_scaling.py', args.small)}\n{footnote}",
    )
    png_path = fc.save_png(plot(rows, args, footnote), args.out / f"{NAME}.png", footnote)
    fc.report([csv_path, png_path])
    print(f"({time.perf_counter() - t0:.0f} s)")
    return [csv_path, png_path]


if __name__ == "__main__":
    main()
