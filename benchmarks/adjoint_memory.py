"""Memory and time of adjoint versus full backprop in the tiny CIFAR net, as the depth N grows.

For ``zoo.depth_scaled_tiny(depth=N, rule=...)`` (batch 32, 3x32x32 input) and both memory modes this
prints one markdown table with, per rule and depth:

* the bytes autograd keeps between forward and backward (``saved_tensors_hooks`` during the forward and
  the loss, unique storages, parameters excluded);
* the peak working memory of one training step (forward + loss + backward), each configuration in a fresh
  process (on CPU the peak resident set, VmHWM reset just before the step and the baseline after setup
  subtracted; on CUDA ``max_memory_allocated``);
* the median time of a few training steps after a warm-up step;
* the adjoint/full ratios, and the relative gradient error ||g_adj - g_full|| / ||g_full|| over all
  parameters, same weights and same batch for both modes.

    python benchmarks/adjoint_memory.py                       # depths 8 32 128, euler and heun
    python benchmarks/adjoint_memory.py --depths 8 64 --json out.json
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
import torch.nn as nn
import torch.nn.functional as F

import zoo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers beside this script
from common import machine_line, peak_working_bytes, summary, sync  # noqa: E402

MIB = 2**20
RESULT_TAG = "ADJOINT_MEMORY_RESULT "
MEMORY_MODES = ("full", "adjoint")


# ------------------------------------------------------------------------------------------------ model and step


def build_model(depth: int, rule: str, memory: str, zero_init_last: bool, seed: int) -> nn.Module:
    """The tiny CIFAR net with ``depth`` residual blocks, in train mode."""
    torch.manual_seed(seed)
    model = zoo.depth_scaled_tiny(depth=depth, rule=rule, memory=memory, zero_init_last=zero_init_last)
    return model.train()


def make_batch(batch: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random CIFAR-shaped batch and labels, the same for a given seed."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x.to(device), y.to(device)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward and cross-entropy loss."""
    return F.cross_entropy(model(x), y)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward, loss and backward (gradients accumulate into the preallocated ``.grad``)."""
    loss_of(model, x, y).backward()


# ------------------------------------------------------------------------------------------------ saved tensors


def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    try:
        s = t.untyped_storage()
        return (str(t.device), s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return None


def saved_bytes_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves during forward + loss (unique storages, parameters excluded) and the flat gradient.

    The hook is only active for the forward, so this counts what is kept between forward and backward,
    not what the adjoint backward saves while it recomputes.
    """
    param_keys = {_storage_key(p) for p in model.parameters()}
    seen: dict[tuple[str, int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in param_keys:
            seen[key] = key[2]
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, x, y)
    loss.backward()
    grad = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten() for p in model.parameters()]
    )
    return sum(seen.values()), grad


