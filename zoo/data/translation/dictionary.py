"""fairseq's ``Dictionary`` (``dict.{lang}.txt`` files, token ids <-> symbols), its special ids (``<s>`` = 0,
``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3) and :func:`post_process`, which undoes sub-word segmentation
(subword-nmt's ``@@`` markers, sentencepiece's ``\u2581``) in decoded text."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from zoo.errors import ZooError

__all__ = ["BOS", "EOS", "PAD", "UNK", "Dictionary", "post_process"]

BOS, PAD, EOS, UNK = 0, 1, 2, 3  # fairseq's Dictionary: <s>, <pad>, </s>, <unk>


class Dictionary:
    """fairseq's ``Dictionary``: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, then symbols in order.

    ``dict.txt`` files hold one ``symbol count`` line per symbol after the 4 specials (a trailing
    ``#fairseq:overwrite`` flag allowed), so ``len(Dictionary.load(f)) == 4 + lines``.

    Args:
        bos: the beginning-of-sentence symbol (index 0).
        pad: the padding symbol (index 1).
        eos: the end-of-sentence symbol (index 2).
        unk: the unknown-word symbol (index 3).
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
        counts = Counter(dict(sorted(zip(self.symbols[self.nspecial :], self.count[self.nspecial :]))))
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
                    raise ZooError(
                        f"{path}, line {lineno}: duplicate symbol {word!r} (add '#fairseq:overwrite' to keep both)"
                    )
                d.add_symbol(word, n=count, overwrite=overwrite)
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write the non-special symbols as ``symbol count`` lines (fairseq's format)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for s, c in zip(self.symbols[self.nspecial :], self.count[self.nspecial :]):
                f.write(f"{s} {c}\n")

    def encode_line(
        self, line: str | Sequence[str], append_eos: bool = True, add_if_not_exist: bool = False
    ) -> np.ndarray:
        """Ids of the whitespace-separated symbols of ``line`` (plus eos), int64."""
        words = line.split() if isinstance(line, str) else list(line)
        ids = [self.add_symbol(w) if add_if_not_exist else self.index(w) for w in words]
        if append_eos:
            ids.append(self.eos_index)
        return np.asarray(ids, dtype=np.int64)

    def string(
        self, tokens: torch.Tensor | Sequence[int], bpe_symbol: str | None = None, escape_unk: bool = False
    ) -> str:
        """Symbols of ``tokens`` joined by spaces, without eos / pad / bos, post-processed by ``bpe_symbol``
        (:func:`post_process`); ``escape_unk`` writes ``<unk>`` as ``<<unk>>`` (fairseq, for references)."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        skip = {self.eos_index, self.pad_index, self.bos_index}
        words = [
            ("<<unk>>" if escape_unk else self.unk_word) if i == self.unk_index else self[i]
            for i in ids
            if i not in skip
        ]
        return post_process(" ".join(words), bpe_symbol)


def post_process(sentence: str, bpe_symbol: str | None) -> str:
    """fairseq's ``post_process`` of a decoded ``sentence`` by ``bpe_symbol``: ``"@@ "`` / ``"subword_nmt"``
    removes subword-nmt continuation markers, ``"sentencepiece"`` joins pieces on ``▁``, another string is removed
    as a marker (with the space after it); None or ``"none"`` leaves the sentence as it is."""
    if not bpe_symbol or bpe_symbol == "none":
        return sentence
    if bpe_symbol in ("sentencepiece", "\u2581"):
        return sentence.replace(" ", "").replace("\u2581", " ").strip()
    marker = "@@ " if bpe_symbol in ("subword_nmt", "@@ ", "@@") else bpe_symbol
    return (sentence + " ").replace(marker, "").rstrip()
