"""The forward rules of the residual-stack engine: one small object per rule, registered in :data:`RULES`.

A rule advances the stack's state by one step of size h, calling the residual functions through ``f(m, x, k)``:
f_m evaluated at x, as the k-th evaluation of the step (k counts from 0 in the order the forward :meth:`step`
makes them; the memory strategies record the random state before each evaluation in forward and replay the k-th
one in backward). The state is a tuple of tensors whose first entry is x_n.

Adding a rule (RK4, a second-order rule) is one subclass of :class:`ForwardRule` decorated with
:func:`register_rule`; :class:`zoo.nn.ResidualStack` then accepts its name.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch

from zoo.errors import ZooError
from zoo.ops.fixed_point import momentum_float_step

__all__ = [
    "DEFAULT_GAMMA",
    "EulerRule",
    "ForwardRule",
    "HeunRule",
    "MomentumRule",
    "RULES",
    "ResidualCall",
    "ResidualPartsCall",
    "State",
    "register_rule",
]

# the published momentum term of the momentum rule (M1): the one default every signature uses
DEFAULT_GAMMA = 0.9

State = tuple[torch.Tensor, ...]
ResidualCall = Callable[[int, torch.Tensor, int], torch.Tensor]
"""``f(m, x, k)``: the residual function f_m at x, the k-th evaluation of the current step."""
ResidualPartsCall = Callable[[int, torch.Tensor, int], tuple[torch.Tensor, str]]
"""``parts(m, x, k)``: f_m at x split as (g, tail), f = residual_tail(x, g, tail) (zoo.nn.residual_function)."""


class ForwardRule:
    """A forward rule: ``state_{n+1} = step(f, n, state_n, h)``.

    Class attributes:
        name: the rule's name in :data:`RULES` (``ResidualStack(rule=name)``).
        calls_per_step: evaluations of f per step (the random state is recorded before each).
        exact_inverse: the rule is invertible exactly (memory="reversible"); a rule with an approximate
            :meth:`inverse_step` uses memory="adjoint" instead.
        has_velocity: the state is (x, v), v_0 given by the stack's ``init_velocity``.
        fuses_tail: the rule has ``step_parts(parts, n, state, h)``, :meth:`step` taking f_n split as (g, tail)
            (memory="full" then hands it the blocks' element-wise tails to fuse).
    """

    name: ClassVar[str]
    calls_per_step: ClassVar[int] = 1
    exact_inverse: ClassVar[bool] = False
    has_velocity: ClassVar[bool] = False
    fuses_tail: ClassVar[bool] = False

    @classmethod
    def build(cls, *, gamma: float = DEFAULT_GAMMA) -> ForwardRule:
        """The rule object for a stack's options (a rule without hyperparameters ignores them)."""
        return cls()

    def initial_state(self, x: torch.Tensor, velocity: Callable[[], torch.Tensor]) -> State:
        """state_0 from x_0; ``velocity()`` computes v_0 (called only by rules with a velocity)."""
        return (x,)

    def step(self, f: ResidualCall, n: int, state: State, h: float) -> State:
        """Step n of the rule."""
        raise NotImplementedError

    def inverse_step(self, f: ResidualCall, n: int, state: State, h: float) -> State:
        """state_n from state_{n+1}: the inverse of :meth:`step` (exact or approximate, see ``exact_inverse``).
        Each evaluation passes, as k, the index of the forward evaluation whose random state it replays."""
        raise NotImplementedError

    def step_blocks(self, n: int, depth: int) -> list[int]:
        """Indices of the residual functions step n evaluates (their parameters get its gradient)."""
        return [n]


_RULES: dict[str, type[ForwardRule]] = {}
RULES: Mapping[str, type[ForwardRule]] = types.MappingProxyType(_RULES)
"""Rule name -> rule class (read-only; ``name in RULES`` and iteration give the names)."""


def register_rule(cls: type[ForwardRule]) -> type[ForwardRule]:
    """Class decorator: make ``cls`` available as ``ResidualStack(rule=cls.name)``."""
    if cls.name in _RULES:
        raise ZooError(f"a forward rule named {cls.name!r} is registered already: give the new rule another name")
    _RULES[cls.name] = cls
    return cls


@register_rule
class EulerRule(ForwardRule):
    """Euler: x_{n+1} = x_n + h f_n(x_n)   (R1).

    Inverse (adjoint, approximate): x_n ~ x_{n+1} - h f_n(x_{n+1})   (A1).
    """

    name = "euler"

    def step(self, f: ResidualCall, n: int, state: State, h: float) -> State:
        (x,) = state
        return (x + h * f(n, x, 0),)

    def inverse_step(self, f: ResidualCall, n: int, state: State, h: float) -> State:
        (x_next,) = state
        return (x_next - h * f(n, x_next, 0),)


@register_rule
class HeunRule(ForwardRule):
    """Heun: y_n = x_n + h f_n(x_n),  x_{n+1} = x_n + h/2 (f_n(x_n) + f_{n+1}(y_n))   (H1).

    Heun needs theta_0 .. theta_N; a stack of N blocks takes N steps and uses theta_N := theta_{N-1}.
    Inverse (adjoint, approximate): z = x_{n+1} - h f_{n+1}(x_{n+1}),
    x_n ~ x_{n+1} - h/2 (f_{n+1}(x_{n+1}) + f_n(z))   (A2).
    """

    name = "heun"
    calls_per_step = 2

    def step(self, f: ResidualCall, n: int, state: State, h: float) -> State:
        (x,) = state
        fx = f(n, x, 0)
        y = x + h * fx
        return (x + (h / 2) * (fx + f(n + 1, y, 1)),)

    def inverse_step(self, f: ResidualCall, n: int, state: State, h: float) -> State:
        (x_next,) = state
        fb = f(n + 1, x_next, 1)
        y = x_next - h * fb
        return (x_next - (h / 2) * (fb + f(n, y, 0)),)

    def step_blocks(self, n: int, depth: int) -> list[int]:
        return [n, min(n + 1, depth - 1)]


@register_rule
class MomentumRule(ForwardRule):
    """Momentum: v_{n+1} = gamma v_n + (1 - gamma) h f_n(x_n),  x_{n+1} = x_n + v_{n+1}   (M1).

    Exact inverse: x_n = x_{n+1} - v_{n+1},  v_n = (v_{n+1} - (1 - gamma) h f_n(x_n)) / gamma   (M2)
    (gamma > 0; memory="reversible" runs (M1) and (M2) in exact fixed-point arithmetic).
    """

    name = "momentum"
    exact_inverse = True
    has_velocity = True
    fuses_tail = True

    def __init__(self, gamma: float = DEFAULT_GAMMA):
        self.gamma = float(gamma)

    @classmethod
    def build(cls, *, gamma: float = DEFAULT_GAMMA) -> MomentumRule:
        return cls(gamma)

    def initial_state(self, x: torch.Tensor, velocity: Callable[[], torch.Tensor]) -> State:
        return (x, velocity())

    def step(self, f: ResidualCall, n: int, state: State, h: float) -> State:
        """(M1); a velocity None stands for v_n = 0 (memory="full"'s first step from rest)."""
        x, v = state
        cf = (1.0 - self.gamma) * h * f(n, x, 0)
        v = cf if v is None else self.gamma * v + cf
        return (x + v, v)

    def inverse_step(self, f: ResidualCall, n: int, state: State, h: float) -> State:
        x_next, v_next = state
        x = x_next - v_next
        return (x, (v_next - (1.0 - self.gamma) * h * f(n, x, 0)) / self.gamma)

    def step_parts(
        self,
        parts: ResidualPartsCall,
        n: int,
        state: State,
        h: float,
        overwrite: bool = False,
        reuse_cotangents: bool = False,
    ) -> State:
        """:meth:`step` from f_n split as ``parts(n, x, 0) = (g, tail)``, f = residual_tail(x, g, tail), in one fused
        kernel (zoo.ops.fixed_point.momentum_float_step): the same values as :meth:`step`, and under autograd only the
        ReLU's sign mask kept per step (for the ``"relu"`` tail) instead of the tail's intermediate tensors.
        A velocity None stands for v_n = 0.
        ``overwrite``: v_n is not needed after the step (nor by any autograd node), so the step may write v_{n+1}
        into it and x_{n+1} into g. ``reuse_cotangents``: the step's outputs are used only by the next step and its
        block, so its backward may write its gradients into their cotangents."""
        x, v = state
        g, tail = parts(n, x, 0)
        c = (1.0 - self.gamma) * h
        return momentum_float_step(
            x, v, g, tail, c=c, gamma=self.gamma, overwrite=overwrite, reuse_cotangents=reuse_cotangents
        )
