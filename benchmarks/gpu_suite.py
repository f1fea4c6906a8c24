"""One prepared GPU run: the CUDA correctness checks of every custom kernel, then the GPU benchmark tables.

    python benchmarks/gpu_suite.py                          # one GPU, under 8 minutes: gpu_suite.md, gpu_suite.json
    python benchmarks/gpu_suite.py --md out.md --json out.json
    python benchmarks/gpu_suite.py --smoke                  # every step at tiny sizes on the CPU (the tests run it)
    python benchmarks/gpu_suite.py --smoke --device cuda    # the same tiny rehearsal on the GPU (mostly compilation)
    python benchmarks/gpu_suite.py --sections budget sinkhorn   # a subset (checks always run first)

The GPU run and the smoke run execute the same code; only the sizes (:data:`GPU`, :data:`SMOKE`) and the device
differ. The lines that depend on the device are the measurements themselves (CUDA events or ``perf_counter``;
the peak by ``zoo.nn.step_peak_bytes``: ``max_memory_allocated``, or the profiler's allocation events on the
CPU), the allocator limit of the batch search and emptying the CUDA
cache, TF32 off during the checks, and the GPU's name in the report. Without a GPU (and without ``--smoke``) the
script refuses with one message and exit status 2.

**Checks** (section ``checks``, always run, never skipped; each prints PASS / FAIL with its largest error; the
exit status is 1 when one fails). Errors are relative to the reference's largest entry,
``max |a - b| / max |b|``, the largest over every compared tensor (outputs and gradients); TF32 is off while they
run, so float32 means float32.

* Reversible momentum stack (x_{n+1} = x_n + v_{n+1}, v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n), gamma 0.9,
  rebuilt exactly backwards from fixed-point integers): output, input gradient and every parameter gradient of
  ``memory="reversible"`` against autograd through ``memory="full"`` (the same blocks), through 200 tanh-MLP
  layers in float64 (steps of size 1, 48 fraction bits; 1e-8) and float32 (steps of size 1/200; 1e-4), and
  through a momentum CIFAR ResNet (convolutions, BatchNorm, the fused ReLU tail, transitions; float32, 1e-4) whose
  BatchNorm running statistics must also agree.
* Sinkhorn attention (``zoo.ops.sinkhorn.attention``, whatever kernel it picks on the device: the chunked op, or
  FlexAttention where it applies) against the literal definition computed here in float64 (alternate row and
  column normalisations of exp(C) * allowed, columns to n_rows / n_cols), forward and the gradients of q, k, v:
  key and query padding, causal, causal with padding (n_iter 4: ends on a column step), cross-attention with
  L != S and key padding (float32, 1e-4), and padding in bfloat16 (2e-2).
* Top-k operators on the device against the same call on the CPU (whose sorting runs in NumPy): hard
  ``topk_mask`` / ``topk_magnitude`` (exactly equal), relaxed ``soft_topk_mask`` (p 2 and 4/3 by PAV, p 2 by
  Dykstra, a per-row k along dim 0) and ``soft_topk_magnitude`` (p 2 and 4/3), forward and backward, float64
  (1e-9) and float32 (1e-4).
* MoE (``zoo.nn.MoE``) on the device against the same weights on the CPU, float64 (1e-9), with padded tokens:
  token choice (k 2, capacity factor 0.5: tokens are dropped) and expert choice (capacity factor 1), hard and
  relaxed top-k. The dispatch (which token goes to which slot) and the tokens kept per expert must be equal;
  outputs and every gradient close; padded tokens' outputs and input gradients exactly zero; garbage (NaN) in the
  padded tokens changes nothing; each expert keeps at most its capacity, and the capacity-limited token-choice
  case really drops tokens.

**Benchmarks** (each section has a time cap, and the run a deadline, ``--time-limit``, 400 s after the imports
by default; when the checks, which always run whole, leave less than the caps add up to, each section gets its
share of what is left; a section skips its remaining sizes when the next would pass its cap, and says so).
Memory is ``torch.cuda.max_memory_allocated`` during one step above what was allocated before it (on the CPU of a
smoke run: the tensor bytes ``torch.profiler`` records instead; both through ``zoo.nn.step_peak_bytes``); times
are CUDA-event times, the median of the repeated steps after warm-up steps (which also compile the kernels).
Ratios are against the baseline measured in the same run.

* ``resnet``: one training step (forward under bf16 autocast, cross-entropy, backward, SGD) of the torchvision
  ResNet-152, batch 64, 3x224x224, as ``plain``, with ``checkpoint_sequential`` (round(sqrt(n)) segments per
  stage), and as the zoo's momentum ResNet-152 with ``memory="reversible"`` and ``memory="full"`` (gamma 0.9):
  the models of ``benchmarks/momentum_memory.py``; and ``memory="reversible"`` with the ``stored_blocks`` that
  ``zoo.nn.plan_stored_blocks`` picks for checkpointing's peak as the budget (nothing stored when checkpointing
  ran out of memory or no setting fits that budget).
* ``budget``: the largest batch whose training step at 3x500x500 (bf16 autocast) fits a fixed memory budget
  (``--budget-gib``, default 16 GiB: everything the step holds, model and gradients included), for each of the
  four: doubling from 1, then bisection, capped at ``--max-batch``; on CUDA the allocator is limited to the budget
  (``set_per_process_memory_fraction``) so a batch beyond it fails with an out-of-memory error, caught cleanly
  (the cache emptied before the next try).
* ``sinkhorn``: forward + backward of ``zoo.ops.sinkhorn.attention`` (n_iter 3) and of SDPA, bf16,
  batch 4, 8 heads, head dim 64, at 1k, 2k, 4k, 8k and 16k tokens.
* ``moe``: forward + backward (bf16 autocast) of ``zoo.nn.MoE`` (token choice k 1, expert choice hard and
  relaxed; capacity factor 1) against the dense timm ``Mlp`` of the same width, ViT-S/16 tokens (batch 64 x 197 x
  384, hidden 1536), for 8, 16, 32 and 64 experts: the cells of ``benchmarks/moe_routing.py``.

The markdown report and the JSON file are written (atomically) after every check and every section, so a run cut
short leaves the checks and sections it finished; ``"complete": true`` marks a finished run. A section that raises
keeps the rows it measured before the error, which its table shows; the next sections still run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the shared helpers and the CPU benchmarks' model definitions beside this script
sys.path.insert(1, os.path.dirname(HERE))  # this checkout's zoo, also where it is not installed
from common import machine_line, step_seconds, summary  # noqa: E402

MIB = 2**20
GIB = 2**30
SECTIONS = ("checks", "resnet", "budget", "sinkhorn", "moe")
BENCHMARKS = SECTIONS[1:]
RESNET_METHODS = ("plain", "checkpoint", "zoo-reversible", "zoo-reversible-stored", "zoo-full")
# the largest-batch search: the stored row's count is searched for one batch (the table's), so it is not run there
BUDGET_METHODS = ("plain", "checkpoint", "zoo-reversible", "zoo-full")
RESNET_LABELS = {
    "plain": "torchvision (plain)",
    "checkpoint": "checkpoint_sequential, sqrt(n) segments/stage",
    "zoo-reversible": 'zoo momentum, memory="reversible"',
    "zoo-reversible-stored": 'zoo momentum, memory="reversible", stored_blocks',
    "zoo-full": 'zoo momentum, memory="full"',
}
MOE_CELLS = ("dense", "token", "expert", "expert soft")
MOE_LABELS = {
    "dense": "dense Mlp",
    "token": "token choice",
    "expert": "expert choice",
    "expert soft": "expert choice, relaxed",
}
NO_GPU = (
    "gpu_suite.py: no CUDA GPU here (torch.cuda.is_available() is False) and the full suite needs one; "
    "run `python benchmarks/gpu_suite.py --smoke` for the tiny CPU rehearsal of every step"
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the suite runs at: the GPU run and the smoke run differ only here (and in the device).

    Checks: ``stack_*`` the 200-layer MLP stack, ``cifar_*`` the momentum CIFAR ResNet, ``attn_*`` the Sinkhorn
    inputs (``attn_cross`` = (L, S) of the cross-attention case), ``topk_*`` the top-k rows, ``moe_*`` the MoE
    check. Benchmarks: ``resnet_*`` the 224 px table, ``budget_*`` the largest-batch search, ``sinkhorn_*`` and
    ``bench_moe_*`` their tables; ``warmup`` / ``repeats`` the untimed and timed steps; ``cap_*`` each section's
    time cap in seconds; ``time_limit`` the whole run's deadline in seconds.
    """

    stack_depth: int
    stack_dim: int
    stack_hidden: int
    stack_batch: int
    cifar_layers: tuple[int, int, int]
    cifar_widths: tuple[int, int, int]
    cifar_batch: int
    cifar_size: int
    attn_batch: int
    attn_heads: int
    attn_len: int
    attn_cross: tuple[int, int]
    attn_head_dim: int
    topk_rows: int
    topk_n: int
    topk_k: int
    moe_batch: int
    moe_tokens: int
    moe_dim: int
    moe_experts: int
    resnet_arch: int
    resnet_batch: int
    resnet_size: int
    budget_size: int
    budget_gib: float
    budget_max_batch: int
    sinkhorn_seqs: tuple[int, ...]
    sinkhorn_batch: int
    sinkhorn_heads: int
    sinkhorn_head_dim: int
    sinkhorn_n_iter: int
    bench_moe_experts: tuple[int, ...]
    bench_moe_batch: int
    bench_moe_seq: int
    bench_moe_dim: int
    warmup: int
    repeats: int
    cap_resnet: float
    cap_budget: float
    cap_sinkhorn: float
    cap_moe: float
    time_limit: float


