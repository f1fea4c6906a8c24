"""Training memory and time of momentum ResNets (docs/mathematics.md, section 4) against a plain ResNet and
checkpointing.

Two markdown tables, every number from one run of this script (so ratios compare like with like):

1. torchvision ResNet-50, ResNet-101 and ResNet-152, side by side, for

   * ``plain``: the torchvision ResNet, ordinary autograd;
   * ``checkpoint``: the same net, each stage run by ``torch.utils.checkpoint.checkpoint_sequential`` with
     round(sqrt(n)) segments for its n blocks (``use_reentrant=False``);
   * ``momentumnet``: the published package (``pip install momentumnet``, the ``bench`` extra),
     ``transform_to_momentumnet(model, sub_layers=["layer1", ..., "layer4"], gamma=0.9, use_backprop=False,
     keep_first_layer=True, is_residual=False)``; the row is skipped (and says so) where it does not import;
   * ``zoo reversible`` / ``zoo full``: ``zoo.momentum_resnet50`` / ``101`` / ``152`` with ``memory="reversible"``
     (exact fixed-point rebuild in backward) and ``memory="full"`` (autograd through the same rule), gamma 0.9;
   * ``zoo-reversible-stored``: ``memory="reversible"`` with the fixed ``stored_blocks`` of :data:`STORED_BLOCKS`;
     ``zoo-reversible-planned``: with the counts ``zoo.nn.plan_stored_blocks`` picks, in a planning process of its
     own, for checkpointing's step peak as the budget (both measured by ``zoo.nn.step_peak_bytes``), then handed
     to the memory worker (a fresh process: the planner's many profiled steps leave heap pages resident that the
     measured step would reuse, an undercount of its peak) and to the time worker;

   with the peak working memory of one training step and the median step time, each also as a ratio to plain.

2. Memory against depth for the CIFAR ResNet-(6n+2) (``zoo.cifar_resnet`` vs ``zoo.momentum_cifar_resnet``
   with ``memory="reversible"``, 3 stages of n basic blocks, widths 16/32/64): peak working memory and ratio.
3. Memory against depth of a tied stack with glibc's DEFAULT allocator (``--tied-depths``): one residual
   function f(x) = tanh(x W^T + b), W 256x256, shared by every step, on a 1024x256 float32 state (1 MiB), under
   ``memory="reversible"`` (momentum, gamma 0.9, h = 1), ``memory="adjoint"`` (Euler, h = 1/N) and plain autograd
   (momentum, ``memory="full"``; only up to ``--tied-plain-max``, it grows by megabytes per step). Every
   configuration in a fresh process started without any ``MALLOC_*`` or ``GLIBC_TUNABLES`` variable: one warm-up
   step of the measured stack (compiles the fused kernels), ``malloc_trim(0)`` (the warm-up's freed pages go back
   to the system, so the measured steps cannot run on them), then the peak resident set (VmHWM, reset before
   them) of two training steps above the resident set just before them. The reversible rows also give the
   information buffer's size (log2(1/gamma) bits per step and element, live by design). Table 2 uses the small mmap
   threshold, under which the resident set follows the live tensors; this one shows what a user sees (an earlier
   engine's small tensor kept per step, the saved random state, pinned freed heap blocks and the process grew with
   depth although the live tensors did not).

A training step is forward, cross-entropy loss, backward and an SGD step (no momentum, so the optimiser keeps
no state; gradients are allocated once before the measurement and zeroed in place).

* Memory: every configuration in a fresh process (``--worker memory``): after one warm-up step (which also
  compiles the fused kernels), on CPU started with
  ``MALLOC_MMAP_THRESHOLD_=65536``, peak resident set during the next step
  (VmHWM reset just before it) minus the baseline after building the model, the batch and the gradients; on
  CUDA ``max_memory_allocated`` minus ``memory_allocated`` before the step.
* Time: one process per model (``--worker time``) with the ordinary allocator (under the small mmap threshold
  every large allocation is a fresh mapping that page-faults on first touch, which is not how training runs).
  It builds every method, runs a warm-up round and ``--steps`` timed rounds, each round one step of every
  method back to back, so the load of other processes on a shared machine hits them alike; the order is
  reversed every other round, because a step's position in the round moves its time (the same convolutions ran
  9-12% slower in the second model of a two-model round than in the first, whichever model was second); the
  ratio to plain is the median over rounds of the ratio within a round. Each step's forward (and loss) is timed too:
  1 + plain's forward / plain's step is the floor of any method that recomputes every block's forward once in
  backward, printed beside the reversible time verdicts.
* Threads: 1 on CPU by default (``--threads``): on a machine shared with other jobs, two OpenMP threads slow down
  many-fold (a ResNet-101 step at batch 2 once measured 34x slower than with one thread while two other
  processes ran).

    python benchmarks/momentum_memory.py                        # CPU: batch 16, 128x128; depths 20 110 302 1202
    python benchmarks/momentum_memory.py --batch 64 --size 224  # the GPU size (the default on CUDA)
    python benchmarks/momentum_memory.py --archs 101 --depths 20 110 --json out.json
    python benchmarks/momentum_memory.py --archs --depth-steps 2              # table 2 only, with step times
    python benchmarks/momentum_memory.py --archs --depths --tied-depths 100 3000   # table 3 only
    # table 1 only, the setting of the time targets, with the planned stored_blocks (2 threads; about 16 minutes on
    # a quiet 2-core machine with 7 rounds):
    python benchmarks/momentum_memory.py --threads 2 --steps 7 --depths --tied-depths --methods plain checkpoint
        momentumnet zoo-reversible zoo-reversible-planned zoo-full     # (one command line)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers beside this script
from common import machine_line, peak_working_bytes, summary, sync  # noqa: E402

MIB = 2**20
RESULT_TAG = "MOMENTUM_MEMORY_RESULT "
METHODS = (
    "plain",
    "checkpoint",
    "momentumnet",
    "zoo-reversible",
    "zoo-reversible-stored",
    "zoo-reversible-planned",
    "zoo-reversible-eager",
    "zoo-full",
)
METHOD_LABELS = {
    "plain": "torchvision (plain)",
    "checkpoint": "checkpoint_sequential, sqrt(n) segments/stage",
    "momentumnet": "momentumnet package (use_backprop=False)",
    "zoo-reversible": 'zoo momentum, memory="reversible"',
    "zoo-reversible-stored": 'zoo momentum, memory="reversible", stored_blocks',
    "zoo-reversible-planned": 'zoo momentum, memory="reversible", planned stored_blocks',
    "zoo-reversible-eager": 'zoo momentum, memory="reversible", eager kernels',
    "zoo-full": 'zoo momentum, memory="full"',
}
DEPTH_METHODS = ("plain", "zoo-reversible")
# stored_blocks of "zoo-reversible-stored" per architecture: all of layer4 and the largest count of layer3 blocks
# whose peak stayed at or below checkpointing's at the CPU setting (batch 16, 128 px; measured with this script's
# memory worker, 2026-12-07). Stored blocks are held from their forward until backward reaches them, which is
# before layer3's parameter gradients are returned, the step's peak. Another batch or image size needs its own count.
STORED_BLOCKS = {50: (0, 0, 3, 3), 101: (0, 0, 8, 3), 152: (0, 0, 12, 3)}
STAGES = ("layer1", "layer2", "layer3", "layer4")
GAMMA = 0.9
# Targets: reversible peak <= checkpointing (and well below plain), flat in depth, time <= 1.35x plain;
# memory="full" momentum within 1.05x of plain in time and memory.
TIME_TARGET = 1.35
FULL_TARGET = 1.05
FLAT_TARGET = 1.25  # reversible peak at the largest depth / at the smallest depth


TIED_METHODS = ("plain", "reversible", "adjoint")
TIED_LABELS = {
    "plain": 'plain (momentum, memory="full")',
    "reversible": 'memory="reversible"',
    "adjoint": 'memory="adjoint" (Euler)',
}
TIED_ROWS, TIED_DIM = 1024, 256  # the state: 1 MiB of float32
TIED_FLAT_TARGET = 1.5  # the peak at the largest depth within 1.5x of the smallest depth's


def momentumnet_status() -> str | None:
    """None when the published ``momentumnet`` package imports, else why not."""
    try:
        from momentumnet import transform_to_momentumnet  # noqa: F401
    except Exception as e:  # ImportError, or an incompatibility with this torch
        return f"{type(e).__name__}: {e}"
    return None


# ------------------------------------------------------------------------------------------------ models


class CheckpointedStage(nn.Module):
    """A torchvision stage (``nn.Sequential`` of blocks) run by ``checkpoint_sequential`` when training."""

    def __init__(self, stage: nn.Sequential, segments: int):
        super().__init__()
        self.stage = stage
        self.segments = segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self.stage(x)
        return torch.utils.checkpoint.checkpoint_sequential(self.stage, self.segments, x, use_reentrant=False)


def build_imagenet(arch: int, method: str, seed: int, stored_blocks: tuple[int, ...] | None = None) -> nn.Module:
    """ResNet-``arch`` (50, 101 or 152) for ``method``, randomly initialised from ``seed``, in train mode;
    ``stored_blocks``: the counts of ``zoo-reversible-planned`` (as its plan worker planned them; None: none)."""
    import torchvision

    torch.manual_seed(seed)
    if method.startswith("zoo-"):
        import zoo

        builder = getattr(zoo, f"momentum_resnet{arch}")
        memory = "full" if method == "zoo-full" else "reversible"
        stored: int | tuple[int, ...] = 0
        if method == "zoo-reversible-stored":
            stored = STORED_BLOCKS[arch]
        elif method == "zoo-reversible-planned" and stored_blocks is not None:
            stored = tuple(stored_blocks)
        return builder(memory=memory, gamma=GAMMA, stored_blocks=stored).train()
    model = getattr(torchvision.models, f"resnet{arch}")(weights=None)
    if method == "checkpoint":
        for name in STAGES:
            stage = getattr(model, name)
            setattr(model, name, CheckpointedStage(stage, max(1, round(math.sqrt(len(stage))))))
    elif method == "momentumnet":
        from momentumnet import transform_to_momentumnet

        # is_residual=False: the package then uses f(x) = block(x) - x, the residual function of a torchvision
        # block (which returns relu(x + g(x))), as the zoo does; is_residual=True would feed block(x), x included,
        # into the velocity, a different (and growing) rule. Same arithmetic cost either way.
        model = transform_to_momentumnet(
            model,
            sub_layers=list(STAGES),
            keep_first_layer=True,
            gamma=GAMMA,
            use_backprop=False,
            is_residual=False,
        )
    elif method != "plain":
        raise ValueError(f"unknown method {method!r}")
    return model.train()


def build_cifar(depth: int, method: str, seed: int) -> nn.Module:
    """CIFAR ResNet-``depth`` (depth = 6n + 2): plain or momentum reversible."""
    import zoo

    n = (depth - 2) // 6
    torch.manual_seed(seed)
    kw = dict(layers=(n, n, n), widths=(16, 32, 64), num_classes=10)
    if method == "plain":
        return zoo.cifar_resnet(**kw).train()
    return zoo.momentum_cifar_resnet(memory=method.removeprefix("zoo-"), gamma=GAMMA, **kw).train()


def make_batch(batch: int, size: int, classes: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return x.to(device), y.to(device)


# ------------------------------------------------------------------------------------------------ worker process


def build(table: str, arch: int, method: str, args: argparse.Namespace, device: torch.device):
    """Model, batch and optimiser of one configuration; gradients allocated once."""
    if table == "imagenet":
        model = build_imagenet(arch, method, args.seed, args.planned_stored)
        classes, size, batch = 1000, args.size, args.batch
    else:
        model = build_cifar(arch, method, args.seed)
        classes, size, batch = 10, 32, args.depth_batch
    model.to(device)
    x, y = make_batch(batch, size, classes, args.seed, device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.0)

    fused = method != "zoo-reversible-eager"  # the fixed-point kernels: compiled (default) or eager

    def step() -> float:
        """One training step; returns the time of its forward (and loss), in seconds."""
        from zoo.ops import fixed_point

        fixed_point.set_fused(fused)
        opt.zero_grad(set_to_none=False)
        sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        sync(device)
        forward = time.perf_counter() - t0
        loss.backward()
        opt.step()
        return forward

    return model, params, step


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration, one process: peak working memory of one training step."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    method = args.worker_methods[0]
    if method == "zoo-reversible-planned" and args.planned_stored is None:
        raise RuntimeError("the planned row's memory worker needs the counts of a plan worker (--planned-stored)")
    model, params, step = build(args.worker_table, args.worker_arch, method, args, device)
    # one warm-up step, for every method: one-time costs (the compilation of the fused kernels for exactly the
    # variants and shapes the model uses, library caches) are not a training step's working memory
    step()
    gc.collect()
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        # the largest stage's parameters: a reversible stack returns its parameter gradients all at once
        "max_stage_param_bytes": max(
            (
                sum(p.numel() * p.element_size() for p in getattr(model, s).parameters())
                for s in STAGES
                if hasattr(model, s)
            ),
            default=0,
        ),
    }
    t0 = time.perf_counter()
    out.update(peak_working_bytes(step, device))
    out["first_step_time"] = time.perf_counter() - t0
    return out


def plan_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The planned row's counts, in a process of its own (see the module docstring)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return plan_for_checkpointing(args, torch.device(args.device))


def plan_for_checkpointing(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``zoo.nn.plan_stored_blocks`` for the reversible model of ``--worker-arch``, with checkpointing's step peak
    as the budget, both measured by ``zoo.nn.step_peak_bytes`` (tensor bytes, gradients allocated before the step as
    in every configuration here) on the step's forward and backward."""
    from zoo.nn import plan_stored_blocks, step_peak_bytes

    arch = args.worker_arch
    x, y = make_batch(args.batch, args.size, 1000, args.seed, device)

    def prepared(method: str) -> tuple[nn.Module, Any]:
        model = build_imagenet(arch, method, args.seed).to(device)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return model, lambda: F.cross_entropy(model(x), y).backward()

    model, forward_backward = prepared("checkpoint")
    forward_backward()  # warm-up
    budget = step_peak_bytes(forward_backward, device)
    del model, forward_backward
    gc.collect()
    model, forward_backward = prepared("zoo-reversible")
    t0 = time.perf_counter()
    plan = plan_stored_blocks(model, forward_backward, budget, device)
    return {
        "stored_blocks": [plan[s] for s in STAGES],
        "plan_budget_bytes": budget,
        "plan_seconds": time.perf_counter() - t0,
    }


