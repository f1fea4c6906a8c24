"""Sub-word segmentation of raw text for :class:`~zoo.data.translation.ParallelTextDataModule`: the built-in
byte-pair-encoding trainer :class:`BPETokenizer` (subword-nmt's ``@@`` convention), sentencepiece trained in
memory (when installed), and whitespace words as they are."""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from zoo.data.translation.dictionary import post_process

__all__ = ["BPETokenizer"]


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
            syms = syms[:k] + [syms[k] + syms[k + 1]] + syms[k + 2 :]
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
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            character_coverage=1.0,
            model_type="unigram",
            hard_vocab_limit=False,
        )
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
