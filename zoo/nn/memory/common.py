"""What the memory strategies share: the stack interface they call, the flattening of the stack's extra arguments,
and the one gradient accumulation of the rebuilding backwards (adjoint and reversible)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from zoo.errors import ZooError
from zoo.nn.rules import ForwardRule
from zoo.ops.fixed_point import FixedPoint, GammaRatio

__all__ = [
    "EngineStack",
    "FlatArguments",
    "GradientAccumulator",
    "flatten_arguments",
    "refuse_double_backward",
    "unique_parameters",
]


class EngineStack(Protocol):
    """The part of :class:`zoo.nn.ResidualStack` the memory strategies use (nothing private).

    ``residual(n, x, args, kwargs)`` is f_n(x) (n clamped to the last block); ``residual_parts`` its split
    ``(g, tail)`` with f_n(x) = residual_tail(x, g, tail) (zoo.nn.residual_function); ``initial_velocity`` v_0
    of the momentum rule; ``trainable_parameters()`` the blocks' and the velocity module's trainable parameters,
    ``rebuilt_parameters()`` those and the transition's; ``checkpoint(fn, *inputs)`` activation checkpointing;
    ``host_read_is_free(t)`` whether a flag computed next to t may be read on the host now (no device sync);
    ``stored_blocks`` how many of the last steps memory="reversible" runs with ordinary autograd instead of rebuilding.
    """

    forward_rule: ForwardRule
    gamma: float
    init_velocity: str
    preserve_rng_state: bool
    grad_checkpointing: bool
    stored_blocks: int
    fixed_point: FixedPoint | None
    ratio: GammaRatio | None
    record_rebuild: bool
    last_rebuild: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def depth(self) -> int: ...

    @property
    def step(self) -> float: ...

    @property
    def blocks(self) -> list[nn.Module]: ...

    @property
    def transition(self) -> nn.Module | None: ...

    def residual(self, n: int, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor: ...

    def residual_parts(self, n: int, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, str]: ...

    def initial_velocity(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor: ...

    def velocity_modules(self) -> list[nn.Module]: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def rebuilt_parameters(self) -> list[nn.Parameter]: ...

    def checkpoint(self, fn: Callable[..., Any], *inputs: Any) -> Any: ...

    def host_read_is_free(self, t: torch.Tensor) -> bool: ...


@dataclass(frozen=True)
class FlatArguments:
    """The stack's extra ``(args, kwargs)`` as pytree leaves; ``grad_leaves[i]``: leaf i is a tensor needing grad.

    An autograd Function takes tensors as direct inputs only: the ones needing grad are passed flat
    (:attr:`grad_tensors`) and get their gradients in that order.
    ``spec``: the structure (positions and keys) that rebuilds the call's arguments from the flat tensors."""

    leaves: list[Any]
    spec: pytree.TreeSpec
    grad_leaves: list[bool]

    @property
    def n_grad(self) -> int:
        return sum(self.grad_leaves)

    @property
    def needs_grad(self) -> bool:
        return any(self.grad_leaves)

    @property
    def grad_tensors(self) -> list[torch.Tensor]:
        return [t for t, g in zip(self.leaves, self.grad_leaves) if g]

    def unflatten(self) -> tuple[tuple, dict]:
        return pytree.tree_unflatten(self.leaves, self.spec)


