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

Layout: :mod:`converters.registry` holds the two registries, :func:`transform` and the helpers every family
shares; one module per target family builds and registers its targets (its docstring documents them):

- :mod:`converters.resnet_targets` (family ``"resnet"``: torchvision and timm ResNets): ``"resnet"``,
  ``"depth_scaled"``, ``"heun"``, ``"momentum"``.
- :mod:`converters.transformer_targets` (family ``"transformer"``: ``torch.nn.TransformerEncoder``, a timm
  ``VisionTransformer``, or a timm ViT's ``blocks``): ``"momentum"``.
- :mod:`converters.sinkhorn_targets` (family ``"attention"``: a timm or torchvision ``VisionTransformer``, any
  module holding timm ``Attention`` or ``torch.nn.MultiheadAttention``): ``"sinkhorn"``.
- :mod:`converters.moe_targets` (family ``"mlp"``: a timm ``VisionTransformer``, or a timm ViT's ``blocks``):
  ``"moe"``.

Importing :mod:`converters` imports these four modules in this order, which is the order of
:func:`list_targets` and of a target's families (``"momentum"``: ``"resnet"``, then ``"transformer"``).
"""

from __future__ import annotations

# the import order is the registration order (list_targets() and a target's families): not sorted
# isort: off
from converters.registry import (
    _SOURCE_MODULES as _SOURCE_MODULES,
    _SOURCES as _SOURCES,
    _TARGETS as _TARGETS,
    IMAGE_TRAINING_OPTIONS,
    TRAINING_OPTIONS,
    FamilyBuild,
    Source,
    Target,
    _get_target as _get_target,
    classifier_size,
    describe_module,
    list_sources,
    list_targets,
    register_source,
    register_target,
    source_device_dtype,
    transform,
)
from converters.resnet_targets import (
    MOMENTUM_OPTIONS,
    RESNET_OPTIONS,
    ResNetSpec,
    build_resnet,
    check_resnet_layout,
    read_resnet_stages,
    resnet_spec,
)
from converters.transformer_targets import TRANSFORMER_OPTIONS, BlockStackSpec
from converters.transformer_targets import build_block_stack as build_block_stack
from converters.sinkhorn_targets import (
    SINKHORN_OPTIONS,
    SINKHORN_VIT_OPTIONS,
    AttentionSpec,
    build_sinkformer_vit,
    count_attention,
    swap_attention,
)
from converters.moe_targets import MOE_OPTIONS, MOE_VIT_OPTIONS, MLPSpec
# isort: on

__all__ = [
    "MOE_OPTIONS",
    "MOE_VIT_OPTIONS",
    "MOMENTUM_OPTIONS",
    "SINKHORN_OPTIONS",
    "SINKHORN_VIT_OPTIONS",
    "AttentionSpec",
    "RESNET_OPTIONS",
    "IMAGE_TRAINING_OPTIONS",
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
