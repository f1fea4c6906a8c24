"""The check every family's constructor runs first on the keyword arguments it passes on to its task.

A family takes its architecture's arguments by name and hands the rest (``**kwargs``) to its task
(:class:`zoo.tasks.ImageClassifier`, :class:`zoo.tasks.TranslationTask`), or to nobody (the mean-field and two-layer
models). Anything the task does not take would surface as Python's ``TypeError: __init__() got an unexpected keyword
argument``, after part of the model is built; :func:`check_model_kwargs` makes it one :class:`zoo.errors.ZooError`
that names the argument, suggests the closest valid name and lists the valid ones, before anything is allocated.
:func:`take_indices` is timm's block selection of ``forward_intermediates`` with the same kind of error.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from zoo.errors import ZooError
from zoo.tasks.optim import refuse_training_settings

__all__ = ["check_model_kwargs", "init_arguments", "take_indices"]

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def init_arguments(cls: type) -> list[str]:
    """The named arguments of ``cls``'s constructor: those of every ``__init__`` of a zoo class along its MRO (a
    subclass that passes ``**kwargs`` on takes its parents' too; Lightning's and torch's bases take none of a
    model's), in order of first appearance, without ``self`` and the variadic ``*args`` / ``**kwargs``.

    Args:
        cls: the class.
    """
    names: list[str] = []
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None or not klass.__module__.startswith("zoo."):
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):  # a builtin's __init__
            continue
        for p in list(params)[1:]:
            if p.kind not in _VARIADIC and p.name not in names:
                names.append(p.name)
    return names


def check_model_kwargs(cls: type, kwargs: Mapping[str, Any], task: Callable[..., Any] | None = None) -> None:
    """One ZooError for a keyword argument that neither the model nor its task takes.

    A family's constructor calls it first, on the ``**kwargs`` it would pass on to ``task``: every name must be an
    argument of the task's ``__init__`` (``num_classes`` excepted: the family passes it itself). A training setting
    given as a model argument (``lr=`` ...) gets :func:`zoo.tasks.optim.refuse_training_settings`'s message; any
    other unknown name gets a message naming it, the closest valid name when there is one (a typo), and every
    argument the model takes.

    Args:
        cls: the model class (named in the message; its constructor's arguments are the valid ones besides the
            task's).
        kwargs: the keyword arguments the constructor did not take by name.
        task: the task class the rest is passed to (``ImageClassifier``, ``TranslationTask``); None when the model
            passes nothing on (any leftover argument is unknown).
    """
    refuse_training_settings(cls, kwargs)
    task_args = [n for n in init_arguments(task) if n != "num_classes"] if task is not None else []
    unknown = [k for k in kwargs if k not in task_args]
    if not unknown:
        return
    model_args = init_arguments(cls)
    valid = model_args + [n for n in task_args if n not in model_args]
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    what, them = ("argument", "it") if len(unknown) == 1 else ("arguments", "them")
    raise ZooError(
        f"{cls.__name__} got the unknown {what} {', '.join(hints)}: remove or rename {them}; {cls.__name__} takes "
        f"{', '.join(valid)} (see help(zoo.models.{cls.__name__}))"
    )


def take_indices(count: int, indices: int | Sequence[int] | None, unit: str) -> tuple[list[int], int]:
    """timm's ``feature_take_indices`` (None: all, an int n: the last n, a list: those, negative from the end): the
    indices taken and the largest, or one ZooError naming the selection and what it may be.

    Args:
        count: how many there are to select from.
        indices: the selection.
        unit: what is selected, in the plural (``"blocks"``, ``"intervals"``).
    """
    from timm.models._features import feature_take_indices

    one = unit[:-1] if unit.endswith("s") else unit
    try:
        return feature_take_indices(count, indices)
    except (AssertionError, RuntimeError, TypeError) as e:
        raise ZooError(
            f"indices {indices!r} do not select {unit} of this model ({count} {unit}): give None (all), an int n "
            f"(the last n) or a list of {one} indices (negative from the end); {e}"
        ) from None
