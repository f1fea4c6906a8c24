"""CorpusBLEU (zoo/tasks/bleu.py): sacrebleu's corpus BLEU accumulated over batches and processes.

Checked against sacrebleu.corpus_bleu on the whole corpus at once and against an independent BLEU written here
from the definition (Papineni et al. 2002, sacrebleu's exp smoothing)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import sacrebleu

from zoo.errors import ZooError
from zoo.tasks.bleu import CorpusBLEU

WORDS = "the a cat dog sat on mat ran to house big small red".split()


def corpus(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Hypotheses and two reference streams: references are noisy copies of the hypothesis."""
    rng = random.Random(seed)
    hyps, refs1, refs2 = [], [], []
    for _ in range(n):
        h = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]

        def noisy(words: list[str]) -> str:
            out = [w if rng.random() < 0.7 else rng.choice(WORDS) for w in words]
            return " ".join(out + [rng.choice(WORDS) for _ in range(rng.randint(0, 3))])

        hyps.append(" ".join(h))
        refs1.append(noisy(h))
        refs2.append(noisy(h))
    return hyps, refs1, refs2


def bleu_from_definition(hyps: list[str], refs: list[list[str]]) -> float:
    """BLEU on whitespace tokens: clipped n-gram precisions (n = 1..4, counts clipped by the max over references),
    closest reference length (ties: the shorter), brevity penalty, exp smoothing of zero counts (sacrebleu's
    default: the k-th zero precision counts as 1 / 2^k / total)."""
    correct, total = [0] * 4, [0] * 4
    sys_len = ref_len = 0
    for h, rs in zip(hyps, refs):
        hw, rws = h.split(), [r.split() for r in rs]
        sys_len += len(hw)
        ref_len += min((abs(len(r) - len(hw)), len(r)) for r in rws)[1]
        for n in range(1, 5):
            grams = Counter(tuple(hw[i : i + n]) for i in range(len(hw) - n + 1))
            best: Counter = Counter()
            for r in rws:
                best |= Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            correct[n - 1] += sum(min(c, best[g]) for g, c in grams.items())
            total[n - 1] += max(len(hw) - n + 1, 0)
    log_p, k = 0.0, 1
    for c, t in zip(correct, total):
        if c == 0:
            k *= 2
            log_p += math.log(100.0 / (k * t))
        else:
            log_p += math.log(100.0 * c / t)
    bp = 1.0 if sys_len > ref_len else math.exp(1 - ref_len / sys_len)
    return bp * math.exp(log_p / 4)


@pytest.mark.parametrize("tokenize", ["13a", "none", "char"])
def test_batches_give_sacrebleus_corpus_score(tokenize: str) -> None:
    hyps, refs1, refs2 = corpus(60, seed=0)
    metric = CorpusBLEU(tokenize=tokenize)
    cuts = [0, 1, 7, 8, 30, 59, 60]  # uneven batches, one of a single sentence
    for a, b in zip(cuts[:-1], cuts[1:]):
        metric.update(hyps[a:b], [[r1, r2] for r1, r2 in zip(refs1[a:b], refs2[a:b])])
    expected = sacrebleu.corpus_bleu(hyps, [refs1, refs2], tokenize=tokenize).score
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-6, abs=1e-5)
    assert 5 < expected < 95  # a score strictly inside the range: every part of the formula matters


def test_matches_an_independent_bleu_and_merges_like_ddp_ranks() -> None:
    hyps, refs1, refs2 = corpus(80, seed=1)
    refs = [[r1, r2] for r1, r2 in zip(refs1, refs2)]
    expected = bleu_from_definition(hyps, refs)
    rank0, rank1 = CorpusBLEU(tokenize="none"), CorpusBLEU(tokenize="none")
    rank0.update(hyps[::2], refs[::2])  # a DistributedSampler's split
    rank1.update(hyps[1::2], refs[1::2])
    assert float(rank0.clone().compute()) != pytest.approx(expected, abs=1e-3)  # one rank alone is not the corpus
    rank0.merge_state(rank1)  # the "sum" reduction of the states, as sync() does across processes
    assert float(rank0.compute()) == pytest.approx(expected, rel=1e-6)
    rank0.reset()
    rank0.update(["a b c d"], [["a b c d"]])
    assert float(rank0.compute()) == pytest.approx(100.0)


def test_options_are_sacrebleus() -> None:
    hyps, refs1, _ = corpus(30, seed=2)
    upper = [h.upper() for h in hyps]
    for kwargs in ({"lowercase": True}, {"smooth_method": "floor"}, {"smooth_method": "none"}):
        metric = CorpusBLEU(**kwargs)
        metric.update(upper if kwargs.get("lowercase") else hyps, [[r] for r in refs1])
        want = sacrebleu.corpus_bleu(upper if kwargs.get("lowercase") else hyps, [refs1], **kwargs).score
        assert float(metric.compute()) == pytest.approx(want, rel=1e-6, abs=1e-5)
    cased = CorpusBLEU()
    cased.update(upper, [[r] for r in refs1])
    assert float(cased.compute()) < 1.0


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ZooError, match="tokenize='nope'.*13a"):
        CorpusBLEU(tokenize="nope")
    with pytest.raises(ZooError, match="smooth_method='nope'"):
        CorpusBLEU(smooth_method="nope")
    metric = CorpusBLEU()
    with pytest.raises(ZooError, match="one list of references per hypothesis"):
        metric.update(["a b"], [["a"], ["b"]])
    with pytest.raises(ZooError, match="the same number"):
        metric.update(["a b", "c"], [["a b"], ["c", "d"]])
    with pytest.raises(ZooError, match="the same number .* of reference strings"):
        metric.update(["a b"], ["a b"])
