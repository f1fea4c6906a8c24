"""Sinkhorn attention modules (Sinkformers): drop-ins for timm's ``Attention`` and
``torch.nn.MultiheadAttention``.

Both compute the attention scores C = q k^T * scale (+ masks) and normalise exp(C) by ``n_iter``
Sinkhorn half-steps instead of one row softmax (:func:`zoo.ops.sinkhorn_attention`):

    K^{l+1} = rownorm(K^l) if l even,  colnorm(K^l) if l odd,    out = K^{n_iter} v        (S1)

``n_iter=1`` is softmax attention (the source module's function, same weights); odd ``n_iter`` ends on
a row normalisation, and the limit is doubly stochastic (column sums n_rows / n_cols, i.e. 1 for
self-attention). The parameter names, constructor and forward signature are the source module's, so
state dicts load unchanged and the modules swap in place of the originals.

Column-sum diagnostic (the column sums of trained Transformers drift towards 1):
with ``record_stats=True`` every forward stores in ``module.stats`` the statistics of the column sums
c_j = (n_cols / n_rows) sum_i K_ij over the valid keys (1 for a doubly stochastic matrix), as detached
0-d tensors (no host sync; ``float(...)`` them when needed), from :func:`zoo.ops.sinkhorn.column_sum_stats`:
``mean``, ``std``, ``min``, ``max`` and ``dev`` = mean_j |c_j - 1| (0 when doubly stochastic).
Recording needs the attention matrix (it is materialised, so the fused SDPA path of ``n_iter=1`` is not
taken). :func:`attention_stats` gathers the stats of every Sinkhorn module of a model by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.ops.masks import (
    AdditiveMask,
    AttentionMask,
    BlockedMask,
    CausalMask,
    PaddingMask,
    blocked_entries,
    mask_from_tensors,
)
from zoo.ops.sinkhorn import attention, check_n_iter, column_sum_stats

__all__ = ["SinkhornCore", "SinkhornAttention", "SinkhornMultiheadAttention", "attention_stats", "check_n_iter"]


def attention_stats(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: stats}`` of every Sinkhorn attention module of ``model`` that recorded stats."""
    return {
        name: dict(m.stats)
        for name, m in model.named_modules()
        if isinstance(m, (SinkhornAttention, SinkhornMultiheadAttention)) and m.stats
    }


