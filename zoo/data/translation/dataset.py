"""Sentence pairs and their batches: :class:`LanguagePairDataset` (token-id pairs, filtered by the model's
positions) and :func:`collate`, fairseq's ``LanguagePairDataset.collate`` (``src_tokens`` left-padded by default,
``prev_output_tokens`` = the target with its eos moved to the front, ``target``, ``ntokens``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.translation.dictionary import EOS, PAD
from zoo.errors import ZooError

__all__ = ["LanguagePairDataset", "collate"]


class LanguagePairDataset(Dataset):
    """Pairs of token-id sequences (each ending in eos); items are ``{"id", "source", "target"}`` (int64 tensors,
    target None without targets), plus ``"length"`` (an int) when ``lengths`` is given: a length class per example
    (the numbers task: the number's digits) by which the task reports exact-match accuracy.

    Args:
        src: the source sentences, token ids.
        tgt: the target sentences, token ids (one per source sentence); None without targets.
        src_sizes: the length of every source sentence; None to measure them.
        tgt_sizes: the length of every target sentence; None to measure them.
        indices: the positions in ``src`` / ``tgt`` of the examples this dataset holds (item i is example
            ``indices[i]``); None for all of them.
        lengths: a length class per sentence of ``src``; None for none.
    """

    def __init__(
        self,
        src: Sequence[np.ndarray],
        tgt: Sequence[np.ndarray] | None = None,
        src_sizes: np.ndarray | None = None,
        tgt_sizes: np.ndarray | None = None,
        indices: np.ndarray | None = None,
        lengths: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if tgt is not None and len(src) != len(tgt):
            raise ZooError(f"source and target differ in length: {len(src)} vs {len(tgt)} sentences")
        if lengths is not None and len(lengths) != len(src):
            raise ZooError(f"lengths holds {len(lengths)} length classes for {len(src)} sentences: give one each")
        self.src, self.tgt = src, tgt
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.indices = np.arange(len(src)) if indices is None else np.asarray(indices)
        full_src = np.asarray([len(s) for s in src] if src_sizes is None else src_sizes, dtype=np.int64)
        self.src_sizes = full_src[self.indices]
        if tgt is not None:
            full_tgt = np.asarray([len(t) for t in tgt] if tgt_sizes is None else tgt_sizes, dtype=np.int64)
            self.tgt_sizes: np.ndarray | None = full_tgt[self.indices]
        else:
            self.tgt_sizes = None

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.indices[i])
        src = torch.as_tensor(np.asarray(self.src[j], dtype=np.int64))
        tgt = torch.as_tensor(np.asarray(self.tgt[j], dtype=np.int64)) if self.tgt is not None else None
        item: dict[str, Any] = {"id": i, "source": src, "target": tgt}
        if self.lengths is not None:
            item["length"] = int(self.lengths[j])
        return item

    def num_tokens(self) -> np.ndarray:
        """Size of each example: ``max(len(src), len(tgt))`` (fairseq's ``num_tokens``)."""
        return self.src_sizes if self.tgt_sizes is None else np.maximum(self.src_sizes, self.tgt_sizes)

    def filter_by_size(self, max_source_positions: int, max_target_positions: int) -> int:
        """Drop examples longer than the model's positions; returns the number dropped."""
        keep = self.src_sizes <= max_source_positions
        if self.tgt_sizes is not None:
            keep &= self.tgt_sizes <= max_target_positions
        dropped = int((~keep).sum())
        if dropped:
            self.indices, self.src_sizes = self.indices[keep], self.src_sizes[keep]
            if self.tgt_sizes is not None:
                self.tgt_sizes = self.tgt_sizes[keep]
        return dropped


def _merge(
    values: Sequence[torch.Tensor],
    pad: int,
    left_pad: bool,
    eos: int | None = None,
    move_eos_to_beginning: bool = False,
) -> torch.Tensor:
    """fairseq's ``collate_tokens``: pad 1-d tensors into (B, max_len)."""
    size = max(v.numel() for v in values)
    out = values[0].new_full((len(values), size), pad)
    for i, v in enumerate(values):
        if move_eos_to_beginning:
            v = torch.cat([v.new_full((1,), eos if eos is not None else v[-1]), v[:-1]])
        dst = out[i, size - v.numel() :] if left_pad else out[i, : v.numel()]
        dst.copy_(v)
    return out


def collate(
    samples: Sequence[dict[str, Any]],
    pad: int = PAD,
    eos: int = EOS,
    left_pad_source: bool = True,
    left_pad_target: bool = False,
) -> dict[str, Any]:
    """A batch as fairseq's ``LanguagePairDataset.collate`` (without its sort by source length): ``id``,
    ``src_tokens``, ``src_lengths``, and with targets ``prev_output_tokens`` (eos first), ``target``, ``ntokens``;
    ``length`` (B,) when the samples carry length classes.

    Args:
        samples: the items of a :class:`LanguagePairDataset`.
        pad: the padding token id.
        eos: the end-of-sentence token id (moved to the front of ``prev_output_tokens``).
        left_pad_source: whether sources are padded on the left.
        left_pad_target: whether targets are padded on the left.
    """
    if not samples:
        return {}
    ids = torch.as_tensor([s["id"] for s in samples], dtype=torch.long)
    src = [s["source"] for s in samples]
    batch: dict[str, Any] = {
        "id": ids,
        "src_tokens": _merge(src, pad, left_pad_source),
        "src_lengths": torch.as_tensor([v.numel() for v in src], dtype=torch.long),
        "nsentences": len(samples),
    }
    if "length" in samples[0]:
        batch["length"] = torch.as_tensor([s["length"] for s in samples], dtype=torch.long)
    if samples[0].get("target") is not None:
        tgt = [s["target"] for s in samples]
        batch["target"] = _merge(tgt, pad, left_pad_target)
        batch["prev_output_tokens"] = _merge(tgt, pad, left_pad_target, eos=eos, move_eos_to_beginning=True)
        batch["ntokens"] = int(sum(v.numel() for v in tgt))
    else:
        batch["ntokens"] = int(sum(v.numel() for v in src))
    return batch
