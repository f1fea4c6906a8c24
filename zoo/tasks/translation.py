"""Sequence-to-sequence training logic as fairseq's ``translation`` task: label-smoothed cross-entropy, Adam with the
inverse square-root schedule, validation loss / perplexity / token accuracy, BLEU by beam search, and the decoders
(greedy and beam search with cached decoder keys and values).

Loss (fairseq's ``label_smoothed_cross_entropy``), with lprobs = log p(y | x) over the V symbols, eps the label
smoothing and the sums over the non-pad target tokens t:

    nll    = -sum_t lprobs[t, y_t]
    smooth = -sum_t sum_v lprobs[t, v]
    loss   = (1 - eps - eps / (V - 1)) * nll + eps / (V - 1) * smooth

The gradient is that of loss / ntokens (fairseq's ``sample_size`` is the number of target tokens). Logged values are
per token in nats (fairseq logs base 2; the perplexity exp(nll / ntokens) = 2^(nll / ntokens / ln 2) is the same).

Training settings are injected (LightningCLI's ``OptimizerCallable`` / ``LRSchedulerCallable``); the defaults are
fairseq's IWSLT'14 ones. Learning rate: fairseq's ``inverse_sqrt`` (:class:`zoo.tasks.optim.InverseSqrtLR`, per
update u, lr_0 = ``warmup_init_lr``, W = ``warmup_updates``):

    lr(u) = lr_0 + u (lr - lr_0) / W        for u < W
    lr(u) = lr sqrt(W / u)                  for u >= W

Optimizer: fairseq's ``adam`` is Adam with *decoupled* weight decay on every parameter (its
``fairseq/optim/adam.py`` applies p -= wd * lr * p), i.e. ``torch.optim.AdamW`` on all parameters (one parameter
group: unlike the image tasks, norms and biases decay too, as in fairseq).

Decoding (fairseq's ``SequenceGenerator``): the decoder starts from eos; at step s the log-probabilities get pad
-> -inf, unk -> -unk_penalty, eos -> -inf while s < min_len, every symbol but eos -> -inf once s >= max_len; beam
search keeps the 2K best continuations of the K beams, finalises those among the first K that end in eos with
score sum(lprobs) / (s + 1)^lenpen, continues with the first K that do not, and finishes a sentence with K
finalised hypotheses. One deviation: max_len = min(max_len_a * n + max_len_b, max_target_positions - 1) uses
each sentence's own source length n (tokens with eos) instead of the batch's padded length, so that a sentence
decodes the same alone or in any batch. The decoding loops check finished sentences on the host once per step
(one device-to-host copy per step, one more when a hypothesis ends); the forward passes have no host syncs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, Metric

from zoo.errors import ZooError
from zoo.tasks.bleu import CorpusBLEU
from zoo.tasks.optim import (
    InverseSqrtLR,
    LearningRateAttribute,
    LRSchedulerCallable,
    OptimizerCallable,
    build_optimization,
    check_factory,
    parameter_groups,
)
from zoo.validation import boolean, finite_float, non_negative_int, positive_int, probability

__all__ = [
    "ExactMatchByLength",
    "Seq2SeqDecoder",
    "TranslationTask",
    "beam_search",
    "check_token_ids",
    "check_token_range",
    "greedy_search",
    "label_smoothed_nll_loss",
]

# fairseq's IWSLT'14 settings: --optimizer adam --adam-betas '(0.9, 0.98)' --lr 5e-4 --weight-decay 0.0001
FAIRSEQ_ADAM = functools.partial(torch.optim.AdamW, lr=5e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=1e-4)


# ================================================================================================ loss, schedule


def label_smoothed_nll_loss(
    lprobs: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: int | None = None, reduce: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's ``label_smoothed_nll_loss``: (loss, nll_loss), summed over the tokens when ``reduce``.

    ``lprobs`` (..., V) log-probabilities, ``target`` (...) ids; tokens equal to ``ignore_index`` count for nothing.
    ``epsilon`` is the label smoothing: the target keeps 1 - ``epsilon`` of the mass, the other V - 1 classes
    share the rest.
    """
    if target.dim() == lprobs.dim() - 1:
        target = target.unsqueeze(-1)
    nll_loss = -lprobs.gather(dim=-1, index=target)
    smooth_loss = -lprobs.sum(dim=-1, keepdim=True)
    if ignore_index is not None:
        pad_mask = target.eq(ignore_index)
        nll_loss = nll_loss.masked_fill(pad_mask, 0.0)
        smooth_loss = smooth_loss.masked_fill(pad_mask, 0.0)
    else:
        nll_loss, smooth_loss = nll_loss.squeeze(-1), smooth_loss.squeeze(-1)
    if reduce:
        nll_loss, smooth_loss = nll_loss.sum(), smooth_loss.sum()
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss
    return loss, nll_loss


