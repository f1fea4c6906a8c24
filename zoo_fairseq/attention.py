"""Sinkhorn self-attention as a subclass of fairseq's ``MultiheadAttention`` (same parameters and state dict).

Time-first like fairseq: x (T, B, E), H heads of width d = E / H, m the key padding mask (B, T), True at pads:

    q, k, v = W_q x + b_q, W_k x + b_k, W_v x + b_v                     split into (B, H, T, d)
    C = q k^T / sqrt(d) + attn_mask (additive; a bool mask is True where attention is NOT allowed, as fairseq's)
    A = Sinkhorn_{n_iter}(C) over the valid tokens (padded keys get no weight; for n_iter > 1 padded queries
        are left out of the column marginals and get zero rows)            (docs/mathematics.md, section 5, S1-S2)
    out = W_o concat_heads(dropout(A) v) + b_o

``n_iter=1`` is fairseq's softmax attention: every query row is kept, so even the outputs at padded positions are
fairseq's (up to the float rounding of the SDPA kernel versus ``F.multi_head_attention_forward``).
"""

from __future__ import annotations

from typing import Any

import torch
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor

from zoo.errors import ZooError
from zoo.nn.attention import SinkhornCore, check_n_iter
from zoo.ops.masks import AdditiveMask, AttentionMask, BlockedMask, PaddingMask

__all__ = ["SinkhornMultiheadAttention", "sinkhornize"]


class SinkhornMultiheadAttention(SinkhornCore, MultiheadAttention):
    """fairseq's ``MultiheadAttention`` (self-attention) with Sinkhorn normalisation (``n_iter`` half-steps).

    Build it like fairseq's module plus ``n_iter`` (keyword), or turn an existing fairseq module into one in place
    with :meth:`from_fairseq` (no new parameters, same names). Incremental decoding, encoder-decoder attention,
    ``add_bias_kv`` / ``add_zero_attn`` and ``before_softmax`` are fairseq's own code when ``n_iter == 1`` and an
    error otherwise (Sinkhorn belongs to the encoder self-attention). The attention itself is the zoo.nn core
    (:class:`zoo.nn.attention.SinkhornCore`); the projections are fairseq's ``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``.
    """

    n_iter: int = 1

    def __init__(self, *args: Any, n_iter: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_iter = check_n_iter(n_iter)

    @classmethod
    def from_fairseq(cls, module: MultiheadAttention, n_iter: int) -> SinkhornMultiheadAttention:
        """``module`` itself (a fairseq ``MultiheadAttention``, not a subclass) turned into this class in place:
        same object, same parameters and state dict; only the forward changes."""
        if isinstance(module, cls):
            module.n_iter = check_n_iter(n_iter)
            return module
        if type(module) is not MultiheadAttention:
            raise ZooError(
                f"{type(module).__module__}.{type(module).__qualname__} is not fairseq's "
                "MultiheadAttention itself (a subclass may change the forward): cannot make it Sinkhorn"
            )
        n_iter = check_n_iter(n_iter)
        module.__class__ = cls
        module.n_iter = n_iter
        return module  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, n_iter={self.n_iter}"

    def _unsupported(self, incremental_state: Any, static_kv: bool, before_softmax: bool) -> str:
        if incremental_state is not None:
            return "incremental decoding"
        if static_kv or not self.self_attention:
            return "attention to another sequence (only self-attention)"
        if before_softmax:
            return "before_softmax"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn"
        if self.skip_embed_dim_check or self.onnx_trace:
            return "pruned heads / ONNX tracing"
        return ""

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        key_padding_mask: Tensor | None = None,
        incremental_state: dict[str, dict[str, Tensor | None]] | None = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Tensor | None = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """fairseq's call: ``query`` (T, B, E) -> (out (T, B, E), weights (B, T, T) averaged over heads, (H, B, T, T)
        with ``need_head_weights``, or None without ``need_weights``)."""
        why = self._unsupported(incremental_state, static_kv, before_softmax)
        if why:
            if self.n_iter == 1:
                return super().forward(
                    query,
                    key,
                    value,
                    key_padding_mask,
                    incremental_state,
                    need_weights,
                    static_kv,
                    attn_mask,
                    before_softmax,
                    need_head_weights,
                )
            raise ZooError(f"Sinkhorn attention (n_iter={self.n_iter}) does not support {why}")
        need_weights = need_weights or need_head_weights
        T, B, E = query.shape
        H, d = self.num_heads, self.head_dim

        def heads(x: Tensor) -> Tensor:
            return x.view(T, B, H, d).permute(1, 2, 0, 3)  # (B, H, T, d)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(query)), heads(self.v_proj(query))
        mask: AttentionMask | None = None
        if attn_mask is not None:  # fairseq / torch: a bool mask is True where attention is NOT allowed
            mask = BlockedMask(attn_mask) if attn_mask.dtype == torch.bool else AdditiveMask(attn_mask)
        if key_padding_mask is not None:
            # n_iter = 1 keeps every query row (fairseq computes the padded positions too); Sinkhorn leaves the
            # padded queries out of the column marginals
            kpm = key_padding_mask.to(torch.bool)
            mask = PaddingMask(kpm, None if self.n_iter == 1 else kpm) & mask
        drop = self.dropout_module
        dropout_p = float(drop.p) if (drop.p > 0 and (self.training or drop.apply_during_inference)) else 0.0
        out, weights = self.attend(q, k, v, mask, dropout_p, need_weights)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(T, B, E))
        if weights is not None:
            weights = weights.transpose(0, 1) if need_head_weights else weights.mean(dim=1)
        return out, weights


def sinkhornize(module: torch.nn.Module, n_iter: int) -> int:
    """Turn every fairseq ``MultiheadAttention`` in ``module`` into a :class:`SinkhornMultiheadAttention` with
    ``n_iter`` half-steps, in place (or set ``n_iter`` on those that already are); returns how many. Meant for an
    encoder (``model.encoder``): the decoder's causal and cross attentions keep softmax."""
    count = 0
    for m in module.modules():
        if isinstance(m, MultiheadAttention):
            SinkhornMultiheadAttention.from_fairseq(m, n_iter)
            count += 1
    return count
