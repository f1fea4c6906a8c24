"""Typed attention masks (as xformers' attention-bias classes), converted once into what the attention op needs.

Every mask says what it means in its type, so no caller flips a polarity:

    PaddingMask(keys, queries)   bool (B, S) / (B, L), True = padded token (no weight; out of the Sinkhorn marginals)
    CausalMask()                 query i attends to keys j <= i (top-left aligned, as ``torch.ones(L, S).tril()``)
    AllowedMask(allowed)         bool, True = may attend (SDPA's convention), broadcastable to (..., L, S)
    BlockedMask(blocked)         bool, True = may NOT attend (``nn.MultiheadAttention`` / fairseq's convention)
    AdditiveMask(bias)           float added to the scores, -inf (or the dtype's min) = not allowed, broadcastable
                                 to (..., L, S)

``a & b`` combines masks (a :class:`CombinedMask`). :func:`resolve` is the one conversion: it checks the shapes
against the scores' (..., L, S) and gives the dense attention mask that SDPA takes, the padding masks, and the
additive bias b of the Sinkhorn op (C = scale * q k^T + b).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoo.errors import ZooError

__all__ = [
    "AttentionMask",
    "PaddingMask",
    "CausalMask",
    "AllowedMask",
    "BlockedMask",
    "AdditiveMask",
    "CombinedMask",
    "ResolvedMask",
    "blocked_entries",
    "mask_from_tensors",
    "resolve",
]


class AttentionMask:
    """Base of the typed masks: ``a & b`` combines two masks; ``pad_keys(n)`` appends ``n`` key columns that every
    query may attend to (``nn.MultiheadAttention``'s ``bias_k`` / ``add_zero_attn`` keys)."""

    def parts(self) -> tuple[AttentionMask, ...]:
        return (self,)

    def __and__(self, other: AttentionMask | None) -> AttentionMask:
        if other is None:
            return self
        return CombinedMask(self.parts() + other.parts())

    def __rand__(self, other: AttentionMask | None) -> AttentionMask:
        return self if other is None else other.__and__(self)

    def pad_keys(self, n: int) -> AttentionMask:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class PaddingMask(AttentionMask):
    """Padded keys (B, S) and / or queries (B, L), bool, True = padded; B is the first leading dim of q.

    A padded key gets zero weight and is not counted in the column marginals; a padded query's output row (and
    weight row) is zero and it is left out of the column sums.
    """

    keys: torch.Tensor | None = None
    queries: torch.Tensor | None = None

    def pad_keys(self, n: int) -> AttentionMask:
        return self if self.keys is None else PaddingMask(F.pad(self.keys, (0, n), value=False), self.queries)


@dataclass(frozen=True, eq=False)
class CausalMask(AttentionMask):
    """Query i attends to keys j <= i (``torch.ones(L, S).tril()``), plus ``extra_keys`` last key columns that every
    query attends to."""

    extra_keys: int = 0

    def pad_keys(self, n: int) -> AttentionMask:
        return CausalMask(self.extra_keys + n)

    def allowed(self, L: int, S: int, device: torch.device) -> torch.Tensor:
        """The bool (L, S) mask, True = may attend."""
        allowed = torch.ones(L, S - self.extra_keys, dtype=torch.bool, device=device).tril()
        return F.pad(allowed, (0, self.extra_keys), value=True) if self.extra_keys else allowed


@dataclass(frozen=True, eq=False)
class AllowedMask(AttentionMask):
    """``allowed``: bool, True = may attend (SDPA's convention), broadcastable to (..., L, S)."""

    allowed: torch.Tensor

    def pad_keys(self, n: int) -> AttentionMask:
        return AllowedMask(F.pad(self.allowed, (0, n), value=True))


@dataclass(frozen=True, eq=False)
class BlockedMask(AttentionMask):
    """``blocked``: bool, True = may NOT attend (``nn.MultiheadAttention``'s and fairseq's convention),
    broadcastable to (..., L, S)."""

    blocked: torch.Tensor

    def pad_keys(self, n: int) -> AttentionMask:
        return BlockedMask(F.pad(self.blocked, (0, n), value=False))


@dataclass(frozen=True, eq=False)
class AdditiveMask(AttentionMask):
    """``bias``: float added to the scores (-inf, or ``torch.finfo(bias.dtype).min``, = not allowed),
    broadcastable to (..., L, S)."""

    bias: torch.Tensor

    def pad_keys(self, n: int) -> AttentionMask:
        return AdditiveMask(F.pad(self.bias, (0, n), value=0.0))


@dataclass(frozen=True, eq=False)
class CombinedMask(AttentionMask):
    """Several masks at once (``masks``): an entry is allowed when every part allows it; additive biases add up."""

    masks: tuple[AttentionMask, ...]

    def parts(self) -> tuple[AttentionMask, ...]:
        return self.masks

    def pad_keys(self, n: int) -> AttentionMask:
        return CombinedMask(tuple(m.pad_keys(n) for m in self.masks))


def mask_from_tensors(
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
) -> AttentionMask | None:
    """The typed mask of the tensor arguments of :func:`zoo.ops.sinkhorn_attention`: ``attn_mask`` bool (True = may
    attend) or additive float, padding masks bool, True = padded.

    Args:
        attn_mask: bool (True = may attend) or additive float, broadcastable to (..., L, S); None for none.
        key_padding_mask: bool (B, S), True = padded key; None for none.
        query_padding_mask: bool (B, L), True = padded query; None for none.

    Returns:
        The combined typed mask, or None when every argument is None.
    """
    mask: AttentionMask | None = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = AllowedMask(attn_mask)
        elif attn_mask.is_floating_point():
            mask = AdditiveMask(attn_mask)
        else:
            raise ZooError(
                f"sinkhorn_attention: attn_mask must be bool (True = may attend) or an additive float tensor, got "
                f"{attn_mask.dtype}"
            )
    if key_padding_mask is not None or query_padding_mask is not None:
        mask = PaddingMask(key_padding_mask, query_padding_mask) & mask
    return mask


@dataclass(frozen=True)
class ResolvedMask:
    """A mask checked against the scores' shape (*lead, L, S).

    ``dense``: bool (True = may attend) or additive float, broadcastable to (*lead, L, S), or None (no attention
    mask); ``keys`` / ``queries``: bool padding masks viewed as (B, 1.., 1, S) / (B, 1.., L, 1), True = padded.
    """

    dense: torch.Tensor | None
    keys: torch.Tensor | None
    queries: torch.Tensor | None

    def sdpa_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The ``attn_mask`` of ``F.scaled_dot_product_attention``: the dense mask with the padded keys removed
        (query padding is applied to the output rows, :meth:`zero_padded_queries`); an additive one in ``dtype``,
        the query's (SDPA refuses another floating dtype)."""
        if self.keys is None:
            return self.dense if self.dense is None or self.dense.dtype == torch.bool else self.dense.to(dtype)
        if self.dense is None:
            return ~self.keys
        if self.dense.dtype == torch.bool:
            return self.dense & ~self.keys
        return self.dense.to(dtype) + _bias(self.keys, dtype)

    def zero_padded_queries(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (..., L, Ev) with the rows of padded queries set to 0."""
        return out if self.queries is None else out.masked_fill(self.queries, 0.0)

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive bias b (0 or -inf for the bool masks) of the Sinkhorn op, broadcastable to (*lead, L, S)."""
        dense = None
        if self.dense is not None:
            dense = _bias(~self.dense, dtype) if self.dense.dtype == torch.bool else self.dense.to(dtype)
        out = None
        for b in (dense, _opt_bias(self.keys, dtype), _opt_bias(self.queries, dtype)):
            if b is not None:
                out = b if out is None else out + b
        return out


def _bias(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, -inf where ``blocked``."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(blocked, float("-inf"))


def _opt_bias(blocked: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if blocked is None else _bias(blocked, dtype)


def resolve(mask: AttentionMask | None, lead: torch.Size, L: int, S: int, device: torch.device) -> ResolvedMask:
    """``mask`` checked against the scores' shape (*lead, L, S) (one ZooError naming the problem otherwise) and
    converted: the bool / additive parts into one dense mask, the padding masks viewed to broadcast over the
    leading dims after the first (heads). No host sync.

    Args:
        mask: the typed mask; None for none.
        lead: the scores' leading dims (``*lead``: batch, heads ...).
        L: the number of queries.
        S: the number of keys.
        device: where a mask built here (the causal one) is allocated.
    """
    if mask is None:
        return ResolvedMask(None, None, None)
    dense: torch.Tensor | None = None
    keys = queries = None
    for part in mask.parts():
        if isinstance(part, PaddingMask):
            if part.keys is not None:
                keys = _padding_view(part.keys, "key_padding_mask", lead, S, -1)
            if part.queries is not None:
                queries = _padding_view(part.queries, "query_padding_mask", lead, L, -2)
            continue
        if isinstance(part, CausalMask):
            t = part.allowed(L, S, device)
        elif isinstance(part, AllowedMask):
            t = _checked_dense(part.allowed, lead, L, S, want_bool=True)
        elif isinstance(part, BlockedMask):
            t = ~_checked_dense(part.blocked, lead, L, S, want_bool=True)
        elif isinstance(part, AdditiveMask):
            t = _blocked_at_dtype_min(_checked_dense(part.bias, lead, L, S, want_bool=False))
        else:
            raise ZooError(f"unknown attention mask {type(part).__name__}: use the classes of zoo.ops.masks")
        dense = t if dense is None else _and(dense, t)
    return ResolvedMask(dense, keys, queries)


def _and(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two dense masks as one: bool & bool stays bool, otherwise the additive biases add up."""
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    dtype = a.dtype if a.dtype != torch.bool else b.dtype
    a = _bias(~a, dtype) if a.dtype == torch.bool else a
    b = _bias(~b, dtype) if b.dtype == torch.bool else b
    return a + b


def blocked_entries(bias: torch.Tensor) -> torch.Tensor:
    """Where the additive mask ``bias`` blocks: -inf, or the most negative value of its dtype
    (``torch.finfo(dtype).min``, the "masked" value of Hugging Face's masks and of many hand-made ones); bool, shaped
    like ``bias``. Softmax gives such an entry no weight either way, but as a finite bias the Sinkhorn column step
    would renormalise a column of them and hand it the mass. Read before any cast to another dtype."""
    return bias <= torch.finfo(bias.dtype).min


def _blocked_at_dtype_min(bias: torch.Tensor) -> torch.Tensor:
    """``bias`` with its :func:`blocked_entries` as -inf: not allowed."""
    return bias.masked_fill(blocked_entries(bias), float("-inf"))


def _checked_dense(t: torch.Tensor, lead: torch.Size, L: int, S: int, want_bool: bool) -> torch.Tensor:
    if want_bool and t.dtype != torch.bool:
        raise ZooError(f"sinkhorn_attention: a bool attention mask must have dtype torch.bool, got {t.dtype}")
    if not want_bool and not t.is_floating_point():
        raise ZooError(
            f"sinkhorn_attention: attn_mask must be bool (True = may attend) or an additive float tensor, got {t.dtype}"
        )
    try:
        torch.broadcast_shapes(t.shape, (*lead, L, S))
        ok = t.dim() <= len(lead) + 2
    except RuntimeError:
        ok = False
    if not ok or torch.broadcast_shapes(t.shape, (*lead, L, S)) != (*lead, L, S):
        raise ZooError(
            f"sinkhorn_attention: attn_mask of shape {tuple(t.shape)} does not broadcast to the scores' "
            f"shape (..., L, S) = {(*lead, L, S)}: give it shape (L, S) or (B, H, L, S) (1s allowed)"
        )
    return t


def _padding_view(mask: torch.Tensor, name: str, lead: torch.Size, length: int, axis: int) -> torch.Tensor:
    """A (B, S) / (B, L) padding mask (True = padded) viewed as (B, 1.., 1, S) / (B, 1.., L, 1)."""
    what = "keys S" if axis == -1 else "queries L"
    if mask.dtype != torch.bool or mask.dim() != 2 or len(lead) < 1 or mask.shape != (lead[0], length):
        first = lead[0] if len(lead) else "B"
        raise ZooError(
            f"sinkhorn_attention: {name} must be a bool tensor of shape (B, {what}) = ({first}, {length}) with "
            f"True = padded, where B is the first leading dim of q (q needs a batch dim); got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    view = [mask.shape[0]] + [1] * (len(lead) - 1) + ([1, length] if axis == -1 else [length, 1])
    return mask.view(view)