# ================================================================================================ exact match


class ExactMatchByLength(Metric):
    """Sentence exact match of decoded text (hypothesis == reference), overall and by length class.

    ``update(hypotheses, references, lengths=None)``: strings, and optionally one length class per sentence (an
    int tensor; the numbers task: the number's digits; classes above ``max_length`` count as ``max_length``).
    :meth:`compute` gives ``{"exact": ..., "exact_len{n}": ...}`` (fractions in 0..1) for the classes seen; the
    counts are summed across DDP processes first, so the values are those of the whole split.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, max_length: int = 32) -> None:
        super().__init__()
        self.max_length = int(max_length)
        # index 0 .. max_length: the length classes; the last entry (max_length + 1): every sentence
        self.add_state("correct", torch.zeros(self.max_length + 2, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(self.max_length + 2, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], references: Sequence[str], lengths: torch.Tensor | None = None) -> None:
        if isinstance(hypotheses, str) or len(hypotheses) != len(references):
            raise ZooError(
                f"ExactMatchByLength.update needs as many hypotheses as references, got "
                f"{len(hypotheses)} and {len(references)}"
            )
        if lengths is not None and len(lengths) != len(hypotheses):
            raise ZooError(f"ExactMatchByLength.update: {len(lengths)} length classes for {len(hypotheses)} sentences")
        if not hypotheses:
            return
        dev = self.correct.device
        match = torch.tensor([h == r for h, r in zip(hypotheses, references)], dtype=torch.int64, device=dev)
        everything = torch.full_like(match, self.max_length + 1)
        self.correct.index_add_(0, everything, match)
        self.total.index_add_(0, everything, torch.ones_like(match))
        if lengths is not None:
            idx = torch.as_tensor(lengths, device=dev).long().clamp(0, self.max_length)
            self.correct.index_add_(0, idx, match)
            self.total.index_add_(0, idx, torch.ones_like(match))

    def compute(self) -> dict[str, torch.Tensor]:
        total, correct = self.total.tolist(), self.correct.tolist()  # at the end of an epoch: one host copy
        out = {"exact": torch.tensor(correct[-1] / max(total[-1], 1), dtype=torch.float32)}
        for n in range(self.max_length + 1):
            if total[n]:
                out[f"exact_len{n}"] = torch.tensor(correct[n] / total[n], dtype=torch.float32)
        return out


# ================================================================================================ decoding


class Seq2SeqDecoder(Protocol):
    """What the decoders need from a model (implemented by :class:`zoo.models.translation.SinkformerTranslation`)."""

    pad: int
    eos: int
    unk: int

    def forward_encoder(self, src_tokens: torch.Tensor) -> Any: ...

    def forward_decoder_step(
        self, tokens: torch.Tensor, step: int, encoder_out: Any, cache: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor: ...

    def reorder_state(
        self, encoder_out: Any, cache: list[dict[str, torch.Tensor]], index: torch.Tensor
    ) -> tuple[Any, list[dict[str, torch.Tensor]]]: ...

    def max_decoder_positions(self) -> int: ...


_TOKEN_DTYPES = (torch.int64, torch.int32)


def check_token_ids(name: str, tokens: Any, batch_size: int | None = None) -> None:
    """One clear ZooError unless ``tokens`` is a (batch, length) tensor of integer token ids (shapes and dtypes only:
    no host sync, so forward passes can call it).

    Args:
        name: the argument's name, for the message (``"src_tokens"``).
        tokens: the value to check.
        batch_size: when given, the batch size ``tokens`` must have (that of the other inputs).
    """
    if not isinstance(tokens, torch.Tensor):
        raise ZooError(
            f"{name} must be a (batch, length) torch.Tensor of token ids, got {type(tokens).__name__}: "
            f"give torch.tensor([[...ids...]], dtype=torch.long)"
        )
    if tokens.dim() != 2:
        fix = (
            f"a single sentence needs a batch dimension: {name}.unsqueeze(0)"
            if tokens.dim() == 1
            else "give one row of ids per sentence, padded with the pad index (1)"
        )
        raise ZooError(
            f"{name} must be a 2-D (batch, length) tensor of token ids, got shape {tuple(tokens.shape)}: {fix}"
        )
    if tokens.dtype not in _TOKEN_DTYPES:
        raise ZooError(
            f"{name} must hold integer token ids (torch.long), got dtype {tokens.dtype}: "
            f"give dictionary indices, e.g. {name}.long() if the values are whole numbers"
        )
    if batch_size is not None and tokens.size(0) != batch_size:
        raise ZooError(
            f"{name} has batch size {tokens.size(0)} but the source batch has {batch_size} sentences: give one "
            f"row of {name} per source sentence (the same batch size)"
        )


def check_token_range(name: str, tokens: torch.Tensor, vocab_size: int, side: str) -> None:
    """One clear ZooError when an id of ``tokens`` lies outside ``0 .. vocab_size - 1`` (one host copy of the ids'
    minimum and maximum: call it where :func:`zoo.validation.host_read_is_free`, or once before a decoding loop).

    Args:
        name: the argument's name, for the message (``"src_tokens"``).
        tokens: integer token ids (checked by :func:`check_token_ids`).
        vocab_size: the size of the dictionary the ids index.
        side: which dictionary, for the message (``"source"``, ``"target"``).
    """
    if tokens.numel() == 0:
        return
    low, high = torch.stack([tokens.min(), tokens.max()]).tolist()
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        arg = "src_vocab_size" if side == "source" else "tgt_vocab_size"
        raise ZooError(
            f"{name} holds the id {bad}, outside the {side} vocabulary of {vocab_size} symbols (ids "
            f"0..{vocab_size - 1}): encode the sentences with the {side} dictionary the model was built with ({arg})"
        )


def _check_source(model: Seq2SeqDecoder, src_tokens: Any) -> None:
    """Shape, dtype and (one host copy, before decoding) the ids' range against the model's source vocabulary."""
    check_token_ids("src_tokens", src_tokens)
    vocab = getattr(model, "src_vocab_size", None)
    if vocab is not None:
        check_token_range("src_tokens", src_tokens, vocab, "source")


def _check_decoding(beam: Any, nbest: Any, lenpen: Any, max_len_a: Any, max_len_b: Any, min_len: Any, unk: Any) -> int:
    positive_int("beam", beam)
    positive_int("nbest", nbest)
    if nbest > beam:
        raise ZooError(f"nbest must be <= beam (beam search keeps beam hypotheses), got beam={beam}, nbest={nbest}")
    finite_float("lenpen", lenpen)
    finite_float("max_len_a", max_len_a, 0.0)
    non_negative_int("max_len_b", max_len_b)
    non_negative_int("min_len", min_len)
    finite_float("unk_penalty", unk)
    return int(beam)


def _max_lens(model: Seq2SeqDecoder, src_tokens: torch.Tensor, max_len_a: float, max_len_b: int) -> list[int]:
    lens = src_tokens.ne(model.pad).sum(1).tolist()  # one host copy before the loop
    top = model.max_decoder_positions() - 1
    return [max(0, min(int(max_len_a * n + max_len_b), top)) for n in lens]


def _mask_lprobs(
    lprobs: torch.Tensor,
    step: int,
    max_len: torch.Tensor,
    min_len: int,
    pad: int,
    eos: int,
    unk: int,
    unk_penalty: float,
) -> torch.Tensor:
    """fairseq's per-step constraints; ``max_len`` (N,) per row."""
    lprobs = lprobs.clone()
    lprobs[lprobs != lprobs] = -math.inf
    lprobs[:, pad] = -math.inf
    if unk_penalty:
        lprobs[:, unk] -= unk_penalty
    force = (max_len <= step).unsqueeze(1)  # (N, 1): only eos allowed
    not_eos = torch.ones(lprobs.size(1), dtype=torch.bool, device=lprobs.device)
    not_eos[eos] = False
    lprobs = lprobs.masked_fill(force & not_eos, -math.inf)
    if step < min_len:  # where eos is not forced
        lprobs[:, eos] = torch.where(force.squeeze(1), lprobs[:, eos], torch.full_like(lprobs[:, eos], -math.inf))
    return lprobs


