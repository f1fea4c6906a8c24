"""Vision mixtures of experts (V-MoE, MATH.md section 7): a ViT whose MLP is a sparse MoE in every other block.

The network is timm's ``VisionTransformer`` layout and names (:class:`zoo.models.SinkformerViT`, whose
``n_iter=1`` attention is softmax attention), with ``blocks.{i}.mlp`` replaced by :class:`zoo.nn.MoE` in the
MoE blocks (``moe_every=2``: blocks 1, 3, 5, ... counted from 0, i.e. every second block ending with the last,
as V-MoE's "Every-2")::

    x = x + attn(norm1(x))
    x = x + MoE(norm2(x)),   MoE(x) = sum_{(e, w) routed from x} w * MLP_e(x)               (M1)

The router is the MoE's: ``"expert_choice"`` (each expert takes its k tokens of the group, load balanced by
construction, the published relaxed-router setting) or ``"token_choice"`` (top-k experts per token, capacity,
Switch load-balancing loss weighted by ``aux_loss_weight``), with the hard top-k or the relaxed one
(``topk="soft"``: sparse and differentiable, MATH.md section 6). The Lightning task adds the auxiliary losses
to the training loss and logs the routing statistics (tokens per expert, dropped tokens, router entropy).

Upcycling: a dense checkpoint (a timm ViT's ``blocks.{i}.mlp.fc1/fc2``) loads into the experts of the MoE
blocks, every expert a copy of the dense MLP and the router at zero; ``converters.transform(vit, to="moe")``
does the same from a timm model instance. With identical experts the model computes the dense ViT exactly
when every token's combine weights sum to 1 and nothing is dropped: ``router="token_choice",
normalize_gates=True, capacity_factor=None`` (any k), or ``router="expert_choice", capacity_factor=None``
(every expert takes every token with weight 1/E). The sparse defaults then route by the learned router and
drop or share tokens, which fine-tuning adapts to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_

from zoo.errors import ZooError
from zoo.hub import recorded_num_classes
from zoo.models.vit import SinkformerViT
from zoo.nn.moe import MoE
from zoo.registry import register_model
from zoo.validation import finite_float, int_sequence, positive_int

__all__ = ["VisionMoE", "vmoe_small_patch32_224", "vmoe_tiny_patch32_224", "moe_block_indices"]

_EXPERT_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def moe_block_indices(depth: int, every: int = 2, layers: Sequence[int] | None = None) -> list[int]:
    """The blocks that get an MoE MLP: ``layers`` when given, else every ``every``-th block ending with the last
    (``every=2``, depth 12: 1, 3, ..., 11; ``every=1``: all)."""
    if layers is not None:
        out = sorted(set(int_sequence("moe_layers", layers, min_value=0)))
        if out[-1] >= depth:
            raise ZooError(f"moe_layers {list(layers)} must be a non-empty list of block indices in [0, {depth - 1}] "
                           f"(blocks count from 0; depth={depth})")
        return out
    positive_int("every (moe_every)", every)
    if every > depth:
        raise ZooError(f"every={every} exceeds depth={depth}: no block would get an MoE; use every <= depth")
    return [i for i in range(depth) if (i + 1) % every == 0]


class VisionMoE(SinkformerViT):
    """V-MoE: a ViT (timm layout and names) with :class:`zoo.nn.MoE` MLPs in every ``moe_every``-th block.

    Args (besides those of :class:`zoo.models.SinkformerViT`: sizes, ``n_iter`` = 1 softmax attention, dropout
    rates, ``weights`` and the training hyperparameters):
        num_experts: experts per MoE layer.
        moe_every: an MoE in every ``moe_every``-th block, ending with the last; ``moe_layers``: explicit indices.
        router, k, capacity_factor, topk, normalize_gates, group_size: the :class:`zoo.nn.MoE` routing options
            (expert choice by default: k = round(capacity_factor * n / E) tokens per expert and group).
        lam, p, solver, router_n_iter: the relaxed top-k of ``topk="soft"`` (MoE's ``lam``, ``p``, ``solver``,
            ``n_iter``; defaults: Dykstra, p = 2, 10 iterations, as published).
        aux_loss_weight: weight of the summed load-balancing losses in the training loss (token choice; the
            expert-choice loss is exactly zero).
        weights: as SinkformerViT; a dense ViT checkpoint is upcycled (experts = copies, router = 0).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 32,
        num_experts: int = 8,
        moe_every: int = 2,
        moe_layers: Sequence[int] | None = None,
        router: str = "expert_choice",
        k: int | None = None,
        capacity_factor: float | None | str = "auto",
        topk: str = "hard",
        normalize_gates: bool | None = None,
        group_size: int | None = None,
        lam: float | None = None,
        p: float | None = None,
        solver: str | None = None,
        router_n_iter: int | None = None,
        aux_loss_weight: float = 0.01,
        n_iter: int = 1,
        weights: str | None = None,
        **kwargs: Any,
    ) -> None:
        positive_int("num_experts", num_experts)
        finite_float("aux_loss_weight", aux_loss_weight, 0.0)
        super().__init__(img_size=img_size, patch_size=patch_size, n_iter=n_iter, weights=None, **kwargs)
        if self.blocks[0].mlp is None:
            raise ZooError("a V-MoE needs MLP blocks: mlp_ratio must be > 0")
        self.moe_indices = moe_block_indices(len(self.blocks), moe_every, moe_layers)
        options = {"router": router, "k": k, "capacity_factor": capacity_factor, "topk": topk,
                   "normalize_gates": normalize_gates, "group_size": group_size, "lam": lam, "p": p,
                   "solver": solver, "n_iter": router_n_iter}
        for i in self.moe_indices:
            mlp = self.blocks[i].mlp
            drop = (mlp.drop1.p, mlp.drop2.p)
            self.blocks[i].mlp = MoE(self.embed_dim, mlp.fc1.out_features, num_experts, drop=drop, **options)
        self._init_experts()
        if weights is not None:
            from zoo.hub import load_weights

            load_weights(self, weights)

    def _init_experts(self) -> None:
        """Experts as timm initialises a ViT MLP (truncated normal, std 0.02; zero biases), router std 0.02."""
        for moe in self.moe_modules():
            for lin in (moe.experts.fc1, moe.experts.fc2):
                trunc_normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    torch.nn.init.zeros_(lin.bias)
            trunc_normal_(moe.router.weight, std=0.02)
            if moe.router.bias is not None:
                torch.nn.init.zeros_(moe.router.bias)

    def routing_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"blocks.1.mlp": {"tokens_per_expert": ..., "dropped_fraction": ..., ...}, ...}`` of the last forward."""
        return {f"blocks.{i}.mlp": dict(self.blocks[i].mlp.stats) for i in self.moe_indices}

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                         source_hparams: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        """Weight-loader hook: upcycle dense MLPs (``blocks.{i}.mlp.fc1.weight`` ... of an MoE block become
        ``experts.fc1.weight`` ... repeated over the experts, the router zero), then SinkformerViT's
        position-embedding resampling."""
        sd = super().adapt_state_dict(state_dict, source_hparams)
        for i in self.moe_indices:
            prefix = f"blocks.{i}.mlp."
            if not any(prefix + key in sd for key in _EXPERT_KEYS) or prefix + "experts.fc1.weight" in sd:
                continue
            dense = {key: sd.pop(prefix + key) for key in _EXPERT_KEYS if prefix + key in sd}
            sd.update({prefix + name: t for name, t in self.blocks[i].mlp.upcycled_state_dict(dense).items()})
        return sd


# ------------------------------------------------------------------------------------------------
# Builders


def _build(weights: str | None, defaults: dict[str, Any], kwargs: dict[str, Any]) -> VisionMoE:
    if weights is not None and "num_classes" not in kwargs:  # build the head the weights hold (timm's behaviour)
        recorded = recorded_num_classes(weights)
        if recorded is not None:
            kwargs["num_classes"] = recorded
    return VisionMoE(weights=weights, **{**defaults, **kwargs})


@register_model
def vmoe_tiny_patch32_224(weights: str | None = None, **kwargs: Any) -> VisionMoE:
    """V-MoE Ti/32 (ViT-Ti: 192 wide, 12 blocks, 3 heads; patch 32), 8 experts in every other block,
    expert-choice router (capacity factor 2). ``weights`` may be a dense timm ``vit_tiny_patch32``-shaped ViT."""
    return _build(weights, {"embed_dim": 192, "depth": 12, "num_heads": 3, "num_experts": 8}, kwargs)


@register_model
def vmoe_small_patch32_224(weights: str | None = None, **kwargs: Any) -> VisionMoE:
    """V-MoE S/32 as in the published relaxed-router experiment (MATH.md section 7): ViT-S (384 wide, 12 blocks,
    6 heads), 32 experts in every other block, expert choice with k = 28 tokens per expert in groups of 400 tokens
    (8 images of 50), Adam (0.9, 0.999), lr 1e-3 with warm-up and weight decay 0.1; ``topk="soft"`` for the
    relaxed router. ``weights`` may be a dense ``hf-hub:timm/vit_small_patch32_224...`` checkpoint (upcycled)."""
    defaults = {"embed_dim": 384, "depth": 12, "num_heads": 6, "num_experts": 32, "k": 28, "group_size": 400,
                "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1}
    return _build(weights, defaults, kwargs)
