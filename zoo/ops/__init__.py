"""Functional kernels: Sinkhorn attention (section 5) with its typed masks, and the hard and relaxed top-k operators
(section 6)."""

from zoo.ops.masks import AdditiveMask, AllowedMask, AttentionMask, BlockedMask, CausalMask, CombinedMask, PaddingMask
from zoo.ops.sinkhorn import attention, attention_column_sums, column_sum_stats, sinkhorn_attention
from zoo.ops.topk import soft_topk_magnitude, soft_topk_mask, topk_magnitude, topk_mask

__all__: list[str] = [
    "attention",
    "sinkhorn_attention",
    "attention_column_sums",
    "column_sum_stats",
    "AttentionMask",
    "PaddingMask",
    "CausalMask",
    "AllowedMask",
    "BlockedMask",
    "AdditiveMask",
    "CombinedMask",
    "soft_topk_magnitude",
    "soft_topk_mask",
    "topk_magnitude",
    "topk_mask",
]
