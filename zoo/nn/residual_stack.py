"""The residual-stack engine: a stack of residual functions integrated by a forward rule, with a memory strategy.

A stack holds N residual functions f_0 .. f_{N-1} (any modules mapping ``x -> f(x)`` with the
shape of ``x``; the optional block interface is :mod:`zoo.nn.residual_function`) and applies one of the forward
rules of :mod:`zoo.nn.rules` with step h:

    euler   x_{n+1} = x_n + h f_n(x_n)                                          (R1)
    heun    y_n = x_n + h f_n(x_n),  x_{n+1} = x_n + h/2 (f_n(x_n) + f_{n+1}(y_n))  (H1)
    momentum  v_{n+1} = gamma v_n + (1 - gamma) h f_n(x_n),  x_{n+1} = x_n + v_{n+1}   (M1, h = 1 by default)

with ``h = 1/N`` (``scale="depth"``) or a fixed number (``scale=1.0`` is the plain ResNet).
Heun needs theta_0 .. theta_N; a stack of N blocks takes N steps and uses theta_N := theta_{N-1}.

Memory strategies (one module each under :mod:`zoo.nn.memory`):

- ``"full"``: ordinary autograd, every activation is kept.
- ``"adjoint"``: only the stack's output is kept. Backward rebuilds the activations by stepping
  in reverse, (A1) for Euler and (A2) for Heun, and back-propagates through each step at the
  rebuilt point. Gradients are approximate (exact in the limit of smooth weights and large N).
- ``"reversible"`` (momentum rule): only x_N, v_N and an information buffer are kept. The forward
  runs in exact fixed-point arithmetic (``zoo.ops.fixed_point``), so backward rebuilds every x_n and
  v_n bit for bit with (M2) and back-propagates through each step: the gradients of full backprop,
  with memory flat in depth. A state outside the fixed-point range raises a ZooError in forward on CPU;
  on an accelerator (no host sync in forward) the output is NaN and backward raises the error.

The momentum rule starts from v_0 = 0 (``init_velocity="zero"``), v_0 = f_0(x_0) (``"f"``) or
v_0 = g(x_0) for a module g. It returns x_N.

Per-block outputs: ``stack.states(x)`` is the list x_1 .. x_N (x_{n+1} the output of block n), computed by
memory="full"'s forward whatever the strategy (a feature-extraction helper under the others: ordinary autograd);
``stack.truncate(k)`` keeps the first k steps with the same step h, so x_1 .. x_k do not change.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.nn.memory import adjoint, full, reversible
from zoo.nn.memory.common import EngineStack, unique_parameters
from zoo.nn.memory.replay import AutocastReplay as _Replay  # noqa: F401  (old private names, kept importable)
from zoo.nn.memory.replay import RNGLog as _RNGLog  # noqa: F401
from zoo.nn.memory.replay import RNGState as _RNGState  # noqa: F401
from zoo.nn.memory.replay import frozen_batchnorm_stats, restored_batchnorm_stats
from zoo.nn.memory.reversible import _refuse_out_of_range  # noqa: F401
from zoo.nn.residual_function import has_tail
from zoo.nn.rules import DEFAULT_GAMMA, RULES, ForwardRule
from zoo.ops.fixed_point import FixedPoint, GammaRatio
from zoo.validation import host_read_is_free

__all__ = [
    "DEFAULT_GAMMA",
    "INIT_VELOCITIES",
    "MEMORY_MODES",
    "MEMORY_STRATEGIES",
    "RULES",
    "ResidualStack",
    "frozen_batchnorm_stats",
    "restored_batchnorm_stats",
    "validate_rule_memory",
]

# memory strategy name -> its forward, ``run(stack, x, args, kwargs)``
MEMORY_STRATEGIES: Mapping[str, Callable[[EngineStack, torch.Tensor, tuple, dict], torch.Tensor]] = {
    "full": full.run,
    "adjoint": adjoint.run,
    "reversible": reversible.run,
}
MEMORY_MODES = tuple(MEMORY_STRATEGIES)
INIT_VELOCITIES = ("zero", "f")


def _check_choice(kind: str, value: Any, choices: Iterable[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ZooError(f"unknown {kind} {value!r}: choose one of {', '.join(repr(c) for c in choices)}")
    return value


def validate_rule_memory(rule: str, memory: str, gamma: float = DEFAULT_GAMMA) -> None:
    """Raise one clear error for an unknown or unsupported ``rule`` / ``memory`` / ``gamma``."""
    _check_choice("rule", rule, RULES)
    _check_choice("memory", memory, MEMORY_MODES)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise ZooError(f"gamma must be a number in [0, 1) (a Python or NumPy scalar), got {type(gamma).__name__}")
    if not 0.0 <= gamma < 1.0:
        raise ZooError(f"gamma must lie in [0, 1), got {gamma!r}")
    exact = RULES[rule].exact_inverse
    if memory == "reversible" and not exact:
        raise ZooError(
            "memory='reversible' needs rule='momentum' (only the momentum rule is invertible); "
            "use memory='adjoint' for the euler and heun rules"
        )
    if memory == "adjoint" and exact:
        raise ZooError(
            "the momentum rule is exactly invertible: use memory='reversible' (exact, memory flat "
            "in depth) or memory='full'"
        )
    if memory == "reversible" and gamma == 0.0:
        raise ZooError(
            "memory='reversible' needs 0 < gamma < 1 (the inverse (M2) divides by gamma); "
            "gamma=0 is the plain ResNet: use memory='full'"
        )


class ResidualStack(nn.Module):
    """A stack of residual functions integrated by a forward rule, with a memory strategy.

    Args:
        blocks: the residual functions f_n (each maps ``x, *args, **kwargs`` to a tensor shaped like
            ``x``). The same module may appear several times: its weights are then tied.
        rule: a name in :data:`RULES` (:mod:`zoo.nn.rules`): ``"euler"`` (R1), ``"heun"`` (H1) or
            ``"momentum"`` (M1). The rule object is :attr:`forward_rule`.
        scale: the step h: ``"depth"`` for 1/N, or a number (1.0 is the plain ResNet rule).
        gamma: momentum term of the momentum rule.
        memory: ``"full"`` (autograd), ``"adjoint"`` (store only the output, rebuild in backward),
            or ``"reversible"`` (momentum rule only).
        transition: an optional shape-changing module applied first (the first block of a ResNet
            stage), with ordinary autograd, except under ``memory="reversible"``, which stores only
            its input and recomputes it in backward. It is child ``"0"`` and the residual blocks
            follow as ``"1" .. "N"``, so a stage keeps torchvision's parameter names.
        preserve_rng_state: replay the forward's random state when recomputing (dropout, stochastic
            depth); turn off only when no block draws random numbers.
        init_velocity: v_0 of the momentum rule: ``"zero"``, ``"f"`` (v_0 = f_0(x_0)) or a module g
            (v_0 = g(x_0), a child named ``"velocity"``).
        fixed_point_bits: fractional bits of the fixed-point state under ``memory="reversible"`` (x and v are
            int64 with this many bits after the point, so every state must stay below 2^(61 - bits) in size:
            2^29 for 32 bits; the forward checks it).
        stored_blocks: under ``memory="reversible"``, how many blocks at the end of the stack store their
            activations (ordinary autograd, as ``memory="full"``) instead of being rebuilt in backward: each saves
            one block forward per training step and holds that block's activations from its forward until backward
            reaches it, which comes first in the stack's backward. A count reaching the number of residual steps
            stores the whole stack, its transition included. 0 (default): every block is rebuilt.

    Blocks implementing :class:`~zoo.nn.residual_function.ResidualFunctionWithTail` (post-activation ResNet
    blocks, whose residual function depends on the step) are told the step size whenever it changes.
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        rule: str = "euler",
        scale: float | str = 1.0,
        gamma: float = DEFAULT_GAMMA,
        memory: str = "full",
        transition: nn.Module | None = None,
        preserve_rng_state: bool = True,
        init_velocity: str | nn.Module = "zero",
        fixed_point_bits: int = 32,
        stored_blocks: int = 0,
    ):
        super().__init__()
        validate_rule_memory(rule, memory, gamma)
        if isinstance(stored_blocks, bool) or not isinstance(stored_blocks, numbers.Integral) or stored_blocks < 0:
            raise ZooError(f"stored_blocks must be a non-negative integer, got {stored_blocks!r}")
        stored_blocks = int(stored_blocks)
        if stored_blocks and memory != "reversible":
            raise ZooError(
                f"stored_blocks={stored_blocks} applies to memory='reversible' only (memory={memory!r} "
                f"{'stores every block already' if memory == 'full' else 'rebuilds by stepping in reverse'}); "
                "give stored_blocks=0"
            )
        self.stored_blocks = stored_blocks
        if isinstance(scale, str):
            if scale != "depth":
                raise ZooError(f"unknown scale {scale!r}: use 'depth' (h = 1/N) or a positive number")
        elif isinstance(scale, bool) or not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
            raise ZooError(f"scale must be 'depth' or a finite positive number, got {scale!r}")
        else:
            scale = float(scale)
        if isinstance(init_velocity, str):
            _check_choice("init_velocity", init_velocity, INIT_VELOCITIES)
        elif not isinstance(init_velocity, nn.Module):
            raise ZooError(f"init_velocity must be 'zero', 'f' or a module, got {type(init_velocity).__name__}")
        if not RULES[rule].has_velocity and not (isinstance(init_velocity, str) and init_velocity == "zero"):
            raise ZooError(
                f"init_velocity applies to a rule with a velocity (rule='momentum'); rule={rule!r} has none: "
                "leave init_velocity='zero' or use rule='momentum'"
            )
        self.rule = rule
        self.scale = scale
        self.gamma = float(gamma)
        self.forward_rule: ForwardRule = RULES[rule].build(gamma=self.gamma)
        self.memory = memory
        self.preserve_rng_state = preserve_rng_state
        self.has_transition = transition is not None
        if transition is not None:
            self.add_module("0", transition)
        # a module g (v_0 = g(x_0)) is a child named "velocity"; "zero" / "f" are kept as strings
        self.init_velocity = init_velocity if isinstance(init_velocity, str) else "module"
        if isinstance(init_velocity, nn.Module):
            self.velocity = init_velocity
        self.ratio = GammaRatio(self.gamma) if memory == "reversible" else None
        # diagnostic of memory="reversible": when True, backward keeps the rebuilt fixed-point
        # (x_0, v_0) in ``last_rebuild`` (they equal the forward's bit for bit)
        self.record_rebuild = False
        self.last_rebuild: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fixed_point = FixedPoint(fixed_point_bits) if memory == "reversible" else None
        # activation checkpointing of memory="full" (timm's set_grad_checkpointing): the transition and every step
        # keep only their input and are recomputed in backward (same values and gradients, running statistics
        # updated once). "adjoint" and "reversible" store no per-step activations already, so it changes nothing.
        self.grad_checkpointing = False
        self._set_blocks(list(blocks))

    # ---------------------------------------------------------------- structure
    @property
    def _offset(self) -> int:
        return 1 if self.has_transition else 0

    @property
    def transition(self) -> nn.Module | None:
        return self._modules["0"] if self.has_transition else None

    @property
    def blocks(self) -> list[nn.Module]:
        """The residual functions f_0 .. f_{N-1} (tied blocks appear several times)."""
        return [self._modules[str(i + self._offset)] for i in range(self.depth)]

    def __len__(self) -> int:
        """Number of children, transition included (``stack[i]`` indexes them as nn.Sequential does)."""
        return self._depth + self._offset

    def __getitem__(self, index: int) -> nn.Module:
        """Child ``index`` in torchvision numbering: ``stage[0]`` is the transition block when there is one."""
        size = len(self)
        if not isinstance(index, int) or not -size <= index < size:
            raise IndexError(f"index {index!r} is out of range for a ResidualStack of {size} modules")
        return self._modules[str(index % size)]

    def __iter__(self) -> Iterator[nn.Module]:
        return (self._modules[str(i)] for i in range(len(self)))

    @property
    def depth(self) -> int:
        """N, the number of residual steps (the transition block is not counted)."""
        return self._depth

    @property
    def step(self) -> float:
        """The step h of the forward rule."""
        if self.scale == "depth":
            return 1.0 / max(self._depth, 1)
        return float(self.scale)

    def _set_blocks(self, blocks: list[nn.Module]) -> None:
        for name in [k for k in self._modules if k.isdigit() and int(k) >= self._offset]:
            del self._modules[name]
        for i, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise ZooError(f"block {i} of a ResidualStack is a {type(block).__name__}, not an nn.Module")
            self.add_module(str(i + self._offset), block)
        self._depth = len(blocks)
        self._sync_step()

    def _sync_step(self) -> None:
        h = self.step
        for block in self.blocks:
            if has_tail(block):
                block.set_residual_step(h)

    def extra_repr(self) -> str:
        text = f"rule={self.rule!r}, depth={self.depth}, step={self.step:.4g}, memory={self.memory!r}"
        if self.stored_blocks:
            text += f", stored_blocks={self.stored_blocks}"
        if self.forward_rule.has_velocity:
            text += f", gamma={self.gamma}, init_velocity={self.init_velocity!r}"
        return text

    # ---------------------------------------------------------------- depth operations (docs/mathematics.md, section 1)
    def is_tied(self) -> bool:
        """True when every residual step uses the same module."""
        return self.depth > 0 and len({id(b) for b in self.blocks}) == 1

    def tie(self, index: int = 0) -> ResidualStack:
        """Share the weights of block ``index`` across the whole stack (theta_n = theta)."""
        if self.depth:
            shared = self.blocks[index]
            self._set_blocks([shared] * self.depth)
        return self

    def untie(self) -> ResidualStack:
        """Give every step its own copy of the weights (for fine-tuning after deepening)."""
        seen: set[int] = set()
        blocks = []
        for b in self.blocks:
            blocks.append(copy.deepcopy(b) if id(b) in seen else b)
            seen.add(id(b))
        self._set_blocks(blocks)
        return self

    def deepen(self, depth: int, mode: str = "copy") -> ResidualStack:
        """Re-sample the stack to ``depth`` steps, keeping its function approximately unchanged.

        ``"copy"``: step i takes theta_{floor(i N / N')} (a tied stack stays tied, as published);
        ``"interpolate"``: parameters and buffers are linearly interpolated in depth s in [0, 1].
        With ``scale="depth"`` the step becomes 1/N'.
        """
        if not isinstance(depth, int) or depth < 1:
            raise ZooError(f"depth must be a positive integer, got {depth!r}")
        _check_choice("deepen mode", mode, ("copy", "interpolate"))
        old = self.blocks
        if not old:
            raise ZooError("cannot deepen an empty stack: there are no weights to copy")
        if self.is_tied() or mode == "copy":
            if self.is_tied():
                new = [old[0]] * depth
            else:
                new = [copy.deepcopy(old[(i * len(old)) // depth]) for i in range(depth)]
        else:
            new = [_interpolate_block(old, i / max(depth - 1, 1) * (len(old) - 1)) for i in range(depth)]
        self._set_blocks(new)
        return self

    def truncate(self, depth: int) -> ResidualStack:
        """Keep the first ``depth`` steps (blocks 0 .. depth - 1, the transition and initial velocity too) and drop
        the rest, with the step h unchanged (a ``scale="depth"`` stack keeps h = 1/N of its old N as a fixed
        ``scale``): the states x_1 .. x_depth of :meth:`states` are those of the whole stack, and forward returns
        x_depth (timm's ``prune_intermediate_layers``).

        ``depth``: the number of steps kept, 1 .. N. A rule whose last kept step evaluates a dropped block (Heun's
        step n evaluates f_{n+1}) would change x_depth: that is a ZooError (unless nothing is dropped).
        """
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or not 1 <= depth <= self.depth:
            raise ZooError(f"truncate keeps 1 .. {self.depth} steps of this stack, got depth={depth!r}")
        depth = int(depth)
        if depth == self.depth:
            return self
        needed = max(self.forward_rule.step_blocks(depth - 1, self.depth))
        if needed >= depth:
            raise ZooError(
                f"a {self.rule} stack truncated to {depth} steps would compute another x_{depth}: its step "
                f"{depth - 1} evaluates block {needed}, which truncation drops"
            )
        h = self.step
        self.scale = h  # h = 1/N of the old N, when scale="depth": the kept steps keep their step
        self._set_blocks(self.blocks[:depth])
        return self

    def smoothness(self) -> torch.Tensor:
        """max_n ||theta_{n+1} - theta_n|| over the stack (0 for a tied stack): the diagnostic of
        how close the ResNet is to its neural ODE (docs/mathematics.md, section 1)."""
        blocks = self.blocks
        diffs = [torch.zeros(())]
        for a, b in zip(blocks[:-1], blocks[1:]):
            if a is not b:
                sq = sum(
                    ((pa.detach() - pb.detach()).float() ** 2).sum().cpu()
                    for pa, pb in zip(a.parameters(), b.parameters())
                )
                diffs.append(torch.as_tensor(sq).sqrt())
        return torch.stack(diffs).max()

    # ---------------------------------------- the engine interface (zoo.nn.memory.common.EngineStack)
    def residual(self, n: int, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """f_n(x) (n clamped to the last block: Heun's f_N is f_{N-1}), checked to keep x's shape."""
        fx = self._modules[str(min(n, self.depth - 1) + self._offset)](x, *args, **kwargs)
        _check_tensor(fx, f"residual block {n}")
        if fx.shape != x.shape:
            raise ZooError(
                f"residual block {n} of a ResidualStack maps shape {tuple(x.shape)} to {tuple(fx.shape)}; "
                "a residual function must keep the shape (put shape changes in `transition`)"
            )
        return fx

    def residual_parts(self, n: int, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, str]:
        """(g, tail) with f_n(x) = residual_tail(x, g, tail) (zoo.nn.residual_function): a block implementing
        :class:`~zoo.nn.residual_function.ResidualFunctionWithTail` (the ResNet blocks: its branch output and
        ``"relu"``) leaves its element-wise tail to the reversible engine's fused kernels; any other gives
        (f_n(x), ``"identity"``)."""
        block = self._modules[str(min(n, self.depth - 1) + self._offset)]
        tailed = has_tail(block) and not args and not kwargs
        parts = block.split_residual(x) if tailed else None
        if parts is None:
            return self.residual(n, x, args, kwargs), "identity"
        if parts[0].shape != x.shape:
            raise ZooError(
                f"residual block {n} of a ResidualStack maps shape {tuple(x.shape)} to "
                f"{tuple(parts[0].shape)}; a residual function must keep the shape (put shape changes in "
                "`transition`)"
            )
        return parts

    def velocity_modules(self) -> list[nn.Module]:
        """The initial-velocity module g, when there is one."""
        return [self.velocity] if self.init_velocity == "module" else []

    def initial_velocity(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """v_0 of the momentum rule: zeros, f_0(x_0), or g(x_0)."""
        if self.init_velocity == "zero":
            return torch.zeros_like(x)
        v = self.residual(0, x, args, kwargs) if self.init_velocity == "f" else self.velocity(x, *args, **kwargs)
        _check_tensor(v, "the initial-velocity module")
        if v.shape != x.shape:
            raise ZooError(f"the initial velocity has shape {tuple(v.shape)}, the state {tuple(x.shape)}")
        return v

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the blocks (and of the initial-velocity module), each once."""
        return [p for p in unique_parameters(self.velocity_modules() + self.blocks) if p.requires_grad]

    def rebuilt_parameters(self) -> list[nn.Parameter]:
        """:meth:`trainable_parameters` and the transition block's: memory='reversible' rebuilds all."""
        modules = ([self.transition] if self.has_transition else []) + self.velocity_modules() + self.blocks
        return [p for p in unique_parameters(modules) if p.requires_grad]

    def checkpoint(self, fn: Callable[..., Any], *inputs: Any) -> Any:
        """``fn(*inputs)`` with its activations recomputed in backward (torch's non-reentrant checkpoint; the
        random state replayed; BatchNorm running statistics restored after the recomputation, so that they are
        updated once per forward, as without checkpointing)."""
        from torch.utils.checkpoint import checkpoint

        modules = list(self.children())
        return checkpoint(
            fn,
            *inputs,
            use_reentrant=False,
            preserve_rng_state=self.preserve_rng_state,
            context_fn=lambda: (contextlib.nullcontext(), restored_batchnorm_stats(modules)),
        )

    def host_read_is_free(self, t: torch.Tensor) -> bool:
        """Whether the engine may read a flag computed next to ``t`` on the host now, without a device sync."""
        return host_read_is_free(t)

    # ---------------------------------------------------------------- per-block states
    def states(
        self,
        x: torch.Tensor,
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        steps: int | None = None,
    ) -> list[torch.Tensor]:
        """The states x_1 .. x_k after each step of the stack's rule from x_0 = ``transition(x)`` (or ``x``):
        ``states(x)[n]`` is x_{n+1}, the output of block n (timm's block indices), and the last of all N is
        forward's x_N. The momentum rule's velocity v_n is part of its state but not returned (at gamma = 0,
        x_n is the plain ResNet's output of block n - 1).

        The states are computed by memory="full"'s forward (:func:`zoo.nn.memory.full.run_plain`), whatever the
        stack's ``memory``: ordinary autograd under the current grad mode, every step's activations kept while
        gradients are recorded (only each step's input with ``grad_checkpointing``), so under memory="reversible"
        or "adjoint" this is a feature-extraction helper whose memory grows with depth; run it under
        ``torch.no_grad()`` for features alone. x_N is forward's output bit for bit under memory="full", and under
        every memory strategy without gradients (their forward is then memory="full"'s); memory="reversible" with
        gradients runs its forward in fixed point, whose x_N differs from these floating-point states by rounding.

        Args:
            x: the stack's input, a floating-point tensor.
            args, kwargs: the extra positional and keyword arguments every block receives (forward's ``*args``
                and ``**kwargs``).
            steps: k, how many steps to run (``0 .. N``); None: all N. The steps of a shorter run are those of the
                whole stack (timm's ``stop_early``).
        """
        _check_input(x)
        if not isinstance(args, tuple):
            raise ZooError(f"args must be a tuple of the blocks' extra positional arguments, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ZooError(f"kwargs must be a mapping of the blocks' keyword arguments, got {type(kwargs).__name__}")
        if steps is None:
            steps = self.depth
        elif isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 0 <= steps <= self.depth:
            raise ZooError(f"steps must be an integer in 0 .. {self.depth} (the stack's depth) or None, got {steps!r}")
        out: list[torch.Tensor] = []
        if steps:
            checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
            full.run_plain(self, x, args, dict(kwargs or {}), checkpointing, states=out, stop=int(steps))
        return out

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x_N from x_0 = ``transition(x)`` (or ``x``) by the stack's rule and memory strategy (under
        ``torch.export``, memory="full"'s forward: the function, without a training-time memory strategy).

        Args:
            x: the input, a floating-point tensor.
            *args, **kwargs: extra arguments (masks, a conditioning tensor ...) passed to every block; tensors
                among them get gradients under every memory strategy.
        """
        _check_input(x)
        if torch.compiler.is_exporting():
            # torch.export captures the function, not a training-time memory strategy: every strategy computes
            # memory="full"'s function, and the rebuilding ones record random states on the host, which export
            # cannot trace (a data-dependent aten.equal)
            return full.run_plain(self, x, args, kwargs)
        return MEMORY_STRATEGIES[self.memory](self, x, args, kwargs)


def _check_input(x: Any) -> None:
    """One clear error when the stack's input ``x`` is not a floating-point tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ZooError(f"ResidualStack expects a floating-point tensor, got {kind}")


def _check_tensor(out: Any, who: str) -> None:
    """One clear error when a residual function (or the initial-velocity module) returns no tensor (a tuple, a dict,
    None), instead of an AttributeError deep in the engine.
    ``out``: what the module returned; ``who``: the module, as the error names it."""
    if not isinstance(out, torch.Tensor):
        raise ZooError(
            f"{who} of a ResidualStack returned a {type(out).__name__}, not a tensor: a residual function must "
            "return one tensor shaped like its input (wrap a block returning a tuple or dict to return that tensor)"
        )


def _interpolate_block(blocks: list[nn.Module], position: float) -> nn.Module:
    """A copy of the block at fractional ``position`` along the stack, linearly interpolated."""
    lo = min(int(math.floor(position)), len(blocks) - 1)
    hi = min(lo + 1, len(blocks) - 1)
    t = position - lo
    new = copy.deepcopy(blocks[lo])
    if hi == lo or t == 0.0:
        return new
    src_hi = dict(blocks[hi].state_dict())
    with torch.no_grad():
        for name, value in new.state_dict().items():
            if value.is_floating_point():
                value.lerp_(src_hi[name].to(value.dtype), t)
            else:
                value.copy_(torch.maximum(value, src_hi[name]))
    return new
