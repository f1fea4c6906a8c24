"""ResNets as ODE discretisations: depth-scaled ResNets (R1) and HeunNets (H1), MATH.md sections 1-3.

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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import stochastic_depth

from zoo.errors import ZooError
from zoo.hub import HubMixin, load_weights, recorded_num_classes
from zoo.nn import ResidualStack
from zoo.nn.residual_stack import INIT_VELOCITIES, MEMORY_MODES, RULES
from zoo.ops.fixed_point import post_activation_residual
from zoo.registry import register_model
from zoo.tasks import ImageClassifier
from zoo.validation import boolean, choice, finite_float, int_sequence, positive_int, probability

BLOCKS = ("basic", "bottleneck", "preact")
STEMS = ("imagenet", "cifar", "tiny")

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


class _ResNetBlock(nn.Module):
    """Shared logic: full block output as a transition, residual function inside a stack.

    ``residual_step`` is None for a transition block (output ``act(shortcut(x) + g(x))``); a
    :class:`ResidualStack` sets it to its step h, and the block then returns its residual function.
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
            out = shortcut + g
            return F.relu(out) if self.post_activation else out
        if not self.post_activation:
            return g
        if h == 1.0:  # the momentum and plain rules: the same values without two element-wise passes
            return post_activation_residual(x, g)
        return (F.relu(x + h * g) - x) / h

    def split_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, str] | None:
        """Inside a stack: (g(x), tail) with the residual function f(x) = residual_tail(x, g(x), tail), so that a
        reversible momentum stack fuses the element-wise tail into its fixed-point step (None: no split)."""
        h = self.residual_step
        if h is None or (self.post_activation and h != 1.0):
            return None
        return self._g(x), ("relu" if self.post_activation else "identity")


