"""timm ResNets (``timm.models.resnet.ResNet``) with the torchvision layout as zoo models.

Residual function. With their default arguments timm's ``BasicBlock`` and ``Bottleneck`` compute
exactly torchvision's blocks,

    relu(shortcut(x) + g(x)),  g = bn2(conv2(act1(bn1(conv1(x)))))                      (basic)
                               g = bn3(conv3(act2(bn2(conv2(act1(bn1(conv1(x))))))))    (bottleneck, stride on the 3x3)

because ``drop_block`` and ``aa`` are ``nn.Identity``, ``se`` is None, ``act1``/``act2``/``act3`` are
ReLU and ``drop_path`` (stochastic depth on g, identity in eval mode) follows the same linear
schedule as the zoo's ``drop_path_rate``. The zoo keeps the first, shape-changing block of a stage as
an ordinary block and computes the N residual blocks of the stage as

- ``to="resnet"``: relu(x + g(x)), scale 1: the same function;
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

State-dict names: timm's ResNet uses torchvision's names (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0/1``, ``fc``); its other modules (``act1``, ``global_pool``, ``aa``,
``drop_block``, ``drop_path``) hold no weights. So :data:`KEY_RENAMES` is empty; a name that ever
differs is mapped there. ``drop_rate`` (dropout before ``fc``) and the drop-path rate carry over.

Supported: ``resnet18/34/50/101/152`` (``timm.create_model("resnet50")``) and any timm ResNet with
a single 7x7 stride-2 ``conv1`` stem, a max-pool, BasicBlock/Bottleneck with cardinality 1 and
base width 64, no SE/attention, no anti-aliasing, no DropBlock, ReLU, 1x1 conv downsample, output
stride 32, timm's head pooling (``global_pool`` avg, max, avgmax, catavgmax, fast*, or ``""`` with
``num_classes=0``) and an ``nn.Linear`` head or none (``num_classes=0``, ``reset_classifier(0)``).
Everything else (``resnet50d`` deep stems and average-pool downsampling, ``resnext*``, ``seresnet*``,
``resnetblur*``/``resnetaa*``, ...) raises a ZooError naming what is not supported.

Vision transformers (family ``"transformer"``, ``to="momentum"``): a ``VisionTransformer`` (any
subclass whose ``blocks`` is a non-empty ``nn.Sequential``) or a ViT's ``blocks`` alone. A timm block
computes x + drop_path(ls1(attn(norm1(x)))) followed by the MLP branch, i.e. block(x) = x + (...), so
the residual function is f(x) = block(x, attn_mask=..., is_causal=...) - x (:class:`zoo.nn.ResidualOf`)
and the blocks run as a momentum :class:`zoo.nn.StackAsBlock`; gamma = 0 (``memory="full"``) is the
source function. The result is a deep copy of the ViT (same class, weights copied, the source left
unchanged) whose ``blocks`` is the stack: ``forward`` runs ``self.blocks(x)``, ``forward_features(x,
attn_mask=...)`` loops over ``self.blocks`` and so calls the stack once with the mask, which goes
to every block; ``set_grad_checkpointing`` checkpoints the stack as one function.
Per-block outputs: the stack's state after block n is (x_{n+1}, v_{n+1}), and x_{n+1} is the output of block n (at
gamma = 0 the source's). ``forward_intermediates`` (timm's arguments and outputs) returns those states
(:meth:`zoo.nn.ResidualStack.states`: memory="full"'s forward with ordinary autograd whatever the stack's memory, a
feature-extraction helper under memory="reversible"), and ``prune_intermediate_layers`` keeps the blocks up to the
last index with the same step (:meth:`zoo.nn.ResidualStack.truncate`), so the outputs kept do not change; both are
picklable objects put on the instance in place of timm's methods (which iterate over and slice ``blocks``), so the
model still deep-copies and saves whole. A subclass overriding either method gets a ZooError for it. For ``blocks``
alone the result is the stack, called as ``stack(x, attn_mask=None, is_causal=False)``.
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from converters import (
    AttentionSpec,
    BlockStackSpec,
    MLPSpec,
    ResNetSpec,
    describe_module,
    read_resnet_stages,
    register_source,
    resnet_spec,
)
from zoo.errors import ZooError
from zoo.nn import StackAsBlock

SOURCE_NAME = "timm.models.resnet.ResNet"

# timm module / state-dict name prefix -> zoo name. Empty: timm's ResNet names are torchvision's.
KEY_RENAMES: dict[str, str] = {}


def rename(name: str) -> str:
    """The zoo name of a timm module or state-dict key."""
    for old, new in KEY_RENAMES.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def timm_label(model: nn.Module) -> str:
    """``"timm <architecture>"`` from the model's pretrained config (else its class name), for messages."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"timm {arch}" if arch else f"timm {type(model).__name__}"