def compare(depth: int, rule: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Saved bytes of both modes and the relative gradient error of adjoint vs full, same weights and batch."""
    full = build_model(depth, rule, "full", args.zero_init_last, args.seed).to(device)
    adjoint = build_model(depth, rule, "adjoint", args.zero_init_last, args.seed + 7).to(device)
    adjoint.load_state_dict(full.state_dict())
    x, y = make_batch(args.batch, args.seed, device)
    saved_full, g_full = saved_bytes_and_grad(full, x, y)
    saved_adj, g_adj = saved_bytes_and_grad(adjoint, x, y)
    err = (g_adj - g_full).norm() / g_full.norm()
    return {"saved_full": saved_full, "saved_adjoint": saved_adj, "grad_rel_err": float(err)}


# ------------------------------------------------------------------------------------------------ worker process


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration, one process: peak working memory of a step, then the median time of further steps."""
    device = torch.device(args.device)
    model = build_model(args.worker_depth, args.worker_rule, args.worker_memory, args.zero_init_last, args.seed)
    model.to(device)
    x, y = make_batch(args.batch, args.seed, device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    gc.collect()
    out: dict[str, Any] = {}
    out.update(peak_working_bytes(lambda: train_step(model, x, y), device))
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, x, y)
        sync(device)
        times.append(time.perf_counter() - t0)
    out.update(step_times=times, step_time=statistics.median(times), threads=torch.get_num_threads())
    return out


def run_worker(depth: int, rule: str, memory: str, args: argparse.Namespace) -> dict[str, Any]:
    """Re-invoke this script with ``--worker`` in a fresh interpreter and parse its JSON line."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--worker-depth",
        str(depth),
        "--worker-rule",
        rule,
        "--worker-memory",
        memory,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--device",
        args.device,
    ]
    if args.zero_init_last:
        cmd.append("--zero-init-last")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"worker {depth}/{rule}/{memory} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------------ report


def format_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table, full and adjoint side by side."""
    header = [
        "rule",
        "N",
        "saved full (MiB)",
        "saved adjoint (MiB)",
        "saved adj/full",
        "peak full (MiB)",
        "peak adjoint (MiB)",
        "peak adj/full",
        "step full (ms)",
        "step adjoint (ms)",
        "time adj/full",
        "grad rel. error",
    ]
    align = ["---", "--:"] + ["--:"] * (len(header) - 2)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = [
            r["rule"],
            str(r["depth"]),
            f"{r['saved_full'] / MIB:.2f}",
            f"{r['saved_adjoint'] / MIB:.2f}",
            f"{r['saved_adjoint'] / r['saved_full']:.3f}",
            f"{r['peak_full'] / MIB:.1f}",
            f"{r['peak_adjoint'] / MIB:.1f}",
            f"{r['peak_adjoint'] / r['peak_full']:.2f}",
            f"{r['time_full'] * 1e3:.0f}",
            f"{r['time_adjoint'] * 1e3:.0f}",
            f"{r['time_adjoint'] / r['time_full']:.2f}",
            f"{r['grad_rel_err']:.2e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("--depths", type=int, nargs="+", default=[8, 32, 128], help="numbers of residual blocks N")
    p.add_argument("--rules", nargs="+", default=["euler", "heun"], choices=["euler", "heun"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up (memory) step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--zero-init-last",
        action="store_true",
        help="last BN of each block at zero (f = 0 at init: the adjoint rebuild is then exact)",
    )
    p.add_argument("--json", metavar="PATH", help="also save the raw numbers here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-depth", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-rule", help=argparse.SUPPRESS)
    p.add_argument("--worker-memory", choices=MEMORY_MODES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return
    device = torch.device(args.device)
    rows = []
    for rule in args.rules:
        for depth in args.depths:
            # Workers first: this process stays small while they run.
            runs = {m: run_worker(depth, rule, m, args) for m in MEMORY_MODES}
            row: dict[str, Any] = {"rule": rule, "depth": depth, **compare(depth, rule, args, device)}
            for m in MEMORY_MODES:
                row[f"peak_{m}"] = runs[m]["peak_bytes"]
                row[f"time_{m}"] = runs[m]["step_time"]
                row[f"worker_{m}"] = runs[m]
            rows.append(row)
            print(f"  done: {rule} N={depth}", file=sys.stderr, flush=True)
    method = rows[0]["worker_full"]["peak_method"] if rows else ""
    print(f"# Adjoint vs full backprop, tiny CIFAR net (zoo.depth_scaled_tiny), batch {args.batch}, 3x32x32\n")
    print(machine_line(device) + "\n")
    print(format_table(rows) + "\n")
    print(
        "saved: bytes autograd keeps between forward and backward (saved_tensors_hooks during forward + loss, "
        "unique storages, parameters excluded; the adjoint's recomputation in backward is not counted).\n"
        f"peak: working memory of one training step (forward + loss + backward) above the baseline, one fresh "
        f"process per configuration, MALLOC_MMAP_THRESHOLD_=65536, peak from {method}.\n"
        f"step: median of {args.steps} steps after a warm-up step. grad rel. error: ||g_adj - g_full|| / ||g_full||, "
        f"all parameters, same weights and batch, train-mode BN (zero_init_last={args.zero_init_last})."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(device), "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