@torch.no_grad()
def greedy_search(
    model: Seq2SeqDecoder,
    src_tokens: torch.Tensor,
    max_len_a: float = 0.0,
    max_len_b: int = 200,
    min_len: int = 1,
    lenpen: float = 1.0,
    unk_penalty: float = 0.0,
) -> list[dict[str, Any]]:
    """Argmax decoding with the decoder's key/value cache: per sentence ``{"tokens"`` (ending in eos), ``"score"``
    (sum of log-probabilities / length^lenpen), ``"positional_scores"}`` (CPU tensors).

    Args:
        model: the translation model (:class:`Seq2SeqDecoder`).
        src_tokens: (B, S) source token ids, padded with ``model.pad``.
        max_len_a: each sentence's output has at most ``max_len_a * source length + max_len_b`` tokens before eos
            (and fits the decoder's positions).
        max_len_b: see ``max_len_a``.
        min_len: eos is forbidden before this many steps.
        unk_penalty: subtracted from the log-probability of the unknown token.
        lenpen: the length penalty exponent of the score.
    """
    _check_decoding(1, 1, lenpen, max_len_a, max_len_b, min_len, unk_penalty)
    _check_source(model, src_tokens)
    B = src_tokens.size(0)
    if B == 0:  # an empty batch: no sentence to translate
        return []
    max_lens = _max_lens(model, src_tokens, max_len_a, max_len_b)
    max_len = torch.as_tensor(max_lens, device=src_tokens.device)
    enc = model.forward_encoder(src_tokens)
    cache: list[dict[str, torch.Tensor]] = []
    tokens = src_tokens.new_full((B, 1), model.eos)
    picked: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=src_tokens.device)
    for step in range(max(max_lens) + 1):
        lprobs = model.forward_decoder_step(tokens[:, -1:], step, enc, cache)
        lprobs = _mask_lprobs(lprobs, step, max_len, min_len, model.pad, model.eos, model.unk, unk_penalty)
        score, tok = lprobs.max(dim=-1)
        picked.append(tok)
        scores.append(score)
        tokens = torch.cat([tokens, tok.unsqueeze(1)], dim=1)
        done |= tok.eq(model.eos)
        if bool(done.all()):  # one host sync per step
            break
    toks = torch.stack(picked, 1).cpu()
    sc = torch.stack(scores, 1).cpu()
    out = []
    for i in range(B):
        ends = (toks[i] == model.eos).nonzero()
        n = int(ends[0]) + 1 if len(ends) else toks.size(1)
        out.append(
            {
                "tokens": toks[i, :n].clone(),
                "score": float(sc[i, :n].double().sum()) / n**lenpen,
                "positional_scores": sc[i, :n].clone(),
            }
        )
    return out


