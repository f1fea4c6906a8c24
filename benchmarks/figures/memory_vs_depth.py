"""Peak memory of one training step vs depth: plain ResNet, gradient checkpointing, reversible Momentum ResNet.

He et al.'s CIFAR ResNet-(6n+2) (3 stages of n basic blocks, widths 16/32/64, batch 32 of 3x32x32 on the CPU) for

* ``plain``: ``zoo.cifar_resnet``, ordinary autograd (every activation kept);
* ``checkpoint``: the same net after ``model.set_grad_checkpointing()`` (each residual step keeps only its input
  and is recomputed in backward);
* ``reversible``: ``zoo.momentum_cifar_resnet(memory="reversible", gamma=0.9)`` (the momentum rule in exact
  fixed point: backward rebuilds every activation, so only each stage's output and an information buffer are kept).

A training step is forward, cross-entropy, backward and an SGD step (gradients allocated once beforehand). Each
(method, depth) runs in a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (the resident set then
follows the live tensors): one warm-up step (it also compiles the fused fixed-point kernels), then the peak resident
set of the next step (VmHWM reset just before it) minus the resident set before it, as ``benchmarks/common.py``'s
``peak_working_bytes`` measures it. The parameters' own memory (and their gradients') is in the baseline. With
``--small`` (the test suite's run) every point is measured in this process instead.

    python benchmarks/figures/memory_vs_depth.py       # depths 14 .. 218, 1 torch thread (a few minutes)
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # figure_common beside this script, the benchmarks above it
import figure_common as fc  # noqa: E402
from common import peak_working_bytes  # noqa: E402

NAME = "memory_vs_depth"
METHODS = ("plain", "checkpoint", "reversible")
STYLE = {
    "plain": ("0.2", "s-", "plain ResNet (autograd)"),
    "checkpoint": ("tab:green", "D-", "plain + set_grad_checkpointing()"),
    "reversible": ("tab:blue", "o-", 'Momentum ResNet, memory="reversible"'),
}
RESULT_TAG = "MEMORY_VS_DEPTH_RESULT "
WIDTHS = (16, 32, 64)
GAMMA = 0.9


def build(method: str, blocks: int, seed: int = 0) -> torch.nn.Module:
    """The CIFAR ResNet with ``blocks`` basic blocks per stage for ``method``, in train mode.

    Args:
        method: ``"plain"``, ``"checkpoint"`` or ``"reversible"``.
        blocks: basic blocks per stage (n; the depth is 6n + 2).
        seed: the initialisation's seed.
    """
    import zoo

    torch.manual_seed(seed)
    kw = dict(layers=(blocks,) * 3, widths=WIDTHS, num_classes=10)
    if method == "reversible":
        return zoo.momentum_cifar_resnet(memory="reversible", gamma=GAMMA, **kw).train()
    model = zoo.cifar_resnet(**kw).train()
    if method == "checkpoint":
        model.set_grad_checkpointing()
    elif method != "plain":
        raise ValueError(f"unknown method {method!r}")
    return model


def worker(method: str, blocks: int, batch: int) -> dict:
    """In this (fresh) process: the working bytes and time of one training step after a warm-up step.

    Args:
        method: ``"plain"``, ``"checkpoint"`` or ``"reversible"``.
        blocks: basic blocks per stage.
        batch: batch size.
    """
    device = torch.device("cpu")
    model = build(method, blocks)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up: one-time allocations and kernel compilation are not a step's working memory
    gc.collect()
    t0 = time.perf_counter()
    out = peak_working_bytes(step, device)
    return {
        "peak_bytes": int(out["peak_bytes"]),
        "peak_method": out["peak_method"],
        "step_s": time.perf_counter() - t0,
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
    }


def run_worker(method: str, blocks: int, args) -> dict:
    """Re-run this script with ``--worker`` in a fresh interpreter and parse its result line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(blocks), "--batch", str(args.batch)]
    cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"worker {method}/{blocks} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def plot(rows: list[dict], batch: int, footnote: str) -> fc.plt.Figure:
    """Peak working memory (MiB) against depth, one line per method.

    Args:
        rows: one dict per (method, depth).
        batch: batch size (for the title).
        footnote: the machine line.
    """
    fig, ax = fc.plt.subplots(figsize=(6.4, 4.0))
    for method, (colour, style, label) in STYLE.items():
        mine = [r for r in rows if r["method"] == method]
        ax.plot(
            [r["depth"] for r in mine], [r["peak_mib"] for r in mine], style, color=colour, ms=4, lw=1.6, label=label
        )
    ax.set_xlabel("depth 6n + 2 (layers)")
    ax.set_ylabel("peak working memory of a step (MiB)")
    ax.set_title(f"Training-step memory vs depth, CIFAR ResNet, batch {batch}, 3x32x32, CPU", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def main(argv: list[str] | None = None) -> list:
    p = fc.parser(__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="blocks per stage n (default 2 5 9 18 36)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32)")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "BLOCKS"), help="internal: measure one configuration")
    args = p.parse_args(argv)
    batch = args.batch or (4 if args.small else 32)
    if args.worker:
        with fc.torch_threads(args.threads):
            result = worker(args.worker[0], int(args.worker[1]), batch)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return []
    args.batch = batch
    blocks = args.blocks or ([2, 3] if args.small else [2, 5, 9, 18, 36])
    t0 = time.perf_counter()
    rows = []
    for n in blocks:
        for method in METHODS:
            # --small (the test suite's run): in this process, quicker than a fresh interpreter per point
            if args.small:
                with fc.torch_threads(args.threads):
                    r = worker(method, n, batch)
            else:
                r = run_worker(method, n, args)
            rows.append(
                {
                    "method": method,
                    "blocks_per_stage": n,
                    "depth": 6 * n + 2,
                    "peak_mib": r["peak_bytes"] / fc.MIB,
                    "param_mib": r["param_bytes"] / fc.MIB,
                    "step_s": r["step_s"],
                }
            )
            print(f"  {method} depth {6 * n + 2}: {r['peak_bytes'] / fc.MIB:.1f} MiB", file=sys.stderr, flush=True)
    where = "one process (--small)" if args.small else "fresh process per point, MALLOC_MMAP_THRESHOLD_=65536"
    footnote = f"{where}, VmHWM; {fc.machine(args.threads)}"
    csv_path = fc.write_csv(
        args.out / f"{NAME}.csv",
        rows,
        f"peak working memory of one training step (above model, batch and gradients), batch {batch}\n"
        f"{fc.command('memory_vs_depth.py', args.small)}\n{footnote}",
    )
    png_path = fc.save_png(plot(rows, batch, footnote), args.out / f"{NAME}.png", footnote)
    fc.report([csv_path, png_path])
    print(f"({time.perf_counter() - t0:.0f} s)")
    return [csv_path, png_path]


if __name__ == "__main__":
    main()