class SinkhornSettings:
    """Mixin of the Sinkformer families: ``set_n_iter`` / ``set_record_stats`` / ``attention_stats`` over the
    model's ``attentions`` (a list or property of its Sinkhorn attention modules)."""

    attentions: list[nn.Module]
    hparams: Any

    def set_n_iter(self, n_iter: int) -> None:
        """Change the Sinkhorn half-steps of every attention (kept in ``hparams``, so checkpoints rebuild it)."""
        check_n_iter(n_iter)
        for attn in self.attentions:
            attn.n_iter = n_iter
        self.hparams["n_iter"] = n_iter

    def set_record_stats(self, record_stats: bool = True) -> None:
        """Turn the column-sum statistics of every attention on or off."""
        for attn in self.attentions:
            _set_record_stats(attn, record_stats)
        self.hparams["record_stats"] = bool(record_stats)

    def attention_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{module name: {"mean", "std", "min", "max", "dev"}}`` of the last forward (``record_stats=True``):
        column sums of each attention relative to n_rows / n_cols, detached 0-d tensors."""
        return {
            name: dict(m.stats)
            for name, m in self.named_modules()  # type: ignore[attr-defined]
            if any(m is a for a in self.attentions) and m.stats
        }

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """What the training task logs as ``{stage}_{name}`` (:meth:`zoo.tasks.ImageClassifier.diagnostics`), with
        ``record_stats=True`` the column sums of the last forward over every attention: ``attention/colsum_dev``
        (the mean over the attentions of mean_j |c_j - 1|, 0 when doubly stochastic), ``attention/colsum_min`` and
        ``attention/colsum_max`` (the extremes over the attentions); detached, no host sync. Without recorded
        statistics, only what the next class logs."""
        nxt = getattr(super(), "diagnostics", None)
        out = dict(nxt()) if callable(nxt) else {}
        stats = [m.stats for m in self.attentions if getattr(m, "stats", None)]
        if stats:
            out["attention/colsum_dev"] = torch.stack([s["dev"].float() for s in stats]).mean()
            out["attention/colsum_min"] = torch.stack([s["min"].float() for s in stats]).min()
            out["attention/colsum_max"] = torch.stack([s["max"].float() for s in stats]).max()
        return out


def _set_record_stats(module: nn.Module, record_stats: bool) -> None:
    module.record_stats = bool(record_stats)
    module.stats = {}


class SinkhornCore:
    """The attention core every Sinkhorn attention module is built on (zoo.nn's two, the translation and the
    fairseq ``MultiheadAttention``): ``n_iter`` half-steps, the column-sum statistics, and the one call to the op
    entry point :func:`zoo.ops.sinkhorn.attention` (which holds the ``n_iter = 1`` SDPA shortcut) in :meth:`attend`.
    The module projects q, k, v and builds the typed mask (:mod:`zoo.ops.masks`); the core attends."""

    n_iter: int = 1
    record_stats: bool = False
    stats: dict[str, torch.Tensor]

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: AttentionMask | None,
        dropout_p: float,
        need_weights: bool = False,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out (..., L, Ev), weights (..., L, S) or None) of Sinkhorn_{n_iter} attention; with ``record_stats``
        also stores the column-sum statistics of the weights over the mask's valid tokens in ``self.stats``."""
        want_weights = need_weights or self.record_stats
        res = attention(q, k, v, mask, self.n_iter, scale=scale, dropout_p=dropout_p, return_weights=want_weights)
        if not want_weights:
            return res, None  # type: ignore[return-value]
        out, weights = res
        if self.record_stats:
            self.stats = column_sum_stats(weights.detach(), *_padding_of(mask, weights.shape[-2]))
        return out, (weights if need_weights else None)


def _padding_of(mask: AttentionMask | None, L: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (keys, queries) padding masks (True = padded) of a typed mask, for the column-sum statistics: the
    queries it names, no padded query when it names none (an all-False mask, as column_sum_stats would otherwise
    take the key padding for the queries when L == S)."""
    for part in () if mask is None else mask.parts():
        if isinstance(part, PaddingMask):
            queries = part.queries
            if queries is None and part.keys is not None and part.keys.shape[-1] == L:
                queries = torch.zeros_like(part.keys)
            return part.keys, queries
    return None, None


# ------------------------------------------------------------------------------------------------
# timm's Attention


class SinkhornAttention(SinkhornCore, nn.Module):
    """timm's ``Attention`` (multi-head self-attention with a fused qkv projection) with Sinkhorn attention.

    Same constructor (plus ``n_iter``, ``record_stats``), parameter names (``qkv``, ``q_norm``,
    ``k_norm``, ``norm``, ``gate``, ``proj``) and ``forward(x, attn_mask=None, is_causal=False)`` as
    ``timm.layers.Attention``; ``attn_mask`` is bool (True = attend) or additive, broadcastable to
    ``(B, heads, N, N)``. With ``n_iter=1`` it computes timm's function.

    Args:
        dim: the input (token) dimension.
        num_heads: the number of attention heads.
        attn_head_dim: the dimension of each head; None for ``dim // num_heads``.
        dim_out: the output dimension; None for ``dim``.
        qkv_bias: whether the qkv projection (and the gate) have a bias.
        qk_norm: whether queries and keys are normalised per head with ``norm_layer``.
        scale_norm: whether the attention output is normalised with ``norm_layer`` before the projection.
        proj_bias: whether the output projection has a bias.
        gated: whether the output is multiplied by a sigmoid gate computed from the input (``gate``).
        attn_drop: dropout probability on the attention weights.
        proj_drop: dropout probability after the output projection.
        norm_layer: the normalisation class for ``qk_norm`` / ``scale_norm`` (e.g. ``nn.LayerNorm``).
        n_iter: Sinkhorn half-steps (alternate row and column normalisations); 1 is softmax attention.
        record_stats: whether each forward stores the column-sum statistics of its weights in ``stats``.
        device: where the parameters are allocated.
        dtype: the parameters' dtype.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        n_iter: int = 3,
        record_stats: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.n_iter = check_n_iter(n_iter)
        _set_record_stats(self, record_stats)
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ZooError(f"dim {dim} is not divisible by num_heads {num_heads}: give attn_head_dim")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ZooError("qk_norm / scale_norm need a norm_layer (e.g. nn.LayerNorm)")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, attn: nn.Module, n_iter: int = 3, record_stats: bool = False) -> SinkhornAttention:
        """A SinkhornAttention that uses the submodules (and so the very parameters) of timm ``attn``."""
        new = cls(8, num_heads=1, n_iter=n_iter, record_stats=record_stats, device="meta")
        for name in list(new._modules):
            del new._modules[name]
        for name, child in attn._modules.items():
            new._modules[name] = child
        for name in ("num_heads", "head_dim", "attn_dim", "scale"):
            setattr(new, name, getattr(attn, name))
        new.training = attn.training
        return new

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, n_iter={self.n_iter}"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = CausalMask() if is_causal else mask_from_tensors(attn_mask)  # timm: is_causal takes precedence
        out, _ = self.attend(q, k, v, mask, self.attn_drop.p if self.training else 0.0, scale=self.scale)
        x = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