GPU = Sizes(
    stack_depth=200,
    stack_dim=16,
    stack_hidden=32,
    stack_batch=8,
    cifar_layers=(2, 8, 2),
    cifar_widths=(16, 32, 64),
    cifar_batch=8,
    cifar_size=32,
    attn_batch=2,
    attn_heads=4,
    attn_len=256,
    attn_cross=(128, 320),
    attn_head_dim=64,
    topk_rows=64,
    topk_n=1000,
    topk_k=100,
    moe_batch=4,
    moe_tokens=64,
    moe_dim=32,
    moe_experts=8,
    resnet_arch=152,
    resnet_batch=64,
    resnet_size=224,
    budget_size=500,
    budget_gib=16.0,
    budget_max_batch=512,
    sinkhorn_seqs=(1024, 2048, 4096, 8192, 16384),
    sinkhorn_batch=4,
    sinkhorn_heads=8,
    sinkhorn_head_dim=64,
    sinkhorn_n_iter=3,
    bench_moe_experts=(8, 16, 32, 64),
    bench_moe_batch=64,
    bench_moe_seq=197,
    bench_moe_dim=384,
    warmup=3,
    repeats=10,
    cap_resnet=90.0,
    cap_budget=130.0,
    cap_sinkhorn=60.0,
    cap_moe=40.0,
    time_limit=400.0,
)

# ResNet-50 has ResNet-152's bottleneck blocks at a third of the depth; 32 px is the smallest input whose last
# stage still has two values per BatchNorm channel at batch 2, 64 px the smallest that does at batch 1.
SMOKE = dataclasses.replace(
    GPU,
    stack_dim=4,
    stack_hidden=8,
    stack_batch=3,
    cifar_layers=(2, 3, 2),
    cifar_widths=(4, 8, 8),
    cifar_batch=2,
    cifar_size=8,
    attn_batch=2,
    attn_heads=2,
    attn_len=12,
    attn_cross=(6, 10),
    attn_head_dim=8,
    topk_rows=4,
    topk_n=33,
    topk_k=5,
    moe_batch=2,
    moe_tokens=10,
    moe_dim=8,
    moe_experts=4,
    resnet_arch=50,
    resnet_batch=2,
    resnet_size=32,
    budget_size=64,
    budget_gib=2.0,
    budget_max_batch=2,
    sinkhorn_seqs=(32, 64),
    sinkhorn_batch=1,
    sinkhorn_heads=2,
    sinkhorn_head_dim=8,
    bench_moe_experts=(2, 4),
    bench_moe_batch=2,
    bench_moe_seq=9,
    bench_moe_dim=8,
    warmup=1,
    repeats=2,
    # the smoke run is there to run every step: caps no machine reaches, even compiling the kernels on 2 busy cores
    cap_resnet=1800.0,
    cap_budget=1800.0,
    cap_sinkhorn=1800.0,
    cap_moe=1800.0,
    time_limit=7200.0,
)


# ------------------------------------------------------------------------------------------------ small helpers


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """max over pairs of max |a - b| / max |b| (b the reference, in float64 on the CPU); inf on a shape mismatch,
    NaN where a holds a NaN that b does not."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
        if a.shape != b.shape:
            return math.inf
        if a.numel() == 0:
            continue
        scale = b.abs().max().item()
        err = (a - b).abs().max().item() / (scale if scale > 0 else 1.0)
        if math.isnan(err):
            return math.nan
        worst = max(worst, err)
    return worst


def free(device: torch.device, collect: bool = False) -> None:
    """Hand the CUDA allocator's cached blocks back; with ``collect``, first free what only the garbage collector
    can (reference cycles). A collection walks every Python object (a second when the machine is busy), so it runs
    only where the next measurement needs the memory back: between models, after an out-of-memory error."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError as e:
            # a sticky CUDA error (an illegal access, a device-side assert) makes every later CUDA call raise: the
            # next measurement reports it in its own check or section, and the report is still written; a cleanup
            # that raised here instead ended the run before any report
            print(f"gpu_suite: emptying the CUDA cache failed: {str(e).splitlines()[0][:200]}", file=sys.stderr)


PEAK_METHOD = {"cuda": "cuda.max_memory_allocated", "cpu": "torch.profiler allocations"}


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """The peak working memory of one call of ``step`` (``zoo.nn.step_peak_bytes``: the one measure the suite, and
    the stored row's plan, use)."""
    from zoo.nn import step_peak_bytes

    return step_peak_bytes(step, device)


def live_bytes(device: torch.device, tensors: Sequence[torch.Tensor]) -> int:
    """Memory held before a step: the allocator's count on CUDA, else the bytes of ``tensors``."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return sum(t.numel() * t.element_size() for t in tensors)


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of the CUDA allocator (or the CPU's)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """TF32 off for matmuls and convolutions (CUDA), restored afterwards: float32 checks compute in float32."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def memory_budget(device: torch.device, budget: int) -> Iterator[None]:
    """On CUDA, the caching allocator limited to ``budget`` bytes of the device (an allocation beyond it raises
    ``torch.OutOfMemoryError`` instead of taking the card), restored afterwards; elsewhere nothing."""
    if device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    saved = torch.cuda.get_per_process_memory_fraction(device)
    free(device, collect=True)  # the limit counts the allocator's reserved memory, its cache included
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    try:
        yield
    finally:
        try:
            torch.cuda.set_per_process_memory_fraction(saved, device)
        except RuntimeError as e:  # a sticky CUDA error: the error that ends the block is the one to report
            print(f"gpu_suite: restoring the memory fraction failed: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        free(device, collect=True)


class Clock:
    """A section's time cap: ``allows(estimate)`` says whether work expected to take ``estimate`` seconds ends
    before the cap (``cap_s`` from now) and before the run's ``deadline`` (a ``time.perf_counter`` value)."""

    def __init__(self, cap_s: float, deadline: float) -> None:
        self.cap_s = cap_s
        self.start = time.perf_counter()
        self.end = min(self.start + cap_s, deadline)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate_s: float) -> bool:
        return time.perf_counter() + max(0.0, estimate_s) <= self.end

    def reason(self, estimate_s: float) -> str:
        return (
            f"time cap: {self.elapsed():.0f} s of this section's {self.end - self.start:.0f} s used, "
            f"the next needs about {estimate_s:.0f} s"
        )


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ checks


