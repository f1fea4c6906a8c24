"""Data for sequence-to-sequence translation, in fairseq's formats and conventions, without fairseq.

Conventions (fairseq's ``Dictionary`` and ``LanguagePairDataset``):

- token ids: ``<s>`` = 0 (bos), ``<pad>`` = 1, ``</s>`` = 2 (eos), ``<unk>`` = 3, then the ``dict.{lang}.txt`` symbols
  in file order; every sentence ends with eos (``fairseq-preprocess`` appends it);
- a batch (:func:`collate`) is a dict: ``src_tokens`` (B, S) left-padded by default (``left_pad_source=True``),
  ``src_lengths`` (B,), ``prev_output_tokens`` (B, T) = the target with its eos moved to the front
  (``</s> w1 .. wn``), ``target`` (B, T) = ``w1 .. wn </s>``, both right-padded; ``ntokens`` = number of target
  tokens (a Python int), ``id`` (B,) the example indices;
- batches hold at most ``max_tokens`` tokens, counted as ``batch size x longest example`` with an example's size
  ``max(len(src), len(tgt))``; examples are sorted by length (shuffled first, then stable sorts by target and
  source length, fairseq's ``ordered_indices``) and cut greedily into batches whose size is a multiple of
  ``required_batch_size_multiple`` when possible (fairseq's ``batch_by_size``); the list of batches is shuffled
  each epoch (seed + epoch).

Data modules:

- :class:`FairseqBinarizedDataModule` reads ``fairseq-preprocess`` output: ``dict.{lang}.txt`` and
  ``{split}.{src}-{tgt}.{lang}.bin/.idx`` in fairseq's ``MMapIndexedDataset`` format (read with numpy memmap by
  :class:`MMapIndexedDataset`; :func:`write_mmap_indexed_dataset` writes it);
- :class:`ParallelTextDataModule` reads raw parallel text files (one sentence a line, whitespace-tokenised),
  segments them with sentencepiece when it is installed or with a built-in BPE (subword-nmt's ``@@`` convention)
  learned on the training text, and builds the dictionaries as ``fairseq-preprocess`` does;
- :class:`NumbersDataModule`, the embedded task: German number words to English number words, generated with a
  fixed seed with the num2words package, no files and no network (see :func:`german_number_tokens`).

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

import heapq
import math
import os
import struct
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from zoo.errors import ZooError

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "UNK",
    "BPETokenizer",
    "Dictionary",
    "FairseqBinarizedDataModule",
    "LanguagePairDataset",
    "MMapIndexedDataset",
    "NUMBERS_SRC_VOCAB_SIZE",
    "NUMBERS_TGT_VOCAB_SIZE",
    "NumbersDataModule",
    "ParallelTextDataModule",
    "TokenBatchSampler",
    "TranslationDataModule",
    "batch_by_size",
    "collate",
    "ENGLISH_NUMBER_TOKENS",
    "GERMAN_NUMBER_MORPHEMES",
    "english_number",
    "english_number_tokens",
    "german_number",
    "german_number_tokens",
    "german_source_text",
    "number_digits",
    "numbers_dictionaries",
    "post_process",
    "write_binarized_split",
    "write_mmap_indexed_dataset",
]

BOS, PAD, EOS, UNK = 0, 1, 2, 3  # fairseq's Dictionary: <s>, <pad>, </s>, <unk>


# ================================================================================================ dictionary


class Dictionary:
    """fairseq's ``Dictionary``: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, then symbols in order.

    ``dict.txt`` files hold one ``symbol count`` line per symbol after the 4 specials (a trailing
    ``#fairseq:overwrite`` flag allowed), so ``len(Dictionary.load(f)) == 4 + lines``.
    """

    def __init__(self, bos: str = "<s>", pad: str = "<pad>", eos: str = "</s>", unk: str = "<unk>") -> None:
        self.symbols: list[str] = []
        self.count: list[int] = []
        self.indices: dict[str, int] = {}
        self.bos_word, self.pad_word, self.eos_word, self.unk_word = bos, pad, eos, unk
        self.bos_index = self.add_symbol(bos)
        self.pad_index = self.add_symbol(pad)
        self.eos_index = self.add_symbol(eos)
        self.unk_index = self.add_symbol(unk)
        self.nspecial = len(self.symbols)

    def __len__(self) -> int:
        return len(self.symbols)

    def __getitem__(self, index: int) -> str:
        return self.symbols[index] if 0 <= index < len(self.symbols) else self.unk_word

    def __contains__(self, symbol: str) -> bool:
        return symbol in self.indices

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and self.symbols == other.symbols

    def __hash__(self) -> int:
        return hash(tuple(self.symbols))

    def index(self, symbol: str) -> int:
        """The id of ``symbol`` (``<unk>``'s when absent)."""
        return self.indices.get(symbol, self.unk_index)

    def add_symbol(self, word: str, n: int = 1, overwrite: bool = False) -> int:
        """Add ``word`` (or add ``n`` to its count); returns its id."""
        if word in self.indices and not overwrite:
            idx = self.indices[word]
            self.count[idx] += n
            return idx
        idx = len(self.symbols)
        self.indices[word] = idx
        self.symbols.append(word)
        self.count.append(n)
        return idx

    def finalize(self, threshold: int = -1, nwords: int = -1, padding_factor: int = 8) -> None:
        """fairseq's ``finalize``: sort the non-special symbols by decreasing count (ties alphabetically), keep those
        seen at least ``threshold`` times (at most ``nwords`` in all), pad to a multiple of ``padding_factor`` with
        ``madeupword0000``... symbols."""
        if nwords <= 0:
            nwords = len(self)
        counts = Counter(dict(sorted(zip(self.symbols[self.nspecial:], self.count[self.nspecial:]))))
        symbols, count = self.symbols[: self.nspecial], self.count[: self.nspecial]
        for symbol, c in counts.most_common(nwords - self.nspecial):
            if c >= threshold:
                symbols.append(symbol)
                count.append(c)
        self.symbols, self.count = list(symbols), list(count)
        self.indices = {s: i for i, s in enumerate(self.symbols)}
        self.pad_to_multiple_(padding_factor)

    def pad_to_multiple_(self, padding_factor: int) -> None:
        """Add ``madeupwordNNNN`` symbols (count 0) until ``len(self)`` is a multiple of ``padding_factor``."""
        if padding_factor > 1:
            i = 0
            while len(self) % padding_factor != 0:
                self.add_symbol(f"madeupword{i:04d}", n=0)
                i += 1

    @classmethod
    def load(cls, path: str | os.PathLike) -> Dictionary:
        """Read a fairseq ``dict.txt`` (``symbol count`` lines); one ZooError for a malformed or missing file."""
        d = cls()
        path = Path(path)
        if not path.is_file():
            raise ZooError(f"dictionary {path} does not exist: give the folder written by fairseq-preprocess")
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\n").rstrip()
                if not line:
                    continue
                try:
                    word, field = line.rsplit(" ", 1)
                    overwrite = False
                    if field == "#fairseq:overwrite":
                        overwrite = True
                        word, field = word.rsplit(" ", 1)
                    count = int(field)
                except ValueError:
                    raise ZooError(f"{path}, line {lineno}: expected '<symbol> <count>', got {line!r}") from None
                if word in d and not overwrite:
                    raise ZooError(f"{path}, line {lineno}: duplicate symbol {word!r} (add '#fairseq:overwrite' to "
                                   "keep both)")
                d.add_symbol(word, n=count, overwrite=overwrite)
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write the non-special symbols as ``symbol count`` lines (fairseq's format)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for s, c in zip(self.symbols[self.nspecial:], self.count[self.nspecial:]):
                f.write(f"{s} {c}\n")

    def encode_line(self, line: str | Sequence[str], append_eos: bool = True,
                    add_if_not_exist: bool = False) -> np.ndarray:
        """Ids of the whitespace-separated symbols of ``line`` (plus eos), int64."""
        words = line.split() if isinstance(line, str) else list(line)
        ids = [self.add_symbol(w) if add_if_not_exist else self.index(w) for w in words]
        if append_eos:
            ids.append(self.eos_index)
        return np.asarray(ids, dtype=np.int64)

    def string(self, tokens: torch.Tensor | Sequence[int], bpe_symbol: str | None = None,
               escape_unk: bool = False) -> str:
        """Symbols of ``tokens`` joined by spaces, without eos / pad / bos, post-processed by ``bpe_symbol``
        (:func:`post_process`); ``escape_unk`` writes ``<unk>`` as ``<<unk>>`` (fairseq, for references)."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        skip = {self.eos_index, self.pad_index, self.bos_index}
        words = [("<<unk>>" if escape_unk else self.unk_word) if i == self.unk_index else self[i]
                 for i in ids if i not in skip]
        return post_process(" ".join(words), bpe_symbol)


def post_process(sentence: str, bpe_symbol: str | None) -> str:
    """fairseq's ``post_process``: ``"@@ "`` / ``"subword_nmt"`` removes subword-nmt continuation markers,
    ``"sentencepiece"`` joins pieces on ``▁``; None leaves the sentence as it is."""
    if not bpe_symbol or bpe_symbol == "none":
        return sentence
    if bpe_symbol in ("sentencepiece", "\u2581"):
        return sentence.replace(" ", "").replace("\u2581", " ").strip()
    marker = "@@ " if bpe_symbol in ("subword_nmt", "@@ ", "@@") else bpe_symbol
    return (sentence + " ").replace(marker, "").rstrip()


# ================================================================================================ mmap format

_HDR_MAGIC = b"MMIDIDX\x00\x00"
_CODE_TO_DTYPE: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                                   7: np.double, 8: np.uint16, 9: np.uint32, 10: np.uint64}


def best_fitting_dtype(vocab_size: int | None) -> type:
    """fairseq's ``best_fitting_int_dtype``: uint16 below 65500 symbols, uint32 below 2^32 - 1, else int64."""
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


def write_mmap_indexed_dataset(prefix: str | os.PathLike, sequences: Iterable[Sequence[int] | np.ndarray],
                               dtype: Any = None, vocab_size: int | None = None) -> None:
    """Write ``{prefix}.bin`` and ``{prefix}.idx`` in fairseq's ``MMapIndexedDataset`` format (see the module
    docstring); ``dtype`` defaults to :func:`best_fitting_dtype` of ``vocab_size``."""
    dtype = np.dtype(dtype if dtype is not None else best_fitting_dtype(vocab_size))
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    sizes: list[int] = []
    top = np.iinfo(dtype).max if dtype.kind in "iu" else None
    with open(prefix + ".bin", "wb") as data:
        for seq in sequences:
            raw = np.asarray(seq)
            if top is not None and raw.size and int(raw.max()) > top:
                raise ZooError(f"token id {int(raw.max())} does not fit {dtype} (max {top}): give a wider dtype or "
                               "the vocabulary size")
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
            raise ZooError(f"{idx_path} is not a fairseq MMapIndexedDataset index (magic {head[:9]!r}, expected "
                           f"{_HDR_MAGIC!r}): binarize with fairseq-preprocess --dataset-impl mmap (the default)")
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
            raise ZooError(f"{idx_path} is truncated: {actual} bytes for {n} sequences (expected {expected}); "
                           "binarize the split again")
        self._index = np.memmap(idx_path, mode="r", order="C")
        self.sizes = np.frombuffer(self._index, dtype=np.int32, count=n, offset=26)
        self.pointers = np.frombuffer(self._index, dtype=np.int64, count=n, offset=26 + 4 * n)
        data_bytes = os.path.getsize(bin_path)
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if data_bytes < need:
            raise ZooError(f"{bin_path} is truncated: {data_bytes} bytes, the index needs {need}; binarize the "
                           "split again")
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


def write_binarized_split(data_dir: str | os.PathLike, split: str, source_lang: str, target_lang: str,
                          src_sequences: Sequence[Sequence[int]], tgt_sequences: Sequence[Sequence[int]],
                          src_dict: Dictionary | None = None, tgt_dict: Dictionary | None = None) -> None:
    """Write a split as ``fairseq-preprocess`` does: ``{split}.{src}-{tgt}.{lang}.bin/.idx`` (token ids ending in
    eos) and, when given, ``dict.{lang}.txt``."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for lang, seqs, d in ((source_lang, src_sequences, src_dict), (target_lang, tgt_sequences, tgt_dict)):
        vocab = len(d) if d is not None else None
        write_mmap_indexed_dataset(data_dir / f"{split}.{source_lang}-{target_lang}.{lang}", seqs, vocab_size=vocab)
        if d is not None:
            d.save(data_dir / f"dict.{lang}.txt")


# ================================================================================================ datasets


class LanguagePairDataset(Dataset):
    """Pairs of token-id sequences (each ending in eos); items are ``{"id", "source", "target"}`` (int64 tensors,
    target None without targets), plus ``"length"`` (an int) when ``lengths`` is given: a length class per example
    (the numbers task: the number's digits) by which the task reports exact-match accuracy."""

    def __init__(self, src: Sequence[np.ndarray], tgt: Sequence[np.ndarray] | None = None,
                 src_sizes: np.ndarray | None = None, tgt_sizes: np.ndarray | None = None,
                 indices: np.ndarray | None = None, lengths: Sequence[int] | np.ndarray | None = None) -> None:
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


def _merge(values: Sequence[torch.Tensor], pad: int, left_pad: bool, eos: int | None = None,
           move_eos_to_beginning: bool = False) -> torch.Tensor:
    """fairseq's ``collate_tokens``: pad 1-d tensors into (B, max_len)."""
    size = max(v.numel() for v in values)
    out = values[0].new_full((len(values), size), pad)
    for i, v in enumerate(values):
        if move_eos_to_beginning:
            v = torch.cat([v.new_full((1,), eos if eos is not None else v[-1]), v[:-1]])
        dst = out[i, size - v.numel():] if left_pad else out[i, : v.numel()]
        dst.copy_(v)
    return out


def collate(samples: Sequence[dict[str, Any]], pad: int = PAD, eos: int = EOS, left_pad_source: bool = True,
            left_pad_target: bool = False) -> dict[str, Any]:
    """A batch as fairseq's ``LanguagePairDataset.collate`` (without its sort by source length): ``id``,
    ``src_tokens``, ``src_lengths``, and with targets ``prev_output_tokens`` (eos first), ``target``, ``ntokens``;
    ``length`` (B,) when the samples carry length classes."""
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


def batch_by_size(indices: Sequence[int], num_tokens: np.ndarray, max_tokens: int | None = None,
                  max_sentences: int | None = None, required_batch_size_multiple: int = 1) -> list[list[int]]:
    """fairseq's ``batch_by_size`` (its python fallback): cut ``indices`` (in order) into batches with
    ``len(batch) * longest <= max_tokens`` and ``len(batch) <= max_sentences``; a full batch is cut to a multiple of
    ``required_batch_size_multiple`` when it holds at least that many, the rest starting the next batch."""
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
            raise ZooError(f"example {idx} has {n} tokens, more than max_tokens={max_tokens}: raise max_tokens or "
                           "lower max_source_positions / max_target_positions (longer examples are dropped)")
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

    def __init__(self, src_sizes: np.ndarray, tgt_sizes: np.ndarray | None, max_tokens: int | None = 4096,
                 max_sentences: int | None = None, shuffle: bool = True, seed: int = 1,
                 required_batch_size_multiple: int = 8, num_replicas: int | None = None,
                 rank: int | None = None, even_batches: bool = True, sampler: Any = None,
                 drop_last: bool = False) -> None:
        if drop_last:
            raise ZooError("TokenBatchSampler batches every example: drop_last must be False")
        self.src_sizes = np.asarray(src_sizes, dtype=np.int64)
        self.tgt_sizes = None if tgt_sizes is None else np.asarray(tgt_sizes, dtype=np.int64)
        self.num_tokens = self.src_sizes if self.tgt_sizes is None else np.maximum(self.src_sizes, self.tgt_sizes)
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.required_batch_size_multiple = required_batch_size_multiple
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0
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
            order = np.resize(order, max(len(order), self.num_replicas))[self.rank::self.num_replicas]
        self.batches = self._batch(order)
        self.sampler = _EpochProxy(self)

    def _batch(self, order: np.ndarray) -> list[list[int]]:
        return batch_by_size(order, self.num_tokens, self.max_tokens, self.max_sentences,
                             self.required_batch_size_multiple)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _epoch_batches(self) -> list[list[int]]:
        batches = list(self.batches)
        if self.shuffle:
            perm = np.random.default_rng(self.seed + self.epoch + 1).permutation(len(batches))
            batches = [batches[i] for i in perm]
        if self.num_replicas > 1 and self.even_batches and batches:
            total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
            batches = (batches * math.ceil(total / len(batches)))[:total]
            batches = batches[self.rank::self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._epoch_batches())

    def __len__(self) -> int:
        n = len(self.batches)
        return math.ceil(n / self.num_replicas) if self.num_replicas > 1 and self.even_batches else n


class _EpochProxy:
    """``batch_sampler.sampler`` for Lightning's ``_set_sampler_epoch``: forwards ``set_epoch``."""

    def __init__(self, owner: TokenBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


# ================================================================================================ tokenizers


class BPETokenizer:
    """Byte-pair encoding learned on whitespace-tokenised text (Sennrich et al.; subword-nmt's output convention:
    a sub-word followed by another of the same word ends in ``@@``, so :func:`post_process` with ``"@@ "`` undoes
    it). ``BPETokenizer.train(lines, num_merges)`` learns the merges (the most frequent pair first, ties broken by
    the pair itself, pairs seen fewer than ``min_frequency`` times never merged); ``encode(line)`` segments."""

    END = "</w>"

    def __init__(self, merges: Sequence[tuple[str, str]]) -> None:
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def train(cls, lines: Iterable[str], num_merges: int, min_frequency: int = 2) -> BPETokenizer:
        words = Counter(w for line in lines for w in line.split())
        vocab = [(list(w[:-1]) + [w[-1] + cls.END], c) for w, c in sorted(words.items())]
        stats: Counter = Counter()
        where: dict[tuple[str, str], set[int]] = defaultdict(set)
        for i, (syms, c) in enumerate(vocab):
            for pair in zip(syms, syms[1:]):
                stats[pair] += c
                where[pair].add(i)
        heap = [(-c, p) for p, c in stats.items()]
        heapq.heapify(heap)
        merges: list[tuple[str, str]] = []
        while heap and len(merges) < num_merges:
            negc, pair = heapq.heappop(heap)
            if stats.get(pair, 0) != -negc:  # stale entry
                continue
            if -negc < min_frequency:
                break
            merges.append(pair)
            a, b = pair
            changed: set[tuple[str, str]] = set()
            for i in list(where.pop(pair, ())):
                syms, c = vocab[i]
                if not any(x == a and y == b for x, y in zip(syms, syms[1:])):
                    continue
                for p in zip(syms, syms[1:]):
                    stats[p] -= c
                    changed.add(p)
                new, k = [], 0
                while k < len(syms):
                    if k + 1 < len(syms) and syms[k] == a and syms[k + 1] == b:
                        new.append(a + b)
                        k += 2
                    else:
                        new.append(syms[k])
                        k += 1
                vocab[i] = (new, c)
                for p in zip(new, new[1:]):
                    stats[p] += c
                    where[p].add(i)
                    changed.add(p)
            stats.pop(pair, None)
            for p in changed:
                if p != pair and stats.get(p, 0) > 0:
                    heapq.heappush(heap, (-stats[p], p))
        return cls(merges)

    def _segment(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        syms = list(word[:-1]) + [word[-1] + self.END]
        while len(syms) > 1:
            ranked = [(self.ranks.get(p, math.inf), k) for k, p in enumerate(zip(syms, syms[1:]))]
            rank, k = min(ranked)
            if rank == math.inf:
                break
            syms = syms[:k] + [syms[k] + syms[k + 1]] + syms[k + 2:]
        out = [s + "@@" for s in syms[:-1]] + [syms[-1][: -len(self.END)]]
        if out[-1] == "":  # the end marker was merged alone (cannot happen with END on the last char)
            out = out[:-1]
            out[-1] = out[-1][:-2]
        self._cache[word] = out
        return out

    def encode(self, line: str) -> str:
        """The sub-words of ``line`` joined by spaces."""
        return " ".join(t for w in line.split() for t in self._segment(w))

    @staticmethod
    def decode(line: str) -> str:
        return post_process(line, "@@ ")


class _SentencePieceTokenizer:
    """sentencepiece (when installed), trained in memory on the training text."""

    def __init__(self, lines: Sequence[str], vocab_size: int) -> None:
        import io

        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                       character_coverage=1.0, model_type="unigram", hard_vocab_limit=False)
        self.sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    def encode(self, line: str) -> str:
        return " ".join(self.sp.encode(line, out_type=str))

    @staticmethod
    def decode(line: str) -> str:
        return post_process(line, "sentencepiece")


class _WordTokenizer:
    def encode(self, line: str) -> str:
        return " ".join(line.split())

    @staticmethod
    def decode(line: str) -> str:
        return line


# ================================================================================================ data modules


class TranslationDataModule(pl.LightningDataModule):
    """Base of the translation data modules: dictionaries, length-bucketed token batches, fairseq's collate.

    Subclasses fill ``self.datasets`` (``{"train", "valid", "test"}`` -> :class:`LanguagePairDataset`) and the
    dictionaries in :meth:`setup`. ``src_dict`` / ``tgt_dict`` set up the module on first access; the model
    checks its vocabulary sizes against them (``len(dm.src_dict)``), and decodes hypotheses with
    :meth:`decode_target` for BLEU.

    Args:
        max_tokens: tokens per batch (``batch size x longest example``).
        max_sentences: sentences per batch (None: no limit).
        left_pad_source / left_pad_target: fairseq's defaults (True / False). The model gives the same results
            for the valid tokens either way (its positions count valid tokens only).
        max_source_positions / max_target_positions: longer examples are dropped (as the model cannot embed them).
        required_batch_size_multiple: batch sizes cut to multiples of this (fairseq's 8).
        seed: seed of the example shuffle and of the epoch-wise batch shuffles.
        num_workers: DataLoader workers.
        remove_bpe: post-processing of decoded targets (``"@@ "``, ``"sentencepiece"`` or None).
    """

    def __init__(self, max_tokens: int | None = 4096, max_sentences: int | None = None, left_pad_source: bool = True,
                 left_pad_target: bool = False, max_source_positions: int = 1024, max_target_positions: int = 1024,
                 required_batch_size_multiple: int = 8, seed: int = 1, num_workers: int = 0,
                 remove_bpe: str | None = None) -> None:
        super().__init__()
        if (max_tokens is None or max_tokens <= 0) and (max_sentences is None or max_sentences <= 0):
            raise ZooError("give max_tokens or max_sentences (a positive number) to batch translation examples")
        if int(num_workers) != num_workers or num_workers < 0:
            raise ZooError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.left_pad_source, self.left_pad_target = bool(left_pad_source), bool(left_pad_target)
        self.max_source_positions, self.max_target_positions = int(max_source_positions), int(max_target_positions)
        self.required_batch_size_multiple = int(required_batch_size_multiple)
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.remove_bpe = remove_bpe
        self.datasets: dict[str, LanguagePairDataset] = {}
        self._src_dict: Dictionary | None = None
        self._tgt_dict: Dictionary | None = None
        self.dropped: dict[str, int] = {}

    # ---------------------------------------------------------------- dictionaries
    @property
    def src_dict(self) -> Dictionary:
        if self._src_dict is None:
            self.setup_dictionaries()
        assert self._src_dict is not None
        return self._src_dict

    @property
    def tgt_dict(self) -> Dictionary:
        if self._tgt_dict is None:
            self.setup_dictionaries()
        assert self._tgt_dict is not None
        return self._tgt_dict

    def setup_dictionaries(self) -> None:
        """Build or read the dictionaries (default: the whole :meth:`setup`)."""
        self.setup()

    def decode_target(self, tokens: torch.Tensor | Sequence[int], escape_unk: bool = False) -> str:
        """Target ids as text: symbols without eos/pad, sub-words joined (``remove_bpe``)."""
        return self.tgt_dict.string(tokens, bpe_symbol=self.remove_bpe, escape_unk=escape_unk)

    def decode_source(self, tokens: torch.Tensor | Sequence[int]) -> str:
        return self.src_dict.string(tokens, bpe_symbol=self.remove_bpe)

    def encode_source(self, line: str) -> torch.Tensor:
        """A source sentence as token ids (eos appended). Here the line must already be segmented as the data
        (e.g. BPE'd with the codes the binarized data were made with); the modules that segment raw text
        themselves (:class:`ParallelTextDataModule`, :class:`NumbersDataModule`) override this."""
        if not isinstance(line, str):
            raise ZooError(f"encode_source takes one sentence (a str), got {type(line).__name__}")
        return torch.as_tensor(self.src_dict.encode_line(line))

    def encode_sources(self, lines: Sequence[str]) -> torch.Tensor:
        """Sentences as a padded batch of source ids (B, S), padded as the loaders pad (``left_pad_source``): the
        input of ``model.translate``; :meth:`decode_target` turns its outputs back into text."""
        if isinstance(lines, str) or not len(lines):
            raise ZooError("encode_sources takes a non-empty list of sentences; for one sentence use "
                           "encode_sources([sentence])")
        return _merge([self.encode_source(line) for line in lines], self.src_dict.pad_index, self.left_pad_source)

    # ---------------------------------------------------------------- loaders
    def _add_split(self, name: str, dataset: LanguagePairDataset) -> None:
        dropped = dataset.filter_by_size(self.max_source_positions, self.max_target_positions)
        if dropped:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"zoo: {dropped} {name} examples longer than max_source_positions="
                           f"{self.max_source_positions} / max_target_positions={self.max_target_positions} dropped")
        self.dropped[name] = dropped
        self.datasets[name] = dataset

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        if split not in self.datasets:
            raise ZooError(f"{type(self).__name__} has no {split!r} split")
        ds = self.datasets[split]
        # training: the same number of batches on every process (DDP); evaluation: every example once
        sampler = TokenBatchSampler(ds.src_sizes, ds.tgt_sizes, self.max_tokens, self.max_sentences, shuffle=shuffle,
                                    seed=self.seed, required_batch_size_multiple=self.required_batch_size_multiple,
                                    even_batches=split == "train")
        collate_fn = partial(collate, pad=self.src_dict.pad_index, eos=self.tgt_dict.eos_index,
                             left_pad_source=self.left_pad_source, left_pad_target=self.left_pad_target)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split (sources and references; ``predict_step`` uses the sources)."""
        return self._loader("test", shuffle=False)


class FairseqBinarizedDataModule(TranslationDataModule):
    """``fairseq-preprocess`` output: ``data_dir/dict.{lang}.txt`` and ``{split}.{src}-{tgt}.{lang}.bin/.idx``.

    Nothing is read at construction (so a recipe parses without the data); :meth:`setup` reads the dictionaries and
    the splits (``{split}``, then ``{split}1``, ``{split}2``... concatenated as fairseq's ``combine``; the file
    pair ``{split}.{tgt}-{src}`` is read when ``{split}.{src}-{tgt}`` is absent, as fairseq does).

    Args:
        data_dir: the ``--destdir`` of ``fairseq-preprocess``.
        source_lang, target_lang: e.g. ``"de"``, ``"en"``.
        train_subset, valid_subset, test_subset: split names (a missing test split is allowed).
        remove_bpe: post-processing of decoded text for BLEU (``"@@ "`` for subword-nmt BPE, fairseq's
            ``--eval-bleu-remove-bpe``).
        Other arguments: :class:`TranslationDataModule`.
    """

    def __init__(self, data_dir: str, source_lang: str = "de", target_lang: str = "en", max_tokens: int | None = 4096,
                 max_sentences: int | None = None, left_pad_source: bool = True, left_pad_target: bool = False,
                 max_source_positions: int = 1024, max_target_positions: int = 1024,
                 required_batch_size_multiple: int = 8, seed: int = 1, num_workers: int = 0,
                 remove_bpe: str | None = "@@ ", train_subset: str = "train", valid_subset: str = "valid",
                 test_subset: str = "test") -> None:
        super().__init__(max_tokens=max_tokens, max_sentences=max_sentences, left_pad_source=left_pad_source,
                         left_pad_target=left_pad_target, max_source_positions=max_source_positions,
                         max_target_positions=max_target_positions,
                         required_batch_size_multiple=required_batch_size_multiple, seed=seed,
                         num_workers=num_workers, remove_bpe=remove_bpe)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        self.source_lang, self.target_lang = source_lang, target_lang
        self.subsets = {"train": train_subset, "valid": valid_subset, "test": test_subset}

    def setup_dictionaries(self) -> None:
        if not self.data_dir.is_dir():
            raise ZooError(f"data_dir {self.data_dir} does not exist: give the --destdir of fairseq-preprocess")
        self._src_dict = Dictionary.load(self.data_dir / f"dict.{self.source_lang}.txt")
        self._tgt_dict = Dictionary.load(self.data_dir / f"dict.{self.target_lang}.txt")

    def _prefix(self, split: str, lang: str) -> Path | None:
        src, tgt = self.source_lang, self.target_lang
        for pair in (f"{src}-{tgt}", f"{tgt}-{src}"):
            p = self.data_dir / f"{split}.{pair}.{lang}"
            if Path(str(p) + ".idx").is_file():
                return p
        return None

    def _read_split(self, name: str) -> LanguagePairDataset | None:
        split = self.subsets[name]
        srcs: list[MMapIndexedDataset] = []
        tgts: list[MMapIndexedDataset] = []
        for k in range(10**6):
            part = split if k == 0 else f"{split}{k}"
            ps, pt = self._prefix(part, self.source_lang), self._prefix(part, self.target_lang)
            if ps is None or pt is None:
                if k == 0:
                    return None
                break
            s, t = MMapIndexedDataset(ps), MMapIndexedDataset(pt)
            if len(s) != len(t):
                raise ZooError(f"{ps} and {pt} hold {len(s)} and {len(t)} sentences: binarize the pair again")
            srcs.append(s)
            tgts.append(t)
        src_items = _Concat(srcs)
        tgt_items = _Concat(tgts)
        src_sizes = np.concatenate([s.sizes for s in srcs]).astype(np.int64)
        tgt_sizes = np.concatenate([t.sizes for t in tgts]).astype(np.int64)
        for d, ds_list, lang in ((self.src_dict, srcs, self.source_lang), (self.tgt_dict, tgts, self.target_lang)):
            top = max(ds.max_id() for ds in ds_list)
            if top >= len(d):
                raise ZooError(f"split {split!r} ({lang}) holds token id {top} but dict.{lang}.txt has {len(d)} "
                               "symbols: the binarized files and the dictionary come from different runs")
        return LanguagePairDataset(src_items, tgt_items, src_sizes, tgt_sizes)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.setup_dictionaries()
        for name in ("train", "valid", "test"):
            ds = self._read_split(name)
            if ds is None:
                if name in ("train", "valid") and stage in (None, "fit"):
                    raise ZooError(f"no {self.subsets[name]}.{self.source_lang}-{self.target_lang}.*.bin/.idx in "
                                   f"{self.data_dir}: run fairseq-preprocess with --{name}pref")
                continue
            self._add_split(name, ds)


class _Concat(Sequence):
    """Concatenation of indexed datasets (sequence access by global index)."""

    def __init__(self, parts: Sequence[MMapIndexedDataset]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k][i - int(self.offsets[k])]


TOKENIZERS = ("auto", "bpe", "sentencepiece", "word")


class ParallelTextDataModule(TranslationDataModule):
    """Raw parallel text: ``train=(source_file, target_file)``, ``valid=(...)``, optional ``test=(...)``, one
    whitespace-tokenised sentence a line (pre-tokenise with Moses or similar first if needed).

    Tokenizer (``tokenizer``): ``"sentencepiece"`` (needs the package; trained in memory on the training text with
    ``vocab_size`` pieces, joint over both sides when ``joint_tokenizer``), ``"bpe"`` (built-in
    :class:`BPETokenizer` with ``bpe_merges`` merges, subword-nmt's ``@@`` markers), ``"word"`` (the tokens as
    they are), or ``"auto"``: sentencepiece when importable, else ``"bpe"``. Dictionaries are built from the
    tokenised training text like ``fairseq-preprocess`` (``threshold`` 0, ``padding_factor`` 8; one joined
    dictionary with ``joined_dictionary``, needed by ``share_all_embeddings``).
    """

    def __init__(self, train: tuple[str, str], valid: tuple[str, str], test: tuple[str, str] | None = None,
                 tokenizer: str = "auto", bpe_merges: int = 10000, vocab_size: int = 8000,
                 joint_tokenizer: bool = True, joined_dictionary: bool = False, max_tokens: int | None = 4096,
                 max_sentences: int | None = None, left_pad_source: bool = True, left_pad_target: bool = False,
                 max_source_positions: int = 1024, max_target_positions: int = 1024,
                 required_batch_size_multiple: int = 8, seed: int = 1, num_workers: int = 0) -> None:
        if tokenizer not in TOKENIZERS:
            raise ZooError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
        if tokenizer == "auto":
            try:
                import sentencepiece  # noqa: F401

                kind = "sentencepiece"
            except ImportError:
                kind = "bpe"
        else:
            kind = tokenizer
        if kind == "sentencepiece":
            try:
                import sentencepiece  # noqa: F401, F811
            except ImportError:
                raise ZooError("tokenizer='sentencepiece' needs the sentencepiece package (pip install "
                               "sentencepiece); or use tokenizer='bpe', the built-in BPE") from None
        remove = {"sentencepiece": "sentencepiece", "bpe": "@@ ", "word": None}[kind]
        super().__init__(max_tokens=max_tokens, max_sentences=max_sentences, left_pad_source=left_pad_source,
                         left_pad_target=left_pad_target, max_source_positions=max_source_positions,
                         max_target_positions=max_target_positions,
                         required_batch_size_multiple=required_batch_size_multiple, seed=seed,
                         num_workers=num_workers, remove_bpe=remove)
        self.save_hyperparameters()
        self.files = {"train": tuple(train), "valid": tuple(valid), **({"test": tuple(test)} if test else {})}
        for name, pair in self.files.items():
            if len(pair) != 2:
                raise ZooError(f"{name} must be a (source_file, target_file) pair, got {pair!r}")
        self.tokenizer_kind = kind
        self.bpe_merges, self.vocab_size = int(bpe_merges), int(vocab_size)
        self.joint_tokenizer, self.joined_dictionary = bool(joint_tokenizer), bool(joined_dictionary)
        self.tokenizers: tuple[Any, Any] | None = None

    @staticmethod
    def _read_lines(path: str) -> list[str]:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ZooError(f"text file {p} does not exist")
        with open(p, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]

    def _make_tokenizer(self, lines: Sequence[str]) -> Any:
        if self.tokenizer_kind == "word":
            return _WordTokenizer()
        if self.tokenizer_kind == "bpe":
            return BPETokenizer.train(lines, self.bpe_merges)
        return _SentencePieceTokenizer(lines, self.vocab_size)

    def setup_dictionaries(self) -> None:
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        text = {name: (self._read_lines(s), self._read_lines(t)) for name, (s, t) in self.files.items()}
        for name, (s, t) in text.items():
            if len(s) != len(t):
                raise ZooError(f"{self.files[name][0]} and {self.files[name][1]} hold {len(s)} and {len(t)} lines: "
                               "parallel files need one sentence per line on both sides")
        src_train, tgt_train = text["train"]
        if self.joint_tokenizer:
            tok = self._make_tokenizer(list(src_train) + list(tgt_train))
            self.tokenizers = (tok, tok)
        else:
            self.tokenizers = (self._make_tokenizer(src_train), self._make_tokenizer(tgt_train))
        tokenised = {name: ([self.tokenizers[0].encode(x) for x in s], [self.tokenizers[1].encode(y) for y in t])
                     for name, (s, t) in text.items()}
        src_d, tgt_d = Dictionary(), Dictionary()
        if self.joined_dictionary:
            tgt_d = src_d
        for line in tokenised["train"][0]:
            src_d.encode_line(line, add_if_not_exist=True, append_eos=False)
        for line in tokenised["train"][1]:
            tgt_d.encode_line(line, add_if_not_exist=True, append_eos=False)
        src_d.finalize(padding_factor=8)
        if tgt_d is not src_d:
            tgt_d.finalize(padding_factor=8)
        self._src_dict, self._tgt_dict = src_d, tgt_d
        for name, (s, t) in tokenised.items():
            src = [src_d.encode_line(x) for x in s]
            tgt = [tgt_d.encode_line(y) for y in t]
            self._add_split(name, LanguagePairDataset(src, tgt))

    def encode_source(self, line: str) -> torch.Tensor:
        """A raw source sentence as token ids (tokenised as the training text, eos appended)."""
        self.setup()
        assert self.tokenizers is not None
        return torch.as_tensor(self.src_dict.encode_line(self.tokenizers[0].encode(line)))


# ================================================================================================ embedded numbers

# The number words come from num2words (``num2words(n, lang="de")`` / ``lang="en"``); the zoo only segments them.
# German compounds are split into these morphemes by greedy longest match (unambiguous for 0 .. 999999: ``sech`` /
# ``sieb`` occur only before ``zehn``, the tens words are whole morphemes, ``eins`` only at the end).
GERMAN_NUMBER_MORPHEMES = (
    "null", "ein", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sech", "sieben", "sieb", "acht", "neun", "zehn",
    "elf", "zwölf", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig", "neunzig", "und",
    "hundert", "tausend",
)
ENGLISH_NUMBER_TOKENS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty",
    "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "and", ",", "@-@",
)
_MORPHEMES_LONGEST_FIRST = sorted(GERMAN_NUMBER_MORPHEMES, key=len, reverse=True)


def _num2words(n: int, lang: str) -> str:
    if not 0 <= n < 10**6:
        raise ZooError(f"the numbers task covers 0 .. 999999, got {n}")
    try:
        from num2words import num2words
    except ImportError:  # a dependency of zoo; only a broken environment lacks it
        raise ZooError("the embedded numbers task needs the num2words package: pip install num2words") from None
    return num2words(n, lang=lang)


def german_number(n: int) -> str:
    """The German number word of ``n`` (0 <= n < 10^6) as num2words spells it, e.g. 324 ->
    ``dreihundertvierundzwanzig``."""
    return _num2words(n, "de")


def _split_german(word: str) -> list[str] | None:
    """``word`` split into :data:`GERMAN_NUMBER_MORPHEMES` by greedy longest match; None if it does not split."""
    out, i = [], 0
    while i < len(word):
        piece = next((m for m in _MORPHEMES_LONGEST_FIRST if word.startswith(m, i)), None)
        if piece is None:
            return None
        out.append(piece)
        i += len(piece)
    return out


def german_number_tokens(n: int) -> list[str]:
    """:func:`german_number` split into morphemes (:data:`GERMAN_NUMBER_MORPHEMES`, greedy longest match), e.g.
    324 -> ``drei hundert vier und zwanzig``; ``"".join`` of the result is the word."""
    word = german_number(n)
    out = _split_german(word)
    if out is None:
        raise ZooError(f"num2words spelled {n} as {word!r}, which does not split into the German number "
                       "morphemes: this num2words version spells differently; install num2words>=0.5.13")
    return out


def english_number(n: int) -> str:
    """English number words of ``n`` (0 <= n < 10^6) as num2words spells them, e.g. 324512 -> ``three hundred and
    twenty-four thousand, five hundred and twelve``."""
    return _num2words(n, "en")


def english_number_tokens(n: int) -> list[str]:
    """:func:`english_number` as tokens, hyphens and commas split off Moses-style (``twenty @-@ four``, ``,``)."""
    words = english_number(n).replace(",", " , ").replace("-", " @-@ ").split()
    unknown = [w for w in words if w not in ENGLISH_NUMBER_TOKENS]
    if unknown:
        raise ZooError(f"num2words spelled {n} as {english_number(n)!r} with words outside the numbers task's "
                       f"vocabulary ({unknown}): install num2words>=0.5.13")
    return words


def _english_detokenize(line: str) -> str:
    """Inverse of :func:`english_number_tokens`' splitting: ``twenty @-@ four thousand , five`` -> ``twenty-four
    thousand, five``."""
    return line.replace(" @-@ ", "-").replace(" ,", ",")


def _with_markers(parts: Sequence[str]) -> str:
    """Sub-words with subword-nmt's markers: ``drei@@ hundert@@ vier@@ und@@ zwanzig``."""
    return " ".join([p + "@@" for p in parts[:-1]] + [parts[-1]])


def _german_source(n: int) -> str:
    """The German word of ``n`` as the model's source text (sub-words with ``@@`` markers)."""
    return _with_markers(german_number_tokens(n))


# ASCII spellings of the German letters (Swiss "ss" only occurs in dreißig among the morphemes)
_ASCII_GERMAN = (("ue", "ü"), ("oe", "ö"), ("dreissig", "dreißig"))


def german_source_text(text: str | int) -> str:
    """The model's source text of a German number word: ``"dreihundertvierundzwanzig"`` -> ``drei@@ hundert@@
    vier@@ und@@ zwanzig`` (case, spaces and hyphens inside the word ignored; ``ue`` / ``oe`` / ``ss`` read as
    ü / ö / ß); an int is spelled by num2words first. One ZooError for a text that is not a German number word."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ZooError(f"a German number word (str) or a number (int) is needed, got {type(text).__name__}")
    if isinstance(text, int):
        return _german_source(text)
    word = "".join(text.lower().replace("-", " ").split())
    for ascii_form, letter in _ASCII_GERMAN:
        word = word.replace(ascii_form, letter)
    if not word:
        raise ZooError("an empty text is not a German number word: give e.g. 'dreihundertvierundzwanzig'")
    if word.isdigit():
        raise ZooError(f"{text!r} is written in digits: give the German word (e.g. german_number({int(word)}) = "
                       f"{german_number(int(word)) if int(word) < 10**6 else '...'!r}) or the int {int(word)}")
    parts = _split_german(word)
    if parts is None:
        raise ZooError(f"{text!r} is not a German number word of the numbers task: it does not split into its "
                       f"morphemes ({', '.join(GERMAN_NUMBER_MORPHEMES)}); give a number below one million as "
                       "num2words spells it, e.g. 'dreihundertvierundzwanzig'")
    return _with_markers(parts)


def numbers_dictionaries() -> tuple[Dictionary, Dictionary]:
    """The fixed source (German sub-words) and target (English words) dictionaries of the numbers task: every
    symbol that can occur, in a fixed order, padded to a multiple of 8 (so their sizes never change)."""
    src, tgt = Dictionary(), Dictionary()
    for t in GERMAN_NUMBER_MORPHEMES:
        src.add_symbol(t + "@@", n=0)
        src.add_symbol(t, n=0)
    for w in ENGLISH_NUMBER_TOKENS:
        tgt.add_symbol(w, n=0)
    src.pad_to_multiple_(8)
    tgt.pad_to_multiple_(8)
    return src, tgt


NUMBERS_SRC_VOCAB_SIZE, NUMBERS_TGT_VOCAB_SIZE = (len(d) for d in numbers_dictionaries())


def number_digits(numbers: np.ndarray | Sequence[int]) -> np.ndarray:
    """Digits of each non-negative number (0 has one): the numbers task's length classes."""
    n = np.asarray(numbers, dtype=np.int64)
    return np.searchsorted(10 ** np.arange(1, 19, dtype=np.int64), n, side="right") + 1  # integers, no log10


def _spread(total: int, capacities: Sequence[int]) -> list[int]:
    """``total`` items spread as evenly as possible over bins holding at most ``capacities`` each (water-filling:
    what a full bin cannot take goes to the others; the first bins take the remainders)."""
    quota, left, open_bins = [0] * len(capacities), total, list(range(len(capacities)))
    while left > 0 and open_bins:
        share, extra = divmod(left, len(open_bins))
        for k, b in enumerate(list(open_bins)):
            take = min(share + (1 if k < extra else 0), capacities[b] - quota[b])
            quota[b] += take
            left -= take
            if quota[b] == capacities[b]:
                open_bins.remove(b)
        if share == 0 and extra == 0:
            break
    return quota


class NumbersDataModule(TranslationDataModule):
    """The embedded translation task: German number words (as sub-words) to English number words. No files, no
    network; the splits are drawn with ``seed``.

    Both sides are spelled by the num2words package. Example: source ``drei@@ hundert@@ vier@@ und@@ zwanzig@@
    tausend@@ fünf@@ hundert@@ zwölf`` (num2words' dreihundertvierundzwanzigtausendfünfhundertzwölf split into
    morphemes with subword-nmt's ``@@`` markers), target ``three hundred and twenty @-@ four thousand , five
    hundred and twelve`` (num2words' "three hundred and twenty-four thousand, five hundred and twelve" with hyphens
    and commas split off Moses-style; :meth:`decode_target` joins them back). The model must learn the vocabulary,
    the German order of units before tens (``vier und zwanzig`` -> ``twenty @-@ four``) and where English puts
    ``and`` and commas, which German does not mark. :meth:`encode_source` turns a German word (``"acht"``,
    ``"dreihundertvierundzwanzig"``) into the model's input.

    Sampling, by length (the number of digits d = 1 .. digits(max_number)), so that every length is equally
    represented in training however few numbers it holds:

    - valid and test: ``valid_size`` / ``test_size`` distinct numbers each, spread evenly over the lengths (a
      length holding fewer numbers than its share gives all of them, the others take the rest), uniform within a
      length;
    - train: ``train_size`` draws, the length uniform, then a number of that length (with replacement: the ten
      1-digit numbers are a sixth of the draws below 10^6, as the 900000 6-digit ones); within a length half the
      draws are uniform and half have each digit after the first 0 with probability 1/2, so that round numbers
      (``einhundert``, ``zwanzigtausendfünf``) and the ``and`` English puts in them are frequent (uniform draws
      hold 9 round hundreds in 900 three-digit numbers);
    - held out: the valid and test numbers of a length never occur in training, nor in each other, when together
      they take at most a quarter of the length's numbers. Shorter lengths (by default 1 and 2 digits: 100
      numbers) are closed classes, all of whose numbers training must see (``null`` -> ``zero`` occurs in no
      other number): there valid and test measure the learned words, drawn from the whole length.

    Batches carry ``length`` (the digits), by which the task reports exact-match accuracy (``val_exact_len{d}``).
    The dictionaries are fixed (:func:`numbers_dictionaries`: ``NUMBERS_SRC_VOCAB_SIZE`` /
    ``NUMBERS_TGT_VOCAB_SIZE`` symbols).

    Args:
        train_size, valid_size, test_size: sentence pairs per split (valid / test: at most the numbers of
            0 .. max_number).
        max_number: the largest number (< 10^6).
        seed: seed of the draw (the batch shuffles use it too).
        Other arguments: :class:`TranslationDataModule` (``max_tokens`` default 2048).
    """

    def __init__(self, train_size: int = 20000, valid_size: int = 400, test_size: int = 400,
                 max_number: int = 999_999, seed: int = 0, max_tokens: int | None = 2048,
                 max_sentences: int | None = None, left_pad_source: bool = True, left_pad_target: bool = False,
                 required_batch_size_multiple: int = 8, num_workers: int = 0) -> None:
        super().__init__(max_tokens=max_tokens, max_sentences=max_sentences, left_pad_source=left_pad_source,
                         left_pad_target=left_pad_target, required_batch_size_multiple=required_batch_size_multiple,
                         seed=seed, num_workers=num_workers, remove_bpe="@@ ")
        if isinstance(max_number, bool) or int(max_number) != max_number or not 0 < max_number < 10**6:
            raise ZooError(f"max_number must be an integer in 1 .. 999999, got {max_number!r}")
        sizes = (train_size, valid_size, test_size)
        if any(isinstance(x, bool) or int(x) != x or x < 1 for x in sizes):
            raise ZooError(f"train_size, valid_size and test_size must be positive integers, got {sizes}")
        for name, size in (("valid_size", valid_size), ("test_size", test_size)):
            if size > max_number + 1:
                raise ZooError(f"{name}={size} distinct numbers requested but 0 .. {max_number} holds "
                               f"{max_number + 1}: lower {name} or raise max_number")
        self.save_hyperparameters()
        self.train_size, self.valid_size, self.test_size = int(train_size), int(valid_size), int(test_size)
        self.max_number = int(max_number)
        self.numbers: dict[str, np.ndarray] = {}

    def setup_dictionaries(self) -> None:
        self._src_dict, self._tgt_dict = numbers_dictionaries()

    def length_ranges(self) -> list[tuple[int, int]]:
        """(lowest, highest) number of each length d = 1 .. digits(max_number)."""
        return [(0 if d == 1 else 10 ** (d - 1), min(10**d - 1, self.max_number))
                for d in range(1, len(str(self.max_number)) + 1)]

    @staticmethod
    def _of_length(rng: np.random.Generator, lo: int, hi: int, size: int) -> np.ndarray:
        """``size`` numbers in lo .. hi (one length): half uniform, half with each digit after the first 0 with
        probability 1/2 (else 1 .. 9), so that round numbers (100, 2000, 30005) and the ``and`` English puts
        after hundred / thousand are frequent: uniform draws hold one round hundred in a hundred."""
        digits = len(str(hi))
        out = np.zeros(size, dtype=np.int64)
        todo = np.arange(size)
        while len(todo):  # above hi (max_number cuts the longest length): drawn again
            n = len(todo)
            draw = lo + rng.integers(0, hi - lo + 1, size=n)
            if digits > 1:
                later = np.where(rng.random((n, digits - 1)) < 0.5, 0, rng.integers(1, 10, size=(n, digits - 1)))
                sparse = rng.integers(1, 10, size=n) * 10 ** (digits - 1) + later @ 10 ** np.arange(digits - 2, -1, -1)
                draw = np.where(rng.random(n) < 0.5, draw, sparse)
            out[todo] = draw
            todo = todo[draw > hi]
        return out

    def _draw(self) -> dict[str, np.ndarray]:
        """The numbers of each split (see the class docstring)."""
        rng = np.random.default_rng(self.seed)
        ranges = self.length_ranges()
        counts = [hi - lo + 1 for lo, hi in ranges]
        quotas = {name: _spread(size, counts) for name, size in (("valid", self.valid_size),
                                                                  ("test", self.test_size))}
        held: list[np.ndarray] = []
        splits: dict[str, list[np.ndarray]] = {"valid": [], "test": [], "train": []}
        for k, (lo, count) in enumerate(zip((lo for lo, _ in ranges), counts)):
            qv, qt = quotas["valid"][k], quotas["test"][k]
            if 4 * (qv + qt) <= count:  # held out: valid, test and training disjoint
                # uniform: a draw weighted to round numbers would hold out most of them (all 9 round hundreds)
                picked = lo + rng.choice(count, size=qv + qt, replace=False)
                splits["valid"].append(picked[:qv])
                splits["test"].append(picked[qv:])
                held.append(picked)
            else:  # a closed class: training sees every number of it
                splits["valid"].append(lo + rng.choice(count, size=qv, replace=False))
                splits["test"].append(lo + rng.choice(count, size=qt, replace=False))
                held.append(np.zeros(0, dtype=np.int64))
        lengths = rng.integers(0, len(ranges), size=self.train_size)
        train = np.zeros(self.train_size, dtype=np.int64)
        for k, (lo, hi) in enumerate(ranges):
            todo = np.flatnonzero(lengths == k)
            while len(todo):  # rejection of held-out numbers (they are at most a quarter of the length)
                draw = self._of_length(rng, lo, hi, len(todo))
                train[todo] = draw
                todo = todo[np.isin(draw, held[k])]
        splits["train"].append(train)
        return {name: np.concatenate(parts).astype(np.int64) for name, parts in splits.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.setup_dictionaries()
        encoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # training repeats numbers: spell each once
        for name, values in self._draw().items():
            self.numbers[name] = values
            for n in set(values.tolist()) - encoded.keys():
                encoded[n] = (self.src_dict.encode_line(_german_source(n)),
                              self.tgt_dict.encode_line(english_number_tokens(n)))
            src = [encoded[n][0] for n in values.tolist()]
            tgt = [encoded[n][1] for n in values.tolist()]
            self._add_split(name, LanguagePairDataset(src, tgt, lengths=number_digits(values)))

    def pairs(self, split: str = "valid") -> list[tuple[str, str]]:
        """The (German word, English words) pairs of a split, as num2words spells them."""
        self.setup()
        return [(german_number(int(n)), english_number(int(n))) for n in self.numbers[split]]

    def encode_source(self, line: str | int) -> torch.Tensor:
        """A German number word as the model's source ids (eos appended): ``"acht"``, ``"Dreihundert vierund-
        zwanzig"`` (case, spaces, hyphens ignored) -> the ids of ``drei@@ hundert@@ vier@@ und@@ zwanzig``; an int
        is spelled by num2words first. One ZooError for a text that is not a German number word."""
        return torch.as_tensor(self.src_dict.encode_line(german_source_text(line)))

    def decode_target(self, tokens: torch.Tensor | Sequence[int], escape_unk: bool = False) -> str:
        """Target ids as English text as num2words writes it (``twenty-four thousand, five``)."""
        return _english_detokenize(super().decode_target(tokens, escape_unk=escape_unk))
