"""memory="reversible" (a rule with an exact inverse: the momentum rule): only x_N, v_N and an information buffer are
kept. The forward runs (M1) in exact fixed-point arithmetic (``zoo.ops.fixed_point``), so backward rebuilds every x_n
and v_n bit for bit with (M2) and back-propagates through each step: the gradients of full backprop, with memory
flat in depth. A state outside the fixed-point range raises a ZooError in forward on CPU; on an accelerator (no host
sync in forward) the output is NaN and backward raises the error. The stack's last ``stored_blocks`` steps may instead
store their activations (ordinary autograd): no recomputation for them, their activations held until backward.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from zoo.errors import ZooError
from zoo.nn.memory.common import (
    EngineStack,
    FlatArguments,
    GradientAccumulator,
    flatten_arguments,
    refuse_double_backward,
    unique_parameters,
)
from zoo.nn.memory.full import integrate_from, run_plain
from zoo.nn.memory.replay import AutocastReplay, RNGLog, RNGState, frozen_batchnorm_stats
from zoo.ops.fixed_point import FixedPoint, momentum_kernel

__all__ = ["run"]


def run(stack: EngineStack, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The forward of memory="reversible"; without gradients, (M1) in floating point.
    ``stack``: the ResidualStack; ``x``: its input; ``args`` / ``kwargs``: the extra arguments every block receives.

    The last ``stack.stored_blocks`` steps store their activations (ordinary autograd, from the rebuilt part's
    (x, v) in floating point) instead of being rebuilt; a count reaching the number of steps runs the whole stack,
    its transition included, with ordinary autograd."""
    if stack.depth and torch.is_grad_enabled():
        params = stack.rebuilt_parameters()
        flat = flatten_arguments(args, kwargs)
        stored = min(stack.stored_blocks, stack.depth)
        if stored < stack.depth and (x.requires_grad or params or flat.needs_grad):
            # the transition block too is rebuilt in backward (from the stored stage input)
            apply = _apply_untraced if torch.compiler.is_compiling() else _ReversibleMomentum.apply
            out = apply(stack, flat, stored, x, *flat.grad_tensors, *params)
            if not stored:
                return out
            # v_{N-k} is the Function's own output, read by nothing else: the first stored step may overwrite it
            return integrate_from(stack, out, stack.depth - stored, args, kwargs, overwrite_first=True)
    return run_plain(stack, x, args, kwargs)


@torch.compiler.disable
def _apply_untraced(*inputs: Any) -> Any:
    """``_ReversibleMomentum.apply(*inputs)`` outside a caller's torch.compile: its forward and backward record random
    states and read flags on the host, which Dynamo cannot trace. Called untraced, the caller's graph breaks once
    around the whole stack, and nothing inside is compiled frame by frame (each block's call, specialised on the
    block index, would otherwise compile a code object of its own and hit Dynamo's recompile limit after 8 blocks).
    ``inputs``: the Function's arguments."""
    return _ReversibleMomentum.apply(*inputs)


