"""Sinkhorn attention on FlexAttention (``torch.nn.attention.flex_attention``): the CUDA path of the op.

Every half-step of the log-domain iteration of :mod:`zoo.ops.sinkhorn` is one fused attention call whose
``score_mod`` adds the mask bias and the other potential to the scores C = scale q k^T, and whose log-sum-exp
(``return_aux=AuxRequest(lse=True)``) is the new potential:

    row step l:     f_l = -lse_j(C_ij + g_{l-1,j})       flex(q, k, ·, score_mod: + g_{l-1}[kv])
    column step l:  g_l = -lse_i(C_ij + f_{l-1,i})       flex(k, q, ·, score_mod: + f_{l-1}[kv]), the transposed call

The output is the last call's: after a last row step its attention output is softmax_j(C + g_{n-1}) v = P_n v;
after a last column step one more call with both potentials gives softmax_j(C + f + g) v times exp(lse) = P_n v.
Empty rows / columns (all -inf) give a 0 potential, as in the other kernels. Gradients are FlexAttention's own
(through the outputs, the log-sum-exps and the potentials captured by ``score_mod``): the exact unrolled backward
of the iteration. FlexAttention's forward runs on every device (unfused, materialising the scores, without
``torch.compile``); its fused kernels and its backward need CUDA, which is where the op selects this path, for
head dims of at least 16 (Triton's matrix product) and float32 work (its log-sum-exp is float32 whatever the
inputs' dtype, so float64 stays on the exact kernels).

The slices are FlexAttention's batch, (N, 1, L, E) with one head: its head count is compiled as a static size,
the batch is not. The calls are compiled once with automatic dynamic shapes (a second sequence length or batch
size makes those sizes symbolic, rather than one compilation per length) and a recompilation budget of their own:
under torch's shared default of 8, a third sequence length already sent every later call to the unfused path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FLEX_MIN_HEAD_DIM", "FLEX_RECOMPILE_LIMIT", "compile_flex", "flex_available", "flex_sinkhorn"]

try:  # FlexAttention (torch >= 2.5; the aux request API since 2.9)
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention
except ImportError:  # pragma: no cover - an older torch: the op uses its other kernels
    flex_attention = None  # type: ignore[assignment]
    AuxRequest = None  # type: ignore[assignment,misc]

# Triton's tl.dot, under FlexAttention's CUDA kernels, needs query/key and value widths of at least 16
FLEX_MIN_HEAD_DIM = 16
# compiled variants of the calls: 2 (row and column calls) x mask layouts x static / dynamic sizes stay far below
# this; past it torch falls back to the unfused path (correct, slow)
FLEX_RECOMPILE_LIMIT = 64

_COMPILED: dict[str, Callable[..., Any]] = {}


def flex_available(
    device: torch.device, dtype: torch.dtype = torch.float32, qk_dim: int = FLEX_MIN_HEAD_DIM, v_dim: int | None = None
) -> bool:
    """Whether FlexAttention's fused kernels (and backward) run this attention: CUDA, a torch that has them, float32
    work and head dims of at least ``FLEX_MIN_HEAD_DIM``.

    Args:
        device: the device the attention runs on.
        dtype: the working dtype (float32, or float64 for float64 inputs).
        qk_dim, v_dim: the query/key and value head dims (``v_dim`` None: ``qk_dim``).
    """
    v_dim = qk_dim if v_dim is None else v_dim
    return (
        flex_attention is not None
        and device.type == "cuda"
        and dtype == torch.float32
        and min(qk_dim, v_dim) >= FLEX_MIN_HEAD_DIM
    )


def compile_flex(backend: str | Callable[..., Any] = "inductor") -> Callable[..., Any]:
    """flex_attention under torch.compile as this path runs it: automatic dynamic shapes and a recompilation budget
    of its own (``FLEX_RECOMPILE_LIMIT``). ``backend``: the torch.compile backend (tests trace with ``"eager"``)."""
    return torch.compile(
        flex_attention, dynamic=None, backend=backend, recompile_limit=FLEX_RECOMPILE_LIMIT, isolate_recompiles=True
    )


def _flex(compiled: bool) -> Callable[..., Any]:
    """flex_attention, wrapped once in torch.compile for the fused kernels (eager: the unfused reference)."""
    if not compiled or torch.compiler.is_compiling():
        return flex_attention
    fn = _COMPILED.get("flex")
    if fn is None:
        fn = _COMPILED["flex"] = compile_flex()
    return fn


def _bias_mod(
    bias: torch.Tensor | None, bias_idx: torch.Tensor | None, transposed: bool
) -> Callable[[Any, Any, Any], torch.Tensor] | None:
    """bias(b, q_idx, kv_idx) of the compact bias (Nb, L or 1, S or 1) for the (N, 1, ., .) layout (batch index b =
    slice); with ``transposed`` the call's queries are the keys."""
    if bias is None:
        return None
    assert bias_idx is not None
    rows, cols = bias.shape[1] > 1, bias.shape[2] > 1

    def mod(b: Any, i: Any, j: Any) -> torch.Tensor:
        qi, kj = (j, i) if transposed else (i, j)
        return bias[bias_idx[b], qi if rows else 0, kj if cols else 0]

    return mod


