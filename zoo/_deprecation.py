"""Deprecated argument names: an old name keeps working for one release with a ``FutureWarning`` naming the new
one; giving both names is one :class:`zoo.errors.ZooError`.

The old name stays in the signature (typed, default None), so configs and checkpoints written with it still fit
the signature checks of ``from_pretrained`` and LightningCLI.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from zoo.errors import ZooError

__all__ = ["renamed_argument", "renamed_arguments", "renamed_attribute"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_argument(
    owner: str,
    new: str,
    new_value: Any,
    old: str,
    old_value: Any,
    *,
    new_given: bool | None = None,
    stacklevel: int = 3,
) -> Any:
    """The value of argument ``new`` of ``owner`` when its deprecated name ``old`` may have been given instead.

    ``old_value`` None: ``new_value``. Otherwise ``old_value``, with a FutureWarning; a ZooError when ``new`` was
    given too (``new_given``; by default: ``new_value`` is not None, for a ``new`` whose default is None).
    ``stacklevel``: the warning's stack level (3: the caller of the function that takes the argument).
    """
    if old_value is None:
        return new_value
    if new_value is not None if new_given is None else new_given:
        raise ZooError(f"{owner}: {old}= is the deprecated name of {new}=; give {new}= only, not both")
    warnings.warn(
        f"{owner}: {old}= is deprecated and will be removed in the next release; use {new}= (same meaning)",
        FutureWarning,
        stacklevel=stacklevel,
    )
    return old_value


def renamed_arguments(**renames: str) -> Callable[[F], F]:
    """Decorator for a function whose renamed arguments have defaults other than None: ``old="new"`` pairs, each
    ``old`` a keyword-only parameter of the function (default None) mapped to ``new`` by :func:`renamed_argument`
    (both given, positionally or by keyword: one ZooError). Calls without an old name go straight through."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        owner = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old in renames:
                if kwargs.get(old) is not None:
                    break
            else:
                return fn(*args, **kwargs)
            bound = signature.bind_partial(*args, **kwargs)  # a required new name may come as the old
            for old, new in renames.items():
                old_value = bound.arguments.pop(old, None)
                if old_value is not None:
                    bound.arguments[new] = renamed_argument(
                        owner, new, None, old, old_value, new_given=new in bound.arguments
                    )
            return fn(*bound.args, **bound.kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_attribute(old: str, new: str) -> property:
    """A read-only class attribute ``old`` that returns ``self.<new>`` with a FutureWarning naming ``new``."""

    def get(self: Any) -> Any:
        warnings.warn(
            f"{type(self).__name__}.{old} is deprecated and will be removed in the next release; use "
            f".{new} (same value)",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(self, new)

    return property(get, doc=f"Deprecated name of ``{new}``.")
