"""Functional kernels: Sinkhorn attention (section 5) and the hard and relaxed top-k operators (section 6)."""

from zoo.ops.sinkhorn import attention_column_sums, column_sum_stats, sinkhorn_attention
from zoo.ops.topk import soft_topk_magnitude, soft_topk_mask, topk_magnitude, topk_mask

__all__: list[str] = ["sinkhorn_attention", "attention_column_sums", "column_sum_stats", "soft_topk_magnitude",
                      "soft_topk_mask", "topk_magnitude", "topk_mask"]
