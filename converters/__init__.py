"""Convert models of other libraries into zoo models: ``converters.transform(model, to=..., **options)``.

    >>> import torchvision, converters
    >>> net = torchvision.models.resnet50()
    >>> ode = converters.transform(net, to="depth_scaled")          # same function, x + f(x)/N
    >>> heun = converters.transform(net, to="heun", memory="adjoint")
    >>> mom = converters.transform(net, to="momentum", gamma=0.9)   # MomentumResNet, memory="reversible"

Two registries make a conversion:

- **targets** (``to=...``): what to build. A target serves one or more *families* of sources
  (``"resnet"``, ``"transformer"``) with one builder per family (:class:`Target` holds
  ``builds``: family -> :class:`FamilyBuild`, each with the options it accepts); the source's family
  picks the builder. Adding a target, or a family to a target, is a call to :func:`register_target`.
- **sources**: one file per source library (``converters/torchvision.py``, ``converters/timm.py``,
  ``converters/torch.py``) detects its model classes, checks that the instance has a layout the zoo
  reproduces exactly, and reads it into a family description (:class:`ResNetSpec` for ``"resnet"``,
  :class:`BlockStackSpec` for ``"transformer"``).

Converters only build the zoo model and move weights (through :func:`zoo.hub.load_state_dict`,
which folds the depth factor with the model's ``adapt_state_dict``); all forward logic stays in
``zoo``. The converted model is on the source's device and dtype, in the same train/eval mode
(per module, so a frozen BatchNorm stays in eval mode), with the same ``requires_grad`` flags; the
source is left unchanged (weights are copied, never shared).

ResNet targets (family ``"resnet"``: torchvision and timm ResNets; the source block computes
relu(x + g(x))):

- ``"resnet"``: :class:`zoo.models.ResNet`, scale 1: the same block relu(x + g(x)), identical function.
- ``"depth_scaled"``: :class:`zoo.models.DepthScaledResNet`: each stage of N residual blocks computes
  x_{n+1} = relu(x_n + h g'(x_n)) with h = 1/N and g' = g/h (the last BatchNorm's weight and bias of
  every residual branch multiplied by N), i.e. exactly the source function.
- ``"heun"``: :class:`zoo.models.HeunNet` initialised from the same folded weights (h = 1/N, Heun's
  rule, MATH.md section 2): a different function, a starting point for fine-tuning.
- ``"momentum"``: :class:`zoo.models.MomentumResNet` with the same (unfolded) weights, the momentum
  rule (M1, MATH.md section 4) v_{n+1} = gamma v_n + (1 - gamma) f(x_n), x_{n+1} = x_n + v_{n+1} on
  the residual function f(x) = relu(x + g(x)) - x of every residual block; the first block of every
  stage stays an ordinary block, also where it keeps the shape (``layer1`` of ResNet-18/34), as in the
  published Momentum ResNets (``momentumnet.transform_to_momentumnet(..., keep_first_layer=True)``);
  ``keep_first_block=False`` puts such a block in the momentum stack. gamma = 0 (``memory="full"``) is the source
  function; the defaults gamma = 0.9, ``memory="reversible"`` (exact rebuild in backward, needs
  0 < gamma < 1) give a different function, the one ``zoo.momentum_resnet50(weights=...)`` builds
  from the same weights. Options: ``gamma``, ``init_velocity``, ``keep_first_block`` and the ResNet options.

Transformer targets (family ``"transformer"``: ``torch.nn.TransformerEncoder``, a timm
``VisionTransformer``, or a timm ViT's ``blocks``; the source block computes block(x) = x + ...):

- ``"momentum"``: the blocks become a momentum :class:`zoo.nn.ResidualStack` of the residual
  functions f(x) = block(x, **kwargs) - x (:class:`zoo.nn.ResidualOf`), masks and other keyword
  arguments passed to every block; gamma = 0 (``memory="full"``) is the source function. A ViT
  comes back as a copy of itself (same class) with ``blocks`` replaced, an encoder as a
  :class:`zoo.nn.TransformerEncoderStack` with the encoder's call. Options: ``gamma`` (0.9),
  ``memory`` (``"reversible"``), ``init_velocity``.

Attention targets (family ``"attention"``: a timm ``VisionTransformer``, a torchvision
``VisionTransformer``, any module holding timm ``Attention`` or ``torch.nn.MultiheadAttention``):

- ``"sinkhorn"``: Sinkhorn attention (MATH.md section 5, S1): the attention matrix exp(q k^T / sqrt(d))
  normalised by ``n_iter`` alternating row / column normalisations (default 3) instead of one row
  softmax; ``n_iter=1`` is the source function. Every timm ``Attention`` becomes a
  :class:`zoo.nn.SinkhornAttention` and every ``nn.MultiheadAttention`` a
  :class:`zoo.nn.SinkhornMultiheadAttention` that take over the source module's own submodules and
  parameter tensors (no new parameters, same names, so the state dict still loads into the source
  architecture). A timm ``VisionTransformer`` of the standard layout (class token or average pooling,
  learned position embedding, timm ``Block``/``Attention``/``Mlp``, no register tokens) becomes the zoo
  :class:`zoo.models.SinkformerViT` LightningModule (trains with ``Trainer.fit``, saves with
  ``save_pretrained``, accepts the training settings ``optimizer``, ``lr_scheduler``, ``label_smoothing``); any
  other source comes back as itself (same class) with its attention swapped (an info line says why a ViT did not map).
  Copies: like every target, the source is left unchanged by default: the conversion works on a deep
  copy (the result's parameters are that copy's, moved by no further copy). ``inplace=True`` copies
  nothing: the swap happens in the source itself (which is returned), or the SinkformerViT is built
  on the source's very parameter tensors (training one trains the other). Options: ``n_iter``,
  ``record_stats`` (column-sum statistics, :func:`zoo.nn.attention_stats`), ``inplace``.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch as _torch  # not `torch`: the submodule converters.torch takes that name in this package
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

import zoo.hub
from zoo.errors import ZooError
from zoo.models import DepthScaledResNet, HeunNet, MomentumResNet, ResNet
from zoo.nn import ResidualOf, ResidualStack

__all__ = [
    "MOE_OPTIONS",
    "MOE_VIT_OPTIONS",
    "MOMENTUM_OPTIONS",
    "SINKHORN_OPTIONS",
    "SINKHORN_VIT_OPTIONS",
    "AttentionSpec",
    "RESNET_OPTIONS",
    "TRAINING_OPTIONS",
    "TRANSFORMER_OPTIONS",
    "BlockStackSpec",
    "FamilyBuild",
    "MLPSpec",
    "ResNetSpec",
    "Source",
    "Target",
    "check_resnet_layout",
    "build_resnet",
    "build_sinkformer_vit",
    "count_attention",
    "swap_attention",
    "classifier_size",
    "describe_module",
    "list_sources",
    "list_targets",
    "read_resnet_stages",
    "register_source",
    "register_target",
    "resnet_spec",
    "source_device_dtype",
    "transform",
]

# Source libraries, imported on first use (each registers its sources).
_SOURCE_MODULES = ("converters.torchvision", "converters.timm", "converters.torch", "converters.fairseq")


# ------------------------------------------------------------------------------------------------
# Registries


@dataclass(frozen=True)
class FamilyBuild:
    """How one target builds from one source family: ``build(spec, options) -> model``."""

    family: str
    build: Callable[[Any, dict[str, Any]], nn.Module]
    options: tuple[str, ...]
    summary: str = ""


@dataclass(frozen=True)
class Target:
    """A conversion target: one builder per source family it serves (``builds``: family -> FamilyBuild),
    in registration order. ``"momentum"`` serves ``"resnet"`` and ``"transformer"``; most serve one."""

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
        return "; ".join(f"{b.family}: {b.summary}" if len(self.builds) > 1 else b.summary
                         for b in self.builds.values() if b.summary)


@dataclass(frozen=True)
class Source:
    """A source model type: ``matches(model)`` detects it, ``read(model)`` describes it (or raises ZooError)."""

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
    """Decorator registering ``read(model) -> spec`` for the models ``matches`` accepts."""

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
        the converted model, on the source's device and dtype and in its train/eval mode.

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
            f"{', '.join(sources) or 'none'}"
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
    if isinstance(spec, ResNetSpec):  # other families copy the source whole: its state comes along
        _mirror_runtime_state(converted, model, spec.modules)
    return converted


# ------------------------------------------------------------------------------------------------
# The ResNet family


@dataclass
class ResNetSpec:
    """A plain post-activation ResNet read from a source library (torchvision layout and names).

    ``state_dict`` and ``modules`` use the zoo's (torchvision's) names; the source file maps any
    name that differs. ``label`` names the source in messages.
    """

    label: str
    block: str
    layers: tuple[int, ...]
    num_classes: int
    in_chans: int
    state_dict: dict[str, _torch.Tensor]
    modules: dict[str, nn.Module]
    device: _torch.device
    dtype: _torch.dtype
    constructor: dict[str, Any] = field(default_factory=dict)  # extra zoo arguments (drop_rate ...)


def resnet_spec(model: nn.Module, label: str, block: str, layers: tuple[int, ...],
                rename: Callable[[str], str] = str, constructor: dict[str, Any] | None = None) -> ResNetSpec:
    """The :class:`ResNetSpec` of a checked source: its weights and modules under the zoo's names
    (``rename`` maps a source name), classifier size, input channels, device and dtype."""
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


# the training settings a converted LightningModule takes (zoo.tasks.ImageClassifier's injected factories and loss
# option); listed here, not read from the task's signature
TRAINING_OPTIONS: tuple[str, ...] = ("optimizer", "lr_scheduler", "label_smoothing")


RESNET_OPTIONS: tuple[str, ...] = ("memory", "drop_rate", "drop_path_rate", *TRAINING_OPTIONS)


def source_device_dtype(model: nn.Module, label: str) -> tuple[_torch.device, _torch.dtype]:
    """The one device and floating dtype of a source's parameters and buffers (ZooError if mixed)."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    if not tensors:
        raise ZooError(f"{label} has no parameters to convert")
    devices = {t.device for t in tensors}
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if len(devices) > 1:
        raise ZooError(f"{label} is spread over several devices ({', '.join(map(str, devices))}): "
                       "move it to one device first")
    if len(dtypes) > 1:
        raise ZooError(f"{label} mixes dtypes ({', '.join(map(str, dtypes))}): cast it to one dtype first")
    return devices.pop(), dtypes.pop()


