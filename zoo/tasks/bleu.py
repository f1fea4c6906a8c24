"""Corpus BLEU with the sacrebleu package, accumulated over batches and processes as a torchmetrics ``Metric``.

Corpus BLEU is not an average of batch scores: it is a function of corpus-level sufficient statistics,

    BLEU = BP * exp(mean_n log(correct_n / total_n)),   BP = min(1, exp(1 - ref_len / sys_len)),

where correct_n / total_n are the matched / hypothesis n-gram counts (n = 1..4) summed over all sentences and
sys_len / ref_len the summed hypothesis / closest reference lengths. Each :meth:`CorpusBLEU.update` adds the
statistics sacrebleu extracts from the batch (``BLEU.corpus_score(...).counts / .totals / .sys_len / .ref_len``,
with sacrebleu's own tokenizers), the states are summed across DDP ranks, and :meth:`CorpusBLEU.compute` scores
the sums with sacrebleu's ``BLEU.compute_bleu``: the result is exactly ``sacrebleu.corpus_bleu`` on the whole
corpus, however it was split into batches and ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from zoo.errors import ZooError

__all__ = ["CorpusBLEU"]

MAX_NGRAM_ORDER = 4


def _sacrebleu_bleu(tokenize: str, lowercase: bool, smooth_method: str):  # noqa: ANN202 (sacrebleu's BLEU)
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:  # a dependency of zoo; only a broken environment lacks it
        raise ZooError("BLEU needs the sacrebleu package: pip install sacrebleu") from None
    try:
        # force: hypotheses may be tokenised text (``tokenize="none"`` for tokenised BLEU); do not warn about it
        return BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method, force=True)
    except (AssertionError, ValueError, KeyError, RuntimeError, ImportError) as e:
        from sacrebleu.metrics.bleu import BLEU as _BLEU

        raise ZooError(
            f"sacrebleu cannot use tokenize={tokenize!r} / smooth_method={smooth_method!r} ({e}): "
            f"tokenize is one of {', '.join(_BLEU.TOKENIZERS)}, smooth_method one of "
            f"{', '.join(_BLEU.SMOOTH_DEFAULTS)}"
        ) from None


class CorpusBLEU(Metric):
    """sacrebleu's corpus BLEU (0..100) of all hypotheses seen since the last reset.

    ``update(hypotheses, references)``: ``hypotheses`` a list of strings, ``references`` one list of reference
    strings per hypothesis (the same number for every hypothesis, as sacrebleu's reference streams).

    Args:
        tokenize: sacrebleu tokenizer (``"13a"`` its default, ``"none"`` for BLEU on already tokenised text,
            ``"intl"``, ``"char"``, ``"zh"`` ...).
        lowercase: case-insensitive BLEU.
        smooth_method: sacrebleu's ``"exp"`` (default), ``"none"``, ``"floor"``, ``"add-k"``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    correct: torch.Tensor
    total: torch.Tensor
    sys_len: torch.Tensor
    ref_len: torch.Tensor

    def __init__(self, tokenize: str = "13a", lowercase: bool = False, smooth_method: str = "exp") -> None:
        super().__init__()
        self._bleu = _sacrebleu_bleu(tokenize, lowercase, smooth_method)
        self.smooth_method = smooth_method
        # integer counts: exact, all_reduce-able on every backend (float64 is not available on MPS)
        self.add_state("correct", torch.zeros(MAX_NGRAM_ORDER, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(MAX_NGRAM_ORDER, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("sys_len", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("ref_len", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        if isinstance(hypotheses, str) or len(hypotheses) != len(references):
            raise ZooError(
                f"CorpusBLEU.update needs a list of hypotheses and one list of references per hypothesis, "
                f"got {type(hypotheses).__name__} of {len(hypotheses)} and {len(references)} references"
            )
        if not hypotheses:
            return
        n_refs = {len(r) if not isinstance(r, str) else -1 for r in references}
        if len(n_refs) != 1 or min(n_refs) < 1:
            raise ZooError(
                "CorpusBLEU.update: give every hypothesis a list of the same number (>= 1) of reference "
                "strings, e.g. [[ref] for ref in refs]"
            )
        streams = [list(s) for s in zip(*references)]  # sacrebleu: one list per reference "stream"
        stats = self._bleu.corpus_score(list(hypotheses), streams)
        dev = self.correct.device
        self.correct += torch.tensor(stats.counts, dtype=torch.int64, device=dev)
        self.total += torch.tensor(stats.totals, dtype=torch.int64, device=dev)
        self.sys_len += stats.sys_len
        self.ref_len += stats.ref_len

    def compute(self) -> torch.Tensor:
        from sacrebleu.metrics import BLEU

        correct, total = self.correct.tolist(), self.total.tolist()
        score = BLEU.compute_bleu(
            correct,
            total,
            int(self.sys_len),
            int(self.ref_len),
            smooth_method=self.smooth_method,
            smooth_value=self._bleu.smooth_value,
            max_ngram_order=MAX_NGRAM_ORDER,
        )
        return torch.tensor(score.score, dtype=torch.float32)
