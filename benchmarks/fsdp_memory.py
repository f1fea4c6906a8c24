"""Per-rank peak memory of a deep momentum stack under FSDP2: memory="reversible" against memory="full".

The model: a linear embedding, one momentum ResidualStack (gamma 0.9, h = 1) of ``depth`` MLP blocks
f(x) = W2 tanh(W1 x + b1) + b2 (width ``--width``, hidden 2 x width), a linear head; sharded over 2 CPU processes
(gloo) with ``zoo.nn.fsdp.shard_model``, the zoo's policy:

* ``memory="full"``: every block its own FSDP unit (gathered one block at a time), autograd keeps every block's
  activations for backward;
* ``memory="reversible"``: the stack is one unit (its backward re-runs every block, see docs/scaling/fsdp.md), so
  its parameters are gathered once for the whole stack, while the activations are not kept (only x_N, v_N and the
  fixed-point information buffer).

Each configuration runs in 2 fresh processes (``MALLOC_MMAP_THRESHOLD_=65536``, so that the resident set follows
the live tensors; 1 torch thread each). After one warm-up step, each rank measures the peak resident set (VmHWM,
reset just before) of one training step (forward, cross-entropy, backward with FSDP's all-gathers and
reduce-scatters, SGD step) above the resident set before it; the table gives the larger of the two ranks, the
parameters each rank holds (its shards) and what the stack's gathered parameters weigh, and the ratio reversible /
full measured in the same invocation.

    python benchmarks/fsdp_memory.py                          # depths 16 64 256, batch 1024, width 128
    python benchmarks/fsdp_memory.py --depths 32 128 --batch 512 --width 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, peak_working_bytes, summary  # noqa: E402

WORLD = 2
MIB = 2**20


class MLPBlock(nn.Module):
    """f(x) = W2 tanh(W1 x + b1) + b2."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def build(memory: str, depth: int, width: int) -> nn.Module:
    from zoo.nn import ResidualStack

    torch.manual_seed(0)
    stack = ResidualStack([MLPBlock(width) for _ in range(depth)], rule="momentum", gamma=0.9, memory=memory)
    return nn.Sequential(nn.Linear(64, width), stack, nn.Linear(width, 10))


def worker(rank: int, init_file: str, memory: str, depth: int, width: int, batch: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=600)
    )
    try:
        from zoo.nn.fsdp import shard_model

        model = shard_model(build(memory, depth, width))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)

        def step() -> None:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        step()  # warm-up: lazy FSDP initialisation, gradients allocated, kernels compiled
        dist.barrier()
        peak = peak_working_bytes(step, torch.device("cpu"))["peak_bytes"]
        shards = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        result = torch.tensor([float(peak), float(shards)], dtype=torch.float64)
        gathered = [torch.zeros_like(result) for _ in range(WORLD)]
        dist.all_gather(gathered, result)
        if rank == 0:
            torch.save(torch.stack(gathered), out)
    finally:
        dist.destroy_process_group()


def measure(memory: str, depth: int, width: int, batch: int) -> tuple[float, float]:
    """(max over ranks of the step's peak bytes, max over ranks of the bytes of parameter shards held)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(worker, args=(os.path.join(tmp, "init"), memory, depth, width, batch, out), nprocs=WORLD)
        rows = torch.load(out, weights_only=True)
    return float(rows[:, 0].max()), float(rows[:, 1].max())


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--depths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1024, help="samples per rank")
    args = parser.parse_args()
    # the children inherit it: the resident set then follows the live tensors (large blocks are mmap'ed)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["OMP_NUM_THREADS"] = "1"
    print(machine_line(torch.device("cpu"), threads=1) + f", {WORLD} processes (gloo), MALLOC_MMAP_THRESHOLD_=65536")
    print(f"\nbatch {args.batch} per rank, width {args.width}, hidden {2 * args.width}, momentum gamma 0.9, float32\n")
    print(
        "| depth | stack parameters (MiB, unsharded) | shards per rank (MiB) | full FSDP2 peak (MiB) "
        "| reversible FSDP2 peak (MiB) | reversible / full |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for depth in args.depths:
        full, shards = measure("full", depth, args.width, args.batch)
        rev, _ = measure("reversible", depth, args.width, args.batch)
        stack_bytes = depth * (2 * args.width * args.width * 2 + 3 * args.width) * 4
        print(
            f"| {depth} | {stack_bytes / MIB:.1f} | {shards / MIB:.1f} | {full / MIB:.1f} | {rev / MIB:.1f} "
            f"| {rev / full:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