def read_resnet_stages(model: nn.Module, label: str, block_kinds: Mapping[type, str]) -> tuple[str, tuple[int, ...]]:
    """``(block, layers)`` of a torchvision-layout ResNet whose stages are ``layer1`` .. ``layerK``.

    ``block_kinds`` maps the library's block classes to ``"basic"`` / ``"bottleneck"``; blocks of
    other classes (subclasses included: they may change the forward) are rejected.
    """
    layers, kinds = [], set()
    i = 1
    while isinstance(getattr(model, f"layer{i}", None), nn.Module):
        stage = getattr(model, f"layer{i}")
        if not isinstance(stage, nn.Sequential) or len(stage) == 0:
            raise ZooError(f"{label}: layer{i} is a {type(stage).__name__} of {len(list(stage.children()))} "
                           "modules, expected a non-empty nn.Sequential of residual blocks")
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


def describe_module(m: Any) -> str:
    """A one-line description: the repr of a leaf module, the child types of a container."""
    if not isinstance(m, nn.Module):
        return repr(m)
    children = list(m.children())
    if not children:
        return " ".join(repr(m).split())
    return f"{type(m).__name__}({', '.join(type(c).__name__ for c in children)})"


def classifier_size(model: nn.Module, label: str, name: str = "fc") -> int:
    """``out_features`` of the source's ``nn.Linear`` classifier (ZooError for any other head)."""
    fc = getattr(model, name, None)
    if not isinstance(fc, nn.Linear):
        raise ZooError(
            f"{label}: the classifier {name} is {describe_module(fc)}, expected an nn.Linear (a model without "
            "a head, num_classes=0, or a custom head is not supported: convert first, then replace the head)"
        )
    return fc.out_features


