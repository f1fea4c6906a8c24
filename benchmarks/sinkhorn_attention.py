"""Time and peak memory of Sinkhorn attention (``zoo.ops.sinkhorn_attention``) versus SDPA, per kernel.

For q, k, v of shape (batch, heads, seq, head_dim) (default 4 x 8 x seq x 64, float32) this prints one markdown
table with, per sequence length and ``n_iter``, the forward + backward time (median of a few steps after a warm-up
step) and the peak working memory of one forward + backward of

* ``sdpa``: ``F.scaled_dot_product_attention`` (softmax attention, the baseline of the ratios);
* ``chunked``: the op forced onto its chunked kernel (whole slices, a few at a time; the op's only kernel before
  the tiled one);
* ``tiled``: the op forced onto its tiled kernel (tiles of query rows, memory O(seq));
* ``zoo``: the op as it chooses (``zoo.ops.sinkhorn.kernel_path``: chunked up to 8 MiB of scores per slice,
  tiled above, FlexAttention on CUDA);
* ``naive``: the log-domain loop (S2) with plain autograd (written here), which keeps every half-step's
  (B, H, L, S) matrix for backward.

Times: all cells of one length interleaved in this process (default allocator). Memory: each (method, seq, n_iter)
in a fresh process, after a warm-up step (zoo's kernels compile there); on CPU the peak is VmHWM reset
before the measured step with ``MALLOC_MMAP_THRESHOLD_=65536``, on CUDA ``max_memory_allocated``.

    python benchmarks/sinkhorn_attention.py                          # seq 1024 2048 4096 8192, n_iter 3
    python benchmarks/sinkhorn_attention.py --seqs 256 1024 --n-iters 3 5 --methods sdpa zoo naive --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

import zoo.ops
import zoo.ops.sinkhorn as sinkhorn_op

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers beside this script
from common import machine_line, peak_working_bytes, summary, sync  # noqa: E402

MIB = 2**20
RESULT_TAG = "SINKHORN_BENCH_RESULT "
METHODS = ("sdpa", "chunked", "tiled", "zoo", "naive")
# the op's rule forced one way: TILED_MIN_BYTES above any slice (chunked) or 0 (tiled; on CPU, where flex is off)
FORCED_MIN_BYTES = {"chunked": 2**62, "tiled": 0}


def naive_sinkhorn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_iter: int) -> torch.Tensor:
    """(S2) literally: f = -lse_j(C + g), g = -lse_i(C + f) + log(L/S), K = exp(C + f + g), plain autograd."""
    c = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    f = torch.zeros_like(c[..., :1])
    g = torch.zeros_like(c[..., :1, :])
    log_ratio = torch.log(torch.tensor(q.shape[-2] / k.shape[-2]))
    for step in range(1, n_iter + 1):
        if step % 2 == 1:
            f = -torch.logsumexp(c + g, -1, keepdim=True)
        else:
            g = -torch.logsumexp(c + f, -2, keepdim=True) + log_ratio
    return torch.exp(c + f + g) @ v


def attention(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_iter: int) -> torch.Tensor:
    if method == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if method == "zoo":
        return zoo.ops.sinkhorn_attention(q, k, v, n_iter=n_iter)
    if method in FORCED_MIN_BYTES:
        rule = sinkhorn_op.TILED_MIN_BYTES
        sinkhorn_op.TILED_MIN_BYTES = FORCED_MIN_BYTES[method]
        try:
            return zoo.ops.sinkhorn_attention(q, k, v, n_iter=n_iter)
        finally:
            sinkhorn_op.TILED_MIN_BYTES = rule
    return naive_sinkhorn(q, k, v, n_iter)


def step(method: str, q, k, v, n_iter: int, grad: torch.Tensor) -> None:
    attention(method, q, k, v, n_iter).backward(grad)


# ------------------------------------------------------------------------------------------------ worker process


def make_inputs(args: argparse.Namespace, seq: int, device: torch.device) -> list[torch.Tensor]:
    """q, k, v (requiring grad, ``.grad`` preallocated) and the output gradient."""
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.heads, seq, args.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=gen).to(device) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
        t.grad = torch.zeros_like(t)
    return [q, k, v, grad]


def time_all(seq: int, cells: list[tuple[str, int]], args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """Median forward + backward time of every (method, n_iter) at one length, interleaved in this process."""
    device = torch.device(args.device)
    q, k, v, grad = make_inputs(args, seq, device)
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    for c in cells:  # warm-up
        step(c[0], q, k, v, c[1], grad)
    for _ in range(args.steps):
        for c in cells:
            sync(device)
            t0 = time.perf_counter()
            step(c[0], q, k, v, c[1], grad)
            sync(device)
            times[c].append(time.perf_counter() - t0)
    return {c: statistics.median(t) for c, t in times.items()}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Peak working memory of one forward + backward of one (method, seq, n_iter), in this fresh process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    q, k, v, grad = make_inputs(args, args.worker_seq, device)
    method, n_iter = args.worker_method, args.worker_n_iter
    step(method, q, k, v, n_iter, grad)  # warm-up (torch.compile of zoo's kernels happens here, not measured)
    gc.collect()
    out: dict[str, Any] = dict(peak_working_bytes(lambda: step(method, q, k, v, n_iter, grad), device))
    return out


def run_worker(method: str, seq: int, n_iter: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--worker-method",
        method,
        "--worker-seq",
        str(seq),
        "--worker-n-iter",
        str(n_iter),
        "--batch",
        str(args.batch),
        "--heads",
        str(args.heads),
        "--head-dim",
        str(args.head_dim),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"worker {method}/{seq}/{n_iter} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------------ report


def format_table(rows: list[dict[str, Any]], methods: list[str]) -> str:
    """One row per (seq, n_iter): SDPA's time and peak, then each method's time / SDPA and peak / SDPA."""
    others = [m for m in methods if m != "sdpa"]
    header = ["seq", "n_iter", "sdpa (ms)", "peak sdpa (MiB)"]
    for m in others:
        header += [f"{m} (ms)", f"{m}/sdpa time", f"peak {m} (MiB)", f"{m}/sdpa peak"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["--:"] * len(header)) + "|"]
    for r in rows:
        base_t, base_m = r["sdpa"]["step_time"], r["sdpa"]["peak_bytes"]
        cells = [str(r["seq"]), str(r["n_iter"]), f"{base_t * 1e3:.0f}", f"{base_m / MIB:.0f}"]
        for m in others:
            if m not in r:
                cells += ["-"] * 4
                continue
            t, b = r[m]["step_time"], r[m]["peak_bytes"]
            peak_ratio = f"{b / base_m:.2f}" if base_m > 0 else "-"
            cells += [f"{t * 1e3:.0f}", f"{t / base_t:.2f}", f"{b / MIB:.0f}", peak_ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="sequence lengths L = S")
    p.add_argument("--n-iters", type=int, nargs="+", default=[3], help="Sinkhorn half-steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up (memory) step")
    p.add_argument("--naive-max-seq", type=int, default=1024, help="skip the naive loop above this length")
    p.add_argument(
        "--methods", nargs="+", default=["sdpa", "chunked", "tiled"], choices=METHODS, help="sdpa always runs"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="PATH", help="also save the raw numbers here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--worker-seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-n-iter", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for seq in args.seqs:
        cells = [("sdpa", 1)] + [
            (m, n)
            for n in args.n_iters
            for m in METHODS[1:]
            if m in args.methods and not (m == "naive" and seq > args.naive_max_seq)
        ]
        mem = {c: run_worker(c[0], seq, c[1], args) for c in cells}  # memory: fresh processes first
        times = time_all(seq, cells, args)
        for n_iter in args.n_iters:
            row: dict[str, Any] = {"seq": seq, "n_iter": n_iter}
            for c in cells:
                if c[0] == "sdpa" or c[1] == n_iter:
                    row[c[0]] = {**mem[c], "step_time": times[c]}
            rows.append(row)
        print(f"  done: seq {seq}", file=sys.stderr, flush=True)
    print(
        f"# Sinkhorn attention, forward + backward, q/k/v ({args.batch}, {args.heads}, seq, {args.head_dim}) float32\n"
    )
    print(machine_line(device, args.threads) + "\n")
    print(format_table(rows, ["sdpa"] + [m for m in METHODS[1:] if m in args.methods]) + "\n")
    print(
        f"time: median of {args.steps} forward + backward steps after a warm-up step, all methods interleaved in one "
        "process (default allocator); ratios against SDPA at the same length in the same run. "
        "peak: working memory of one forward + backward "
        f"above the inputs, peak from {rows[0]['sdpa']['peak_method'] if rows else ''}"
        f"{', MALLOC_MMAP_THRESHOLD_=65536' if device.type == 'cpu' else ''}. "
        "the op picks "
        + ", ".join(f"{sinkhorn_op.kernel_path(device, seq, seq, qk_dim=args.head_dim)} at {seq}" for seq in args.seqs)
        + " (n_iter > 1). "
        f"zoo: the op's own choice (kernel_path; chunked up to {sinkhorn_op.TILED_MIN_BYTES // MIB} MiB of scores per "
        f"slice, tiled above). naive: log-domain loop with plain autograd (skipped above seq {args.naive_max_seq})."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(device, args.threads), "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