def is_timm_resnet(model: object) -> bool:
    """True when ``model`` is a timm ``ResNet`` (subclasses included)."""
    # timm is only imported by whoever built the model: no timm module loaded means no timm model.
    module = sys.modules.get("timm.models.resnet")
    return module is not None and isinstance(model, module.ResNet)


def _check(label: str, ok: bool, what: str) -> None:
    if not ok:
        raise ZooError(f"{label}: {what} is not supported; only the torchvision-equivalent ResNet layout converts")


def _is_relu(m: object) -> bool:
    return type(m) is nn.ReLU


def _check_block(label: str, name: str, block: nn.Module, kind: str) -> float:
    """Explicit checks of one block; returns its drop-path rate."""
    from timm.layers import DropPath

    convs = [block.conv1, block.conv2] + ([block.conv3] if kind == "bottleneck" else [])
    grouped = [c.groups for c in convs if c.groups != 1]
    _check(
        label, not grouped, f"grouped convolutions in {name} (cardinality={grouped[0] if grouped else 1}, a ResNeXt)"
    )
    if kind == "bottleneck":
        planes = block.conv3.out_channels // 4
        _check(
            label,
            block.conv2.out_channels == planes,
            f"bottleneck width {block.conv2.out_channels} for {planes} planes in {name} (base_width != 64, "
            "a wide ResNet)",
        )
        _check(
            label,
            block.conv1.out_channels == block.conv2.in_channels == planes,
            f"a reduced first conv width in {name} (block_reduce_first != 1)",
        )
    else:
        _check(
            label,
            block.conv1.out_channels == block.conv2.out_channels,
            f"a reduced first conv width in {name} (block_reduce_first != 1)",
        )
    _check(label, getattr(block, "se", None) is None, f"SE/attention ({name}.se = {type(block.se).__name__})")
    _check(
        label,
        type(getattr(block, "aa", nn.Identity())) is nn.Identity,
        f"anti-aliased downsampling ({name}.aa = {type(block.aa).__name__})",
    )
    _check(
        label,
        type(getattr(block, "drop_block", nn.Identity())) is nn.Identity,
        f"DropBlock ({name}.drop_block = {type(block.drop_block).__name__})",
    )
    acts = ("act1", "act2", "act3") if kind == "bottleneck" else ("act1", "act2")
    for act in acts:
        _check(
            label,
            _is_relu(getattr(block, act, None)),
            f"the activation {name}.{act} = {type(getattr(block, act, None)).__name__} (only ReLU)",
        )
    _check(
        label,
        getattr(block, "dilation", 1) == 1 and all(c.dilation == (1, 1) for c in convs),
        f"dilation in {name} (output_stride < 32)",
    )
    ds = block.downsample
    _check(
        label,
        ds is None
        or (
            isinstance(ds, nn.Sequential) and len(ds) == 2 and type(ds[0]) is nn.Conv2d and ds[0].kernel_size == (1, 1)
        ),
        f"average-pool or 3x3 downsampling in {name}.downsample = {describe_module(ds)} (avg_down / down_kernel_size)",
    )
    dp = block.drop_path
    if dp is None:
        return 0.0
    _check(
        label,
        type(dp) is DropPath and getattr(dp, "scale_by_keep", True),
        f"{name}.drop_path = {describe_module(dp)} (only timm's DropPath with scale_by_keep=True)",
    )
    return float(dp.drop_prob)


