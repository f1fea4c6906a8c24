"""The block interface of the residual-stack engine: what a residual function f_n may offer the engine.

Any module ``f(x, *args, **kwargs) -> tensor shaped like x`` is a :class:`ResidualFunction`. A block whose residual
function ends in an element-wise tail, f(x) = residual_tail(x, g(x), tail), and whose function depends on the
stack's step h (a post-activation ResNet block x -> relu(x + g(x)): f(x) = (relu(x + h g(x)) - x) / h), declares it
by implementing :class:`ResidualFunctionWithTail`: the stack tells it its step, and the reversible momentum engine
asks it for (g(x), tail) and fuses the tail into its fixed-point step.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from zoo.ops.fixed_point import RESIDUAL_TAILS, residual_tail

__all__ = ["RESIDUAL_TAILS", "ResidualFunction", "ResidualFunctionWithTail", "has_tail", "residual_tail"]

# ``residual_tail(x, g, tail)`` (re-exported from the kernels): the residual function from its input x and its last
# computed tensor g; ``"identity"``: f = g, ``"relu"``: f = relu(x + g) - x (x + f is a post-activation block's
# output).


class ResidualFunction(Protocol):
    """f_n of a :class:`zoo.nn.ResidualStack`: maps x (and the stack's extra arguments) to a tensor shaped like x."""

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor: ...


@runtime_checkable
class ResidualFunctionWithTail(Protocol):
    """A residual function that knows the stack's step and can hand over its element-wise tail.

    ``set_residual_step(h)``: the stack calls it with its step h whenever the step changes (h = None: the block
    is not inside a stack, e.g. a ResNet stage's transition block, and computes its ordinary output).

    ``split_residual(x)``: ``(g, tail)`` with f(x) = ``residual_tail(x, g, tail)`` and ``tail`` one of
    :data:`RESIDUAL_TAILS`, or None when f has no such split at the current step (the engine then calls f).
    The engine uses it only for a call without extra arguments.
    """

    def set_residual_step(self, h: float | None) -> None: ...

    def split_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, str] | None: ...


def has_tail(block: object) -> bool:
    """Whether ``block`` implements :class:`ResidualFunctionWithTail` (checked once per class: the engine asks at
    every step, and a protocol check walks the class's attributes)."""
    cls = type(block)
    known = _HAS_TAIL.get(cls)
    if known is None:
        known = _HAS_TAIL[cls] = issubclass(cls, ResidualFunctionWithTail)
    return known


_HAS_TAIL: dict[type, bool] = {}
