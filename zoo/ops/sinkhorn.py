"""Sinkhorn (doubly stochastic) attention, docs/mathematics.md, section 5.

With scores C_ij = scale * q_i . k_j + b_ij (b: the additive form of the masks), Sinkhorn alternates row and
column normalisations of K = exp(C) in the log domain (S2):

    f_i = -logsumexp_j (C_ij + g_j)                              (row step: rows sum to 1)
    g_j = -logsumexp_i (C_ij + f_i) + log(n_rows / n_cols)       (column step: columns sum to n_rows / n_cols)
    K_ij = exp(C_ij + f_i + g_j),   out_i = sum_j K_ij v_j

``n_iter`` counts half-steps, starting with a row step (g = 0): ``n_iter=1`` is softmax attention (it calls
:func:`torch.nn.functional.scaled_dot_product_attention`), odd ``n_iter`` ends on a row step (rows sum to 1),
even ``n_iter`` ends on a column step. n_rows / n_cols count the non-empty rows / columns of the masked kernel
(with padding only: valid queries / valid keys); for odd ``n_iter`` this constant cancels.

For n_iter > 1 the kernel is a custom autograd function that works on a few (batch x head) slices at a time
(about 4 MiB of scores per chunk, at least one slice: cache-sized, faster than larger chunks). Forward computes
each half-step's potential with one log-sum-exp over the chunk's scores and keeps only the potentials (vectors),
q, k, v and the masks; backward recomputes the chunk's scores (one matmul) and each half-step's matrix
exp(C + f + g) from the saved potentials. Memory therefore holds a few score matrices *of one chunk*, never
``n_iter`` copies (nor one copy) of the full (..., L, S) tensor, except under a caller's torch.compile or
torch.export, where the batch runs as one chunk (a loop over chunks would fix the traced graph's batch size: a
dynamic batch dim would recompile or fail to export).
Gradients flow through every half-step (exact unrolled backward, no detaching, no implicit differentiation). The
two chunk functions run under ``torch.compile`` by default (each log-sum-exp and each backward half-step becomes
one fused loop); ``ZOO_COMPILE_SINKHORN=0`` or :func:`set_compile` keeps them eager. ``return_weights=True``
materialises the weights by the same iteration under plain autograd.

Two more kernels compute the same values and gradients, chosen by :func:`kernel_path`: on CUDA the
FlexAttention path (:mod:`zoo.ops.sinkhorn_flex`: one fused attention call per half-step; float32 work, head dims
of at least 16), and, when one slice's
scores exceed ``TILED_MIN_BYTES`` (8 MiB, from about 1,450 x 1,450 tokens), the tiled kernel
(:mod:`zoo.ops.sinkhorn_tiled`: blocks of query rows, scores recomputed in every pass, memory O(L + S) per slice,
cost per score independent of the length).

:func:`attention` is the entry point (it chooses SDPA or the Sinkhorn kernel) and takes one typed mask of
:mod:`zoo.ops.masks`; :func:`sinkhorn_attention` is the same with the masks as tensors (SDPA-style ``attn_mask``,
``nn.MultiheadAttention``-style padding masks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.ops.compiled import CompiledKernels
from zoo.ops.masks import AttentionMask, mask_from_tensors, resolve
from zoo.ops.sinkhorn_flex import flex_available, flex_sinkhorn
from zoo.ops.sinkhorn_tiled import set_compile as _set_tiled_compile
from zoo.ops.sinkhorn_tiled import tiled_sinkhorn

__all__ = [
    "attention",
    "check_n_iter",
    "sinkhorn_attention",
    "attention_column_sums",
    "column_sum_stats",
    "set_compile",
    "kernel_path",
]

_CHUNK_BYTES = 4 * 2**20  # score-matrix bytes per chunk of (batch x head) slices (cache-sized: faster than larger)
# float32 scores of one slice above which the tiled kernel runs (see kernel_path): measured on CPU, the chunked
# kernel wins while a slice stays in cache (1,024 tokens: 4 MiB), the tiled one from 2,048 tokens (16 MiB) on
TILED_MIN_BYTES = 8 * 2**20


# ------------------------------------------------------------------------------------------------ argument checks


def check_n_iter(n_iter: Any) -> int:
    """``n_iter`` (Sinkhorn half-steps) as an int >= 1, or one ZooError naming the problem and the fix: the one
    check of the op, the attention modules and the families that pass it on."""
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ZooError(
            f"n_iter must be an integer >= 1 (Sinkhorn half-steps; 1 is softmax attention, odd values such as "
            f"3 or 5 end on a row normalisation), got {n_iter!r}"
        )
    return n_iter


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_iter: int, dropout_p: float) -> torch.Size:
    """Shape-only checks (no host sync); returns the broadcast leading shape."""
    check_n_iter(n_iter)
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        kinds = ", ".join(type(t).__name__ for t in (q, k, v))
        raise ZooError(f"sinkhorn_attention: q, k, v must be tensors, got {kinds}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ZooError(
            f"sinkhorn_attention: q, k, v must be floating point (float32, float64, bfloat16 or float16), got "
            f"{q.dtype}, {k.dtype}, {v.dtype}: convert them first (e.g. q.float())"
        )
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise ZooError(
            f"sinkhorn_attention: q, k, v must have shape (..., L, E), (..., S, E), (..., S, Ev); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ZooError(
            f"sinkhorn_attention: q and k must have the same last (embedding) dim, got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}: project them to the same head dim"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ZooError(
            f"sinkhorn_attention: k and v must have the same length S (dim -2), got k {tuple(k.shape)} and "
            f"v {tuple(v.shape)}: pass one value per key"
        )
    try:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError as err:
        raise ZooError(
            f"sinkhorn_attention: the leading (batch, head) dims of q {tuple(q.shape)}, k {tuple(k.shape)} and "
            f"v {tuple(v.shape)} do not broadcast: use the same (B, H) for all three"
        ) from err
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ZooError(f"sinkhorn_attention: dropout_p must be in [0, 1), got {dropout_p}")
    return lead


def _compact(bias: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """bias broadcastable to (*lead, L, S) as (Nb, L or 1, S or 1) plus the index of each flattened lead slice.

    Avoids materialising a (N, L, S) copy of a mask that broadcasts over heads (key padding, a shared mask).
    """
    b = bias.reshape((1,) * (len(lead) + 2 - bias.dim()) + tuple(bias.shape))
    blead = b.shape[:-2]
    nb = math.prod(blead)
    idx = torch.arange(nb, device=bias.device).reshape(blead).expand(lead).reshape(-1)
    return b.reshape(nb, *b.shape[-2:]), idx


# ------------------------------------------------------------------------------------------------ kernel


def _neg_lse_safe(x: torch.Tensor, dim: int, masked: bool) -> torch.Tensor:
    """-logsumexp along dim for autograd (the weights path): 0 for an empty (all -inf) row / column, with a zero
    (not NaN) gradient.

    logsumexp's backward, exp(x - lse), is NaN when x and lse are both -inf, and a where after it does not stop
    0 * NaN: the empty rows are replaced by zeros *before* the log-sum-exp.
    """
    if not masked:
        return -torch.logsumexp(x, dim, keepdim=True)
    empty = (x == float("-inf")).all(dim, keepdim=True)
    lse = torch.logsumexp(torch.where(empty, 0.0, x), dim, keepdim=True)
    return torch.where(empty, 0.0, -lse)


# The kernel of n_iter > 1 (custom autograd function below). Forward keeps only the potentials (vectors): f_l
# (N, L, 1) after a row step l, g_l (N, 1, S) after a column step, without the log(n_rows / n_cols) constant
# (applied to the output instead). Half-step l's matrix is P_l = exp(C + pots[l-1] + pots[l-2]) (rows or
# columns sum to 1), so backward recomputes C with one matmul and each P_l with one fused exp, with no
# log-sum-exp. Unrolled backward (exact, through every half-step): with dC the gradient of the scores and d the
# gradient of pots[l-1], a row step gives dC -= d * P_l and d(pots[l-2]) = -sum_i d_i P_l,ij (a column step the
# same along the other axis). The step functions are out of place so that torch.compile fuses each into one loop.


def _neg_lse(x: torch.Tensor, dim: int, masked: bool) -> torch.Tensor:
    """-logsumexp along dim; 0 (not +inf) for an empty (all -inf) row / column, so its entries stay -inf (masked
    entries are -inf in C; with no mask no row or column is empty)."""
    lse = torch.logsumexp(x, dim, keepdim=True)
    return torch.where(lse == float("-inf"), 0.0, -lse) if masked else -lse


def _potentials(
    c: torch.Tensor, n_iter: int, masked: bool, neg_lse: Callable[..., torch.Tensor] = _neg_lse
) -> list[torch.Tensor]:
    """pots[l-1]: f = -lse_j(C + g) after row step l (odd), g = -lse_i(C + f) after column step l (even).

    The one Sinkhorn iteration: the kernel runs it with :func:`_neg_lse` (its backward is written by hand), the
    weights path with :func:`_neg_lse_safe` (plain autograd through every half-step).
    """
    pots = [neg_lse(c, -1, masked)]
    for step in range(2, n_iter + 1):
        pots.append(neg_lse(c + pots[-1], -1 if step % 2 == 1 else -2, masked))
    return pots


def _last_matrix(c: torch.Tensor, pots: list[torch.Tensor]) -> torch.Tensor:
    """P_n = exp(C + f + g), the last half-step's matrix (the weights up to dropout and log(n_rows / n_cols));
    exp(C + f_1), the row softmax, for n_iter = 1."""
    return (c + pots[-1] + pots[-2]).exp() if len(pots) > 1 else (c + pots[0]).exp()


def _sinkhorn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor | None,
    factor: torch.Tensor | None,
    n_iter: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One chunk: out = factor * ((P_n * keep) v) and the potentials; q is pre-scaled, factor (N, 1, 1) or None."""
    c = _scores(q, k, bias)
    pots = _potentials(c, n_iter, bias is not None)
    p = _last_matrix(c, pots)
    out = torch.bmm(p if keep is None else p * keep, v)
    return (out if factor is None else out * factor), pots


