"""Pretrained configurations as data (timm's ``pretrained_cfg`` / ``default_cfgs``), and the one builder helper.

Every family declares its weights and published configurations next to its builders as ``default_cfgs``, a
mapping ``"arch.tag" -> PretrainedCfg`` registered with :func:`register_pretrained_cfgs`. An entry says where the
weights come from (``source``: a torchvision weights enum name such as ``"ResNet152_Weights.IMAGENET1K_V2"``,
``"hf-hub:timm/resnet50.a1_in1k"``, a file, or None for a published configuration without weights), the
evaluation transform in timm's keys (``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``), the
number of classes, the license, what function converted weights compute (``conversion``), and accuracies marked
``published`` or ``measured``, of the ``source`` weights or of this ``model``.

    >>> import zoo
    >>> names = zoo.list_pretrained("momentum_resnet152.*")  # "momentum_resnet152.tv2_in1k", ...
    >>> m = zoo.create_model("momentum_resnet152.tv2_in1k", pretrained=True)  # doctest: +SKIP

As in timm, the first tag registered for an architecture is its default (``pretrained=True`` without a tag), and
``model.pretrained_cfg`` (alias ``default_cfg``) describes the model AS BUILT (its input size and number of
classes), so ``timm.data.resolve_data_config({}, model=m)`` gives the right transform.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import inspect
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from zoo.errors import ZooError

__all__ = [
    "PretrainedCfg",
    "build_model",
    "get_pretrained_cfg",
    "list_pretrained",
    "register_pretrained_cfgs",
    "resolve_pretrained_cfg",
    "split_model_name_tag",
]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
METRIC_KINDS = ("published", "measured")
METRIC_OF = ("source", "model")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
CROP_MODES = ("center", "squash", "border")


@dataclass
class PretrainedCfg:
    """One pretrained configuration: timm's ``PretrainedCfg`` keys, and zoo's ``source``, ``model_args``,
    ``conversion``, ``metrics``, ``recipe``.

    ``metrics`` maps a name (``"imagenet-1k/top1"``) to ``{"value": float, "kind": "published" | "measured",
    "of": "source" | "model", "note": str (optional)}``: ``of="source"`` is the accuracy of the weights as
    published by their source (torchvision, timm), ``of="model"`` that of this model (after a conversion or a
    refit). ``model_args`` are the builder keyword arguments the tag implies (``{"gamma": 0.9}``); a caller's
    own keyword arguments win, as in timm.

    Fields, by group (timm's meaning unless said otherwise):

    Name and weights:
        architecture: the registered model name (``"resnet50"``).
        tag: the pretrained tag (``"tv2_in1k"``); ``"architecture.tag"`` is the entry's name.
        source: where zoo reads the weights (a torchvision weights enum name, ``"hf-hub:org/name"``, a file);
            None for a published configuration without weights.
        url: the weights' URL (informative: zoo reads ``source``).
        file: a local copy of the weights (a file or a ``save_pretrained`` folder): ``pretrained=True`` loads it
            instead of fetching ``source``, as timm does (``pretrained_cfg_overlay=dict(file=...)`` for offline
            loading); None for none.
        hf_hub_id: the weights' Hugging Face Hub repository (informative).

    Input and evaluation transform (``timm.data.resolve_data_config`` reads these):
        input_size: ``(channels, height, width)`` of the input; None for a model that takes no images (point
            clouds), and then ``to_dict`` leaves out every image key.
        test_input_size: the input size to evaluate at when it differs from ``input_size``; None when it does not.
        min_input_size: the smallest input the model accepts; None for no stated minimum.
        fixed_input_size: whether the model accepts ``input_size`` only.
        interpolation: the resize interpolation, one of ``INTERPOLATIONS``.
        crop_pct: crop size over resize size of the evaluation transform, in (0, 1].
        test_crop_pct: ``crop_pct`` at ``test_input_size``; None for ``crop_pct``.
        crop_mode: how the crop is taken, one of ``CROP_MODES``.
        mean: the per-channel mean the input is normalised with (one entry per input channel).
        std: the per-channel standard deviation (positive, one entry per input channel).

    Head and description:
        num_classes: the number of classes of the weights' classifier.
        label_names: the class of each output, one string per class (a fit records its data module's names).
        pool_size: the spatial size of the last feature map, before pooling.
        first_conv: the name of the first convolution (what timm adapts for another ``in_chans``).
        classifier: the name of the classifier module (what ``reset_classifier`` replaces).
        license: the weights' license.
        description: a one-line description of the entry.
        origin_url: where the weights or the configuration were published.
        paper_name: the paper that describes the model.
        paper_ids: identifiers of that paper (arXiv ids ...).
        notes: further remarks, one string each.

    zoo's own:
        model_args: the builder keyword arguments the tag implies.
        conversion: what function converted weights compute, and how they were converted from ``source``.
        metrics: accuracies, as described above.
        recipe: the recipe (``zoo fit --config <recipe>``) that trains the entry's weights; None when none does.
    """

    architecture: str | None = None
    tag: str | None = None
    source: str | None = None
    # weight locations in timm's keys (url and hf_hub_id informative: zoo reads ``source``, or ``file`` when set)
    url: str | None = None
    file: str | None = None
    hf_hub_id: str | None = None
    # input / data config (timm.data.resolve_data_config reads these); input_size None: not an image model (point
    # clouds), and to_dict leaves out every image key
    input_size: tuple[int, int, int] | None = (3, 224, 224)
    test_input_size: tuple[int, int, int] | None = None
    min_input_size: tuple[int, int, int] | None = None
    fixed_input_size: bool = False
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    test_crop_pct: float | None = None
    crop_mode: str = "center"
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    # head / classifier and meta-data
    num_classes: int = 1000
    # the class of each output (timm's key; a fit on a data module with class names records them)
    label_names: tuple[str, ...] | None = None
    pool_size: tuple[int, ...] | None = None
    first_conv: str | None = None
    classifier: str | None = None
    license: str | None = None
    description: str | None = None
    origin_url: str | None = None
    paper_name: str | None = None
    paper_ids: str | tuple[str, ...] | None = None
    notes: tuple[str, ...] | None = None
    # zoo's keys
    model_args: dict[str, Any] = field(default_factory=dict)
    conversion: str | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipe: str | None = None

    def __post_init__(self) -> None:
        for name in ("input_size", "test_input_size", "min_input_size", "pool_size", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        if isinstance(self.notes, (list, str)):
            self.notes = (self.notes,) if isinstance(self.notes, str) else tuple(self.notes)
        if isinstance(self.label_names, list):
            self.label_names = tuple(self.label_names)
        where = f"pretrained cfg {self.name or '(unnamed)'}"
        for name in ("input_size", "test_input_size", "min_input_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                not isinstance(value, tuple)
                or len(value) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            ):
                raise ZooError(f"{where}: {name} must be (channels, height, width) of positive integers, got {value!r}")
        channels = self.input_size[0] if self.input_size is not None else len(self.mean)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or len(value) != channels
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
            ):
                raise ZooError(
                    f"{where}: {name} must hold {channels} finite numbers (one per input channel), got {value!r}"
                )
        if any(s <= 0 for s in self.std):
            raise ZooError(f"{where}: std must be positive, got {self.std!r}")
        for name in ("crop_pct", "test_crop_pct"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ZooError(f"{where}: {name} must be in (0, 1] (crop size / resize size), got {value!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ZooError(
                f"{where}: interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.crop_mode not in CROP_MODES:
            raise ZooError(f"{where}: crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ZooError(f"{where}: num_classes must be a non-negative integer, got {self.num_classes!r}")
        if self.label_names is not None and (
            not isinstance(self.label_names, tuple)
            or not all(isinstance(name, str) for name in self.label_names)
            or len(self.label_names) != self.num_classes
        ):
            raise ZooError(
                f"{where}: label_names must be {self.num_classes} strings, one per class, got {self.label_names!r:.120}"
            )
        if not isinstance(self.model_args, Mapping):
            raise ZooError(f"{where}: model_args must be a mapping of builder arguments, got {self.model_args!r}")
        self.model_args = dict(self.model_args)
        for key, metric in self.metrics.items():
            if not isinstance(metric, Mapping) or not {"value", "kind", "of"} <= set(metric):
                raise ZooError(f"{where}: metric {key!r} must be a mapping with value, kind and of, got {metric!r}")
            if metric["kind"] not in METRIC_KINDS or metric["of"] not in METRIC_OF:
                raise ZooError(
                    f"{where}: metric {key!r} has kind {metric['kind']!r} (one of {METRIC_KINDS}) and of "
                    f"{metric['of']!r} (one of {METRIC_OF})"
                )
            if not (isinstance(metric["value"], (int, float)) and math.isfinite(metric["value"])):
                raise ZooError(f"{where}: metric {key!r} has a value that is not a finite number: {metric['value']!r}")

    @property
    def name(self) -> str | None:
        """``"arch.tag"`` (or the architecture alone, or None)."""
        if self.architecture and self.tag:
            return f"{self.architecture}.{self.tag}"
        return self.architecture

    @property
    def has_weights(self) -> bool:
        """True when the entry names weights (``source``, or a local ``file``); False for a published configuration
        alone."""
        return self.source is not None or self.file is not None

    def to_dict(self, remove_source: bool = False, remove_null: bool = True) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` dict (``pool_size``, ``first_conv``, ``classifier`` kept even when None;
        other None or empty values dropped with ``remove_null``; weight locations dropped with ``remove_source``)."""
        out = {}
        for f in dataclasses.fields(self):
            value = copy.deepcopy(getattr(self, f.name))
            if remove_source and f.name in ("url", "file", "hf_hub_id", "source"):
                continue
            if self.input_size is None and f.name in IMAGE_KEYS and remove_null:
                continue  # not an image model
            if (
                remove_null
                and (value is None or value == {})
                and f.name not in ("pool_size", "first_conv", "classifier")
            ):
                continue
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> PretrainedCfg:
        """A copy with ``changes`` (checked again); an unknown field is one ZooError listing the fields."""
        unknown = sorted(set(changes) - _CFG_FIELDS)
        if unknown:
            raise ZooError(
                f"pretrained cfg {self.name or '(unnamed)'}: unknown fields {unknown}; the fields are "
                f"{sorted(_CFG_FIELDS)}"
            )
        return dataclasses.replace(copy.deepcopy(self), **changes)


# timm's keys that say how a model's inputs are prepared (what timm.data.resolve_data_config reads)
DATA_CONFIG_KEYS: tuple[str, ...] = (
    "input_size",
    "test_input_size",
    "min_input_size",
    "interpolation",
    "crop_pct",
    "test_crop_pct",
    "crop_mode",
    "mean",
    "std",
)
# timm's keys that describe an image input (left out of the dict of a cfg without an input_size)
IMAGE_KEYS: tuple[str, ...] = (*DATA_CONFIG_KEYS, "fixed_input_size", "pool_size", "first_conv")


# ------------------------------------------------------------------------------------------------
# The table: architecture -> tag -> cfg (insertion order: the first tag is the architecture's default)

_PRETRAINED_CFGS: dict[str, dict[str, PretrainedCfg]] = {}
_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))