# ------------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention


def _no_fast_path(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook. ``nn.TransformerEncoderLayer`` skips its fused kernel (which reads the
    attention weights and never calls the attention module) when a submodule has hooks."""
    return None


def _canonical_bool_or_float(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype == torch.bool or mask.is_floating_point():
        return mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    raise ZooError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")


class SinkhornMultiheadAttention(SinkhornCore, nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with Sinkhorn attention (a subclass: same constructor plus ``n_iter``,
    ``record_stats``; same parameters ``in_proj_weight``/``in_proj_bias`` or ``q/k/v_proj_weight``,
    ``bias_k``/``bias_v``, ``out_proj``; same call).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` with torch's conventions: ``batch_first`` or
    sequence-first or unbatched inputs, ``key_padding_mask`` ``(N, S)`` (bool True = padded, or
    additive), ``attn_mask`` ``(L, S)`` or ``(N * heads, L, S)`` (bool True = *not* allowed, or
    additive), ``is_causal`` builds the causal mask when ``attn_mask`` is None. Returns
    ``(output, weights)``; weights (averaged over heads unless ``average_attn_weights=False``) when
    ``need_weights``, else None.

    Padding: a bool ``key_padding_mask`` (or the -inf entries of an additive one, which is what
    ``nn.TransformerEncoderLayer`` passes, and those equal to its dtype's most negative value,
    ``torch.finfo(dtype).min``, the masked value of Hugging Face masks) restricts the Sinkhorn marginals
    to the valid keys; for self-attention (``query is key``) it also marks the padded queries, which get
    no mass, so padded tokens never change the valid ones. With ``n_iter=1`` the outputs equal torch's at every valid
    position (padded query rows may differ; torch computes them from the valid keys).

    Args:
        embed_dim: the model dimension (of the queries and of the output).
        num_heads: the number of attention heads (``embed_dim`` must be divisible by it).
        dropout: dropout probability on the attention weights.
        bias: whether the input and output projections have biases.
        add_bias_kv: whether learned biases ``bias_k`` / ``bias_v`` are appended to the keys and values.
        add_zero_attn: whether a batch of zeros is appended to the keys and values.
        kdim: the keys' dimension; None for ``embed_dim``.
        vdim: the values' dimension; None for ``embed_dim``.
        batch_first: whether inputs and outputs are (batch, seq, feature) rather than (seq, batch, feature).
        device: where the parameters are allocated.
        dtype: the parameters' dtype.
        n_iter: Sinkhorn half-steps (alternate row and column normalisations); 1 is softmax attention.
        record_stats: whether each forward stores the column-sum statistics of its weights in ``stats``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
        n_iter: int = 3,
        record_stats: bool = False,
    ) -> None:
        n_iter = check_n_iter(n_iter)
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        self.n_iter = n_iter
        _set_record_stats(self, record_stats)
        self.register_forward_pre_hook(_no_fast_path)

    @classmethod
    def from_torch(
        cls, mha: nn.MultiheadAttention, n_iter: int = 3, record_stats: bool = False
    ) -> SinkhornMultiheadAttention:
        """A SinkhornMultiheadAttention that uses the very parameters and submodules of ``mha``."""
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device="meta",
            n_iter=n_iter,
            record_stats=record_stats,
        )
        for name in list(new._parameters):
            del new._parameters[name]
        new._parameters.update(mha._parameters)
        new._modules.clear()
        new._modules.update(mha._modules)
        new.training = mha.training
        return new

    def extra_repr(self) -> str:
        return f"n_iter={self.n_iter}, batch_first={self.batch_first}"

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise ZooError(
                "SinkhornMultiheadAttention does not take nested tensors: build the "
                "nn.TransformerEncoder with enable_nested_tensor=False (the converter sets "
                "use_nested_tensor = False)"
            )
        self_attention = query is key
        batched = query.dim() == 3
        if batched and not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        elif not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        B, L, E = query.shape
        H = self.num_heads
        D = E // H
        dtype = query.dtype

        # projections (torch's in_proj_weight chunks, or separate q/k/v weights for kdim/vdim)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

        # masks in torch's conventions: key padding bool (B, S) True = padded, or additive; attn_mask bool
        # True = NOT allowed, or additive; is_causal when attn_mask is None
        # the masked keys of an additive key padding mask: -inf, or the most negative finite value of its dtype (the
        # "masked" value of Hugging Face and of many hand-made masks: as a finite bias, the column step would
        # renormalise those keys' columns and hand them all the mass), found before any cast to q's dtype
        padded = None
        if key_padding_mask is not None and key_padding_mask.is_floating_point():
            padded = blocked_entries(key_padding_mask)
        key_padding_mask = _canonical_bool_or_float(key_padding_mask, "key_padding_mask", dtype)
        attn_mask = _canonical_bool_or_float(attn_mask, "attn_mask", dtype)
        S = k.shape[1]
        mask: AttentionMask | None = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(B, H, L, S)
            mask = BlockedMask(attn_mask) if attn_mask.dtype == torch.bool else AdditiveMask(attn_mask)
        elif is_causal:
            mask = CausalMask()
        if padded is not None and key_padding_mask is not None:
            # additive (nn.TransformerEncoder(Layer) turns bool masks into 0 / -inf floats): the -inf (or dtype-min)
            # keys are padding (out of the marginals, as a bool mask), other values an additive mask; no host sync
            mask = mask & AdditiveMask(key_padding_mask.masked_fill(padded, 0.0).view(B, 1, 1, S))
            key_padding_mask = padded
        query_padding_mask = None
        if key_padding_mask is not None and L == S:
            # self-attention: padded queries get no mass; cross-attention keeps every query
            query_padding_mask = key_padding_mask if self_attention else torch.zeros_like(key_padding_mask)

        # extra keys: learned bias_k / bias_v, then a zero key (torch's order), visible to every query
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], dim=1)
            mask, key_padding_mask = self._pad_masks(mask, key_padding_mask)
        q, k, v = (t.reshape(B, t.shape[1], H, D).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, D)], dim=2)
            v = torch.cat([v, v.new_zeros(B, H, 1, D)], dim=2)
            mask, key_padding_mask = self._pad_masks(mask, key_padding_mask)
        if key_padding_mask is not None:
            mask = PaddingMask(key_padding_mask, query_padding_mask) & mask

        out, weights = self.attend(q, k, v, mask, self.dropout if self.training else 0.0, need_weights)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    @staticmethod
    def _pad_masks(
        mask: AttentionMask | None, key_padding_mask: torch.Tensor | None
    ) -> tuple[AttentionMask | None, torch.Tensor | None]:
        """One more (always visible) key column in both masks."""
        if mask is not None:
            mask = mask.pad_keys(1)
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1), value=False)
        return mask, key_padding_mask
