"""Conversion targets of the MLP family: ``"moe"`` (sparse upcycling).

Mixture-of-experts target (family ``"mlp"``: a timm ``VisionTransformer``, or a timm ViT's ``blocks``):

- ``"moe"``: the MLP of every ``moe_every``-th block (or of the blocks ``moe_blocks``) becomes a
  :class:`zoo.nn.MoE` whose experts are copies of the dense MLP (fc1, GELU, fc2, with its ``requires_grad``
  flags) and whose router starts at zero. With identical experts the result is the source function whenever
  every token's combine weights sum to 1 and no token is dropped (token choice with ``normalize_gates=True,
  capacity_factor=None``, or expert choice with ``capacity_factor=None``); the sparse defaults are a starting
  point for fine-tuning. A timm ``VisionTransformer`` of the standard layout becomes the zoo
  :class:`zoo.models.VisionMoE` LightningModule (accepts ``aux_loss_weight`` and the training settings); any
  other source comes back as a copy of itself with ``MoE.from_mlp`` layers in place of the chosen MLPs.
  Options (VisionMoE's names): ``num_experts`` (8), ``moe_every`` (2), ``moe_blocks``, ``router``, ``k``,
  ``capacity_factor``, ``topk``, ``normalize_gates``, ``group_size``, ``lam``, ``p``, ``solver``,
  ``dykstra_iters``; ``every``, ``moe_layers`` and ``router_n_iter`` are deprecated names of ``moe_every``,
  ``moe_blocks`` and ``dykstra_iters`` (FutureWarning; giving both names is an error).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

import zoo.hub
from converters.registry import (
    IMAGE_TRAINING_OPTIONS,
    _mirror_runtime_state,
    _not_the_zoo_family,
    register_target,
    source_device_dtype,
)
from zoo._deprecation import renamed_argument
from zoo.errors import ZooError

__all__ = ["MOE_OPTIONS", "MOE_VIT_OPTIONS", "MLPSpec"]


@dataclass
class MLPSpec:
    """A source whose Transformer MLPs become :class:`zoo.nn.MoE` layers (the ``"mlp"`` family).

    ``model`` is the source itself; ``blocks`` the name of its ``nn.Sequential`` of blocks (each with an
    ``mlp``), ``""`` when the source is that sequence. ``vit_config``: the :class:`zoo.models.VisionMoE`
    arguments when the source maps onto that family (a timm ``VisionTransformer`` of the standard layout), else
    None and ``why_not`` says why. ``label`` names the source in messages.
    """

    label: str
    model: nn.Module
    blocks: str = "blocks"
    vit_config: dict[str, Any] | None = None
    why_not: str = ""


MOE_OPTIONS: tuple[str, ...] = (
    "num_experts",
    "moe_every",
    "moe_blocks",
    "router",
    "k",
    "capacity_factor",
    "topk",
    "normalize_gates",
    "group_size",
    "lam",
    "p",
    "solver",
    "dykstra_iters",
)
MOE_VIT_OPTIONS: tuple[str, ...] = ("aux_loss_weight", *IMAGE_TRAINING_OPTIONS)
# deprecated option names (one release) -> their names in MOE_OPTIONS
_RENAMED_MOE_OPTIONS: dict[str, str] = {
    "every": "moe_every",
    "moe_layers": "moe_blocks",
    "router_n_iter": "dykstra_iters",
}


def _moe_routing_options(options: dict[str, Any]) -> tuple[int, int, Any, dict[str, Any]]:
    """Pop ``num_experts``, ``moe_every``, ``moe_blocks`` and the MoE routing options (the names of MoE and
    VisionMoE alike), the deprecated names mapped to theirs."""
    for old, new in _RENAMED_MOE_OPTIONS.items():
        if old in options:
            options[new] = renamed_argument(
                "converters.transform(to='moe')",
                new,
                options.get(new),
                old,
                options.pop(old),
                new_given=new in options,
                stacklevel=5,
            )
    num_experts = options.pop("num_experts", 8)
    moe_every = options.pop("moe_every", 2)
    moe_blocks = options.pop("moe_blocks", None)
    if isinstance(moe_blocks, (list, tuple)) and not moe_blocks:
        raise ZooError(
            "moe_blocks=[] would turn no MLP into experts: give the indices of the blocks that get experts, such as "
            "[1, 3], or leave moe_blocks out (moe_every places them)"
        )
    routing = {name: options.pop(name) for name in MOE_OPTIONS[3:] if name in options}
    return num_experts, moe_every, moe_blocks, routing


def _copy_expert_flags(moe: nn.Module, dense: nn.Module | None) -> None:
    """The experts get the ``requires_grad`` flags of the dense MLP they copy (a frozen MLP stays frozen)."""
    for layer in ("fc1", "fc2"):
        for leaf in ("weight", "bias"):
            theirs = getattr(getattr(dense, layer, None), leaf, None)
            mine = getattr(getattr(moe.experts, layer), leaf)
            if isinstance(theirs, nn.Parameter) and isinstance(mine, nn.Parameter):
                mine.requires_grad_(theirs.requires_grad)


@register_target(
    "moe",
    "mlp",
    (*MOE_OPTIONS, *MOE_VIT_OPTIONS, *_RENAMED_MOE_OPTIONS),
    "sparse mixture of experts in every `moe_every`-th block, each expert a copy of the dense MLP and the "
    "router at zero (upcycling); a timm ViT of the standard layout becomes the zoo VisionMoE",
)
def _to_moe(spec: MLPSpec, options: dict[str, Any]) -> nn.Module:
    from zoo.models.vmoe import VisionMoE, moe_block_indices
    from zoo.nn.moe import MoE

    num_experts, moe_every, moe_blocks, routing = _moe_routing_options(options)
    source = spec.model
    if spec.vit_config is not None:
        device, dtype = source_device_dtype(source, spec.label)
        model = VisionMoE(
            **spec.vit_config, num_experts=num_experts, moe_every=moe_every, moe_blocks=moe_blocks, **routing, **options
        )
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
    for i in moe_block_indices(len(blocks), moe_every, moe_blocks):
        mlp = getattr(blocks[i], "mlp", None)
        if mlp is None:
            raise ZooError(f"{spec.label}: block {i} has no mlp to turn into experts")
        blocks[i].mlp = MoE.from_mlp(mlp, num_experts, **routing)
        _copy_expert_flags(blocks[i].mlp, mlp)
    return model
