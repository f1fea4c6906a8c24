"""Modules: the residual-stack engine and the layers families are built from."""

from zoo.nn.residual import ResidualOf, StackAsBlock, TransformerEncoderStack
from zoo.nn.residual_stack import MEMORY_MODES, RULES, ResidualStack, frozen_batchnorm_stats

__all__ = [
    "MEMORY_MODES", "RULES", "ResidualOf", "ResidualStack", "StackAsBlock", "TransformerEncoderStack",
    "frozen_batchnorm_stats",
]