def _score_mod(
    bias: Callable[[Any, Any, Any], torch.Tensor] | None, row: torch.Tensor, col: torch.Tensor
) -> Callable[..., torch.Tensor]:
    """score_mod(score, b, h, i, j) = score + bias(b, i, j) + row[b, i] + col[b, j]. Every call adds both vectors
    (zeros where a step has no potential there), so every row step and the closing call of an even ``n_iter``
    trace to one graph and the column steps (transposed) to another, instead of one per combination of terms."""

    def mod(score: torch.Tensor, b: Any, h: Any, i: Any, j: Any) -> torch.Tensor:
        if bias is not None:
            score = score + bias(b, i, j)
        return score + row[b, i] + col[b, j]

    return mod


def flex_sinkhorn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    bias_idx: torch.Tensor | None,
    factor: torch.Tensor | None,
    n_iter: int,
    scale: float,
    compiled: bool = True,
) -> torch.Tensor:
    """Sinkhorn attention out = factor * P_n v of flattened (N, L, E), (N, S, E), (N, S, Ev) inputs on
    FlexAttention (plain autograd through its calls).

    Args:
        q, k, v: (N, L, E), (N, S, E), (N, S, Ev) float tensors (q not scaled).
        bias: additive mask bias (Nb, L or 1, S or 1) (0 / -inf for bool masks) or None.
        bias_idx: (N,) index into the bias's first dim for each slice (None when bias is None).
        factor: (N, 1, 1) output factor (n_rows / n_cols of an even ``n_iter``) or None.
        n_iter: Sinkhorn half-steps, >= 2.
        scale: score scale.
        compiled: run flex_attention under torch.compile (fused kernels; CUDA). False: the unfused eager
            reference (any device, forward only on CPU).

    Returns (N, L, Ev).
    """
    if flex_attention is None:  # pragma: no cover
        raise RuntimeError("flex_sinkhorn needs torch.nn.attention.flex_attention (torch >= 2.9)")
    flex = _flex(compiled)
    masked = bias is not None
    qf, kf, vf = q[:, None], k[:, None], v[:, None]  # (N, 1, ., .): FlexAttention's batch = the slices
    row_bias, col_bias = _bias_mod(bias, bias_idx, False), _bias_mod(bias, bias_idx, True)

    def potential(lse: torch.Tensor) -> torch.Tensor:
        lse = lse[:, 0]
        return torch.where(lse == float("-inf"), 0.0, -lse) if masked else -lse

    N, L, S = q.shape[0], q.shape[1], k.shape[1]
    zeros_l = q.new_zeros(N, L)  # the vectors a call adds where its step has no potential
    zeros_s = q.new_zeros(N, S)
    f: torch.Tensor = zeros_l  # (N, L)
    g: torch.Tensor = zeros_s  # (N, S): g_0 = 0
    out: torch.Tensor | None = None
    for step in range(1, n_iter + 1):
        if step % 2 == 1:
            mod = _score_mod(row_bias, zeros_l, g)
            o, aux = flex(qf, kf, vf, score_mod=mod, scale=scale, return_aux=AuxRequest(lse=True))
            f, out = potential(aux.lse), o[:, 0]
        else:
            # the transposed call: the queries are the keys (f indexed by the call's kv index); the value is
            # irrelevant (q, of a supported width)
            mod = _score_mod(col_bias, zeros_s, f)
            _, aux = flex(kf, qf, qf, score_mod=mod, scale=scale, return_aux=AuxRequest(lse=True))
            g = potential(aux.lse)
    if n_iter % 2 == 0:  # last step on columns: P_n = exp(C + f_{n-1} + g_n), rows not normalised
        mod = _score_mod(row_bias, f, g)
        o, aux = flex(qf, kf, vf, score_mod=mod, scale=scale, return_aux=AuxRequest(lse=True))
        out = o[:, 0] * aux.lse[:, 0].exp()[..., None]
    assert out is not None
    return out if factor is None else out * factor
