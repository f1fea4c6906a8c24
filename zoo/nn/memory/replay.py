"""Replay in backward: a recomputation must see the forward's random state and autocast state, and must not touch
BatchNorm running statistics a second time. Shared by the memory strategies (and activation checkpointing)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["AutocastReplay", "RNGLog", "RNGState", "frozen_batchnorm_stats", "restored_batchnorm_stats"]


class RNGState:
    """The CPU generator state and, for a CUDA input, that device's generator state."""

    __slots__ = ("cpu", "cuda", "device")

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class RNGLog:
    """The generator states a forward saw before each residual-function call, replayed in backward.

    :meth:`record` notes the current state (the CPU generator's and, for a CUDA input, that device's) and
    :meth:`restore` ``(k)`` sets the state of the k-th record back. A state equal to the last stored one is not
    stored again: calls that draw no random numbers (no dropout, eval mode) share one stored state, so a
    deterministic stack stores one whatever its depth, and nothing small stays allocated per step. That is the
    point: a small tensor kept per step, allocated between a step's large temporaries, pins freed blocks of
    glibc's heap, and the process's resident memory then grows with depth although the live tensors do not
    (measured: a tied stack on a 1 MiB state peaked at 215 MiB at depth 100 and 3.1 GiB at depth 3000). States
    that differ (blocks that draw) are copied into slabs whose sizes double: one allocation per doubling, not
    one per step. Comparing costs a copy of the state (5 KB on CPU, 16 bytes on CUDA), about 10 us.
    """

    _FIRST_SLAB = 16  # rows of the first slab; slab k has 16 * 2^k

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._slabs: list[torch.Tensor] = []  # rows: the CPU state's bytes, then the CUDA state's
        self._stored = 0
        self._cpu_bytes = 0
        self._records: list[int] = []  # record k -> its row

    def _row(self, index: int) -> torch.Tensor:
        k = (index // self._FIRST_SLAB + 1).bit_length() - 1
        return self._slabs[k][index - self._FIRST_SLAB * ((1 << k) - 1)]

    def record(self) -> None:
        state = torch.get_rng_state()
        if self.cuda:
            self._cpu_bytes = state.numel()
            state = torch.cat([state, torch.cuda.get_rng_state(self.device)])
        if not (self._stored and torch.equal(state, self._row(self._stored - 1))):
            if self._stored == self._FIRST_SLAB * ((1 << len(self._slabs)) - 1):  # the slabs are full
                self._slabs.append(state.new_empty((self._FIRST_SLAB << len(self._slabs), state.numel())))
            self._row(self._stored).copy_(state)
            self._stored += 1
        self._records.append(self._stored - 1)

    def __len__(self) -> int:
        return len(self._records)

    def restore(self, k: int) -> None:
        """Set the generators to the state of the k-th :meth:`record`."""
        # copies: torch.set_rng_state of a view with a storage offset crashes (torch 2.14, segmentation fault)
        row = self._row(self._records[k])
        if self.cuda:
            torch.set_rng_state(row[: self._cpu_bytes].clone())
            torch.cuda.set_rng_state(row[self._cpu_bytes :].clone(), self.device)
        else:
            torch.set_rng_state(row.clone())


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Batch statistics as in training, but running statistics left untouched.

    Setting ``track_running_stats=False`` on a training-mode BatchNorm makes it normalise with
    the batch statistics and skip the running-average update (and ``num_batches_tracked``).
    ``modules``: the modules whose BatchNorm layers are frozen.
    """
    frozen = []
    for m in modules:
        for bn in m.modules():
            if isinstance(bn, _BatchNorm) and bn.training and bn.track_running_stats:
                bn.track_running_stats = False
                frozen.append(bn)
    try:
        yield
    finally:
        for bn in frozen:
            bn.track_running_stats = True


@contextlib.contextmanager
def restored_batchnorm_stats(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Training-mode BatchNorms run as they are (the same kernels, so activation checkpointing saves the same
    tensors), and their running statistics are put back afterwards: a recomputation leaves no trace.
    ``modules``: the modules whose BatchNorm statistics are restored."""
    saved = []
    for m in modules:
        for bn in m.modules():
            if isinstance(bn, _BatchNorm) and bn.training and bn.track_running_stats:
                saved.append(
                    (
                        bn,
                        [b.clone() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None],
                    )
                )
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, values in saved:
                for buffer, value in zip(
                    [b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None], values
                ):
                    buffer.copy_(value)


class AutocastReplay:
    """Autocast state of the forward, replayed around every recomputation in backward.
    ``device``: the device whose autocast state is recorded and replayed."""

    def __init__(self, device: torch.device):
        self.device_type = device.type
        self.autocast = torch.is_autocast_enabled(self.device_type)
        self.dtype = torch.get_autocast_dtype(self.device_type)

    def autocast_ctx(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast)
