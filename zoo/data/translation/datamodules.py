"""The translation data modules: the shared base :class:`TranslationDataModule` (dictionaries, token-batched
loaders, fairseq's collate), :class:`FairseqBinarizedDataModule` (``fairseq-preprocess`` output) and
:class:`ParallelTextDataModule` (raw parallel text, segmented and binarized in memory)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from zoo.data.base import TrainingLoader
from zoo.data.translation.batching import TokenBatchSampler
from zoo.data.translation.dataset import LanguagePairDataset, _merge, collate
from zoo.data.translation.dictionary import Dictionary
from zoo.data.translation.indexed import MMapIndexedDataset
from zoo.data.translation.tokenizers import BPETokenizer, _SentencePieceTokenizer, _WordTokenizer
from zoo.errors import ZooError

__all__ = ["FairseqBinarizedDataModule", "ParallelTextDataModule", "TranslationDataModule"]


class TranslationDataModule(pl.LightningDataModule):
    """Base of the translation data modules: dictionaries, length-bucketed token batches, fairseq's collate.

    Subclasses fill ``self.datasets`` (``{"train", "valid", "test"}`` -> :class:`LanguagePairDataset`) and the
    dictionaries in :meth:`setup`. ``src_dict`` / ``tgt_dict`` set up the module on first access; the model
    checks its vocabulary sizes against them (``len(dm.src_dict)``), and decodes hypotheses with
    :meth:`decode_target` for BLEU.

    Args:
        max_tokens: tokens per batch (``batch size x longest example``).
        max_sentences: sentences per batch (None: no limit).
        left_pad_source: whether sources are padded on the left (fairseq's default True). The model gives the same
            results for the valid tokens either way (its positions count valid tokens only).
        left_pad_target: whether targets are padded on the left (fairseq's default False).
        max_source_positions: examples with a longer source are dropped (as the model cannot embed them).
        max_target_positions: examples with a longer target are dropped.
        required_batch_size_multiple: batch sizes cut to multiples of this (fairseq's 8).
        seed: seed of the example shuffle and of the epoch-wise batch shuffles.
        num_workers: DataLoader workers.
        remove_bpe: post-processing of decoded targets (``"@@ "``, ``"sentencepiece"`` or None).
    """

    def __init__(
        self,
        max_tokens: int | None = 4096,
        max_sentences: int | None = None,
        left_pad_source: bool = True,
        left_pad_target: bool = False,
        max_source_positions: int = 1024,
        max_target_positions: int = 1024,
        required_batch_size_multiple: int = 8,
        seed: int = 1,
        num_workers: int = 0,
        remove_bpe: str | None = None,
    ) -> None:
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
            raise ZooError(
                "encode_sources takes a non-empty list of sentences; for one sentence use encode_sources([sentence])"
            )
        return _merge([self.encode_source(line) for line in lines], self.src_dict.pad_index, self.left_pad_source)

    # ---------------------------------------------------------------- loaders
    def _add_split(self, name: str, dataset: LanguagePairDataset) -> None:
        dropped = dataset.filter_by_size(self.max_source_positions, self.max_target_positions)
        if dropped:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"zoo: {dropped} {name} examples longer than max_source_positions="
                f"{self.max_source_positions} / max_target_positions={self.max_target_positions} dropped"
            )
        self.dropped[name] = dropped
        self.datasets[name] = dataset

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        if split not in self.datasets:
            raise ZooError(f"{type(self).__name__} has no {split!r} split")
        ds = self.datasets[split]
        # training: the same number of batches on every process (DDP); evaluation: every example once
        sampler = TokenBatchSampler(
            ds.src_sizes,
            ds.tgt_sizes,
            self.max_tokens,
            self.max_sentences,
            shuffle=shuffle,
            seed=self.seed,
            required_batch_size_multiple=self.required_batch_size_multiple,
            even_batches=split == "train",
        )
        collate_fn = partial(
            collate,
            pad=self.src_dict.pad_index,
            eos=self.tgt_dict.eos_index,
            left_pad_source=self.left_pad_source,
            left_pad_target=self.left_pad_target,
        )
        # training: the epoch's order fixed at its first batch, resumable mid-epoch (zoo.data.base.TrainingLoader);
        # every loader seeds its workers from a generator of its own, not from torch's global one
        return (TrainingLoader if shuffle else DataLoader)(
            ds,
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

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
        source_lang: the source language code, e.g. ``"de"``.
        target_lang: the target language code, e.g. ``"en"``.
        train_subset: the training split's name.
        valid_subset: the validation split's name.
        test_subset: the test split's name (a missing test split is allowed).
        remove_bpe: post-processing of decoded text for BLEU (``"@@ "`` for subword-nmt BPE, fairseq's
            ``--eval-bleu-remove-bpe``).
        max_tokens: tokens per batch (``batch size x longest example``); None for no limit (one of
            ``max_tokens`` / ``max_sentences`` must be given).
        max_sentences: sentences per batch (None: no limit).
        left_pad_source: whether sources are padded on the left (fairseq's default True).
        left_pad_target: whether targets are padded on the left (fairseq's default False).
        max_source_positions: examples with a longer source are dropped (as the model cannot embed them).
        max_target_positions: examples with a longer target are dropped.
        required_batch_size_multiple: batch sizes cut to multiples of this (fairseq's 8).
        seed: seed of the example shuffle and of the epoch-wise batch shuffles.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        data_dir: str,
        source_lang: str = "de",
        target_lang: str = "en",
        max_tokens: int | None = 4096,
        max_sentences: int | None = None,
        left_pad_source: bool = True,
        left_pad_target: bool = False,
        max_source_positions: int = 1024,
        max_target_positions: int = 1024,
        required_batch_size_multiple: int = 8,
        seed: int = 1,
        num_workers: int = 0,
        remove_bpe: str | None = "@@ ",
        train_subset: str = "train",
        valid_subset: str = "valid",
        test_subset: str = "test",
    ) -> None:
        super().__init__(
            max_tokens=max_tokens,
            max_sentences=max_sentences,
            left_pad_source=left_pad_source,
            left_pad_target=left_pad_target,
            max_source_positions=max_source_positions,
            max_target_positions=max_target_positions,
            required_batch_size_multiple=required_batch_size_multiple,
            seed=seed,
            num_workers=num_workers,
            remove_bpe=remove_bpe,
        )
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
                raise ZooError(
                    f"split {split!r} ({lang}) holds token id {top} but dict.{lang}.txt has {len(d)} "
                    "symbols: the binarized files and the dictionary come from different runs"
                )
        return LanguagePairDataset(src_items, tgt_items, src_sizes, tgt_sizes)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.setup_dictionaries()
        for name in ("train", "valid", "test"):
            ds = self._read_split(name)
            if ds is None:
                if name in ("train", "valid") and stage in (None, "fit"):
                    raise ZooError(
                        f"no {self.subsets[name]}.{self.source_lang}-{self.target_lang}.*.bin/.idx in "
                        f"{self.data_dir}: run fairseq-preprocess with --{name}pref"
                    )
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

    Args:
        train: the (source file, target file) of the training split.
        valid: the (source file, target file) of the validation split.
        test: the (source file, target file) of the test split; None for none.
        tokenizer: ``"auto"``, ``"bpe"``, ``"sentencepiece"`` or ``"word"`` (above).
        bpe_merges: the number of merges of the built-in BPE.
        vocab_size: the number of sentencepiece pieces.
        joint_tokenizer: whether one tokenizer is trained on both sides (else one per side).
        joined_dictionary: whether both sides share one dictionary.
        max_tokens: tokens per batch (``batch size x longest example``); None for no limit (one of
            ``max_tokens`` / ``max_sentences`` must be given).
        max_sentences: sentences per batch (None: no limit).
        left_pad_source: whether sources are padded on the left (fairseq's default True).
        left_pad_target: whether targets are padded on the left (fairseq's default False).
        max_source_positions: examples with a longer source are dropped (as the model cannot embed them).
        max_target_positions: examples with a longer target are dropped.
        required_batch_size_multiple: batch sizes cut to multiples of this (fairseq's 8).
        seed: seed of the example shuffle and of the epoch-wise batch shuffles.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        train: tuple[str, str],
        valid: tuple[str, str],
        test: tuple[str, str] | None = None,
        tokenizer: str = "auto",
        bpe_merges: int = 10000,
        vocab_size: int = 8000,
        joint_tokenizer: bool = True,
        joined_dictionary: bool = False,
        max_tokens: int | None = 4096,
        max_sentences: int | None = None,
        left_pad_source: bool = True,
        left_pad_target: bool = False,
        max_source_positions: int = 1024,
        max_target_positions: int = 1024,
        required_batch_size_multiple: int = 8,
        seed: int = 1,
        num_workers: int = 0,
    ) -> None:
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
                raise ZooError(
                    "tokenizer='sentencepiece' needs the sentencepiece package (pip install "
                    "sentencepiece); or use tokenizer='bpe', the built-in BPE"
                ) from None
        remove = {"sentencepiece": "sentencepiece", "bpe": "@@ ", "word": None}[kind]
        super().__init__(
            max_tokens=max_tokens,
            max_sentences=max_sentences,
            left_pad_source=left_pad_source,
            left_pad_target=left_pad_target,
            max_source_positions=max_source_positions,
            max_target_positions=max_target_positions,
            required_batch_size_multiple=required_batch_size_multiple,
            seed=seed,
            num_workers=num_workers,
            remove_bpe=remove,
        )
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
                raise ZooError(
                    f"{self.files[name][0]} and {self.files[name][1]} hold {len(s)} and {len(t)} lines: "
                    "parallel files need one sentence per line on both sides"
                )
        src_train, tgt_train = text["train"]
        if self.joint_tokenizer:
            tok = self._make_tokenizer(list(src_train) + list(tgt_train))
            self.tokenizers = (tok, tok)
        else:
            self.tokenizers = (self._make_tokenizer(src_train), self._make_tokenizer(tgt_train))
        tokenised = {
            name: ([self.tokenizers[0].encode(x) for x in s], [self.tokenizers[1].encode(y) for y in t])
            for name, (s, t) in text.items()
        }
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
