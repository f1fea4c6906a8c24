"""ResNets as ODE discretisations: depth-scaled ResNets (R1) and HeunNets (H1).

Every stage is a :class:`zoo.nn.ResidualStack`. Its first block, when it changes the shape (stride
or channels), is an ordinary ResNet block (the stack's ``transition``); the others are residual
functions integrated by the stage's forward rule with step h (1/N for ``scale="depth"``).
``keep_first_block=True`` (the default of Momentum ResNets, as published) makes the first block of
every stage the transition, also where it keeps the shape.

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1.weight``, ``fc``), which
timm's ResNets share, so their state dicts load without renaming.

Residual function of a post-activation block (torchvision/timm ``BasicBlock`` and ``Bottleneck``,
which compute relu(x + g(x))): with the step h,

    f_h(x) = (relu(x + h g(x)) - x) / h,   so that   x + h f_h(x) = relu(x + h g(x)).

With h = 1 this is the torchvision block; with h = 1/N the factor N folded into the last
BatchNorm of g gives back the source function exactly (``fold_plain_weights``).
Pre-activation blocks (the tiny CIFAR net) use f(x) = g(x) directly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import stochastic_depth

from zoo.errors import ZooError
from zoo.hub import HubMixin, load_weights, weights_from_local_file
from zoo.models.arguments import check_model_kwargs
from zoo.nn import ResidualStack
from zoo.nn.residual_function import ResidualFunctionWithTail, residual_tail
from zoo.nn.residual_stack import DEFAULT_GAMMA, INIT_VELOCITIES, MEMORY_MODES, RULES
from zoo.pretrained import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PretrainedCfg,
    build_model,
    register_pretrained_cfgs,
)
from zoo.registry import register_model
from zoo.tasks import ImageClassifier
from zoo.validation import (
    boolean,
    choice,
    finite_float,
    int_sequence,
    integer,
    non_negative_int,
    positive_int,
    probability,
)

BLOCKS = ("basic", "bottleneck", "preact")
STEMS = ("imagenet", "cifar", "tiny")
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")  # timm's SelectAdaptivePool2d types
# CIFAR-10 statistics (zoo.data.vision.CIFAR_STATS["cifar10"]): the CIFAR and tiny nets' default transform
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# torchvision architecture names by (block, layers), for weight names such as "IMAGENET1K_V2".
TORCHVISION_ARCHS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class _ResNetBlock(nn.Module, ResidualFunctionWithTail):
    """Shared logic: full block output as a transition, residual function inside a stack.

    Implements the engine's block interface (:class:`zoo.nn.residual_function.ResidualFunctionWithTail`):
    ``residual_step`` is None for a transition block (output ``act(shortcut(x) + g(x))``); a
    :class:`ResidualStack` sets it to its step h (:meth:`set_residual_step`), and the block then returns its
    residual function, whose element-wise tail :meth:`split_residual` hands to the engine.
    """

    post_activation = True

    def __init__(self, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = drop_path
        self.residual_step: float | None = None

    def branch(self, x: torch.Tensor) -> torch.Tensor:  # g(x)
        raise NotImplementedError

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The BatchNorm ending g: scaling it by c scales g by c (used to fold the depth factor)."""
        raise NotImplementedError

    def _g(self, x: torch.Tensor) -> torch.Tensor:
        g = self.branch(x)
        if self.drop_path > 0.0:
            g = stochastic_depth(g, self.drop_path, "row", self.training)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self._g(x)
        h = self.residual_step
        if h is None:
            shortcut = self.downsample(x) if getattr(self, "downsample", None) is not None else x
            # in place, as torchvision's blocks: g is the branch's own new tensor (its last BatchNorm's output, or
            # the stochastic-depth product), which no autograd node keeps
            out = g.add_(shortcut)
            return F.relu(out, inplace=True) if self.post_activation else out
        if not self.post_activation:
            return g
        if h == 1.0:  # the momentum and plain rules: the same values without two element-wise passes
            return residual_tail(x, g, "relu")
        return (F.relu(x + h * g) - x) / h

    def set_residual_step(self, h: float | None) -> None:
        """The stack's step h (None: not inside a stack)."""
        self.residual_step = h

    def split_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, str] | None:
        """Inside a stack: (g(x), tail) with the residual function f(x) = residual_tail(x, g(x), tail), so that a
        reversible momentum stack fuses the element-wise tail into its fixed-point step (None: no split)."""
        h = self.residual_step
        if h is None or (self.post_activation and h != 1.0):
            return None
        return self._g(x), ("relu" if self.post_activation else "identity")


