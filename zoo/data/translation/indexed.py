"""fairseq's binarized data: the ``MMapIndexedDataset`` format (``{prefix}.idx`` + ``{prefix}.bin``), its reader
(:class:`MMapIndexedDataset`, numpy memmap) and writers (:func:`write_mmap_indexed_dataset`, and
:func:`write_binarized_split`, which writes a split as ``fairseq-preprocess`` does).

The index format (fairseq ``fairseq/data/indexed_dataset.py``, ``MMapIndexedDataset.Index``), little endian::

    b"MMIDIDX\\x00\\x00"   9 bytes magic
    <Q  version = 1
    <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 double, 8 uint16, 9 uint32, 10 uint64)
    <Q  number of sequences N
    int32[N]  sizes (tokens per sequence)
    int64[N]  pointers (byte offset of each sequence in the .bin file)

and the ``.bin`` file is the concatenation of the sequences in that dtype (uint16 when the vocabulary has fewer
than 65500 symbols, as fairseq's ``best_fitting_int_dtype``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zoo.data.translation.dictionary import Dictionary
from zoo.errors import ZooError

__all__ = ["MMapIndexedDataset", "best_fitting_dtype", "write_binarized_split", "write_mmap_indexed_dataset"]

_HDR_MAGIC = b"MMIDIDX\x00\x00"
_CODE_TO_DTYPE: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.double,
    8: np.uint16,
    9: np.uint32,
    10: np.uint64,
}


def best_fitting_dtype(vocab_size: int | None) -> type:
    """fairseq's ``best_fitting_int_dtype`` for a vocabulary of ``vocab_size`` symbols: uint16 below 65500
    symbols, uint32 below 2^32 - 1, else int64; uint32 when ``vocab_size`` is None (unknown)."""
    if vocab_size is None:
        return np.uint32
    if vocab_size < 65500:
        return np.uint16
    if vocab_size < 4294967295:
        return np.uint32
    return np.int64


def _dtype_code(dtype: Any) -> int:
    dt = np.dtype(dtype)
    for code, d in _CODE_TO_DTYPE.items():
        if np.dtype(d) == dt:
            return code
    raise ZooError(f"dtype {dt} has no code in fairseq's MMapIndexedDataset format; use uint16, uint32 or int64")


def write_mmap_indexed_dataset(
    prefix: str | os.PathLike,
    sequences: Iterable[Sequence[int] | np.ndarray],
    dtype: Any = None,
    vocab_size: int | None = None,
) -> None:
    """Write ``{prefix}.bin`` and ``{prefix}.idx`` in fairseq's ``MMapIndexedDataset`` format (see the module
    docstring); ``dtype`` defaults to :func:`best_fitting_dtype` of ``vocab_size``.

    Args:
        prefix: the path of the two files without their suffix (parent folders are created).
        sequences: the token-id sequences to write, in order.
        dtype: the numpy dtype the ids are stored in; None for the one that fits ``vocab_size``.
        vocab_size: the vocabulary size the ids come from; None when unknown.
    """
    dtype = np.dtype(dtype if dtype is not None else best_fitting_dtype(vocab_size))
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    sizes: list[int] = []
    top = np.iinfo(dtype).max if dtype.kind in "iu" else None
    with open(prefix + ".bin", "wb") as data:
        for seq in sequences:
            raw = np.asarray(seq)
            if top is not None and raw.size and int(raw.max()) > top:
                raise ZooError(
                    f"token id {int(raw.max())} does not fit {dtype} (max {top}): give a wider dtype or "
                    "the vocabulary size"
                )
            arr = raw.astype(dtype)
            data.write(arr.tobytes(order="C"))
            sizes.append(int(arr.size))
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if sizes:
        pointers[1:] = np.cumsum(np.asarray(sizes[:-1], dtype=np.int64) * dtype.itemsize)
    with open(prefix + ".idx", "wb") as index:
        index.write(_HDR_MAGIC)
        index.write(struct.pack("<Q", 1))
        index.write(struct.pack("<B", _dtype_code(dtype)))
        index.write(struct.pack("<Q", len(sizes)))
        index.write(np.asarray(sizes, dtype=np.int32).tobytes(order="C"))
        index.write(pointers.tobytes(order="C"))


class MMapIndexedDataset:
    """Reader of fairseq's ``MMapIndexedDataset`` (``{prefix}.idx`` + ``{prefix}.bin``) with numpy memmap.

    ``ds[i]`` is the i-th sequence as int64 numpy array, ``ds.sizes`` the int32 lengths. Every inconsistency (bad
    magic or version, unknown dtype, truncated index or data) is one ZooError naming the file.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise ZooError(f"{p} does not exist: expected fairseq-preprocess output (--dataset-impl mmap)")
        with open(idx_path, "rb") as f:
            head = f.read(9 + 8 + 1 + 8)
        if len(head) < 26 or head[:9] != _HDR_MAGIC:
            raise ZooError(
                f"{idx_path} is not a fairseq MMapIndexedDataset index (magic {head[:9]!r}, expected "
                f"{_HDR_MAGIC!r}): binarize with fairseq-preprocess --dataset-impl mmap (the default)"
            )
        (version,) = struct.unpack("<Q", head[9:17])
        if version != 1:
            raise ZooError(f"{idx_path}: index version {version} is not supported (fairseq writes version 1)")
        (code,) = struct.unpack("<B", head[17:18])
        if code not in _CODE_TO_DTYPE:
            raise ZooError(f"{idx_path}: unknown dtype code {code} (fairseq's codes are 1..10)")
        self.dtype = np.dtype(_CODE_TO_DTYPE[code])
        (n,) = struct.unpack("<Q", head[18:26])
        expected = 26 + n * (4 + 8)
        actual = os.path.getsize(idx_path)
        if actual < expected:
            raise ZooError(
                f"{idx_path} is truncated: {actual} bytes for {n} sequences (expected {expected}); "
                "binarize the split again"
            )
        self._index = np.memmap(idx_path, mode="r", order="C")
        self.sizes = np.frombuffer(self._index, dtype=np.int32, count=n, offset=26)
        self.pointers = np.frombuffer(self._index, dtype=np.int64, count=n, offset=26 + 4 * n)
        data_bytes = os.path.getsize(bin_path)
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if data_bytes < need:
            raise ZooError(
                f"{bin_path} is truncated: {data_bytes} bytes, the index needs {need}; binarize the split again"
            )
        self._data = np.memmap(bin_path, mode="r", order="C") if data_bytes else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences")
        ptr, size = int(self.pointers[i]), int(self.sizes[i])
        return np.frombuffer(self._data, dtype=self.dtype, count=size, offset=ptr).astype(np.int64)

    def max_id(self) -> int:
        """The largest token id in the data file (-1 when empty)."""
        n = int(self.pointers[-1]) // self.dtype.itemsize + int(self.sizes[-1]) if len(self) else 0
        return int(np.frombuffer(self._data, dtype=self.dtype, count=n).max()) if n else -1

    def __getstate__(self) -> str:  # picklable for DataLoader workers: reopen the memmaps
        return self.prefix

    def __setstate__(self, state: str) -> None:
        self.__init__(state)  # type: ignore[misc]