def flatten_arguments(args: tuple, kwargs: dict) -> FlatArguments:
    """:class:`FlatArguments` of a forward's extra arguments.
    ``args`` / ``kwargs``: the extra arguments of the stack's call."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return FlatArguments(leaves, spec, [isinstance(t, torch.Tensor) and t.requires_grad for t in leaves])


def unique_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules``, each once (tied blocks share them)."""
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class GradientAccumulator:
    """Step-by-step backprop of a rebuilding backward: each step's recomputed graph is differentiated on its own
    (``torch.autograd.grad``) and the parameter and argument gradients are summed over the steps.

    Args:
        flat: the forward's flattened extra arguments.
        params: the Function's parameter inputs, in order (their gradients come back in that order).
    """

    def __init__(self, flat: FlatArguments, params: list[nn.Parameter]):
        self.flat = flat
        self.param_index = {id(p): i for i, p in enumerate(params)}
        self.grad_params: list[torch.Tensor | None] = [None] * len(params)
        self.grad_args: list[torch.Tensor | None] = [None] * flat.n_grad
        self.const_leaves = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat.leaves]
        self.grad_arg_idx = [i for i, g in enumerate(flat.grad_leaves) if g]

    def constant_arguments(self) -> tuple[tuple, dict]:
        """The extra arguments detached (for recomputations outside any graph)."""
        return pytree.tree_unflatten(self.const_leaves, self.flat.spec)

    def run_with_grad(
        self, fn: Callable[[torch.Tensor, tuple, dict], Any], x: torch.Tensor
    ) -> tuple[Any, torch.Tensor, list[Any]]:
        """``fn(x, args, kwargs)`` with grad, on a fresh leaf for x and for the arguments that need grad;
        returns (its value, x's leaf, the argument leaves) for :meth:`backprop`."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            vjp_leaves = list(self.const_leaves)
            for i in self.grad_arg_idx:
                vjp_leaves[i] = self.flat.leaves[i].detach().requires_grad_(True)
            args_v, kwargs_v = pytree.tree_unflatten(vjp_leaves, self.flat.spec)
            return fn(xg, args_v, kwargs_v), xg, vjp_leaves

    def backprop(
        self,
        value: torch.Tensor,
        xg: torch.Tensor,
        vjp_leaves: list[Any],
        module_params: list[nn.Parameter],
        cotangent: torch.Tensor,
    ) -> torch.Tensor:
        """dL/dx for the cotangent of ``value``; the gradients of ``module_params`` (those among the Function's
        inputs) and of the arguments are accumulated."""
        wrt_params = [p for p in module_params if id(p) in self.param_index]
        wrt = [xg, *wrt_params, *(vjp_leaves[i] for i in self.grad_arg_idx)]
        grads = torch.autograd.grad(value, wrt, cotangent.to(value.dtype), allow_unused=True)
        for p, gp in zip(wrt_params, grads[1 : 1 + len(wrt_params)]):
            if gp is not None:
                j = self.param_index[id(p)]
                self.grad_params[j] = gp if self.grad_params[j] is None else self.grad_params[j] + gp
        for j, ga in enumerate(grads[1 + len(wrt_params) :]):
            if ga is not None:
                self.grad_args[j] = ga if self.grad_args[j] is None else self.grad_args[j] + ga
        return grads[0] if grads[0] is not None else torch.zeros_like(xg)

    def vjp(
        self,
        fn: Callable[[torch.Tensor, tuple, dict], torch.Tensor],
        x: torch.Tensor,
        module_params: list[nn.Parameter],
        cotangent: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`run_with_grad` then :meth:`backprop`."""
        return self.backprop(*self.run_with_grad(fn, x), module_params, cotangent)

    def input_gradients(self) -> tuple[torch.Tensor | None, ...]:
        """The gradients of the argument tensors, then of the parameters: the tail of the Function's backward."""
        return (*self.grad_args, *self.grad_params)


def refuse_double_backward(memory: str) -> None:
    """One clear error for ``create_graph=True`` (double backward: Hessian-vector products, gradient penalties).

    Autograd runs a Function's backward with grad mode on exactly when the caller asked for ``create_graph``. The
    rebuilding backward computes each step's gradient by its own ``autograd.grad`` on a recomputed graph, with the
    state rebuilt outside any graph, so the gradient it returns is not differentiable (and the reversible one rebuilds
    its state once only).
    ``memory``: the stack's memory strategy, named in the error."""
    if torch.is_grad_enabled():
        why = (
            "rebuilds its states once, outside any graph"
            if memory == "reversible"
            else "rebuilds its activations outside any graph, and its gradients are approximations"
        )
        raise ZooError(
            f"double backward (torch.autograd.grad(..., create_graph=True), e.g. a Hessian-vector product or a "
            f"gradient penalty) is not supported by memory={memory!r}: its backward {why}, so the gradient it "
            f"returns has no graph; use memory='full' for double backward"
        )