_LAYOUT_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode"),
    nn.BatchNorm2d: ("num_features", "eps", "affine", "track_running_stats"),
    nn.Linear: ("in_features", "out_features"),
}


def check_resnet_layout(modules: Mapping[str, nn.Module], model: nn.Module, label: str) -> None:
    """ZooError unless every conv / BN / linear layer of the source has the zoo model's hyperparameters.

    A safety net behind the source files' explicit checks: widths, groups, dilation, extra layers
    with weights (attention, deep stems) all show up here.
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
        diffs = [f"{a}={getattr(theirs, a)!r} (zoo: {getattr(mine, a)!r})" for a in attrs
                 if getattr(theirs, a) != getattr(mine, a)]
        if getattr(mine, "bias", None) is None and getattr(theirs, "bias", None) is not None:
            diffs.append("has a bias (zoo: none)")
        if diffs:
            problems.append(f"{name} {', '.join(diffs)}")
    for name, theirs in modules.items():
        if name and name not in own and (any(True for _ in theirs.parameters(recurse=False))
                                         or any(True for _ in theirs.buffers(recurse=False))):
            problems.append(f"{name} ({type(theirs).__name__}) has no counterpart in the zoo ResNet")
    if problems:
        more = f" ... ({len(problems)} in all)" if len(problems) > 5 else ""
        raise ZooError(
            f"{label} does not have the standard ResNet layout the zoo reproduces: {'; '.join(problems[:5])}{more}"
        )


def build_resnet(cls: type[ResNet], spec: ResNetSpec, options: dict[str, Any]) -> ResNet:
    """Build ``cls`` with the source's architecture and load its weights, folding the depth factor."""
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
    return model


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


