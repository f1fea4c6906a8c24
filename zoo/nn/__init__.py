"""Modules: the residual-stack engine and the layers families are built from."""

from zoo.nn.attention import SinkhornAttention, SinkhornMultiheadAttention, attention_stats
from zoo.nn.residual import ResidualOf, StackAsBlock, TransformerEncoderStack
from zoo.nn.residual_stack import MEMORY_MODES, RULES, ResidualStack, frozen_batchnorm_stats

__all__ = [
    "MEMORY_MODES", "RULES", "ResidualOf", "ResidualStack", "SinkhornAttention", "SinkhornMultiheadAttention",
    "StackAsBlock", "TransformerEncoderStack", "attention_stats", "frozen_batchnorm_stats",
]
