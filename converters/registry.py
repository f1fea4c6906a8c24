"""The conversion registries, :func:`transform`, and the helpers every target family shares.

A conversion is a *target* (``to=...``, :func:`register_target`: one builder per source family, the family
modules ``converters/*_targets.py``) applied to a *source* (:func:`register_source`: the source-library files
``converters/torchvision.py``, ``converters/timm.py``, ``converters/torch.py``, ``converters/fairseq.py``, imported
on first use). The shared helpers: :func:`source_device_dtype`, :func:`describe_module`, :func:`classifier_size`,
``TRAINING_OPTIONS`` (``IMAGE_TRAINING_OPTIONS`` for image classifiers). Import names from :mod:`converters`, which
registers every target.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from zoo.errors import ZooError
from zoo.pretrained import DATA_CONFIG_KEYS

if TYPE_CHECKING:
    from converters.moe_targets import MLPSpec
    from converters.sinkhorn_targets import AttentionSpec

__all__ = [
    "IMAGE_TRAINING_OPTIONS",
    "TRAINING_OPTIONS",
    "FamilyBuild",
    "Source",
    "Target",
    "classifier_size",
    "describe_module",
    "list_sources",
    "list_targets",
    "register_source",
    "register_target",
    "source_device_dtype",
    "transform",
]

# Source libraries, imported on first use (each registers its sources).
_SOURCE_MODULES = ("converters.torchvision", "converters.timm", "converters.torch", "converters.fairseq")


# ------------------------------------------------------------------------------------------------
# Registries


@dataclass(frozen=True)
class FamilyBuild:
    """How one target builds from one source family: ``build(spec, options) -> model``.

    Args:
        family: the source family (``"resnet"``, ``"transformer"`` ...).
        build: the builder, ``build(spec, options) -> model``.
        options: the options ``transform`` accepts for this family.
        summary: a one-line description of the conversion, for listings.
    """

    family: str
    build: Callable[[Any, dict[str, Any]], nn.Module]
    options: tuple[str, ...]
    summary: str = ""


@dataclass(frozen=True)
class Target:
    """A conversion target: one builder per source family it serves (``builds``: family -> FamilyBuild),
    in registration order. ``"momentum"`` serves ``"resnet"`` and ``"transformer"``; most serve one. ``name`` is
    the target's name, as ``transform(..., to=name)`` spells it."""

    name: str
    builds: Mapping[str, FamilyBuild]

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.builds)

    @property
    def family(self) -> str:
        """The first family (the only one for single-family targets)."""
        return next(iter(self.builds))

    @property
    def build(self) -> Callable[[Any, dict[str, Any]], nn.Module]:
        """The first family's builder (the only one for single-family targets)."""
        return self.builds[self.family].build

    @property
    def options(self) -> tuple[str, ...]:
        """Every option of any family, each once (a family checks its own list)."""
        return tuple(dict.fromkeys(o for b in self.builds.values() for o in b.options))

    @property
    def summary(self) -> str:
        return "; ".join(
            f"{b.family}: {b.summary}" if len(self.builds) > 1 else b.summary for b in self.builds.values() if b.summary
        )


@dataclass(frozen=True)
class Source:
    """A source model type: ``matches(model)`` detects it, ``read(model)`` describes it (or raises ZooError).

    Args:
        name: the source type's name, as :func:`list_sources` lists it.
        family: the source family whose targets' builders take ``read``'s description.
        matches: whether a model is of this type.
        read: the model's description (a spec) for the family's builders.
    """

    name: str
    family: str
    matches: Callable[[nn.Module], bool]
    read: Callable[[nn.Module], Any]


_TARGETS: dict[str, Target] = {}
_SOURCES: dict[str, dict[str, Source]] = {}
_loaded = False


def register_target(name: str, family: str, options: tuple[str, ...], summary: str = ""):
    """Decorator registering ``build(spec, options) -> model`` as target ``name`` for a source family.

    Registering the same name for another family adds that family to the target (one name, a
    builder per family); registering a second builder for the same name and family is an error.

    Args:
        name: the target's name (``transform(..., to=name)``).
        family: the source family the builder serves.
        options: the options ``transform`` accepts for this family.
        summary: a one-line description of the conversion, for listings.
    """

    def deco(build: Callable[[Any, dict[str, Any]], nn.Module]):
        target = _TARGETS.get(name)
        builds = dict(target.builds) if target is not None else {}
        if family in builds and builds[family].build is not build:
            raise ZooError(f"a conversion target named {name!r} is already registered for family {family!r}")
        builds[family] = FamilyBuild(family, build, tuple(options), summary)
        _TARGETS[name] = Target(name, MappingProxyType(builds))
        return build

    return deco


def register_source(name: str, family: str, matches: Callable[[nn.Module], bool]):
    """Decorator registering ``read(model) -> spec`` for the models ``matches`` accepts.

    Args:
        name: the source type's name, as :func:`list_sources` lists it.
        family: the source family whose targets' builders take the spec.
        matches: whether a model is of this type.
    """

    def deco(read: Callable[[nn.Module], Any]):
        _SOURCES.setdefault(family, {})[name] = Source(name, family, matches, read)
        return read

    return deco


