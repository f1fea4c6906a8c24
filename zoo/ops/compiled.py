"""Kernels that run compiled by default, with an eager fallback: one mechanism for every op that uses it.

A :class:`CompiledKernels` holds plain PyTorch functions ("eager kernels"). When enabled (the default, or
as the environment variable named by ``env`` says) each is wrapped once in ``torch.compile`` with dynamic
shapes; under a caller's own ``torch.compile`` the eager function is returned (the caller traces it).
If a compilation or a compiled call fails (no compiler toolchain, an unsupported device ...), the
kernels switch to eager for the rest of the process with one warning: they compute the same values.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch


class CompiledKernels:
    """Named kernels, compiled on first use when enabled.

    Args:
        eager: name -> the eager function.
        env: the environment variable that turns compilation off when "0", "false", "no" or "off".
        what: how the warning names these kernels ("the fused fixed-point kernels").
        fullgraph: passed to ``torch.compile``.
    """

    def __init__(self, eager: dict[str, Callable[..., Any]], env: str, what: str, fullgraph: bool = False):
        self.eager = dict(eager)
        self.env, self.what, self.fullgraph = env, what, fullgraph
        self.enabled = os.environ.get(env, "1").lower() not in ("0", "false", "no", "off")
        self._compiled: dict[str, Callable[..., Any]] = {}

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if not self.enabled or torch.compiler.is_compiling():
            return self.eager[name]
        fn = self._compiled.get(name)
        if fn is None:
            compiled = torch.compile(self.eager[name], dynamic=True, fullgraph=self.fullgraph)
            fn = self._compiled[name] = self._with_eager_fallback(name, compiled)
        return fn

    def _with_eager_fallback(self, name: str, compiled: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            if not self.enabled:
                return self.eager[name](*args)
            try:
                return compiled(*args)
            except Exception as e:  # no compiler toolchain, unsupported device ...: the same values, eagerly
                self.enabled = False
                first = str(e).splitlines()[0][:200] if str(e) else ""
                warnings.warn(f"zoo: {self.what} did not compile ({type(e).__name__}: {first}); running them "
                              f"eagerly (same results, slower). Set {self.env}=0 to silence this.", stacklevel=3)
                return self.eager[name](*args)

        return run