class _ReversibleMomentum(torch.autograd.Function):
    """(M1) in exact fixed point; backward rebuilds (x_n, v_n) bit for bit with (M2).

    State: integers x, v = round(2^F x), round(2^F v); each step adds g_n = round(2^F (1-gamma) h f_n(x_n))
    to v after multiplying v by gamma = n/d exactly (remainders kept in the buffer), then adds v to
    x. Every operation is an integer operation with an exact inverse, and f_n is re-evaluated on
    the same float input x_n = x_int / 2^F with the same random state, so the rebuild is exact.
    Gradients (z = (x, v), a = dL/dx_{n+1} + dL/dv_{n+1}):
        dL/dx_n = dL/dx_{n+1} + (1-gamma) h J_f^T a,  dL/dv_n = gamma a,  dL/dtheta_n += (1-gamma) h (df/dtheta)^T a.

    Each step is one fused kernel (zoo.ops.fixed_point) that also applies the residual function's element-wise
    tail when the block leaves it out (``residual_parts``: f = relu(x + g) - x of a post-activation ResNet block),
    and updates the state in place; backward runs one kernel per step for the inverse and the tail's part of the
    gradient, and one for the gradient accumulation, around f_n's recomputed graph.

    With ``stored`` > 0 the Function runs steps 0 .. N - stored - 1 only and returns that state (x, v) as floats;
    the caller runs the remaining steps with ordinary autograd, and backward starts from both cotangents.

    Stored for backward: the final integer state (x, v: int64; each buffer word, in forward too, in the
    integer type of :meth:`GammaRatio.word_plan`: at gamma 0.9, 35 steps as two int8 words, 100 as one int32),
    and, with a transition block, the
    stage input, from which the transition is recomputed (checkpointed) at the end of backward.

    Range: a state outside |x| < 2^(61 - F) would make the forward wrong; see :func:`_refuse_out_of_range` (an
    error in forward on CPU, a NaN output and an error in backward on an accelerator).
    """

    @staticmethod
    def forward(
        ctx: Any, stack: EngineStack, flat: FlatArguments, stored: int, x_in: torch.Tensor, *inputs: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        args, kwargs = flat.unflatten()
        transition = stack.transition
        fp, ratio = stack.fixed_point, stack.ratio
        c = (1.0 - stack.gamma) * stack.step
        ctx.stack, ctx.flat = stack, flat
        ctx.replay = AutocastReplay(x_in.device)
        # records: the transition's (when there is one), v_0's, then f_n's before each call
        rng = ctx.rng = RNGLog(x_in.device) if stack.preserve_rng_state else None
        with torch.no_grad():
            if rng is not None and transition is not None:
                rng.record()
            x = transition(x_in) if transition is not None else x_in
            dtype = ctx.dtype = x.dtype
            xi = fp.to_fixed(x)
            xf = fp.to_float(xi, dtype)  # every f_n sees x_n = x_int / 2^F, in forward and backward alike
            if rng is not None:
                rng.record()
            if stack.init_velocity == "zero":
                vi = torch.zeros_like(xi)
                x0_max, v0_max = fp.abs_max(x), torch.zeros((), dtype=torch.float64, device=x.device)
            else:
                v0 = stack.initial_velocity(xf, args, kwargs)
                vi = fp.to_fixed(v0)
                x0_max, v0_max = fp.abs_max(x), fp.abs_max(v0)
            g_max = torch.zeros((), dtype=torch.float64, device=x.device)
            depth = ctx.depth = stack.depth - stored  # the last `stored` steps run outside, with autograd

            # the buffer words: each in the integer type its static bound allows (GammaRatio.word_plan), a new
            # one started at each step in `starts`; the kernels compute in int32/int64
            plan = ratio.word_plan(depth)
            starts = ctx.word_starts = frozenset(itertools.accumulate(count for count, _ in plan[:-1]))
            dtypes = iter(dtype for _, dtype in plan)
            buffer, words = torch.zeros_like(xi, dtype=next(dtypes)), []
            for n in range(depth):
                if n in starts:  # the buffer word is full: start a new one
                    words.append(buffer)
                    buffer = torch.zeros_like(xi, dtype=next(dtypes))
                if rng is not None:
                    rng.record()
                g, tail = stack.residual_parts(n, xf, args, kwargs)
                step = momentum_kernel("step", c=c, tail=tail, n=ratio.n, d=ratio.d, scale=fp.scale)
                # in place: (xi, vi, buffer) <- step n's state, xf <- x_{n+1} as a float, f_n's input no longer needed;
                # g_max in place too (no small tensor allocated per step, see RNGLog)
                torch.maximum(g_max, step(xi, vi, buffer, xf, g), out=g_max)
            # every state (x_n, v_n) in range, not only the last: then no integer operation can wrap
            overflow = fp.momentum_state_out_of_range(x0_max, v0_max, g_max, stack.gamma, depth)
        ctx.n_words = len(words)
        # The integer state is not a save_for_backward tensor: backward takes it off ctx, so each x, v and
        # buffer is freed as soon as the rebuild has stepped past it (a retained graph is not rebuilt twice).
        ctx.state = [xi, vi, buffer, *words]
        ctx.save_for_backward(overflow, x_in if transition is not None else None)
        out = _refuse_out_of_range(xf, overflow, fp, raise_now=stack.host_read_is_free(xf))
        if not stored:
            return out
        return out, fp.to_float(vi, dtype)

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor, grad_v: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, ...]:
        refuse_double_backward("reversible")
        stack: EngineStack = ctx.stack
        transition = stack.transition
        fp, ratio, dtype = stack.fixed_point, stack.ratio, ctx.dtype
        c = (1.0 - stack.gamma) * stack.step
        overflow, x_in = ctx.saved_tensors
        if ctx.state is None:
            raise ZooError(
                "a reversible momentum stack rebuilds its states once: backward ran twice through the same "
                "forward (retain_graph=True); run the forward again, or use memory='full'"
            )
        xi, vi, buffer, *words = ctx.state
        ctx.state = None
        if bool(overflow):  # on an accelerator the one host sync, in backward only (the forward output is NaN)
            raise _out_of_range_error(fp)
        acc = GradientAccumulator(ctx.flat, stack.rebuilt_parameters())
        blocks = stack.blocks
        outer_rng = RNGState(grad_out.device) if ctx.rng is not None else None
        first_call = 2 if transition is not None else 1  # the record of f_0's call (see forward)

        # gx = dL/dx_n and a = dL/dx_{n+1} + dL/dv_{n+1} (so dL/dv_n = gamma a), updated in place: own copies
        gx = grad_out.to(dtype, copy=True)
        a = gx.clone() if grad_v is None else gx + grad_v.to(dtype)
        gv: torch.Tensor | None = None  # dL/dv_0, for the initial velocity's gradient
        modules = ([transition] if transition is not None else []) + stack.velocity_modules() + blocks
        try:
            with frozen_batchnorm_stats(modules), ctx.replay.autocast_ctx():
                with torch.no_grad():
                    xf = momentum_kernel("rewind", scale=fp.scale, dtype=dtype)(xi, vi)  # x_{N-1} = x_N - v_N
                for n in reversed(range(ctx.depth)):
                    if ctx.rng is not None:
                        ctx.rng.restore(first_call + n)
                    parts, xg, vjp_leaves = acc.run_with_grad(
                        lambda t, a_, k_, n=n: stack.residual_parts(n, t, a_, k_), xf
                    )
                    g, tail = parts
                    del parts
                    with torch.no_grad():
                        # v_n exactly, x_{n-1} = x_n - v_n and its float value, the tail's part of the gradient
                        unstep = momentum_kernel(
                            "unstep", c=c, tail=tail, n=ratio.n, d=ratio.d, scale=fp.scale, first=n == 0
                        )
                        grad_g = unstep(xi, vi, buffer, xf, g.detach(), a, gx)
                        if n in ctx.word_starts:  # step n was its word's first: back to the previous word
                            buffer = words.pop()
                    grad_branch = acc.backprop(g, xg, vjp_leaves, unique_parameters([blocks[n]]), grad_g)
                    del g, xg
                    with torch.no_grad():
                        if n == 0 and stack.init_velocity != "zero":
                            gv = stack.gamma * a
                        momentum_kernel("accumulate", gamma=stack.gamma, last=n == 0)(gx, a, grad_branch)
                        if n:  # f_n's graph is gone: x_{n-1} as a float into the same buffer
                            momentum_kernel("refresh", scale=fp.scale)(xi, xf)
                    del grad_g, grad_branch  # before f_{n-1}'s recomputation allocates
                if stack.record_rebuild:  # diagnostic: the rebuilt fixed-point (x_0, v_0)
                    stack.last_rebuild = (xi, vi)
                if stack.init_velocity != "zero":  # v_0 = f_0(x_0) or g(x_0): its gradient flows into x_0
                    if ctx.rng is not None:
                        ctx.rng.restore(first_call - 1)
                    v_modules = [blocks[0]] if stack.init_velocity == "f" else stack.velocity_modules()
                    gx_v = acc.vjp(stack.initial_velocity, xf, unique_parameters(v_modules), gv)
                    gx = gx + gx_v.to(dtype)
                del xi, vi, buffer, xf, a, gv  # the state is rebuilt: free it before the transition's recomputation
                if transition is not None:  # x_0 = transition(x_in), recomputed from the stored input
                    if ctx.rng is not None:
                        ctx.rng.restore(0)
                    gx = acc.vjp(lambda t, a_, k_: transition(t), x_in, unique_parameters([transition]), gx)
        finally:
            if outer_rng is not None:
                outer_rng.restore()
        return (None, None, None, gx, *acc.input_gradients())