@torch.no_grad()
def beam_search(
    model: Seq2SeqDecoder,
    src_tokens: torch.Tensor,
    beam: int = 5,
    lenpen: float = 1.0,
    max_len_a: float = 0.0,
    max_len_b: int = 200,
    min_len: int = 1,
    unk_penalty: float = 0.0,
    nbest: int = 1,
) -> list[list[dict[str, Any]]]:
    """fairseq's beam search (see the module docstring) with the decoder's key/value cache, sentences leaving the
    batch once finished. Returns, per sentence, the ``nbest`` best hypotheses ``{"tokens"`` (ending in eos),
    ``"score"`` (normalised), ``"positional_scores"}``, best first (CPU tensors).

    Args:
        model: the translation model (:class:`Seq2SeqDecoder`).
        src_tokens: (B, S) source token ids, padded with ``model.pad``.
        beam: the beam size.
        lenpen: the length penalty: a finished hypothesis scores its summed log-probability / length^lenpen.
        max_len_a: each sentence's output has at most ``max_len_a * source length + max_len_b`` tokens before eos
            (and fits the decoder's positions).
        max_len_b: see ``max_len_a``.
        min_len: eos is forbidden before this many steps.
        unk_penalty: subtracted from the log-probability of the unknown token.
        nbest: how many hypotheses to return per sentence (at most ``beam``).
    """
    K = _check_decoding(beam, nbest, lenpen, max_len_a, max_len_b, min_len, unk_penalty)
    _check_source(model, src_tokens)
    B, device = src_tokens.size(0), src_tokens.device
    if B == 0:  # an empty batch: no sentence to translate
        return []
    max_lens = _max_lens(model, src_tokens, max_len_a, max_len_b)
    enc = model.forward_encoder(src_tokens)
    rows = torch.arange(B, device=device).repeat_interleave(K)
    cache: list[dict[str, torch.Tensor]] = []
    enc, cache = model.reorder_state(enc, cache, rows)
    tokens = src_tokens.new_full((B * K, 1), model.eos)
    hist: torch.Tensor | None = None  # cumulative scores after each step (N, step)
    cum: torch.Tensor | None = None
    finalized: list[list[dict[str, Any]]] = [[] for _ in range(B)]
    sent_ids = list(range(B))
    max_len_rows = torch.as_tensor(max_lens, device=device).repeat_interleave(K)
    for step in range(max(max_lens) + 1):
        n_act = len(sent_ids)
        lprobs = model.forward_decoder_step(tokens[:, -1:], step, enc, cache)
        lprobs = _mask_lprobs(lprobs, step, max_len_rows, min_len, model.pad, model.eos, model.unk, unk_penalty)
        if hist is None or cum is None:
            hist, cum = lprobs.new_zeros(lprobs.size(0), 0), lprobs.new_zeros(lprobs.size(0))
        V = lprobs.size(1)
        if 2 * K > V - 1:
            raise ZooError(f"beam {beam} is too large for a vocabulary of {V} symbols: use beam <= {(V - 1) // 2}")
        lp = lprobs.view(n_act, K, V)
        if step == 0:  # every beam holds the same prefix: expand the first only
            cand = lp[:, 0, :]
        else:
            cand = (lp + cum.view(n_act, K, 1)).view(n_act, K * V)
        kk = min(2 * K, cand.size(1) - 1)
        top_scores, top_idx = cand.topk(kk, dim=1)
        cand_beam, cand_tok = top_idx // V, top_idx % V
        eos_mask = cand_tok.eq(model.eos) & top_scores.ne(-math.inf)
        fin = eos_mask[:, :K].cpu()  # one host copy per step
        if bool(fin.any()):
            b_idx, j_idx = fin.nonzero(as_tuple=True)
            b_dev, j_dev = b_idx.to(device), j_idx.to(device)
            src_rows = b_dev * K + cand_beam[b_dev, j_dev]
            sc = top_scores[b_dev, j_dev]
            hyp = torch.cat([tokens[src_rows, 1:], tokens.new_full((len(b_idx), 1), model.eos)], 1).cpu()
            cum_pos = torch.cat([hist[src_rows], sc.unsqueeze(1)], 1).cpu()
            pos = torch.cat([cum_pos[:, :1], cum_pos[:, 1:] - cum_pos[:, :-1]], 1)
            norm = (sc / (step + 1) ** lenpen).cpu().tolist()
            for i, b in enumerate(b_idx.tolist()):
                s = sent_ids[b]
                if len(finalized[s]) < K:
                    finalized[s].append({"tokens": hyp[i], "score": norm[i], "positional_scores": pos[i]})
        keep = [b for b in range(n_act) if len(finalized[sent_ids[b]]) < K and step < max_lens[sent_ids[b]]]
        if not keep:
            break
        # continue with the first K candidates that do not end in eos
        order = eos_mask.long() * kk + torch.arange(kk, device=device)
        _, active = order.topk(K, dim=1, largest=False)
        keep_t = torch.as_tensor(keep, device=device)
        active = active[keep_t]
        new_beam = cand_beam[keep_t].gather(1, active)
        new_tok = cand_tok[keep_t].gather(1, active)
        new_scores = top_scores[keep_t].gather(1, active)
        src_rows = (keep_t.unsqueeze(1) * K + new_beam).view(-1)
        tokens = torch.cat([tokens[src_rows], new_tok.view(-1, 1)], 1)
        hist = torch.cat([hist[src_rows], new_scores.view(-1, 1)], 1)
        cum = new_scores.view(-1)
        max_len_rows = max_len_rows[src_rows]
        enc, cache = model.reorder_state(enc, cache, src_rows)
        sent_ids = [sent_ids[b] for b in keep]
    return [sorted(f, key=lambda h: -h["score"])[:nbest] for f in finalized]


