"""Conversion targets of the ResNet family: ``"resnet"``, ``"depth_scaled"``, ``"heun"``, ``"momentum"``.

ResNet targets (family ``"resnet"``: torchvision and timm ResNets; the source block computes
relu(x + g(x))):

- ``"resnet"``: :class:`zoo.models.ResNet`, scale 1: the same block relu(x + g(x)), identical function.
- ``"depth_scaled"``: :class:`zoo.models.DepthScaledResNet`: each stage of N residual blocks computes
  x_{n+1} = relu(x_n + h g'(x_n)) with h = 1/N and g' = g/h (the last BatchNorm's weight and bias of
  every residual branch multiplied by N), i.e. exactly the source function.
- ``"heun"``: :class:`zoo.models.HeunNet` initialised from the same folded weights (h = 1/N, Heun's
  rule): a different function, a starting point for fine-tuning.
- ``"momentum"``: :class:`zoo.models.MomentumResNet` with the same (unfolded) weights, the momentum
  rule (M1) v_{n+1} = gamma v_n + (1 - gamma) f(x_n), x_{n+1} = x_n + v_{n+1} on
  the residual function f(x) = relu(x + g(x)) - x of every residual block; the first block of every
  stage stays an ordinary block, also where it keeps the shape (``layer1`` of ResNet-18/34), as in the
  published Momentum ResNets (``momentumnet.transform_to_momentumnet(..., keep_first_layer=True)``);
  ``keep_first_block=False`` puts such a block in the momentum stack. gamma = 0 (``memory="full"``) is the source
  function; the defaults gamma = 0.9, ``memory="reversible"`` (exact rebuild in backward, needs
  0 < gamma < 1) give a different function, the one ``zoo.momentum_resnet50(weights=...)`` builds
  from the same weights. Options: ``gamma``, ``init_velocity``, ``keep_first_block`` and the ResNet options.

The family's description :class:`ResNetSpec` and the helpers of its source files (:func:`resnet_spec`,
:func:`read_resnet_stages`, :func:`check_resnet_layout`, :func:`build_resnet`) live here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

import zoo.hub
from converters.registry import (
    IMAGE_TRAINING_OPTIONS,
    _class_name,
    classifier_size,
    register_target,
    source_device_dtype,
)
from zoo.errors import ZooError
from zoo.models import DepthScaledResNet, HeunNet, MomentumResNet, ResNet

__all__ = [
    "MOMENTUM_OPTIONS",
    "RESNET_OPTIONS",
    "ResNetSpec",
    "build_resnet",
    "check_resnet_layout",
    "read_resnet_stages",
    "resnet_spec",
]


@dataclass
class ResNetSpec:
    """A plain post-activation ResNet read from a source library (torchvision layout and names).

    ``state_dict`` and ``modules`` use the zoo's (torchvision's) names; the source file maps any
    name that differs. ``label`` names the source in messages.

    Fields:
        label: the source's name in messages.
        block: ``"basic"`` or ``"bottleneck"``, the source's block type.
        layers: the number of blocks of each stage.
        num_classes: the size of the source's classifier.
        in_chans: the source's input channels.
        state_dict: the source's weights, by zoo name.
        modules: the source's modules, by zoo name.
        device: the device of the source's tensors.
        dtype: the floating dtype of the source's tensors.
        constructor: further zoo constructor arguments the source implies (``drop_rate`` ...).
    """

    label: str
    block: str
    layers: tuple[int, ...]
    num_classes: int
    in_chans: int
    state_dict: dict[str, torch.Tensor]
    modules: dict[str, nn.Module]
    device: torch.device
    dtype: torch.dtype
    constructor: dict[str, Any] = field(default_factory=dict)  # extra zoo arguments (drop_rate ...)


def resnet_spec(
    model: nn.Module,
    label: str,
    block: str,
    layers: tuple[int, ...],
    rename: Callable[[str], str] = str,
    constructor: dict[str, Any] | None = None,
) -> ResNetSpec:
    """The :class:`ResNetSpec` of a checked source: its weights and modules under the zoo's names
    (``rename`` maps a source name), classifier size, input channels, device and dtype.

    Args:
        model: the source ResNet (its classifier is ``model.fc``, its stem ``model.conv1``).
        label: the source's name in messages.
        block: ``"basic"`` or ``"bottleneck"``, as :func:`read_resnet_stages` found.
        layers: the number of blocks of each stage.
        rename: maps a source parameter or module name to the zoo's.
        constructor: further zoo constructor arguments the source implies; None for none.
    """
    device, dtype = source_device_dtype(model, label)
    return ResNetSpec(
        label=label,
        block=block,
        layers=layers,
        num_classes=classifier_size(model, label),
        in_chans=model.conv1.in_channels,
        state_dict={rename(k): v for k, v in model.state_dict().items()},
        modules={rename(k): m for k, m in model.named_modules()},
        device=device,
        dtype=dtype,
        constructor=dict(constructor or {}),
    )


RESNET_OPTIONS: tuple[str, ...] = ("memory", "drop_rate", "drop_path_rate", *IMAGE_TRAINING_OPTIONS)


def read_resnet_stages(model: nn.Module, label: str, block_kinds: Mapping[type, str]) -> tuple[str, tuple[int, ...]]:
    """``(block, layers)`` of a torchvision-layout ResNet whose stages are ``layer1`` .. ``layerK``.

    ``block_kinds`` maps the library's block classes to ``"basic"`` / ``"bottleneck"``; blocks of
    other classes (subclasses included: they may change the forward) are rejected. ``model`` is the source,
    ``label`` its name in messages.
    """
    layers, kinds = [], set()
    i = 1
    while isinstance(getattr(model, f"layer{i}", None), nn.Module):
        stage = getattr(model, f"layer{i}")
        if not isinstance(stage, nn.Sequential) or len(stage) == 0:
            raise ZooError(
                f"{label}: layer{i} is a {type(stage).__name__} of {len(list(stage.children()))} "
                "modules, expected a non-empty nn.Sequential of residual blocks"
            )
        for j, block in enumerate(stage):
            kind = block_kinds.get(type(block))
            if kind is None:
                names = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in block_kinds)
                raise ZooError(f"{label}: block layer{i}.{j} is a {_class_name(block)}; supported blocks are {names}")
            kinds.add(kind)
        layers.append(len(stage))
        i += 1
    if not layers:
        raise ZooError(f"{label} has no stages layer1, layer2, ...: not a ResNet layout")
    if len(kinds) > 1:
        raise ZooError(f"{label} mixes basic and bottleneck blocks; the zoo ResNet uses one block type")
    return kinds.pop(), tuple(layers)


_LAYOUT_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ),
    nn.BatchNorm2d: ("num_features", "eps", "affine", "track_running_stats"),
    nn.Linear: ("in_features", "out_features"),
}


def check_resnet_layout(modules: Mapping[str, nn.Module], model: nn.Module, label: str) -> None:
    """ZooError unless every conv / BN / linear layer of the source has the zoo model's hyperparameters.

    A safety net behind the source files' explicit checks: widths, groups, dilation, extra layers
    with weights (attention, deep stems) all show up here.

    Args:
        modules: the source's modules, by zoo name (:attr:`ResNetSpec.modules`).
        model: the zoo model built for the source.
        label: the source's name in messages.
    """
    own = dict(model.named_modules())
    problems = []
    for name, mine in own.items():
        attrs = _LAYOUT_ATTRS.get(type(mine))
        if attrs is None:
            continue
        theirs = modules.get(name)
        if theirs is None:
            problems.append(f"{name} is missing")
            continue
        if type(theirs) is not type(mine):
            problems.append(f"{name} is a {type(theirs).__name__}, the zoo ResNet has a {type(mine).__name__}")
            continue
        diffs = [
            f"{a}={getattr(theirs, a)!r} (zoo: {getattr(mine, a)!r})"
            for a in attrs
            if getattr(theirs, a) != getattr(mine, a)
        ]
        if getattr(mine, "bias", None) is None and getattr(theirs, "bias", None) is not None:
            diffs.append("has a bias (zoo: none)")
        elif getattr(mine, "bias", None) is not None and getattr(theirs, "bias", None) is None:
            diffs.append("has no bias (zoo: one)")
        if diffs:
            problems.append(f"{name} {', '.join(diffs)}")
    for name, theirs in modules.items():
        if (
            name
            and name not in own
            and (
                any(True for _ in theirs.parameters(recurse=False)) or any(True for _ in theirs.buffers(recurse=False))
            )
        ):
            problems.append(f"{name} ({type(theirs).__name__}) has no counterpart in the zoo ResNet")
    if problems:
        more = f" ... ({len(problems)} in all)" if len(problems) > 5 else ""
        raise ZooError(
            f"{label} does not have the standard ResNet layout the zoo reproduces: {'; '.join(problems[:5])}{more}"
        )


def build_resnet(cls: type[ResNet], spec: ResNetSpec, options: dict[str, Any]) -> ResNet:
    """Build ``cls`` with the source's architecture and load its weights, folding the depth factor.

    Args:
        cls: the zoo ResNet family to build (``ResNet``, ``DepthScaledResNet`` ...).
        spec: the source, read by its source file.
        options: further constructor arguments given to ``transform`` (``memory``, training settings ...).
    """
    kwargs = {
        "layers": spec.layers,
        "block": spec.block,
        "num_classes": spec.num_classes,
        "in_chans": spec.in_chans,
        **spec.constructor,
        **options,
    }
    model = cls(**kwargs)
    check_resnet_layout(spec.modules, model, spec.label)
    model.to(device=spec.device, dtype=spec.dtype)
    zoo.hub.load_state_dict(model, spec.state_dict, source_hparams=None, source=spec.label)
    if _channels_last(spec.state_dict):  # the source's memory format too (model.to(memory_format=...) was called)
        model.to(memory_format=torch.channels_last)
    return model


def _channels_last(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the source's convolution weights are channels-last (strides NHWC, not NCHW)."""
    convs = [v for v in state_dict.values() if v.ndim == 4 and v.shape[1] > 1 and v.shape[2] * v.shape[3] > 1]
    return bool(convs) and all(
        v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous() for v in convs
    )


