"""Model registry in the style of timm: ``register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from zoo.errors import ZooError

_MODEL_ENTRYPOINTS: dict[str, Callable[..., Any]] = {}
_MODEL_FAMILY: dict[str, str] = {}
# family classes by every class path a config may spell them with ("zoo.models.resnet.MomentumResNet" as
# save_pretrained writes it, "zoo.models.MomentumResNet" as LightningCLI does): a file names a class, the
# registry resolves it; nothing named in a file is ever imported
_MODEL_CLASSES: dict[str, type] = {}

F = TypeVar("F", bound=Callable[..., Any])


def register_model(fn: F) -> F:
    """Register the builder function ``fn`` under its own name (``depth_scaled_resnet50`` ...); returns ``fn``."""
    name = fn.__name__
    if name in _MODEL_ENTRYPOINTS and _MODEL_ENTRYPOINTS[name] is not fn:
        raise ZooError(f"a model named {name!r} is already registered")
    _MODEL_ENTRYPOINTS[name] = fn
    _MODEL_FAMILY[name] = fn.__module__.rsplit(".", 1)[-1]
    return fn


def register_model_class(cls: type, *aliases: str) -> type:
    """Register a family class (``zoo.models.MomentumResNet`` ...) that configs and checkpoints may name.

    Args:
        cls: the family class; registered under its module path (``zoo.models.resnet.MomentumResNet``).
        *aliases: further class paths it may be named by (``zoo.models.MomentumResNet``).
    """
    for path in (f"{cls.__module__}.{cls.__qualname__}", *aliases):
        if _MODEL_CLASSES.get(path, cls) is not cls:
            raise ZooError(f"a model class {path!r} is already registered")
        _MODEL_CLASSES[path] = cls
    return cls


def model_class(class_path: str) -> type:
    """The registered family class that ``class_path`` (as a config spells it) names; one clear error for anything
    else (nothing is imported)."""
    if not isinstance(class_path, str) or class_path not in _MODEL_CLASSES:
        known = sorted({f"zoo.models.{c.__name__}" for c in _MODEL_CLASSES.values()})
        raise ZooError(
            f"class_path {class_path!r} is not a registered zoo model class; a file may only name one of "
            f"{', '.join(known)}"
        )
    return _MODEL_CLASSES[class_path]


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Sorted names of registered models matching a shell-style ``pattern`` (and a family: file name)."""
    return sorted(
        n for n in _MODEL_ENTRYPOINTS if fnmatch.fnmatch(n, pattern) and (family is None or _MODEL_FAMILY[n] == family)
    )


def is_model(name: str) -> bool:
    """True if ``name`` is a registered model (a pretrained tag, ``"resnet50.tv2_in1k"``, is ignored, as in timm)."""
    return isinstance(name, str) and name.partition(".")[0] in _MODEL_ENTRYPOINTS


def model_entrypoint(name: str) -> Callable[..., Any]:
    """The builder registered as ``name``; a clear error with close matches if there is none."""
    try:
        return _MODEL_ENTRYPOINTS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _MODEL_ENTRYPOINTS, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ZooError(
            f"unknown model {name!r}.{hint} See zoo.list_models() for the {len(_MODEL_ENTRYPOINTS)} models."
        ) from None


def create_model(name: str, weights: str | None = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """Build the registered model ``name`` (``"arch"`` or ``"arch.tag"``, as in timm).

    A tag passes its :class:`zoo.pretrained.PretrainedCfg` to the builder as ``pretrained_cfg`` (an unknown tag is
    one error listing the architecture's tags); ``pretrained=True`` loads the weights of that cfg, or of the
    architecture's default tag without one. ``weights`` and the other keyword arguments go to the builder.
    """
    arch, _, tag = name.partition(".") if isinstance(name, str) else (name, "", "")
    builder = model_entrypoint(arch)
    if tag:
        from zoo.pretrained import get_pretrained_cfg

        kwargs["pretrained_cfg"] = get_pretrained_cfg(name)
    if pretrained:  # only when asked: a builder without tags keeps its plain signature
        kwargs["pretrained"] = pretrained
    return builder(weights=weights, **kwargs)
