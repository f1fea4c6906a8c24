"""Functional kernels (Sinkhorn attention, sparse top-k) live here as the families that need them land."""

__all__: list[str] = []
