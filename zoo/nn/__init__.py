"""Modules: the residual-stack engine and the layers families are built from."""

from zoo.nn.residual_stack import MEMORY_MODES, RULES, ResidualStack, frozen_batchnorm_stats

__all__ = ["MEMORY_MODES", "RULES", "ResidualStack", "frozen_batchnorm_stats"]
