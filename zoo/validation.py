"""Checks of the public arguments of builders, model constructors and tasks, in one place.

Every checker takes the argument's name and value, returns the value in its canonical type, or raises one
:class:`zoo.errors.ZooError` of the form

    "<name> must be <what>, got <value> (<type>); <how to fix it>"

The checks are strict on purpose, so that a typo never silently becomes another model:

- ``bool`` is not an integer (``True`` would silently mean 1) nor a real number;
- a float is never an integer: ``1.7`` is refused rather than truncated, and so is ``3.0`` (an integer argument
  takes an integer; configs and the CLI give ints for ints);
- a string is never a number (``'3'``) nor a sequence of numbers (``'111'`` is not ``(1, 1, 1)``);
- NaN and the infinities are refused wherever a finite number is meant (``math.isfinite``).

numpy integers and floats count as integers and reals (``numbers.Integral`` / ``numbers.Real``).

Checks of a tensor's values (not its shape or dtype) run only where :func:`host_read_is_free`: reading a value on
the host synchronises with an accelerator, and under ``torch.compile`` a data-dependent branch breaks the graph.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import numpy as np
import torch

from zoo.errors import ZooError

__all__ = [
    "host_read_is_free",
    "boolean",
    "choice",
    "finite_float",
    "image_size",
    "int_sequence",
    "integer",
    "non_negative_int",
    "optional",
    "pair_in_unit_interval",
    "positive_int",
    "probability",
]


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _fail(name: str, what: str, value: Any, hint: str) -> NoReturn:
    raise ZooError(f"{name} must be {what}, got {_shown(value)}; {hint}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _type_hint(value: Any, want_int: bool) -> str | None:
    """Why ``value`` is not a number of the wanted kind, or None when it is one (then only its range is wrong)."""
    if isinstance(value, (bool, np.bool_)):
        return "True/False is not a number here: give the number itself"
    if isinstance(value, str):
        return f"give the number itself, not the string {value!r}"
    if want_int and _is_int(value):
        return None
    if want_int and _is_real(value):
        if math.isfinite(value) and float(value).is_integer():
            return f"give the integer {int(value)}, not the float {value!r} (integer arguments take integers)"
        return "give a whole number (a float is never truncated to an integer)"
    if not (_is_int(value) if want_int else _is_real(value)):
        return f"give {'an integer' if want_int else 'a number'}, not a {type(value).__name__}"
    return None


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def integer(
    name: str, value: Any, min_value: int | None = None, max_value: int | None = None, hint: str | None = None
) -> int:
    """An integer (not bool, not a float, not a string) in ``[min_value, max_value]``.

    Args:
        name: the argument's name, as the error message shows it.
        value: the value to check.
        min_value: the smallest value accepted; None for no lower bound.
        max_value: the largest value accepted; None for no upper bound.
        hint: how to fix a bad value, shown in the error message instead of the default advice.
    """
    what = " ".join(filter(None, ["an integer", _interval(min_value, max_value, False, False)]))
    why = _type_hint(value, want_int=True)
    if why is not None:
        _fail(name, what, value, hint or why)
    number = int(value)
    if (min_value is not None and number < min_value) or (max_value is not None and number > max_value):
        _fail(name, what, value, hint or f"give an integer {_interval(min_value, max_value, False, False)}")
    return number


def positive_int(name: str, value: Any, hint: str | None = None) -> int:
    """An integer >= 1.

    Args:
        name: the argument's name, as the error message shows it.
        value: the value to check.
        hint: how to fix a bad value, shown in the error message instead of the default advice.
    """
    return integer(name, value, 1, hint=hint)


def non_negative_int(name: str, value: Any, hint: str | None = None) -> int:
    """An integer >= 0.

    Args:
        name: the argument's name, as the error message shows it.
        value: the value to check.
        hint: how to fix a bad value, shown in the error message instead of the default advice.
    """
    return integer(name, value, 0, hint=hint)


def int_sequence(
    name: str,
    value: Any,
    min_value: int | None = 1,
    length: int | None = None,
    allow_empty: bool = False,
    hint: str | None = None,
) -> tuple[int, ...]:
    """A list or tuple of integers >= ``min_value`` (``length`` entries when given; non-empty unless
    ``allow_empty``). A string, a bare number, a set or a dict is not such a sequence.

    Args:
        name: the argument's name, as the error message shows it.
        value: the value to check.
        min_value: the smallest value accepted for each entry; None for no bound.
        length: the exact number of entries wanted; None for any number.
        allow_empty: whether an empty list or tuple is accepted.
        hint: how to fix a bad value, shown in the error message instead of the default advice.
    """
    bound = f" >= {min_value}" if min_value is not None else ""
    if length is not None:
        what = f"a list of {length} integer{'s' if length != 1 else ''}{bound}"
    else:
        what = f"a {'' if allow_empty else 'non-empty '}list of integers{bound}"
    example = "[" + ", ".join([str(max(min_value or 0, 1))] * (length or 3)) + "]"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        _fail(name, what, value, hint or f"give a list such as {example}")
    if length is not None and len(value) != length:
        _fail(name, what, value, hint or f"give one entry per {'stage' if length > 1 else 'item'} ({length})")
    if not value and not allow_empty:
        _fail(name, what, value, hint or f"give at least one entry, such as {example}")
    out = []
    for i, item in enumerate(value):
        why = _type_hint(item, want_int=True)
        if why is None and min_value is not None and item < min_value:
            why = f"entries must be >= {min_value}"
        if why is not None:
            _fail(name, what, value, hint or f"entry {i} is {_shown(item)}: {why}")
        out.append(int(item))
    return tuple(out)


def finite_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str | None = None,
) -> float:
    """A finite real number (not bool, not a string, not NaN or +-inf) in the interval given by ``low`` /
    ``high`` (closed ends unless ``low_open`` / ``high_open``).

    Args:
        name: the argument's name, as the error message shows it.
        value: the value to check.
        low: the lower end of the interval; None for no lower bound.
        high: the upper end of the interval; None for no upper bound.
        low_open: whether ``low`` itself is refused.
        high_open: whether ``high`` itself is refused.
        hint: how to fix a bad value, shown in the error message instead of the default advice.
    """
    what = " ".join(filter(None, ["a finite number", _interval(low, high, low_open, high_open)]))
    why = _type_hint(value, want_int=False)
    if why is not None:
        _fail(name, what, value, hint or why)
    if not math.isfinite(value):
        _fail(name, what, value, hint or "give a finite number (NaN and infinities are refused)")
    number = float(value)
    if (low is not None and (number <= low if low_open else number < low)) or (
        high is not None and (number >= high if high_open else number > high)
    ):
        _fail(name, what, value, hint or f"give a value {_interval(low, high, low_open, high_open)}")
    return number


def probability(name: str, value: Any, hint: str | None = None) -> float:
    """A rate in [0, 1): dropout, stochastic depth, momentum terms (1 would drop or keep everything).

    Args:
        name: the argument's name, as the error message shows it.
        value: the value to check.
        hint: how to fix a bad value, shown in the error message instead of the default advice.
    """
    return finite_float(name, value, 0.0, 1.0, high_open=True, hint=hint)


def pair_in_unit_interval(name: str, value: Any, hint: str | None = None) -> tuple[float, float]:
    """Two numbers, each in [0, 1) (Adam's ``betas``).

    Args:
        name: the argument's name, as the error message shows it.
        value: the value to check.
        hint: how to fix a bad value, shown in the error message instead of the default advice.
    """
    what = "two numbers, each in [0, 1)"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        _fail(name, what, value, hint or "give a pair such as (0.9, 0.999)")
    out = []
    for i, item in enumerate(value):
        why = _type_hint(item, want_int=False)
        if why is None and not (math.isfinite(item) and 0.0 <= item < 1.0):
            why = "each entry must lie in [0, 1)"
        if why is not None:
            _fail(name, what, value, hint or f"entry {i} is {_shown(item)}: {why}")
        out.append(float(item))
    return out[0], out[1]


def choice(name: str, value: Any, choices: Iterable[str], hint: str | None = None) -> str:
    """One of the strings ``choices``.

    Args:
        name: the argument's name, as the error message shows it.
        value: the value to check.
        choices: the accepted strings.
        hint: how to fix a bad value, shown in the error message instead of the default advice.
    """
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        _fail(name, f"one of {listed}", value, hint or f"choose one of {listed}")
    return value


def boolean(name: str, value: Any, hint: str | None = None) -> bool:
    """True or False (numpy bools too); 0/1 and strings such as ``'false'`` are refused.

    Args:
        name: the argument's name, as the error message shows it.
        value: the value to check.
        hint: how to fix a bad value, shown in the error message instead of the default advice.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    _fail(name, "True or False", value, hint or "give a bool (a string such as 'false' would count as true)")


def image_size(name: str, value: Any) -> tuple[int, int]:
    """An image size: one integer >= 1 (square) or a pair (H, W) of them, returned as the pair (H, W).

    Args:
        name: the argument's name, as the error message shows it.
        value: the value to check.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        size = positive_int(
            name, value, hint=None if _is_int(value) else "give an integer such as 224 or a pair (H, W)"
        )
        return size, size
    h, w = int_sequence(name, value, 1, length=2, hint="give an integer such as 224 or a pair (H, W)")
    return h, w


def optional(check: Any, name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    """``None``, or ``check(name, value, *args, **kwargs)``.

    Args:
        check: the checker to apply when ``value`` is not None (one of this module's functions).
        name: the argument's name, as the error message shows it.
        value: the value to check.
    """
    return None if value is None else check(name, value, *args, **kwargs)


def host_read_is_free(t: torch.Tensor) -> bool:
    """Whether a value computed next to ``t`` may be read on the host now at no cost: ``t`` is on the CPU (no device
    to synchronise with) and no ``torch.compile`` is tracing (where a data-dependent branch would break the graph).

    Args:
        t: the tensor whose device decides.
    """
    return t.device.type == "cpu" and not torch.compiler.is_compiling()