def _drop_path_rate(label: str, rates: list[float]) -> float:
    """The rate of timm's (and the zoo's) linear schedule rate * i / (n - 1) that gives ``rates``."""
    n = len(rates)
    rate = rates[-1] if n > 1 else 0.0
    expected = [rate * i / max(n - 1, 1) for i in range(n)]
    _check(
        label,
        all(math.isclose(r, e, rel_tol=1e-6, abs_tol=1e-12) for r, e in zip(rates, expected)),
        f"a drop-path schedule {[round(r, 6) for r in rates]} that is not linear in the block index",
    )
    # timm builds its schedule with torch.linspace in float32: the rate it was given (0.1) came back as
    # 0.10000000149011612; a float32 value records as the shortest decimal that is that float32 (0.1)
    return float(str(np.float32(rate))) if float(np.float32(rate)) == rate else rate


@register_source(SOURCE_NAME, "resnet", is_timm_resnet)
def read_timm_resnet(model: nn.Module) -> ResNetSpec:
    """Describe the timm ResNet ``model`` for the zoo's ResNet targets (ZooError for unsupported variants)."""
    from timm.models import resnet as timm_resnet

    label = timm_label(model)

    for meth in ("forward", "forward_features", "forward_head"):
        _check(
            label,
            getattr(type(model), meth) is getattr(timm_resnet.ResNet, meth),
            f"a subclass overriding {meth} ({type(model).__qualname__})",
        )
    conv1 = model.conv1
    _check(
        label,
        type(conv1) is nn.Conv2d,
        f"the deep stem conv1 = {type(conv1).__name__} (stem_type='deep...', e.g. resnet50d)",
    )
    _check(
        label,
        conv1.kernel_size == (7, 7) and conv1.stride == (2, 2) and conv1.padding == (3, 3),
        f"the stem conv {conv1} (only a 7x7 conv with stride 2 and padding 3)",
    )
    _check(label, _is_relu(model.act1), f"the stem activation act1 = {type(model.act1).__name__}")
    mp = model.maxpool
    _check(
        label,
        type(mp) is nn.MaxPool2d
        and (mp.kernel_size, mp.stride, mp.padding, mp.dilation, mp.ceil_mode) == (3, 2, 1, 1, False),
        f"the stem pool {describe_module(mp)} (replace_stem_pool or anti-aliasing)",
    )

    block, layers = read_resnet_stages(
        model, label, {timm_resnet.BasicBlock: "basic", timm_resnet.Bottleneck: "bottleneck"}
    )
    rates = [
        _check_block(label, f"layer{i + 1}.{j}", b, block)
        for i in range(len(layers))
        for j, b in enumerate(getattr(model, f"layer{i + 1}"))
    ]
    return resnet_spec(
        model,
        label,
        block,
        layers,
        rename=rename,
        constructor={
            "global_pool": _global_pool(label, model.global_pool),
            "drop_rate": float(getattr(model, "drop_rate", 0.0)),
            "drop_path_rate": _drop_path_rate(label, rates),
        },
    )


def _global_pool(label: str, pool: nn.Module) -> str:
    """The zoo ResNet's ``global_pool`` for timm's head pooling ``pool`` (a ``SelectAdaptivePool2d``): its pool type
    (``"fast..."`` types as the same pooling); ``label`` names the source in messages. Pooled features are flattened
    and ``""`` (no pooling, the feature map) is not, as in the zoo ResNet."""
    from timm.layers import SelectAdaptivePool2d

    _check(label, type(pool) is SelectAdaptivePool2d, f"the head pooling global_pool = {describe_module(pool)}")
    pool_type = str(pool.pool_type).lower()
    flat = type(pool.flatten) is nn.Flatten
    if pool_type.startswith("fast"):  # the same pooling as a fused module, which flattens itself
        pool_type, flat = pool_type[len("fast") :] or "avg", getattr(pool.pool, "flatten", False) is True
    _check(
        label,
        pool_type in ("avg", "max", "avgmax", "catavgmax", "") and flat == bool(pool_type),
        f"global_pool {pool_type!r}{'' if flat == bool(pool_type) else ' with flatten=' + str(flat)} (only avg, max, "
        "avgmax, catavgmax, and '' with num_classes=0)",
    )
    return pool_type