# ================================================================================================ Lightning task


class TranslationTask(LearningRateAttribute, pl.LightningModule):
    """A LightningModule for translation with fairseq's training and evaluation recipe.

    Subclasses build the network and implement ``forward(src_tokens, prev_output_tokens) -> logits`` and the
    :class:`Seq2SeqDecoder` methods; batches are the dicts of :func:`zoo.data.translation.collate`. The training
    settings (``optimizer``, ``lr_scheduler``) are not saved in the hyperparameters: a checkpoint or a
    ``save_pretrained`` folder rebuilds the model, not its optimiser.

    Args:
        optimizer: builds the optimiser from the parameters (LightningCLI's ``OptimizerCallable``:
            ``functools.partial(torch.optim.AdamW, lr=5e-4, betas=(0.9, 0.98), weight_decay=1e-4)``, or
            ``class_path: torch.optim.AdamW`` + ``init_args`` in YAML); every parameter is in one group, so its
            ``weight_decay`` applies to all of them (fairseq's adam). None: the class's ``default_optimizer``,
            fairseq's IWSLT'14 Adam (AdamW, lr 5e-4, betas (0.9, 0.98), eps 1e-8, weight decay 1e-4).
        lr_scheduler: builds the schedule from the optimiser (``LRSchedulerCallable``): default
            :class:`zoo.tasks.optim.InverseSqrtLR` (fairseq's inverse_sqrt, 4000 warm-up updates from 0, per
            update); None: a constant learning rate.
        label_smoothing: epsilon of the label-smoothed cross-entropy (0.1).
        eval_bleu: decode the validation set by beam search: ``val_bleu`` (0..100) and the sentence exact-match
            accuracy ``val_exact`` (0..1), by length class ``val_exact_len{n}`` when the batches carry ``length``
            (the numbers task: digits).
        eval_bleu_every_n_epochs: how often (epochs; the last epoch of a run may be skipped: use ``zoo validate``).
        beam: the beam size of validation BLEU, ``test`` and ``predict`` (fairseq's ``--eval-bleu-args '{"beam": 5,
            "max_len_a": 1.2, "max_len_b": 10}'``; 1 gives the greedy translation).
        lenpen: the length penalty: a hypothesis scores its summed log-probability / length^lenpen.
        max_len_a: outputs have at most ``max_len_a * source length + max_len_b`` tokens.
        max_len_b: see ``max_len_a``.
        min_len: eos is forbidden before this many steps.
        unk_penalty: subtracted from the log-probability of the unknown token.
        eval_bleu_tokenize: sacrebleu tokenisation of the decoded text (``"13a"``, ``"none"`` for tokenized BLEU);
            the score is sacrebleu's corpus BLEU over the whole split and all processes (:class:`CorpusBLEU`).
    """

    # the optimiser when none is given (LightningCLI shows it as null)
    default_optimizer: OptimizerCallable = FAIRSEQ_ADAM

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = InverseSqrtLR,
        label_smoothing: float = 0.1,
        eval_bleu: bool = True,
        eval_bleu_every_n_epochs: int = 1,
        beam: int = 5,
        lenpen: float = 1.0,
        max_len_a: float = 1.2,
        max_len_b: int = 10,
        min_len: int = 1,
        unk_penalty: float = 0.0,
        eval_bleu_tokenize: str = "13a",
    ) -> None:
        super().__init__()
        self.optimizer_factory = check_factory("optimizer", optimizer)
        self.lr_scheduler_factory = check_factory("lr_scheduler", lr_scheduler)
        probability("label_smoothing", label_smoothing)
        boolean("eval_bleu", eval_bleu)
        positive_int("eval_bleu_every_n_epochs", eval_bleu_every_n_epochs)
        positive_int("beam", beam)
        finite_float("lenpen", lenpen)
        finite_float("max_len_a", max_len_a, 0.0)
        non_negative_int("max_len_b", max_len_b)
        non_negative_int("min_len", min_len)
        finite_float("unk_penalty", unk_penalty)
        if not isinstance(eval_bleu_tokenize, str):
            raise ZooError(
                f"eval_bleu_tokenize must be the name of a sacrebleu tokenizer (such as '13a' or 'none'), "
                f"got {eval_bleu_tokenize!r} ({type(eval_bleu_tokenize).__name__})"
            )
        self.save_hyperparameters(ignore=["weights", "optimizer", "lr_scheduler"])
        self.val_loss, self.val_nll, self.val_acc = MeanMetric(), MeanMetric(), MeanMetric()
        self.test_loss, self.test_nll, self.test_acc = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_bleu = CorpusBLEU(tokenize=eval_bleu_tokenize)
        self.test_bleu = CorpusBLEU(tokenize=eval_bleu_tokenize)
        self.val_exact, self.test_exact = ExactMatchByLength(), ExactMatchByLength()
        self._bleu_this_epoch = False

    # ---------------------------------------------------------------- hooks the subclass provides
    pad: int = 1
    eos: int = 2
    unk: int = 3

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose keys do not fit with one clear error (before Lightning loads it)."""
        from zoo.hub import check_checkpoint

        check_checkpoint(self, checkpoint)

    def setup(self, stage: str) -> None:
        """Check the vocabulary sizes against the data module's dictionaries (one clear error when they differ)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "src_dict") and hasattr(self, "check_dictionaries"):
            self.check_dictionaries(dm.src_dict, dm.tgt_dict)

    # ---------------------------------------------------------------- loss
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed label-smoothed loss, summed nll and the number of correct argmax tokens (teacher forcing)."""
        logits = self(batch["src_tokens"], batch["prev_output_tokens"])
        lprobs = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
        target = batch["target"]
        loss, nll = label_smoothed_nll_loss(lprobs, target, self.hparams.label_smoothing, ignore_index=self.pad)
        valid = target.ne(self.pad)
        correct = (lprobs.argmax(-1).eq(target) & valid).sum()
        return loss, nll, correct

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, nll, _ = self.compute_loss(batch)
        ntok = batch["ntokens"]
        self.log("train_loss", loss / ntok, prog_bar=True, batch_size=ntok)
        self.log("train_nll_loss", nll / ntok, batch_size=ntok)
        return loss / ntok

    def _reset_metrics(self, stage: str) -> None:
        # reset at the start of the epoch, in the epoch's grad mode: states left by an inference-mode run (validate)
        # cannot be updated in place under fit's no_grad validation
        for name in ("loss", "nll", "acc", "bleu", "exact"):
            getattr(self, f"{stage}_{name}").reset()

    def on_test_epoch_start(self) -> None:
        self._reset_metrics("test")

    def on_validation_epoch_start(self) -> None:
        """BLEU every ``eval_bleu_every_n_epochs`` epochs of ``fit`` (not in the sanity check), always in
        ``validate``."""
        self._reset_metrics("val")
        hp, trainer = self.hparams, self.trainer
        every = (self.current_epoch + 1) % hp.eval_bleu_every_n_epochs == 0 and not trainer.sanity_checking
        self._bleu_this_epoch = bool(hp.eval_bleu) and (every or trainer.state.fn != "fit")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val", self._bleu_this_epoch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test", True)

    def _eval_step(self, batch: dict[str, Any], stage: str, bleu: bool) -> None:
        loss, nll, correct = self.compute_loss(batch)
        ntok = batch["ntokens"]
        w = torch.as_tensor(float(ntok), device=loss.device)
        getattr(self, f"{stage}_loss").update(loss / ntok, w)
        getattr(self, f"{stage}_nll").update(nll / ntok, w)
        getattr(self, f"{stage}_acc").update(correct.float() / ntok, w)
        if bleu:
            hyps = [self._decode(h[0]["tokens"]) for h in self.generate(batch["src_tokens"])]
            refs = [self._decode(t, escape_unk=True) for t in batch["target"]]
            getattr(self, f"{stage}_bleu").update(hyps, [[r] for r in refs])
            getattr(self, f"{stage}_exact").update(hyps, refs, batch.get("length"))

    def _log_epoch(self, stage: str, bleu: bool) -> None:
        loss, nll, acc = (getattr(self, f"{stage}_{m}") for m in ("loss", "nll", "acc"))
        # under DDP every process computes (the metrics synchronise), even one that saw no batch
        if loss.update_count == 0 and (self._trainer is None or self.trainer.world_size == 1):
            return
        nll_value = nll.compute()
        self.log(f"{stage}_loss", loss.compute(), prog_bar=True)
        self.log(f"{stage}_nll_loss", nll_value)
        self.log(f"{stage}_ppl", torch.exp(nll_value))
        self.log(f"{stage}_acc", acc.compute(), prog_bar=True)
        for m in (loss, nll, acc):
            m.reset()
        if bleu:
            metric = getattr(self, f"{stage}_bleu")
            self.log(f"{stage}_bleu", metric.compute(), prog_bar=True)
            metric.reset()
            exact = getattr(self, f"{stage}_exact")
            for name, value in exact.compute().items():  # the same keys on every process (synchronised counts)
                self.log(f"{stage}_{name}", value)
            exact.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self._bleu_this_epoch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", True)

    # ---------------------------------------------------------------- decoding
    def _decode(self, tokens: torch.Tensor, escape_unk: bool = False) -> str:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "decode_target"):
            return dm.decode_target(tokens, escape_unk=escape_unk)
        ids = [int(t) for t in tokens.tolist() if t not in (self.pad, self.eos)]
        return " ".join("<<unk>>" if escape_unk and i == self.unk else str(i) for i in ids)

    _DECODING_OPTIONS = ("lenpen", "max_len_a", "max_len_b", "min_len", "unk_penalty", "nbest")

    def generate(self, src_tokens: torch.Tensor, beam: int | None = None, **overrides: Any) -> list[list[dict]]:
        """Beam search with the task's settings: per sentence, the best hypotheses (see :func:`beam_search`); an
        empty batch gives an empty list.

        Args:
            src_tokens: (B, S) source token ids, padded with the pad index.
            beam: the beam size (None: the task's ``beam``; 1 gives the greedy translation).
            **overrides: ``lenpen``, ``max_len_a``, ``max_len_b``, ``min_len``, ``unk_penalty``, ``nbest`` instead
                of the task's settings (None: the task's).
        """
        unknown = sorted(set(overrides) - set(self._DECODING_OPTIONS))
        if unknown:
            raise ZooError(
                f"unknown decoding option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                f"give beam or {', '.join(self._DECODING_OPTIONS)}"
            )
        hp = self.hparams
        kwargs = {k: getattr(hp, k) for k in self._DECODING_OPTIONS if k != "nbest"}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        was_training = self.training
        self.eval()
        try:
            return beam_search(self, src_tokens, beam=hp.beam if beam is None else beam, **kwargs)  # type: ignore[arg-type]
        finally:
            self.train(was_training)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> tuple[dict[str, Any], ...]:
        """Translations of ``batch["src_tokens"]`` (or of a (B, S) tensor): a tuple with, per sentence, ``{"id",
        "tokens", "score"}`` plus ``"text"`` when the data module decodes (a tuple, so that ``zoo predict`` counts
        sentences, not dicts)."""
        src = batch["src_tokens"] if isinstance(batch, dict) else batch
        ids = batch["id"].tolist() if isinstance(batch, dict) and "id" in batch else list(range(src.size(0)))
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        out = []
        for i, hyps in zip(ids, self.generate(src)):
            best = hyps[0]
            item = {"id": i, "tokens": best["tokens"], "score": best["score"]}
            if dm is not None and hasattr(dm, "decode_target"):
                item["text"] = dm.decode_target(best["tokens"])
            out.append(item)
        return tuple(out)

    # ---------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """One group of every trainable parameter (tied weights once): fairseq's adam decays all of them."""
        return [{"params": [g for group in parameter_groups(self) for g in group["params"]]}]

    def configure_optimizers(self, total_steps: int | None = None, steps_per_epoch: float | None = None) -> Any:
        """The optimiser over :meth:`parameter_groups` and its schedule, in Lightning's format (the default
        inverse-sqrt schedule steps every update: ``["lr_scheduler"]["interval"] == "step"``).

        Without a Trainer (a plain PyTorch loop) call it as it is and take ``["optimizer"]`` and
        ``["lr_scheduler"]["scheduler"]``; ``total_steps`` (and ``steps_per_epoch``) are needed only by schedules
        that decay over the run (:class:`zoo.tasks.optim.WarmupCosineLR`).
        """
        factory = self.optimizer_factory or type(self).default_optimizer

        def one_group(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return factory([{"params": [p for group in groups for p in group["params"]]}])

        trainer = self._trainer if total_steps is None else None
        return build_optimization(
            self,
            one_group,
            self.lr_scheduler_factory,
            trainer=trainer,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
        )