def _sinkhorn_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor | None,
    factor: torch.Tensor | None,
    pots: list[torch.Tensor],
    dout: torch.Tensor,
    n_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (to be multiplied by the scale), dk, dv of one chunk, recomputing C and each P_l from the potentials."""
    c = _scores(q, k, bias)
    p = _last_matrix(c, pots)
    if factor is not None:
        dout = dout * factor
    dp = torch.bmm(dout, v.transpose(-1, -2))
    if keep is not None:
        dp, p_kept = dp * keep, p * keep
    else:
        p_kept = p
    dv = torch.bmm(p_kept.transpose(-1, -2), dout)
    if n_iter % 2 == 1:  # last step on rows: softmax backward
        dc = p * (dp - (p * dp).sum(-1, keepdim=True))
        d = dc.sum(-2, keepdim=True)  # gradient of g_{n-1}
    else:  # last step on columns
        y = dp * p
        dc = y - p * y.sum(-2, keepdim=True)
        d = dc.sum(-1, keepdim=True)  # gradient of f_{n-1}
    for step in range(n_iter - 1, 1, -1):
        t = (c + pots[step - 1] + pots[step - 2]).exp() * d
        dc, d = dc - t, -t.sum(-2 if step % 2 == 1 else -1, keepdim=True)
    dc = dc - (c + pots[0]).exp() * d  # step 1: f_1 = -lse_j(C)
    return torch.bmm(dc, k), torch.bmm(dc.transpose(-1, -2), q), dv


def _scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """C = q k^T + bias with q already scaled."""
    kt = k.transpose(-1, -2)
    return torch.bmm(q, kt) if bias is None else torch.baddbmm(bias, q, kt)


# By default the two chunk functions run compiled (torch.compile, dynamic shapes, one graph per n_iter / mask /
# dropout / dtype variant): inductor fuses each log-sum-exp and each backward half-step into one loop over the
# chunk, ~1.3x faster than eager on CPU. ZOO_COMPILE_SINKHORN=0 (or set_compile(False)) keeps them eager (same
# values up to float rounding); a failed compilation falls back to eager once, with a warning.
_KERNELS = CompiledKernels(
    {"forward": _sinkhorn_forward, "backward": _sinkhorn_backward},
    env="ZOO_COMPILE_SINKHORN",
    what="the compiled Sinkhorn kernels",
)


def set_compile(enabled: bool) -> None:
    """Run the Sinkhorn chunk and tile kernels compiled (``enabled`` True, the default) or as eager PyTorch ops
    (False)."""
    _KERNELS.set_enabled(enabled)
    _set_tiled_compile(enabled)


def _kernel(name: str) -> Callable[..., Any]:
    """The forward or backward chunk function: compiled when enabled (eager under a caller's torch.compile)."""
    return _KERNELS[name]


class _SinkhornFunction(torch.autograd.Function):
    """out = W v with W the Sinkhorn weights; chunked over the flattened leading dim, recomputed in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        bias_idx: torch.Tensor | None,
        keep: torch.Tensor | None,
        n_iter: int,
        scale: float,
        factor: torch.Tensor | None,
        chunk: int,
    ) -> torch.Tensor:
        N = q.shape[0]
        qs = q * scale  # scale the (N, L, E) factor, not the (N, L, S) product
        fwd = _kernel("forward")
        ctx.cfg = (n_iter, scale, chunk)
        if chunk == 0:  # one piece (a symbolic N under tracing: no loop over its chunks)
            out, flat = fwd(qs, k, v, None if bias is None else bias[bias_idx], keep, factor, n_iter)
            ctx.save_for_backward(qs, k, v, bias, bias_idx, keep, factor, *flat)
            return out
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        pots: list[list[torch.Tensor]] = []
        for i in range(0, N, chunk):
            sl = slice(i, min(i + chunk, N))
            out[sl], p = fwd(
                qs[sl],
                k[sl],
                v[sl],
                None if bias is None else bias[bias_idx[sl]],
                None if keep is None else keep[sl],
                None if factor is None else factor[sl],
                n_iter,
            )
            pots.append(p)
        flat = [torch.cat([p[j] for p in pots]) for j in range(n_iter)]  # (N, L, 1) / (N, 1, S) each
        ctx.save_for_backward(qs, k, v, bias, bias_idx, keep, factor, *flat)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        qs, k, v, bias, bias_idx, keep, factor, *pots = ctx.saved_tensors
        n_iter, scale, chunk = ctx.cfg
        dout = dout.to(qs.dtype)
        bwd = _kernel("backward")
        if chunk == 0:  # one piece, as in forward
            dq, dk, dv = bwd(qs, k, v, None if bias is None else bias[bias_idx], keep, factor, pots, dout, n_iter)
            return dq.mul_(scale), dk, dv, None, None, None, None, None, None, None
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(k), torch.empty_like(v)
        N = qs.shape[0]
        for i in range(0, N, chunk):
            sl = slice(i, min(i + chunk, N))
            dq[sl], dk[sl], dv[sl] = bwd(
                qs[sl],
                k[sl],
                v[sl],
                None if bias is None else bias[bias_idx[sl]],
                None if keep is None else keep[sl],
                None if factor is None else factor[sl],
                [p[sl] for p in pots],
                dout[sl],
                n_iter,
            )
        return dq.mul_(scale), dk, dv, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ public API


def sinkhorn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_iter: int = 3,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    *,
    query_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn attention: ``n_iter`` alternating row / column normalisations of exp(C), then ``W v`` (S2).

    The masks as tensors: builds the typed mask (:func:`zoo.ops.masks.mask_from_tensors`) and calls
    :func:`attention`.

    Args:
        q, k, v: (..., L, E), (..., S, E), (..., S, Ev) as in ``F.scaled_dot_product_attention``; the leading
            dims broadcast (one leading dim, or none, is fine).
        n_iter: half-steps, >= 1. 1 = softmax attention (SDPA itself); odd values end on a row step (rows sum
            to 1, the published choice, 3-5 in practice); even values end on a column step.
        attn_mask: bool (True = may attend) or additive float, broadcastable to (..., L, S). Sinkhorn runs on the
            masked kernel exp(C) * [allowed]: masked entries get zero weight and the marginals are imposed on the
            entries left. With a causal mask the column step therefore makes each key's mass over the queries
            *after* it equal to n_rows / n_cols (the limit of a lower-triangular doubly stochastic matrix is the
            identity), which is not the usual column constraint: the published models keep softmax
            (``n_iter=1``) in causal decoders. A float mask is a constant (no gradient) when n_iter > 1.
        key_padding_mask: bool (B, S), True = padded key (``nn.MultiheadAttention``'s convention); B is the first
            leading dim of q, and the mask broadcasts over every other leading dim (heads): it is viewed as
            (B, 1, ..., 1, S). Padded keys get zero weight and are not counted in the column marginals.
        scale: score scale, default 1 / sqrt(E).
        dropout_p: dropout on the final weights (like SDPA: applied whenever dropout_p > 0, so pass 0.0 in eval).
        return_weights: also return the weights W (..., L, S) (materialised, plain autograd: n_iter copies of
            the scores are kept; use it for diagnostics, see :func:`column_sum_stats`).
        query_padding_mask: bool (B, L), True = padded query. When it is None and L == S (self-attention) the
            key padding mask also marks the queries; pass an all-False mask to keep every query.

    Padded queries (and rows with no allowed key) are left out of the column sums and their output rows and
    weights are zero, so each sequence of a padded batch gets the result it would get alone. Rows / columns
    with nothing allowed give zeros, never NaN. n_rows / n_cols are the numbers of non-empty rows / columns.
    Empty dimensions give what SDPA gives for every ``n_iter``: with no (batch x head) slice or no query, an
    empty output (and weights); with no key (S = 0), zero output rows (W v is an empty sum; the weights are an
    empty (..., L, 0) tensor), like a row with every key masked; backward gives gradients of the inputs' shapes
    (zero for q when S = 0). E = 0 (empty dot products) makes every score 0 whatever the scale.
    bf16 / fp16 inputs are computed in float32 and returned in q's dtype. Under autocast the output has the autocast
    dtype for every ``n_iter``, as SDPA's (``n_iter=1``; float64 inputs stay float64), while the iterations still run in
    float32. q, k and v must be floating point (one ZooError otherwise).

    Returns:
        out (..., L, Ev), or (out, weights) with ``return_weights=True``.
    """
    same_length = q.dim() >= 2 and k.dim() >= 2 and q.shape[-2] == k.shape[-2]
    if query_padding_mask is None and key_padding_mask is not None and same_length:
        query_padding_mask = key_padding_mask  # self-attention: the padded keys are the padded queries
    mask = mask_from_tensors(attn_mask, key_padding_mask, query_padding_mask)
    return attention(q, k, v, mask, n_iter, scale=scale, dropout_p=dropout_p, return_weights=return_weights)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask | None = None,
    n_iter: int = 3,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The attention entry point: softmax (``n_iter=1``, ``F.scaled_dot_product_attention``) or Sinkhorn (S2).

    The one place that chooses the kernel: ``n_iter == 1`` without ``return_weights`` is SDPA itself (the padded
    queries' output rows set to zero); otherwise the Sinkhorn op (chunked custom autograd function, or the
    materialised weights with ``return_weights=True``). Semantics as :func:`sinkhorn_attention`, with the masks
    given as one typed mask of :mod:`zoo.ops.masks` (``PaddingMask``, ``CausalMask``, ``AllowedMask``,
    ``BlockedMask``, ``AdditiveMask``, or their combination ``a & b``); a :class:`~zoo.ops.masks.PaddingMask`
    marks only the queries it names (no self-attention default).

    Args:
        q, k, v: (..., L, E), (..., S, E), (..., S, Ev), leading dims broadcasting.
        mask: the typed mask, or None.
        n_iter: Sinkhorn half-steps, >= 1 (1 = softmax attention).
        scale: score scale, default 1 / sqrt(E).
        dropout_p: dropout on the final weights (applied whenever > 0).
        return_weights: also return the weights W (..., L, S).

    Returns:
        out (..., L, Ev), or (out, weights) with ``return_weights=True``.
    """
    lead = _check_inputs(q, k, v, n_iter, dropout_p)
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    # E = 0: every score is an empty dot product, 0 whatever the scale (SDPA gives uniform weights too)
    scale = (1.0 / math.sqrt(E) if E > 0 else 1.0) if scale is None else float(scale)
    masks = resolve(mask, lead, L, S, q.device)

    if n_iter == 1 and not return_weights:
        # softmax attention: SDPA itself, query padding applied to the output rows only
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=masks.sdpa_mask(q.dtype), dropout_p=dropout_p, scale=scale
        )
        return masks.zero_padded_queries(out)

    out_dtype = _output_dtype(q)
    f32 = torch.float64 if q.dtype == torch.float64 else torch.float32  # working dtype
    bias = masks.bias(f32)
    masked = bias is not None
    # an empty kernel (no (batch x head) slice, no query or no key): no iteration to run; the weights are an empty
    # (..., L, S) tensor and out = W v is empty, or zero rows when S = 0 (an empty sum, as SDPA returns)
    empty = math.prod(lead) * L * S == 0
    device_type = q.device.type
    with torch.autocast(device_type, enabled=False):
        qf, kf, vf = (t.to(f32) for t in (q, k, v))
        log_ratio = None
        if n_iter % 2 == 0 and bias is not None:
            valid = (bias > float("-inf")).expand(*lead, L, S)
            n_rows = valid.any(-1).sum(-1, keepdim=True).clamp_min(1)
            n_cols = valid.any(-2).sum(-1, keepdim=True).clamp_min(1)
            log_ratio = (n_rows.to(f32).log() - n_cols.to(f32).log())[..., None]  # (..., 1, 1)
        elif n_iter % 2 == 0 and L != S and not empty:
            log_ratio = torch.full((*lead, 1, 1), math.log(L / S), dtype=f32, device=q.device)

        if return_weights or empty:  # the empty kernel through plain autograd too: gradients of the right shapes
            out, w = _weights_path(qf, kf, vf, bias, n_iter, scale, masked, log_ratio, lead, dropout_p)
            return (out.to(out_dtype), w.to(out_dtype)) if return_weights else out.to(out_dtype)

        N = math.prod(lead)
        qn = qf.expand(*lead, L, E).reshape(N, L, E)
        kn = kf.expand(*lead, S, E).reshape(N, S, E)
        vn = vf.expand(*lead, S, vf.shape[-1]).reshape(N, S, vf.shape[-1])
        bn, bidx = (None, None) if bias is None else _compact(bias, lead)
        # output factor: n_rows / n_cols (even n_iter) times the dropout rescaling, (N, 1, 1) or None
        factor = None if log_ratio is None else log_ratio.expand(*lead, 1, 1).reshape(N, 1, 1).exp()
        keep = None
        if dropout_p > 0.0:
            keep = torch.empty((N, L, S), dtype=torch.bool, device=q.device).bernoulli_(1.0 - dropout_p)
            keep_scale = torch.full((N, 1, 1), 1.0 / (1.0 - dropout_p), dtype=f32, device=q.device)
            factor = keep_scale if factor is None else factor * keep_scale
        path = kernel_path(q.device, L, S, dropout_p, dtype=f32, qk_dim=E, v_dim=vf.shape[-1])
        if path == "flex":
            out = flex_sinkhorn(qn, kn, vn, bn, bidx, factor, n_iter, scale)
        elif path == "tiled":
            out = tiled_sinkhorn(qn, kn, vn, bn, bidx, factor, n_iter, scale)
        else:
            # under a caller's tracing (torch.compile, torch.export) the whole batch as one chunk (0): a loop over
            # chunks would specialise the traced graph to the example's batch size (a dynamic batch dim, which Dynamo
            # does not tell apart from a static one here)
            chunk = 0 if torch.compiler.is_compiling() else max(1, _CHUNK_BYTES // (4 * L * S))
            out = _SinkhornFunction.apply(qn, kn, vn, bn, bidx, keep, n_iter, scale, factor, chunk)
        return out.reshape(*lead, L, vf.shape[-1]).to(out_dtype)


def _output_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the Sinkhorn path returns: SDPA's (``n_iter=1``), so that the output dtype does not depend on
    ``n_iter``. Under autocast SDPA runs in the autocast dtype (float64 inputs excepted: autocast leaves them), so that
    dtype; else q's. The iterations themselves run in float32 (float64 for float64 inputs) either way.
    ``q``: the queries."""
    device_type = q.device.type
    if (
        q.dtype != torch.float64
        and torch.amp.is_autocast_available(device_type)
        and torch.is_autocast_enabled(device_type)
    ):
        return torch.get_autocast_dtype(device_type)
    return q.dtype


def kernel_path(
    device: torch.device,
    L: int,
    S: int,
    dropout_p: float = 0.0,
    *,
    dtype: torch.dtype = torch.float32,
    qk_dim: int = 64,
    v_dim: int | None = None,
) -> str:
    """Which kernel runs Sinkhorn attention (n_iter > 1, no ``return_weights``) for scores of shape (..., L, S):

    * ``"flex"`` on CUDA where ``torch.nn.attention.flex_attention`` exists, for float32 work and head dims of at
      least 16 (:func:`zoo.ops.sinkhorn_flex.flex_available`; :mod:`zoo.ops.sinkhorn_flex`);
    * ``"tiled"`` (:mod:`zoo.ops.sinkhorn_tiled`, memory O(L + S) per slice) when one (batch x head) slice's
      float32 scores exceed ``TILED_MIN_BYTES`` (8 MiB: L * S > 2**21, e.g. from 2,048 x 2,048 tokens), where a
      whole slice no longer stays in cache and the tiled passes win;
    * ``"chunked"`` otherwise: the chunked kernel (a few whole slices at a time, one matmul fewer per pass), and
      always with dropout (its mask is drawn per weight) or, where FlexAttention does not run, under a caller's
      ``torch.compile`` (one chunk of the whole batch in the caller's graph, rather than one call per tile).
      FlexAttention is made for a caller's ``torch.compile``: its calls join the caller's graph.

    Args:
        device: the inputs' device.
        L, S: query and key lengths.
        dropout_p: the dropout probability (dropout keeps the chunked kernel).
        dtype: the working dtype (float32, or float64 for float64 inputs).
        qk_dim, v_dim: the query/key and value head dims (``v_dim`` None: ``qk_dim``).
    """
    if dropout_p > 0.0:
        return "chunked"
    if flex_available(device, dtype, qk_dim, v_dim):
        return "flex"
    if torch.compiler.is_compiling():
        return "chunked"
    return "tiled" if 4 * L * S > TILED_MIN_BYTES else "chunked"


def _weights_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    n_iter: int,
    scale: float,
    masked: bool,
    log_ratio: torch.Tensor | None,
    lead: torch.Size,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised weights with plain autograd (for ``return_weights=True``): the kernel's iteration
    (:func:`_potentials`, :func:`_last_matrix`) on the whole (N, L, S) scores, W = P_n * n_rows / n_cols, out = W v.

    The kernel exists for memory (it keeps only the potentials and recomputes the scores in backward); the
    weights, once asked for, are materialised anyway, so autograd through the same iteration costs no more.
    """
    L, S, N = q.shape[-2], k.shape[-2], math.prod(lead)  # N, not -1: the reshapes must work when L or S is 0
    lead_q = q.expand(*lead, L, q.shape[-1]).reshape(N, L, q.shape[-1])
    lead_k = k.expand(*lead, S, k.shape[-1]).reshape(N, S, k.shape[-1])
    b = None if bias is None else bias.expand(*lead, L, S).reshape(N, L, S)
    r = None if log_ratio is None else log_ratio.expand(*lead, 1, 1).reshape(N, 1, 1)
    c = _scores(lead_q * scale, lead_k, b)  # scale the (N, L, E) factor, not the (N, L, S) product
    w = _last_matrix(c, _potentials(c, n_iter, masked, _neg_lse_safe))
    w = (w if r is None else w * r.exp()).reshape(*lead, L, S)
    wd = F.dropout(w, dropout_p) if dropout_p > 0.0 else w
    return wd @ v, w


def attention_column_sums(
    weights: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Column sums of attention weights (..., L, S), rescaled by n_keys / n_queries: sum_i W_ij * S / L.

    1 for every column of a doubly stochastic (Sinkhorn-limit) matrix; softmax attention has rows summing to 1
    and columns anywhere in [0, L * S / L]. Padding masks (bool (B, S) / (B, L), True = padded, B the first
    leading dim) restrict the counts to valid tokens; padded keys give NaN (ignored by :func:`column_sum_stats`).

    Args:
        weights: attention weights (..., L, S), e.g. ``sinkhorn_attention(..., return_weights=True)[1]``.
        key_padding_mask: bool (B, S), True = padded key, or None.
        query_padding_mask: bool (B, L), True = padded query, or None (then, when L == S, the key padding mask).

    Returns (..., S).
    """
    lead = weights.shape[:-2]
    L, S = weights.shape[-2:]
    w = weights.to(torch.float32)
    if query_padding_mask is None and key_padding_mask is not None and L == S:
        query_padding_mask = key_padding_mask
    n_q = torch.full((), float(L), device=w.device)
    n_k = torch.full((), float(S), device=w.device)
    if query_padding_mask is not None:
        qv = (~query_padding_mask).view(query_padding_mask.shape[0], *[1] * (len(lead) - 1), L)
        w = w * qv[..., None]
        n_q = qv.sum(-1, keepdim=True).to(torch.float32)
    cols = w.sum(-2)
    if key_padding_mask is not None:
        kv = (~key_padding_mask).view(key_padding_mask.shape[0], *[1] * (len(lead) - 1), S)
        n_k = kv.sum(-1, keepdim=True).to(torch.float32)
        cols = (cols * n_k / n_q).masked_fill(~kv, float("nan"))
        return cols
    return cols * n_k / n_q


def column_sum_stats(
    weights: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The column-sum diagnostic (docs/mathematics.md, section 5): statistics of the rescaled column sums
    c_j = (S / L) sum_i W_ij over valid keys.

    Returns 0-dim tensors (no host sync): ``mean``, ``std``, ``min``, ``max`` of c and ``dev`` = mean |c - 1|
    (0 for a doubly stochastic matrix; trained Transformers drift towards 0). Arguments as in
    :func:`attention_column_sums`.
    ``weights``: the attention weights (..., L, S); ``key_padding_mask`` / ``query_padding_mask``: bool (B, S) /
    (B, L), True = padded.
    """
    c = attention_column_sums(weights, key_padding_mask, query_padding_mask).flatten()
    ok = ~torch.isnan(c)
    cnt = ok.sum().clamp_min(1)
    z = torch.where(ok, c, torch.zeros_like(c))
    mean = z.sum() / cnt
    var = torch.where(ok, (c - mean) ** 2, torch.zeros_like(c)).sum() / cnt
    inf = torch.full_like(c, float("inf"))
    # min / max over no valid column: +inf / -inf (as with every key padded); amin of an empty tensor raises
    low, high = torch.where(ok, c, inf), torch.where(ok, c, -inf)
    if c.numel() == 0:  # a shape, not a value: no host sync
        low, high = c.new_full((1,), float("inf")), c.new_full((1,), float("-inf"))
    return {
        "mean": mean,
        "std": var.sqrt(),
        "min": low.amin(),
        "max": high.amax(),
        "dev": torch.where(ok, (c - 1).abs(), torch.zeros_like(c)).sum() / cnt,
    }