# ------------------------------------------------------------------------------------------------
# Vision transformers (family "transformer")

VIT_SOURCE_NAME = "timm.models.vision_transformer.VisionTransformer"
BLOCKS_SOURCE_NAME = "nn.Sequential of timm.models.vision_transformer blocks"


def _vit_module():
    return sys.modules.get("timm.models.vision_transformer")


def is_timm_vit(model: object) -> bool:
    """True when ``model`` is a timm ``VisionTransformer`` (subclasses included)."""
    module = _vit_module()
    return module is not None and isinstance(model, module.VisionTransformer)


def _vit_block_classes() -> tuple[type, ...]:
    module = _vit_module()
    names = ("Block", "ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock")
    return tuple(getattr(module, n) for n in names if module is not None and hasattr(module, n))


def is_timm_block_sequence(model: object) -> bool:
    """True when ``model`` is a non-empty ``nn.Sequential`` of timm ViT blocks (a ViT's ``blocks``)."""
    classes = _vit_block_classes()
    return (
        bool(classes) and type(model) is nn.Sequential and len(model) > 0 and all(isinstance(b, classes) for b in model)
    )


def _block_list(label: str, blocks: object, where: str) -> list[nn.Module]:
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ZooError(f"{label}: {where} is {describe_module(blocks)}, expected a non-empty nn.Sequential of blocks")
    return list(blocks)


class _PerBlockUnsupported:
    """Stands in for a method of a momentum ViT whose source class overrides timm's version, which the conversion
    cannot follow: calling it raises a ZooError (a plain picklable object, so the converted model still deep-copies
    and saves whole)."""

    def __init__(self, label: str, method: str):
        self.label, self.method = label, method

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise ZooError(
            f"{self.method} is not supported by the momentum conversion of {self.label}: its class overrides timm's "
            "VisionTransformer version, which iterates over (and slices) the blocks, and its blocks run as one "
            "momentum stack; use forward_features (the stack's output), or the source model for per-block features"
        )


class _MethodOf:
    """``function`` bound to ``model``: calling it calls ``function(model, ...)``. Put on a converted model in place of
    a method (the model keeps its class): a plain object that deep-copies and pickles with the model (its copy is
    bound to the model's copy), holding the model weakly, so it makes no reference cycle that would keep a deleted
    model's tensors alive until the garbage collector runs.

    Args:
        function: a module-level function (pickled by name) taking the model first.
        model: the model it is bound to.
    """

    def __init__(self, function: Callable[..., Any], model: nn.Module):
        self.function = function
        self._model = weakref.ref(model)
        self.__doc__ = function.__doc__

    @property
    def __signature__(self) -> inspect.Signature:
        """The function's signature without the model."""
        sig = inspect.signature(self.function)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self._model()
        if model is None:
            raise ZooError(f"{self.function.__name__}: the model this method belonged to no longer exists")
        return self.function(model, *args, **kwargs)

    def __reduce__(self) -> tuple[type, tuple[Callable[..., Any], nn.Module | None]]:
        return type(self), (self.function, self._model())

    def __repr__(self) -> str:
        model = self._model()
        return f"<{self.function.__name__} of {type(model).__name__ if model is not None else 'a deleted model'}>"


