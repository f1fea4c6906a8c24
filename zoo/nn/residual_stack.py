"""The residual-stack engine: the one place where forward rules and memory strategies live.

A stack holds N residual functions f_0 .. f_{N-1} (any modules mapping ``x -> f(x)`` with the
shape of ``x``) and applies one of the forward rules of MATH.md with step h:

    euler   x_{n+1} = x_n + h f_n(x_n)                                          (R1)
    heun    y_n = x_n + h f_n(x_n),  x_{n+1} = x_n + h/2 (f_n(x_n) + f_{n+1}(y_n))  (H1)
    momentum  v_{n+1} = gamma v_n + (1 - gamma) h f_n(x_n),  x_{n+1} = x_n + v_{n+1}   (M1, h = 1 by default)

with ``h = 1/N`` (``scale="depth"``) or a fixed number (``scale=1.0`` is the plain ResNet).
Heun needs theta_0 .. theta_N; a stack of N blocks takes N steps and uses theta_N := theta_{N-1}.

Memory strategies:

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
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from zoo.errors import ZooError
from zoo.ops.fixed_point import FixedPoint, GammaRatio, momentum_kernel

RULES = ("euler", "heun", "momentum")
MEMORY_MODES = ("full", "adjoint", "reversible")
INIT_VELOCITIES = ("zero", "f")


def _check_choice(kind: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ZooError(f"unknown {kind} {value!r}: choose one of {', '.join(repr(c) for c in choices)}")
    return value


# the published momentum term of the momentum rule (M1): the one default every signature uses
DEFAULT_GAMMA = 0.9


def validate_rule_memory(rule: str, memory: str, gamma: float = DEFAULT_GAMMA) -> None:
    """Raise one clear error for an unknown or unsupported ``rule`` / ``memory`` / ``gamma``."""
    _check_choice("rule", rule, RULES)
    _check_choice("memory", memory, MEMORY_MODES)
    if not (isinstance(gamma, (int, float)) and 0.0 <= gamma < 1.0):
        raise ZooError(f"gamma must lie in [0, 1), got {gamma!r}")
    if memory == "reversible" and rule != "momentum":
        raise ZooError("memory='reversible' needs rule='momentum' (only the momentum rule is invertible); "
                       "use memory='adjoint' for the euler and heun rules")
    if memory == "adjoint" and rule == "momentum":
        raise ZooError("the momentum rule is exactly invertible: use memory='reversible' (exact, memory flat "
                       "in depth) or memory='full'")
    if memory == "reversible" and gamma == 0.0:
        raise ZooError("memory='reversible' needs 0 < gamma < 1 (the inverse (M2) divides by gamma); "
                       "gamma=0 is the plain ResNet: use memory='full'")


# --------------------------------------------------------------------------------------------------
# Replay helpers: recomputation in backward must see the forward's random state, autocast state,
# and must not touch BatchNorm running statistics a second time.


class _RNGState:
    """The CPU generator state and, for a CUDA input, that device's generator state."""

    __slots__ = ("cpu", "cuda", "device")

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _RNGLog:
    """The generator states a forward saw before each residual-function call, replayed in backward.

    :meth:`record` notes the current state (the CPU generator's and, for a CUDA input, that device's) and
    :meth:`restore` ``(k)`` sets the state of the k-th record back. A state equal to the last stored one is not
    stored again: calls that draw no random numbers (no dropout, eval mode) share one stored state, so a
    deterministic stack stores one whatever its depth, and nothing small stays allocated per step. That is the
    point: a small tensor kept per step, allocated between a step's large temporaries, pins freed blocks of
    glibc's heap, and the process's resident memory then grows with depth although the live tensors do not
    (issue 13: a tied stack on a 1 MiB state peaked at 215 MiB at depth 100 and 3.1 GiB at depth 3000). States
    that differ (blocks that draw) are copied into slabs whose sizes double: one allocation per doubling, not
    one per step. Comparing costs a copy of the state (5 KB on CPU, 16 bytes on CUDA), about 10 us.
    """

    _FIRST_SLAB = 16  # rows of the first slab; slab k has 16 * 2^k

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._slabs: list[torch.Tensor] = []  # rows: the CPU state's bytes, then the CUDA state's
        self._stored = 0
        self._cpu_bytes = 0
        self._records: list[int] = []  # record k -> its row

    def _row(self, index: int) -> torch.Tensor:
        k = (index // self._FIRST_SLAB + 1).bit_length() - 1
        return self._slabs[k][index - self._FIRST_SLAB * ((1 << k) - 1)]

    def record(self) -> None:
        state = torch.get_rng_state()
        if self.cuda:
            self._cpu_bytes = state.numel()
            state = torch.cat([state, torch.cuda.get_rng_state(self.device)])
        if not (self._stored and torch.equal(state, self._row(self._stored - 1))):
            if self._stored == self._FIRST_SLAB * ((1 << len(self._slabs)) - 1):  # the slabs are full
                self._slabs.append(state.new_empty((self._FIRST_SLAB << len(self._slabs), state.numel())))
            self._row(self._stored).copy_(state)
            self._stored += 1
        self._records.append(self._stored - 1)

    def __len__(self) -> int:
        return len(self._records)

    def restore(self, k: int) -> None:
        """Set the generators to the state of the k-th :meth:`record`."""
        # copies: torch.set_rng_state of a view with a storage offset crashes (torch 2.14, segmentation fault)
        row = self._row(self._records[k])
        if self.cuda:
            torch.set_rng_state(row[: self._cpu_bytes].clone())
            torch.cuda.set_rng_state(row[self._cpu_bytes :].clone(), self.device)
        else:
            torch.set_rng_state(row.clone())


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Batch statistics as in training, but running statistics left untouched.

    Setting ``track_running_stats=False`` on a training-mode BatchNorm makes it normalise with
    the batch statistics and skip the running-average update (and ``num_batches_tracked``).
    """
    frozen = []
    for m in modules:
        for bn in m.modules():
            if isinstance(bn, _BatchNorm) and bn.training and bn.track_running_stats:
                bn.track_running_stats = False
                frozen.append(bn)
    try:
        yield
    finally:
        for bn in frozen:
            bn.track_running_stats = True


@contextlib.contextmanager
def restored_batchnorm_stats(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Training-mode BatchNorms run as they are (the same kernels, so activation checkpointing saves the same
    tensors), and their running statistics are put back afterwards: a recomputation leaves no trace."""
    saved = []
    for m in modules:
        for bn in m.modules():
            if isinstance(bn, _BatchNorm) and bn.training and bn.track_running_stats:
                saved.append((bn, [b.clone() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
                                   if b is not None]))
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, values in saved:
                for buffer, value in zip([b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
                                          if b is not None], values):
                    buffer.copy_(value)


class _Replay:
    """Autocast state of the forward, replayed around every recomputation in backward."""

    def __init__(self, device: torch.device):
        self.device_type = device.type
        self.autocast = torch.is_autocast_enabled(self.device_type)
        self.dtype = torch.get_autocast_dtype(self.device_type)

    def autocast_ctx(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast)


# --------------------------------------------------------------------------------------------------


class ResidualStack(nn.Module):
    """A stack of residual functions integrated by a forward rule, with a memory strategy.

    Args:
        blocks: the residual functions f_n (each maps ``x, *args, **kwargs`` to a tensor shaped like
            ``x``). The same module may appear several times: its weights are then tied.
        rule: ``"euler"`` (R1), ``"heun"`` (H1) or ``"momentum"`` (M1).
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

    Blocks that expose a ``residual_step`` attribute (post-activation ResNet blocks, whose residual
    function depends on the step) are told the step size whenever it changes.
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
    ):
        super().__init__()
        validate_rule_memory(rule, memory, gamma)
        if isinstance(scale, str):
            if scale != "depth":
                raise ZooError(f"unknown scale {scale!r}: use 'depth' (h = 1/N) or a positive number")
        elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ZooError(f"scale must be 'depth' or a positive number, got {scale!r}")
        if isinstance(init_velocity, str):
            _check_choice("init_velocity", init_velocity, INIT_VELOCITIES)
        elif not isinstance(init_velocity, nn.Module):
            raise ZooError(f"init_velocity must be 'zero', 'f' or a module, got {type(init_velocity).__name__}")
        self.rule = rule
        self.scale = scale
        self.gamma = float(gamma)
        self.memory = memory
        self.preserve_rng_state = preserve_rng_state
        self.has_transition = transition is not None
        if transition is not None:
            self.add_module("0", transition)
        # a module g (v_0 = g(x_0)) is a child named "velocity"; "zero" / "f" are kept as strings
        self.init_velocity = init_velocity if isinstance(init_velocity, str) else "module"
        if isinstance(init_velocity, nn.Module):
            self.velocity = init_velocity
        self.ratio = GammaRatio(gamma) if memory == "reversible" else None
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
            if hasattr(block, "residual_step"):
                block.residual_step = h

    def extra_repr(self) -> str:
        text = f"rule={self.rule!r}, depth={self.depth}, step={self.step:.4g}, memory={self.memory!r}"
        if self.rule == "momentum":
            text += f", gamma={self.gamma}, init_velocity={self.init_velocity!r}"
        return text

    # ---------------------------------------------------------------- depth operations (MATH.md s1)
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

    def smoothness(self) -> torch.Tensor:
        """max_n ||theta_{n+1} - theta_n|| over the stack (0 for a tied stack): the diagnostic of
        how close the ResNet is to its neural ODE (MATH.md section 1)."""
        blocks = self.blocks
        diffs = [torch.zeros(())]
        for a, b in zip(blocks[:-1], blocks[1:]):
            if a is not b:
                sq = sum(((pa.detach() - pb.detach()).float() ** 2).sum().cpu()
                         for pa, pb in zip(a.parameters(), b.parameters()))
                diffs.append(torch.as_tensor(sq).sqrt())
        return torch.stack(diffs).max()

    # ---------------------------------------------------------------- forward rules
    def _f(self, n: int, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        fx = self._modules[str(min(n, self.depth - 1) + self._offset)](x, *args, **kwargs)
        if fx.shape != x.shape:
            raise ZooError(
                f"residual block {n} of a ResidualStack maps shape {tuple(x.shape)} to {tuple(fx.shape)}; "
                "a residual function must keep the shape (put shape changes in `transition`)"
            )
        return fx

    def _residual_parts(self, n: int, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, str]:
        """(g, tail) with f_n(x) = residual_tail(x, g, tail) (zoo.ops.fixed_point): a block that offers
        ``split_residual(x)`` (the ResNet blocks: its branch output and ``"relu"``) leaves its element-wise tail
        to the reversible engine's fused kernels; any other gives (f_n(x), ``"identity"``)."""
        block = self._modules[str(min(n, self.depth - 1) + self._offset)]
        split = getattr(block, "split_residual", None)
        parts = split(x) if split is not None and not args and not kwargs else None
        if parts is None:
            return self._f(n, x, args, kwargs), "identity"
        if parts[0].shape != x.shape:
            raise ZooError(f"residual block {n} of a ResidualStack maps shape {tuple(x.shape)} to "
                           f"{tuple(parts[0].shape)}; a residual function must keep the shape (put shape changes in "
                           "`transition`)")
        return parts

    def _calls_per_step(self) -> int:
        return 2 if self.rule == "heun" else 1

    def _step(self, n: int, x: torch.Tensor, args: tuple, kwargs: dict, rng: _RNGLog | None = None):
        """One step of the rule; ``rng`` records (forward) the random state before each f call."""
        h = self.step
        if rng is not None:
            rng.record()
        fx = self._f(n, x, args, kwargs)
        if self.rule == "euler":
            return x + h * fx
        y = x + h * fx
        if rng is not None:
            rng.record()
        return x + (h / 2) * (fx + self._f(n + 1, y, args, kwargs))

    def _inverse_step(self, n: int, x_next: torch.Tensor, args: tuple, kwargs: dict, rng: _RNGLog | None):
        """Approximate inverse of step n: (A1) for Euler, (A2) for Heun; ``rng`` replays the forward's states
        (record ``n`` for Euler's f_n, records ``2n``, ``2n + 1`` for Heun's two calls)."""
        h = self.step
        if self.rule == "euler":
            if rng is not None:
                rng.restore(n)
            return x_next - h * self._f(n, x_next, args, kwargs)
        if rng is not None:
            rng.restore(2 * n + 1)
        fb = self._f(n + 1, x_next, args, kwargs)
        y = x_next - h * fb
        if rng is not None:
            rng.restore(2 * n)
        return x_next - (h / 2) * (fb + self._f(n, y, args, kwargs))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x_N from x_0 = ``transition(x)`` (or ``x``) by the stack's rule; ``args`` and ``kwargs`` (masks, a
        conditioning tensor ...) reach every block, tensors among them get gradients under every memory strategy.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            kind = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ZooError(f"ResidualStack expects a floating-point tensor, got {kind}")
        if self.rule == "momentum" and self.memory == "reversible" and self.depth and torch.is_grad_enabled():
            params = self._reversible_parameters()
            leaves, spec = pytree.tree_flatten((args, kwargs))
            grad_leaves = [isinstance(t, torch.Tensor) and t.requires_grad for t in leaves]
            if x.requires_grad or params or any(grad_leaves):
                # the transition block too is rebuilt in backward (from the stored stage input)
                grad_tensors = [t for t, g in zip(leaves, grad_leaves) if g]
                return _ReversibleMomentum.apply(
                    self, (leaves, spec, grad_leaves, sum(grad_leaves)), x, *grad_tensors, *params
                )
        checkpointing = self.grad_checkpointing and self.memory == "full" and torch.is_grad_enabled()
        if self.has_transition:
            x = self._checkpoint(self._modules["0"], x) if checkpointing else self._modules["0"](x)
        if self.depth == 0:
            return x
        if self.rule == "momentum":
            return self._momentum_forward(x, args, kwargs, checkpointing)
        if self.memory == "adjoint" and torch.is_grad_enabled():
            params = self._trainable_parameters()
            leaves, spec = pytree.tree_flatten((args, kwargs))
            grad_leaves = [isinstance(t, torch.Tensor) and t.requires_grad for t in leaves]
            if x.requires_grad or params or any(grad_leaves):
                n_grad = sum(grad_leaves)
                grad_tensors = [t for t, g in zip(leaves, grad_leaves) if g]
                return _AdjointBackprop.apply(
                    self, (leaves, spec, grad_leaves, n_grad), x, *grad_tensors, *params
                )
        for n in range(self.depth):
            x = self._checkpoint(self._step, n, x, args, kwargs) if checkpointing else self._step(n, x, args, kwargs)
        return x

    def _checkpoint(self, fn: Any, *inputs: Any) -> Any:
        """``fn(*inputs)`` with its activations recomputed in backward (torch's non-reentrant checkpoint; the
        random state replayed; BatchNorm running statistics restored after the recomputation, so that they are
        updated once per forward, as without checkpointing)."""
        from torch.utils.checkpoint import checkpoint

        modules = list(self.children())
        return checkpoint(fn, *inputs, use_reentrant=False, preserve_rng_state=self.preserve_rng_state,
                          context_fn=lambda: (contextlib.nullcontext(), restored_batchnorm_stats(modules)))

    def _trainable_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the blocks (and of the initial-velocity module), each once."""
        return [p for p in _unique_parameters(self._velocity_modules() + self.blocks) if p.requires_grad]

    def _reversible_parameters(self) -> list[nn.Parameter]:
        """:meth:`_trainable_parameters` and the transition block's: memory='reversible' rebuilds all."""
        modules = ([self.transition] if self.has_transition else []) + self._velocity_modules() + self.blocks
        return [p for p in _unique_parameters(modules) if p.requires_grad]

    # ---------------------------------------------------------------- momentum rule (M1)
    def _velocity_modules(self) -> list[nn.Module]:
        return [self.velocity] if self.init_velocity == "module" else []

    def _initial_velocity(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """v_0: zeros, f_0(x_0), or g(x_0)."""
        if self.init_velocity == "zero":
            return torch.zeros_like(x)
        v = self._f(0, x, args, kwargs) if self.init_velocity == "f" else self.velocity(x, *args, **kwargs)
        if v.shape != x.shape:
            raise ZooError(f"the initial velocity has shape {tuple(v.shape)}, the state {tuple(x.shape)}")
        return v

    def _momentum_forward(self, x: torch.Tensor, args: tuple, kwargs: dict,
                          checkpointing: bool = False) -> torch.Tensor:
        # (M1) in floating point: memory="full", and any mode without gradients
        if checkpointing:
            v = (self._checkpoint(self._initial_velocity, x, args, kwargs) if self.init_velocity != "zero"
                 else torch.zeros_like(x))
            for n in range(self.depth):
                x, v = self._checkpoint(self._momentum_step, n, x, v, args, kwargs)
            return x
        v = self._initial_velocity(x, args, kwargs)
        for n in range(self.depth):
            x, v = self._momentum_step(n, x, v, args, kwargs)
        return x

    def _momentum_step(self, n: int, x: torch.Tensor, v: torch.Tensor, args: tuple,
                       kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of (M1): v_{n+1} = gamma v_n + (1 - gamma) h f_n(x_n), x_{n+1} = x_n + v_{n+1}."""
        v = self.gamma * v + (1.0 - self.gamma) * self.step * self._f(n, x, args, kwargs)
        return x + v, v


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


class _AdjointBackprop(torch.autograd.Function):
    """Store x_N only; rebuild x_n backward with (A1)/(A2) and back-propagate step by step."""

    @staticmethod
    def forward(ctx, stack: ResidualStack, arg_info: tuple, x: torch.Tensor, *inputs: torch.Tensor):
        leaves, spec, grad_leaves, n_grad = arg_info
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        ctx.stack = stack
        ctx.arg_info = arg_info
        ctx.replay = _Replay(x.device)
        ctx.rng = _RNGLog(x.device) if stack.preserve_rng_state else None
        with torch.no_grad():
            for n in range(stack.depth):
                x = stack._step(n, x, args, kwargs, rng=ctx.rng)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        _refuse_double_backward("adjoint")
        stack: ResidualStack = ctx.stack
        leaves, spec, grad_leaves, n_grad = ctx.arg_info
        params = stack._trainable_parameters()
        (x,) = ctx.saved_tensors
        const_leaves = [t.detach() if isinstance(t, torch.Tensor) else t for t in leaves]
        args_c, kwargs_c = pytree.tree_unflatten(const_leaves, spec)
        grad_arg_idx = [i for i, g in enumerate(grad_leaves) if g]
        param_index = {id(p): i for i, p in enumerate(params)}
        grad_args: list[torch.Tensor | None] = [None] * n_grad
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        blocks = stack.blocks
        outer_rng = _RNGState(x.device) if ctx.rng is not None else None
        g = grad_out
        x = x.detach()
        try:
            with frozen_batchnorm_stats(blocks), ctx.replay.autocast_ctx():
                for n in reversed(range(stack.depth)):
                    with torch.no_grad():
                        x_prev = stack._inverse_step(n, x, args_c, kwargs_c, ctx.rng)
                    step_params = [p for p in _step_parameters(stack, blocks, n) if id(p) in param_index]
                    with torch.enable_grad():
                        xi = x_prev.detach().requires_grad_(True)
                        vjp_leaves = list(const_leaves)
                        for i in grad_arg_idx:
                            vjp_leaves[i] = leaves[i].detach().requires_grad_(True)
                        args_v, kwargs_v = pytree.tree_unflatten(vjp_leaves, spec)
                        if ctx.rng is not None:
                            ctx.rng.restore(stack._calls_per_step() * n)
                        y = stack._step(n, xi, args_v, kwargs_v)
                        wrt = [xi] + step_params + [vjp_leaves[i] for i in grad_arg_idx]
                        grads = torch.autograd.grad(y, wrt, g.to(y.dtype), allow_unused=True)
                    g = grads[0] if grads[0] is not None else torch.zeros_like(xi)
                    for p, gp in zip(step_params, grads[1 : 1 + len(step_params)]):
                        if gp is not None:
                            j = param_index[id(p)]
                            grad_params[j] = gp if grad_params[j] is None else grad_params[j] + gp
                    for j, ga in enumerate(grads[1 + len(step_params) :]):
                        if ga is not None:
                            grad_args[j] = ga if grad_args[j] is None else grad_args[j] + ga
                    x = x_prev
        finally:
            if outer_rng is not None:
                outer_rng.restore()
        return (None, None, g, *grad_args, *grad_params)


class _ReversibleMomentum(torch.autograd.Function):
    """(M1) in exact fixed point; backward rebuilds (x_n, v_n) bit for bit with (M2).

    State: integers x, v = round(2^F x), round(2^F v); each step adds g_n = round(2^F (1-gamma) h f_n(x_n))
    to v after multiplying v by gamma = n/d exactly (remainders kept in the buffer), then adds v to
    x. Every operation is an integer operation with an exact inverse, and f_n is re-evaluated on
    the same float input x_n = x_int / 2^F with the same random state, so the rebuild is exact.
    Gradients (z = (x, v), a = dL/dx_{n+1} + dL/dv_{n+1}):
        dL/dx_n = dL/dx_{n+1} + (1-gamma) h J_f^T a,  dL/dv_n = gamma a,  dL/dtheta_n += (1-gamma) h (df/dtheta)^T a.

    Each step is one fused kernel (zoo.ops.fixed_point) that also applies the residual function's element-wise
    tail when the block leaves it out (``split_residual``: f = relu(x + g) - x of a post-activation ResNet block),
    and updates the state in place; backward runs one kernel per step for the inverse and the tail's part of the
    gradient, and one for the gradient accumulation, around f_n's recomputed graph.

    Stored for backward: the final integer state (x, v: int64; each buffer word, in forward too, in the
    narrowest integer type its static bound allows: full words int64, int8 for up to 29 steps at gamma 0.9),
    and, with a transition block, the
    stage input, from which the transition is recomputed (checkpointed) at the end of backward.

    Range: a state outside |x| < 2^(61 - F) would make the forward wrong; see :func:`_refuse_out_of_range` (an
    error in forward on CPU, a NaN output and an error in backward on an accelerator).
    """

    @staticmethod
    def forward(ctx, stack: ResidualStack, arg_info: tuple, x_in: torch.Tensor, *inputs: torch.Tensor):
        leaves, spec, _, _ = arg_info
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        fp, ratio = stack.fixed_point, stack.ratio
        c = (1.0 - stack.gamma) * stack.step
        ctx.stack, ctx.arg_info = stack, arg_info
        ctx.replay = _Replay(x_in.device)
        # records: the transition's (when there is one), v_0's, then f_n's before each call
        rng = ctx.rng = _RNGLog(x_in.device) if stack.preserve_rng_state else None
        with torch.no_grad():
            if rng is not None and stack.has_transition:
                rng.record()
            x = stack.transition(x_in) if stack.has_transition else x_in
            dtype = ctx.dtype = x.dtype
            xi = fp.to_fixed(x)
            xf = fp.to_float(xi, dtype)  # every f_n sees x_n = x_int / 2^F, in forward and backward alike
            if rng is not None:
                rng.record()
            if stack.init_velocity == "zero":
                vi = torch.zeros_like(xi)
                x0_max, v0_max = fp.abs_max(x), torch.zeros((), dtype=torch.float64, device=x.device)
            else:
                v0 = stack._initial_velocity(xf, args, kwargs)
                vi = fp.to_fixed(v0)
                x0_max, v0_max = fp.abs_max(x), fp.abs_max(v0)
            g_max = torch.zeros((), dtype=torch.float64, device=x.device)
            def new_word(start: int) -> torch.Tensor:
                # each word in the narrowest integer type its static bound allows (the kernels compute in int64)
                steps = min(ratio.steps_per_word, stack.depth - start)
                return torch.zeros_like(xi, dtype=ratio.buffer_dtype(steps))

            buffer, words = new_word(0), []
            for n in range(stack.depth):
                if n and n % ratio.steps_per_word == 0:  # the buffer word is full: start a new one
                    words.append(buffer)
                    buffer = new_word(n)
                if rng is not None:
                    rng.record()
                g, tail = stack._residual_parts(n, xf, args, kwargs)
                step = momentum_kernel("step", c=c, tail=tail, n=ratio.n, d=ratio.d, scale=fp.scale)
                # in place: (xi, vi, buffer) <- step n's state, xf <- x_{n+1} as a float, f_n's input no longer needed;
                # g_max in place too (no small tensor allocated per step, see _RNGLog)
                torch.maximum(g_max, step(xi, vi, buffer, xf, g), out=g_max)
            # every state (x_n, v_n) in range, not only the last: then no integer operation can wrap
            overflow = fp.momentum_state_out_of_range(x0_max, v0_max, g_max, stack.gamma, stack.depth)
        ctx.n_words = len(words)
        # The integer state is not a save_for_backward tensor: backward takes it off ctx, so each x, v and
        # buffer is freed as soon as the rebuild has stepped past it (a retained graph is not rebuilt twice).
        ctx.state = [xi, vi, buffer, *words]
        ctx.save_for_backward(overflow, x_in if stack.has_transition else None)
        return _refuse_out_of_range(xf, overflow, fp, raise_now=_host_read_is_free(xf))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        _refuse_double_backward("reversible")
        stack: ResidualStack = ctx.stack
        fp, ratio, dtype = stack.fixed_point, stack.ratio, ctx.dtype
        c = (1.0 - stack.gamma) * stack.step
        leaves, spec, grad_leaves, n_grad = ctx.arg_info
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
        params = stack._reversible_parameters()
        param_index = {id(p): i for i, p in enumerate(params)}
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        grad_args: list[torch.Tensor | None] = [None] * n_grad
        const_leaves = [t.detach() if isinstance(t, torch.Tensor) else t for t in leaves]
        grad_arg_idx = [i for i, g in enumerate(grad_leaves) if g]
        blocks = stack.blocks
        outer_rng = _RNGState(grad_out.device) if ctx.rng is not None else None
        first_call = 2 if stack.has_transition else 1  # the record of f_0's call (see forward)

        def run_with_grad(fn, x_float: torch.Tensor):
            """fn(x_float, args, kwargs) with grad, on a fresh leaf for x and for the arguments that need grad."""
            with torch.enable_grad():
                xg = x_float.detach().requires_grad_(True)
                vjp_leaves = list(const_leaves)
                for i in grad_arg_idx:
                    vjp_leaves[i] = leaves[i].detach().requires_grad_(True)
                args_v, kwargs_v = pytree.tree_unflatten(vjp_leaves, spec)
                return fn(xg, args_v, kwargs_v), xg, vjp_leaves

        def backprop(value, xg, vjp_leaves, module_params: list[nn.Parameter], cotangent: torch.Tensor):
            """dL/dx for the cotangent of ``value``; parameter and argument gradients are accumulated."""
            wrt_params = [p for p in module_params if id(p) in param_index]
            wrt = [xg, *wrt_params, *(vjp_leaves[i] for i in grad_arg_idx)]
            grads = torch.autograd.grad(value, wrt, cotangent.to(value.dtype), allow_unused=True)
            for p, gp in zip(wrt_params, grads[1 : 1 + len(wrt_params)]):
                if gp is not None:
                    j = param_index[id(p)]
                    grad_params[j] = gp if grad_params[j] is None else grad_params[j] + gp
            for j, ga in enumerate(grads[1 + len(wrt_params) :]):
                if ga is not None:
                    grad_args[j] = ga if grad_args[j] is None else grad_args[j] + ga
            return grads[0] if grads[0] is not None else torch.zeros_like(xg)

        def vjp(fn, x_float: torch.Tensor, module_params: list[nn.Parameter], cotangent: torch.Tensor):
            return backprop(*run_with_grad(fn, x_float), module_params, cotangent)

        # gx = dL/dx_n and a = dL/dx_{n+1} + dL/dv_{n+1} (so dL/dv_n = gamma a), updated in place: own copies
        gx = grad_out.to(dtype, copy=True)
        a = gx.clone()
        gv: torch.Tensor | None = None  # dL/dv_0, for the initial velocity's gradient
        modules = ([stack.transition] if stack.has_transition else []) + stack._velocity_modules() + blocks
        try:
            with frozen_batchnorm_stats(modules), ctx.replay.autocast_ctx():
                with torch.no_grad():
                    xf = momentum_kernel("rewind", scale=fp.scale, dtype=dtype)(xi, vi)  # x_{N-1} = x_N - v_N
                for n in reversed(range(stack.depth)):
                    if ctx.rng is not None:
                        ctx.rng.restore(first_call + n)
                    g, xg, vjp_leaves = run_with_grad(lambda t, a_, k_, n=n: stack._residual_parts(n, t, a_, k_),
                                                      xf)
                    g, tail = g
                    with torch.no_grad():
                        # v_n exactly, x_{n-1} = x_n - v_n and its float value, the tail's part of the gradient
                        unstep = momentum_kernel("unstep", c=c, tail=tail, n=ratio.n, d=ratio.d, scale=fp.scale,
                                                 first=n == 0)
                        grad_g = unstep(xi, vi, buffer, xf, g.detach(), a, gx)
                        if n and n % ratio.steps_per_word == 0:
                            buffer = words.pop()
                    grad_branch = backprop(g, xg, vjp_leaves, _unique_parameters([blocks[n]]), grad_g)
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
                    v_modules = [blocks[0]] if stack.init_velocity == "f" else stack._velocity_modules()
                    gx_v = vjp(stack._initial_velocity, xf, _unique_parameters(v_modules), gv)
                    gx = gx + gx_v.to(dtype)
                del xi, vi, buffer, xf, a, gv  # the state is rebuilt: free it before the transition's recomputation
                if stack.has_transition:  # x_0 = transition(x_in), recomputed from the stored input
                    if ctx.rng is not None:
                        ctx.rng.restore(0)
                    gx = vjp(lambda t, a_, k_: stack.transition(t), x_in,
                                _unique_parameters([stack.transition]), gx)
        finally:
            if outer_rng is not None:
                outer_rng.restore()
        return (None, None, gx, *grad_args, *grad_params)


def _refuse_double_backward(memory: str) -> None:
    """One clear error for ``create_graph=True`` (double backward: Hessian-vector products, gradient penalties).

    Autograd runs a Function's backward with grad mode on exactly when the caller asked for ``create_graph``. The
    rebuilding backward computes each step's gradient by its own ``autograd.grad`` on a recomputed graph, with the
    state rebuilt outside any graph, so the gradient it returns is not differentiable (and the reversible one rebuilds
    its state once only)."""
    if torch.is_grad_enabled():
        why = ("rebuilds its states once, outside any graph" if memory == "reversible"
               else "rebuilds its activations outside any graph, and its gradients are approximations")
        raise ZooError(
            f"double backward (torch.autograd.grad(..., create_graph=True), e.g. a Hessian-vector product or a "
            f"gradient penalty) is not supported by memory={memory!r}: its backward {why}, so the gradient it "
            f"returns has no graph; use memory='full' for double backward"
        )


def _out_of_range_error(fp: FixedPoint) -> ZooError:
    return ZooError(
        f"reversible momentum: a value of the state or of a residual function is not finite or exceeds the "
        f"fixed-point range |x| < 2^{61 - fp.frac_bits}; the forward in exact fixed point would be wrong and the "
        f"rebuild not exact. Normalise the input, lower fixed_point_bits (now {fp.frac_bits}), or use memory='full'"
    )


def _host_read_is_free(t: torch.Tensor) -> bool:
    """Whether reading a flag computed next to ``t`` costs no device synchronisation: a CPU tensor, outside
    torch.compile's tracing (where a data-dependent branch would break the graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


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


def _unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules``, each once (tied blocks share them)."""
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _step_parameters(stack: ResidualStack, blocks: list[nn.Module], n: int) -> list[nn.Parameter]:
    """Parameters step n touches: theta_n, and theta_{n+1} for Heun."""
    used = [blocks[n]]
    if stack.rule == "heun":
        nxt = blocks[min(n + 1, len(blocks) - 1)]
        if nxt is not blocks[n]:
            used.append(nxt)
    return _unique_parameters(used)