def split_model_name_tag(name: str, no_tag: str = "") -> tuple[str, str]:
    """``"resnet50.tv2_in1k"`` -> ``("resnet50", "tv2_in1k")`` (timm's rule: the first dot splits).

    Args:
        name: a model name, ``"arch"`` or ``"arch.tag"``.
        no_tag: the tag returned for a name without one.
    """
    if not isinstance(name, str) or not name:
        raise ZooError(
            f"a model name must be a non-empty string such as 'resnet50' or 'resnet50.tv2_in1k', got {name!r}"
        )
    arch, _, tag = name.partition(".")
    return arch, tag or no_tag


def _as_cfg(value: PretrainedCfg | Mapping[str, Any], where: str) -> PretrainedCfg:
    if isinstance(value, PretrainedCfg):
        return copy.deepcopy(value)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - _CFG_FIELDS)
        if unknown:
            raise ZooError(f"{where}: unknown pretrained cfg keys {unknown}; known keys are {sorted(_CFG_FIELDS)}")
        return PretrainedCfg(**copy.deepcopy(dict(value)))
    raise ZooError(f"{where}: a pretrained cfg must be a PretrainedCfg or a mapping, got {type(value).__name__}")


def register_pretrained_cfgs(cfgs: Mapping[str, PretrainedCfg | Mapping[str, Any]]) -> dict[str, PretrainedCfg]:
    """Register ``{"arch.tag": cfg}`` (a family's ``default_cfgs``); returns the registered cfgs, with their
    ``architecture`` and ``tag`` filled in. The first tag registered for an architecture is its default.
    Registering the same entry again is a no-op; another entry under a registered name is refused."""
    out: dict[str, PretrainedCfg] = {}
    for name, value in cfgs.items():
        arch, tag = split_model_name_tag(name)
        if not tag:
            raise ZooError(f"pretrained cfg {name!r} has no tag: name entries 'arch.tag' (e.g. 'resnet50.tv2_in1k')")
        cfg = _as_cfg(value, f"pretrained cfg {name!r}")
        if cfg.architecture not in (None, arch) or cfg.tag not in (None, tag):
            raise ZooError(f"pretrained cfg {name!r} says architecture={cfg.architecture!r}, tag={cfg.tag!r}")
        cfg.architecture, cfg.tag = arch, tag
        tags = _PRETRAINED_CFGS.setdefault(arch, {})
        if tag in tags and tags[tag] != cfg:
            raise ZooError(f"a different pretrained cfg {name!r} is already registered")
        tags.setdefault(tag, cfg)
        out[name] = copy.deepcopy(cfg)
    return out