def write_binarized_split(
    data_dir: str | os.PathLike,
    split: str,
    source_lang: str,
    target_lang: str,
    src_sequences: Sequence[Sequence[int]],
    tgt_sequences: Sequence[Sequence[int]],
    src_dict: Dictionary | None = None,
    tgt_dict: Dictionary | None = None,
) -> None:
    """Write a split as ``fairseq-preprocess`` does: ``{split}.{src}-{tgt}.{lang}.bin/.idx`` (token ids ending in
    eos) and, when given, ``dict.{lang}.txt``.

    Args:
        data_dir: the output folder (created when missing).
        split: the split's name (``"train"``, ``"valid"``, ``"test"``).
        source_lang: the source language code.
        target_lang: the target language code.
        src_sequences: the source sentences, token ids.
        tgt_sequences: the target sentences, token ids.
        src_dict: the source dictionary, written as ``dict.{source_lang}.txt``; None to write none.
        tgt_dict: the target dictionary, written as ``dict.{target_lang}.txt``; None to write none.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for lang, seqs, d in ((source_lang, src_sequences, src_dict), (target_lang, tgt_sequences, tgt_dict)):
        vocab = len(d) if d is not None else None
        write_mmap_indexed_dataset(data_dir / f"{split}.{source_lang}-{target_lang}.{lang}", seqs, vocab_size=vocab)
        if d is not None:
            d.save(data_dir / f"dict.{lang}.txt")
