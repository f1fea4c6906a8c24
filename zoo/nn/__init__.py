"""Modules: the residual-stack engine and the layers families are built from (attention, MoE, top-k)."""

from zoo.nn.attention import SinkhornAttention, SinkhornCore, SinkhornMultiheadAttention, attention_stats
from zoo.nn.expert_parallel import (
    ExpertParallelStrategy,
    expert_parallel_mesh,
    reduce_expert_gradients,
    shard_experts,
)
from zoo.nn.fsdp import FSDP2Strategy, shard_model
from zoo.nn.memory.planning import plan_stored_blocks, step_peak_bytes
from zoo.nn.moe import MoE, Routing
from zoo.nn.residual import ResidualOf, StackAsBlock, TransformerEncoderStack
from zoo.nn.residual_function import ResidualFunction, ResidualFunctionWithTail
from zoo.nn.residual_stack import MEMORY_MODES, RULES, ResidualStack, frozen_batchnorm_stats
from zoo.nn.rules import ForwardRule, register_rule
from zoo.nn.topk import SmoothTopKLoss, SoftTopKMagnitude, prune_magnitude

__all__ = [
    "MEMORY_MODES",
    "ExpertParallelStrategy",
    "FSDP2Strategy",
    "ForwardRule",
    "MoE",
    "RULES",
    "ResidualFunction",
    "ResidualFunctionWithTail",
    "ResidualOf",
    "ResidualStack",
    "Routing",
    "SinkhornAttention",
    "SinkhornCore",
    "SinkhornMultiheadAttention",
    "SmoothTopKLoss",
    "SoftTopKMagnitude",
    "StackAsBlock",
    "TransformerEncoderStack",
    "attention_stats",
    "expert_parallel_mesh",
    "frozen_batchnorm_stats",
    "plan_stored_blocks",
    "prune_magnitude",
    "reduce_expert_gradients",
    "register_rule",
    "shard_experts",
    "shard_model",
    "step_peak_bytes",
]
