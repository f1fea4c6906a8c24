"""The embedded translation task: German number words (as sub-words) to English number words, spelled by the
num2words package; the morpheme segmentation (:func:`german_number_tokens`, :func:`german_source_text`), the fixed
dictionaries (:func:`numbers_dictionaries`) and :class:`NumbersDataModule`, which draws the splits by length."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from zoo.data.translation.datamodules import TranslationDataModule
from zoo.data.translation.dataset import LanguagePairDataset
from zoo.data.translation.dictionary import Dictionary
from zoo.errors import ZooError

__all__ = [
    "ENGLISH_NUMBER_TOKENS",
    "GERMAN_NUMBER_MORPHEMES",
    "NUMBERS_SRC_VOCAB_SIZE",
    "NUMBERS_TGT_VOCAB_SIZE",
    "NumbersDataModule",
    "english_number",
    "english_number_tokens",
    "german_number",
    "german_number_tokens",
    "german_source_text",
    "number_digits",
    "numbers_dictionaries",
]

# The number words come from num2words (``num2words(n, lang="de")`` / ``lang="en"``); the zoo only segments them.
# German compounds are split into these morphemes by greedy longest match (unambiguous for 0 .. 999999: ``sech`` /
# ``sieb`` occur only before ``zehn``, the tens words are whole morphemes, ``eins`` only at the end).
GERMAN_NUMBER_MORPHEMES = (
    "null",
    "ein",
    "eins",
    "zwei",
    "drei",
    "vier",
    "fünf",
    "sechs",
    "sech",
    "sieben",
    "sieb",
    "acht",
    "neun",
    "zehn",
    "elf",
    "zwölf",
    "zwanzig",
    "dreißig",
    "vierzig",
    "fünfzig",
    "sechzig",
    "siebzig",
    "achtzig",
    "neunzig",
    "und",
    "hundert",
    "tausend",
)
ENGLISH_NUMBER_TOKENS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
    "thirty",
    "forty",
    "fifty",
    "sixty",
    "seventy",
    "eighty",
    "ninety",
    "hundred",
    "thousand",
    "and",
    ",",
    "@-@",
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
    """:func:`german_number` of ``n`` split into morphemes (:data:`GERMAN_NUMBER_MORPHEMES`, greedy longest
    match), e.g. 324 -> ``drei hundert vier und zwanzig``; ``"".join`` of the result is the word."""
    word = german_number(n)
    out = _split_german(word)
    if out is None:
        raise ZooError(
            f"num2words spelled {n} as {word!r}, which does not split into the German number "
            "morphemes: this num2words version spells differently; install num2words>=0.5.13"
        )
    return out


def english_number(n: int) -> str:
    """English number words of ``n`` (0 <= n < 10^6) as num2words spells them, e.g. 324512 -> ``three hundred and
    twenty-four thousand, five hundred and twelve``."""
    return _num2words(n, "en")


def english_number_tokens(n: int) -> list[str]:
    """:func:`english_number` of ``n`` as tokens, hyphens and commas split off Moses-style (``twenty @-@ four``,
    ``,``)."""
    words = english_number(n).replace(",", " , ").replace("-", " @-@ ").split()
    unknown = [w for w in words if w not in ENGLISH_NUMBER_TOKENS]
    if unknown:
        raise ZooError(
            f"num2words spelled {n} as {english_number(n)!r} with words outside the numbers task's "
            f"vocabulary ({unknown}): install num2words>=0.5.13"
        )
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
        raise ZooError(
            f"{text!r} is written in digits: give the German word (e.g. german_number({int(word)}) = "
            f"{german_number(int(word)) if int(word) < 10**6 else '...'!r}) or the int {int(word)}"
        )
    parts = _split_german(word)
    if parts is None:
        raise ZooError(
            f"{text!r} is not a German number word of the numbers task: it does not split into its "
            f"morphemes ({', '.join(GERMAN_NUMBER_MORPHEMES)}); give a number below one million as "
            "num2words spells it, e.g. 'dreihundertvierundzwanzig'"
        )
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
        train_size: sentence pairs drawn for training.
        valid_size: sentence pairs of the valid split (at most the numbers of 0 .. max_number).
        test_size: sentence pairs of the test split (at most the numbers of 0 .. max_number).
        max_number: the largest number (< 10^6).
        seed: seed of the draw (the batch shuffles use it too).
        max_tokens: tokens per batch (``batch size x longest example``); None for no limit (one of
            ``max_tokens`` / ``max_sentences`` must be given).
        max_sentences: sentences per batch (None: no limit).
        left_pad_source: whether sources are padded on the left (fairseq's default True).
        left_pad_target: whether targets are padded on the left (fairseq's default False).
        required_batch_size_multiple: batch sizes cut to multiples of this (fairseq's 8).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        train_size: int = 20000,
        valid_size: int = 400,
        test_size: int = 400,
        max_number: int = 999_999,
        seed: int = 0,
        max_tokens: int | None = 2048,
        max_sentences: int | None = None,
        left_pad_source: bool = True,
        left_pad_target: bool = False,
        required_batch_size_multiple: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            max_tokens=max_tokens,
            max_sentences=max_sentences,
            left_pad_source=left_pad_source,
            left_pad_target=left_pad_target,
            required_batch_size_multiple=required_batch_size_multiple,
            seed=seed,
            num_workers=num_workers,
            remove_bpe="@@ ",
        )
        if isinstance(max_number, bool) or int(max_number) != max_number or not 0 < max_number < 10**6:
            raise ZooError(f"max_number must be an integer in 1 .. 999999, got {max_number!r}")
        sizes = (train_size, valid_size, test_size)
        if any(isinstance(x, bool) or int(x) != x or x < 1 for x in sizes):
            raise ZooError(f"train_size, valid_size and test_size must be positive integers, got {sizes}")
        for name, size in (("valid_size", valid_size), ("test_size", test_size)):
            if size > max_number + 1:
                raise ZooError(
                    f"{name}={size} distinct numbers requested but 0 .. {max_number} holds "
                    f"{max_number + 1}: lower {name} or raise max_number"
                )
        self.save_hyperparameters()
        self.train_size, self.valid_size, self.test_size = int(train_size), int(valid_size), int(test_size)
        self.max_number = int(max_number)
        self.numbers: dict[str, np.ndarray] = {}

    def setup_dictionaries(self) -> None:
        self._src_dict, self._tgt_dict = numbers_dictionaries()

    def length_ranges(self) -> list[tuple[int, int]]:
        """(lowest, highest) number of each length d = 1 .. digits(max_number)."""
        return [
            (0 if d == 1 else 10 ** (d - 1), min(10**d - 1, self.max_number))
            for d in range(1, len(str(self.max_number)) + 1)
        ]

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
        quotas = {name: _spread(size, counts) for name, size in (("valid", self.valid_size), ("test", self.test_size))}
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
                encoded[n] = (
                    self.src_dict.encode_line(_german_source(n)),
                    self.tgt_dict.encode_line(english_number_tokens(n)),
                )
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
