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

The binarized index format: :mod:`zoo.data.translation.indexed`.

Modules (every public name is importable from ``zoo.data.translation`` itself):

- :mod:`~zoo.data.translation.dictionary`: ``Dictionary``, the special ids, ``post_process``;
- :mod:`~zoo.data.translation.indexed`: the ``MMapIndexedDataset`` format, its reader and writers;
- :mod:`~zoo.data.translation.dataset`: ``LanguagePairDataset`` and ``collate``;
- :mod:`~zoo.data.translation.batching`: ``batch_by_size`` and ``TokenBatchSampler``;
- :mod:`~zoo.data.translation.tokenizers`: the BPE trainer ``BPETokenizer``, sentencepiece, words;
- :mod:`~zoo.data.translation.datamodules`: the base ``TranslationDataModule`` and the binarized / raw-text modules;
- :mod:`~zoo.data.translation.numbers`: the embedded numbers task and ``NumbersDataModule``.
"""

from zoo.data.translation.batching import TokenBatchSampler, batch_by_size
from zoo.data.translation.datamodules import TOKENIZERS as TOKENIZERS
from zoo.data.translation.datamodules import (
    FairseqBinarizedDataModule,
    ParallelTextDataModule,
    TranslationDataModule,
)
from zoo.data.translation.dataset import LanguagePairDataset, collate
from zoo.data.translation.dictionary import BOS, EOS, PAD, UNK, Dictionary, post_process
from zoo.data.translation.indexed import MMapIndexedDataset, write_binarized_split, write_mmap_indexed_dataset
from zoo.data.translation.indexed import best_fitting_dtype as best_fitting_dtype
from zoo.data.translation.numbers import (
    ENGLISH_NUMBER_TOKENS,
    GERMAN_NUMBER_MORPHEMES,
    NUMBERS_SRC_VOCAB_SIZE,
    NUMBERS_TGT_VOCAB_SIZE,
    NumbersDataModule,
    english_number,
    english_number_tokens,
    german_number,
    german_number_tokens,
    german_source_text,
    number_digits,
    numbers_dictionaries,
)
from zoo.data.translation.tokenizers import BPETokenizer

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
