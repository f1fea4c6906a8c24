"""Translation data (zoo/data/translation/): fairseq's dictionary and mmap index format (bytes checked against the
format fairseq's indexed_dataset.py writes), token batching, collate, the three data modules. CPU, no network."""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data.translation import (
    ENGLISH_NUMBER_TOKENS,
    EOS,
    GERMAN_NUMBER_MORPHEMES,
    NUMBERS_SRC_VOCAB_SIZE,
    NUMBERS_TGT_VOCAB_SIZE,
    PAD,
    UNK,
    BPETokenizer,
    Dictionary,
    FairseqBinarizedDataModule,
    MMapIndexedDataset,
    NumbersDataModule,
    ParallelTextDataModule,
    TokenBatchSampler,
    batch_by_size,
    collate,
    english_number,
    english_number_tokens,
    german_number,
    german_number_tokens,
    number_digits,
    post_process,
    write_binarized_split,
    write_mmap_indexed_dataset,
)
from zoo.errors import ZooError

# ================================================================================================ dictionary


def test_dictionary_is_fairseqs(tmp_path: Path) -> None:
    d = Dictionary()
    assert (d.bos_index, d.pad_index, d.eos_index, d.unk_index, len(d)) == (0, 1, 2, 3, 4)
    for line in ("b a a", "c a", "b"):
        d.encode_line(line, add_if_not_exist=True)
    d.finalize(padding_factor=8)
    assert d.symbols[4:7] == ["a", "b", "c"] and len(d) == 8 and d.symbols[7] == "madeupword0000"
    d.save(tmp_path / "dict.de.txt")
    assert (tmp_path / "dict.de.txt").read_text().splitlines()[:2] == ["a 3", "b 2"]
    again = Dictionary.load(tmp_path / "dict.de.txt")
    assert again == d and len(again) == 8
    ids = again.encode_line("a zz c")
    assert ids.tolist() == [4, UNK, 6, EOS]
    assert again.string(torch.tensor([4, UNK, 6, EOS, PAD])) == "a <unk> c"
    assert again.string([4, UNK], escape_unk=True) == "a <<unk>>"
    (tmp_path / "bad.txt").write_text("a 3\nnocount\n")
    with pytest.raises(ZooError, match="line 2: expected '<symbol> <count>'"):
        Dictionary.load(tmp_path / "bad.txt")
    (tmp_path / "dup.txt").write_text("a 3\na 2\nb 1 #fairseq:overwrite\n")
    with pytest.raises(ZooError, match="duplicate symbol 'a'"):
        Dictionary.load(tmp_path / "dup.txt")
    (tmp_path / "ow.txt").write_text("a 3\nb 2\nb 1 #fairseq:overwrite\n")
    assert len(Dictionary.load(tmp_path / "ow.txt")) == 7


def test_post_process() -> None:
    assert post_process("drei@@ hundert@@ vier und@@ zwanzig", "@@ ") == "dreihundertvier undzwanzig"
    assert post_process("\u2581the \u2581c at", "sentencepiece") == "the cat"
    assert post_process("a b", None) == "a b"


