"""Which examples go in a batch: :func:`batch_by_size` (fairseq's: at most ``max_tokens`` = ``batch size x longest
example`` tokens, sizes cut to multiples of ``required_batch_size_multiple``) and :class:`TokenBatchSampler`
(length-sorted examples batched once, the batch order shuffled each epoch, sharded over distributed processes)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler

from zoo.data.base import resume_position
from zoo.errors import ZooError

__all__ = ["TokenBatchSampler", "batch_by_size"]


def batch_by_size(
    indices: Sequence[int],
    num_tokens: np.ndarray,
    max_tokens: int | None = None,
    max_sentences: int | None = None,
    required_batch_size_multiple: int = 1,
) -> list[list[int]]:
    """fairseq's ``batch_by_size`` (its python fallback): cut ``indices`` (in order) into batches with
    ``len(batch) * longest <= max_tokens`` and ``len(batch) <= max_sentences``; a full batch is cut to a multiple of
    ``required_batch_size_multiple`` when it holds at least that many, the rest starting the next batch.

    Args:
        indices: the examples, in batching order.
        num_tokens: the size of every example (its longer side), indexed by example.
        max_tokens: the most padded tokens per batch; None (or <= 0) for no bound.
        max_sentences: the most examples per batch; None (or <= 0) for no bound (one of the two is needed).
        required_batch_size_multiple: full batches are cut to a multiple of this.
    """
    max_tokens = max_tokens if max_tokens is not None and max_tokens > 0 else None
    max_sentences = max_sentences if max_sentences is not None and max_sentences > 0 else None
    if max_tokens is None and max_sentences is None:
        raise ZooError("give max_tokens or max_sentences (batch_size) to batch translation examples")
    mult = max(1, int(required_batch_size_multiple))
    batches: list[list[int]] = []
    batch: list[int] = []
    lens: list[int] = []
    longest = 0
    for idx in indices:
        n = int(num_tokens[idx])
        if max_tokens is not None and n > max_tokens:
            raise ZooError(
                f"example {idx} has {n} tokens, more than max_tokens={max_tokens}: raise max_tokens or "
                "lower max_source_positions / max_target_positions (longer examples are dropped)"
            )
        lens.append(n)
        longest = max(longest, n)
        full = len(batch) > 0 and (
            (max_sentences is not None and len(batch) == max_sentences)
            or (max_tokens is not None and (len(batch) + 1) * longest > max_tokens)
        )
        if full:
            cut = max(mult * (len(batch) // mult), len(batch) % mult)
            batches.append(batch[:cut])
            batch, lens = batch[cut:], lens[cut:]
            longest = max(lens) if lens else 0
        batch.append(int(idx))
    if batch:
        batches.append(batch)
    return batches


class TokenBatchSampler(BatchSampler):
    """Batches of example indices by token count (:func:`batch_by_size` over length-sorted examples), aware of
    distributed training.

    The batches are built once (examples shuffled with ``seed``, then stably sorted by target and source length, as
    fairseq's ``ordered_indices``) and, with ``shuffle``, their order is shuffled each epoch with ``seed + epoch``
    (Lightning calls :meth:`set_epoch`).

    With several processes (``num_replicas`` / ``rank``; else those of the ``sampler`` Lightning passes in, a
    ``DistributedSampler``; else ``torch.distributed``'s when it is initialised) each process takes its share:

    - ``even_batches=True`` (training): every ``num_replicas``-th batch of the epoch's order, the list padded by
      repeating its first batches so that all processes run the same number of steps (fairseq's sharding; DDP's
      gradient all-reduce needs equal step counts);
    - ``even_batches=False`` (evaluation): every ``num_replicas``-th example of the length-sorted order, batched on
      each process, so that every example is seen exactly once (corpus BLEU over all processes is the split's) and
      every process gets at least one batch (as long as the split holds ``num_replicas`` examples; a smaller split
      is padded by repeating examples).

    Lightning's ``use_distributed_sampler`` (its default, True) works as written: Lightning rebuilds this batch
    sampler with its ``DistributedSampler`` as ``sampler`` (it subclasses ``BatchSampler`` and takes ``sampler``
    and ``drop_last``), and only that sampler's ``num_replicas`` and ``rank`` are used (its shuffle and seed are
    not: the batches shuffle with ``seed``). ``use_distributed_sampler: false`` works too (ranks from
    ``torch.distributed``). ``self.sampler`` is a small proxy through which Lightning's ``set_epoch`` reaches this
    batch sampler.

    Args:
        src_sizes, tgt_sizes: tokens per example (target None: source only).
        max_tokens, max_sentences, required_batch_size_multiple: :func:`batch_by_size`.
        shuffle, seed: shuffle the examples (once) and the batch order (each epoch).
        num_replicas, rank: the processes (None: from ``sampler`` or ``torch.distributed``).
        even_batches: equal batch counts on every process by repeating batches (training), or each example once.
        sampler: a distributed sampler whose ``num_replicas`` / ``rank`` are used (what Lightning injects).
        drop_last: must be False (every example is batched); an argument so that Lightning can set it.
    """

    def __init__(
        self,
        src_sizes: np.ndarray,
        tgt_sizes: np.ndarray | None,
        max_tokens: int | None = 4096,
        max_sentences: int | None = None,
        shuffle: bool = True,
        seed: int = 1,
        required_batch_size_multiple: int = 8,
        num_replicas: int | None = None,
        rank: int | None = None,
        even_batches: bool = True,
        sampler: Any = None,
        drop_last: bool = False,
    ) -> None:
        if drop_last:
            raise ZooError("TokenBatchSampler batches every example: drop_last must be False")
        self.src_sizes = np.asarray(src_sizes, dtype=np.int64)
        self.tgt_sizes = None if tgt_sizes is None else np.asarray(tgt_sizes, dtype=np.int64)
        self.num_tokens = self.src_sizes if self.tgt_sizes is None else np.maximum(self.src_sizes, self.tgt_sizes)
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.required_batch_size_multiple = required_batch_size_multiple
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0
        self._resume: tuple[int, int] | None = None  # (epoch, position): where a resumed epoch goes on
        self.skipped = 0  # the batches the current pass skipped (those a resumed fit had trained on)
        self.even_batches, self.drop_last = bool(even_batches), False
        if num_replicas is None and sampler is not None and hasattr(sampler, "num_replicas"):
            num_replicas, rank = sampler.num_replicas, sampler.rank
        if num_replicas is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        self.num_replicas, self.rank = int(num_replicas or 1), int(rank or 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ZooError(f"rank must be in 0 .. num_replicas - 1 = {self.num_replicas - 1}, got {self.rank}")
        if self.shuffle:
            order = np.random.default_rng(self.seed).permutation(len(self.src_sizes))
        else:
            order = np.arange(len(self.src_sizes))
        if self.tgt_sizes is not None:
            order = order[np.argsort(self.tgt_sizes[order], kind="mergesort")]
        order = order[np.argsort(self.src_sizes[order], kind="mergesort")]
        if self.num_replicas > 1 and not self.even_batches and len(order):
            # each example once: every num_replicas-th of the sorted order (a split smaller than the number of
            # processes is repeated so that every process has one example)
            order = np.resize(order, max(len(order), self.num_replicas))[self.rank :: self.num_replicas]
        self.batches = self._batch(order)
        self.sampler = _EpochProxy(self)

    def _batch(self, order: np.ndarray) -> list[list[int]]:
        return batch_by_size(
            order, self.num_tokens, self.max_tokens, self.max_sentences, self.required_batch_size_multiple
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, position: int) -> None:
        """Make the next pass, if it is over ``epoch``, start at batch ``position`` of this process's batches (a
        fit resumed in the middle of that epoch: ``zoo.data.base.TrainingLoader``); another epoch starts at its
        first batch.

        Args:
            epoch: the epoch the interrupted fit was in.
            position: how many of this process's batches of that epoch it had trained on.
        """
        self._resume = (int(epoch), int(position))

    def _epoch_batches(self) -> list[list[int]]:
        batches = list(self.batches)
        if self.shuffle:
            perm = np.random.default_rng(self.seed + self.epoch + 1).permutation(len(batches))
            batches = [batches[i] for i in perm]
        if self.num_replicas > 1 and self.even_batches and batches:
            total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
            batches = (batches * math.ceil(total / len(batches)))[:total]
            batches = batches[self.rank :: self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        self.skipped = resume_position(self)
        return iter(self._epoch_batches()[self.skipped :])

    def __len__(self) -> int:
        n = len(self.batches)
        return math.ceil(n / self.num_replicas) if self.num_replicas > 1 and self.even_batches else n


class _EpochProxy:
    """``batch_sampler.sampler`` for Lightning's ``_set_sampler_epoch``: forwards ``set_epoch``."""

    def __init__(self, owner: TokenBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)
