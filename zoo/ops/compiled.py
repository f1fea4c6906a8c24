"""Kernels that run compiled by default, with an eager fallback: one mechanism for every op that uses it.

A :class:`CompiledKernels` holds plain PyTorch functions ("eager kernels"). When enabled (the default, or
as the environment variable named by ``env`` says) each is wrapped once in ``torch.compile`` with dynamic
shapes; under a caller's own ``torch.compile`` the eager function is returned (the caller traces it).
If a compilation or a compiled call fails (no compiler toolchain, an unsupported device ...), the
kernels switch to eager for the rest of the process with one warning: they compute the same values.
"""

from __future__ import annotations

import functools
import logging
import os
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch


class _NoCudaRuntimeNote(logging.Filter):
    """torch's C++-extension module logs "No CUDA runtime is found, using CUDA_HOME=..." whenever inductor compiles
    on a machine that has a CUDA toolkit but no GPU. The zoo's kernels compile for the CPU there, so the note asks
    for nothing; it is dropped (every other message of that logger stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNote())


# compiled variants allowed per kernel (and bound constants) before torch runs it eagerly
RECOMPILE_LIMIT = 64


class CompiledKernels:
    """Named kernels, compiled on first use when enabled.

    Args:
        eager: name -> the eager function.
        env: the environment variable that turns compilation off when "0", "false", "no" or "off".
        what: how the warning names these kernels ("the fused fixed-point kernels").
        fullgraph: passed to ``torch.compile``.
        options: kernel name -> inductor options for its compilation (``torch.compile(options=...)``).
        elementwise: every kernel is element-wise over its arguments of the first argument's size (other arguments
            and reductions over all elements allowed): the compiled kernel is then called on 1-D views of them in
            memory order when they share one layout (see :func:`_flat_call`).
        shaped: names of kernels called on their arguments as given even when ``elementwise`` (a kernel whose
            arguments come already viewed in the shape its loops need).
        backend: the ``torch.compile`` backend (``"inductor"``; tests trace with ``"eager"``).
    """

    def __init__(
        self,
        eager: dict[str, Callable[..., Any]],
        env: str,
        what: str,
        fullgraph: bool = False,
        options: dict[str, dict[str, Any]] | None = None,
        elementwise: bool = False,
        shaped: Sequence[str] = (),
        backend: str = "inductor",
    ) -> None:
        self.eager = dict(eager)
        self.env, self.what, self.fullgraph = env, what, fullgraph
        self.elementwise = elementwise
        self.shaped = frozenset(shaped)
        self.options = dict(options or {})
        self.backend = backend
        self.enabled = os.environ.get(env, "1").lower() not in ("0", "false", "no", "off")
        self._compiled: dict[tuple, Callable[..., Any]] = {}
        self._variants: dict[tuple, Callable[..., Any]] = {}

    def set_enabled(self, enabled: bool) -> None:
        """Compile the kernels (``enabled`` True) or run them eagerly from now on."""
        self.enabled = bool(enabled)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        """The kernel ``name`` with no constants bound: ``get(name)``."""
        return self.get(name)

    def get(self, name: str, **static: Any) -> Callable[..., Any]:
        """The kernel ``name`` with the keyword arguments ``static`` bound as compile-time constants (one
        compilation per distinct set of values: integer divisors become multiplications, branches on a string
        disappear); the remaining arguments are dynamic."""
        if torch.compiler.is_compiling():
            # a caller's torch.compile traces the eager function with the constants as keywords: no variant built or
            # cached here (a new code object cannot be traced, and a cache write inside an autograd Function's
            # forward is a side effect Dynamo refuses; either broke the caller's graph at every step)
            return functools.partial(self.eager[name], **static) if static else self.eager[name]
        key = (name, tuple(sorted(static.items())))
        eager = self._variants.get(key)
        if eager is None:
            eager = self._variants[key] = _bind_constants(self.eager[name], static, len(self._variants))
        if not self.enabled or torch.compiler.is_compiling():
            return eager
        fn = self._compiled.get(key)
        if fn is None:
            # dynamic=None: shapes become dynamic once a second shape is seen, the bound constants never do. Sizes 0
            # and 1 stay specialised (a chunk of one slice, a broadcast mask dim), so mixed uses add variants: each
            # kernel gets a budget of its own, not a share of torch's default of 8 per code object, past which every
            # later call would run eagerly
            compiled = torch.compile(
                eager,
                dynamic=None,
                fullgraph=self.fullgraph,
                options=self.options.get(name),
                backend=self.backend,
                recompile_limit=RECOMPILE_LIMIT,
                isolate_recompiles=True,
            )
            fn = self._with_eager_fallback(eager, compiled)
            if self.elementwise and name not in self.shaped:
                fn = _flat_call(fn)
            self._compiled[key] = fn
        return fn

    def _with_eager_fallback(self, eager: Callable[..., Any], compiled: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            if not self.enabled:
                return eager(*args)
            try:
                return compiled(*args)
            except torch.OutOfMemoryError:
                raise  # the step does not fit: the eager kernels would not either, and the kernels stay compiled
            except Exception as e:  # no compiler toolchain, unsupported device ...: the same values, eagerly
                self.enabled = False
                first = str(e).splitlines()[0][:200] if str(e) else ""
                warnings.warn(
                    f"zoo: {self.what} did not compile ({type(e).__name__}: {first}); running them "
                    f"eagerly (the same values up to float rounding, slower). Set {self.env}=0 to silence this.",
                    stacklevel=3,
                )
                return eager(*args)

        return run


def memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """The dims of ``t`` from the largest stride to the smallest (ties keep their order), so that ``t.permute(order)``
    is contiguous when ``t`` is dense in any memory format: (0, 1, 2, 3) for a contiguous 4-d tensor, (0, 2, 3, 1)
    for channels-last."""
    return tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def inverse_order(order: Sequence[int]) -> tuple[int, ...]:
    """The permutation that undoes ``order`` (``t.permute(order).permute(inverse_order(order))`` is ``t``)."""
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return tuple(inverse)


def in_memory_order(t: torch.Tensor, order: Sequence[int] | None) -> torch.Tensor:
    """``t`` with its dims permuted to ``order`` (a :func:`memory_order`); None: ``t`` as it is (already in memory
    order)."""
    return t if order is None else t.permute(tuple(order))


def from_memory_order(t: torch.Tensor, order: Sequence[int] | None) -> torch.Tensor:
    """The inverse of :func:`in_memory_order`: ``t``, in the dims of ``order``, back in the original dims."""
    return t if order is None else t.permute(inverse_order(order))


def _flat_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, an element-wise kernel, called on 1-D views in memory order: with the first argument's dims put in
    memory order (:func:`memory_order`), every tensor argument of its number of elements is viewed as 1-D when all of
    them are then contiguous (so they share one layout: contiguous, channels-last ...), and every tensor result of
    that size is viewed back in the first argument's shape and layout (the values are the same, element by element).

    Why: with more than one shape seen, ``torch.compile`` makes the shapes symbolic, and inductor's CPU code for an
    N-d symbolic shape can lose its vectorisation (a momentum step's backward on a ResNet stage measured 8x slower
    than with static shapes, 15x for channels-last); over 1-D views the only symbolic size is the length, and the
    kernel vectorises as a static one does. Other arguments (mixed layouts, strided views) call ``fn`` as they are.
    """

    def run(*args: Any) -> Any:
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor) or first.dim() <= 1:
            return fn(*args)
        numel = first.numel()
        order = None if first.is_contiguous() else memory_order(first)  # None: already in memory order
        is_full = [isinstance(a, torch.Tensor) and a.dim() == first.dim() and a.numel() == numel for a in args]
        ordered = [in_memory_order(a, order) if f else a for a, f in zip(args, is_full)]
        if not all(a.is_contiguous() and a.shape == ordered[0].shape for a, f in zip(ordered, is_full) if f):
            return fn(*args)
        shape = ordered[0].shape
        out = fn(*(a.view(-1) if f else a for a, f in zip(ordered, is_full)))

        def back(o: Any) -> Any:
            if isinstance(o, torch.Tensor) and o.dim() == 1 and o.numel() == numel:
                return from_memory_order(o.view(shape), order)
            return o

        return tuple(back(o) for o in out) if isinstance(out, tuple) else back(out)

    return run


def _bind_constants(fn: Callable[..., Any], static: dict[str, Any], index: int) -> Callable[..., Any]:
    """``fn`` with keyword-only defaults ``static``, as a new function with its own code object.

    Not ``functools.partial``: torch.compile keeps its compiled variants (at most ``recompile_limit``) per code
    object, and every partial runs through one shared wrapper, so a few kernels x constants would exhaust the
    limit. A renamed copy of the code has a cache of its own, and its keyword defaults are compile-time constants.
    """
    if not static:
        return fn
    code = fn.__code__.replace(co_name=f"{fn.__name__}_v{index}")
    bound = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    bound.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **static}
    bound.__qualname__, bound.__doc__ = code.co_name, fn.__doc__
    return bound
