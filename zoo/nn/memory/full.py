"""memory="full": ordinary autograd, every activation kept (or, with ``grad_checkpointing``, each step's input only,
the step recomputed in backward). Also the forward of every strategy when no gradient is needed."""

from __future__ import annotations

import torch

from zoo.nn.memory.common import EngineStack
from zoo.nn.rules import State

__all__ = ["integrate", "integrate_from", "run", "run_plain"]


def _advance(
    stack: EngineStack,
    n: int,
    args: tuple,
    kwargs: dict,
    *state: torch.Tensor | None,
    overwrite: bool = False,
    internal: bool = False,
) -> State:
    """Step n of the stack's rule from ``state``; ``internal``: its outputs go only to step n + 1 (and its
    block)."""
    rule, h = stack.forward_rule, stack.step
    if rule.fuses_tail:  # one fused kernel for the rule and the blocks' element-wise tails (the momentum rule)
        parts = lambda m, y, k: stack.residual_parts(m, y, args, kwargs)  # noqa: E731
        return rule.step_parts(parts, n, state, h, overwrite=overwrite, reuse_cotangents=internal)
    return rule.step(lambda m, y, k: stack.residual(m, y, args, kwargs), n, state, h)


def integrate(
    stack: EngineStack,
    x: torch.Tensor,
    args: tuple,
    kwargs: dict,
    checkpointing: bool = False,
    states: list[torch.Tensor] | None = None,
    stop: int | None = None,
) -> torch.Tensor:
    """x_N from x_0 by the stack's forward rule, in floating point with ordinary autograd; ``checkpointing``
    recomputes v_0 and each step in backward.
    ``x``: the stack's input; ``args`` / ``kwargs``: the extra arguments every block receives; ``states`` and
    ``stop``: as :func:`integrate_from`'s (the states x_1 .. x_stop collected, x_stop returned)."""
    rule = stack.forward_rule
    stop = stack.depth if stop is None else stop
    if not checkpointing:
        if stack.init_velocity == "zero" and rule.fuses_tail:
            # the fused step takes v_0 = 0 as None: no state-sized zeros filled, read, or given a gradient
            state = rule.initial_state(x, lambda: None)
        else:
            state = rule.initial_state(x, lambda: stack.initial_velocity(x, args, kwargs))
        # v_0 = 0 is needed by nothing else: the first step may overwrite it
        return integrate_from(
            stack, state, 0, args, kwargs, overwrite_first=stack.init_velocity == "zero", states=states, stop=stop
        )

    def velocity() -> torch.Tensor:
        if stack.init_velocity == "zero":
            return torch.zeros_like(x)
        return stack.checkpoint(stack.initial_velocity, x, args, kwargs)

    # the state's tensors are direct inputs of the checkpoint (it finds their devices for the random state)
    state = rule.initial_state(x, velocity)
    for n in range(stop):
        state = stack.checkpoint(lambda *s, n=n: _advance(stack, n, *s), args, kwargs, *state)
        if states is not None:
            states.append(state[0])
    return state[0]


def integrate_from(
    stack: EngineStack,
    state: State,
    start: int,
    args: tuple,
    kwargs: dict,
    overwrite_first: bool = False,
    states: list[torch.Tensor] | None = None,
    stop: int | None = None,
) -> torch.Tensor:
    """x_stop (x_N by default) from the state of step ``start`` (steps ``start`` .. stop - 1 with ordinary autograd).
    ``stack``: the ResidualStack; ``state``: the rule's state at step ``start``; ``args`` / ``kwargs``: the extra
    arguments every block receives;
    ``overwrite_first``: the given velocity is needed by nothing else (no autograd node saved it), so step
    ``start`` may write into it;
    ``states``: None, or a list that receives x_{n+1} after each step n (the per-block outputs; each step's outputs
    then go to the caller too, so no step's backward writes into their gradients);
    ``stop``: the step to stop at (N, the stack's depth, by default): the steps of a shorter stack compute the same
    states as far as they go."""
    stop = stack.depth if stop is None else stop
    for n in range(start, stop):
        # v_n is the previous step's own output, needed by nothing else: the step may overwrite it
        # (not under checkpointing, whose recomputation reads the step's inputs again); the outputs of every step
        # but the last go only to the next step and its block (unless the caller collects the states)
        overwrite = n > start or overwrite_first
        internal = n < stop - 1 and states is None
        state = _advance(stack, n, args, kwargs, *state, overwrite=overwrite, internal=internal)
        if states is not None:
            states.append(state[0])
    return state[0]


def run_plain(
    stack: EngineStack,
    x: torch.Tensor,
    args: tuple,
    kwargs: dict,
    checkpointing: bool = False,
    states: list[torch.Tensor] | None = None,
    stop: int | None = None,
) -> torch.Tensor:
    """The transition block, then :func:`integrate`.
    ``stack``: the ResidualStack; ``x``: its input; ``args`` / ``kwargs``: the extra arguments every block receives;
    ``checkpointing``: recompute each step in backward (timm's grad checkpointing); ``states`` and ``stop``: as
    :func:`integrate_from`'s (the per-block outputs collected, the steps run)."""
    transition = stack.transition
    if transition is not None:
        x = stack.checkpoint(transition, x) if checkpointing else transition(x)
    if stack.depth == 0:
        return x
    return integrate(stack, x, args, kwargs, checkpointing, states, stop)


def run(stack: EngineStack, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The forward of memory="full" (activation checkpointing when the stack's ``grad_checkpointing`` is on).
    ``x``: the stack's input; ``args`` / ``kwargs``: the extra arguments every block receives."""
    return run_plain(stack, x, args, kwargs, stack.grad_checkpointing and torch.is_grad_enabled())