@register_target("resnet", "resnet", RESNET_OPTIONS, "zoo ResNet, scale 1: the same function")
def _to_resnet(spec: ResNetSpec, options: dict[str, Any]) -> ResNet:
    return build_resnet(ResNet, spec, options)


@register_target("depth_scaled", "resnet", RESNET_OPTIONS,
                 "zoo DepthScaledResNet x + f(x)/N, the 1/N folded into the last BN: the same function")
def _to_depth_scaled(spec: ResNetSpec, options: dict[str, Any]) -> ResNet:
    return build_resnet(DepthScaledResNet, spec, options)


@register_target("heun", "resnet", RESNET_OPTIONS,
                 "zoo HeunNet (H1) from the same folded weights: not function preserving")
def _to_heun(spec: ResNetSpec, options: dict[str, Any]) -> ResNet:
    return build_resnet(HeunNet, spec, options)


MOMENTUM_OPTIONS: tuple[str, ...] = ("gamma", "init_velocity", "keep_first_block")


@register_target("momentum", "resnet", (*RESNET_OPTIONS, *MOMENTUM_OPTIONS),
                 "zoo MomentumResNet (M1) with f(x) = relu(x + g(x)) - x: gamma = 0 is the same function")
def _to_momentum_resnet(spec: ResNetSpec, options: dict[str, Any]) -> ResNet:
    return build_resnet(MomentumResNet, spec, options)


# ------------------------------------------------------------------------------------------------
# The transformer family: stacks of blocks x -> block(x), run as residual stacks of block(x) - x


@dataclass
class BlockStackSpec:
    """A stack of shape-preserving blocks read from a source (the ``"transformer"`` family).

    The source file deep-copies the source (``copy``: converters never share weights) and names the
    copy's blocks in order; ``assemble(stack)`` puts the residual stack in the copy's place of the
    blocks and returns the converted model. ``stack_class`` is the ResidualStack class to build
    (:class:`zoo.nn.StackAsBlock` where the source's forward loops over its block list).
    ``training`` is the train/eval mode of the blocks' container, given to the new wrapper modules.
    """

    label: str
    copy: nn.Module
    blocks: list[nn.Module]
    assemble: Callable[[ResidualStack], nn.Module]
    stack_class: type[ResidualStack] = ResidualStack
    training: bool = False