class BasicBlock(_ResNetBlock):
    """torchvision's BasicBlock: g(x) = bn2(conv2(relu(bn1(conv1(x))))).

    Args:
        inplanes: input channels.
        planes: channels of the block's inner convolutions (times ``expansion`` at the output).
        stride: stride of the block (on its first 3x3 convolution), 2 where a stage halves the resolution.
        downsample: the shortcut of a transition block that changes the shape (1x1 conv and BN); None for the
            identity.
        drop_path: stochastic-depth rate of g (per sample), 0 for none.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, drop_path: float = 0.0
    ):
        super().__init__(drop_path)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        # in-place ReLUs as torchvision's (a BatchNorm's backward does not need its output)
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(_ResNetBlock):
    """torchvision's Bottleneck (stride on the 3x3 conv): 1x1 -> 3x3 -> 1x1 with BN and ReLU.

    Args:
        inplanes: input channels.
        planes: channels of the block's inner convolutions (times ``expansion`` at the output).
        stride: stride of the block (on its 3x3 convolution), 2 where a stage halves the resolution.
        downsample: the shortcut of a transition block that changes the shape (1x1 conv and BN); None for the
            identity.
        drop_path: stochastic-depth rate of g (per sample), 0 for none.
    """

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, drop_path: float = 0.0
    ):
        super().__init__(drop_path)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return self.bn3(self.conv3(out))

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


class PreActBlock(_ResNetBlock):
    """Pre-activation basic block of the tiny CIFAR net: f(x) = bn2(conv2(relu(bn1(conv1(relu(x)))))),
    no activation after the sum, so the stack is exactly x_{n+1} = x_n + h f(x_n).

    Args:
        inplanes: input channels.
        planes: channels of the block's inner convolutions (times ``expansion`` at the output).
        stride: stride of the block (on its first 3x3 convolution), 2 where a stage halves the resolution.
        downsample: the shortcut of a transition block that changes the shape (1x1 conv and BN); None for the
            identity.
        drop_path: stochastic-depth rate of g (per sample), 0 for none.
    """

    expansion = 1
    post_activation = False

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, drop_path: float = 0.0
    ):
        super().__init__(drop_path)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(F.relu(x))))))

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


_BLOCK_CLASSES = {"basic": BasicBlock, "bottleneck": Bottleneck, "preact": PreActBlock}


class ResNet(HubMixin, ImageClassifier):
    """A ResNet whose stages are residual stacks: plain (scale 1), depth-scaled (R1) or Heun (H1).

    Args:
        layers: blocks per stage (torchvision counts: the shape-changing first block included).
        block: ``"basic"``, ``"bottleneck"`` or ``"preact"``.
        widths: channels per stage (before the bottleneck expansion); default 64, 128, 256, 512.
        stem: ``"imagenet"`` (7x7/2 conv + max-pool), ``"cifar"`` (3x3 conv) or ``"tiny"`` (5x5 conv
            to ``widths[0]`` channels, average-pooled to 10x10, as the tiny CIFAR net).
        rule: forward rule of every stage, ``"euler"``, ``"heun"`` (or ``"momentum"``).
        scale: step of the rule, ``"depth"`` (1/N per stage) or a number.
        gamma: momentum term of the momentum rule (M1).
        init_velocity: initial velocity of the momentum rule: ``"zero"`` or ``"f"`` (v_0 = f_0(x_0)).
        memory: ``"full"``, ``"adjoint"`` (store each stage's output only) (or ``"reversible"``).
        tied: share the weights of the residual blocks within each stage: ``True`` for every stage,
            or the numbers of the tied stages (``[2, 3]``; stages count from 1).
        num_classes: classifier outputs (0: no classifier, ``forward`` returns the pooled features, as timm's
            ``num_classes=0``).
        in_chans: input channels.
        global_pool: timm's global pooling before the classifier: ``"avg"`` (torchvision's), ``"max"``,
            ``"avgmax"``, ``"catavgmax"`` (twice the features), or ``""`` (none: ``forward`` returns the unpooled
            feature map; needs ``num_classes=0``).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over the blocks up to this rate.
        zero_init_last: initialise the last BatchNorm of every block at zero (f = 0 at init).
        weights: torchvision weight name (``"IMAGENET1K_V1"``), a file (``.pth``, ``.ckpt``,
            ``.safetensors``, a ``save_pretrained`` folder) or ``"hf-hub:org/name"``. The builders
            (``zoo.resnet50(weights=...)`` ...) given zoo weights and no ``num_classes`` build the head the
            weights record; a different ``num_classes`` re-initialises the head.
        keep_first_block: make the first block of every stage an ordinary block (the stack's transition)
            even where it keeps the shape (``layer1`` of a basic-block ResNet, every stage of the tiny net);
            without it only shape-changing first blocks are. Same parameter names either way.
            True by default for :class:`MomentumResNet` (the published definition), False otherwise.
        stored_blocks: with ``memory="reversible"``, how many blocks at the end of each stage store their
            activations instead of being rebuilt in backward (:class:`zoo.nn.ResidualStack`'s ``stored_blocks``):
            one number for every stage (at most each stage's block count), or one per stage (``(0, 0, 8, 3)``).
            A stage whose residual steps are all stored runs with ordinary autograd, its first block included.
            Each stored block saves one block forward per training step and holds its activations until backward
            reaches it; the last stages come first in backward, so their blocks are the cheap ones to store
            (docs/benchmarks.md). 0 (default): every block is rebuilt.
        fixed_point_bits: fractional bits F of the exact fixed-point state of ``memory="reversible"``
            (:class:`zoo.nn.ResidualStack`'s), an integer in [8, 52]: each stage's states are multiples of 2^-F
            and must stay below 2^(61 - F) in size. 32 (default: 2^-32 ~ 2.3e-10, finer than float32's rounding)
            fits float32 / bfloat16 / float16 training; a float64 model (``Trainer(precision="64-true")``,
            ``model.double()``) keeps float64 accuracy with 48 to 52 (states then below 2^13 to 2^9). No effect
            with another memory.
        **kwargs: the task's arguments (:class:`zoo.tasks.ImageClassifier`: ``optimizer``, ``lr_scheduler``,
            ``label_smoothing``); none of them changes the architecture.

    timm's model protocol: ``num_classes``, ``num_features``, ``head_hidden_size``, ``pretrained_cfg`` (alias
    ``default_cfg``), ``feature_info`` (the stem's activation and every stage, as timm's ResNet),
    :meth:`reset_classifier`, :meth:`get_classifier`, :meth:`forward_features`, :meth:`forward_head`,
    :meth:`forward_intermediates`, :meth:`prune_intermediate_layers`, :meth:`set_grad_checkpointing`.
    Trains by default with SGD (lr 0.1, momentum 0.9, weight decay 5e-4 on weights only: ``default_optimizer``)
    and the task's cosine schedule over the run; ``optimizer=`` / ``lr_scheduler=`` replace them.
    """

    same_function_args = frozenset(
        {"num_classes", "memory", "stored_blocks", "fixed_point_bits", "label_smoothing", "drop_rate", "drop_path_rate"}
    )
    init_only_args = frozenset({"zero_init_last"})

    default_optimizer = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        block: str = "basic",
        widths: Sequence[int] | None = None,
        stem: str = "imagenet",
        rule: str = "euler",
        scale: float | str = 1.0,
        gamma: float = DEFAULT_GAMMA,
        memory: str = "full",
        init_velocity: str = "zero",
        tied: bool | Sequence[int] = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = False,
        weights: str | None = None,
        keep_first_block: bool = False,
        stored_blocks: int | Sequence[int] = 0,
        fixed_point_bits: int = 32,
        **kwargs: Any,
    ):
        check_model_kwargs(type(self), kwargs, ImageClassifier)  # first: one ZooError before anything is built
        # hparams keep the arguments as given: the checked values get their own names
        choice("block", block, BLOCKS)
        choice("stem", stem, STEMS)
        layer_counts = int_sequence("layers", layers, min_value=1)
        stage_widths = (
            int_sequence("widths", widths, min_value=1, length=len(layer_counts))
            if widths is not None
            else tuple(64 * 2**i for i in range(len(layer_counts)))
        )
        choice("rule", rule, RULES)
        choice("memory", memory, MEMORY_MODES)
        if scale != "depth":
            finite_float("scale", scale, 0.0, low_open=True, hint="give 'depth' (h = 1/N) or a positive number")
        probability("gamma", gamma)
        choice("init_velocity", init_velocity, INIT_VELOCITIES)
        stage_numbers = set(range(1, len(layer_counts) + 1))
        if isinstance(tied, (bool, np.bool_)):
            tied_stages = stage_numbers if tied else set()
        else:
            hint = f"give true/false or stage numbers 1..{len(layer_counts)} (stages count from 1)"
            tied_stages = set(int_sequence("tied", tied, min_value=1, allow_empty=True, hint=hint))
            if not tied_stages <= stage_numbers:
                raise ZooError(
                    f"tied must be true/false or stage numbers 1..{len(layer_counts)}, got {list(tied)}; "
                    "stages count from 1"
                )
        positive_int("in_chans", in_chans)
        _check_head(num_classes, global_pool)
        probability("drop_rate", drop_rate)
        probability("drop_path_rate", drop_path_rate)
        boolean("zero_init_last", zero_init_last)
        boolean("keep_first_block", keep_first_block)
        stage_stored = _stored_blocks(stored_blocks, layer_counts, memory)
        frac_bits = integer(
            "fixed_point_bits",
            fixed_point_bits,
            8,
            52,
            hint="give the fractional bits of memory='reversible' as an integer in [8, 52] (32: float32 training, "
            "48: float64)",
        )
        super().__init__(num_classes=num_classes, **kwargs)
        self.block_type = block
        self.layer_counts = layer_counts
        block_cls = _BLOCK_CLASSES[block]
        layers, widths = layer_counts, stage_widths

        self.conv1: nn.Module
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3, bias=False)
        elif stem == "cifar":
            self.conv1 = conv3x3(in_chans, widths[0])
        else:
            self.conv1 = nn.Conv2d(in_chans, widths[0], 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = {
            "imagenet": nn.MaxPool2d(3, stride=2, padding=1),
            "cifar": nn.Identity(),
            "tiny": nn.AdaptiveAvgPool2d(10),
        }[stem]

        total_blocks = sum(layers)
        inplanes, index = widths[0], 0
        self.stage_names: list[str] = []
        for i, (n_blocks, planes) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                rate = drop_path_rate * index / max(total_blocks - 1, 1)
                s = stride if j == 0 else 1
                downsample = None
                if j == 0 and (s != 1 or inplanes != planes * block_cls.expansion):
                    downsample = nn.Sequential(
                        conv1x1(inplanes, planes * block_cls.expansion, s),
                        nn.BatchNorm2d(planes * block_cls.expansion),
                    )
                blocks.append(block_cls(inplanes, planes, s, downsample, drop_path=rate))
                inplanes = planes * block_cls.expansion
                index += 1
            # the first block is an ordinary block (the stack's transition) when it changes the shape, and with
            # keep_first_block also when it keeps it (the published Momentum ResNets keep it in every stage)
            transition = blocks.pop(0) if blocks[0].downsample is not None or keep_first_block else None
            if i + 1 in tied_stages and blocks:
                blocks = [blocks[0]] * len(blocks)
            name = f"layer{i + 1}"
            self.add_module(
                name,
                ResidualStack(
                    blocks,
                    rule=rule,
                    scale=scale,
                    gamma=gamma,
                    memory=memory,
                    transition=transition,
                    init_velocity=init_velocity,
                    stored_blocks=stage_stored[i],
                    fixed_point_bits=frac_bits,
                ),
            )
            self.stage_names.append(name)
        self.num_features = inplanes  # channels of forward_features' output
        self.global_pool, self.fc = _head(inplanes, num_classes, global_pool)
        self.dropout = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()  # what pre_logits returns
        self.grad_checkpointing = False
        self.feature_info = _feature_info(stem, widths[0], [w * block_cls.expansion for w in widths])
        # the description of the model as built; the builders (zoo.pretrained.build_model) replace it with the
        # table entry of the weights or tag it was built from
        self.pretrained_cfg = self.pretrained_cfg_as_built(_base_cfg(stem).to_dict())
        self.default_cfg = self.pretrained_cfg
        self._init_weights(zero_init_last)
        if weights is not None:
            load_weights(self, weights)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, _ResNetBlock):
                    nn.init.zeros_(m.last_bn.weight)

    # ---------------------------------------------------------------- structure
    @property
    def stages(self) -> list[ResidualStack]:
        """The residual stacks ``layer1`` .. ``layerK``."""
        return [getattr(self, n) for n in self.stage_names]

    @property
    def torchvision_arch(self) -> str | None:
        """The torchvision model with the same layout (``"resnet50"`` ...), or None."""
        hp = self.hparams
        if hp.get("stem", "imagenet") != "imagenet" or hp.get("in_chans", 3) != 3:
            return None
        if hp.get("widths") is not None and tuple(hp["widths"]) != (64, 128, 256, 512):
            return None
        return TORCHVISION_ARCHS.get((self.block_type, self.layer_counts))

    # ---------------------------------------------------------------- timm's model protocol
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling, ``(B, num_features, H', W')``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling, dropout and the classifier; ``pre_logits=True`` stops before the classifier."""
        x = self.dropout(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (pooled features with ``num_classes=0``, the feature map with ``global_pool=''`` too)."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The classifier (``fc``; an ``nn.Identity`` without one), or its name ``"fc"``."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none), optionally with another ``global_pool``, as timm's;
        ``hparams`` and the accuracy metrics follow, so checkpoints and ``save_pretrained`` rebuild this head."""
        pool = self.hparams.get("global_pool", "avg") if global_pool is None else global_pool
        _check_head(num_classes, pool)
        device, dtype = self.conv1.weight.device, self.conv1.weight.dtype
        self.global_pool, self.fc = _head(self.num_features, num_classes, pool)
        self.fc.to(device=device, dtype=dtype)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.num_classes = num_classes
        self.hparams["global_pool"] = pool
        self.set_num_classes(num_classes)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: the features of ``feature_info`` (index 0: the stem's activation,
        1..K: the stages) selected by ``indices`` (None: all; an int n: the last n; a list: those, negative from
        the end), and the final feature map unless ``intermediates_only``. ``stop_early`` skips the stages after
        the last selected one; ``norm`` changes nothing (a ResNet has no final norm); ``output_fmt`` is NCHW."""
        if output_fmt != "NCHW":
            raise ZooError(f"a ResNet's intermediates are NCHW feature maps; output_fmt={output_fmt!r} is not offered")
        take_indices, max_index = _take_indices(len(self.stage_names) + 1, indices)
        intermediates = []
        x = self.relu(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        names = self.stage_names[:max_index] if stop_early else self.stage_names
        for i, name in enumerate(names, start=1):
            x = getattr(self, name)(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's: replace the stages after the last of ``indices`` by ``nn.Identity`` and (``prune_head``) the
        head by none (``reset_classifier(0, '')``); returns the absolute indices kept. ``hparams`` follow (the
        stages kept: ``layers`` and the per-stage arguments cut to them), so that a checkpoint or
        ``save_pretrained`` rebuilds the pruned model; one that keeps only the stem (index 0) has no such
        hyperparameters and does not rebuild."""
        take_indices, max_index = _take_indices(len(self.stage_names) + 1, indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Identity())
        if max_index == 0:
            self.maxpool = nn.Identity()  # it follows the stem's feature
        prune_end = max_index < len(self.stage_names)
        if prune_end:  # the features end at the last kept one: the head sized for the final features goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            if max_index > 0:
                self._record_kept_stages(max_index)
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def _record_kept_stages(self, kept: int) -> None:
        """``hparams`` of the first ``kept`` stages only (after pruning the others): ``layers``, and ``widths``,
        ``stored_blocks`` and ``tied`` where they name stages."""
        hp = self.hparams
        self.layer_counts = self.layer_counts[:kept]
        hp["layers"] = list(self.layer_counts)
        for key in ("widths", "stored_blocks"):
            value = hp.get(key)
            if isinstance(value, Sequence) and not isinstance(value, str):
                hp[key] = list(value)[:kept]
        tied = hp.get("tied")
        if isinstance(tied, Sequence) and not isinstance(tied, str):
            hp["tied"] = [s for s in tied if s <= kept]

    def sync_hparams(self) -> None:
        """``hparams`` up to date before a save: :meth:`record_stored_blocks`."""
        self.record_stored_blocks()

    def record_stored_blocks(self) -> None:
        """Keep ``hparams.stored_blocks`` true to the stages' ``stored_blocks`` (after
        :func:`zoo.nn.plan_stored_blocks`, which calls it, or after setting ``model.layer3.stored_blocks`` by hand),
        so that checkpoints, ``save_pretrained`` and the model card rebuild the counts the model trains with. The
        recorded value is left as given while it still describes the stages."""
        stages = [getattr(self, n, None) for n in self.stage_names]
        if not all(isinstance(s, ResidualStack) for s in stages):
            return
        counts = [int(s.stored_blocks) for s in stages]
        hp = self.hparams
        try:
            recorded = list(_stored_blocks(hp.get("stored_blocks", 0), self.layer_counts, hp.get("memory", "full")))
        except ZooError:
            recorded = None
        if recorded != counts:
            hp["stored_blocks"] = counts

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every stage, as timm's (``enable=False`` turns it off). Under
        ``memory="full"`` each stage keeps only the input of its first block and of every residual step and
        recomputes the rest in backward (same values and gradients, less memory, one more forward). Under
        ``"adjoint"`` (only each stage's output is stored) and ``"reversible"`` (flat in depth) no step's
        activations are stored anyway: there it is a no-op."""
        enable = boolean("enable", enable)
        self.grad_checkpointing = enable
        for name in self.stage_names:
            stage = getattr(self, name)
            if isinstance(stage, ResidualStack):
                stage.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise learning-rate decay ...): the stem, then each stage (``coarse``) or
        each block."""
        return {"stem": r"^conv1|bn1|maxpool", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    def pretrained_cfg_as_built(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """``cfg`` (timm's ``pretrained_cfg`` dict) corrected to this model: its input channels (one mean / std
        per channel: the average of the cfg's when their number differs), the final feature map's ``pool_size``
        at the cfg's input size, ``num_classes``, ``first_conv`` and ``classifier``."""
        cfg = dict(cfg)
        in_chans = self.hparams.get("in_chans", 3)
        for key in ("input_size", "test_input_size"):
            if cfg.get(key) is not None:
                cfg[key] = (in_chans, *tuple(cfg[key])[1:])
        for key in ("mean", "std"):
            values = tuple(cfg.get(key) or (IMAGENET_DEFAULT_MEAN if key == "mean" else IMAGENET_DEFAULT_STD))
            cfg[key] = values if len(values) == in_chans else (sum(values) / len(values),) * in_chans
        size = tuple(cfg.get("input_size", (in_chans, 224, 224)))[1:]
        cfg["pool_size"] = tuple(self._final_size(s) for s in size)
        cfg["num_classes"] = self.num_classes
        cfg["first_conv"], cfg["classifier"] = "conv1", "fc"
        return cfg

    def _final_size(self, size: int) -> int:
        """Height (or width) of forward_features' output for an input of ``size`` pixels (every stride-2 conv and
        pool of the stem and stages maps n to ceil(n / 2); the tiny stem pools to 10)."""
        stem = self.hparams.get("stem", "imagenet")
        size = {"imagenet": math.ceil(math.ceil(size / 2) / 2), "cifar": size, "tiny": 10}[stem]
        for _ in self.stage_names[1:]:
            size = math.ceil(size / 2)
        return size

    # ---------------------------------------------------------------- weights saved at another step
    def rescale_residual_weights(
        self, state_dict: Mapping[str, torch.Tensor], source_scale: float | str = 1.0
    ) -> dict[str, torch.Tensor]:
        """Map weights trained with step ``source_scale`` to this model's steps, keeping the function.

        A residual block with step h computes relu(x + h g(x)) (post-activation) or x + h g(x)
        (pre-activation), and g ends with a BatchNorm; scaling that BatchNorm's weight and bias by
        h_source / h gives the source block exactly (N for plain weights in a depth-scaled stage,
        1/N the other way). ``source_scale="depth"`` means step 1/N with this stage's depth N (weights of
        another depth do not fit the state dict anyway).
        """
        out = dict(state_dict)
        for name, stage in zip(self.stage_names, self.stages):
            source_step = 1.0 / max(stage.depth, 1) if source_scale == "depth" else float(source_scale)
            factor = source_step / stage.step
            if factor == 1.0:
                continue
            offset = 1 if stage.transition is not None else 0
            for j, block in enumerate(stage.blocks):
                bn = next(k for k, m in block.named_modules() if m is block.last_bn)
                for leaf in ("weight", "bias"):
                    key = f"{name}.{j + offset}.{bn}.{leaf}"
                    if key in out:
                        out[key] = out[key] * factor
        return out

    def fold_plain_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a plain ResNet's state dict (torchvision/timm: x -> relu(x + g(x))) to this model:
        the last BatchNorm of g multiplied by 1/h (N for ``scale="depth"``)."""
        return self.rescale_residual_weights(state_dict, 1.0)

    def adapt_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], source_hparams: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        """Weight-loader hook (:func:`zoo.hub.load_state_dict`): weights without recorded
        hyperparameters come from a plain ResNet (step 1); zoo weights record their ``scale``.

        A local file without recorded hyperparameters (a plain ``.pth``) that this rescales gets a warning: it
        may be a depth-scaled or Heun model's own ``state_dict``, which the rescaling turns into another function
        (:func:`zoo.hub.weights_from_local_file`; weights from a torchvision name or one of its published files,
        an ``hf-hub:`` repository, a tag or a converter's source model are plain ResNets' by definition and load
        silently).

        Args:
            state_dict: the weights, by name.
            source_hparams: the hyperparameters they were saved with; None when they record none.
        """
        source_scale = 1.0 if source_hparams is None else source_hparams.get("scale", 1.0)
        if (
            source_hparams is not None
            and source_hparams.get("rule") == "momentum"
            and "keep_first_block" not in source_hparams
            and self.hparams.get("keep_first_block")
            and any(s.transition is not None and s.transition.downsample is None for s in self.stages)
        ):
            from lightning.pytorch.utilities import rank_zero_warn

            # same parameter names, other function: the saved model had this block inside its momentum stack
            rank_zero_warn(
                "zoo: these Momentum ResNet weights were saved before keep_first_block existed, with the "
                "shape-keeping first block inside the momentum stack; this model keeps it an ordinary block "
                "(the published definition), so it computes another function: build it with "
                "keep_first_block=False to reproduce the saved model"
            )
        out = self.rescale_residual_weights(state_dict, source_scale)
        if source_hparams is None and weights_from_local_file() and any(out[k] is not state_dict[k] for k in out):
            from lightning.pytorch.utilities import rank_zero_warn

            steps = ", ".join(f"{n} N={s.depth}" for n, s in zip(self.stage_names, self.stages) if s.step != 1.0)
            rank_zero_warn(
                f"zoo: these weights record no hyperparameters, so {type(self).__name__} read them as step-1 "
                "weights of a plain (torchvision-layout) ResNet and multiplied the last BatchNorm of every "
                f"residual block by 1/h ({steps}) to keep that function. If they are this model's own state_dict "
                "(torch.save(model.state_dict(), path)), the rescaled model computes another function: load them "
                "unchanged with model.load_state_dict(torch.load(path)), or save with model.save_pretrained(path), "
                "which records the hyperparameters"
            )
        return out

    # ---------------------------------------------------------------- depth operations
    def _stage(self, stage: int | str) -> ResidualStack:
        name = stage if isinstance(stage, str) else f"layer{stage}"
        if name not in self.stage_names:
            raise ZooError(f"no stage {stage!r}: this model has {', '.join(self.stage_names)}")
        return getattr(self, name)

    def tie_stage(self, stage: int | str, index: int = 0) -> ResidualStack:
        """Share the weights of residual block ``index`` across the stage (theta_n = theta)."""
        out = self._stage(stage).tie(index)
        self._record_tied()
        return out

    def untie_stage(self, stage: int | str) -> ResidualStack:
        """Give every block of the stage its own weights (after deepening a tied stage)."""
        out = self._stage(stage).untie()
        self._record_tied()
        return out

    def _record_tied(self) -> None:
        """Keep ``hparams.tied`` true to the stages, so that checkpoints and ``save_pretrained`` rebuild them."""
        deep = [i + 1 for i, s in enumerate(self.stages) if s.depth > 1]
        tied = [i for i in deep if self.stages[i - 1].is_tied()]
        self.hparams["tied"] = bool(tied) if tied in ([], deep) else tied

    def deepen_stage(self, stage: int | str, blocks: int, mode: str = "copy") -> ResidualStack:
        """Re-sample a trained stage to ``blocks`` blocks (counted as in ``layers``, the transition
        block included) by ``"copy"`` or ``"interpolate"`` in depth; ``hparams.layers`` follows, so
        ``save_pretrained`` / checkpoints rebuild the deeper model."""
        st = self._stage(stage)
        extra = 1 if st.transition is not None else 0
        if not isinstance(blocks, int) or blocks <= extra:
            raise ZooError(f"a stage with a transition block needs blocks > {extra}, got {blocks!r}")
        st.deepen(blocks - extra, mode)
        i = self.stages.index(st)
        layers = list(self.layer_counts)
        layers[i] = blocks
        self.layer_counts = tuple(layers)
        self.hparams["layers"] = list(layers)
        self._record_tied()
        return st

    def smoothness(self) -> dict[str, float]:
        """max_n ||theta_{n+1} - theta_n|| per stage: how close each stage is to a neural ODE."""
        return {n: float(s.smoothness()) for n, s in zip(self.stage_names, self.stages)}


class DepthScaledResNet(ResNet):
    """ResNet with the depth written explicitly: x_{n+1} = x_n + f(x_n)/N in every stage (R1).

    Args:
        rule: forward rule of every stage (default ``"euler"``).
        scale: step of the rule (default ``"depth"``: 1/N for a stage of N steps).
        *args, **kwargs: the other arguments of :class:`ResNet`.
    """

    def __init__(self, *args: Any, rule: str = "euler", scale: float | str = "depth", **kwargs: Any):
        super().__init__(*args, rule=rule, scale=scale, **kwargs)


class HeunNet(ResNet):
    """ResNet whose stages follow Heun's second-order rule (H1) with step 1/N.

    Args:
        rule: forward rule of every stage (default ``"heun"``).
        scale: step of the rule (default ``"depth"``: 1/N for a stage of N steps).
        *args, **kwargs: the other arguments of :class:`ResNet`.
    """

    def __init__(self, *args: Any, rule: str = "heun", scale: float | str = "depth", **kwargs: Any):
        super().__init__(*args, rule=rule, scale=scale, **kwargs)


class MomentumResNet(ResNet):
    """Momentum ResNet (M1): v_{n+1} = gamma v_n + (1 - gamma) f(x_n), x_{n+1} = x_n + v_{n+1} in every
    stage after its first block, with f(x) = relu(x + g(x)) - x for the post-activation blocks (gamma = 0 is
    torchvision's ResNet). As published (Sander et al. 2021; the ``momentumnet`` package's
    ``transform_to_momentumnet(..., keep_first_layer=True)``), the first block of every stage stays an ordinary
    block, also where it keeps the shape (``layer1`` of ResNet-18/34); ``keep_first_block=False`` puts a
    shape-keeping first block in the momentum stack instead. ``memory="reversible"`` (default) rebuilds the
    activations exactly in backward (the first block recomputed from the stage input), so training memory is
    flat in depth; ``"full"`` is autograd.

    Args:
        rule: forward rule of every stage (default ``"momentum"``).
        scale: step of the rule (default 1, the published model).
        gamma: momentum term (M1); 0 is torchvision's ResNet.
        memory: ``"reversible"``, ``"adjoint"`` or ``"full"``: how the stacks keep what backward needs.
        keep_first_block: whether the first block of every stage stays an ordinary block (as published).
        *args, **kwargs: the other arguments of :class:`ResNet` (``stored_blocks``: the last blocks of each stage
            that store their activations instead of being rebuilt under ``memory="reversible"``;
            ``fixed_point_bits``: that memory's fixed-point resolution 2^-F, 32 by default, 48 for float64).
    """

    # what a file saved before an argument existed was built with (zoo.hub.from_pretrained fills it in)
    legacy_init_args = {"keep_first_block": False}

    def __init__(
        self,
        *args: Any,
        rule: str = "momentum",
        scale: float | str = 1.0,
        gamma: float = DEFAULT_GAMMA,
        memory: str = "reversible",
        keep_first_block: bool = True,
        **kwargs: Any,
    ):
        super().__init__(
            *args, rule=rule, scale=scale, gamma=gamma, memory=memory, keep_first_block=keep_first_block, **kwargs
        )


# ------------------------------------------------------------------------------------------------
# Heads, feature info, the configuration of an architecture without weights


def _stored_blocks(value: int | Sequence[int], layer_counts: Sequence[int], memory: str) -> tuple[int, ...]:
    """The per-stage ``stored_blocks`` of a ResNet: one number for every stage (capped at each stage's block
    count) or one per stage (each at most that stage's block count); nonzero only with memory="reversible"."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        stored = tuple(min(int(non_negative_int("stored_blocks", value)), n) for n in layer_counts)
    else:
        hint = f"give a number of blocks, or one per stage ({len(layer_counts)} stages of {list(layer_counts)} blocks)"
        stored = int_sequence("stored_blocks", value, min_value=0, length=len(layer_counts), hint=hint)
        for i, (k, n) in enumerate(zip(stored, layer_counts)):
            if k > n:
                raise ZooError(
                    f"stored_blocks[{i}] = {k} but stage {i + 1} has {n} blocks; give at most {n} (the whole stage)"
                )
    if any(stored) and memory != "reversible":
        raise ZooError(
            f"stored_blocks={value!r} applies to memory='reversible' only (memory={memory!r}); give stored_blocks=0"
        )
    return stored


def _check_head(num_classes: int, global_pool: str) -> None:
    non_negative_int(
        "num_classes",
        num_classes,
        hint="give the number of classes, or 0 for no classifier (forward "
        "returns the pooled features, as timm's num_classes=0)",
    )
    choice("global_pool", global_pool, GLOBAL_POOLS)
    if global_pool == "" and num_classes:
        raise ZooError(
            f"global_pool='' (no pooling: the feature map) needs num_classes=0, got num_classes="
            f"{num_classes}: a classifier takes pooled features; give num_classes=0 for the unpooled "
            "features, or global_pool='avg'"
        )


def _head(num_features: int, num_classes: int, global_pool: str) -> tuple[nn.Module, nn.Module]:
    """timm's classifier head: its ``SelectAdaptivePool2d`` (flattened unless ``global_pool=''``) and a linear
    layer (``nn.Identity`` for ``num_classes=0``). The pooling holds no parameters, so state dicts are
    torchvision's."""
    from timm.layers import SelectAdaptivePool2d

    pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
    fc = nn.Linear(num_features * pool.feat_mult(), num_classes) if num_classes else nn.Identity()
    return pool, fc


def _feature_info(stem: str, stem_chs: int, stage_chs: Sequence[int]) -> list[dict[str, Any]]:
    """timm's ResNet ``feature_info``: the stem's activation (``relu``, timm's ``act1``), then every stage, with
    channels and reduction (input size / feature size). The tiny stem pools to 10x10 whatever the input: its
    stages' reduction is given at its 32 px CIFAR input (3.2)."""
    info = [{"num_chs": stem_chs, "reduction": 2 if stem == "imagenet" else 1, "module": "relu"}]
    reduction: float = {"imagenet": 4, "cifar": 1, "tiny": 3.2}[stem]
    for i, chs in enumerate(stage_chs):
        if i:
            reduction *= 2
        info.append({"num_chs": chs, "reduction": reduction, "module": f"layer{i + 1}"})
    return info


def _take_indices(num_features: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices`` with one ZooError for indices out of range."""
    from timm.models._features import feature_take_indices

    valid = (
        indices is None
        or (isinstance(indices, int) and not isinstance(indices, bool))
        or (
            isinstance(indices, Sequence)
            and not isinstance(indices, str)
            and len(indices) > 0
            and all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
        )
    )
    if valid:
        try:
            return feature_take_indices(num_features, indices)
        except AssertionError:
            pass
    raise ZooError(
        f"indices={indices!r} do not select features of this model, which has {num_features} "
        f"(feature_info: 0 the stem, 1..{num_features - 1} the stages): give None (all), n (the last n, "
        f"1..{num_features}) or a non-empty list of indices in -{num_features}..{num_features - 1}"
    )


def _base_cfg(stem: str) -> PretrainedCfg:
    """An architecture's transform when it has no weights: ImageNet's (224 px, torchvision's resize 256 / crop 224)
    for the ImageNet stem, CIFAR-10's (32 px, no crop) for the CIFAR and tiny nets."""
    if stem == "imagenet":
        return PretrainedCfg(
            input_size=(3, 224, 224), crop_pct=0.875, interpolation="bilinear", first_conv="conv1", classifier="fc"
        )
    return PretrainedCfg(
        input_size=(3, 32, 32),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        num_classes=10,
        first_conv="conv1",
        classifier="fc",
    )


# ------------------------------------------------------------------------------------------------
# Pretrained configurations (zoo.list_pretrained("*resnet*")): the source weights as data, then what each family
# computes with them.

# torchvision's ResNet weights: tag, weights enum, file, resize size (crop 224, bilinear, ImageNet mean/std),
# published ImageNet-1K acc@1 / acc@5 (torchvision's meta "_metrics"), training recipe. The first is the default.
_TORCHVISION_WEIGHTS: dict[str, list[tuple[str, str, str, int, float, float, str]]] = {
    "resnet18": [
        (
            "tv_in1k",
            "ResNet18_Weights.IMAGENET1K_V1",
            "https://download.pytorch.org/models/resnet18-f37072fd.pth",
            256,
            69.758,
            89.078,
            "https://github.com/pytorch/vision/tree/main/references/classification#resnet",
        ),
    ],
    "resnet34": [
        (
            "tv_in1k",
            "ResNet34_Weights.IMAGENET1K_V1",
            "https://download.pytorch.org/models/resnet34-b627a593.pth",
            256,
            73.314,
            91.42,
            "https://github.com/pytorch/vision/tree/main/references/classification#resnet",
        ),
    ],
    "resnet50": [
        (
            "tv2_in1k",
            "ResNet50_Weights.IMAGENET1K_V2",
            "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
            232,
            80.858,
            95.434,
            "https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621",
        ),
        (
            "tv_in1k",
            "ResNet50_Weights.IMAGENET1K_V1",
            "https://download.pytorch.org/models/resnet50-0676ba61.pth",
            256,
            76.13,
            92.862,
            "https://github.com/pytorch/vision/tree/main/references/classification#resnet",
        ),
    ],
    "resnet101": [
        (
            "tv2_in1k",
            "ResNet101_Weights.IMAGENET1K_V2",
            "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
            232,
            81.886,
            95.78,
            "https://github.com/pytorch/vision/issues/3995#new-recipe",
        ),
        (
            "tv_in1k",
            "ResNet101_Weights.IMAGENET1K_V1",
            "https://download.pytorch.org/models/resnet101-63fe2227.pth",
            256,
            77.374,
            93.546,
            "https://github.com/pytorch/vision/tree/main/references/classification#resnet",
        ),
    ],
    "resnet152": [
        (
            "tv2_in1k",
            "ResNet152_Weights.IMAGENET1K_V2",
            "https://download.pytorch.org/models/resnet152-f82ba261.pth",
            232,
            82.284,
            96.002,
            "https://github.com/pytorch/vision/issues/3995#new-recipe",
        ),
        (
            "tv_in1k",
            "ResNet152_Weights.IMAGENET1K_V1",
            "https://download.pytorch.org/models/resnet152-394f9c45.pth",
            256,
            78.312,
            94.046,
            "https://github.com/pytorch/vision/tree/main/references/classification#resnet",
        ),
    ],
}

_TIMM_URL = "https://github.com/huggingface/pytorch-image-models"
_FB_SSL_URL = "https://github.com/facebookresearch/semi-supervised-ImageNet1K-models"
_GLUON_URL = "https://cv.gluon.ai/model_zoo/classification.html"
_RSB = "arXiv:2110.00476"  # ResNet strikes back
# timm's Hugging Face Hub weights of the same layout and parameter names (timm.models.get_pretrained_cfg): tag,
# input size, test input size, crop_pct, test_crop_pct, interpolation, normalisation ("imagenet" or "half":
# mean = std = 0.5), license, origin, paper. timm's own copies of the torchvision weights (tv_in1k, tv2_in1k) are
# the entries above; timm's cfgs publish no accuracy, so these entries carry none.
_TIMM_WEIGHTS: dict[
    str, list[tuple[str, int, int | None, float, float | None, str, str, str, str | None, str | None]]
] = {
    "resnet18": [
        ("a1_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a2_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a3_in1k", 160, 224, 0.95, 0.95, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("fb_ssl_yfcc100m_ft_in1k", 224, None, 0.875, None, "bilinear", "imagenet", "cc-by-nc-4.0", _FB_SSL_URL, None),
        ("fb_swsl_ig1b_ft_in1k", 224, None, 0.875, None, "bilinear", "imagenet", "cc-by-nc-4.0", _FB_SSL_URL, None),
        ("gluon_in1k", 224, None, 0.875, None, "bicubic", "imagenet", "apache-2.0", _GLUON_URL, None),
    ],
    "resnet34": [
        ("a1_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a2_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a3_in1k", 160, 224, 0.95, 0.95, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("bt_in1k", 224, 288, 0.875, 0.95, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, None),
        ("gluon_in1k", 224, None, 0.875, None, "bicubic", "imagenet", "apache-2.0", _GLUON_URL, None),
        ("ra4_e3600_r224_in1k", 224, 288, 0.9, 1.0, "bicubic", "half", "apache-2.0", _TIMM_URL, _RSB),
    ],
    "resnet50": [
        ("a1_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a1h_in1k", 176, 224, 0.9, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a2_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a3_in1k", 160, 224, 0.95, 0.95, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("am_in1k", 224, None, 0.875, None, "bicubic", "imagenet", "apache-2.0", None, None),
        ("b1k_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("b2k_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("bt_in1k", 224, 288, 0.875, 0.95, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, None),
        ("c1_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("c2_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("d_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("fb_ssl_yfcc100m_ft_in1k", 224, None, 0.875, None, "bilinear", "imagenet", "cc-by-nc-4.0", _FB_SSL_URL, None),
        ("fb_swsl_ig1b_ft_in1k", 224, None, 0.875, None, "bilinear", "imagenet", "cc-by-nc-4.0", _FB_SSL_URL, None),
        ("gluon_in1k", 224, None, 0.875, None, "bicubic", "imagenet", "apache-2.0", _GLUON_URL, None),
        ("ra_in1k", 224, 288, 0.875, 0.95, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, None),
        ("ram_in1k", 224, 288, 0.875, 0.95, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, None),
    ],
    "resnet101": [
        ("a1_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a1h_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a2_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a3_in1k", 160, 224, 0.95, 0.95, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("gluon_in1k", 224, None, 0.875, None, "bicubic", "imagenet", "apache-2.0", _GLUON_URL, None),
    ],
    "resnet152": [
        ("a1_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a1h_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a2_in1k", 224, 288, 0.95, 1.0, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("a3_in1k", 160, 224, 0.95, 0.95, "bicubic", "imagenet", "apache-2.0", _TIMM_URL, _RSB),
        ("gluon_in1k", 224, None, 0.875, None, "bicubic", "imagenet", "apache-2.0", _GLUON_URL, None),
    ],
}

_TORCHVISION_TERMS = (
    "torchvision's code is BSD-3-Clause; of its weights torchvision says they 'may have their own "
    "licenses or terms and conditions derived from the dataset used for training' (ImageNet-1k): "
    "check those terms for your use"
)


def _source_cfgs(arch: str) -> dict[str, PretrainedCfg]:
    """The source weights of a torchvision architecture, by tag (as the plain ResNet uses them), default first."""
    out = {}
    for tag, enum, url, resize, top1, top5, recipe in _TORCHVISION_WEIGHTS[arch]:
        note = f"torchvision's meta for {enum} (ImageNet-1K val, resize {resize}, crop 224)"
        out[tag] = PretrainedCfg(
            source=enum,
            url=url,
            input_size=(3, 224, 224),
            crop_pct=224 / resize,
            interpolation="bilinear",
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            num_classes=1000,
            first_conv="conv1",
            classifier="fc",
            license="bsd-3-clause",
            origin_url="https://github.com/pytorch/vision",
            paper_ids="arXiv:1512.03385",
            notes=(_TORCHVISION_TERMS, f"training recipe: {recipe}"),
            metrics={
                "imagenet-1k/top1": {"value": top1, "kind": "published", "of": "source", "note": note},
                "imagenet-1k/top5": {"value": top5, "kind": "published", "of": "source", "note": note},
            },
        )
    for tag, size, test_size, crop, test_crop, interp, norm, license, origin, paper in _TIMM_WEIGHTS[arch]:
        stats = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if norm == "imagenet" else ((0.5,) * 3, (0.5,) * 3)
        out[tag] = PretrainedCfg(
            source=f"hf-hub:timm/{arch}.{tag}",
            hf_hub_id=f"timm/{arch}.{tag}",
            input_size=(3, size, size),
            test_input_size=(3, test_size, test_size) if test_size else None,
            crop_pct=crop,
            test_crop_pct=test_crop,
            interpolation=interp,
            mean=stats[0],
            std=stats[1],
            num_classes=1000,
            first_conv="conv1",
            classifier="fc",
            license=license,
            origin_url=origin,
            paper_ids=paper,
            notes=(
                f"timm's {arch}.{tag} weights (timm.models.get_pretrained_cfg('{arch}.{tag}')); timm's cfg "
                "publishes no accuracy",
            ),
        )
    return out


_MOMENTUM_REFIT = {
    "imagenet-1k/top1@refit-1-epoch": {
        "value": 73.5,
        "kind": "published",
        "of": "model",
        "note": "after refit: 26.5% top-1 error after 1 epoch of refit of a pretrained ResNet-152 moved to gamma = "
        "0.9 (Sander et al. 2021, Momentum Residual Neural Networks, arXiv:2102.07870); published for that "
        "refit, not measured on these weights",
    },
    "imagenet-1k/top1@refit-5-epochs": {
        "value": 76.5,
        "kind": "published",
        "of": "model",
        "note": "after refit: 23.5% top-1 error after 5 epochs of refit (same source); recipe "
        "imagenet_refit_momentum_resnet152",
    },
}


def _family_cfgs(prefix: str, arch: str) -> dict[str, PretrainedCfg]:
    """What each family computes with each source weight of ``arch`` (``"resnet50"``), keyed ``"name.tag"``."""
    name = f"{prefix}{arch}"
    out = {}
    for tag, src in _source_cfgs(arch).items():
        what = f"{src.source}"
        if prefix == "":
            out[f"{name}.{tag}"] = src.replace(
                conversion=(
                    "none: the plain zoo ResNet is the source architecture with the same parameter names; "
                    f"{what} loads unchanged and computes the source function (its published accuracy is this model's)"
                )
            )
        elif prefix == "depth_scaled_":
            out[f"{name}.{tag}"] = src.replace(
                conversion=(
                    f"{what} with the last BatchNorm of every block of a residual stack (a shape-changing first "
                    "block of a stage stays an ordinary block) multiplied by N, the stack's number of steps: x + (1/N) "
                    "f(x) is then the source block relu(x + g(x)) exactly, so the model computes the source function "
                    "(to float rounding; its published accuracy is this model's)"
                ),
                recipe="imagenet_finetune_depth_scaled_resnet50" if (arch, tag) == ("resnet50", "tv2_in1k") else None,
            )
        elif prefix == "heun_":
            out[f"{name}.{tag}"] = src.replace(
                conversion=(
                    f"{what} folded at step h = 1/N as for depth_scaled_{arch}, so that the Euler predictor of step n, "
                    "y = x_n + h f_n(x_n), is source block n, B_n(x_n); Heun's rule then returns x_{n+1} = x_n + h/2 "
                    "(f_n(x_n) + f_{n+1}(y)) = (x_n + B_{n+1}(B_n(x_n))) / 2 over the stack's blocks B_0 .. B_{N-1} "
                    "(the last step uses B_{N-1} twice): the "
                    "mean of the step's input and two source blocks composed, NOT the source function (whose step is "
                    "y); the published accuracy is of the source only, the model needs fine-tuning"
                )
            )
        else:
            out[f"{name}.{tag}"] = src.replace(
                model_args={"gamma": 0.9},
                conversion=(
                    f"{what} in the momentum rule at gamma = 0.9 (v_0 = 0; each stage's first block an ordinary "
                    "block, as published): v_{n+1} = 0.9 v_n + 0.1 (B_n(x_n) - x_n), x_{n+1} = x_n + v_{n+1}, with "
                    "B_n(x) = relu(x + g_n(x)) source block n, so each block's update enters at a tenth and persists "
                    "through the velocity: NOT the source function before a refit (gamma = 0 is: tag "
                    f"{tag}_gamma0); the source's published accuracy is not this model's before a refit"
                ),
                metrics={**src.metrics, **(_MOMENTUM_REFIT if arch == "resnet152" and tag.startswith("tv") else {})},
                recipe="imagenet_refit_momentum_resnet152" if (arch, tag) == ("resnet152", "tv2_in1k") else None,
            )
            out[f"{name}.{tag}_gamma0"] = src.replace(
                model_args={"gamma": 0.0, "memory": "full"},
                conversion=(
                    f"{what} in the momentum rule at gamma = 0 (memory='full': the reversible engine divides by "
                    "gamma): v_{n+1} = B_n(x_n) - x_n, x_{n+1} = B_n(x_n), the source function exactly (its published "
                    "accuracy is this model's)"
                ),
            )
    return out


default_cfgs = {
    name: cfg
    for prefix in ("", "depth_scaled_", "heun_", "momentum_")
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    for name, cfg in _family_cfgs(prefix, arch).items()
}
register_pretrained_cfgs(default_cfgs)


# ------------------------------------------------------------------------------------------------
# Builders (timm's signature: ``pretrained``, then keyword arguments; every one goes through
# zoo.pretrained.build_model)

_IMAGENET = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _imagenet(
    cls: type[ResNet], arch: str, depth: int, pretrained: bool, weights: str | None, kwargs: dict[str, Any]
) -> ResNet:
    block, layers = _IMAGENET[depth]
    fixed = [name for name in ("layers", "block") if name in kwargs]
    if fixed:
        raise ZooError(
            f"the ResNet-{depth} builders fix layers={list(layers)} and block={block!r} (torchvision's "
            f"resnet{depth}), got {', '.join(f'{n}={kwargs[n]!r}' for n in fixed)}; for another layout use "
            "the cifar_resnet builders (stem='imagenet' for the ImageNet stem) or zoo.models."
            f"{cls.__name__}(layers=..., block=...)"
        )
    return build_model(
        cls,
        arch,
        {"layers": layers, "block": block},
        kwargs,
        pretrained=pretrained,
        weights=weights,
        base_cfg=_base_cfg("imagenet"),
        fixed_args=("layers", "block"),
    )


def _cifar(
    cls: type[ResNet], arch: str, n: int | None, pretrained: bool, weights: str | None, kwargs: dict[str, Any]
) -> ResNet:
    """He et al.'s CIFAR ResNet-(6n+2): 3x3 stem, three stages of n basic blocks, 16/32/64 channels (each a default:
    ``layers``, ``widths``, ``block`` and ``stem`` may be given). A builder that names its depth (resnet20_cifar: n =
    3) passes n and fixes ``layers``; the configurable cifar_resnet builders pass None: ResNet-20's layers by
    default, any ``layers`` given."""
    layers = (3, 3, 3) if n is None else (n, n, n)
    defaults = {"num_classes": 10, "layers": layers, "widths": (16, 32, 64), "block": "basic", "stem": "cifar"}
    return build_model(
        cls,
        arch,
        defaults,
        kwargs,
        pretrained=pretrained,
        weights=weights,
        base_cfg=_base_cfg(kwargs.get("stem", "cifar")),
        fixed_args=() if n is None else ("layers",),
    )


def _tiny(cls: type[ResNet], arch: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> ResNet:
    """The tiny CIFAR net: 5x5 conv to 16 channels, pooled to 10x10, N pre-activation blocks, last BN at 0 (defaults:
    ``depth`` N = 16, or ``layers``; ``widths``, ``block`` and ``stem`` may be given too)."""
    if "depth" in kwargs and "layers" in kwargs:
        raise ZooError(
            f"give depth or layers, not both (depth={kwargs['depth']!r} is layers=(depth,)), got "
            f"layers={kwargs['layers']!r}"
        )
    kwargs = dict(kwargs)
    depth = positive_int("depth", kwargs.pop("depth", 16))
    defaults = {
        "layers": (depth,),
        "widths": (16,),
        "block": "preact",
        "stem": "tiny",
        "num_classes": 10,
        "zero_init_last": True,
    }
    return build_model(
        cls,
        arch,
        defaults,
        kwargs,
        pretrained=pretrained,
        weights=weights,
        base_cfg=_base_cfg(kwargs.get("stem", "tiny")),
    )


# ------------------------------------------------------------------------------------------------
# ResNet


@register_model
def resnet18(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Plain ResNet-18: torchvision's ``resnet18`` (same layout, parameter names and function), each stage a
    residual stack at step 1.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("resnet18.*")``): ``tv_in1k``
    (torchvision's IMAGENET1K_V1), and timm's Hub weights of the same layout; ``pretrained=True`` loads the default
    tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(ResNet, "resnet18", 18, pretrained, weights, kwargs)


@register_model
def resnet34(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Plain ResNet-34: torchvision's ``resnet34`` (same layout, parameter names and function), each stage a
    residual stack at step 1.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("resnet34.*")``): ``tv_in1k``
    (torchvision's IMAGENET1K_V1), and timm's Hub weights of the same layout; ``pretrained=True`` loads the default
    tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(ResNet, "resnet34", 34, pretrained, weights, kwargs)


@register_model
def resnet50(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Plain ResNet-50: torchvision's ``resnet50`` (same layout, parameter names and function), each stage a
    residual stack at step 1.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("resnet50.*")``): ``tv2_in1k``
    (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same layout;
    ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(ResNet, "resnet50", 50, pretrained, weights, kwargs)


@register_model
def resnet101(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Plain ResNet-101: torchvision's ``resnet101`` (same layout, parameter names and function), each stage a
    residual stack at step 1.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("resnet101.*")``): ``tv2_in1k``
    (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same layout;
    ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(ResNet, "resnet101", 101, pretrained, weights, kwargs)


@register_model
def resnet152(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> ResNet:
    """Plain ResNet-152: torchvision's ``resnet152`` (same layout, parameter names and function), each stage a
    residual stack at step 1.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("resnet152.*")``): ``tv2_in1k``
    (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same layout;
    ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(ResNet, "resnet152", 152, pretrained, weights, kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> ResNet:
    """ResNet-20 for CIFAR (He et al.): 3x3 stem, 3 stages of 3 basic blocks, 16/32/64 channels, 10 classes
    (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(ResNet, "resnet20_cifar", 3, pretrained, weights, kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> ResNet:
    """ResNet-56 for CIFAR (He et al.): 3x3 stem, 3 stages of 9 basic blocks, 16/32/64 channels, 10 classes
    (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(ResNet, "resnet56_cifar", 9, pretrained, weights, kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> ResNet:
    """ResNet-110 for CIFAR (He et al.): 3x3 stem, 3 stages of 18 basic blocks, 16/32/64 channels, 10 classes
    (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(ResNet, "resnet110_cifar", 18, pretrained, weights, kwargs)


@register_model
def cifar_resnet(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> ResNet:
    """ResNet-(6n+2) CIFAR-style net with configurable ``layers`` (blocks per stage; default 3, 3, 3), ``widths``
    (16, 32, 64), ``block``, ``stem`` and ``tied``. No pretrained weights."""
    return _cifar(ResNet, "cifar_resnet", None, pretrained, weights, kwargs)


@register_model
def tiny(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> ResNet:
    """The tiny CIFAR net as a ResNet: 5x5 conv to 16 channels, pooled to 10x10, ``depth``
    (default 16) pre-activation blocks, last BatchNorm at zero. No pretrained weights."""
    return _tiny(ResNet, "tiny", pretrained, weights, kwargs)


# ------------------------------------------------------------------------------------------------
# DepthScaledResNet


@register_model
def depth_scaled_resnet18(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> DepthScaledResNet:
    """Depth-scaled ResNet-18 (R1): x_{n+1} = x_n + f_n(x_n) / N in every stage; torchvision/timm weights are folded
    (last BatchNorm of each block times N), so they compute the source function exactly.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("depth_scaled_resnet18.*")``):
    ``tv_in1k`` (torchvision's IMAGENET1K_V1), and timm's Hub weights of the same layout; ``pretrained=True`` loads
    the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(DepthScaledResNet, "depth_scaled_resnet18", 18, pretrained, weights, kwargs)


@register_model
def depth_scaled_resnet34(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> DepthScaledResNet:
    """Depth-scaled ResNet-34 (R1): x_{n+1} = x_n + f_n(x_n) / N in every stage; torchvision/timm weights are folded
    (last BatchNorm of each block times N), so they compute the source function exactly.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("depth_scaled_resnet34.*")``):
    ``tv_in1k`` (torchvision's IMAGENET1K_V1), and timm's Hub weights of the same layout; ``pretrained=True`` loads
    the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(DepthScaledResNet, "depth_scaled_resnet34", 34, pretrained, weights, kwargs)


@register_model
def depth_scaled_resnet50(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> DepthScaledResNet:
    """Depth-scaled ResNet-50 (R1): x_{n+1} = x_n + f_n(x_n) / N in every stage; torchvision/timm weights are folded
    (last BatchNorm of each block times N), so they compute the source function exactly.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("depth_scaled_resnet50.*")``):
    ``tv2_in1k`` (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same
    layout; ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(DepthScaledResNet, "depth_scaled_resnet50", 50, pretrained, weights, kwargs)


@register_model
def depth_scaled_resnet101(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> DepthScaledResNet:
    """Depth-scaled ResNet-101 (R1): x_{n+1} = x_n + f_n(x_n) / N in every stage; torchvision/timm weights are
    folded (last BatchNorm of each block times N), so they compute the source function exactly.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("depth_scaled_resnet101.*")``):
    ``tv2_in1k`` (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same
    layout; ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(DepthScaledResNet, "depth_scaled_resnet101", 101, pretrained, weights, kwargs)


@register_model
def depth_scaled_resnet152(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> DepthScaledResNet:
    """Depth-scaled ResNet-152 (R1): x_{n+1} = x_n + f_n(x_n) / N in every stage; torchvision/timm weights are
    folded (last BatchNorm of each block times N), so they compute the source function exactly.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("depth_scaled_resnet152.*")``):
    ``tv2_in1k`` (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same
    layout; ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(DepthScaledResNet, "depth_scaled_resnet152", 152, pretrained, weights, kwargs)


@register_model
def depth_scaled_resnet20_cifar(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> DepthScaledResNet:
    """Depth-scaled ResNet-20 for CIFAR (He et al.): 3x3 stem, 3 stages of 3 basic blocks, 16/32/64 channels, 10
    classes (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(DepthScaledResNet, "depth_scaled_resnet20_cifar", 3, pretrained, weights, kwargs)


@register_model
def depth_scaled_resnet56_cifar(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> DepthScaledResNet:
    """Depth-scaled ResNet-56 for CIFAR (He et al.): 3x3 stem, 3 stages of 9 basic blocks, 16/32/64 channels, 10
    classes (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(DepthScaledResNet, "depth_scaled_resnet56_cifar", 9, pretrained, weights, kwargs)


@register_model
def depth_scaled_resnet110_cifar(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> DepthScaledResNet:
    """Depth-scaled ResNet-110 for CIFAR (He et al.): 3x3 stem, 3 stages of 18 basic blocks, 16/32/64 channels, 10
    classes (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(DepthScaledResNet, "depth_scaled_resnet110_cifar", 18, pretrained, weights, kwargs)


@register_model
def depth_scaled_cifar_resnet(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> DepthScaledResNet:
    """Depth-scaled ResNet-(6n+2) CIFAR-style net with configurable ``layers`` (blocks per stage; default 3, 3, 3),
    ``widths`` (16, 32, 64), ``block``, ``stem`` and ``tied``. No pretrained weights."""
    return _cifar(DepthScaledResNet, "depth_scaled_cifar_resnet", None, pretrained, weights, kwargs)


@register_model
def depth_scaled_tiny(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> DepthScaledResNet:
    """The tiny CIFAR net as a DepthScaledResNet: 5x5 conv to 16 channels, pooled to 10x10,
    ``depth`` (default 16) pre-activation blocks, last BatchNorm at zero. No pretrained weights."""
    return _tiny(DepthScaledResNet, "depth_scaled_tiny", pretrained, weights, kwargs)


# ------------------------------------------------------------------------------------------------
# HeunNet


@register_model
def heun_resnet18(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> HeunNet:
    """HeunNet-18 (H1): Heun's rule x_{n+1} = x_n + h/2 (f_n(x_n) + f_{n+1}(x_n + h f_n(x_n))), h = 1/N, in every
    stage; source weights are folded as for the depth-scaled net (a starting point for fine-tuning: not the source
    function).

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("heun_resnet18.*")``): ``tv_in1k``
    (torchvision's IMAGENET1K_V1), and timm's Hub weights of the same layout; ``pretrained=True`` loads the default
    tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(HeunNet, "heun_resnet18", 18, pretrained, weights, kwargs)


@register_model
def heun_resnet34(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> HeunNet:
    """HeunNet-34 (H1): Heun's rule x_{n+1} = x_n + h/2 (f_n(x_n) + f_{n+1}(x_n + h f_n(x_n))), h = 1/N, in every
    stage; source weights are folded as for the depth-scaled net (a starting point for fine-tuning: not the source
    function).

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("heun_resnet34.*")``): ``tv_in1k``
    (torchvision's IMAGENET1K_V1), and timm's Hub weights of the same layout; ``pretrained=True`` loads the default
    tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(HeunNet, "heun_resnet34", 34, pretrained, weights, kwargs)


@register_model
def heun_resnet50(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> HeunNet:
    """HeunNet-50 (H1): Heun's rule x_{n+1} = x_n + h/2 (f_n(x_n) + f_{n+1}(x_n + h f_n(x_n))), h = 1/N, in every
    stage; source weights are folded as for the depth-scaled net (a starting point for fine-tuning: not the source
    function).

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("heun_resnet50.*")``): ``tv2_in1k``
    (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same layout;
    ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(HeunNet, "heun_resnet50", 50, pretrained, weights, kwargs)


@register_model
def heun_resnet101(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> HeunNet:
    """HeunNet-101 (H1): Heun's rule x_{n+1} = x_n + h/2 (f_n(x_n) + f_{n+1}(x_n + h f_n(x_n))), h = 1/N, in every
    stage; source weights are folded as for the depth-scaled net (a starting point for fine-tuning: not the source
    function).

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("heun_resnet101.*")``): ``tv2_in1k``
    (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same layout;
    ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(HeunNet, "heun_resnet101", 101, pretrained, weights, kwargs)


@register_model
def heun_resnet152(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> HeunNet:
    """HeunNet-152 (H1): Heun's rule x_{n+1} = x_n + h/2 (f_n(x_n) + f_{n+1}(x_n + h f_n(x_n))), h = 1/N, in every
    stage; source weights are folded as for the depth-scaled net (a starting point for fine-tuning: not the source
    function).

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("heun_resnet152.*")``): ``tv2_in1k``
    (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same layout;
    ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(HeunNet, "heun_resnet152", 152, pretrained, weights, kwargs)


@register_model
def heun_resnet20_cifar(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> HeunNet:
    """HeunNet-20 for CIFAR (He et al.): 3x3 stem, 3 stages of 3 basic blocks, 16/32/64 channels, 10 classes
    (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(HeunNet, "heun_resnet20_cifar", 3, pretrained, weights, kwargs)


@register_model
def heun_resnet56_cifar(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> HeunNet:
    """HeunNet-56 for CIFAR (He et al.): 3x3 stem, 3 stages of 9 basic blocks, 16/32/64 channels, 10 classes
    (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(HeunNet, "heun_resnet56_cifar", 9, pretrained, weights, kwargs)


@register_model
def heun_resnet110_cifar(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> HeunNet:
    """HeunNet-110 for CIFAR (He et al.): 3x3 stem, 3 stages of 18 basic blocks, 16/32/64 channels, 10 classes
    (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(HeunNet, "heun_resnet110_cifar", 18, pretrained, weights, kwargs)


@register_model
def heun_cifar_resnet(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> HeunNet:
    """HeunNet-(6n+2) CIFAR-style net with configurable ``layers`` (blocks per stage; default 3, 3, 3), ``widths``
    (16, 32, 64), ``block``, ``stem`` and ``tied``. No pretrained weights."""
    return _cifar(HeunNet, "heun_cifar_resnet", None, pretrained, weights, kwargs)


@register_model
def heun_tiny(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> HeunNet:
    """The tiny CIFAR net as a HeunNet: 5x5 conv to 16 channels, pooled to 10x10, ``depth``
    (default 16) pre-activation blocks, last BatchNorm at zero. No pretrained weights."""
    return _tiny(HeunNet, "heun_tiny", pretrained, weights, kwargs)


# ------------------------------------------------------------------------------------------------
# MomentumResNet


@register_model
def momentum_resnet18(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MomentumResNet:
    """Momentum ResNet-18 (M1): v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n), x_{n+1} = x_n + v_{n+1} after each
    stage's first block, gamma 0.9, ``memory='reversible'`` (exact backprop, memory flat in depth); gamma = 0 (with
    ``memory='full'``) is torchvision's ``resnet18``.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("momentum_resnet18.*")``):
    ``tv_in1k`` (torchvision's IMAGENET1K_V1), and timm's Hub weights of the same layout; ``pretrained=True`` loads
    the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(MomentumResNet, "momentum_resnet18", 18, pretrained, weights, kwargs)


@register_model
def momentum_resnet34(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MomentumResNet:
    """Momentum ResNet-34 (M1): v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n), x_{n+1} = x_n + v_{n+1} after each
    stage's first block, gamma 0.9, ``memory='reversible'`` (exact backprop, memory flat in depth); gamma = 0 (with
    ``memory='full'``) is torchvision's ``resnet34``.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("momentum_resnet34.*")``):
    ``tv_in1k`` (torchvision's IMAGENET1K_V1), and timm's Hub weights of the same layout; ``pretrained=True`` loads
    the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(MomentumResNet, "momentum_resnet34", 34, pretrained, weights, kwargs)


@register_model
def momentum_resnet50(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MomentumResNet:
    """Momentum ResNet-50 (M1): v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n), x_{n+1} = x_n + v_{n+1} after each
    stage's first block, gamma 0.9, ``memory='reversible'`` (exact backprop, memory flat in depth); gamma = 0 (with
    ``memory='full'``) is torchvision's ``resnet50``.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("momentum_resnet50.*")``):
    ``tv2_in1k`` (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same
    layout; ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(MomentumResNet, "momentum_resnet50", 50, pretrained, weights, kwargs)


@register_model
def momentum_resnet101(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MomentumResNet:
    """Momentum ResNet-101 (M1): v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n), x_{n+1} = x_n + v_{n+1} after each
    stage's first block, gamma 0.9, ``memory='reversible'`` (exact backprop, memory flat in depth); gamma = 0 (with
    ``memory='full'``) is torchvision's ``resnet101``.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("momentum_resnet101.*")``):
    ``tv2_in1k`` (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same
    layout; ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(MomentumResNet, "momentum_resnet101", 101, pretrained, weights, kwargs)


@register_model
def momentum_resnet152(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MomentumResNet:
    """Momentum ResNet-152 (M1): v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n), x_{n+1} = x_n + v_{n+1} after each
    stage's first block, gamma 0.9, ``memory='reversible'`` (exact backprop, memory flat in depth); gamma = 0 (with
    ``memory='full'``) is torchvision's ``resnet152``.

    torchvision's layout (layers and block fixed). Tags (``zoo.list_pretrained("momentum_resnet152.*")``):
    ``tv2_in1k`` (torchvision's IMAGENET1K_V2, the default), ``tv_in1k`` (V1), and timm's Hub weights of the same
    layout; ``pretrained=True`` loads the default tag, ``weights=`` any source zoo reads.
    """
    return _imagenet(MomentumResNet, "momentum_resnet152", 152, pretrained, weights, kwargs)


@register_model
def momentum_resnet20_cifar(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MomentumResNet:
    """Momentum ResNet-20 for CIFAR (He et al.): 3x3 stem, 3 stages of 3 basic blocks, 16/32/64 channels, 10 classes
    (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(MomentumResNet, "momentum_resnet20_cifar", 3, pretrained, weights, kwargs)


@register_model
def momentum_resnet56_cifar(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MomentumResNet:
    """Momentum ResNet-56 for CIFAR (He et al.): 3x3 stem, 3 stages of 9 basic blocks, 16/32/64 channels, 10 classes
    (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(MomentumResNet, "momentum_resnet56_cifar", 9, pretrained, weights, kwargs)


@register_model
def momentum_resnet110_cifar(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MomentumResNet:
    """Momentum ResNet-110 for CIFAR (He et al.): 3x3 stem, 3 stages of 18 basic blocks, 16/32/64 channels, 10
    classes (defaults: ``layers``, ``widths``, ``block``, ``stem`` may be given). No pretrained weights."""
    return _cifar(MomentumResNet, "momentum_resnet110_cifar", 18, pretrained, weights, kwargs)


@register_model
def momentum_cifar_resnet(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MomentumResNet:
    """Momentum ResNet-(6n+2) CIFAR-style net with configurable ``layers`` (blocks per stage; default 3, 3, 3),
    ``widths`` (16, 32, 64), ``block``, ``stem`` and ``tied``. No pretrained weights."""
    return _cifar(MomentumResNet, "momentum_cifar_resnet", None, pretrained, weights, kwargs)


@register_model
def momentum_tiny(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MomentumResNet:
    """The tiny CIFAR net as a MomentumResNet: 5x5 conv to 16 channels, pooled to 10x10,
    ``depth`` (default 16) pre-activation blocks, last BatchNorm at zero. No pretrained weights."""
    return _tiny(MomentumResNet, "momentum_tiny", pretrained, weights, kwargs)


__all__: list[str] = [
    "ResNet",
    "DepthScaledResNet",
    "HeunNet",
    "MomentumResNet",
    "BasicBlock",
    "Bottleneck",
    "PreActBlock",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet20_cifar",
    "resnet56_cifar",
    "resnet110_cifar",
    "cifar_resnet",
    "tiny",
    "depth_scaled_resnet18",
    "depth_scaled_resnet34",
    "depth_scaled_resnet50",
    "depth_scaled_resnet101",
    "depth_scaled_resnet152",
    "depth_scaled_resnet20_cifar",
    "depth_scaled_resnet56_cifar",
    "depth_scaled_resnet110_cifar",
    "depth_scaled_cifar_resnet",
    "depth_scaled_tiny",
    "heun_resnet18",
    "heun_resnet34",
    "heun_resnet50",
    "heun_resnet101",
    "heun_resnet152",
    "heun_resnet20_cifar",
    "heun_resnet56_cifar",
    "heun_resnet110_cifar",
    "heun_cifar_resnet",
    "heun_tiny",
    "momentum_resnet18",
    "momentum_resnet34",
    "momentum_resnet50",
    "momentum_resnet101",
    "momentum_resnet152",
    "momentum_resnet20_cifar",
    "momentum_resnet56_cifar",
    "momentum_resnet110_cifar",
    "momentum_cifar_resnet",
    "momentum_tiny",
]
