"""Functional kernels (Sinkhorn attention, sparse top-k) live here as the families that need them land."""

from zoo.ops.sinkhorn import attention_column_sums, column_sum_stats, sinkhorn_attention

__all__: list[str] = ["sinkhorn_attention", "attention_column_sums", "column_sum_stats"]
