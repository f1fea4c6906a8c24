"""Planning ``stored_blocks`` for a memory budget: measure a training step's peak, store the blocks that fit.

Under ``memory="reversible"`` every block of a stack is rebuilt in backward (one more block forward each) unless
the stack's last ``stored_blocks`` keep their activations. Storing is free up to a point: a reversible stack hands
back its parameter gradients at the end of its backward, and a step's peak is usually reached inside an earlier
stack's backward, after the later stacks' stored activations were freed. :func:`plan_stored_blocks` finds, by
measuring, the largest numbers of stored blocks whose step stays within a working-memory budget:

* stacks from the last to run to the first (backward reaches the last first, so their stored activations are
  freed first, and they are the smallest in a ResNet: low resolution);
* each stack stores all of its steps if the step then fits, otherwise the largest count that fits (by bisection:
  within a stack the peak grows with the count), and the search stops there (the earlier stacks rebuild every
  block). A whole stack stored can lower the peak: it runs ordinary autograd, whose parameter gradients go
  straight into ``.grad``, while a reversible stack holds its own until its backward ends (the parameters' size,
  which outweighs the activations at small batches), so it is tried even when the rebuilt step is over.

The gradients are full backprop's whatever the counts (stored blocks run ordinary autograd).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator

import torch
from torch import nn

from zoo.errors import ZooError

__all__ = ["plan_stored_blocks", "step_peak_bytes"]

MIB = 2**20


def step_peak_bytes(step: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes of tensor memory on ``device`` during one call of ``step``, above what was live when it started.

    On CUDA: ``torch.cuda.max_memory_allocated`` (after a synchronisation and a reset of the peak statistics) minus
    the memory allocated before. On CPU: the allocations and frees ``torch.profiler`` records
    (``profile_memory=True``), summed in time order, a free counted only for a block allocated during the step: a
    tensor allocated before the step and freed during it still counts as held (an upper bound; in a training step
    such tensors are few). Both count tensor bytes, not the allocator's cache or the process's resident memory.
    The profiler's own log (kineto's start, stop and stage lines, which it writes to file descriptor 2 from C++) is
    dropped unless ``KINETO_LOG_LEVEL`` is set; what ``step`` writes to stderr is left alone.

    Args:
        step: runs the work to measure (a training step's forward and backward).
        device: the device whose memory is measured (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        raise ZooError(f"step_peak_bytes measures CUDA or CPU memory, got device {device}; run the step on either")
    # the profiler's event tree has each allocation's address (torch.profiler's own memory timeline reads it too)
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    # kineto logs only as the profile starts and stops (not during the step): its lines are dropped there, the step
    # runs with stderr untouched
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _kineto_log_dropped():
        prof.__enter__()
    try:
        step()
    finally:
        with _kineto_log_dropped():
            prof.__exit__(None, None, None)
    events: list[tuple[int, int, int]] = []  # (time, address, bytes: + allocated, - freed)
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        fields = node.extra_fields
        if isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        nodes.extend(node.children)
    # only the frees of blocks allocated in this window count: the allocator also reports frees of blocks it saw in
    # an earlier profiled window (with the size it saw then, even if the address was reused since)
    held: dict[int, int] = {}
    live = peak = 0
    for _, address, nbytes in sorted(events):
        if nbytes > 0:
            held[address] = nbytes
            live += nbytes
            peak = max(peak, live)
        elif address in held:
            live -= held.pop(address)
    return peak


# a line of kineto's C++ Logger: "<severity>:<date> <time> <process id>:<thread id> <source file>:<line>] <message>"
_KINETO_LINE = re.compile(
    rb"(?:VERBOSE|INFO|WARNING|STAGE|ERROR|USDT):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ .+?:\d+\] "
)


@contextlib.contextmanager
def _kineto_log_dropped() -> Iterator[None]:
    """Drop the lines kineto's logger writes to file descriptor 2 inside the block; anything else written there is
    written again on exit (in order, also when the block raises).

    Kineto writes through ``std::cerr`` from C++, out of reach of ``sys.stderr``; at its default level (errors) it
    still logs each start and stop ("USDT: ... profiler_start", a severity above errors), and it reads its one knob,
    ``KINETO_LOG_LEVEL``, once per process, when the first profile starts, so setting that here would come too late
    after any earlier profile and would silence kineto's errors for the rest of the process; so the descriptor is
    pointed at a temporary file for the block. A set ``KINETO_LOG_LEVEL`` is the user's choice of kineto's log:
    nothing is dropped.
    """
    if "KINETO_LOG_LEVEL" in os.environ:
        yield
        return
    streams = [s for s in {id(s): s for s in (sys.stderr, sys.__stderr__)}.values() if s is not None]
    for stream in streams:  # what Python holds for stderr goes out before the descriptor moves
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to write to (closed)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        try:
            os.dup2(captured.fileno(), 2)
            yield
        finally:
            for stream in streams:
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = b"".join(line for line in captured.read().splitlines(True) if not _KINETO_LINE.match(line))
            with contextlib.suppress(OSError):  # a stderr that cannot be written to (a closed pipe) loses them
                while kept:
                    kept = kept[os.write(2, kept) :]


def _reversible_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from zoo.nn.residual_stack import ResidualStack

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualStack) and m.memory == "reversible"]


def plan_stored_blocks(
    model: nn.Module,
    step: Callable[[], object],
    budget_bytes: int,
    device: torch.device | str | None = None,
) -> dict[str, int]:
    """Set the ``stored_blocks`` of ``model``'s ``memory="reversible"`` stacks to the largest counts whose training
    step stays within ``budget_bytes`` of working memory, and return them.

    The search (see the module's text), from the last stack to the first: a stack stores all its steps if the step
    then fits; otherwise, if the step fits with this stack rebuilt, the largest count that fits, and the search
    stops (the earlier stacks rebuild every block). Each setting is measured (:func:`step_peak_bytes`) on the
    step's second call (the first may compile kernels or allocate once); running out of memory counts as over the
    budget. The model is left as it was apart from ``stored_blocks``: its buffers (BatchNorm statistics),
    gradients and the random state are restored after every call of ``step``. Modules that record their counts
    (a zoo ResNet's ``record_stored_blocks``: ``hparams.stored_blocks``) record the plan, so that its checkpoints
    and ``save_pretrained`` rebuild the planned model.

    Args:
        model: a model with ``memory="reversible"`` :class:`zoo.nn.ResidualStack` modules (a momentum ResNet built
            with ``memory="reversible"``), in the order they run.
        step: runs one training step's forward and backward on ``model`` with a representative batch (the batch
            size and input size the counts are for), e.g. ``lambda: F.cross_entropy(model(x), y).backward()``.
        budget_bytes: the step's working memory allowed above what is live when it starts (parameters, gradients,
            optimiser state, the batch): for a card, its free memory minus those.
        device: where the step runs (default: the device of the model's first parameter or buffer, else the CPU).

    Returns {stack name: stored_blocks} for every reversible stack, in the order they run.

    Raises ZooError when the model has no reversible stack, or when no setting tried fits the budget (too small
    for this batch); the model's counts are then left as they were.
    """
    stacks = _reversible_stacks(model)
    if not stacks:
        raise ZooError(
            "plan_stored_blocks: the model has no memory='reversible' ResidualStack; build it with "
            "memory='reversible' (e.g. zoo.momentum_resnet50(memory='reversible'))"
        )
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ZooError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
    if device is None:
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    saved = [m.stored_blocks for _, m in stacks]
    peaks: dict[tuple[int, ...], float] = {}

    def peak() -> float:
        counts = tuple(m.stored_blocks for _, m in stacks)
        if counts not in peaks:
            try:
                with _restored(model, device):
                    step()  # the first call at a new setting may compile or allocate once
                with _restored(model, device):
                    peaks[counts] = step_peak_bytes(step, device)
            except torch.OutOfMemoryError:  # more than the card holds: over any budget
                peaks[counts] = math.inf
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        return peaks[counts]

    try:
        for _, m in stacks:
            m.stored_blocks = 0
        for _, m in reversed(stacks):
            m.stored_blocks = m.depth  # the whole stack under ordinary autograd
            if peak() <= budget_bytes:
                continue
            m.stored_blocks = 0  # the setting before this stack (measured, unless this is the first one tried)
            if peak() > budget_bytes:
                break
            fits, fails = 0, m.depth
            while fails - fits > 1:
                m.stored_blocks = (fits + fails) // 2
                fits, fails = (m.stored_blocks, fails) if peak() <= budget_bytes else (fits, m.stored_blocks)
            m.stored_blocks = fits
            break
        if peak() > budget_bytes:
            least = min(peaks, key=peaks.__getitem__)
            raise ZooError(
                f"plan_stored_blocks: no setting tried keeps the step within the budget of "
                f"{budget_bytes / MIB:.1f} MiB: with every block rebuilt it needs "
                f"{peaks[(0,) * len(stacks)] / MIB:.1f} MiB, at least {peaks[least] / MIB:.1f} MiB (stored_blocks "
                f"{least}); lower the batch or input size, or raise budget_bytes"
            )
    except BaseException:
        for (_, m), count in zip(stacks, saved):
            m.stored_blocks = count
        raise
    # a model that records its counts (a zoo ResNet's hparams.stored_blocks, which checkpoints and save_pretrained
    # rebuild from) records the plan
    for module in model.modules():
        record = getattr(module, "record_stored_blocks", None)
        if callable(record):
            record()
    return {name: m.stored_blocks for name, m in stacks}


@contextlib.contextmanager
def _restored(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The model's buffers, parameter gradients and the random state (CPU and ``device``) restored on exit."""
    # copies on the host: on a card near its budget a second set of gradients may not fit
    buffers = [(b, b.detach().to("cpu", copy=True)) for b in model.buffers()]
    grads = [(p, None if p.grad is None else p.grad.detach().to("cpu", copy=True)) for p in model.parameters()]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for p, grad in grads:
            if grad is None:
                p.grad = None
            elif p.grad is not None and p.grad.shape == grad.shape:
                p.grad.copy_(grad)  # in place: no second set of gradients on the device
            else:
                p.grad = grad.to(p.device)
