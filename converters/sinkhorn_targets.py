"""Conversion targets of the attention family: ``"sinkhorn"``.

Attention targets (family ``"attention"``: a timm ``VisionTransformer``, a torchvision
``VisionTransformer``, any module holding timm ``Attention`` or ``torch.nn.MultiheadAttention``):

- ``"sinkhorn"``: Sinkhorn attention (S1): the attention matrix exp(q k^T / sqrt(d))
  normalised by ``n_iter`` alternating row / column normalisations (default 3) instead of one row
  softmax; ``n_iter=1`` is the source function. Every timm ``Attention`` becomes a
  :class:`zoo.nn.SinkhornAttention` and every ``nn.MultiheadAttention`` a
  :class:`zoo.nn.SinkhornMultiheadAttention` that take over the source module's own submodules and
  parameter tensors (no new parameters, same names, so the state dict still loads into the source
  architecture). A timm ``VisionTransformer`` of the standard layout (class token or average pooling,
  learned position embedding, timm ``Block``/``Attention``/``Mlp``, no register tokens) becomes the zoo
  :class:`zoo.models.SinkformerViT` LightningModule (trains with ``Trainer.fit``, saves with
  ``save_pretrained``, accepts the training settings ``optimizer``, ``lr_scheduler``, ``label_smoothing``,
  ``layer_decay``, ``mixup_alpha``, ``cutmix_alpha``, ``grad_checkpointing``); any other source comes back as
  itself (same class) with its attention swapped (an info line says why a ViT did not map).
  Copies: like every target, the source is left unchanged by default: the conversion works on a deep
  copy (the result's parameters are that copy's, moved by no further copy). ``inplace=True`` copies
  nothing: the swap happens in the source itself (which is returned), or the SinkformerViT is built
  on the source's very parameter tensors (training one trains the other). Options: ``n_iter``,
  ``record_stats`` (column-sum statistics, :func:`zoo.nn.attention_stats`), ``inplace``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

import zoo.hub
from converters.registry import (
    IMAGE_TRAINING_OPTIONS,
    _class_name,
    _mirror_runtime_state,
    _not_the_zoo_family,
    register_target,
    source_device_dtype,
)
from zoo.errors import ZooError

__all__ = [
    "SINKHORN_OPTIONS",
    "SINKHORN_VIT_OPTIONS",
    "AttentionSpec",
    "build_sinkformer_vit",
    "count_attention",
    "swap_attention",
]


@dataclass
class AttentionSpec:
    """A source whose attention modules (timm ``Attention``, ``torch.nn.MultiheadAttention``) become Sinkhorn
    attention (the ``"attention"`` family).

    ``model`` is the source itself: the target copies it (or not, ``inplace=True``) and swaps the attention
    modules of that model. ``vit_config``: the :class:`zoo.models.SinkformerViT` arguments when the source
    maps onto that family (a timm ``VisionTransformer`` of the standard layout), else None and ``why_not``
    says why (an info line). ``label`` names the source in messages. ``build``: for a source with its own zoo
    family (fairseq's transformer -> ``SinkformerTranslation``), ``build(n_iter, record_stats, inplace, options)``
    gives the zoo model; None for the others.
    """

    label: str
    model: nn.Module
    vit_config: dict[str, Any] | None = None
    why_not: str = ""
    build: Callable[..., nn.Module] | None = None  # (n_iter, record_stats, inplace, options) -> the zoo model


SINKHORN_OPTIONS: tuple[str, ...] = ("n_iter", "record_stats", "inplace")
SINKHORN_VIT_OPTIONS: tuple[str, ...] = IMAGE_TRAINING_OPTIONS


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


def build_sinkformer_vit(
    spec: AttentionSpec, n_iter: int, record_stats: bool, inplace: bool, options: dict[str, Any]
) -> nn.Module:
    """The zoo :class:`SinkformerViT` LightningModule with the source ViT's weights (copied; shared with
    ``inplace=True``), device, dtype, train/eval modes and ``requires_grad`` flags.

    Args:
        spec: the source, read by its source file (with ``vit_config``).
        n_iter: Sinkhorn half-steps of the attention (1 is softmax attention).
        record_stats: whether the attentions record their column-sum statistics.
        inplace: whether the zoo model shares the source's parameter tensors instead of copying them.
        options: further arguments of :class:`SinkformerViT` (the training settings).
    """
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


@register_target(
    "sinkhorn",
    "attention",
    (*SINKHORN_OPTIONS, *SINKHORN_VIT_OPTIONS),
    "Sinkhorn attention (S1) with the same weights: n_iter = 1 is the same function; a timm ViT of "
    "the standard layout becomes the zoo SinkformerViT",
)
def _to_sinkhorn(spec: AttentionSpec, options: dict[str, Any]) -> nn.Module:
    n_iter, record_stats, inplace = _check_sinkhorn_options(options)
    if spec.vit_config is not None:
        return build_sinkformer_vit(spec, n_iter, record_stats, inplace, options)
    if spec.build is not None:  # a source with its own zoo family (fairseq's transformer -> SinkformerTranslation)
        return spec.build(n_iter, record_stats, inplace, options)
    _not_the_zoo_family(
        spec, options, "SinkformerViT", "with Sinkhorn attention", "its attention swapped", SINKHORN_OPTIONS
    )
    model = swap_attention(
        spec.model if inplace else copy.deepcopy(spec.model), n_iter=n_iter, record_stats=record_stats
    )
    if hasattr(model, "set_n_iter"):  # a zoo SinkformerViT: keep its hyperparameters in step
        model.set_n_iter(n_iter)
        model.set_record_stats(record_stats)
    return model