class BasicBlock(_ResNetBlock):
    """torchvision's BasicBlock: g(x) = bn2(conv2(relu(bn1(conv1(x)))))."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path: float = 0.0):
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
    """torchvision's Bottleneck (stride on the 3x3 conv): 1x1 -> 3x3 -> 1x1 with BN and ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path: float = 0.0):
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
    no activation after the sum, so the stack is exactly x_{n+1} = x_n + h f(x_n)."""

    expansion = 1
    post_activation = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path: float = 0.0):
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
            to ``widths[0]`` channels, average-pooled to 10x10, as in MATH.md section 3).
        rule: forward rule of every stage, ``"euler"``, ``"heun"`` (or ``"momentum"``).
        scale: step of the rule, ``"depth"`` (1/N per stage) or a number.
        gamma: momentum term of the momentum rule (M1).
        init_velocity: initial velocity of the momentum rule: ``"zero"`` or ``"f"`` (v_0 = f_0(x_0)).
        memory: ``"full"``, ``"adjoint"`` (store each stage's output only) (or ``"reversible"``).
        tied: share the weights of the residual blocks within each stage: ``True`` for every stage,
            or the numbers of the tied stages (``[2, 3]``; stages count from 1).
        num_classes, in_chans: classifier outputs, input channels.
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
        **kwargs: training hyperparameters of :class:`zoo.tasks.ImageClassifier`.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        block: str = "basic",
        widths: Sequence[int] | None = None,
        stem: str = "imagenet",
        rule: str = "euler",
        scale: float | str = 1.0,
        gamma: float = 0.9,
        memory: str = "full",
        init_velocity: str = "zero",
        tied: bool | Sequence[int] = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = False,
        weights: str | None = None,
        keep_first_block: bool = False,
        **kwargs: Any,
    ):
        # hparams keep the arguments as given: the checked values get their own names
        choice("block", block, BLOCKS)
        choice("stem", stem, STEMS)
        layer_counts = int_sequence("layers", layers, min_value=1)
        stage_widths = (int_sequence("widths", widths, min_value=1, length=len(layer_counts)) if widths is not None
                        else tuple(64 * 2**i for i in range(len(layer_counts))))
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
                raise ZooError(f"tied must be true/false or stage numbers 1..{len(layer_counts)}, got {list(tied)}; "
                               "stages count from 1")
        positive_int("in_chans", in_chans)
        probability("drop_rate", drop_rate)
        probability("drop_path_rate", drop_path_rate)
        boolean("zero_init_last", zero_init_last)
        boolean("keep_first_block", keep_first_block)
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
                ResidualStack(blocks, rule=rule, scale=scale, gamma=gamma, memory=memory, transition=transition,
                              init_velocity=init_velocity),
            )
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_features = inplanes
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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.forward_head(self.forward_features(x))

    # ---------------------------------------------------------------- weights saved at another step
    def rescale_residual_weights(self, state_dict: Mapping[str, torch.Tensor],
                                 source_scale: float | str = 1.0) -> dict[str, torch.Tensor]:
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

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                         source_hparams: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        """Weight-loader hook (:func:`zoo.hub.load_state_dict`): weights without recorded
        hyperparameters come from a plain ResNet (step 1); zoo weights record their ``scale``."""
        source_scale = 1.0 if source_hparams is None else source_hparams.get("scale", 1.0)
        if (source_hparams is not None and source_hparams.get("rule") == "momentum"
                and "keep_first_block" not in source_hparams and self.hparams.get("keep_first_block")
                and any(s.transition is not None and s.transition.downsample is None for s in self.stages)):
            from lightning.pytorch.utilities import rank_zero_warn

            # same parameter names, other function: the saved model had this block inside its momentum stack
            rank_zero_warn("zoo: these Momentum ResNet weights were saved before keep_first_block existed, with the "
                           "shape-keeping first block inside the momentum stack; this model keeps it an ordinary block "
                           "(the published definition), so it computes another function: build it with "
                           "keep_first_block=False to reproduce the saved model")
        return self.rescale_residual_weights(state_dict, source_scale)

    # ---------------------------------------------------------------- depth operations (MATH.md s1)
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
    """ResNet with the depth written explicitly: x_{n+1} = x_n + f(x_n)/N in every stage (R1)."""

    def __init__(self, *args: Any, rule: str = "euler", scale: float | str = "depth", **kwargs: Any):
        super().__init__(*args, rule=rule, scale=scale, **kwargs)


class HeunNet(ResNet):
    """ResNet whose stages follow Heun's second-order rule (H1) with step 1/N."""

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
    flat in depth; ``"full"`` is autograd."""

    # what a file saved before an argument existed was built with (zoo.hub.from_pretrained fills it in)
    legacy_init_args = {"keep_first_block": False}

    def __init__(self, *args: Any, rule: str = "momentum", scale: float | str = 1.0, gamma: float = 0.9,
                 memory: str = "reversible", keep_first_block: bool = True, **kwargs: Any):
        super().__init__(*args, rule=rule, scale=scale, gamma=gamma, memory=memory,
                         keep_first_block=keep_first_block, **kwargs)


# ------------------------------------------------------------------------------------------------
# Builders

_IMAGENET = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _imagenet(cls: type[ResNet], depth: int, weights: str | None, kwargs: dict) -> ResNet:
    block, layers = _IMAGENET[depth]
    fixed = [name for name in ("layers", "block") if name in kwargs]
    if fixed:
        raise ZooError(f"the ResNet-{depth} builders fix layers={list(layers)} and block={block!r} (torchvision's "
                       f"resnet{depth}), got {', '.join(f'{n}={kwargs[n]!r}' for n in fixed)}; for another layout use "
                       "the cifar_resnet builders (stem='imagenet' for the ImageNet stem) or zoo.models."
                       f"{cls.__name__}(layers=..., block=...)")
    return cls(layers=layers, block=block, weights=weights, **kwargs)


def _cifar(cls: type[ResNet], n: int, weights: str | None, kwargs: dict) -> ResNet:
    """He et al.'s CIFAR ResNet-(6n+2): 3x3 stem, three stages of n basic blocks, 16/32/64 channels (each a
    default: ``layers``, ``widths``, ``block`` and ``stem`` may be given)."""
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("layers", (n, n, n))
    kwargs.setdefault("widths", (16, 32, 64))
    kwargs.setdefault("block", "basic")
    kwargs.setdefault("stem", "cifar")
    return cls(weights=weights, **kwargs)


def _tiny(cls: type[ResNet], weights: str | None, kwargs: dict) -> ResNet:
    """MATH.md section 3: 5x5 conv to 16 channels, pooled to 10x10, N pre-activation blocks, last BN at 0
    (defaults: ``depth`` N = 16, or ``layers``; ``widths``, ``block`` and ``stem`` may be given too)."""
    if "depth" in kwargs and "layers" in kwargs:
        raise ZooError(f"give depth or layers, not both (depth={kwargs['depth']!r} is layers=(depth,)), got "
                       f"layers={kwargs['layers']!r}")
    depth = positive_int("depth", kwargs.pop("depth", 16))
    kwargs.setdefault("layers", (depth,))
    kwargs.setdefault("widths", (16,))
    kwargs.setdefault("block", "preact")
    kwargs.setdefault("stem", "tiny")
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("zero_init_last", True)
    return cls(weights=weights, **kwargs)


def _register_family(prefix: str, cls: type[ResNet], doc: str) -> None:
    import sys

    module = sys.modules[__name__]

    def make(name: str, build, text: str) -> None:
        def builder(weights: str | None = None, **kwargs: Any) -> ResNet:
            kwargs = dict(kwargs)
            if weights is not None and "num_classes" not in kwargs:  # build the head the weights hold (as timm)
                recorded = recorded_num_classes(weights)
                if recorded is not None:
                    kwargs["num_classes"] = recorded
            return build(weights, kwargs)

        builder.__name__ = builder.__qualname__ = name
        builder.__module__ = __name__
        builder.__doc__ = text
        setattr(module, name, register_model(builder))
        __all__.append(name)

    for depth in _IMAGENET:
        make(f"{prefix}resnet{depth}", lambda w, kw, d=depth: _imagenet(cls, d, w, kw),
             f"{doc} ResNet-{depth} (torchvision layout and weights).")
    for depth in (20, 56, 110):
        make(f"{prefix}resnet{depth}_cifar", lambda w, kw, d=depth: _cifar(cls, (d - 2) // 6, w, kw),
             f"{doc} CIFAR ResNet-{depth} (3 stages of {(depth - 2) // 6} blocks, 16/32/64 channels).")
    make(f"{prefix}cifar_resnet", lambda w, kw: _cifar(cls, 3, w, kw),
         f"{doc} CIFAR-style ResNet with configurable ``layers`` (blocks per stage), ``widths`` and ``tied``.")
    make(f"{prefix}tiny", lambda w, kw: _tiny(cls, w, kw),
         f"{doc} tiny CIFAR net of MATH.md section 3 with ``depth`` pre-activation blocks.")


__all__: list[str] = [
    "ResNet", "DepthScaledResNet", "HeunNet", "MomentumResNet", "BasicBlock", "Bottleneck", "PreActBlock",
]
_register_family("", ResNet, "Plain")
_register_family("depth_scaled_", DepthScaledResNet, "Depth-scaled (x + f(x)/N)")
_register_family("heun_", HeunNet, "HeunNet (H1)")
_register_family("momentum_", MomentumResNet, "Momentum ResNet (M1, exactly reversible)")