def tied_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Table 3, one configuration per process: peak resident memory of two training steps of a tied stack."""
    from common import high_water_bytes, reset_high_water, rss_bytes

    from zoo.nn import ResidualStack

    if args.threads:
        torch.set_num_threads(args.threads)
    method, depth = args.worker_methods[0], args.worker_arch
    torch.manual_seed(args.seed)
    block = nn.Sequential(nn.Linear(TIED_DIM, TIED_DIM), nn.Tanh())
    x = torch.randn(TIED_ROWS, TIED_DIM)

    def stack_of(n: int) -> ResidualStack:
        if method == "adjoint":
            return ResidualStack([block] * n, rule="euler", scale="depth", memory="adjoint")
        return ResidualStack([block] * n, rule="momentum", gamma=GAMMA, memory="full" if method == "plain" else method)

    def step(stack: ResidualStack) -> None:
        stack(x).square().mean().backward()

    stack = stack_of(depth)
    step(stack)  # warm-up: compiles the fused kernels (their variants depend on the depth), allocates the gradients
    gc.collect()
    # Hand the freed heap pages back to the system (glibc's malloc_trim), so that the measured steps cannot run
    # on pages the warm-up left resident: the peak below is what two steps need, from a trimmed heap.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = rss_bytes()
    if not reset_high_water():
        raise RuntimeError("table 3 needs /proc/self/clear_refs to reset the peak resident set")
    t0 = time.perf_counter()
    for _ in range(2):
        step(stack)
    elapsed = (time.perf_counter() - t0) / 2
    buffer = 0
    if method == "reversible":  # the information buffer: live, log2(1/gamma) bits per step and element
        from zoo.ops.fixed_point import GammaRatio

        ratio = GammaRatio(GAMMA)
        for _, word in ratio.word_plan(depth):
            buffer += x.numel() * torch.empty((), dtype=word).element_size()
    return {"peak_bytes": high_water_bytes() - base, "baseline_rss": base, "time": elapsed, "buffer_bytes": buffer}


def time_worker(args: argparse.Namespace) -> dict[str, Any]:
    """All methods of one table row group in one process, their steps alternating round by round.

    Round 0 is the warm-up; rounds 1..steps are timed. Every round times one step of each method back to back
    (in reverse order every other round), so load from other processes hits all of them alike; the ratios to plain
    are taken per round.
    """
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {m: build(args.worker_table, args.worker_arch, m, args, device)[2] for m in args.worker_methods}
    times: dict[str, list[float]] = {m: [] for m in steps}
    forward_times: dict[str, list[float]] = {m: [] for m in steps}
    for r in range(args.steps + 1):
        # the order reversed every other round: no method always runs in the same position (see the docstring)
        order = list(steps.items()) if r % 2 == 0 else list(reversed(steps.items()))
        for m, step in order:
            sync(device)
            t0 = time.perf_counter()
            forward = step()
            sync(device)
            if r:
                times[m].append(time.perf_counter() - t0)
                forward_times[m].append(forward)
    return {"step_times": times, "forward_times": forward_times, "threads": torch.get_num_threads()}


def run_worker(kind: str, table: str, arch: int, methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Re-invoke this script with ``--worker`` in a fresh interpreter and parse its JSON line.

    Memory workers start with ``MALLOC_MMAP_THRESHOLD_=65536`` (the resident set then follows the live
    tensors); tied workers (table 3) without any malloc setting; time workers with the ordinary allocator,
    which reuses freed blocks as a training run does (with the small threshold every large temporary is a fresh
    mapping and page-faults on first touch, which slows the methods with many temporaries most).
    """
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--worker-table",
        table,
        "--worker-arch",
        str(arch),
        "--worker-methods",
        *methods,
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--depth-batch",
        str(args.depth_batch),
        "--steps",
        str(args.steps if table == "imagenet" else args.depth_steps),
        "--seed",
        str(args.seed),
        "--lr",
        str(args.lr),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    if args.planned_stored is not None:
        cmd += ["--planned-stored", *map(str, args.planned_stored)]
    env = dict(os.environ)
    if kind in ("memory", "plan"):  # the planner measures tensor bytes; the same allocator as the memory worker
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    elif kind == "tied":  # glibc's defaults, as a user runs
        env = {k: v for k, v in env.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(
        f"{kind} worker {table}/{arch}/{' '.join(methods)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )


# ------------------------------------------------------------------------------------------------ report


def _load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def _label(method: str, arch: int, row: dict[str, Any] | None = None) -> str:
    """The table's method cell (the stored_blocks setting spelled out; a planned one from its ``row``)."""
    if method == "zoo-reversible-stored":
        return f"{METHOD_LABELS[method]}={STORED_BLOCKS[arch]}"
    if method == "zoo-reversible-planned" and row and row.get("stored_blocks") is not None:
        return f"{METHOD_LABELS['zoo-reversible-stored']}={tuple(row['stored_blocks'])} (planned)"
    return METHOD_LABELS[method]


def _planned(row: dict[str, Any] | None) -> tuple[int, ...]:
    return tuple((row or {}).get("stored_blocks") or ())


def _ratio(a: float | None, b: float | None, fmt: str = ".2f") -> str:
    return "-" if a is None or not b else f"{a / b:{fmt}}"


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.0f}"


def imagenet_table(
    results: dict[tuple[int, str], dict[str, Any] | None], archs: list[int], methods: list[str], skip: dict[str, str]
) -> str:
    header = ["model", "method", "peak (MiB)", "peak / plain", "step (ms)", "time / plain"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|--:|--:|--:|--:|"]
    for arch in archs:
        plain = results.get((arch, "plain"))
        for method in methods:
            r = results.get((arch, method))
            if r is None:
                cells = [
                    f"ResNet-{arch}",
                    _label(method, arch),
                    f"skipped ({skip.get(method, 'failed')})",
                    "-",
                    "skipped",
                    "-",
                ]
            else:
                ratio = r.get("time_ratio")
                cells = [
                    f"ResNet-{arch}",
                    _label(method, arch, r),
                    f"{r['peak'] / MIB:.0f}",
                    _ratio(r["peak"], plain and plain["peak"]),
                    _ms(r.get("time")),
                    "-" if ratio is None else f"{ratio:.2f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def depth_table(results: dict[tuple[int, str], dict[str, Any]], depths: list[int], timed: bool) -> str:
    header = [
        "depth",
        "blocks/stage",
        "params (MiB)",
        "peak plain (MiB)",
        "peak reversible (MiB)",
        "reversible / plain",
    ]
    if timed:
        header += ["step plain (ms)", "step reversible (ms)", "time rev. / plain"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["--:"] * len(header)) + "|"]
    for d in depths:
        p, r = results[(d, "plain")], results[(d, "zoo-reversible")]
        cells = [
            str(d),
            str((d - 2) // 6),
            f"{p['param_bytes'] / MIB:.1f}",
            f"{p['peak'] / MIB:.0f}",
            f"{r['peak'] / MIB:.0f}",
            _ratio(r["peak"], p["peak"], ".3f"),
        ]
        if timed:
            ratio = r.get("time_ratio")
            cells += [_ms(p.get("time")), _ms(r.get("time")), "-" if ratio is None else f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tied_table(results: dict[tuple[int, str], dict[str, Any]], depths: list[int]) -> str:
    header = (
        ["depth"]
        + [f"{TIED_LABELS[m]} peak (MiB)" for m in TIED_METHODS]
        + ["reversible buffer (MiB)", "reversible / plain", "step reversible (s)", "step adjoint (s)"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["--:"] * len(header)) + "|"]
    for d in depths:
        r = {m: results.get((d, m)) for m in TIED_METHODS}
        peak = {m: None if r[m] is None else r[m]["peak_bytes"] for m in TIED_METHODS}
        cells = [str(d)] + ["not run" if peak[m] is None else f"{peak[m] / MIB:.0f}" for m in TIED_METHODS]
        cells += [
            "-" if r["reversible"] is None else f"{r['reversible']['buffer_bytes'] / MIB:.1f}",
            _ratio(peak["reversible"], peak["plain"], ".3f"),
            *("-" if r[m] is None else f"{r[m]['time']:.1f}" for m in ("reversible", "adjoint")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tied_verdicts(results: dict[tuple[int, str], dict[str, Any]], depths: list[int]) -> list[str]:
    out = []
    if len(depths) < 2:
        return out
    lo, hi = min(depths), max(depths)
    for m in ("reversible", "adjoint"):
        a, b = results[(lo, m)]["peak_bytes"], results[(hi, m)]["peak_bytes"]
        ok = b <= TIED_FLAT_TARGET * a
        miss = "" if ok else f"; missed by {b / a / TIED_FLAT_TARGET - 1:+.0%} of the bound"
        line = (
            f"- tied stack, default allocator, {m} (peak at depth {hi} <= {TIED_FLAT_TARGET}x depth {lo}): "
            f"{'met' if ok else 'MISSED'} ({a / MIB:.0f} -> {b / MIB:.0f} MiB, {b / a:.2f}x{miss})"
        )
        if m == "reversible":  # the buffer is live memory the exact rebuild needs, not allocator growth
            ba, bb = results[(lo, m)]["buffer_bytes"], results[(hi, m)]["buffer_bytes"]
            line += (
                f"; less the information buffer ({ba / MIB:.1f} -> {bb / MIB:.1f} MiB, live by design): "
                f"{(a - ba) / MIB:.0f} -> {(b - bb) / MIB:.0f} MiB, {(b - bb) / (a - ba):.2f}x"
            )
        out.append(line)
    return out


def verdicts(imagenet: dict, archs: list[int], depth: dict, depths: list[int]) -> list[str]:
    """One line per target: met, or missed by how much."""
    out = []
    for arch in archs:
        plain, ck = imagenet.get((arch, "plain")), imagenet.get((arch, "checkpoint"))
        for method in ("zoo-reversible", "zoo-reversible-stored", "zoo-reversible-planned"):
            rev = imagenet.get((arch, method))
            what = {
                "zoo-reversible": "reversible",
                "zoo-reversible-stored": f"reversible, stored_blocks={STORED_BLOCKS[arch]}",
                "zoo-reversible-planned": f"reversible, planned stored_blocks={_planned(rev)}",
            }[method]
            if plain and ck and rev:
                ok = rev["peak"] <= ck["peak"]
                how = (
                    f"{rev['peak'] / MIB:.0f} MiB = {rev['peak'] / plain['peak']:.2f}x plain, "
                    f"checkpoint {ck['peak'] / MIB:.0f} MiB = {ck['peak'] / plain['peak']:.2f}x plain"
                )
                over = rev["peak"] - ck["peak"]
                miss = "" if ok else f"; missed by {over / MIB:.0f} MiB ({rev['peak'] / ck['peak'] - 1:+.0%})"
                out.append(
                    f"- ResNet-{arch} memory ({what} <= checkpoint, well below plain): "
                    f"{'met' if ok else 'MISSED'} ({how}{miss})"
                )
            if plain and rev and rev.get("time_ratio") is not None:
                t = rev["time_ratio"]
                miss = "" if t <= TIME_TARGET else f"; missed by {t - TIME_TARGET:.2f}x ({t / TIME_TARGET - 1:+.0%})"
                floor = plain.get("recompute_floor")
                floor_note = (
                    ""
                    if floor is None or method != "zoo-reversible"
                    else f"; recomputing every block's forward once costs at least 1 + plain forward / plain step = "
                    f"{floor:.2f}x here"
                )
                out.append(
                    f"- ResNet-{arch} time ({what} <= {TIME_TARGET}x plain): "
                    f"{'met' if t <= TIME_TARGET else 'MISSED'} ({t:.2f}x{miss}{floor_note})"
                )
        full = imagenet.get((arch, "zoo-full"))
        if plain and full:
            m = full["peak"] / plain["peak"]
            t = full.get("time_ratio")
            ok = m <= FULL_TARGET and (t is None or t <= FULL_TARGET)
            out.append(
                f'- ResNet-{arch} memory="full" momentum (time and memory <= {FULL_TARGET}x plain): '
                f"{'met' if ok else 'MISSED'} (memory {m:.2f}x" + ("" if t is None else f", time {t:.2f}x") + ")"
            )
    if len(depths) >= 2:
        lo, hi = min(depths), max(depths)
        r_lo, r_hi = depth[(lo, "zoo-reversible")]["peak"], depth[(hi, "zoo-reversible")]["peak"]
        p_lo, p_hi = depth[(lo, "plain")]["peak"], depth[(hi, "plain")]["peak"]
        stage_lo, stage_hi = (depth[(d, "plain")]["max_stage_param_bytes"] for d in (lo, hi))
        # A reversible stage returns all its parameter gradients at once from one autograd node, so the peak
        # holds the largest stage's gradients; the rest (activations and state) is what must stay flat.
        g = (r_hi - stage_hi) / (r_lo - stage_lo)
        miss = "" if g <= FLAT_TARGET else f"; missed by {g / FLAT_TARGET - 1:+.0%} of the {FLAT_TARGET}x bound"
        out.append(
            f"- memory flat in depth (reversible peak less the largest stage's parameter gradients, depth {hi} "
            f"<= {FLAT_TARGET}x depth {lo}): {'met' if g <= FLAT_TARGET else 'MISSED'} ({g:.2f}x; peak "
            f"{r_lo / MIB:.0f} -> {r_hi / MIB:.0f} MiB, of which the largest stage's parameter gradients "
            f"{stage_lo / MIB:.1f} -> {stage_hi / MIB:.1f} MiB; plain {p_lo / MIB:.0f} -> {p_hi / MIB:.0f} MiB, "
            f"{p_hi / p_lo:.1f}x{miss})"
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument(
        "--archs",
        type=int,
        nargs="*",
        default=[50, 101, 152],
        choices=[50, 101, 152],
        help="torchvision ResNets for table 1 (none: skip the table)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="table 1 methods (plain is always included)",
    )
    p.add_argument("--batch", type=int, default=64 if cuda else 16, help="table 1 batch (64 on CUDA, else 16)")
    p.add_argument("--size", type=int, default=224 if cuda else 128, help="table 1 image size (224 on CUDA, else 128)")
    p.add_argument(
        "--steps",
        type=int,
        default=2,
        help="table 1 timed rounds after a warm-up round, one step of every method each (0: no times)",
    )
    p.add_argument(
        "--depths",
        type=int,
        nargs="*",
        default=[20, 110, 302, 1202],
        help="CIFAR depths 6n+2 for table 2 (none: skip the table)",
    )
    p.add_argument("--depth-batch", type=int, default=32)
    p.add_argument("--depth-steps", type=int, default=0, help="table 2 timed rounds (0: memory only)")
    p.add_argument(
        "--tied-depths",
        type=int,
        nargs="*",
        default=[100, 300, 1000, 3000],
        help="table 3 depths of the tied stack, default allocator (none: skip the table)",
    )
    p.add_argument(
        "--tied-plain-max",
        type=int,
        default=300,
        help="table 3: plain autograd only up to this depth (about 5 MiB per step)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0 if cuda else 1,
        help="torch threads in the workers (0: torch's default; 1 on CPU: on a shared machine two "
        "OpenMP threads slow down many-fold whenever another process takes a core)",
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--json", metavar="PATH", help="also save the raw numbers here")
    p.add_argument("--worker", choices=["memory", "time", "tied", "plan"], help=argparse.SUPPRESS)
    p.add_argument("--worker-table", choices=["imagenet", "cifar", "tied"], help=argparse.SUPPRESS)
    p.add_argument("--worker-arch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-methods", nargs="+", choices=METHODS + TIED_METHODS[1:], help=argparse.SUPPRESS)
    # the counts a plan worker found, handed to the memory and time workers of the same architecture
    p.add_argument("--planned-stored", type=int, nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "plain" not in args.methods:
        args.methods.insert(0, "plain")
    args.methods = [m for m in METHODS if m in args.methods]
    for d in args.depths:
        if d < 8 or (d - 2) % 6:
            p.error(f"depth {d} is not 6n+2 with n >= 1")
    return args


def _add_times(rows: dict[str, dict[str, Any]], timing: dict[str, Any]) -> None:
    """Median step time of each method and the median over rounds of its time / plain's time in that round."""
    times = timing["step_times"]
    for m, ts in times.items():
        rows[m]["step_times"] = ts
        rows[m]["time"] = statistics.median(ts) if ts else None
        ratios = [t / p for t, p in zip(ts, times["plain"])]
        rows[m]["time_ratio"] = statistics.median(ratios) if ratios else None
        forward = timing["forward_times"][m]
        rows[m]["forward_time"] = statistics.median(forward) if forward else None
        # the floor of a method that recomputes every block's forward once in backward: 1 + forward / step
        floors = [1.0 + f / t for f, t in zip(forward, ts)]
        rows[m]["recompute_floor"] = statistics.median(floors) if floors else None


def _progress(started: float, what: str) -> None:
    print(f"  done: {what}, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker = {"memory": memory_worker, "time": time_worker, "tied": tied_worker, "plan": plan_worker}[args.worker]
        result = worker(args)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    started, load_start = time.perf_counter(), _load()
    skip: dict[str, str] = {}
    if "momentumnet" in args.methods:
        why = momentumnet_status()
        if why is not None:
            skip["momentumnet"] = f"momentumnet does not import: {why}"
            print(f"  {skip['momentumnet']}; its rows are skipped", file=sys.stderr, flush=True)

    # Table 1: a memory process per configuration, then one time process per architecture.
    imagenet: dict[tuple[int, str], dict[str, Any] | None] = {}
    for arch in args.archs:
        ran = []
        args.planned_stored = None
        for method in args.methods:
            imagenet[(arch, method)] = None
            if method in skip:
                continue
            try:
                plan: dict[str, Any] = {}
                if method == "zoo-reversible-planned":
                    plan = run_worker("plan", "imagenet", arch, [method], args)
                    args.planned_stored = plan["stored_blocks"]
                r = run_worker("memory", "imagenet", arch, [method], args)
                imagenet[(arch, method)] = dict(r, **plan, peak=r["peak_bytes"])
                ran.append(method)
            except RuntimeError as e:
                if method != "momentumnet":
                    raise
                skip[method] = "momentumnet failed: " + str(e).strip().splitlines()[-1][:120]
                print(f"  {skip[method]}", file=sys.stderr, flush=True)
            _progress(started, f"memory ResNet-{arch} {method}")
        if args.steps > 0:
            timing = run_worker("time", "imagenet", arch, ran, args)
            _add_times({m: imagenet[(arch, m)] for m in ran}, timing)
            _progress(started, f"time ResNet-{arch} ({', '.join(ran)})")

    # Table 2: memory (and optionally time) against depth.
    depth: dict[tuple[int, str], dict[str, Any]] = {}
    for d in args.depths:
        for method in DEPTH_METHODS:
            depth[(d, method)] = run_worker("memory", "cifar", d, [method], args)
            depth[(d, method)]["peak"] = depth[(d, method)]["peak_bytes"]
            _progress(started, f"memory CIFAR ResNet-{d} {method}")
        if args.depth_steps > 0:
            _add_times(
                {m: depth[(d, m)] for m in DEPTH_METHODS}, run_worker("time", "cifar", d, list(DEPTH_METHODS), args)
            )
            _progress(started, f"time CIFAR ResNet-{d}")

    # Table 3: a tied stack against depth, glibc's default allocator.
    tied: dict[tuple[int, str], dict[str, Any]] = {}
    for d in args.tied_depths:
        for method in TIED_METHODS:
            if method == "plain" and d > args.tied_plain_max:
                continue
            tied[(d, method)] = run_worker("tied", "tied", d, [method], args)
            _progress(started, f"tied stack depth {d} {method}")

    wall = time.perf_counter() - started
    some = next(iter(r for r in [*imagenet.values(), *depth.values()] if r), None)
    method_used = some["peak_method"] if some else ""
    print("# Momentum ResNets: peak training memory and step time\n")
    print(machine_line(device, threads))
    print(f"load average (1/5/15 min) at start {load_start}, at end {_load()}; wall time {wall:.0f} s\n")
    if args.archs:
        print(f"## torchvision ResNets, batch {args.batch}, 3x{args.size}x{args.size}, gamma {GAMMA}\n")
        print(imagenet_table(imagenet, args.archs, args.methods, skip) + "\n")
        print(
            "peak: working memory of one training step (forward, loss, backward, SGD step) above the baseline "
            "(model, batch, gradients), one fresh process per configuration, measured on the step after a "
            "warm-up step"
            + (", MALLOC_MMAP_THRESHOLD_=65536" if device.type == "cpu" else "")
            + f", peak from {method_used}. step: median over {args.steps} rounds after a warm-up round; each round "
            "runs one step of every method back to back in one process per model (ordinary allocator), in reverse "
            "order every other round; "
            "time / plain: median over the rounds of the ratio within the round.\n"
        )
    if args.depths:
        print(f"## Memory vs depth, CIFAR ResNet-(6n+2), widths 16/32/64, batch {args.depth_batch}, 3x32x32\n")
        print(depth_table(depth, args.depths, args.depth_steps > 0) + "\n")
        print(
            'plain: zoo.cifar_resnet; reversible: zoo.momentum_cifar_resnet(memory="reversible", gamma=0.9); '
            "params: trainable parameters (their gradients are preallocated, so in the baseline).\n"
        )
    if args.tied_depths:
        print(f"## Memory vs depth, tied stack, glibc's default allocator, state {TIED_ROWS}x{TIED_DIM} float32\n")
        print(tied_table(tied, args.tied_depths) + "\n")
        print(
            "f(x) = tanh(x W^T + b), one module for every step; peak: resident set (VmHWM reset before) of two "
            "training steps above the resident set just before them, one fresh process per configuration "
            "started without MALLOC_* / GLIBC_TUNABLES (glibc's default allocator), after a warm-up step of the "
            "same stack and malloc_trim(0); buffer: the reversible stack's information-buffer words (live, "
            "log2(1/gamma) bits per step and element); step: mean of the two measured steps.\n"
        )
    print("## Targets\n")
    print("\n".join(verdicts(imagenet, args.archs, depth, args.depths) + tied_verdicts(tied, args.tied_depths)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine_line(device, threads),
                    "args": vars(args),
                    "wall_s": wall,
                    "skip": skip,
                    "imagenet": [{"arch": a, "method": m, **(r or {})} for (a, m), r in imagenet.items()],
                    "depth": [{"depth": d, "method": m, **r} for (d, m), r in depth.items()],
                    "tied": [{"depth": d, "method": m, **r} for (d, m), r in tied.items()],
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
