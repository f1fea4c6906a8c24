"""torchvision ResNets (``torchvision.models.ResNet``) as zoo models.

Residual function. torchvision's ``BasicBlock`` and ``Bottleneck`` compute

    relu(shortcut(x) + g(x)),  g = bn2(conv2(relu(bn1(conv1(x)))))                      (basic)
                               g = bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))    (bottleneck, stride on the 3x3)

with the identity shortcut, or ``downsample`` = 1x1 conv + BN in the first block of a stage. The
zoo keeps that shape-changing block as an ordinary block (the stage's transition) and computes the
N residual blocks of the stage as

- ``to="resnet"``: relu(x + g(x)), scale 1: the same block, the same function;
- ``to="depth_scaled"``: relu(x + h g'(x)) with h = 1/N and g' = g/h, i.e. the last BatchNorm's
  weight and bias multiplied by N (``fold_plain_weights``): the same function;
- ``to="heun"``: Heun's rule with step 1/N on f(x) = (relu(x + h g'(x)) - x)/h, from the same
  folded weights: not the same function;
- ``to="momentum"``: the momentum rule v_{n+1} = gamma v_n + (1 - gamma) f(x_n), x_{n+1} = x_n + v_{n+1}
  on f(x) = relu(x + g(x)) - x (step 1, weights unchanged) over the blocks after the first of every stage
  (which stays an ordinary block even where it keeps the shape, as published; ``keep_first_block=False``:
  only shape-changing first blocks do), as :class:`zoo.models.MomentumResNet` and
  ``zoo.momentum_resnet*`` compute it: gamma = 0 (``memory="full"``) is the same function, so
  ``transform(resnet152(weights=W), to="momentum")`` and ``momentum_resnet152(weights=W)`` agree.

torchvision's parameter names (``conv1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``) are
the zoo's, so the state dict needs no renaming.

Supported: ``resnet18/34/50/101/152`` and any ``torchvision.models.ResNet`` with BasicBlock or Bottleneck
blocks, ``groups=1``, ``width_per_group=64``, no dilation, ``nn.BatchNorm2d`` (eps 1e-5), and unmodified stem
and pooling, with the ``nn.Linear`` classifier or none (``fc = nn.Identity()``). ResNeXt (``resnext50_32x4d``
...), wide ResNets (``wide_resnet50_2`` ...), ``replace_stride_with_dilation``, other norm layers and
subclasses that override the forward are rejected with a ZooError.
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models import resnet as tv_resnet

from converters import (
    AttentionSpec,
    ResNetSpec,
    describe_module,
    read_resnet_stages,
    register_source,
    resnet_spec,
)
from zoo.errors import ZooError
from zoo.models.resnet import TORCHVISION_ARCHS

BLOCK_KINDS = {tv_resnet.BasicBlock: "basic", tv_resnet.Bottleneck: "bottleneck"}
SOURCE_NAME = "torchvision.models.ResNet"


def is_torchvision_resnet(model: object) -> bool:
    """True when ``model`` is a torchvision ``ResNet`` (subclasses included)."""
    return isinstance(model, tv_resnet.ResNet)


def _check(label: str, ok: bool, what: str) -> None:
    if not ok:
        raise ZooError(f"{label}: {what}")


@register_source(SOURCE_NAME, "resnet", is_torchvision_resnet)
def read_torchvision_resnet(model: tv_resnet.ResNet) -> ResNetSpec:
    """Describe the torchvision ResNet ``model`` for the zoo's ResNet targets (ZooError for unsupported
    variants)."""
    label = f"torchvision {type(model).__name__}"
    groups, width = getattr(model, "groups", 1), getattr(model, "base_width", 64)
    if groups != 1:
        raise ZooError(
            f"{label} is a ResNeXt (groups={groups}, width_per_group={width}): grouped convolutions are not "
            "supported; only the resnet18/34/50/101/152 layout (groups=1, width_per_group=64) converts"
        )
    if width != 64:
        raise ZooError(
            f"{label} is a wide ResNet (width_per_group={width}): only the resnet18/34/50/101/152 layout "
            "(width_per_group=64) converts"
        )
    _check(label, getattr(model, "dilation", 1) == 1, "replace_stride_with_dilation (dilated stages) is not supported")
    for meth in ("forward", "_forward_impl"):
        _check(
            label,
            getattr(type(model), meth) is getattr(tv_resnet.ResNet, meth),
            f"{type(model).__qualname__} overrides {meth}; only torchvision's own forward converts",
        )
    norm = getattr(model, "_norm_layer", nn.BatchNorm2d)
    _check(
        label,
        norm is nn.BatchNorm2d,
        f"norm_layer {getattr(norm, '__name__', norm)!r} is not supported; the zoo uses nn.BatchNorm2d",
    )

    block, layers = read_resnet_stages(model, label, BLOCK_KINDS)
    arch = TORCHVISION_ARCHS.get((block, layers))
    label = f"torchvision {arch}" if arch else f"{label} ({block}, layers={list(layers)})"

    conv1 = model.conv1
    _check(label, isinstance(conv1, nn.Conv2d), f"conv1 is a {type(conv1).__name__}, expected the 7x7 nn.Conv2d")
    _check(label, type(model.relu) is nn.ReLU, f"the stem activation is a {type(model.relu).__name__}, not ReLU")
    mp = model.maxpool
    _check(
        label,
        type(mp) is nn.MaxPool2d
        and (mp.kernel_size, mp.stride, mp.padding, mp.dilation, mp.ceil_mode) == (3, 2, 1, 1, False),
        f"the stem pool {describe_module(mp)} is not MaxPool2d(3, stride=2, padding=1)",
    )
    pool = model.avgpool
    _check(
        label,
        type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1)),
        f"the global pool {describe_module(pool)} is not AdaptiveAvgPool2d(1)",
    )
    for name, m in model.named_modules():
        if isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
            _check(label, type(m.relu) is nn.ReLU, f"{name}.relu is a {type(m.relu).__name__}, not ReLU")
    return resnet_spec(model, label, block, layers)


# ------------------------------------------------------------------------------------------------
# Sinkhorn attention (family "attention", to="sinkhorn")

VIT_SOURCE_NAME = "torchvision.models.VisionTransformer"


def is_torchvision_vit(model: object) -> bool:
    """True when ``model`` is a torchvision ``VisionTransformer`` (subclasses included)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


@register_source(VIT_SOURCE_NAME, "attention", is_torchvision_vit)
def read_torchvision_vit(model: nn.Module) -> AttentionSpec:
    """The torchvision ViT ``model``: its ``EncoderBlock``s call ``self_attention(x, x, x, need_weights=False)``, an
    ``nn.MultiheadAttention`` (batch first) that becomes :class:`zoo.nn.SinkhornMultiheadAttention` with
    the same ``in_proj_weight`` / ``out_proj``; the result is the torchvision model itself (a copy)."""
    from torchvision.models.vision_transformer import EncoderBlock

    label = f"torchvision {type(model).__name__}"
    blocks = [m for m in model.modules() if isinstance(m, EncoderBlock)]
    if not blocks:
        raise ZooError(f"{label} has no EncoderBlock to convert")
    for i, b in enumerate(blocks):
        if type(b).forward is not EncoderBlock.forward:
            raise ZooError(
                f"{label}: block {i} is a {type(b).__qualname__} overriding forward; only torchvision's "
                "EncoderBlock converts"
            )
    return AttentionSpec(label=label, model=model)