TRANSFORMER_OPTIONS: tuple[str, ...] = ("memory", "gamma", "init_velocity")


def build_block_stack(spec: BlockStackSpec, rule: str, options: dict[str, Any]) -> nn.Module:
    """The source with its blocks replaced by a ``rule`` stack of ``ResidualOf(block)``."""
    stack = spec.stack_class([ResidualOf(b) for b in spec.blocks], rule=rule, **options)
    # only the new wrappers: the copied blocks keep their own (per-module) train/eval mode
    for m in (stack, *stack.blocks):
        m.training = spec.training
    return spec.assemble(stack)


@register_target("momentum", "transformer", TRANSFORMER_OPTIONS,
                 "the source with its blocks as a momentum ResidualStack of f(x) = block(x) - x: "
                 "gamma = 0 (memory='full') is the same function")
def _to_momentum_blocks(spec: BlockStackSpec, options: dict[str, Any]) -> nn.Module:
    options = {"gamma": 0.9, "memory": "reversible", **options}
    return build_block_stack(spec, "momentum", options)


# ------------------------------------------------------------------------------------------------
# The attention family: models whose softmax attention modules become Sinkhorn attention


@dataclass
class AttentionSpec:
    """A source whose attention modules (timm ``Attention``, ``torch.nn.MultiheadAttention``) become Sinkhorn
    attention (the ``"attention"`` family).

    ``model`` is the source itself: the target copies it (or not, ``inplace=True``) and swaps the attention
    modules of that model. ``vit_config``: the :class:`zoo.models.SinkformerViT` arguments when the source
    maps onto that family (a timm ``VisionTransformer`` of the standard layout), else None and ``why_not``
    says why (an info line).
    """

    label: str
    model: nn.Module
    vit_config: dict[str, Any] | None = None
    why_not: str = ""
    build: Callable[..., nn.Module] | None = None  # (n_iter, record_stats, inplace, options) -> the zoo model


SINKHORN_OPTIONS: tuple[str, ...] = ("n_iter", "record_stats", "inplace")
SINKHORN_VIT_OPTIONS: tuple[str, ...] = TRAINING_OPTIONS


def _attention_classes() -> tuple[type, type]:
    from timm.layers.attention import Attention

    return Attention, nn.MultiheadAttention


def count_attention(model: nn.Module) -> int:
    """How many timm ``Attention`` / ``torch.nn.MultiheadAttention`` (subclasses included) and zoo Sinkhorn
    attention modules ``model`` holds (itself included)."""
    from zoo.nn import SinkhornAttention

    return sum(isinstance(m, (*_attention_classes(), SinkhornAttention)) for m in model.modules())


def swap_attention(model: nn.Module, n_iter: int = 3, record_stats: bool = False) -> nn.Module:
    """Replace, in place, every timm ``Attention`` by :class:`zoo.nn.SinkhornAttention` and every
    ``torch.nn.MultiheadAttention`` by :class:`zoo.nn.SinkhornMultiheadAttention`, reusing their parameter
    tensors (nothing is copied); zoo Sinkhorn modules get the new ``n_iter`` / ``record_stats``.
    Returns ``model`` (or the new module when ``model`` itself is an attention module).

    Subclasses of the two source classes may change the forward: they raise a ZooError. ``nn.TransformerEncoder``
    gets ``use_nested_tensor = False`` (its nested fast path never calls the attention modules).
    """
    from zoo.nn import SinkhornAttention, SinkhornMultiheadAttention

    timm_attention, torch_mha = _attention_classes()

    def convert(name: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, (SinkhornAttention, SinkhornMultiheadAttention)):
            m.n_iter, m.record_stats, m.stats = n_iter, bool(record_stats), {}
            return None
        if type(m) is timm_attention:
            return SinkhornAttention.from_timm(m, n_iter=n_iter, record_stats=record_stats)
        if type(m) is torch_mha:
            return SinkhornMultiheadAttention.from_torch(m, n_iter=n_iter, record_stats=record_stats)
        if isinstance(m, (timm_attention, torch_mha)):
            raise ZooError(
                f"{name or 'the model'} is a {_class_name(m)}, a subclass that may change the forward: only "
                "timm.layers.Attention and torch.nn.MultiheadAttention themselves convert to Sinkhorn attention"
            )
        return None

    top = convert("", model)
    if top is not None:
        return top
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = convert(f"{name}.{child_name}" if name else child_name, child)
            if new is not None:
                parent._modules[child_name] = new
        if isinstance(parent, nn.TransformerEncoder):
            parent.use_nested_tensor = False
    return model