@register_target("resnet", "resnet", RESNET_OPTIONS, "zoo ResNet, scale 1: the same function")
def _to_resnet(spec: ResNetSpec, options: dict[str, Any]) -> ResNet:
    return build_resnet(ResNet, spec, options)


@register_target(
    "depth_scaled",
    "resnet",
    RESNET_OPTIONS,
    "zoo DepthScaledResNet x + f(x)/N, the 1/N folded into the last BN: the same function",
)
def _to_depth_scaled(spec: ResNetSpec, options: dict[str, Any]) -> ResNet:
    return build_resnet(DepthScaledResNet, spec, options)


@register_target(
    "heun", "resnet", RESNET_OPTIONS, "zoo HeunNet (H1) from the same folded weights: not function preserving"
)
def _to_heun(spec: ResNetSpec, options: dict[str, Any]) -> ResNet:
    return build_resnet(HeunNet, spec, options)


MOMENTUM_OPTIONS: tuple[str, ...] = ("gamma", "init_velocity", "keep_first_block", "stored_blocks", "fixed_point_bits")


@register_target(
    "momentum",
    "resnet",
    (*RESNET_OPTIONS, *MOMENTUM_OPTIONS),
    "zoo MomentumResNet (M1) with f(x) = relu(x + g(x)) - x: gamma = 0 is the same function",
)
def _to_momentum_resnet(spec: ResNetSpec, options: dict[str, Any]) -> ResNet:
    return build_resnet(MomentumResNet, spec, options)