# ================================================================================================ mmap format


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_mmap_round_trip_and_bytes(tmp_path: Path, dtype: type) -> None:
    seqs = [np.array([5, 6, 7, EOS]), np.array([EOS]), np.array([9, 60000 if dtype is not np.int32 else 123, EOS])]
    write_mmap_indexed_dataset(tmp_path / "train.de-en.de", seqs, dtype=dtype)
    idx = (tmp_path / "train.de-en.de.idx").read_bytes()
    code = {np.uint16: 8, np.int32: 4, np.int64: 5}[dtype]
    # fairseq's MMapIndexedDataset.Index: magic, <Q version 1, <B dtype code, <Q count, int32 sizes, int64 pointers
    assert idx[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQ", idx[9:26]) == (1, code, 3)
    assert np.frombuffer(idx[26:38], dtype=np.int32).tolist() == [4, 1, 3]
    size = np.dtype(dtype).itemsize
    assert np.frombuffer(idx[38:62], dtype=np.int64).tolist() == [0, 4 * size, 5 * size]
    assert len(idx) == 62
    assert (tmp_path / "train.de-en.de.bin").read_bytes() == b"".join(s.astype(dtype).tobytes() for s in seqs)
    ds = MMapIndexedDataset(tmp_path / "train.de-en.de")
    assert len(ds) == 3 and ds.sizes.tolist() == [4, 1, 3] and ds.dtype == np.dtype(dtype)
    for a, b in zip(seqs, [ds[i] for i in range(3)]):
        assert b.dtype == np.int64 and b.tolist() == a.tolist()
    assert ds.max_id() == max(int(s.max()) for s in seqs)
    assert pickle.loads(pickle.dumps(ds))[2].tolist() == seqs[2].tolist()  # DataLoader workers
    with pytest.raises(IndexError):
        ds[3]


def test_mmap_errors(tmp_path: Path) -> None:
    prefix = tmp_path / "valid.de-en.en"
    write_mmap_indexed_dataset(prefix, [[4, 5, EOS], [6, EOS]], vocab_size=100)
    idx = Path(str(prefix) + ".idx")
    data = Path(str(prefix) + ".bin")
    good_idx, good_bin = idx.read_bytes(), data.read_bytes()
    assert good_idx[17] == 8  # uint16 below 65500 symbols, as fairseq's best_fitting_int_dtype
    idx.write_bytes(b"TNTIDX\x00\x00" + good_idx[8:])
    with pytest.raises(ZooError, match="not a fairseq MMapIndexedDataset index"):
        MMapIndexedDataset(prefix)
    idx.write_bytes(good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:])
    with pytest.raises(ZooError, match="index version 2"):
        MMapIndexedDataset(prefix)
    idx.write_bytes(good_idx[:17] + bytes([42]) + good_idx[18:])
    with pytest.raises(ZooError, match="unknown dtype code 42"):
        MMapIndexedDataset(prefix)
    idx.write_bytes(good_idx[:-4])
    with pytest.raises(ZooError, match="idx is truncated"):
        MMapIndexedDataset(prefix)
    idx.write_bytes(good_idx)
    data.write_bytes(good_bin[:-2])
    with pytest.raises(ZooError, match="bin is truncated"):
        MMapIndexedDataset(prefix)
    data.unlink()
    with pytest.raises(ZooError, match="does not exist"):
        MMapIndexedDataset(prefix)
    with pytest.raises(ZooError, match="token id 70000 does not fit uint16"):
        write_mmap_indexed_dataset(tmp_path / "big", [[70000, EOS]], vocab_size=100)


# ================================================================================================ batching


def test_collate_is_fairseqs() -> None:
    samples = [
        {"id": 0, "source": torch.tensor([5, 6, EOS]), "target": torch.tensor([7, EOS])},
        {"id": 1, "source": torch.tensor([8, EOS]), "target": torch.tensor([9, 10, 11, EOS])},
    ]
    b = collate(samples)
    assert b["src_tokens"].tolist() == [[5, 6, EOS], [PAD, 8, EOS]]  # left-padded source
    assert b["target"].tolist() == [[7, EOS, PAD, PAD], [9, 10, 11, EOS]]
    assert b["prev_output_tokens"].tolist() == [[EOS, 7, PAD, PAD], [EOS, 9, 10, 11]]
    assert b["ntokens"] == 6 and b["src_lengths"].tolist() == [3, 2] and b["id"].tolist() == [0, 1]
    right = collate(samples, left_pad_source=False)
    assert right["src_tokens"].tolist() == [[5, 6, EOS], [8, EOS, PAD]]


def test_batch_by_size_is_fairseqs() -> None:
    sizes = np.array([3] * 20 + [10] * 5)
    batches = batch_by_size(range(25), sizes, max_tokens=30, required_batch_size_multiple=8)
    # 10 examples of 3 tokens fit 30 tokens: cut to a multiple of 8, the rest carried over
    assert [len(b) for b in batches] == [8, 8, 4, 3, 2]  # worked by hand through fairseq's algorithm
    assert sorted(i for b in batches for i in b) == list(range(25))
    assert all(len(b) * max(sizes[b]) <= 30 for b in batches)
    assert batch_by_size(range(4), np.array([2, 2, 2, 2]), max_sentences=3) == [[0, 1, 2], [3]]
    with pytest.raises(ZooError, match="more than max_tokens=5"):
        batch_by_size(range(2), np.array([3, 6]), max_tokens=5)