def _check_sinkhorn_options(options: dict[str, Any]) -> tuple[int, bool, bool]:
    from zoo.nn.attention import check_n_iter

    n_iter = check_n_iter(options.pop("n_iter", 3))
    record_stats = options.pop("record_stats", False)
    inplace = options.pop("inplace", False)
    for name, value in (("record_stats", record_stats), ("inplace", inplace)):
        if not isinstance(value, bool):
            raise ZooError(f"{name} must be true or false, got {value!r}")
    return n_iter, record_stats, inplace


def build_sinkformer_vit(spec: AttentionSpec, n_iter: int, record_stats: bool, inplace: bool,
                         options: dict[str, Any]) -> nn.Module:
    """The zoo :class:`SinkformerViT` LightningModule with the source ViT's weights (copied; shared with
    ``inplace=True``), device, dtype, train/eval modes and ``requires_grad`` flags."""
    from zoo.models import SinkformerViT

    source = spec.model
    device, dtype = source_device_dtype(source, spec.label)
    model = SinkformerViT(**spec.vit_config, n_iter=n_iter, record_stats=record_stats, **options)
    model.to(device=device, dtype=dtype)
    modules = dict(source.named_modules())
    _mirror_runtime_state(model, source, modules)
    if inplace:  # the very parameter tensors of the source (flags mirrored first: assign keeps them)
        zoo.hub.check_state_dict(model, source.state_dict(), source=spec.label)
        model.load_state_dict(source.state_dict(keep_vars=True), assign=True)
    else:
        zoo.hub.load_state_dict(model, source.state_dict(), source_hparams=None, source=spec.label)
    return model


def _not_the_zoo_family(spec: AttentionSpec | MLPSpec, options: dict[str, Any], family: str, converts: str,
                        returned: str, accepted: tuple[str, ...]) -> None:
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


@register_target("sinkhorn", "attention", (*SINKHORN_OPTIONS, *SINKHORN_VIT_OPTIONS),
                 "Sinkhorn attention (S1) with the same weights: n_iter = 1 is the same function; a timm ViT of "
                 "the standard layout becomes the zoo SinkformerViT")
def _to_sinkhorn(spec: AttentionSpec, options: dict[str, Any]) -> nn.Module:
    n_iter, record_stats, inplace = _check_sinkhorn_options(options)
    if spec.vit_config is not None:
        return build_sinkformer_vit(spec, n_iter, record_stats, inplace, options)
    if spec.build is not None:  # a source with its own zoo family (fairseq's transformer -> SinkformerTranslation)
        return spec.build(n_iter, record_stats, inplace, options)
    _not_the_zoo_family(spec, options, "SinkformerViT", "with Sinkhorn attention", "its attention swapped",
                        SINKHORN_OPTIONS)
    model = swap_attention(spec.model if inplace else copy.deepcopy(spec.model), n_iter=n_iter,
                           record_stats=record_stats)
    if hasattr(model, "set_n_iter"):  # a zoo SinkformerViT: keep its hyperparameters in step
        model.set_n_iter(n_iter)
        model.set_record_stats(record_stats)
    return model


# ------------------------------------------------------------------------------------------------
# The MLP family: Transformer MLPs that become sparse mixtures of experts ("upcycling")


