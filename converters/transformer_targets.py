"""Conversion targets of the transformer family: ``"momentum"`` for stacks of blocks.

Transformer targets (family ``"transformer"``: ``torch.nn.TransformerEncoder``, a timm
``VisionTransformer``, or a timm ViT's ``blocks``; the source block computes block(x) = x + ...):

- ``"momentum"``: the blocks become a momentum :class:`zoo.nn.ResidualStack` of the residual
  functions f(x) = block(x, **kwargs) - x (:class:`zoo.nn.ResidualOf`), masks and other keyword
  arguments passed to every block; gamma = 0 (``memory="full"``) is the source function. A ViT
  comes back as a copy of itself (same class) with ``blocks`` replaced, an encoder as a
  :class:`zoo.nn.TransformerEncoderStack` with the encoder's call. Options: ``gamma`` (0.9),
  ``memory`` (``"reversible"``), ``init_velocity``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from converters.registry import register_target
from zoo.nn import ResidualOf, ResidualStack

__all__ = ["TRANSFORMER_OPTIONS", "BlockStackSpec", "build_block_stack"]


@dataclass
class BlockStackSpec:
    """A stack of shape-preserving blocks read from a source (the ``"transformer"`` family).

    The source file deep-copies the source (``copy``: converters never share weights) and names the
    copy's blocks in order; ``assemble(stack)`` puts the residual stack in the copy's place of the
    blocks and returns the converted model. ``stack_class`` is the ResidualStack class to build
    (:class:`zoo.nn.StackAsBlock` where the source's forward loops over its block list).
    ``training`` is the train/eval mode of the blocks' container, given to the new wrapper modules. ``label``
    names the source in messages.
    """

    label: str
    copy: nn.Module
    blocks: list[nn.Module]
    assemble: Callable[[ResidualStack], nn.Module]
    stack_class: type[ResidualStack] = ResidualStack
    training: bool = False


TRANSFORMER_OPTIONS: tuple[str, ...] = ("memory", "gamma", "init_velocity")


def build_block_stack(spec: BlockStackSpec, rule: str, options: dict[str, Any]) -> nn.Module:
    """The source with its blocks replaced by a ``rule`` stack of ``ResidualOf(block)``.

    Args:
        spec: the source's blocks and how to put the stack in their place.
        rule: the stack's forward rule (``"momentum"`` ...).
        options: further :class:`zoo.nn.ResidualStack` arguments (``memory``, ``gamma``, ``init_velocity``).
    """
    stack = spec.stack_class([ResidualOf(b) for b in spec.blocks], rule=rule, **options)
    # only the new wrappers: the copied blocks keep their own (per-module) train/eval mode
    for m in (stack, *stack.blocks):
        m.training = spec.training
    return spec.assemble(stack)


@register_target(
    "momentum",
    "transformer",
    TRANSFORMER_OPTIONS,
    "the source with its blocks as a momentum ResidualStack of f(x) = block(x) - x: "
    "gamma = 0 (memory='full') is the same function",
)
def _to_momentum_blocks(spec: BlockStackSpec, options: dict[str, Any]) -> nn.Module:
    options = {"gamma": 0.9, "memory": "reversible", **options}
    return build_block_stack(spec, "momentum", options)
