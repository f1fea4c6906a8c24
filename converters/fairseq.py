"""fairseq translation Transformers as Sinkformers (family ``"attention"``, ``to="sinkhorn"``).

A live fairseq ``TransformerModel`` (``transformer`` archs, or the ``zoo_fairseq`` plugin's ``sinkformer``)
becomes the native zoo :class:`zoo.models.translation.SinkformerTranslation`: the architecture is read from the
model's ``args`` / ``cfg`` and the weights from its state dict by the same code that reads fairseq checkpoint files
(:func:`converters.fairseq_checkpoint.from_fairseq_checkpoint`; the args' training settings, ``lr``, ``optimizer`` ...,
are not read: the zoo model gets the task's default optimiser unless given one), so the zoo model's encoder
self-attention computes

    A = Sinkhorn_{n_iter}(q k^T / sqrt(d)),   out = W_o (A v) + b_o        (S1-S2)

and ``n_iter=1`` reproduces fairseq's log-probabilities (decoder softmax attention everywhere). The reader
builds the zoo model on the source's very parameter tensors (``assign``); the ``"sinkhorn"`` target then copies it
(default) or returns it as is (``inplace=True``: training one trains the other), with ``n_iter`` set through its
``set_n_iter``. Device, dtype, train/eval mode and ``requires_grad`` flags are the source's.

fairseq is imported only when the caller already has (``sys.modules``): :func:`is_fairseq_transformer` never
imports it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from converters import TRAINING_OPTIONS, AttentionSpec, register_source, source_device_dtype
from zoo.errors import ZooError
from zoo.tasks.optim import check_factory
from zoo.validation import probability

__all__ = ["SOURCE_NAME", "fairseq_model_args", "is_fairseq_transformer", "read_fairseq_transformer"]

SOURCE_NAME = "fairseq TransformerModel (translation transformer archs, zoo_fairseq sinkformer archs)"


def _transformer_classes() -> tuple[type, ...]:
    mod = sys.modules.get("fairseq.models.transformer")
    if mod is None:
        return ()
    return tuple(c for c in (getattr(mod, "TransformerModelBase", None), getattr(mod, "TransformerModel", None)) if c)


def is_fairseq_transformer(model: object) -> bool:
    """True when ``model`` is a fairseq ``TransformerModel`` / ``TransformerModelBase`` (fairseq must already be
    imported)."""
    classes = _transformer_classes()
    return bool(classes) and isinstance(model, classes)


def _plain_arch(arch: Any) -> Any:
    """A ``zoo_fairseq`` Sinkformer arch -> the fairseq transformer arch it is built on."""
    plugin = sys.modules.get("zoo_fairseq.model")
    if plugin is not None and isinstance(arch, str):
        return plugin.transformer_arch(arch)
    return arch


def fairseq_model_args(model: nn.Module) -> dict[str, Any]:
    """The model's ``args`` (argparse Namespace) or ``cfg`` (``TransformerConfig`` dataclass, nested
    ``encoder`` / ``decoder`` / ``quant_noise``) as a dict that :func:`converters.fairseq_checkpoint.fairseq_hparams`
    reads; a ``sinkformer*`` arch is renamed to its transformer arch, a config without an arch (a
    ``TransformerConfig`` holds every field) gets ``transformer``."""
    cfg = getattr(model, "args", None)
    if cfg is None:
        cfg = getattr(model, "cfg", None)
    if isinstance(cfg, argparse.Namespace):
        flat: dict[str, Any] = dict(vars(cfg))
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        flat = dataclasses.asdict(cfg)
    elif isinstance(cfg, Mapping) or type(cfg).__module__.startswith("omegaconf"):
        from converters.fairseq_checkpoint import _as_flat_dict

        flat = _as_flat_dict(cfg, "fairseq model cfg")
    else:
        raise ZooError(f"the fairseq {type(model).__name__} has no args / cfg to read its architecture from")

    def unresolved(v: Any) -> bool:
        return isinstance(v, str) and v.startswith("${")

    def clean(d: dict[str, Any]) -> dict[str, Any]:  # drop omegaconf interpolations left in dataclass defaults
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if not unresolved(v)}

    flat = clean(flat)
    arch = flat.get("arch") or flat.get("_name")
    flat["arch"] = _plain_arch(arch) if arch else "transformer"
    return flat


def _check_layout(model: nn.Module, label: str) -> None:
    from fairseq.modules.multihead_attention import MultiheadAttention

    plugin = sys.modules.get("zoo_fairseq.attention")
    allowed = (MultiheadAttention,) + ((plugin.SinkhornMultiheadAttention,) if plugin is not None else ())
    for name, m in model.named_modules():
        if isinstance(m, MultiheadAttention) and type(m) not in allowed:
            raise ZooError(
                f"{label}: {name} is a {type(m).__module__}.{type(m).__qualname__}, a subclass of "
                "fairseq's MultiheadAttention that may change the forward: not converted"
            )
        if getattr(m, "n_iter", 1) != 1 and name.startswith("decoder."):
            raise ZooError(f"{label}: {name} uses Sinkhorn attention in the decoder: the zoo model has softmax there")


@register_source(SOURCE_NAME, "attention", is_fairseq_transformer)
def read_fairseq_transformer(model: nn.Module) -> AttentionSpec:
    """The zoo :class:`SinkformerTranslation` (``n_iter=1``) of the fairseq translation transformer ``model``, on
    the source's own parameter tensors, device, dtype, mode and flags; the ``"sinkhorn"`` target copies it and sets
    ``n_iter``.

    One ZooError for an unsupported arch or option (checked by ``fairseq_hparams``: BART, adaptive softmax, ...),
    a state dict that does not load strictly, or a subclassed attention."""
    from converters.fairseq_checkpoint import from_fairseq_checkpoint

    label = f"fairseq {type(model).__name__}"
    _check_layout(model, label)
    device, dtype = source_device_dtype(model, label)
    state = model.state_dict()
    if dtype != torch.float32:
        # the reader builds a float32 model: read float32 copies (no "cast to the model's precision" line), which
        # the source's own tensors replace below, in the source's dtype
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    ckpt = {"model": state, "args": argparse.Namespace(**fairseq_model_args(model))}
    zoo_model = from_fairseq_checkpoint(ckpt, n_iter=1)
    zoo_model.pretrained_cfg.update(source=label, description=f"converted from a live {label}")
    zoo_model.to(device=device, dtype=dtype)
    # share the source's parameter tensors (names are fairseq's; tied embeddings stay tied)
    params = dict(model.named_parameters(remove_duplicate=False))
    own = dict(zoo_model.named_parameters(remove_duplicate=False))
    missing = sorted(set(own) - set(params))
    if missing:
        raise ZooError(f"{label}: no parameter for {', '.join(missing[:5])} in the source")
    # assign gives each assigned tensor the requires_grad flag of the parameter it replaces: the source's flags
    # first, so that a frozen source parameter stays frozen (in the source too: the tensors are shared)
    for k, p in own.items():
        p.requires_grad_(params[k].requires_grad)
    zoo_model.load_state_dict({k: params[k] for k in own}, strict=False, assign=True)
    # train/eval mode per module (names are fairseq's), as the other sources
    zoo_model.train(model.training)
    theirs = dict(model.named_modules())
    for name, m in zoo_model.named_modules():
        if name and name in theirs:
            m.training = theirs[name].training

    def build(n_iter: int, record_stats: bool, inplace: bool, options: dict[str, Any]) -> nn.Module:
        unknown = sorted(set(options) - set(TRAINING_OPTIONS))
        if unknown:
            raise ZooError(
                f"option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} do not apply "
                f"to a {label}: accepted options are n_iter, record_stats, inplace, "
                f"{', '.join(TRAINING_OPTIONS)} (the architecture is the source's)"
            )
        converted = zoo_model if inplace else copy.deepcopy(zoo_model)
        converted.set_n_iter(n_iter)
        converted.set_record_stats(record_stats)
        # the training settings the caller gives (the source's own are not read): as the constructor takes them
        if "optimizer" in options:
            converted.optimizer_factory = check_factory("optimizer", options["optimizer"])
        if "lr_scheduler" in options:
            converted.lr_scheduler_factory = check_factory("lr_scheduler", options["lr_scheduler"])
        if "label_smoothing" in options:
            converted.hparams["label_smoothing"] = probability("label_smoothing", options["label_smoothing"])
        return converted

    return AttentionSpec(label=label, model=zoo_model, build=build)