def test_token_batch_sampler_epochs_and_ranks() -> None:
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(2, 30, 200), rng.integers(2, 30, 200)
    sampler = TokenBatchSampler(src, tgt, max_tokens=200, seed=3)
    first = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(200))
    assert all(len(b) * max(max(src[b]), max(tgt[b])) <= 200 for b in first)
    # length-bucketed: within a batch the sizes are close
    assert np.mean([np.ptp(src[b]) for b in first]) < 5
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    _set_sampler_epoch(DataLoader(range(200), batch_sampler=sampler), 1)  # what Lightning calls each epoch
    assert sampler.epoch == 1
    second = list(sampler)
    assert second != first and sorted(map(tuple, second)) == sorted(map(tuple, first))
    assert list(TokenBatchSampler(src, tgt, max_tokens=200, seed=3)) == first  # deterministic
    ranks = [list(TokenBatchSampler(src, tgt, max_tokens=200, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    assert {i for r in ranks for b in r for i in b} == set(range(200))
    ordered = list(TokenBatchSampler(src, tgt, max_tokens=200, shuffle=False))
    assert [i for b in ordered for i in b] == sorted(range(200), key=lambda i: (src[i], tgt[i], i))


def test_token_batch_sampler_takes_lightnings_distributed_sampler() -> None:
    """What Lightning does under DDP with use_distributed_sampler (its default): it rebuilds the batch sampler
    (created in the data module's hook) with its DistributedSampler as ``sampler`` (this raised a TypeError before:
    the sampler was no BatchSampler). Training: the same number of batches on both ranks, every example in some
    batch; evaluation: every example exactly once, on the ranks together."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    dm = NumbersDataModule(train_size=300, valid_size=41, test_size=8, max_number=9999, max_tokens=96)
    dm.setup()
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):  # Lightning's
        loaders = {"train": dm.train_dataloader(), "valid": dm.val_dataloader()}
    single = {k: [b["id"].tolist() for b in v] for k, v in loaders.items()}
    shards: dict[str, list[list[list[int]]]] = {"train": [], "valid": []}
    for rank in range(2):
        for split, stage in (("train", RunningStage.TRAINING), ("valid", RunningStage.VALIDATING)):
            loader = loaders[split]
            sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=split == "train")
            sharded = _update_dataloader(loader, sampler, mode=stage)
            assert isinstance(sharded.batch_sampler, TokenBatchSampler)
            assert (sharded.batch_sampler.num_replicas, sharded.batch_sampler.rank) == (2, rank)
            batches = [b["id"].tolist() for b in sharded]
            assert len(batches) == len(sharded)
            shards[split].append(batches)
    n_train, n_valid = len(dm.datasets["train"]), len(dm.datasets["valid"])
    assert len(shards["train"][0]) == len(shards["train"][1]) == math.ceil(len(single["train"]) / 2)
    assert {i for rank in shards["train"] for b in rank for i in b} == set(range(n_train))
    seen = sorted(i for rank in shards["valid"] for b in rank for i in b)
    assert seen == list(range(n_valid)) and all(len(rank) >= 1 for rank in shards["valid"])
    # a split smaller than the number of processes: repeated so that every process has a batch
    tiny = [
        list(TokenBatchSampler(np.array([3]), np.array([4]), max_tokens=64, num_replicas=3, rank=r, even_batches=False))
        for r in range(3)
    ]
    assert tiny == [[[0]]] * 3
    with pytest.raises(ZooError, match="drop_last must be False"):
        TokenBatchSampler(np.array([3]), None, drop_last=True)


# ======================================================================================= fairseq-preprocess output


def fake_binarized_dir(root: Path, n_train: int = 40, split_train: bool = False, reverse: bool = False) -> Path:
    """A fairseq-preprocess destdir: dict.de.txt, dict.en.txt, {train,valid,test}.de-en.{de,en}.bin/.idx."""
    rng = np.random.default_rng(0)
    de, en = Dictionary(), Dictionary()
    for i in range(20):
        de.add_symbol(f"wort{i}@@" if i % 2 else f"wort{i}", n=100 - i)
        en.add_symbol(f"word{i}", n=100 - i)
    de.pad_to_multiple_(8)
    en.pad_to_multiple_(8)

    def sentences(n: int, d: Dictionary) -> list[np.ndarray]:
        return [np.append(rng.integers(4, 24, rng.integers(1, 12)), EOS) for _ in range(n)]

    pair = ("en", "de") if reverse else ("de", "en")
    parts = {"train": n_train, "valid": 10, "test": 6}
    for split, n in parts.items():
        if split == "train" and split_train:
            write_binarized_split(root, "train", *pair, sentences(n // 2, de), sentences(n // 2, en), de, en)
            write_binarized_split(root, "train1", *pair, sentences(n - n // 2, de), sentences(n - n // 2, en))
        else:
            write_binarized_split(root, split, *pair, sentences(n, de), sentences(n, en), de, en)
    if reverse:  # the dictionaries follow the language, not the pair
        de.save(root / "dict.de.txt")
        en.save(root / "dict.en.txt")
    return root


def test_fairseq_binarized_data_module(tmp_path: Path) -> None:
    dm = FairseqBinarizedDataModule(str(tmp_path / "missing"), "de", "en", max_tokens=64)  # reads nothing yet
    with pytest.raises(ZooError, match="data_dir .*missing does not exist"):
        dm.setup("fit")
    root = fake_binarized_dir(tmp_path / "bin", split_train=True)
    dm = FairseqBinarizedDataModule(str(root), "de", "en", max_tokens=64, required_batch_size_multiple=1)
    dm.setup("fit")
    assert len(dm.src_dict) == 24 and len(dm.tgt_dict) == 24
    assert len(dm.datasets["train"]) == 40 and len(dm.datasets["valid"]) == 10 and len(dm.datasets["test"]) == 6
    for b in dm.train_dataloader():
        assert b["src_tokens"].numel() <= 64 and b["target"].numel() <= 64
        assert (b["src_tokens"][:, -1] == EOS).all() and (b["prev_output_tokens"][:, 0] == EOS).all()
    seen = sorted(int(i) for b in dm.val_dataloader() for i in b["id"])
    assert seen == list(range(10))
    b = next(iter(dm.test_dataloader()))
    assert dm.decode_target(b["target"][0]).startswith("word")
    # the reverse file pair and a dictionary / data mismatch
    rev = fake_binarized_dir(tmp_path / "rev", reverse=True)
    dm = FairseqBinarizedDataModule(str(rev), "de", "en", max_tokens=64)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 40
    Dictionary().save(rev / "dict.en.txt")
    with pytest.raises(ZooError, match=r"token id \d+ but dict.en.txt has 4 symbols"):
        FairseqBinarizedDataModule(str(rev), "de", "en").setup("fit")
    with pytest.raises(ZooError, match="dict.fr.txt does not exist"):
        FairseqBinarizedDataModule(str(root), "fr", "en").setup("fit")
    Dictionary().save(root / "dict.fr.txt")
    with pytest.raises(ZooError, match="no train.fr-en.*run fairseq-preprocess"):
        FairseqBinarizedDataModule(str(root), "fr", "en").setup("fit")


def test_left_and_right_padding_give_the_same_examples(tmp_path: Path) -> None:
    root = fake_binarized_dir(tmp_path)
    left = FairseqBinarizedDataModule(str(root), max_tokens=64, left_pad_source=True)
    right = FairseqBinarizedDataModule(str(root), max_tokens=64, left_pad_source=False)
    for bl, br in zip(left.val_dataloader(), right.val_dataloader()):
        assert torch.equal(bl["id"], br["id"])
        for sl, sr in zip(bl["src_tokens"], br["src_tokens"]):
            assert sl[sl.ne(PAD)].tolist() == sr[sr.ne(PAD)].tolist()
            assert sl[-1] == EOS and sr[0] != PAD


def test_long_examples_are_dropped(tmp_path: Path) -> None:
    root = fake_binarized_dir(tmp_path)
    dm = FairseqBinarizedDataModule(str(root), max_tokens=64, max_source_positions=6, max_target_positions=6)
    with pytest.warns(UserWarning, match="longer than max_source_positions=6"):
        dm.setup("fit")
    assert dm.dropped["train"] > 0 and (dm.datasets["train"].src_sizes <= 6).all()


# ================================================================================================ raw text, BPE


def test_bpe_tokenizer() -> None:
    lines = ["the lower lowest newer", "newest wider lower low", "the widest"] * 5
    bpe = BPETokenizer.train(lines, num_merges=30)
    assert bpe.merges[0] in {("l", "o"), ("e", "r</w>"), ("w", "e"), ("o", "w")}  # among the most frequent pairs
    enc = bpe.encode("lowest newer unseenword")
    assert bpe.decode(enc) == "lowest newer unseenword"
    pieces = bpe.encode("unseenword").split()
    assert len(pieces) > 1 and all(p.endswith("@@") for p in pieces[:-1]) and not pieces[-1].endswith("@@")
    assert BPETokenizer.train(lines, 0).encode("low") == "l@@ o@@ w"
    assert BPETokenizer.train(lines, 1000).encode("lowest") == "lowest"  # frequent words become one token


def test_parallel_text_data_module(tmp_path: Path) -> None:
    de = ["das haus ist klein", "das buch ist gut", "ein kleines haus", "ein gutes buch"] * 10
    en = ["the house is small", "the book is good", "a small house", "a good book"] * 10
    for name, lines in (
        ("train.de", de),
        ("train.en", en),
        ("valid.de", de[:4] + ["unbekannt"]),
        ("valid.en", en[:4] + ["unknown"]),
    ):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    files = {
        "train": (str(tmp_path / "train.de"), str(tmp_path / "train.en")),
        "valid": (str(tmp_path / "valid.de"), str(tmp_path / "valid.en")),
    }
    dm = ParallelTextDataModule(**files, tokenizer="bpe", bpe_merges=20, max_tokens=100)
    dm.setup("fit")
    assert dm.remove_bpe == "@@ " and len(dm.src_dict) % 8 == 0
    assert dm.decode_source(dm.encode_source("das kleines buch")) == "das kleines buch"
    texts = {dm.decode_target(t) for b in dm.val_dataloader() for t in b["target"]}
    assert set(en[:4]) <= texts and len(texts) == 5  # "unknown" comes back with <unk> for unseen pieces
    word = ParallelTextDataModule(**files, tokenizer="word", joined_dictionary=True)
    word.setup()
    assert word.src_dict is word.tgt_dict and "house" in word.src_dict and "haus" in word.src_dict
    (tmp_path / "short.en").write_text("one line\n")
    with pytest.raises(ZooError, match="hold 40 and 1 lines"):
        ParallelTextDataModule(
            train=(files["train"][0], str(tmp_path / "short.en")), valid=files["valid"], tokenizer="word"
        ).setup()
    with pytest.raises(ZooError, match="unknown tokenizer"):
        ParallelTextDataModule(**files, tokenizer="moses")
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        with pytest.raises(ZooError, match="needs the sentencepiece package"):
            ParallelTextDataModule(**files, tokenizer="sentencepiece")
        assert ParallelTextDataModule(**files).tokenizer_kind == "bpe"  # auto without sentencepiece


# ================================================================================================ embedded numbers


# German and English spellings written out from the languages' rules (not from num2words): the task's words are
# the standard ones, with English's "and" after hundred and commas between thousands and the rest (num2words' en)
@pytest.mark.parametrize(
    "n,de,en",
    [
        (0, "null", "zero"),
        (1, "eins", "one"),
        (16, "sechzehn", "sixteen"),
        (17, "siebzehn", "seventeen"),
        (21, "einundzwanzig", "twenty-one"),
        (30, "dreißig", "thirty"),
        (101, "einhunderteins", "one hundred and one"),
        (324, "dreihundertvierundzwanzig", "three hundred and twenty-four"),
        (1000, "eintausend", "one thousand"),
        (21001, "einundzwanzigtausendeins", "twenty-one thousand and one"),
        (
            324512,
            "dreihundertvierundzwanzigtausendfünfhundertzwölf",
            "three hundred and twenty-four thousand, five hundred and twelve",
        ),
        (
            999999,
            "neunhundertneunundneunzigtausendneunhundertneunundneunzig",
            "nine hundred and ninety-nine thousand, nine hundred and ninety-nine",
        ),
    ],
)
def test_number_words(n: int, de: str, en: str) -> None:
    assert german_number(n) == de and english_number(n) == en
    assert "".join(german_number_tokens(n)) == de
    assert " ".join(english_number_tokens(n)).replace(" @-@ ", "-").replace(" ,", ",") == en


def test_number_tokens_split_every_spelling() -> None:
    """The morpheme split and the English tokens cover num2words' spellings: all numbers below 2000 and every
    997th above (the full range 0 .. 999999 was checked once: 8 minutes)."""
    morphemes, english = set(GERMAN_NUMBER_MORPHEMES), set(ENGLISH_NUMBER_TOKENS)
    for n in [*range(2000), *range(2000, 10**6, 997), 999_999]:
        parts = german_number_tokens(n)
        assert "".join(parts) == german_number(n) and set(parts) <= morphemes
        assert set(english_number_tokens(n)) <= english
    assert german_number_tokens(17017) == ["sieb", "zehn", "tausend", "sieb", "zehn"]
    assert german_number_tokens(66) == ["sechs", "und", "sechzig"]
    assert english_number_tokens(1021) == ["one", "thousand", "and", "twenty", "@-@", "one"]
    with pytest.raises(ZooError, match="covers 0 .. 999999"):
        german_number_tokens(10**6)


def test_numbers_data_module() -> None:
    dm = NumbersDataModule(train_size=3000, valid_size=60, test_size=30, seed=1, max_tokens=256)
    dm.setup("fit")
    assert (len(dm.src_dict), len(dm.tgt_dict)) == (NUMBERS_SRC_VOCAB_SIZE, NUMBERS_TGT_VOCAB_SIZE) == (64, 40)
    train, valid, test = (dm.numbers[k] for k in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (3000, 60, 30)
    assert len(set(valid.tolist())) == 60 and len(set(test.tolist())) == 30  # distinct within a split
    assert train.min() >= 0 and max(train.max(), valid.max(), test.max()) <= 999_999
    digits = {k: np.array([len(str(n)) for n in v.tolist()]) for k, v in dm.numbers.items()}  # counted as text
    # every length equally represented: evaluation 10 (test 5) numbers of each of the 6 lengths, training draws a
    # length uniformly (500 expected each; before, 1-digit numbers were 0 of 20000 and all 10 in validation)
    assert np.bincount(digits["valid"], minlength=7)[1:].tolist() == [10] * 6
    assert np.bincount(digits["test"], minlength=7)[1:].tolist() == [5] * 6
    counts = np.bincount(digits["train"], minlength=7)[1:]
    assert counts.min() > 400 and counts.max() < 600, counts
    # held out where the length holds enough numbers (15 of 90 2-digit numbers: yes; 15 of 10: no)
    sets = {k: set(v.tolist()) for k, v in dm.numbers.items()}
    at_least_10 = {k: {n for n in v if n >= 10} for k, v in sets.items()}
    assert not at_least_10["train"] & at_least_10["valid"] and not at_least_10["train"] & at_least_10["test"]
    assert not at_least_10["valid"] & at_least_10["test"]
    assert set(range(10)) <= sets["train"] and sets["valid"] >= set(range(10)) and len(sets["test"] & set(range(10)))
    # batches carry the digits as length classes, and the right words
    for b in dm.train_dataloader():
        assert not (b["src_tokens"] == UNK).any() and not (b["target"] == UNK).any()
        ids = b["id"].numpy()
        assert b["length"].tolist() == digits["train"][dm.datasets["train"].indices[ids]].tolist()
    b = next(iter(dm.val_dataloader()))
    i = int(b["id"][0])
    german, english = dm.pairs("valid")[i]
    assert dm.decode_target(b["target"][0]) == english
    assert dm.decode_source(b["src_tokens"][0]) == german
    assert int(b["length"][0]) == len(str(int(valid[i])))
    again = NumbersDataModule(train_size=3000, valid_size=60, test_size=30, seed=1)
    again.setup()
    assert all(np.array_equal(again.numbers[k], dm.numbers[k]) for k in dm.numbers)
    with pytest.raises(ZooError, match="valid_size=101 distinct numbers requested but 0 .. 99 holds 100"):
        NumbersDataModule(train_size=90, valid_size=101, test_size=10, max_number=99)
    with pytest.raises(ZooError, match="max_number must be an integer in 1 .. 999999"):
        NumbersDataModule(max_number=10**6)


def test_numbers_default_sampling_covers_short_numbers() -> None:
    """The recipe's sizes (400 / 400 of 0 .. 999999): 1- and 2-digit numbers (100 in all) are too few to hold out
    (null -> zero occurs in no other number): training sees every one of them, a sixth of its draws each; the
    longer ones are held out. Drawn without spelling them (setup would take seconds)."""
    dm = NumbersDataModule()
    numbers = dm._draw()
    digits = {k: np.array([len(str(n)) for n in v.tolist()]) for k, v in numbers.items()}
    assert np.bincount(digits["valid"], minlength=7)[1:].tolist() == [10, 79, 79, 78, 77, 77]
    counts = np.bincount(digits["train"], minlength=7)[1:]
    assert counts.min() > 3000 and counts.max() < 3700, counts  # 20000 / 6 = 3333 expected each
    train = set(numbers["train"].tolist())
    assert set(range(100)) <= train
    held = {n for k in ("valid", "test") for n in numbers[k].tolist() if n >= 100}
    assert len(held) == 800 - 10 - 10 - 79 - 79 and not held & train


def test_numbers_number_digits() -> None:
    x = np.array([0, 1, 9, 10, 99, 100, 999, 1000, 99_999, 100_000, 999_999])
    assert number_digits(x).tolist() == [len(str(n)) for n in x.tolist()]


@pytest.mark.parametrize(
    "text,n",
    [
        ("acht", 8),
        ("null", 0),
        ("sieben", 7),
        ("Elf", 11),
        ("einundzwanzig", 21),
        ("dreihundertvierundzwanzig", 324),
        ("Dreihundert vierund-zwanzig", 324),
        ("zwoelf", 12),
        ("fuenfhundertdreissig", 530),
        ("dreihundertvierundzwanzigtausendfünfhundertzwölf", 324512),
        (999_999, 999_999),
        (17, 17),
    ],
)
def test_numbers_encode_source(text: str | int, n: int) -> None:
    """Raw German text (a word, any case, spaces or hyphens inside, ASCII ue/oe/ss) -> exactly the ids of the
    training data's source for that number (the sub-words with their @@ markers)."""
    dm = NumbersDataModule(train_size=8, valid_size=8, test_size=8)
    expected = dm.src_dict.encode_line(
        " ".join([p + "@@" for p in german_number_tokens(n)[:-1]] + german_number_tokens(n)[-1:])
    )
    ids = dm.encode_source(text)
    assert ids.dtype == torch.int64 and ids.tolist() == expected.tolist() and int(ids[-1]) == EOS
    assert dm.decode_source(ids) == german_number(n)
    assert not (ids == UNK).any()


def test_numbers_encode_source_matches_the_data_and_batches() -> None:
    dm = NumbersDataModule(train_size=50, valid_size=40, test_size=8, seed=3)
    dm.setup()
    ds = dm.datasets["valid"]
    for i, n in enumerate(dm.numbers["valid"].tolist()):
        assert dm.encode_source(german_number(n)).tolist() == ds[i]["source"].tolist()
    batch = dm.encode_sources(["acht", "dreihundertvierundzwanzig"])
    assert batch.shape == (2, 6) and batch[0, :4].tolist() == [PAD] * 4  # left-padded as the loaders pad
    assert [dm.decode_source(row) for row in batch] == ["acht", "dreihundertvierundzwanzig"]
    for bad, match in (
        ("eight", "'eight' is not a German number word .*dreihundertvierundzwanzig"),
        ("324", "'324' is written in digits: give the German word .*dreihundertvierundzwanzig"),
        ("", "an empty text is not a German number word"),
        (3.5, "a German number word \\(str\\) or a number \\(int\\) is needed, got float"),
    ):
        with pytest.raises(ZooError, match=match):
            dm.encode_source(bad)
    with pytest.raises(ZooError, match="a non-empty list of sentences"):
        dm.encode_sources("acht")