def _take_indices(model: nn.Module, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's block selection over the momentum stack's blocks (one ZooError when it selects none)."""
    from zoo.models.arguments import take_indices

    return take_indices(model.blocks.depth, indices, "blocks")


def _momentum_vit_forward_intermediates(
    model: nn.Module,
    x: torch.Tensor,
    indices: int | Sequence[int] | None = None,
    return_prefix_tokens: bool = False,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
    output_dict: bool = False,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> list[Any] | tuple[torch.Tensor, list[Any]] | dict[str, Any]:
    """timm's ``VisionTransformer.forward_intermediates`` for a momentum ViT (``model.forward_intermediates``): the
    output of block n is the stack's state x_{n+1} (:meth:`zoo.nn.ResidualStack.states`; at gamma = 0 the source's
    block output), its velocity left out.

    Args:
        model: the converted ViT, its ``blocks`` a momentum :class:`zoo.nn.StackAsBlock`.
        x: the images.
        indices: the blocks whose outputs are returned: None (all), an int n (the last n), or a list of block
            indices (negative from the end).
        return_prefix_tokens: each intermediate as (patch tokens, prefix tokens).
        norm: apply the final norm to each intermediate.
        stop_early: run no block past the last one taken (the final features are then its output).
        output_fmt: the patch tokens as ``"NCHW"`` (B, C, H, W) or ``"NLC"`` (B, patches, C).
        intermediates_only: return the intermediates alone.
        output_dict: return ``{"image_intermediates", "image_features", "image_intermediates_prefix"}`` as timm.
        attn_mask, is_causal: the attention mask and causal masking, given to every block.

    The states come from memory="full"'s forward (ordinary autograd under the current grad mode, whatever the
    stack's ``memory``), the stack checkpointed as one function with the model's ``grad_checkpointing``, as
    ``forward_features`` does; the final features are the final norm of the last state computed, which is
    ``forward_features``' output except under memory="reversible" with gradients (fixed-point rounding).
    """
    if output_fmt not in ("NCHW", "NLC"):
        raise ZooError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    take_indices, max_index = _take_indices(model, indices)
    stack = model.blocks
    height, width = x.shape[-2:]
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    steps = max_index + 1 if stop_early else stack.depth
    if attn_mask is not None or is_causal:
        states = stack.states(x, kwargs={"attn_mask": attn_mask, "is_causal": is_causal}, steps=steps)
    elif getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
        states = stack.checkpoint(lambda t: stack.states(t, steps=steps), x)
    else:
        states = stack.states(x, steps=steps)
    from zoo.models.vit import intermediates_output

    return intermediates_output(
        [model.norm(states[i]) if norm else states[i] for i in take_indices],
        states[-1],
        model.norm,
        model.num_prefix_tokens,
        model.patch_embed.dynamic_feat_size((height, width)),
        return_prefix_tokens=return_prefix_tokens,
        output_fmt=output_fmt,
        intermediates_only=intermediates_only,
        output_dict=output_dict,
    )


def _momentum_vit_prune_intermediate_layers(
    model: nn.Module, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
) -> list[int]:
    """timm's ``VisionTransformer.prune_intermediate_layers`` for a momentum ViT (``model.prune_intermediate_layers``):
    the stack keeps the blocks up to the last of ``indices`` (:meth:`zoo.nn.ResidualStack.truncate`: the same step,
    so the outputs of the blocks kept do not change); returns the absolute indices kept.

    Args:
        model: the converted ViT, its ``blocks`` a momentum :class:`zoo.nn.StackAsBlock`.
        indices: the blocks whose outputs are kept, as ``forward_intermediates``' ``indices``.
        prune_norm: replace the final norm by an identity.
        prune_head: replace ``fc_norm`` by an identity and remove the classifier and pooling
            (``reset_classifier(0, "")``).
    """
    take_indices, max_index = _take_indices(model, indices)
    model.blocks.truncate(max_index + 1)
    if prune_norm:
        model.norm = nn.Identity()
    if prune_head:
        model.fc_norm = nn.Identity()
        model.reset_classifier(0, "")
    return take_indices


# the methods of timm's VisionTransformer that iterate over (and slice) ``blocks`` -> the momentum ViT's
_PER_BLOCK_METHODS: dict[str, Callable[..., Any]] = {
    "forward_intermediates": _momentum_vit_forward_intermediates,
    "prune_intermediate_layers": _momentum_vit_prune_intermediate_layers,
}


@register_source(VIT_SOURCE_NAME, "transformer", is_timm_vit)
def read_timm_vit(model: nn.Module) -> BlockStackSpec:
    """Describe (a copy of) the timm VisionTransformer ``model``; the converted model is that copy, ``blocks``
    replaced."""
    label = timm_label(model)
    _block_list(label, model.blocks, "blocks")
    twin = copy.deepcopy(model)
    base = _vit_module().VisionTransformer

    def assemble(stack) -> nn.Module:
        twin.blocks = stack
        # timm's versions iterate over (and slice) ``blocks`` to collect per-block outputs: over the stack they
        # would return the whole stack's output as block 0's, or nothing, without an error. The instance gets
        # versions that read the stack's states; a class overriding timm's gets an error.
        for method, function in _PER_BLOCK_METHODS.items():
            if not hasattr(twin, method):
                continue
            if getattr(type(twin), method) is getattr(base, method, None):
                setattr(twin, method, _MethodOf(function, twin))
            else:
                setattr(twin, method, _PerBlockUnsupported(label, method))
        return twin

    return BlockStackSpec(
        label=label,
        copy=twin,
        blocks=list(twin.blocks),
        assemble=assemble,
        stack_class=StackAsBlock,
        training=twin.blocks.training,
    )


@register_source(BLOCKS_SOURCE_NAME, "transformer", is_timm_block_sequence)
def read_timm_blocks(model: nn.Sequential) -> BlockStackSpec:
    """Describe (a copy of) a ViT's ``blocks``, ``model``; the converted model is the residual stack itself."""
    twin = copy.deepcopy(model)
    return BlockStackSpec(
        label="timm ViT blocks",
        copy=twin,
        blocks=list(twin),
        assemble=lambda stack: stack,
        stack_class=StackAsBlock,
        training=twin.training,
    )


