"""Forward + backward time of ``zoo.nn.moe.MoE`` versus the dense timm ``Mlp`` of the same width, against E.

Tokens x of shape (batch, seq, dim) (default 8 x 197 x 192, a ViT-Ti/16 block's MLP input, float32). Each expert
is as wide as the dense MLP (hidden = 4 dim); with capacity factor 1 every router processes about as many
(token, expert) pairs as the dense MLP processes tokens (token choice: C = ceil(T k / E) slots per expert, k = 1;
expert choice: k = round(n / E) tokens per expert per sequence), so the expert FLOPs are the dense ones at every E
(they scale with k and capacity, not with E). What does grow with E is the parameter count (E copies of the MLP):
every step reads the expert weights twice and writes their gradients, so where memory bandwidth is scarce (one CPU
thread) and tokens per expert are few, that traffic shows in the time. Columns:

* ``dense``: ``timm.layers.Mlp(dim, 4 dim)``, the baseline of the ratios;
* ``token``: token choice (Switch), k = 1, hard top-k;
* ``expert``: expert choice (Zhou et al.), hard top-k;
* ``expert soft``: expert choice with the relaxed top-k (p = 2, Dykstra, 10 iterations; ``zoo.ops.topk``);
* ``all experts``: token choice with ``capacity_factor=None`` (a (E, T, dim) buffer: every expert's slots as
  long as the call), i.e. the compute of a dense all-experts MoE, for contrast (E <= ``--all-experts-max``).

Times: median of ``--steps`` forward + backward steps after a warm-up step, the cells of one E interleaved in this
process ('all experts', whose activations flood memory, in a second pass with the dense MLP only, which is its
ratio's baseline); the weights' gradients are
preallocated (``p.grad`` zeros, accumulated into) so their first allocation is not timed.
CPU runs use ``--threads`` torch threads (default 1); CUDA is timed as well when available.

    python benchmarks/moe_routing.py                       # E = 4 8 16 32 64, CPU 1 thread (+ CUDA if any)
    python benchmarks/moe_routing.py --dim 384 --experts 8 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn as nn
from timm.layers import Mlp

from zoo.nn.moe import MoE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers beside this script
from common import machine_line, summary, sync  # noqa: E402

CELLS = ("dense", "token", "expert", "expert soft", "all experts")


def build(cell: str, args: argparse.Namespace, num_experts: int, device: torch.device) -> nn.Module:
    torch.manual_seed(args.seed)
    hidden = args.mlp_ratio * args.dim
    if cell == "dense":
        module: nn.Module = Mlp(args.dim, hidden)
    elif cell in ("token", "all experts"):
        cf = None if cell == "all experts" else args.capacity_factor
        module = MoE(args.dim, hidden, num_experts, router="token_choice", k=1, capacity_factor=cf)
    else:
        module = MoE(
            args.dim,
            hidden,
            num_experts,
            router="expert_choice",
            capacity_factor=args.capacity_factor,
            topk="soft" if cell == "expert soft" else "hard",
        )
    module = module.to(device).train()
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    return module


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    out = module(x)
    loss = (out * grad).sum()
    if isinstance(module, MoE):
        loss = loss + 0.01 * module.aux_loss
    loss.backward()


def time_cells(args: argparse.Namespace, num_experts: int, device: torch.device, cells: list[str]) -> dict[str, float]:
    """Median forward + backward time of every cell at one E, interleaved."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.seq, args.dim, generator=gen).to(device)
    grad = torch.randn(args.batch, args.seq, args.dim, generator=gen).to(device)
    modules = {c: build(c, args, num_experts, device) for c in cells}
    for m in modules.values():  # warm-up
        step(m, x, grad)
    times: dict[str, list[float]] = {c: [] for c in modules}
    for _ in range(args.steps):
        for c, m in modules.items():
            sync(device)
            t0 = time.perf_counter()
            step(m, x, grad)
            sync(device)
            times[c].append(time.perf_counter() - t0)
    return {c: statistics.median(t) for c, t in times.items()}


def format_table(rows: list[dict[str, Any]], cells: list[str]) -> str:
    moe_cells = [c for c in cells if c != "dense"]
    header = (
        ["device", "E", "expert params (M)", "dense (ms)"]
        + [f"{c} (ms)" for c in moe_cells]
        + [f"{c}/dense" for c in moe_cells]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|"]
    for r in rows:
        t = r["times"]
        base = t["dense"]
        cols = [r["device"], str(r["experts"]), f"{r['expert_params'] / 1e6:.1f}", f"{base * 1e3:.1f}"]
        cols += [f"{t[c] * 1e3:.1f}" if c in t else "-" for c in moe_cells]
        cols += [f"{r['ratios'][c]:.2f}" if c in t else "-" for c in moe_cells]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="numbers of experts E")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=197)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--mlp-ratio", type=int, default=4, help="hidden = mlp_ratio * dim, dense and per expert")
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    p.add_argument("--all-experts-max", type=int, default=16, help="largest E for the 'all experts' cell")
    p.add_argument("--steps", type=int, default=9, help="timed steps after the warm-up step")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also save the raw numbers here")
    args = p.parse_args(argv)
    if "dense" not in args.cells:
        args.cells = ["dense"] + args.cells
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    machines = []
    for name in args.devices:
        device = torch.device(name)
        machines.append(machine_line(device, args.threads if device.type == "cpu" else 0))
        for num_experts in args.experts:
            hidden = args.mlp_ratio * args.dim
            params = num_experts * (2 * args.dim * hidden + hidden + args.dim)
            times = time_cells(args, num_experts, device, [c for c in args.cells if c != "all experts"])
            ratios = {c: t / times["dense"] for c, t in times.items()}
            if "all experts" in args.cells and num_experts <= args.all_experts_max:
                # in a pass of its own with its own dense baseline: its activations flood memory
                alone = time_cells(args, num_experts, device, ["dense", "all experts"])
                times["all experts"] = alone["all experts"]
                ratios["all experts"] = alone["all experts"] / alone["dense"]
            rows.append(
                {"device": name, "experts": num_experts, "expert_params": params, "times": times, "ratios": ratios}
            )
            print(f"  done: {name} E={num_experts}", file=sys.stderr, flush=True)
    print(
        f"# MoE routing, forward + backward, x ({args.batch}, {args.seq}, {args.dim}) float32, expert hidden "
        f"{args.mlp_ratio * args.dim}, capacity factor {args.capacity_factor}\n"
    )
    for line in dict.fromkeys(machines):
        print(line + "\n")
    print(format_table(rows, args.cells) + "\n")
    print(
        f"time: median of {args.steps} forward + backward steps after a warm-up step, the cells of one E "
        "interleaved in one process; ratios against the dense MLP timed in the same pass ('all experts' is timed "
        "after the others, interleaved with the dense MLP only)."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machines": machines, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