@dataclass
class MLPSpec:
    """A source whose Transformer MLPs become :class:`zoo.nn.MoE` layers (the ``"mlp"`` family).

    ``model`` is the source itself; ``blocks`` the name of its ``nn.Sequential`` of blocks (each with an
    ``mlp``), ``""`` when the source is that sequence. ``vit_config``: the :class:`zoo.models.VisionMoE`
    arguments when the source maps onto that family (a timm ``VisionTransformer`` of the standard layout), else
    None and ``why_not`` says why.
    """

    label: str
    model: nn.Module
    blocks: str = "blocks"
    vit_config: dict[str, Any] | None = None
    why_not: str = ""


MOE_OPTIONS: tuple[str, ...] = ("num_experts", "every", "moe_layers", "router", "k", "capacity_factor", "topk",
                                "normalize_gates", "group_size", "lam", "p", "solver", "router_n_iter")
MOE_VIT_OPTIONS: tuple[str, ...] = ("aux_loss_weight", *TRAINING_OPTIONS)


def _moe_routing_options(options: dict[str, Any]) -> tuple[int, int, Any, dict[str, Any]]:
    """Pop ``num_experts``, ``every``, ``moe_layers`` and the MoE routing options (MoE's own names)."""
    num_experts = options.pop("num_experts", 8)
    every = options.pop("every", 2)
    layers = options.pop("moe_layers", None)
    routing = {name: options.pop(name) for name in MOE_OPTIONS[3:] if name in options}
    if "router_n_iter" in routing:
        routing["n_iter"] = routing.pop("router_n_iter")
    return num_experts, every, layers, routing


def _copy_expert_flags(moe: nn.Module, dense: nn.Module | None) -> None:
    """The experts get the ``requires_grad`` flags of the dense MLP they copy (a frozen MLP stays frozen)."""
    for layer in ("fc1", "fc2"):
        for leaf in ("weight", "bias"):
            theirs = getattr(getattr(dense, layer, None), leaf, None)
            mine = getattr(getattr(moe.experts, layer), leaf)
            if isinstance(theirs, nn.Parameter) and isinstance(mine, nn.Parameter):
                mine.requires_grad_(theirs.requires_grad)


@register_target("moe", "mlp", (*MOE_OPTIONS, *MOE_VIT_OPTIONS),
                 "sparse mixture of experts in every `every`-th block, each expert a copy of the dense MLP and the "
                 "router at zero (upcycling); a timm ViT of the standard layout becomes the zoo VisionMoE")
def _to_moe(spec: MLPSpec, options: dict[str, Any]) -> nn.Module:
    from zoo.models.vmoe import VisionMoE, moe_block_indices
    from zoo.nn.moe import MoE

    num_experts, every, layers, routing = _moe_routing_options(options)
    source = spec.model
    if spec.vit_config is not None:
        device, dtype = source_device_dtype(source, spec.label)
        if "n_iter" in routing:
            routing["router_n_iter"] = routing.pop("n_iter")
        model = VisionMoE(**spec.vit_config, num_experts=num_experts, moe_every=every, moe_layers=layers,
                          **routing, **options)
        model.to(device=device, dtype=dtype)
        _mirror_runtime_state(model, source, dict(source.named_modules()))
        zoo.hub.load_state_dict(model, source.state_dict(), source_hparams=None, source=spec.label)
        dense = dict(source.named_modules())
        for i in model.moe_indices:
            _copy_expert_flags(model.blocks[i].mlp, dense.get(f"blocks.{i}.mlp"))
        return model
    _not_the_zoo_family(spec, options, "VisionMoE", "with MoE MLPs", "its MLPs replaced by MoE layers", MOE_OPTIONS)
    model = copy.deepcopy(source)
    blocks = model.get_submodule(spec.blocks) if spec.blocks else model
    for i in moe_block_indices(len(blocks), every, layers):
        mlp = getattr(blocks[i], "mlp", None)
        if mlp is None:
            raise ZooError(f"{spec.label}: block {i} has no mlp to turn into experts")
        blocks[i].mlp = MoE.from_mlp(mlp, num_experts, **routing)
        _copy_expert_flags(blocks[i].mlp, mlp)
    return model