def _out_of_range_error(fp: FixedPoint) -> ZooError:
    return ZooError(
        f"reversible momentum: a value of the state or of a residual function is not finite or exceeds the "
        f"fixed-point range |x| < 2^{61 - fp.frac_bits}; the forward in exact fixed point would be wrong and the "
        f"rebuild not exact. Normalise the input, lower fixed_point_bits (now {fp.frac_bits}), or use memory='full'"
    )


def _refuse_out_of_range(out: torch.Tensor, overflow: torch.Tensor, fp: FixedPoint, raise_now: bool) -> torch.Tensor:
    """The reversible forward's output, never a wrong finite value when some state left the fixed-point range.

    ``overflow`` is the 0-dim flag of :meth:`FixedPoint.momentum_state_out_of_range`. With ``raise_now`` (a CPU
    tensor: reading the flag is no device sync) a set flag raises the range error here, in forward. Otherwise (an
    accelerator, where reading it would synchronise the device) the output is filled with NaN on the device when
    the flag is set (``masked_fill_`` with the 0-dim flag, no sync), so code that reads the output without calling
    backward sees NaN, not a plausible number; backward raises the same error. A device-side assert was not chosen:
    on CUDA it leaves the context unusable.
    """
    if raise_now:
        if bool(overflow):
            raise _out_of_range_error(fp)
        return out
    return out.masked_fill_(overflow, float("nan"))