# ------------------------------------------------------------------------------------------------
# Sinkhorn attention (family "attention", to="sinkhorn")

ATTENTION_SOURCE_NAME = "timm model with timm.layers.Attention (Sinkhorn attention swapped in)"


class _NotZooViT(Exception):
    """The timm ViT does not map onto zoo.models.SinkformerViT (the message says why)."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _NotZooViT(what)


def _is_layer_norm(m: object, dim: int) -> bool:
    return (
        isinstance(m, nn.LayerNorm)
        and type(m).forward in (nn.LayerNorm.forward, _timm_layer_norm().forward)
        and tuple(m.normalized_shape) == (dim,)
        and m.eps == 1e-6
        and m.elementwise_affine
        and m.bias is not None
    )


def _timm_layer_norm() -> type:
    from timm.layers import LayerNorm

    return LayerNorm


def _drop_p(m: object, what: str) -> float:
    _require(type(m) is nn.Dropout or type(m) is nn.Identity, f"{what} is {describe_module(m)}")
    return float(m.p) if isinstance(m, nn.Dropout) else 0.0


def sinkformer_vit_config(model: nn.Module) -> dict:
    """The :class:`zoo.models.SinkformerViT` arguments that rebuild ``model`` (a timm VisionTransformer) with
    the same parameter names and function at ``n_iter=1``; raises _NotZooViT naming what does not map."""
    from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed
    from timm.layers.attention import Attention

    vit = _vit_module()
    _require(type(model) is vit.VisionTransformer, f"a subclass {type(model).__qualname__}")
    pe = model.patch_embed
    _require(
        type(pe) is PatchEmbed
        and type(pe.norm) is nn.Identity
        and pe.flatten
        and not pe.dynamic_img_pad
        and pe.strict_img_size
        and pe.img_size is not None
        and pe.patch_size[0] == pe.patch_size[1]
        and type(pe.proj) is nn.Conv2d
        and pe.proj.bias is not None
        and pe.proj.stride == pe.proj.kernel_size
        and pe.proj.padding == (0, 0)
        and pe.proj.kernel_size == tuple(pe.patch_size),
        f"the patch embedding {describe_module(pe)} (only a square-patch conv without norm, fixed image size)",
    )
    _require(model.reg_token is None, "register tokens")
    _require(not model.no_embed_class and not model.dynamic_img_size, "no_embed_class / dynamic_img_size")
    _require(isinstance(model.pos_embed, nn.Parameter), "no learned position embedding")
    _require(
        model.attn_pool is None and model.global_pool in ("token", "avg") and not model.pool_include_prefix,
        f"global_pool {model.global_pool!r} (only 'token' and 'avg')",
    )
    _require(
        type(model.patch_drop) is nn.Identity and type(model.norm_pre) is nn.Identity, "patch dropout or a pre-norm"
    )
    dim = model.embed_dim
    use_fc_norm = model.global_pool == "avg"
    _require(
        _is_layer_norm(model.fc_norm if use_fc_norm else model.norm, dim)
        and type(model.norm if use_fc_norm else model.fc_norm) is nn.Identity,
        "a final norm / fc_norm layout other than timm's default for the pooling",
    )
    _require(type(model.head) is nn.Linear, f"the head {describe_module(model.head)} (only nn.Linear)")
    blocks = _block_list("timm VisionTransformer", model.blocks, "blocks")
    first = blocks[0]
    mlp_hidden = getattr(getattr(first, "mlp", None), "fc1", None)
    _require(isinstance(mlp_hidden, nn.Linear), "a block without an nn.Linear mlp.fc1")
    mlp_ratio = mlp_hidden.out_features / dim
    layer_scale = type(first.ls1) is LayerScale
    attn_drop = proj_drop = 0.0
    rates = []
    for i, b in enumerate(blocks):
        name = f"blocks.{i}"
        _require(type(b) is vit.Block, f"{name} is a {type(b).__qualname__} (only timm's Block)")
        a = b.attn
        _require(
            type(a) is Attention
            and a.gate is None
            and type(a.norm) is nn.Identity
            and a.proj.bias is not None
            and a.attn_dim == dim
            and a.num_heads == first.attn.num_heads
            and a.scale == a.head_dim**-0.5,
            f"{name}.attn = {describe_module(a)} (only timm's Attention without gate / scale norm)",
        )
        qk_norm = type(a.q_norm) is not nn.Identity
        _require(
            not qk_norm or (_is_layer_norm(a.q_norm, a.head_dim) and _is_layer_norm(a.k_norm, a.head_dim)),
            f"{name}.attn q/k norm {describe_module(a.q_norm)}",
        )
        _require(
            qk_norm == (type(first.attn.q_norm) is not nn.Identity)
            and (a.qkv.bias is None) == (first.attn.qkv.bias is None),
            f"{name}.attn differs from blocks.0",
        )
        _require(_is_layer_norm(b.norm1, dim) and _is_layer_norm(b.norm2, dim), f"{name} norms")
        m = b.mlp
        _require(
            type(m) is Mlp
            and type(m.act) is nn.GELU
            and m.act.approximate == "none"
            and type(m.norm) is nn.Identity
            and type(m.fc1) is nn.Linear
            and type(m.fc2) is nn.Linear
            and m.fc1.bias is not None
            and m.fc2.bias is not None
            and m.fc1.out_features == int(dim * mlp_ratio),
            f"{name}.mlp = {describe_module(m)} (only timm's Mlp with exact GELU and the same ratio)",
        )
        for ls in (b.ls1, b.ls2):
            _require(type(ls) is (LayerScale if layer_scale else nn.Identity), f"{name} layer scale differs")
        dps = []
        for dp in (b.drop_path1, b.drop_path2):
            _require(
                type(dp) is nn.Identity or (type(dp) is DropPath and getattr(dp, "scale_by_keep", True)),
                f"{name} drop path {describe_module(dp)}",
            )
            dps.append(float(dp.drop_prob) if isinstance(dp, DropPath) else 0.0)
        _require(dps[0] == dps[1], f"{name} drop path rates differ")
        rates.append(dps[0])
        a_drop = _drop_p(a.attn_drop, f"{name}.attn.attn_drop")
        p_drop = _drop_p(a.proj_drop, f"{name}.attn.proj_drop")
        m_drops = {_drop_p(m.drop1, f"{name}.mlp.drop1"), _drop_p(m.drop2, f"{name}.mlp.drop2")}
        _require(
            m_drops == {p_drop} and (i == 0 or (a_drop, p_drop) == (attn_drop, proj_drop)),
            f"{name} dropout rates differ",
        )
        attn_drop, proj_drop = a_drop, p_drop
    try:
        drop_path_rate = _drop_path_rate("timm VisionTransformer", rates)
    except ZooError as e:
        raise _NotZooViT(str(e).split(": ", 1)[-1]) from None
    return {
        "img_size": list(pe.img_size),
        "patch_size": int(pe.patch_size[0]),
        "in_chans": int(pe.proj.in_channels),
        "num_classes": int(model.head.out_features),
        "embed_dim": int(dim),
        "depth": len(blocks),
        "num_heads": int(first.attn.num_heads),
        "mlp_ratio": float(mlp_ratio),
        "qkv_bias": first.attn.qkv.bias is not None,
        "qk_norm": type(first.attn.q_norm) is not nn.Identity,
        "init_values": 1e-5 if layer_scale else None,  # any value: the weights overwrite the scale
        "class_token": model.cls_token is not None,
        "global_pool": model.global_pool,
        "drop_rate": _drop_p(model.head_drop, "head_drop"),
        "pos_drop_rate": _drop_p(model.pos_drop, "pos_drop"),
        "proj_drop_rate": proj_drop,
        "attn_drop_rate": attn_drop,
        "drop_path_rate": drop_path_rate,
    }


@register_source(VIT_SOURCE_NAME, "attention", is_timm_vit)
def read_timm_vit_attention(model: nn.Module) -> AttentionSpec:
    """The timm ViT ``model`` for ``to="sinkhorn"``: the zoo SinkformerViT when its layout maps, else the ViT,
    attention swapped."""
    label = timm_label(model)
    try:
        return AttentionSpec(label=label, model=model, vit_config=sinkformer_vit_config(model))
    except _NotZooViT as e:
        return AttentionSpec(label=label, model=model, why_not=str(e))


def has_timm_attention(model: object) -> bool:
    """True when ``model`` is or holds a timm ``Attention`` or a zoo ``SinkhornAttention``."""
    from timm.layers.attention import Attention

    from zoo.nn import SinkhornAttention

    return isinstance(model, nn.Module) and any(isinstance(m, (Attention, SinkhornAttention)) for m in model.modules())


@register_source(ATTENTION_SOURCE_NAME, "attention", has_timm_attention)
def read_timm_attention_model(model: nn.Module) -> AttentionSpec:
    """``model``: any module holding timm ``Attention`` layers (a timm model, a ViT's ``blocks``, a converted
    model)."""
    return AttentionSpec(label=f"timm {type(model).__name__}", model=model)


# ------------------------------------------------------------------------------------------------
# Mixtures of experts (family "mlp", to="moe")


@register_source(VIT_SOURCE_NAME, "mlp", is_timm_vit)
def read_timm_vit_mlp(model: nn.Module) -> MLPSpec:
    """The timm ViT ``model`` for ``to="moe"``: the zoo VisionMoE when its layout maps, else the ViT with MoE
    MLPs."""
    label = timm_label(model)
    _block_list(label, model.blocks, "blocks")
    try:
        return MLPSpec(label=label, model=model, vit_config=sinkformer_vit_config(model))
    except _NotZooViT as e:
        return MLPSpec(label=label, model=model, why_not=str(e))


@register_source(BLOCKS_SOURCE_NAME, "mlp", is_timm_block_sequence)
def read_timm_blocks_mlp(model: nn.Sequential) -> MLPSpec:
    """A ViT's ``blocks``, ``model``, for ``to="moe"``: a copy with the MLPs of every ``moe_every``-th block as MoE
    layers."""
    return MLPSpec(label="timm ViT blocks", model=model, blocks="")