@dataclasses.dataclass
class Check:
    """One correctness check: ``passed`` when ``max_error <= tolerance`` and every condition in ``detail`` held."""

    name: str
    reference: str
    passed: bool
    max_error: float
    tolerance: float
    detail: str = ""


def check_result(
    name: str, reference: str, error: float, tolerance: float, failures: Sequence[str] = (), detail: str = ""
) -> Check:
    passed = error <= tolerance and not failures  # NaN compares False: a NaN error fails
    text = "; ".join([*failures, detail] if detail else failures)
    return Check(name, reference, passed, error, tolerance, text)


class TanhMLP(nn.Module):
    """f(x) = W2 tanh(W1 x + b1) + b2, weights drawn from ``seed`` (scaled 1 / sqrt(fan-in))."""

    def __init__(self, dim: int, hidden: int, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=dtype) / dim**0.5)
        self.b1 = nn.Parameter(torch.randn(hidden, generator=g, dtype=dtype) * 0.1)
        self.w2 = nn.Parameter(torch.randn(dim, hidden, generator=g, dtype=dtype) / hidden**0.5)
        self.b2 = nn.Parameter(torch.randn(dim, generator=g, dtype=dtype) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def _output_and_grads(module: nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> list[torch.Tensor]:
    """[output, dL/dx, dL/dp for every parameter] for L = <cotangent, output>."""
    xg = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(xg)
    (out * cotangent.to(out.dtype)).sum().backward()
    return [out.detach(), xg.grad, *(p.grad for p in module.parameters())]


def check_reversible_mlp(device: torch.device, sizes: Sizes, dtype: torch.dtype) -> Check:
    from zoo.nn import ResidualStack

    depth = sizes.stack_depth
    blocks = [TanhMLP(sizes.stack_dim, sizes.stack_hidden, seed, dtype).to(device) for seed in range(depth)]
    # float64: steps of size 1 (the output grows ~30-fold: ill-conditioned, float64 still resolves 1e-8) and 48
    # fraction bits; float32: steps of size 1/depth (well-conditioned: float32 round-off alone stays near 1e-6)
    float64 = dtype == torch.float64
    options: dict[str, Any] = {"fixed_point_bits": 48, "scale": 1.0} if float64 else {"scale": "depth"}
    full = ResidualStack(blocks, rule="momentum", gamma=0.9, memory="full", **options)
    rev = ResidualStack(blocks, rule="momentum", gamma=0.9, memory="reversible", **options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sizes.stack_batch, sizes.stack_dim, generator=g, dtype=dtype).to(device)
    cotangent = torch.randn(sizes.stack_batch, sizes.stack_dim, generator=g, dtype=dtype).to(device)
    want = _output_and_grads(full, x, cotangent)
    got = _output_and_grads(rev, x, cotangent)
    complete = all(t is not None for t in got)
    failures = [] if complete else ["a parameter of the reversible stack got no gradient"]
    tolerance = 1e-8 if float64 else 1e-4
    bits = ", step 1, 48 fraction bits" if float64 else ", step 1/depth"
    return check_result(
        f"reversible momentum stack, {depth} tanh-MLP layers, {str(dtype).removeprefix('torch.')}{bits}",
        'memory="full" (autograd), same blocks',
        relative_error(got, want) if complete else math.inf,
        tolerance,
        failures,
        f"output, input gradient and {4 * depth} parameter gradients",
    )


def check_reversible_resnet(device: torch.device, sizes: Sizes) -> Check:
    import zoo

    options = {"layers": sizes.cifar_layers, "widths": sizes.cifar_widths, "num_classes": 10}
    torch.manual_seed(10)
    full = zoo.create_model("momentum_cifar_resnet", memory="full", **options)
    rev = zoo.create_model("momentum_cifar_resnet", memory="reversible", **options)
    rev.load_state_dict(full.state_dict())
    full, rev = full.to(device).train(), rev.to(device).train()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sizes.cifar_batch, 3, sizes.cifar_size, sizes.cifar_size, generator=g).to(device)
    cotangent = torch.randn(sizes.cifar_batch, 10, generator=g).to(device)
    want = _output_and_grads(full, x, cotangent)
    got = _output_and_grads(rev, x, cotangent)
    stats = [k for k in full.state_dict() if "running" in k]
    want += [full.state_dict()[k] for k in stats]
    got += [rev.state_dict()[k] for k in stats]
    complete = all(t is not None for t in got)
    failures = [] if complete else ["a parameter of the reversible net got no gradient"]
    layers = "/".join(map(str, sizes.cifar_layers))
    return check_result(
        f"reversible momentum CIFAR ResNet (blocks {layers}, conv + BatchNorm + ReLU tail), float32",
        'memory="full" (autograd), same weights',
        relative_error(got, want) if complete else math.inf,
        1e-4,
        failures,
        "output, input and parameter gradients, BatchNorm running statistics",
    )


def naive_sinkhorn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_iter: int, allowed: torch.Tensor
) -> torch.Tensor:
    """Sinkhorn attention by its definition, in float64: K = exp(scale q k^T) * allowed; odd half-steps divide each
    row by its sum, even ones each column by its sum and multiply by n_rows / n_cols (the non-empty rows and
    columns of K); out = K v. Rows with nothing allowed (padded queries) stay zero."""
    q, k, v = q.double(), k.double(), v.double()
    kernel = torch.exp(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5) * allowed.double()
    n_rows = (kernel.sum(-1) > 0).sum(-1)[..., None, None].double()
    n_cols = (kernel.sum(-2) > 0).sum(-1)[..., None, None].double()

    def normalised(dim: int) -> torch.Tensor:
        total = kernel.sum(dim, keepdim=True)
        # an empty row / column stays zero; dividing it by 1 keeps the gradient finite (0 / 0 would not)
        return kernel / torch.where(total > 0, total, torch.ones_like(total))

    for step in range(1, n_iter + 1):
        kernel = normalised(-1) if step % 2 == 1 else normalised(-2) * n_rows / n_cols
    return kernel @ v