def _load_sources() -> None:
    global _loaded
    if not _loaded:
        for module in _SOURCE_MODULES:
            importlib.import_module(module)
        _loaded = True


def _get_target(to: str) -> Target:
    if not isinstance(to, str) or to not in _TARGETS:
        raise ZooError(f"unknown conversion target {to!r}: supported targets are {', '.join(map(repr, _TARGETS))}")
    return _TARGETS[to]


def _target_sources(target: Target) -> dict[str, Source]:
    """The sources of every family the target serves, in the target's family order."""
    return {name: s for family in target.families for name, s in _SOURCES.get(family, {}).items()}


def list_targets() -> list[str]:
    """Names accepted by ``transform(..., to=...)``."""
    return list(_TARGETS)


def list_sources(to: str) -> list[str]:
    """The source model types ``transform`` converts to target ``to`` (of all the families it serves)."""
    _load_sources()
    return list(_target_sources(_get_target(to)))


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# how a zoo model becomes another target's variant: its saved weights into the target family's builder or class
_REBUILD_EXAMPLE = {
    "sinkhorn": "zoo.models.SinkformerViT(<its arguments>, n_iter=3, weights=path)",
    "moe": "zoo.models.VisionMoE(<its arguments>, weights=path)",
}


def _unwrap_hint(model: Any, to: str) -> str:
    """The fix for a source ``model`` inside a wrapper (``torch.compile``, ``DataParallel`` / DDP), or for a zoo
    model already (rebuilt as the target ``to`` from its saved weights); nothing otherwise."""
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return "; this is a torch.compile wrapper: convert the model inside, transform(model._orig_mod, ...)"
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "; this is a data-parallel wrapper: convert the model inside, transform(model.module, ...)"
    if type(model).__module__.startswith("zoo."):
        from zoo.models import ResNet

        if isinstance(model, ResNet) and to not in _REBUILD_EXAMPLE:
            example = f"zoo.{'' if to == 'resnet' else to + '_'}resnet50(weights=path)"
        elif not isinstance(model, ResNet) and to in _REBUILD_EXAMPLE:
            example = _REBUILD_EXAMPLE[to]
        else:
            return f"; this is a zoo {type(model).__name__} already, and zoo has no {to!r} variant of it"
        return (
            "; this is a zoo model already: save it (model.save_pretrained(path)) and build the variant from "
            f"its weights with the variant's builder or class, e.g. {example}"
        )
    return ""


def transform(model: nn.Module, to: str, **options: Any) -> nn.Module:
    """Convert ``model`` (a torchvision/timm ResNet, a timm ViT, a ``torch.nn.TransformerEncoder`` ...)
    into the zoo model ``to``.

    Args:
        model: the source model; it is left unchanged (weights are copied, not shared), except with
            ``to="sinkhorn", inplace=True``.
        to: a registered target (:func:`list_targets`): ``"resnet"``, ``"depth_scaled"``, ``"heun"``,
            ``"momentum"``, ``"sinkhorn"``. A target may serve several source families; the source's family picks
            the builder and the options it accepts.
        **options: target options, e.g. ``memory="adjoint"``, ``gamma=0.9``, ``drop_path_rate``, or any
            training setting of :class:`zoo.tasks.ImageClassifier` (``optimizer``, ``lr_scheduler`` callables,
            ``label_smoothing``). The architecture (``layers``, ``block``, ``num_classes``, ``in_chans``) is read
            from the source.

    Returns:
        the converted model, on the source's device and dtype and in its train/eval mode (a ResNet: in its
        memory format too, channels-last when the source's convolutions are).

    Raises:
        ZooError: unknown target, unsupported source type or variant, or unknown option.
    """
    target = _get_target(to)
    _load_sources()
    sources = _target_sources(target)
    source = next((s for s in sources.values() if s.matches(model)), None)
    if source is None:
        raise ZooError(
            f"cannot convert a {_class_name(model)} to {to!r}: supported sources for {to!r} are "
            f"{', '.join(sources) or 'none'}{_unwrap_hint(model, to)}"
        )
    how = target.builds[source.family]
    unknown = sorted(set(options) - set(how.options))
    if unknown:
        raise ZooError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for to={to!r} "
            f"from a {source.name}: accepted options are {', '.join(how.options)} "
            "(the architecture is read from the source model)"
        )
    spec = source.read(model)
    converted = how.build(spec, dict(options))
    from converters.resnet_targets import ResNetSpec  # here: the family module imports this one

    if isinstance(spec, ResNetSpec):  # other families copy the source whole: its state comes along
        _mirror_runtime_state(converted, model, spec.modules)
    if converted is not model:
        _carry_data_config(converted, model)
    return converted


