"""Model registry in the style of timm: ``register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from zoo._deprecation import renamed_arguments
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


@renamed_arguments(pattern="filter")
def list_models(
    filter: str | Iterable[str] = "",
    family: str | Iterable[str] | None = None,
    pretrained: bool = False,
    exclude_filters: str | Iterable[str] = "",
    include_tags: bool | None = None,
    *,
    pattern: str | None = None,
) -> list[str]:
    """Names of the registered models in natural order (resnet18 before resnet101), as ``timm.list_models``.

    Args:
        filter: a shell-style pattern or several (``"heun_*"``, ``["resnet*", "vit*"]``); a name matching any is
            kept; empty for all. With tags, a pattern without a tag also matches the tags of the names it matches.
        family: the family (the module the builder is defined in: ``"resnet"``, ``"vit"``, timm's ``module``), or
            several; None for all.
        pretrained: keep only the names with pretrained weights (``zoo.list_pretrained(has_weights=True)``).
        exclude_filters: a pattern or several; a name matching any is dropped.
        include_tags: list ``"arch.tag"`` names, one per pretrained cfg (an architecture without cfgs keeps its own
            name); None for the value of ``pretrained``, as in timm.
        pattern: the deprecated name of ``filter``.
    """
    from zoo.pretrained import _filters, _natural_key, list_pretrained

    if include_tags is None:
        include_tags = pretrained
    families = (_strings(family, "family") or None) if family is not None else None
    names = {n for n in _MODEL_ENTRYPOINTS if families is None or _MODEL_FAMILY[n] in families}
    include, exclude = _strings(filter, "filter"), _strings(exclude_filters, "exclude_filters")
    if include_tags:
        tags: dict[str, list[str]] = {}
        for name in list_pretrained():
            tags.setdefault(name.partition(".")[0], []).append(name)
        names = {t for n in names for t in tags.get(n, [n])}
        include, exclude = _filters(include), _filters(exclude)
    if include:
        names = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)}
    names = {n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    if pretrained:
        with_weights = set(list_pretrained(has_weights=True))
        names = {n for n in names if n in with_weights or ("." not in n and _default_has_weights(n))}
    return sorted(names, key=_natural_key)


def _strings(value: str | Iterable[str], what: str) -> list[str]:
    """One string or several, as a list (an empty string: none); one ZooError for anything else."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, Iterable):
        values = list(value)
        if all(isinstance(v, str) for v in values):
            return [v for v in values if v]
    raise ZooError(f"{what} must be a shell-style pattern or a list of them (strings), got {value!r}")


def _default_has_weights(arch: str) -> bool:
    from zoo.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    return cfg is not None and cfg.has_weights


def is_model(name: str) -> bool:
    """True if ``name`` is a registered model (a pretrained tag, ``"resnet50.tv2_in1k"``, is ignored, as in timm)."""
    return isinstance(name, str) and name.partition(".")[0] in _MODEL_ENTRYPOINTS


def model_entrypoint(name: str) -> Callable[..., Any]:
    """The builder registered as ``name``; a clear error with close matches if there is none.

    Args:
        name: the registered model name (``"resnet50"``, without a tag).
    """
    if not isinstance(name, str) or not name:
        raise ZooError(f"a model name must be a non-empty string such as 'resnet50', got {name!r}")
    try:
        return _MODEL_ENTRYPOINTS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _MODEL_ENTRYPOINTS, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ZooError(
            f"unknown model {name!r}.{hint} See zoo.list_models() for the {len(_MODEL_ENTRYPOINTS)} models."
        ) from None


_HF_HUB = "hf-hub:"
# builder options that a model rebuilt from a Hub repository's own config does not take
_BUILDER_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "features_only", "out_indices", "feature_cls")


def create_model(name: str, weights: str | None = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """Build the registered model ``name`` (``"arch"`` or ``"arch.tag"``, as in timm).

    A tag passes its :class:`zoo.pretrained.PretrainedCfg` to the builder as ``pretrained_cfg`` (an unknown tag is
    one error listing the architecture's tags); ``pretrained=True`` loads the weights of that cfg, or of the
    architecture's default tag without one. A tag that names other weights than ``weights=`` is one error: give
    one of them. The other keyword arguments go to the builder (``pretrained_cfg_overlay=dict(file=...)`` with
    ``pretrained=True`` loads a local copy of the tag's weights, as in timm).

    As in timm, ``"hf-hub:org/name"`` with ``pretrained=True`` builds the model a Hub repository written by
    ``save_pretrained`` holds, with its weights (:func:`zoo.from_pretrained`; keyword arguments override its
    config).

    Args:
        name: ``"arch"``, ``"arch.tag"`` (see :func:`list_models`, :func:`zoo.list_pretrained`) or
            ``"hf-hub:org/name"``.
        weights: weights to load (a file, a ``save_pretrained`` folder, ``"hf-hub:org/name"``, a torchvision weight
            name); None for none, or for the weights of the tag with ``pretrained=True``.
        pretrained: whether to load the pretrained weights of the tag (or of the architecture's default tag).
    """
    if isinstance(name, str) and name.startswith(_HF_HUB):
        return _create_from_hub(name, weights, pretrained, kwargs)
    from zoo.pretrained import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    builder = model_entrypoint(arch)
    if tag:
        if kwargs.get("pretrained_cfg") is not None:
            raise ZooError(
                f"{name!r} names the pretrained cfg {tag!r} and pretrained_cfg= gives another; give one: the tag in "
                f"the name, or create_model({arch!r}, pretrained_cfg=...)"
            )
        kwargs["pretrained_cfg"] = get_pretrained_cfg(name)
    if pretrained:  # only when asked: a builder without tags keeps its plain signature
        kwargs["pretrained"] = pretrained
    return builder(weights=weights, **kwargs)


def _create_from_hub(name: str, weights: Any, pretrained: bool, kwargs: dict[str, Any]) -> Any:
    """timm's ``create_model("hf-hub:org/name", pretrained=True)``: :func:`zoo.from_pretrained` of the repository."""
    repo = name[len(_HF_HUB) :]
    if weights is not None:
        raise ZooError(
            f"create_model({name!r}) loads that repository's weights, and weights={weights!r} names others; give "
            f"one: create_model({name!r}, pretrained=True), or create_model('<arch>', weights={weights!r})"
        )
    if pretrained is not True:
        raise ZooError(
            f"create_model({name!r}) builds the model of a Hub repository with its weights: pass pretrained=True "
            f"(as in timm) or call zoo.from_pretrained({name!r}); to build an architecture without weights, name "
            "it (zoo.list_models())"
        )
    refused = [k for k in _BUILDER_ONLY if k in kwargs]
    if refused:
        raise ZooError(
            f"create_model({name!r}) rebuilds the repository's model from its config, without the builder options "
            f"{', '.join(refused)}; build the architecture by name with weights={name!r} for them "
            f"(e.g. create_model('<arch>', weights={name!r}, features_only=True))"
        )
    if not repo or repo.startswith("/") or repo.partition("@")[0].count("/") != 1:
        raise ZooError(f"{name!r} is not a Hub repository name: write 'hf-hub:org/name' (optionally '@revision')")
    from zoo.hub import from_pretrained

    return from_pretrained(name, **kwargs)