def check_sinkhorn(device: torch.device, sizes: Sizes, case: str) -> Check:
    """One masked case of ``zoo.ops.sinkhorn.attention`` on ``device`` against :func:`naive_sinkhorn`."""
    from zoo.ops import CausalMask, PaddingMask
    from zoo.ops.sinkhorn import attention

    B, H, E = sizes.attn_batch, sizes.attn_heads, sizes.attn_head_dim
    L, S = sizes.attn_cross if case == "cross" else (sizes.attn_len, sizes.attn_len)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    n_iter = 4 if case == "causal+padding" else 3
    g = torch.Generator().manual_seed(20)
    q, k, v, cotangent = (torch.randn(B, H, n, E, generator=g).to(dtype) for n in (L, S, S, L))
    # sequence 0 full, sequence 1 (and any further) padded to about 5/8 of its length
    keys = torch.arange(S)[None, :] >= torch.tensor([S] + [max(1, 5 * S // 8)] * (B - 1))[:, None]
    queries = torch.arange(L)[None, :] >= torch.tensor([L] + [max(1, 5 * L // 8)] * (B - 1))[:, None]
    allowed = torch.ones(B, 1, L, S, dtype=torch.bool)
    if case in ("padding", "causal+padding", "bf16"):
        mask: Any = PaddingMask(keys=keys.to(device), queries=queries.to(device))
        allowed &= ~keys[:, None, None, :] & ~queries[:, None, :, None]
    elif case == "cross":
        mask = PaddingMask(keys=keys.to(device))
        allowed &= ~keys[:, None, None, :]
    else:
        mask = None
    if case in ("causal", "causal+padding"):
        mask = CausalMask() & mask
        allowed &= torch.ones(L, S, dtype=torch.bool).tril()

    ref_in = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = naive_sinkhorn(*ref_in, n_iter, allowed)
    ref_grads = torch.autograd.grad((ref * cotangent.double()).sum(), ref_in)
    dev_in = [t.to(device, copy=True).requires_grad_(True) for t in (q, k, v)]
    out = attention(*dev_in, mask, n_iter=n_iter)
    grads = torch.autograd.grad((out * cotangent.to(device)).sum(), dev_in)
    failures = [] if out.dtype == dtype else [f"output dtype {out.dtype}, expected {dtype}"]
    forward, backward = relative_error([out], [ref]), relative_error(grads, ref_grads)
    described = {
        "padding": "key and query padding",
        "causal": "causal",
        "causal+padding": "causal and padding",
        "cross": f"cross-attention L {L} S {S}, key padding",
        "bf16": "key and query padding",
    }[case]
    return check_result(
        f"Sinkhorn attention, {described}, n_iter {n_iter}, {str(dtype).removeprefix('torch.')} ({B}x{H}x{L}x{E})",
        "definition in float64 (autograd)",
        max(forward, backward) if not (math.isnan(forward) or math.isnan(backward)) else math.nan,
        2e-2 if dtype == torch.bfloat16 else 1e-4,
        failures,
        f"forward {forward:.1e}, backward {backward:.1e}",
    )


def topk_cases() -> list[tuple[str, Callable[[torch.Tensor, Any], torch.Tensor], bool, bool]]:
    """(name, op(x, k), hard, per-row k along dim 0) of every top-k check."""
    from zoo.ops import soft_topk_magnitude, soft_topk_mask, topk_magnitude, topk_mask

    return [
        ("topk_mask (hard)", lambda x, k: topk_mask(x, k), True, False),
        ("topk_magnitude (hard)", lambda x, k: topk_magnitude(x, k), True, False),
        ("soft_topk_mask p 2, PAV", lambda x, k: soft_topk_mask(x, k, lam=0.5), False, False),
        ("soft_topk_mask p 4/3, PAV", lambda x, k: soft_topk_mask(x, k, p=4 / 3, lam=0.5), False, False),
        (
            "soft_topk_mask p 2, Dykstra",
            lambda x, k: soft_topk_mask(x, k, lam=0.5, solver="dykstra", dykstra_iters=50),
            False,
            False,
        ),
        ("soft_topk_mask p 2, PAV, k per row, dim 0", lambda x, k: soft_topk_mask(x, k, 0, lam=0.5), False, True),
        ("soft_topk_magnitude p 2, PAV", lambda x, k: soft_topk_magnitude(x, k, lam=0.5), False, False),
        ("soft_topk_magnitude p 4/3, PAV", lambda x, k: soft_topk_magnitude(x, k, p=4 / 3, lam=0.5), False, False),
    ]


def check_topk(
    device: torch.device,
    sizes: Sizes,
    name: str,
    op: Callable[[torch.Tensor, Any], torch.Tensor],
    hard: bool,
    per_row: bool,
    dtype: torch.dtype,
) -> Check:
    """The op on ``device`` against the same op on the CPU: forward, and backward where it has one."""
    g = torch.Generator().manual_seed(30)
    rows, n = sizes.topk_rows, sizes.topk_n
    x = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    cotangent = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    k: Any = sizes.topk_k
    if per_row:  # along dim 0: one k per column
        x, cotangent = x.T.contiguous(), cotangent.T.contiguous()
        k = torch.randint(1, n, (rows,), generator=g)
    differentiable = name != "topk_mask (hard)"
    results = []
    for where in (torch.device("cpu"), device):
        xi = x.to(where, copy=True).requires_grad_(differentiable)
        ki = k.to(where) if isinstance(k, torch.Tensor) else k
        y = op(xi, ki)
        grad = torch.autograd.grad((y * cotangent.to(where)).sum(), xi)[0] if differentiable else None
        results.append((y.detach(), grad))
    (want, want_grad), (got, got_grad) = results
    pairs = [(got, want)] + ([(got_grad, want_grad)] if differentiable else [])
    failures = [] if got.dtype == dtype else [f"output dtype {got.dtype}, expected {dtype}"]
    if hard:
        mismatched = sum(int((a.cpu() != b).sum()) for a, b in pairs)
        if mismatched:
            failures.append(f"{mismatched} entries differ")
    tolerance = 0.0 if hard else (1e-9 if dtype == torch.float64 else 1e-4)
    return check_result(
        f"{name}, {str(dtype).removeprefix('torch.')} ({x.shape[0]}x{x.shape[1]})",
        "the same call on the CPU",
        relative_error([a for a, _ in pairs], [b for _, b in pairs]),
        tolerance,
        failures,
        "forward and backward" if differentiable else "forward (no gradient by definition)",
    )


def check_moe(device: torch.device, sizes: Sizes, case: str) -> Check:
    """``zoo.nn.MoE`` on ``device`` against the same weights on the CPU, float64, with padded tokens."""
    from zoo.nn import MoE

    options = {
        "token": {"router": "token_choice", "k": 2, "capacity_factor": 0.5},
        "token soft": {"router": "token_choice", "k": 2, "capacity_factor": 0.5, "topk": "soft"},
        "expert": {"router": "expert_choice", "capacity_factor": 1.0},
        "expert soft": {"router": "expert_choice", "capacity_factor": 1.0, "topk": "soft"},
    }[case]
    B, T, D, E = sizes.moe_batch, sizes.moe_tokens, sizes.moe_dim, sizes.moe_experts
    torch.manual_seed(40)
    cpu = MoE(D, 2 * D, E, dtype=torch.float64, **options).train()
    dev = copy.deepcopy(cpu).to(device)
    g = torch.Generator().manual_seed(41)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    cotangent = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    padded = torch.arange(T)[None, :] >= torch.tensor([T - (b * T) // (2 * B) for b in range(B)])[:, None]

    def run(module: MoE, where: torch.device, x: torch.Tensor) -> dict[str, Any]:
        xg = x.to(where, copy=True).requires_grad_(True)
        mask = padded.to(where)
        module.zero_grad(set_to_none=True)
        out = module(xg, mask)
        (out * cotangent.to(where)).sum().backward()
        stats = {name: t.detach().cpu() for name, t in module.stats.items()}
        routing = module.route(xg.detach(), mask)
        return {
            "tensors": [out.detach(), xg.grad, *(p.grad for p in module.parameters())],
            "index": routing.index.cpu(),
            "weight": routing.weight.detach().cpu(),
            "capacity": routing.capacity,
            "stats": stats,
        }

    want, got = run(cpu, torch.device("cpu"), x), run(dev, device, x)
    garbage = run(dev, device, x.masked_fill(padded[..., None], float("nan")))
    failures = []
    if not torch.equal(got["index"], want["index"]):
        failures.append(f"{int((got['index'] != want['index']).sum())} dispatch slots differ from the CPU's")
    if not torch.equal(got["stats"]["tokens_per_expert"], want["stats"]["tokens_per_expert"]):
        failures.append("tokens kept per expert differ from the CPU's")
    out, x_grad = got["tensors"][0].cpu(), got["tensors"][1].cpu()
    if (out[padded] != 0).any() or (x_grad[padded] != 0).any():
        failures.append("a padded token has a non-zero output or input gradient")
    changed = relative_error(garbage["tensors"], got["tensors"])
    if not changed == 0.0:  # exactly 0: the padded tokens never reach the router or the experts
        failures.append(f"NaN in the padded tokens changed the results ({changed:.1e})")
    if (got["stats"]["tokens_per_expert"] > got["capacity"]).any():
        failures.append("an expert kept more tokens than its capacity")
    dropped = float(got["stats"]["dropped_fraction"])
    if case.startswith("token") and not dropped > 0:
        failures.append("capacity factor 0.5 dropped no token: the capacity limit did not act")
    error = relative_error([*got["tensors"], got["weight"]], [*want["tensors"], want["weight"]])
    router = "token choice k 2, capacity factor 0.5" if case.startswith("token") else "expert choice, capacity 1"
    return check_result(
        f"MoE {router}, {'relaxed' if case.endswith('soft') else 'hard'} top-k, {E} experts, padding, float64",
        "the same weights on the CPU",
        error,
        1e-9,
        failures,
        f"dispatch equal, outputs and gradients; dropped fraction {dropped:.2f}",
    )


def run_checks(
    device: torch.device, sizes: Sizes, started: float, on_check: Callable[[list[Check]], None] | None = None
) -> list[Check]:
    """Every correctness check; one that raises is a FAIL with the error as its detail. ``on_check`` gets the
    checks done so far after each one (the report is written then: a run cut short keeps them)."""
    jobs: list[tuple[str, Callable[[], Check]]] = [
        ("reversible float64", lambda: check_reversible_mlp(device, sizes, torch.float64)),
        ("reversible float32", lambda: check_reversible_mlp(device, sizes, torch.float32)),
        ("reversible CIFAR ResNet", lambda: check_reversible_resnet(device, sizes)),
    ]
    for case in ("padding", "causal", "causal+padding", "cross", "bf16"):
        jobs.append((f"Sinkhorn {case}", lambda case=case: check_sinkhorn(device, sizes, case)))
    for dtype in (torch.float64, torch.float32):
        for name, op, hard, per_row in topk_cases():
            jobs.append(
                (
                    f"{name} {dtype}",
                    lambda name=name, op=op, hard=hard, per_row=per_row, dtype=dtype: check_topk(
                        device, sizes, name, op, hard, per_row, dtype
                    ),
                )
            )
    for case in ("token", "token soft", "expert", "expert soft"):
        jobs.append((f"MoE {case}", lambda case=case: check_moe(device, sizes, case)))
    checks = []
    with full_precision(device):
        for what, job in jobs:
            try:
                result = job()
            except Exception as e:  # a crash of a kernel on the device is a failed check, not the end of the run
                result = Check(what, "-", False, math.nan, math.nan, f"{type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
            checks.append(result)
            log(
                started,
                f"{'PASS' if result.passed else 'FAIL'} {result.name}: max error {result.max_error:.2e} "
                f"(tolerance {result.tolerance:.0e}){'; ' + result.detail if result.detail else ''}",
            )
            if on_check is not None:
                on_check(checks)
    free(device, collect=True)
    return checks


# ------------------------------------------------------------------------------------------------ benchmarks


def resnet_training(method: str, sizes: Sizes, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The ResNet of ``method`` (``benchmarks/momentum_memory.py``'s models) on ``device``, gradients allocated,
    and plain SGD (no optimiser state)."""
    from momentum_memory import build_imagenet

    model = build_imagenet(sizes.resnet_arch, method, seed=0).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    return model, torch.optim.SGD(params, lr=1e-3, momentum=0.0)


def training_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """Forward under bf16 autocast, cross-entropy, backward, SGD step."""

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for p in model.parameters() for t in (p, p.grad) if t is not None] + list(model.buffers())


def image_batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels, drawn on the device (a 500 px batch of hundreds is gigabytes to copy)."""
    torch.manual_seed(batch)
    return torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)


def expected_seconds(step_times: Sequence[float | None], sizes: Sizes, growth: float) -> float:
    """What the next item should take: its warm-up, memory and timed steps at ``growth`` times the summed step times
    just measured (compilation, which the warm-up of an item may include, left out: it is not a per-size cost)."""
    return (sizes.warmup + 1 + sizes.repeats) * sum(t for t in step_times if t) * growth


def measure(step: Callable[[], object], device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Warm-up steps, the peak working memory of one step, then the repeated timed steps."""
    step_seconds(step, device, 0, warmup=sizes.warmup)
    peak = peak_bytes(step, device)
    times = step_seconds(step, device, sizes.repeats)
    return {
        "peak_bytes": peak,
        "peak_method": PEAK_METHOD[device.type],
        "step_times": times,
        "step_time": statistics.median(times),
    }


def _section(out: dict[str, Any] | None) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, str]]]:
    """A benchmark section's result ``out`` (a new one for None) and its ``rows`` and ``skipped`` lists. The section
    appends to them as it goes, so that the rows measured before an error are still in the caller's ``out``."""
    out = {} if out is None else out
    return out, out.setdefault("rows", []), out.setdefault("skipped", [])


def add_ratios(rows: list[dict[str, Any]], base: dict[str, Any] | None, keys: Sequence[str]) -> None:
    """``<key>_ratio`` = row[key] / base[key] where both were measured."""
    for row in rows:
        for key in keys:
            a, b = row.get(key), None if base is None else base.get(key)
            row[f"{key}_ratio"] = a / b if a is not None and b else None


def bench_resnet(
    device: torch.device, sizes: Sizes, clock: Clock, started: float, out: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``resnet`` table (see the module's text): its rows and skipped items go into ``out`` (returned) as
    they are measured."""
    out, rows, skipped = _section(out)
    for method in RESNET_METHODS:
        # the slowest step so far, 1.5 times: a reversible step recomputes the forward
        estimate = expected_seconds([max((r.get("step_time") or 0 for r in rows), default=0)], sizes, 1.5)
        if not clock.allows(estimate):
            skipped.append({"item": method, "reason": clock.reason(estimate)})
            continue
        t0 = time.perf_counter()
        row: dict[str, Any] = {"method": method, "label": RESNET_LABELS[method]}
        checkpoint_peak = next((r.get("peak_bytes") for r in rows if r["method"] == "checkpoint"), None)
        try:
            if method == "zoo-reversible-stored":
                row.update(_stored_row(sizes, device, checkpoint_peak))
            else:
                row.update(_resnet_row(method, sizes, device))
        except Exception as e:
            if not is_oom(e):
                raise
            row["oom"] = True
        free(device, collect=True)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        add_ratios(rows, next((r for r in rows if r["method"] == "plain"), None), ("peak_bytes", "step_time"))
        log(started, f"resnet {method}: {_fmt_row(row)}")
    return out


def _resnet_row(method: str, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    model, opt = resnet_training(method, sizes, device)
    x, y = image_batch(sizes.resnet_batch, sizes.resnet_size, device)
    return measure(training_step(model, opt, x, y), device, sizes)


def _stored_row(sizes: Sizes, device: torch.device, checkpoint_peak: int | None) -> dict[str, Any]:
    """The reversible ResNet with the ``stored_blocks`` that ``zoo.nn.plan_stored_blocks`` picks for checkpointing's
    step peak (``checkpoint_peak``) as the budget, planned on the step's forward (bf16 autocast) and backward, then
    measured as the other rows. Nothing is stored without a checkpointing peak (its row ran out of memory) or when
    the planner finds no setting within it (at small batches the reversible stacks' own parameter gradients
    outweigh the activations)."""
    from zoo.errors import ZooError
    from zoo.nn import plan_stored_blocks

    model, opt = resnet_training("zoo-reversible", sizes, device)
    x, y = image_batch(sizes.resnet_batch, sizes.resnet_size, device)

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    plan: dict[str, int] = {}
    note = "no checkpointing peak"
    if checkpoint_peak is not None:
        try:
            plan = plan_stored_blocks(model, forward_backward, int(checkpoint_peak), device)
            note = "planned: peak <= checkpointing's"
        except ZooError:
            note = "no setting found within checkpointing's peak"
    stored = tuple(getattr(model, f"layer{i}").stored_blocks for i in range(1, 5))
    return {
        **measure(training_step(model, opt, x, y), device, sizes),
        "label": f"{RESNET_LABELS['zoo-reversible-stored']}={stored} ({note})",
        "stored_blocks": stored,
        "plan": plan,
    }


def _fmt_row(row: dict[str, Any]) -> str:
    if row.get("oom"):
        return "out of memory"
    return f"peak {row['peak_bytes'] / MIB:.1f} MiB, step {row['step_time'] * 1e3:.1f} ms"


def largest_batch(
    probe: Callable[[int], dict[str, Any]], max_batch: int, clock: Clock
) -> tuple[int, str, list[dict[str, Any]]]:
    """The largest batch b <= ``max_batch`` with ``probe(b)["fits"]``, fitting being monotone in b: doubling from 1
    to the first failure, then bisection between the last fit and it. A probe is not run when ``clock`` says its
    estimate (b times the lowest seconds per sample of the probes so far: a first probe may include compilation)
    would pass the cap.

    Returns (b, how, probes): b = 0 when nothing fits; how is ``"exact"``, ``"at least (cap)"`` (``max_batch``
    fits; not searched beyond) or ``"at least (time cap)"`` (the search stopped before it was exact).
    """
    probes: list[dict[str, Any]] = []
    fit, fail = 0, None  # largest known fit, smallest known failure

    def run(b: int) -> bool | None:
        if probes:
            if not clock.allows(b * min(p["seconds"] / p["batch"] for p in probes)):
                return None
        result = probe(b)
        probes.append(result)
        return bool(result["fits"])

    b = 1
    while True:
        ok = run(b)
        if ok is None:
            return fit, "at least (time cap)", probes
        if not ok:
            fail = b
            break
        fit = b
        if b >= max_batch:
            return fit, "at least (cap)", probes
        b = min(2 * b, max_batch)
    while fail - fit > 1:
        mid = (fit + fail) // 2
        ok = run(mid)
        if ok is None:
            return fit, "at least (time cap)", probes
        fit, fail = (mid, fail) if ok else (fit, mid)
    return fit, "exact", probes


def bench_budget(
    device: torch.device, sizes: Sizes, clock: Clock, started: float, out: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``budget`` table (see the module's text): its rows and skipped items go into ``out`` (returned) as
    they are measured."""
    budget = int(sizes.budget_gib * GIB)
    out, rows, skipped = _section(out)
    out["budget_bytes"] = budget
    durations: list[float] = []
    with memory_budget(device, budget):
        for method in BUDGET_METHODS:
            estimate = min(durations, default=0.0)  # a search is about as long as the quickest one so far
            if not clock.allows(estimate):
                skipped.append({"item": method, "reason": clock.reason(estimate)})
                continue
            t0 = time.perf_counter()
            row = _budget_row(method, sizes, device, budget, clock)
            free(device, collect=True)
            row["wall_s"] = time.perf_counter() - t0
            durations.append(row["wall_s"])
            rows.append(row)
            add_ratios(rows, next((r for r in rows if r["method"] == "plain"), None), ("max_batch",))
            log(
                started,
                f"budget {method}: largest batch {row['max_batch']} ({row['bound']}, {len(row['probes'])} probes)",
            )
    return out


def _budget_row(method: str, sizes: Sizes, device: torch.device, budget: int, clock: Clock) -> dict[str, Any]:
    """The largest-batch search of one method (its model lives only in this call)."""
    model, opt = resnet_training(method, sizes, device)
    state = state_tensors(model)
    best, how, probes = largest_batch(
        lambda b: budget_probe(model, opt, b, sizes, device, budget, state), sizes.budget_max_batch, clock
    )
    at_best = next((p for p in probes if p["batch"] == best), None)
    return {
        "method": method,
        "label": RESNET_LABELS[method],
        "max_batch": best,
        "bound": how,
        "peak_bytes_at_max": None if at_best is None else at_best["peak_bytes"],
        "state_bytes": live_bytes(device, state),
        "probes": probes,
    }


def budget_probe(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: int,
    sizes: Sizes,
    device: torch.device,
    budget: int,
    state: list[torch.Tensor],
) -> dict[str, Any]:
    """One training step at ``batch``: fits when it ran and its peak (state + batch + working memory) is within
    ``budget``. An out-of-memory error is caught here, and the cache emptied after its traceback is gone.

    The fused fixed-point kernels switch to eager for good when a compiled call fails; an out-of-memory error is
    not a compilation failure (zoo/ops/compiled.py raises it as it is), and should the kernels have fallen back
    during a probe that ran out of memory anyway, they are switched back on.
    """
    from zoo.ops import fixed_point

    fused = fixed_point.fused_enabled()
    free(device)
    t0 = time.perf_counter()
    try:
        peak: int | None = _probe_peak(model, opt, batch, sizes, device, state)
        oom = False
    except Exception as e:
        if not is_oom(e):
            raise
        peak, oom = None, True
    seconds = time.perf_counter() - t0
    free(device, collect=oom)  # after the except block: the error's frames (and the step's tensors) are gone
    if oom and fused and not fixed_point.fused_enabled():
        fixed_point.set_fused(True)
    return {
        "batch": batch,
        "fits": not oom and peak is not None and peak <= budget,
        "peak_bytes": peak,
        "oom": oom,
        "seconds": seconds,
    }


def _probe_peak(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: int,
    sizes: Sizes,
    device: torch.device,
    state: list[torch.Tensor],
) -> int:
    x, y = image_batch(batch, sizes.budget_size, device)
    before = live_bytes(device, [*state, x, y])
    return before + peak_bytes(training_step(model, opt, x, y), device)


def bench_sinkhorn(
    device: torch.device, sizes: Sizes, clock: Clock, started: float, out: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``sinkhorn`` table (see the module's text): its rows and skipped items go into ``out`` (returned) as
    they are measured."""
    from zoo.ops.sinkhorn import attention, kernel_path

    out, rows, skipped = _section(out)
    last: dict[str, Any] | None = None
    methods: dict[str, Callable[..., torch.Tensor]] = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "sinkhorn": lambda q, k, v: attention(q, k, v, None, n_iter=sizes.sinkhorn_n_iter),
    }
    for i, seq in enumerate(sizes.sinkhorn_seqs):
        estimate = 0.0
        if last is not None:  # the n x n work grows quadratically
            times = [last[m].get("step_time") for m in methods]
            estimate = expected_seconds(times, sizes, (seq / last["seq"]) ** 2)
        if not clock.allows(estimate):
            skipped += [{"item": f"{s} tokens", "reason": clock.reason(estimate)} for s in sizes.sinkhorn_seqs[i:]]
            break
        t0 = time.perf_counter()
        # the kernel the op picks here (bf16 inputs: float32 work)
        row: dict[str, Any] = {"seq": seq, "kernel": kernel_path(device, seq, seq, qk_dim=sizes.sinkhorn_head_dim)}
        for name, fn in methods.items():
            try:
                row[name] = _attention_cell(fn, seq, sizes, device)
            except Exception as e:
                if not is_oom(e):
                    raise
                row[name] = {"oom": True}
            free(device)
        for key in ("step_time", "peak_bytes"):
            a, b = row["sinkhorn"].get(key), row["sdpa"].get(key)
            row[f"{key}_ratio"] = a / b if a is not None and b else None
        row["wall_s"] = time.perf_counter() - t0
        last = row
        rows.append(row)
        log(started, f"sinkhorn {seq} tokens: sdpa {_fmt_row(row['sdpa'])}; sinkhorn {_fmt_row(row['sinkhorn'])}")
    return out


def _attention_cell(fn: Callable[..., torch.Tensor], seq: int, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(seq)
    shape = (sizes.sinkhorn_batch, sizes.sinkhorn_heads, seq, sizes.sinkhorn_head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    return measure(lambda: fn(q, k, v).backward(grad), device, sizes)


def bench_moe(
    device: torch.device, sizes: Sizes, clock: Clock, started: float, out: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``moe`` table (see the module's text): its rows and skipped items go into ``out`` (returned) as
    they are measured."""
    from moe_routing import build

    options = argparse.Namespace(seed=0, mlp_ratio=4, dim=sizes.bench_moe_dim, capacity_factor=1.0)
    out, rows, skipped = _section(out)
    last: dict[str, Any] | None = None
    for i, experts in enumerate(sizes.bench_moe_experts):
        estimate = 0.0
        if last is not None:  # twice the experts: up to twice the weights to read and write
            estimate = expected_seconds([last[c].get("step_time") for c in MOE_CELLS], sizes, 2.0)
        if not clock.allows(estimate):
            skipped += [{"item": f"{e} experts", "reason": clock.reason(estimate)} for e in sizes.bench_moe_experts[i:]]
            break
        t0 = time.perf_counter()
        row: dict[str, Any] = {"experts": experts}
        for cell in MOE_CELLS:
            try:
                row[cell] = _moe_cell(build(cell, options, experts, device), sizes, device)
            except Exception as e:
                if not is_oom(e):
                    raise
                row[cell] = {"oom": True}
            free(device)
        for cell in MOE_CELLS[1:]:
            for key in ("step_time", "peak_bytes"):
                a, b = row[cell].get(key), row["dense"].get(key)
                row[cell][f"{key}_ratio"] = a / b if a is not None and b else None
        row["wall_s"] = time.perf_counter() - t0
        last = row
        rows.append(row)
        log(started, f"moe {experts} experts: " + "; ".join(f"{c} {_fmt_row(row[c])}" for c in MOE_CELLS))
    return out


def _moe_cell(module: nn.Module, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    from zoo.nn import MoE

    g = torch.Generator().manual_seed(0)
    shape = (sizes.bench_moe_batch, sizes.bench_moe_seq, sizes.bench_moe_dim)
    x, cotangent = (torch.randn(shape, generator=g).to(device) for _ in range(2))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = module(x)
        loss = (out.float() * cotangent).sum()
        if isinstance(module, MoE):
            loss = loss + 0.01 * module.aux_loss
        loss.backward()

    return measure(step, device, sizes)


# ------------------------------------------------------------------------------------------------ report


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "line": machine_line(device),
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
    return info


def _n(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _mib(x: Any) -> str:
    return "-" if x is None else f"{x / MIB:.1f}"


def _ms(cell: dict[str, Any]) -> str:
    if cell.get("oom"):
        return "OOM"
    return _n(None if cell.get("step_time") is None else cell["step_time"] * 1e3, ".1f")


def _table(header: list[str], rows: list[list[str]], left: Sequence[int] = (0,)) -> str:
    """A markdown table; the columns numbered in ``left`` (text) aligned left, the others (numbers) right."""
    align = [":--" if i in left else "--:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _skipped(section: dict[str, Any]) -> list[str]:
    return [f"- skipped {s['item']}: {s['reason']}" for s in section.get("skipped", [])]


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: machine, checks, one table per benchmark section."""
    m, sizes = report["machine"], report["sizes"]
    checks = report["checks"]
    failed = [c for c in checks if not c["passed"]]
    gpu = (
        f"GPU {m['gpu']} ({m['gpu_memory_bytes'] / GIB:.0f} GiB, compute capability {m['capability']})"
        if m["gpu"]
        else f"device {m['device']} (no GPU)"
    )
    out = [
        "# GPU suite: correctness checks and benchmark tables",
        "",
        f"{gpu}; torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, Python {m['python']}.",
        "",
        m["line"],
        "",
        _kernels_line(report["settings"]),
        "",
        f"{'smoke run (tiny sizes)' if report['smoke'] else 'full run'}, started {report['started']}, "
        f"wall time {report['wall_s']:.0f} s (limit {sizes['time_limit']:.0f} s)"
        f"{'' if report['complete'] else ', INCOMPLETE (written after every check and every section)'}.",
        "",
        "## Correctness checks",
        "",
        (
            f"{len(checks) - len(failed)} of {len(checks)} passed"
            + (f"; FAILED: {', '.join(c['name'] for c in failed)}" if failed else "")
            + ". Error: max |a - b| / max |b| over the compared tensors (b the reference); TF32 off."
            if checks
            else "not run."
        ),
        "",
    ]
    if checks:
        out.append(
            _table(
                ["check", "result", "max error", "tolerance", "reference", "detail"],
                [
                    [
                        c["name"],
                        "PASS" if c["passed"] else "**FAIL**",
                        _n(c["max_error"], ".1e"),
                        _n(c["tolerance"], ".0e"),
                        c["reference"],
                        c["detail"],
                    ]
                    for c in checks
                ],
                left=(0, 1, 4, 5),
            )
        )
        out.append("")
    sections = report["sections"]
    timing = (
        f"median of {sizes['repeats']} steps after {sizes['warmup']} warm-up step{'s' if sizes['warmup'] != 1 else ''} "
        f"({'CUDA events' if m['gpu'] else 'perf_counter'}); peak: "
        f"{'max_memory_allocated' if m['gpu'] else 'tensor bytes torch.profiler records'} during one step above what "
        "was allocated before it"
    )
    for name in BENCHMARKS:
        sec = sections.get(name)
        if sec is None:
            continue
        out += _section_markdown(name, sec, sizes, timing)
    return "\n".join(out) + "\n"


def _kernels_line(settings: dict[str, Any]) -> str:
    fused = settings["fused_fixed_point_kernels"]
    state = {True: "compiled", False: "eager", None: "-"}
    line = (
        f"Kernels: fixed-point momentum steps {state[fused['start']]} at the start, {state[fused['end']]} at the end"
        f" (ZOO_FUSED_FIXED_POINT {settings['ZOO_FUSED_FIXED_POINT']}); Sinkhorn chunk kernels: ZOO_COMPILE_SINKHORN "
        f"{settings['ZOO_COMPILE_SINKHORN']}; cudnn.benchmark {settings['cudnn_benchmark']}."
    )
    if fused["start"] and fused["end"] is False:
        line += " **The fused kernels fell back to eager during the run** (see the warning on stderr)."
    return line


def _section_markdown(name: str, sec: dict[str, Any], sizes: dict[str, Any], timing: str) -> list[str]:
    cap = f"time cap {sec.get('cap_s', 0):.0f} s, took {sec.get('wall_s', 0):.0f} s"
    if name == "resnet":
        title = (
            f"## ResNet-{sizes['resnet_arch']} training step, batch {sizes['resnet_batch']}, "
            f"3x{sizes['resnet_size']}x{sizes['resnet_size']}, bf16 autocast"
        )
    elif name == "budget":
        title = (
            f"## Largest batch within {sizes['budget_gib']:g} GiB, ResNet-{sizes['resnet_arch']}, "
            f"3x{sizes['budget_size']}x{sizes['budget_size']}, bf16 autocast"
        )
    elif name == "sinkhorn":
        title = (
            f"## Sinkhorn attention (n_iter {sizes['sinkhorn_n_iter']}) vs SDPA, forward + backward, bf16, batch "
            f"{sizes['sinkhorn_batch']}, {sizes['sinkhorn_heads']} heads, head dim {sizes['sinkhorn_head_dim']}"
        )
    else:
        d = sizes["bench_moe_dim"]
        title = (
            f"## MoE vs dense MLP, forward + backward, bf16 autocast, x ({sizes['bench_moe_batch']}, "
            f"{sizes['bench_moe_seq']}, {d}), hidden {4 * d} (dense and per expert), capacity factor 1"
        )
    out = [title, "", f"{cap}. {timing}.", ""]
    if sec.get("error"):
        out += [f"**ERROR**: {sec['error']}", ""]
    rows = sec.get("rows", [])
    if name == "resnet" and rows:
        out.append(
            _table(
                ["method", "peak (MiB)", "peak / plain", "step (ms)", "time / plain"],
                [
                    [
                        r["label"],
                        "OOM" if r.get("oom") else _mib(r.get("peak_bytes")),
                        _n(r.get("peak_bytes_ratio"), ".2f"),
                        _ms(r),
                        _n(r.get("step_time_ratio"), ".2f"),
                    ]
                    for r in rows
                ],
            )
        )
    elif name == "budget" and rows:
        out.append(
            _table(
                ["method", "largest batch", "vs plain", "bound", "peak at that batch (MiB)", "probes"],
                [
                    [
                        r["label"],
                        str(r["max_batch"]),
                        _n(r.get("max_batch_ratio"), ".2f"),
                        r["bound"],
                        _mib(r.get("peak_bytes_at_max")),
                        " ".join(
                            f"{p['batch']}{'+' if p['fits'] else ('x' if p['oom'] else '-')}" for p in r["probes"]
                        ),
                    ]
                    for r in rows
                ],
                left=(0, 3, 5),
            )
        )
        out += [
            "",
            "peak: everything the step holds (weights, gradients, batch, activations); probes: batch followed by "
            "+ (fits), - (over the budget) or x (out of memory under the allocator's limit).",
        ]
    elif name == "sinkhorn" and rows:
        out.append(
            _table(
                [
                    "tokens",
                    "Sinkhorn kernel",
                    "SDPA (ms)",
                    "Sinkhorn (ms)",
                    "time ratio",
                    "SDPA peak (MiB)",
                    "Sinkhorn peak (MiB)",
                    "memory ratio",
                ],
                [
                    [
                        str(r["seq"]),
                        r.get("kernel", "-"),
                        _ms(r["sdpa"]),
                        _ms(r["sinkhorn"]),
                        _n(r.get("step_time_ratio"), ".2f"),
                        _mib(r["sdpa"].get("peak_bytes")),
                        _mib(r["sinkhorn"].get("peak_bytes")),
                        _n(r.get("peak_bytes_ratio"), ".2f"),
                    ]
                    for r in rows
                ],
                left=(0, 1),
            )
        )
    elif name == "moe" and rows:
        moe = MOE_CELLS[1:]
        out.append(
            _table(
                ["experts", "dense (ms)"]
                + [f"{MOE_LABELS[c]} (ms)" for c in moe]
                + [f"{MOE_LABELS[c]} / dense" for c in moe]
                + ["dense peak (MiB)"]
                + [f"{MOE_LABELS[c]} peak (MiB)" for c in moe],
                [
                    [str(r["experts"]), _ms(r["dense"])]
                    + [_ms(r[c]) for c in moe]
                    + [_n(r[c].get("step_time_ratio"), ".2f") for c in moe]
                    + [_mib(r["dense"].get("peak_bytes"))]
                    + [_mib(r[c].get("peak_bytes")) for c in moe]
                    for r in rows
                ],
            )
        )
    skipped = _skipped(sec)
    return out + ([""] + skipped if skipped else []) + [""]


def _jsonable(x: Any) -> Any:
    """Non-finite floats as strings (strict JSON has no NaN or Infinity)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_report(report: dict[str, Any], md_path: str, json_path: str) -> None:
    from zoo.hub import atomic_write

    text = markdown(report)
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(text))
    data = json.dumps(_jsonable(report), indent=2, allow_nan=False)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(data + "\n"))


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("--smoke", action="store_true", help="every step at tiny sizes (on the CPU unless --device)")
    p.add_argument("--device", help="cuda (default) or, with --smoke, cpu (default) or cuda")
    p.add_argument("--md", default="gpu_suite.md", help="markdown report (default: ./gpu_suite.md)")
    p.add_argument("--json", default="gpu_suite.json", help="JSON report (default: ./gpu_suite.json)")
    p.add_argument(
        "--sections",
        nargs="+",
        choices=BENCHMARKS,
        default=list(BENCHMARKS),
        help="benchmark sections to run (the checks always run first)",
    )
    p.add_argument("--budget-gib", type=float, help="memory budget of the largest-batch search (default 16)")
    p.add_argument("--max-batch", type=int, help="cap of the largest-batch search (default 512)")
    p.add_argument(
        "--time-limit",
        type=float,
        help="deadline of the run in seconds, imports excluded (default 400; the sections share what the checks leave)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    for name in ("budget_gib", "max_batch", "time_limit"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    return args


def fused_enabled() -> bool:
    """Whether the reversible engine's fixed-point steps run as compiled kernels (they fall back to eager, for the
    rest of the process, when a compiled call fails: the reversible timings after that are eager ones)."""
    from zoo.ops import fixed_point

    return fixed_point.fused_enabled()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    except RuntimeError:
        print(f"gpu_suite.py: --device {args.device!r} is not a torch device; use cuda, cuda:N or cpu", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"gpu_suite.py: the suite runs on cuda (or cpu with --smoke), not {device}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.smoke:
        print(
            f"gpu_suite.py: the full suite runs on a CUDA device, not {device}; use --smoke for tiny sizes",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device and friends want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    sizes = SMOKE if args.smoke else GPU
    overrides = {"budget_gib": args.budget_gib, "budget_max_batch": args.max_batch, "time_limit": args.time_limit}
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    started = time.perf_counter()
    deadline = started + sizes.time_limit
    report: dict[str, Any] = {
        "suite": "gpu_suite",
        "smoke": args.smoke,
        "complete": False,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "settings": {
            "fused_fixed_point_kernels": {"start": fused_enabled(), "end": None},
            "ZOO_FUSED_FIXED_POINT": os.environ.get("ZOO_FUSED_FIXED_POINT", "(unset: compiled)"),
            "ZOO_COMPILE_SINKHORN": os.environ.get("ZOO_COMPILE_SINKHORN", "(unset: compiled)"),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "benchmark_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "torch_threads": torch.get_num_threads(),
        },
        "sizes": dataclasses.asdict(sizes),
        "wall_s": 0.0,
        "checks": [],
        "passed": False,
        "sections": {},
    }
    log(started, f"gpu_suite on {report['machine']['gpu'] or device} ({'smoke' if args.smoke else 'full'} run)")

    def record(done: list[Check]) -> None:
        report["checks"] = [dataclasses.asdict(c) for c in done]
        report["wall_s"] = time.perf_counter() - started
        write_report(report, args.md, args.json)

    checks = run_checks(device, sizes, started, record)
    report["checks"] = [dataclasses.asdict(c) for c in checks]
    report["wall_s"] = time.perf_counter() - started
    write_report(report, args.md, args.json)

    benches = {"resnet": bench_resnet, "budget": bench_budget, "sinkhorn": bench_sinkhorn, "moe": bench_moe}
    caps = {
        "resnet": sizes.cap_resnet,
        "budget": sizes.cap_budget,
        "sinkhorn": sizes.cap_sinkhorn,
        "moe": sizes.cap_moe,
    }
    errors = []
    to_run = [name for name in BENCHMARKS if name in args.sections]
    for i, name in enumerate(to_run):
        # its cap, or its share of the time left (in proportion to the caps) when the checks ran long
        share = (deadline - time.perf_counter()) * caps[name] / sum(caps[n] for n in to_run[i:])
        clock = Clock(max(0.0, min(caps[name], share)), deadline)
        section: dict[str, Any] = {"rows": [], "skipped": []}
        try:
            benches[name](device, sizes, clock, started, section)
        except Exception as e:  # one broken section is reported with the rows it measured; the others still run
            traceback.print_exc()
            section["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            errors.append(name)
        free(device, collect=True)
        section.update(cap_s=clock.cap_s, wall_s=clock.elapsed())
        report["sections"][name] = section
        report["wall_s"] = time.perf_counter() - started
        write_report(report, args.md, args.json)
        log(started, f"section {name} done in {clock.elapsed():.0f} s")

    report["passed"] = all(c.passed for c in checks) and not errors
    report["settings"]["fused_fixed_point_kernels"]["end"] = fused_enabled()
    report["complete"] = True
    report["wall_s"] = time.perf_counter() - started
    write_report(report, args.md, args.json)
    print(markdown(report))
    failed = [c.name for c in checks if not c.passed]
    if failed or errors:
        print(
            f"gpu_suite: {len(failed)} check(s) FAILED{': ' + '; '.join(failed) if failed else ''}"
            f"{'; section error(s): ' + ', '.join(errors) if errors else ''}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
