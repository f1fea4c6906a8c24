"""memory="adjoint": only the stack's output is kept. Backward rebuilds the activations by stepping in reverse with
the rule's :meth:`~zoo.nn.rules.ForwardRule.inverse_step` ((A1) for Euler, (A2) for Heun) and back-propagates
through each step at the rebuilt point. Gradients are approximate (exact in the limit of smooth weights and large N).
"""

from __future__ import annotations

from typing import Any

import torch

from zoo.nn.memory.common import (
    EngineStack,
    FlatArguments,
    GradientAccumulator,
    flatten_arguments,
    refuse_double_backward,
    unique_parameters,
)
from zoo.nn.memory.full import integrate
from zoo.nn.memory.replay import AutocastReplay, RNGLog, RNGState, frozen_batchnorm_stats

__all__ = ["run"]


def run(stack: EngineStack, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The forward of memory="adjoint" (the transition block with ordinary autograd).
    ``stack``: the ResidualStack; ``x``: its input; ``args`` / ``kwargs``: the extra arguments every block receives."""
    transition = stack.transition
    if transition is not None:
        x = transition(x)
    if stack.depth == 0:
        return x
    if torch.is_grad_enabled():
        params = stack.trainable_parameters()
        flat = flatten_arguments(args, kwargs)
        if x.requires_grad or params or flat.needs_grad:
            apply = _apply_untraced if torch.compiler.is_compiling() else _AdjointBackprop.apply
            return apply(stack, flat, x, *flat.grad_tensors, *params)
    return integrate(stack, x, args, kwargs)


@torch.compiler.disable
def _apply_untraced(*inputs: Any) -> Any:
    """``_AdjointBackprop.apply(*inputs)`` outside a caller's torch.compile: its forward records random states on the
    host, which Dynamo cannot trace. Called untraced, the caller's graph breaks once around the whole stack, and
    nothing inside is compiled frame by frame (each block's call, specialised on the block index, would otherwise
    compile a code object of its own and hit Dynamo's recompile limit after 8 blocks).
    ``inputs``: the Function's arguments."""
    return _AdjointBackprop.apply(*inputs)


class _AdjointBackprop(torch.autograd.Function):
    """Store x_N only; rebuild x_n backward with the rule's inverse step and back-propagate step by step."""

    @staticmethod
    def forward(
        ctx: Any, stack: EngineStack, flat: FlatArguments, x: torch.Tensor, *inputs: torch.Tensor
    ) -> torch.Tensor:
        args, kwargs = flat.unflatten()
        rule, h = stack.forward_rule, stack.step
        ctx.stack = stack
        ctx.flat = flat
        ctx.replay = AutocastReplay(x.device)
        # the random state before each f call, in order: record calls_per_step * n + k is step n's k-th
        rng = ctx.rng = RNGLog(x.device) if stack.preserve_rng_state else None

        def f(m: int, y: torch.Tensor, k: int) -> torch.Tensor:
            if rng is not None:
                rng.record()
            return stack.residual(m, y, args, kwargs)

        with torch.no_grad():
            state = (x,)
            for n in range(stack.depth):
                state = rule.step(f, n, state, h)
        (x,) = state
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        refuse_double_backward("adjoint")
        stack: EngineStack = ctx.stack
        rule, h = stack.forward_rule, stack.step
        acc = GradientAccumulator(ctx.flat, stack.trainable_parameters())
        (x,) = ctx.saved_tensors
        args_c, kwargs_c = acc.constant_arguments()
        blocks = stack.blocks
        rng: RNGLog | None = ctx.rng
        outer_rng = RNGState(x.device) if rng is not None else None

        def replaying(n: int, args: tuple, kwargs: dict):
            """f for step n, replaying the forward's random state of each evaluation."""

            def f(m: int, y: torch.Tensor, k: int) -> torch.Tensor:
                if rng is not None:
                    rng.restore(rule.calls_per_step * n + k)
                return stack.residual(m, y, args, kwargs)

            return f

        g = grad_out
        x = x.detach()
        try:
            with frozen_batchnorm_stats(blocks), ctx.replay.autocast_ctx():
                for n in reversed(range(stack.depth)):
                    with torch.no_grad():
                        (x_prev,) = rule.inverse_step(replaying(n, args_c, kwargs_c), n, (x,), h)
                    step_params = unique_parameters(blocks[i] for i in rule.step_blocks(n, stack.depth))
                    g = acc.vjp(
                        lambda t, a, kw, n=n: rule.step(replaying(n, a, kw), n, (t,), h)[0], x_prev, step_params, g
                    )
                    x = x_prev
        finally:
            if outer_rng is not None:
                outer_rng.restore()
        return (None, None, g, *acc.input_gradients())