def _natural_key(name: str) -> list[int | str]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def _filters(value: str | Iterable[str] | None) -> list[str]:
    if not value:
        return []
    patterns = [value] if isinstance(value, str) else list(value)
    # as timm: a filter without a tag also matches every tag of the names it matches ("resnet50" -> "resnet50.*")
    return [p for f in patterns for p in ([f] if "." in f else [f, f"{f}.*"])]


def list_pretrained(
    filter: str | Iterable[str] = "", exclude_filters: str | Iterable[str] = "", has_weights: bool | None = None
) -> list[str]:
    """Sorted (naturally, as timm) ``"arch.tag"`` names of the registered pretrained cfgs matching the shell-style
    ``filter`` (one pattern or several) and none of ``exclude_filters``. ``has_weights=True`` keeps the entries
    with weights (timm's ``list_pretrained`` lists only these), ``False`` the published configurations without."""
    names = {f"{arch}.{tag}" for arch, tags in _PRETRAINED_CFGS.items() for tag in tags}
    include = _filters(filter)
    if include:
        names = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)}
    exclude = _filters(exclude_filters)
    names = {n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    if has_weights is not None:
        names = {n for n in names if _lookup(n).has_weights == has_weights}
    return sorted(names, key=_natural_key)


def _lookup(name: str) -> PretrainedCfg:
    arch, tag = split_model_name_tag(name)
    return _PRETRAINED_CFGS[arch][tag]


def get_pretrained_cfg(name: str, allow_unregistered: bool = True) -> PretrainedCfg | None:
    """A copy of the cfg of ``"arch.tag"``, or of the architecture's default tag for ``"arch"``; None for an
    architecture without registered cfgs (``allow_unregistered``; else one ZooError). An unknown tag of an
    architecture that has cfgs is one ZooError listing its tags.

    Args:
        name: ``"arch.tag"`` or ``"arch"``.
        allow_unregistered: whether an architecture without registered cfgs gives None rather than an error.
    """
    arch, tag = split_model_name_tag(name)
    tags = _PRETRAINED_CFGS.get(arch)
    if not tags:
        if tag or not allow_unregistered:
            from zoo.registry import is_model

            what = "no pretrained cfgs" if is_model(arch) else "not a registered model"
            raise ZooError(f"{arch!r} has {what}: see zoo.list_pretrained() for the names with tags")
        return None
    if not tag:
        return copy.deepcopy(next(iter(tags.values())))
    if tag not in tags:
        raise ZooError(
            f"{arch!r} has no pretrained tag {tag!r}; its tags are {', '.join(tags)} "
            "(zoo.list_pretrained(" + repr(arch) + "))"
        )
    return copy.deepcopy(tags[tag])


def pretrained_cfgs_of(arch: str) -> list[PretrainedCfg]:
    """Copies of every cfg registered for ``arch``, default first."""
    return [copy.deepcopy(c) for c in _PRETRAINED_CFGS.get(arch, {}).values()]


# ------------------------------------------------------------------------------------------------
# Resolving the cfg of a build

_TORCHVISION_ENUM = re.compile(r"(\w+_Weights)\.(\w+)")


def _source_matches(source: str | None, weights: str) -> bool:
    """True when ``weights`` (as a builder's ``weights=`` spells it) names the entry's ``source``: the same string,
    or the torchvision weight name alone (``"IMAGENET1K_V2"`` for ``"ResNet50_Weights.IMAGENET1K_V2"``), or
    torchvision's ``"DEFAULT"`` alias of it."""
    if source is None:
        return False
    if weights == source:
        return True
    found = _TORCHVISION_ENUM.fullmatch(source)
    if not found:
        return False
    enum_name, member = found.groups()
    enum_given, _, given = weights.rpartition(".")
    if enum_given not in ("", enum_name):
        return False
    if given == member:
        return True
    if given == "DEFAULT":
        import torchvision

        try:
            return torchvision.models.get_weight(f"{enum_name}.DEFAULT").name == member
        except (ValueError, KeyError, AttributeError):
            return False
    return False


def _check_same_weights(arch: str, cfg: PretrainedCfg, weights: str) -> None:
    """One ZooError when ``cfg`` names weights (``source`` or ``file``) and ``weights`` names other ones."""
    named = cfg.file if cfg.file is not None else cfg.source
    if named is None or weights == cfg.file or _source_matches(cfg.source, weights):
        return
    what = cfg.name if cfg.tag else "pretrained_cfg"
    other = next((c.name for c in pretrained_cfgs_of(arch) if _source_matches(c.source, weights)), None)
    those = f"zoo.create_model({other!r}, pretrained=True)" if other else f"zoo.create_model({arch!r}, weights=...)"
    raise ZooError(
        f"conflicting weights: {what} names the weights {named!r}, but weights={weights!r} names other weights, "
        f"and a cfg must describe the weights loaded; give one: {those} for those weights and their cfg, or "
        f"drop weights= (pretrained=True loads {what}'s own)"
    )


def _signature_defaults(cls: Callable[..., Any]) -> dict[str, Any]:
    """Keyword defaults of ``cls`` and of the classes it passes ``**kwargs`` to (its MRO's ``__init__``)."""
    out: dict[str, Any] = {}
    for klass in reversed(getattr(cls, "__mro__", (cls,))):
        init = klass.__dict__.get("__init__") if isinstance(klass, type) else klass
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        out.update({p.name: p.default for p in params if p.default is not inspect.Parameter.empty})
    return out


def _agrees(cfg: PretrainedCfg, effective: Mapping[str, Any]) -> bool:
    return all(k in effective and effective[k] == v for k, v in cfg.model_args.items())


def resolve_pretrained_cfg(
    arch: str,
    pretrained_cfg: PretrainedCfg | Mapping[str, Any] | str | None = None,
    weights: str | os.PathLike | None = None,
    base_cfg: PretrainedCfg | Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> PretrainedCfg:
    """The cfg a build of ``arch`` starts from: ``pretrained_cfg`` (a cfg, a mapping, or a tag of ``arch``); else
    the table entry whose source ``weights`` names (among several, the one whose ``model_args`` agree with
    ``model_kwargs``); else, for other weights (a file), the architecture's default cfg with that ``source``;
    else the default tag's cfg; else ``base_cfg`` (the family's description of an architecture without tags).

    A ``pretrained_cfg`` that names weights (its ``source`` or ``file``) and ``weights`` that name other ones
    are one ZooError naming both: the cfg's transform and metrics would describe weights that are not loaded.

    Args:
        arch: the registered architecture being built.
        pretrained_cfg: the cfg asked for (a cfg, a mapping of its fields or a tag of ``arch``); None for none.
        weights: the builder's ``weights=`` argument; None for none.
        base_cfg: the family's cfg for an architecture without registered tags.
        model_kwargs: the build's keyword arguments, to choose among entries with the same ``source``.
    """
    if isinstance(pretrained_cfg, str):
        cfg = get_pretrained_cfg(f"{arch}.{pretrained_cfg}")
    elif pretrained_cfg is not None:
        cfg = _as_cfg(pretrained_cfg, f"pretrained_cfg of {arch}")
        cfg.architecture = cfg.architecture or arch
    if pretrained_cfg is not None:
        if weights is not None:
            _check_same_weights(arch, cfg, str(weights))
        return cfg
    default = get_pretrained_cfg(arch)
    if default is None:
        default = _as_cfg(base_cfg, f"base cfg of {arch}") if base_cfg is not None else PretrainedCfg()
        default.architecture = default.architecture or arch
    if weights is None:
        return default
    spec = str(weights)
    candidates = [c for c in pretrained_cfgs_of(arch) if _source_matches(c.source, spec)]
    if candidates:
        effective = dict(model_kwargs or {})
        return next((c for c in candidates if _agrees(c, effective)), candidates[0])
    # weights outside the table (a file, another hub repository): the architecture's transforms, that source
    return default.replace(
        tag=None,
        source=spec,
        url=None,
        file=None,
        hf_hub_id=None,
        license=None,
        metrics={},
        conversion=None,
        model_args={},
        recipe=None,
        description=None,
        notes=None,
    )


# ------------------------------------------------------------------------------------------------
# The builder helper

FEATURE_CLASSES = ("getter",)


def build_model(
    cls: Callable[..., nn.Module],
    arch: str,
    defaults: Mapping[str, Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    base_cfg: PretrainedCfg | Mapping[str, Any] | None = None,
    fixed_args: Sequence[str] = (),
) -> nn.Module:
    """Build ``cls`` for the registered architecture ``arch`` as timm's ``build_model_with_cfg`` does.

    Keyword arguments: the builder's ``defaults`` < the tag's ``model_args`` < what zoo weights given as
    ``weights=`` record (a ``save_pretrained`` folder or file, an ``hf-hub:`` repository written by it, a
    LightningCLI checkpoint: all their constructor arguments when they record this same class, else their head) <
    the caller's ``kwargs``; a caller's argument that differs from the recorded one wins with a warning (the weights
    then compute another function), except for those that do not change it (the class's ``same_function_args`` and
    ``init_only_args``: ``memory``, dropout rates, the head ...). Handles ``pretrained_cfg`` (a cfg, mapping or tag;
    :func:`zoo.create_model` passes the cfg of ``"arch.tag"``; one that names other weights than ``weights=`` is an
    error), ``pretrained_cfg_overlay`` (fields that replace the cfg's; with ``pretrained=True`` its ``file``, or a
    ``state_dict`` of tensors, is loaded instead of ``source``, as in timm), ``pretrained=True`` (the weights of the
    cfg's ``source``; without a tag the default tag's), ``weights=`` (any source zoo reads; a torchvision name or
    hub id of a table entry makes that entry the model's cfg), the head the weights hold (a zoo file records it; a
    table entry has ``num_classes``) unless ``num_classes`` is given, ``num_classes=0`` (pooled features, no
    classifier) and ``global_pool=''`` (unpooled) passed to the model, and ``features_only=True`` (with
    ``out_indices``, ``feature_cls="getter"``, ``output_fmt``, ``norm``): a timm
    :class:`~timm.models.FeatureGetterNet` over the model's ``forward_intermediates``, with ``feature_info``.

    Sets ``model.pretrained_cfg`` (a dict in timm's keys, alias ``default_cfg``) to the cfg of the model AS BUILT:
    ``num_classes`` is the model's, and a model's ``pretrained_cfg_as_built(cfg: dict) -> dict`` hook, when it has
    one, corrects what its arguments changed (e.g. the ``input_size`` of a ViT built at another image size).

    Args:
        cls: the model class (or any callable returning the model) to build.
        arch: the registered architecture name.
        defaults: the builder's keyword arguments for ``arch``.
        kwargs: the caller's keyword arguments (including ``pretrained_cfg``, ``pretrained_cfg_overlay``,
            ``features_only`` and its options).
        pretrained: whether to load the weights of the cfg (its ``file`` when set, else its ``source``).
        weights: weights to load (a file, a ``save_pretrained`` folder, ``"hf-hub:org/name"``, a torchvision weight
            name); None for none.
        base_cfg: the family's cfg for an architecture without registered tags.
        fixed_args: the names of ``defaults`` that the builder's name fixes (``layers`` of ``resnet18``): zoo
            weights recording other values of them are a ZooError (another architecture), not adopted.
    """
    from zoo.hub import checkpoint_reads

    with checkpoint_reads():  # the weights file is read once, however many of its records the build asks for
        return _build_model(cls, arch, defaults, kwargs, pretrained, weights, base_cfg, fixed_args)


def _build_model(
    cls: Callable[..., nn.Module],
    arch: str,
    defaults: Mapping[str, Any] | None,
    kwargs: Mapping[str, Any] | None,
    pretrained: bool,
    weights: str | os.PathLike | None,
    base_cfg: PretrainedCfg | Mapping[str, Any] | None,
    fixed_args: Sequence[str],
) -> nn.Module:
    from zoo.hub import (
        build_checked,
        is_user_weights_file,
        load_state_dict,
        read_weights,
        recorded_hparams,
        recorded_num_classes,
    )

    kw = dict(kwargs or {})
    cfg_arg = kw.pop("pretrained_cfg", None)
    overlay = _overlay(kw.pop("pretrained_cfg_overlay", None), arch)
    overlay_state_dict = overlay.pop("state_dict", None)
    features_only = kw.pop("features_only", False)
    feature_cfg = {k: kw.pop(k) for k in ("out_indices", "feature_cls", "output_fmt", "norm") if k in kw}
    if feature_cfg and not features_only:
        raise ZooError(f"{', '.join(feature_cfg)} only apply with features_only=True (a feature extractor)")
    if not isinstance(pretrained, bool):
        hint = " (weights are given by keyword: weights=...)" if isinstance(pretrained, (str, os.PathLike)) else ""
        raise ZooError(f"pretrained must be True or False, got {pretrained!r}{hint}")
    if weights is not None and (overlay_state_dict is not None or overlay.get("file") not in (None, str(weights))):
        raise ZooError(
            f"weights={str(weights)!r} and pretrained_cfg_overlay's {'state_dict' if overlay_state_dict else 'file'} "
            "both name weights to load; give one (the overlay's with pretrained=True, as in timm, or weights=)"
        )
    merged = {**dict(defaults or {}), **kw}
    effective = {**_signature_defaults(cls), **merged}
    cfg = resolve_pretrained_cfg(arch, cfg_arg, weights, base_cfg, effective)
    if overlay:
        cfg = cfg.replace(**overlay)
        if weights is not None and "source" in overlay:
            _check_same_weights(arch, cfg, str(weights))
    # the tag's model arguments; the caller's own win (timm's rule), and then the tag's claims no longer hold
    for k, v in cfg.model_args.items():
        if k not in kw:
            merged[k] = v
    # zoo weights of this very class: the constructor arguments they record define their function
    recorded = _recorded_weights(cls, str(weights)) if weights is not None else None
    if recorded is not None:
        _adopt_recorded(cls, arch, recorded[0], merged, kw, str(weights), _fixed(defaults, fixed_args))
    effective = {**_signature_defaults(cls), **merged}
    if not _agrees(cfg, effective):
        differ = {k: effective.get(k) for k, v in cfg.model_args.items() if effective.get(k) != v}
        cfg = cfg.replace(
            conversion=None,
            metrics={k: m for k, m in cfg.metrics.items() if m["of"] == "source"},
            notes=(
                *(cfg.notes or ()),
                f"built with {differ}, not the tag's {cfg.model_args}: the tag's conversion "
                "and model metrics do not apply",
            ),
        )
    source = weights
    if source is None and pretrained:
        if overlay_state_dict is None and not cfg.has_weights and cfg.tag is None:
            raise ZooError(
                f"{arch} has no pretrained weights (no tag in zoo.list_pretrained({arch!r})); build it "
                "without pretrained=True, or give weights=... (a file, a save_pretrained folder, "
                "'hf-hub:org/name')"
            )
        if overlay_state_dict is None and not cfg.has_weights:
            hint = f"; train it with the recipe {cfg.recipe!r}" if cfg.recipe else ""
            raise ZooError(
                f"{cfg.name or arch} is a published configuration without weights, so pretrained=True "
                f"has nothing to load{hint}; build it without pretrained=True, or name a tag with weights "
                f"(zoo.list_pretrained({arch!r}, has_weights=True))"
            )
        source = cfg.file if cfg.file is not None else cfg.source
        if cfg.file is not None and not Path(cfg.file).expanduser().exists():
            raise ZooError(
                f"pretrained cfg file {cfg.file!r} of {cfg.name or arch} does not exist: give the path of a local "
                "copy of the weights (a file or a save_pretrained folder) in pretrained_cfg_overlay=dict(file=...)"
            )
    # pretrained=True with the overlay's state_dict or a cfg's file: timm's offline loading, those are the weights
    from_overlay = pretrained and weights is None and (overlay_state_dict is not None or cfg.file is not None)
    if from_overlay and overlay_state_dict is not None:
        source = None
    if "num_classes" not in kw:  # the head the weights hold (timm's rule)
        found = recorded_num_classes(source) if source is not None and (weights is not None or from_overlay) else None
        if found is not None:
            merged["num_classes"] = found
            # and its pooling (a zoo file saved after reset_classifier(0, '') holds the unpooled model)
            pool = (recorded_hparams(str(source)) or {}).get("global_pool")
            if isinstance(pool, str) and "global_pool" not in kw and "global_pool" in effective:
                merged["global_pool"] = pool
        elif from_overlay:  # the tag's weights, kept locally: the tag's head (or the overlay's num_classes)
            if cfg.tag is not None or "num_classes" in overlay:
                merged["num_classes"] = cfg.num_classes
        elif source is not None and _source_matches(cfg.source, str(source)):
            merged["num_classes"] = cfg.num_classes

    state_dict, source_hparams, where = None, None, str(source)
    if from_overlay and overlay_state_dict is not None:
        state_dict, where = _tensor_mapping(overlay_state_dict), "pretrained_cfg_overlay's state_dict"
    elif recorded is not None:  # the file's arguments are checked against its tensors before anything is allocated
        _, state_dict, source_hparams = recorded
    if recorded is not None:
        model = build_checked(cls, merged, _specs(state_dict, cfg, merged), where, source_hparams)
    else:
        model = cls(**merged)
    if state_dict is None and source is not None:
        state_dict, source_hparams = read_weights(source, model)
    if state_dict is not None:
        own = model.state_dict()
        if cfg.classifier:  # a model built without the head (num_classes=0) leaves the source's head out
            head = _head_prefixes(cfg)
            state_dict = {k: v for k, v in state_dict.items() if not (k.startswith(head) and k not in own)}
        load_state_dict(
            model,
            state_dict,
            source_hparams=source_hparams,
            source=where,
            from_local_file=is_user_weights_file(weights),
        )

    as_built = cfg.to_dict()
    as_built["num_classes"] = int(getattr(model, "num_classes", as_built.get("num_classes", 0)))
    hook = getattr(model, "pretrained_cfg_as_built", None)
    if callable(hook):
        as_built = hook(as_built)
    model.pretrained_cfg = as_built
    model.default_cfg = model.pretrained_cfg
    if weights is not None and cfg_arg is None and not overlay:  # zoo weights describe themselves (timm's rule)
        from zoo.hub import recorded_pretrained_cfg, restore_pretrained_cfg

        stored = recorded_pretrained_cfg(str(weights))
        if stored is not None:
            restore_pretrained_cfg(model, stored)
    if features_only:
        model = _feature_extractor(model, feature_cfg)
    return model


def _overlay(value: Any, arch: str) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` as a dict of cfg fields (and timm's ``state_dict``); one ZooError otherwise."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ZooError(
            f"pretrained_cfg_overlay of {arch} must be a mapping of pretrained cfg fields, got {type(value).__name__}"
        )
    unknown = sorted(set(value) - _CFG_FIELDS - {"state_dict"})
    if unknown:
        raise ZooError(
            f"pretrained_cfg_overlay of {arch}: unknown fields {unknown}; the fields are "
            f"{sorted(_CFG_FIELDS | {'state_dict'})}"
        )
    out = dict(value)
    if out.get("file") is not None:
        if not isinstance(out["file"], (str, os.PathLike)):
            raise ZooError(f"pretrained_cfg_overlay of {arch}: file must be a path, got {type(out['file']).__name__}")
        out["file"] = str(out["file"])
    return out


def _tensor_mapping(value: Any) -> dict[str, Any]:
    import torch

    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise ZooError(
            "pretrained_cfg_overlay's state_dict must map parameter names to tensors (a model's state_dict()), "
            f"got {type(value).__name__}"
        )
    return dict(value)


def _head_prefixes(cfg: PretrainedCfg) -> tuple[str, ...]:
    return tuple(f"{c}." for c in ([cfg.classifier] if isinstance(cfg.classifier, str) else cfg.classifier))


def _specs(state_dict: Mapping[str, Any], cfg: PretrainedCfg, merged: Mapping[str, Any]) -> dict[str, Any]:
    """``(shape, dtype)`` of the tensors a build with ``merged`` must hold (no head for ``num_classes=0``)."""
    head = _head_prefixes(cfg) if cfg.classifier and merged.get("num_classes") == 0 else ()
    return {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items() if not (head and k.startswith(head))}


def _recorded_class(spec: str) -> type | None:
    """The registered zoo class that the weights ``spec`` name (``save_pretrained``'s class path, LightningCLI's
    ``_class_path``); None when they name none, or one that is not registered."""
    from zoo.hub import recorded_config
    from zoo.registry import model_class

    class_path = (recorded_config(spec) or {}).get("class_path")
    try:
        return model_class(class_path) if class_path is not None else None
    except ZooError:
        return None


def _recorded_weights(
    cls: Callable[..., Any], spec: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None] | None:
    """``(init_args, state_dict, source_hparams)`` of the weights ``spec`` when they record ``cls`` itself: the
    constructor arguments checked as ``from_pretrained`` checks them (signature, types, integers bounded by the
    file's tensors); None for weights that record none or another class (whose arguments do not apply: the weights
    are converted)."""
    from zoo.hub import check_recorded_init_args, read_weights, recorded_hparams

    init_args = recorded_hparams(spec)
    if not init_args or not isinstance(cls, type) or _recorded_class(spec) is not cls:
        return None
    state_dict, source_hparams = read_weights(spec)
    largest = max((v.numel() for v in state_dict.values()), default=0)
    return check_recorded_init_args(cls, init_args, spec, largest), state_dict, source_hparams


def _fixed(defaults: Mapping[str, Any] | None, fixed_args: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in (defaults or {}).items() if k in fixed_args}


def builder_args_with_recorded(
    cls: type,
    arch: str,
    weights: str | os.PathLike,
    defaults: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    fixed_args: Sequence[str] = (),
) -> dict[str, Any]:
    """The keyword arguments a builder of ``arch`` that does not go through :func:`build_model` passes to ``cls``:
    its ``defaults`` < what zoo ``weights`` record when they record ``cls`` itself < the caller's ``kwargs``, with
    :func:`build_model`'s warning (a caller's argument that changes the function the weights compute) and error
    (weights recording other values of ``fixed_args``, the arguments the builder's name fixes).

    Args:
        cls: the model class.
        arch: the registered architecture name.
        weights: the weights the builder loads (any source zoo reads; weights that record no zoo class add nothing).
        defaults: the builder's keyword arguments for ``arch``.
        kwargs: the caller's keyword arguments.
        fixed_args: the names of ``defaults`` that the builder's name fixes.
    """
    from zoo.hub import checkpoint_reads

    merged = {**defaults, **kwargs}
    with checkpoint_reads():  # the weights file is read once
        recorded = _recorded_weights(cls, str(weights))
    if recorded is not None:
        _adopt_recorded(cls, arch, recorded[0], merged, kwargs, str(weights), _fixed(defaults, fixed_args))
    return merged


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (a file records JSON), for comparing a caller's argument with a recorded one."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _adopt_recorded(
    cls: type,
    arch: str,
    recorded: Mapping[str, Any],
    merged: dict[str, Any],
    given: Mapping[str, Any],
    source: str,
    builder_args: Mapping[str, Any],
) -> None:
    """Fill ``merged`` with the ``recorded`` arguments the caller did not give; warn once for the ones the caller gave
    otherwise that change the function the weights compute. A recorded argument that differs from one the builder's
    name fixes (``builder_args``: ``layers`` of ``resnet18``) is a ZooError: the weights are of another architecture
    than the builder's name says. Which arguments leave the function alone is the class's knowledge
    (``same_function_args``, ``init_only_args``: see :class:`zoo.hub.HubMixin`)."""
    unchanged = frozenset(getattr(cls, "same_function_args", ())) | frozenset(getattr(cls, "init_only_args", ()))
    differ, other_arch = [], []
    for k, v in recorded.items():
        changes_function = k not in unchanged
        if k not in given:
            if k in builder_args and changes_function and _plain(builder_args[k]) != _plain(v):
                other_arch.append(f"{k}={_plain(v)!r} (the builder's: {_plain(builder_args[k])!r})")
            merged[k] = v
        elif changes_function and _plain(given[k]) != _plain(v):
            differ.append(f"{k}={given[k]!r} (recorded: {v!r})")
    if other_arch:
        raise ZooError(
            f"the weights {source} were saved with {', '.join(other_arch)}: another architecture than {arch}; load "
            f"them with zoo.from_pretrained({source!r}), which builds what was saved"
        )
    if differ:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"zoo: {arch} built with {', '.join(differ)} as asked, but the weights {source} were saved with the "
            "recorded values, so they now compute another function; leave those arguments out to build what was "
            "saved (zoo.from_pretrained does the same)"
        )


def _feature_extractor(model: nn.Module, feature_cfg: dict[str, Any]) -> nn.Module:
    from timm.models._features import FeatureGetterNet

    feature_cls = feature_cfg.pop("feature_cls", "getter")
    if not (feature_cls == "getter" or (isinstance(feature_cls, type) and issubclass(feature_cls, FeatureGetterNet))):
        raise ZooError(
            f"feature_cls must be 'getter' (timm's FeatureGetterNet over forward_intermediates), got "
            f"{feature_cls!r}: zoo's stages are residual stacks, not the module sequence timm's "
            "hook-based extractors walk"
        )
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise ZooError(
            f"{type(model).__name__} has no forward_intermediates / feature_info, so features_only=True "
            "cannot build a feature extractor"
        )
    feature_cls = FeatureGetterNet if isinstance(feature_cls, str) else feature_cls
    out_indices = feature_cfg.pop("out_indices", tuple(range(len(model.feature_info))))
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("num_classes", "classifier", "global_pool")}
    extractor = feature_cls(model, out_indices=out_indices, **feature_cfg)
    extractor.pretrained_cfg = cfg
    extractor.default_cfg = extractor.pretrained_cfg
    return extractor