def _carry_data_config(converted: nn.Module, source: nn.Module) -> None:
    """A zoo model built from a timm source takes the source's data config (input size, interpolation, crop,
    mean / std of its ``pretrained_cfg``), corrected to the model as built by its ``pretrained_cfg_as_built``:
    the converted model computes the source's function, so it needs the source's preprocessing."""
    theirs = getattr(source, "pretrained_cfg", None)
    hook = getattr(converted, "pretrained_cfg_as_built", None)
    mine = getattr(converted, "pretrained_cfg", None)
    if not (isinstance(theirs, Mapping) and isinstance(mine, Mapping) and callable(hook)):
        return
    cfg = {**mine, **{k: theirs[k] for k in DATA_CONFIG_KEYS if theirs.get(k) is not None}}
    converted.pretrained_cfg = hook(cfg)
    converted.default_cfg = converted.pretrained_cfg


# the training settings a converted LightningModule takes (zoo.tasks.ImageClassifier's injected factories and loss
# option); listed here, not read from the task's signature
TRAINING_OPTIONS: tuple[str, ...] = ("optimizer", "lr_scheduler", "label_smoothing")
# and those of an image classifier (zoo.tasks.ImageClassifier's layer-wise learning-rate decay, batch mixing and
# activation checkpointing)
IMAGE_TRAINING_OPTIONS: tuple[str, ...] = (
    *TRAINING_OPTIONS,
    "layer_decay",
    "mixup_alpha",
    "cutmix_alpha",
    "grad_checkpointing",
)


def source_device_dtype(model: nn.Module, label: str) -> tuple[torch.device, torch.dtype]:
    """The one device and floating dtype of the parameters and buffers of the source ``model`` (ZooError if
    mixed, naming the source by ``label``)."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    if not tensors:
        raise ZooError(f"{label} has no parameters to convert")
    devices = {t.device for t in tensors}
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if len(devices) > 1:
        raise ZooError(
            f"{label} is spread over several devices ({', '.join(map(str, devices))}): move it to one device first"
        )
    if len(dtypes) > 1:
        raise ZooError(f"{label} mixes dtypes ({', '.join(map(str, dtypes))}): cast it to one dtype first")
    return devices.pop(), dtypes.pop()


def describe_module(m: Any) -> str:
    """A one-line description of ``m``: the repr of a leaf module, the child types of a container, the repr of
    anything that is not a module."""
    if not isinstance(m, nn.Module):
        return repr(m)
    children = list(m.children())
    if not children:
        return " ".join(repr(m).split())
    return f"{type(m).__name__}({', '.join(type(c).__name__ for c in children)})"


def classifier_size(model: nn.Module, label: str, name: str = "fc") -> int:
    """``out_features`` of the source's ``nn.Linear`` classifier, 0 for a model without one (its classifier an
    ``nn.Identity``: timm's ``num_classes=0`` / ``reset_classifier(0)``, torchvision's ``fc = nn.Identity()``);
    ZooError for any other head.

    Args:
        model: the source model.
        label: the source's name in the error message.
        name: the attribute of ``model`` that holds the classifier.
    """
    fc = getattr(model, name, None)
    if type(fc) is nn.Identity:
        return 0
    if not isinstance(fc, nn.Linear):
        raise ZooError(
            f"{label}: the classifier {name} is {describe_module(fc)}, expected an nn.Linear or nn.Identity (a "
            "custom head is not supported: convert with an nn.Linear head, then replace the head)"
        )
    return fc.out_features


def _mirror_runtime_state(model: nn.Module, source: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Same train/eval mode (per module), BatchNorm momentum and requires_grad flags as the source."""
    model.train(source.training)
    for name, mine in model.named_modules():
        theirs = modules.get(name)
        if not name or theirs is None:
            continue
        mine.training = theirs.training
        if isinstance(mine, _BatchNorm) and isinstance(theirs, _BatchNorm):
            mine.momentum = theirs.momentum
    params = dict(source.named_parameters())
    for name, p in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        theirs = modules.get(prefix)
        tp = getattr(theirs, leaf, None) if theirs is not None else params.get(name)
        if isinstance(tp, nn.Parameter):
            p.requires_grad_(tp.requires_grad)


def _not_the_zoo_family(
    spec: AttentionSpec | MLPSpec,
    options: dict[str, Any],
    family: str,
    converts: str,
    returned: str,
    accepted: tuple[str, ...],
) -> None:
    """A source that does not map onto the zoo ViT ``family`` converts to itself: the family's own options are
    refused (one error naming why the source did not map), else an info line says why it did not map."""
    reason = f" ({spec.why_not})" if spec.why_not else ""
    if options:
        raise ZooError(
            f"option{'s' if len(options) > 1 else ''} {', '.join(map(repr, sorted(options)))} only apply when the "
            f"result is a zoo {family} (a timm VisionTransformer of the standard layout); {spec.label} converts "
            f"to itself {converts}{reason}: accepted options are {', '.join(accepted)}"
        )
    if spec.why_not:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"zoo: {spec.label} is not a {family} layout ({spec.why_not}): returning it with {returned}")
