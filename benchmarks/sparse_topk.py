"""Forward + backward time of the relaxed top-k mask of ``zoo.ops.topk`` versus ``torch.topk``.

For scores x of shape (batch, n) (default 256 x n, n = 64 .. 16384, k = n / 10, float32, lam = 1) this prints one
markdown table with, per device and n, the median time of one forward + backward of

* ``topk``: ``torch.topk(x, k).values.sum().backward()`` (the baseline of the ratios);
* ``pav p=2`` / ``pav p=4/3``: ``soft_topk_mask(x, k, p=..., solver="pav").backward(g)`` (exact);
* ``dykstra 10`` / ``dykstra 100``: ``soft_topk_mask(x, k, solver="dykstra", dykstra_iters=...)`` (p = 2; 10 is the
  published MoE-router setting, 100 the one published to match PAV);
* ``torchsort``: ``torchsort.soft_rank(x, regularization_strength=1).backward(g)`` (a soft rank, not a top-k
  mask: the usual differentiable-sorting baseline), when torchsort is installed.

Times: every method once per round, rounds interleaved in this process, median over rounds after a warm-up
round; ratios against torch.topk at the same n in the same run. CPU with one torch thread by default
(``--threads``), then CUDA when available.

    python benchmarks/sparse_topk.py                # n = 64 256 1024 4096 16384
    python benchmarks/sparse_topk.py --quick        # n = 64 256 1024, 3 rounds
    python benchmarks/sparse_topk.py --sizes 1024 --rounds 15 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from zoo.ops.topk import soft_topk_mask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers beside this script
from common import machine_line, summary, sync  # noqa: E402

try:
    import torchsort  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - optional baseline
    torchsort = None

METHODS = ("topk", "pav p=2", "pav p=4/3", "dykstra 10", "dykstra 100", "torchsort")


def make_step(method: str, x: torch.Tensor, k: int, g: torch.Tensor, lam: float) -> Callable[[], None] | None:
    """One forward + backward of ``method`` (None when it cannot run here)."""
    if method == "topk":
        return lambda: torch.topk(x, k).values.sum().backward()
    if method == "pav p=2":
        return lambda: soft_topk_mask(x, k, p=2.0, lam=lam).backward(g)
    if method == "pav p=4/3":
        return lambda: soft_topk_mask(x, k, p=4.0 / 3.0, lam=lam).backward(g)
    if method.startswith("dykstra"):
        iters = int(method.split()[1])
        return lambda: soft_topk_mask(x, k, p=2.0, lam=lam, solver="dykstra", dykstra_iters=iters).backward(g)
    if torchsort is None:
        return None
    return lambda: torchsort.soft_rank(x, regularization_strength=lam).backward(g)


def time_all(n: int, device: torch.device, args: argparse.Namespace) -> dict[str, float | None]:
    """Median forward + backward seconds of every method at one n, rounds interleaved."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, n, generator=gen).to(device).requires_grad_(True)
    x.grad = torch.zeros_like(x)
    g = torch.randn(args.batch, n, generator=gen).to(device)
    k = max(1, n // 10)
    steps = {m: make_step(m, x, k, g, args.lam) for m in args.methods}
    times: dict[str, list[float]] = {m: [] for m, s in steps.items() if s is not None}
    for rnd in range(args.rounds + 1):  # round 0: warm-up
        for m in times:
            sync(device)
            t0 = time.perf_counter()
            steps[m]()  # type: ignore[misc]
            sync(device)
            if rnd:
                times[m].append(time.perf_counter() - t0)
    return {m: (statistics.median(times[m]) if m in times else None) for m in args.methods}


def _ms(t: dict[str, float | None], m: str) -> str:
    if t.get(m) is None:
        return "not installed" if m == "torchsort" and torchsort is None else "-"
    return f"{t[m] * 1e3:.2f}"


def _ratio(t: dict[str, float | None], m: str) -> str:
    base = t.get("topk")
    return "-" if t.get(m) is None or not base else f"{t[m] / base:.1f}x"


def format_table(rows: list[dict[str, Any]], methods: list[str]) -> str:
    others = [m for m in methods if m != "topk"]
    header = ["device", "n", *(f"{m} (ms)" for m in methods), *(f"{m} / topk" for m in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["--:"] * len(header)) + "|"]
    for r in rows:
        t = r["times"]
        cells = [r["device"], str(r["n"]), *(_ms(t, m) for m in methods), *(_ratio(t, m) for m in others)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dykstra_vs_pav(rows: list[dict[str, Any]]) -> str:
    """Where Dykstra (p = 2) is faster than PAV (p = 2), per device and iteration count."""
    out = []
    for dev in dict.fromkeys(r["device"] for r in rows):
        for m in ("dykstra 10", "dykstra 100"):
            wins = [
                r["n"]
                for r in rows
                if r["device"] == dev
                and r["times"].get(m) is not None
                and r["times"].get("pav p=2") is not None
                and r["times"][m] < r["times"]["pav p=2"]
            ]
            out.append(
                f"{dev}, {m}: "
                + (
                    f"faster than pav p=2 at n = {', '.join(map(str, wins))}"
                    if wins
                    else "slower than pav p=2 at every n"
                )
            )
    return "; ".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384], help="n (k = n / 10)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds after the warm-up round")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--quick", action="store_true", help="n = 64 256 1024, 3 rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also save the raw numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds = [n for n in args.sizes if n <= 1024], min(args.rounds, 3)
    if "topk" not in args.methods:
        args.methods = ["topk", *args.methods]
    args.devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dev in args.devices:
        device = torch.device(dev)
        for n in args.sizes:
            rows.append({"device": dev, "n": n, "times": time_all(n, device, args)})
            print(f"  done: {dev} n={n}", file=sys.stderr, flush=True)
    print(f"# Relaxed top-k mask, forward + backward, x ({args.batch}, n) float32, k = n / 10, lam = {args.lam:g}\n")
    for dev in args.devices:
        print(machine_line(torch.device(dev), args.threads if dev == "cpu" else 0) + "\n")
    print(format_table(rows, args.methods) + "\n")
    print(
        f"time: median of {args.rounds} forward + backward rounds after a warm-up round, all methods interleaved "
        "in one process; ratios against torch.topk (forward + backward through the values) at the same n in the "
        f"same run. torchsort: {'soft_rank' if torchsort is not None else 'not installed'}."
    )
    print("Dykstra vs PAV: " + dykstra_vs_pav(rows) + ".")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": [machine_line(torch.device(d), args.threads) for d in args.devices],
                    "args": vars(args),
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
