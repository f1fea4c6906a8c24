"""memory="full": ordinary autograd, every activation kept (or, with ``grad_checkpointing``, each step's input only,
the step recomputed in backward). Also the forward of every strategy when no gradient is needed."""

from __future__ import annotations

import torch

from zoo.nn.memory.common import EngineStack
from zoo.nn.rules import State

__all__ = ["integrate", "run", "run_plain"]


def integrate(
    stack: EngineStack, x: torch.Tensor, args: tuple, kwargs: dict, checkpointing: bool = False
) -> torch.Tensor:
    """x_N from x_0 by the stack's forward rule, in floating point with ordinary autograd; ``checkpointing``
    recomputes v_0 and each step in backward.
    ``x``: the stack's input; ``args`` / ``kwargs``: the extra arguments every block receives."""
    rule, h = stack.forward_rule, stack.step

    def advance(n: int, args_: tuple, kwargs_: dict, *state: torch.Tensor, overwrite: bool = False) -> State:
        if rule.fuses_tail:  # one fused kernel for the rule and the blocks' element-wise tails (the momentum rule)
            parts = lambda m, y, k: stack.residual_parts(m, y, args_, kwargs_)  # noqa: E731
            return rule.step_parts(parts, n, state, h, overwrite=overwrite)
        return rule.step(lambda m, y, k: stack.residual(m, y, args_, kwargs_), n, state, h)

    if checkpointing:

        def velocity() -> torch.Tensor:
            if stack.init_velocity == "zero":
                return torch.zeros_like(x)
            return stack.checkpoint(stack.initial_velocity, x, args, kwargs)

        # the state's tensors are direct inputs of the checkpoint (it finds their devices for the random state)
        state = rule.initial_state(x, velocity)
        for n in range(stack.depth):
            state = stack.checkpoint(advance, n, args, kwargs, *state)
    else:
        state = rule.initial_state(x, lambda: stack.initial_velocity(x, args, kwargs))
        for n in range(stack.depth):
            # v_n is the previous step's own output (or v_0 = 0), needed by nothing else: the step may overwrite it;
            # not under checkpointing, whose recomputation reads the step's inputs again
            state = advance(n, args, kwargs, *state, overwrite=n > 0 or stack.init_velocity == "zero")
    return state[0]


def run_plain(
    stack: EngineStack, x: torch.Tensor, args: tuple, kwargs: dict, checkpointing: bool = False
) -> torch.Tensor:
    """The transition block, then :func:`integrate`.
    ``stack``: the ResidualStack; ``x``: its input; ``args`` / ``kwargs``: the extra arguments every block receives;
    ``checkpointing``: recompute each step in backward (timm's grad checkpointing)."""
    transition = stack.transition
    if transition is not None:
        x = stack.checkpoint(transition, x) if checkpointing else transition(x)
    if stack.depth == 0:
        return x
    return integrate(stack, x, args, kwargs, checkpointing)


def run(stack: EngineStack, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The forward of memory="full" (activation checkpointing when the stack's ``grad_checkpointing`` is on).
    ``x``: the stack's input; ``args`` / ``kwargs``: the extra arguments every block receives."""
    return run_plain(stack, x, args, kwargs, stack.grad_checkpointing and torch.is_grad_enabled())
