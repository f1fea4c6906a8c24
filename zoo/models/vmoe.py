"""Vision mixtures of experts (V-MoE): a ViT whose MLP is a sparse MoE in every other block.

The network is timm's ``VisionTransformer`` layout and names (:class:`zoo.models.SinkformerViT`, whose
``n_iter=1`` attention is softmax attention), with ``blocks.{i}.mlp`` replaced by :class:`zoo.nn.MoE` in the
MoE blocks (``moe_every=2``: blocks 1, 3, 5, ... counted from 0, i.e. every second block ending with the last,
as V-MoE's "Every-2")::

    x = x + attn(norm1(x))
    x = x + MoE(norm2(x)),   MoE(x) = sum_{(e, w) routed from x} w * MLP_e(x)               (E1)

The router is the MoE's: ``"expert_choice"`` (each expert takes its k tokens of the group, load balanced by
construction, the published relaxed-router setting) or ``"token_choice"`` (top-k experts per token, capacity,
Switch load-balancing loss weighted by ``aux_loss_weight``), with the hard top-k or the relaxed one
(``topk="soft"``: sparse and differentiable). The model hands the weighted load-balancing
loss to the Lightning task through :meth:`VisionMoE.auxiliary_losses` (added to the training loss) and the routing
statistics through :meth:`VisionMoE.diagnostics` (logged as ``{stage}_moe/...``:
:func:`zoo.nn.moe.routing_statistics`). timm's model protocol is SinkformerViT's.

Upcycling: a dense checkpoint (a timm ViT's ``blocks.{i}.mlp.fc1/fc2``) loads into the experts of the MoE
blocks, every expert a copy of the dense MLP and the router at zero; ``converters.transform(vit, to="moe")``
does the same from a timm model instance. With identical experts the model computes the dense ViT exactly
when every token's combine weights sum to 1 and nothing is dropped: ``router="token_choice",
normalize_gates=True, capacity_factor=None`` (any k), or ``router="expert_choice", capacity_factor=None``
(every expert takes every token with weight 1/E). The sparse defaults then route by the learned router and
drop or share tokens, which fine-tuning adapts to.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_

from zoo._deprecation import renamed_argument, renamed_arguments
from zoo.errors import ZooError
from zoo.models.vit import SinkformerViT, _vit_cfg
from zoo.nn.moe import MoE, routing_statistics
from zoo.pretrained import PretrainedCfg, build_model, register_pretrained_cfgs
from zoo.registry import register_model
from zoo.validation import finite_float, int_sequence, positive_int

__all__ = ["VisionMoE", "default_cfgs", "vmoe_small_patch32_224", "vmoe_tiny_patch32_224", "moe_block_indices"]

_EXPERT_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
_DEPRECATED_ARGS = ("router_n_iter", "moe_layers")  # VisionMoE's deprecated names of dykstra_iters, moe_blocks


@renamed_arguments(every="moe_every", layers="moe_blocks")
def moe_block_indices(
    depth: int,
    moe_every: int = 2,
    moe_blocks: Sequence[int] | None = None,
    *,
    every: int | None = None,
    layers: Sequence[int] | None = None,
) -> list[int]:
    """The blocks that get an MoE MLP: the block indices ``moe_blocks`` when given, else every ``moe_every``-th
    block ending with the last (``moe_every=2``, depth 12: 1, 3, ..., 11; ``moe_every=1``: all).

    Args:
        depth: the number of blocks.
        moe_every: an MoE in every ``moe_every``-th block, ending with the last.
        moe_blocks: explicit block indices (counted from 0) instead of ``moe_every``; an empty list means no MoE
            block at all, which is what :meth:`VisionMoE.prune_intermediate_layers` records when it removes every
            MoE block (so that the pruned model rebuilds from its hyperparameters).
        every: the deprecated name of ``moe_every``.
        layers: the deprecated name of ``moe_blocks``.
    """
    if moe_blocks is not None:
        hint = f"give the indices of the blocks that get experts, such as [{depth - 1}] (the last block)"
        out = sorted(set(int_sequence("moe_blocks", moe_blocks, min_value=0, allow_empty=True, hint=hint)))
        if out and out[-1] >= depth:
            raise ZooError(
                f"moe_blocks {list(moe_blocks)} must be a list of block indices in "
                f"[0, {depth - 1}] (blocks count from 0; depth={depth})"
            )
        return out
    positive_int("moe_every", moe_every)
    if moe_every > depth:
        raise ZooError(
            f"moe_every={moe_every} exceeds depth={depth}: no block would get an MoE; use moe_every <= depth"
        )
    return [i for i in range(depth) if (i + 1) % moe_every == 0]


class VisionMoE(SinkformerViT):
    """V-MoE: a ViT (timm layout and names) with :class:`zoo.nn.MoE` MLPs in every ``moe_every``-th block.

    Args (besides those of :class:`zoo.models.SinkformerViT`: sizes, ``n_iter`` = 1 softmax attention, dropout
    rates, ``weights`` and the training hyperparameters):
        num_experts: experts per MoE layer.
        moe_every: an MoE in every ``moe_every``-th block, ending with the last; ``moe_blocks``: explicit block
            indices instead (counted from 0; ``[]``: none, what a model pruned of every MoE block records).
        router, k, capacity_factor, topk, normalize_gates, group_size: the :class:`zoo.nn.MoE` routing options
            (expert choice by default: k = round(capacity_factor * n / E) tokens per expert and group).
        lam, p, solver, dykstra_iters: the relaxed top-k of ``topk="soft"`` (MoE's; defaults: Dykstra, p = 2,
            10 iterations, as published).
        aux_loss_weight: weight of the summed load-balancing losses in the training loss (token choice; the
            expert-choice loss is exactly zero).
        img_size: the input size (int or (H, W)), as SinkformerViT's.
        patch_size: the patch size (32 for the published V-MoE), as SinkformerViT's.
        weights: as SinkformerViT; a dense ViT checkpoint is upcycled (experts = copies, router = 0).
        router_n_iter, moe_layers: deprecated names of ``dykstra_iters`` and ``moe_blocks`` (FutureWarning;
            giving both names is an error). Files saved with them still load; the model saves the new names.
        **kwargs: SinkformerViT's (and the training settings; default optimiser SinkformerViT's AdamW).
    """

    same_function_args = SinkformerViT.same_function_args | {"aux_loss_weight"}

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 32,
        num_experts: int = 8,
        moe_every: int = 2,
        moe_blocks: Sequence[int] | None = None,
        router: str = "expert_choice",
        k: int | None = None,
        capacity_factor: float | None | str = "auto",
        topk: str = "hard",
        normalize_gates: bool | None = None,
        group_size: int | None = None,
        lam: float | None = None,
        p: float | None = None,
        solver: str | None = None,
        dykstra_iters: int | None = None,
        aux_loss_weight: float = 0.01,
        n_iter: int = 1,
        weights: str | None = None,
        *,
        router_n_iter: int | None = None,
        moe_layers: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        # the deprecated names map to the new ones before the hyperparameters are recorded
        dykstra_iters = renamed_argument("VisionMoE", "dykstra_iters", dykstra_iters, "router_n_iter", router_n_iter)
        moe_blocks = renamed_argument("VisionMoE", "moe_blocks", moe_blocks, "moe_layers", moe_layers)
        router_n_iter = moe_layers = None
        positive_int("num_experts", num_experts)
        finite_float("aux_loss_weight", aux_loss_weight, 0.0)
        super().__init__(img_size=img_size, patch_size=patch_size, n_iter=n_iter, weights=None, **kwargs)
        for deprecated in _DEPRECATED_ARGS:  # saved under the new names only
            self.hparams.pop(deprecated, None)
            getattr(self, "_hparams_initial", {}).pop(deprecated, None)
        if self.blocks[0].mlp is None:
            raise ZooError("a V-MoE needs MLP blocks: mlp_ratio must be > 0")
        self.moe_indices = moe_block_indices(len(self.blocks), moe_every, moe_blocks)
        options = {
            "router": router,
            "k": k,
            "capacity_factor": capacity_factor,
            "topk": topk,
            "normalize_gates": normalize_gates,
            "group_size": group_size,
            "lam": lam,
            "p": p,
            "solver": solver,
            "dykstra_iters": dykstra_iters,
        }
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

    def _record_structure(self) -> None:
        """SinkformerViT's, and the MoE blocks that pruning kept (explicit ``moe_blocks`` are cut to the blocks
        left; ``moe_every`` places them by index, the same in the shorter model). When pruning removed every MoE
        block, ``moe_blocks=[]`` is recorded (``moe_every`` would place one again, or exceed the depth)."""
        super()._record_structure()
        self.moe_indices = [i for i in self.moe_indices if i < len(self.blocks)]
        if self.hparams.get("moe_blocks") is not None or not self.moe_indices:
            self.hparams["moe_blocks"] = list(self.moe_indices)

    def moe_modules(self) -> list[MoE]:
        """The :class:`zoo.nn.MoE` layers, in block order (of the blocks kept by ``prune_intermediate_layers``)."""
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]

    def routing_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"blocks.1.mlp": {"tokens_per_expert": ..., "dropped_fraction": ..., ...}, ...}`` of the last forward."""
        return {
            f"blocks.{i}.mlp": dict(block.mlp.stats)
            for i, block in enumerate(self.blocks)
            if isinstance(block.mlp, MoE)
        }

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """``{"moe/weighted_aux_loss": aux_loss_weight * sum of the MoE layers' load-balancing losses}`` of the last
        forward (graph attached: the task adds it to the training loss and logs it as ``{stage}_moe/weighted_aux_loss``
        beside the unweighted ``moe/aux_loss`` of :meth:`diagnostics`; exactly 0 for expert choice)."""
        layers = self.moe_modules()
        if not layers:
            return {}
        total = torch.stack([m.aux_loss.float() for m in layers]).sum()
        return {"moe/weighted_aux_loss": self.hparams["aux_loss_weight"] * total}

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """The routing statistics of the last forward (:func:`zoo.nn.moe.routing_statistics`) as ``moe/aux_loss``
        (unweighted sum), ``moe/dropped_fraction``, ``moe/router_entropy``, ``moe/expert_load_max``,
        ``moe/expert_load_min``: the task logs them as ``{stage}_moe/...``; and the Sinkformer ViT's (the
        attentions' column sums with ``record_stats=True``)."""
        moe = {f"moe/{name}": value for name, value in routing_statistics(self.moe_modules()).items()}
        return {**super().diagnostics(), **moe}

    def adapt_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], source_hparams: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
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
# Pretrained configurations: dense timm weights upcycled, and the published relaxed-router experiment

_UPCYCLE_CONVERSION = (
    "upcycled: every expert of an MoE block a copy of that block's dense MLP, the router at zero (gates 1/E); with "
    "the builder's sparse router (expert choice, k=28 of 400 tokens) tokens are shared out, another function until "
    "fine-tuned; router='expert_choice', group_size=None, capacity_factor=None (every expert takes every token "
    "with weight 1/E) or router='token_choice', normalize_gates=True, capacity_factor=None (any k) compute "
    "timm's dense ViT exactly"
)

default_cfgs: dict[str, PretrainedCfg] = register_pretrained_cfgs(
    {
        "vmoe_small_patch32_224.augreg_in21k_ft_in1k": _vit_cfg(
            source="hf-hub:timm/vit_small_patch32_224.augreg_in21k_ft_in1k",
            hf_hub_id="timm/vit_small_patch32_224.augreg_in21k_ft_in1k",
            license="apache-2.0",
            origin_url="https://github.com/google-research/vision_transformer",
            paper_ids="arXiv:2106.10270",
            conversion=_UPCYCLE_CONVERSION,
            metrics={
                "imagenet-1k/top1": {
                    "value": 76.010,
                    "kind": "published",
                    "of": "source",
                    "note": "timm's results-imagenet.csv (the dense vit_small_patch32_224)",
                }
            },
            notes=("weights of timm's dense vit_small_patch32_224.augreg_in21k_ft_in1k, upcycled",),
        ),
        "vmoe_small_patch32_224.relaxed_topk_jft300m": _vit_cfg(
            num_classes=18291,
            paper_ids="arXiv:2302.01425",
            model_args={"topk": "soft"},
            notes=(
                "published configuration without weights: V-MoE S/32 with the relaxed top-k router (p = 2, Dykstra, "
                "10 iterations), 32 experts, k = 28 of 400 tokens, 7 epochs of JFT-300M (18291 classes, not public), "
                "Adam (0.9, 0.999), lr 1e-3, 10k warm-up steps, linear decay, weight decay 0.1; published without an "
                "absolute number: the relaxed router beat the hard one on precision-at-1 (no zoo recipe ships for "
                "it; recipes/digits_vmoe_soft.yaml is a small analogue)",
            ),
        ),
    }
)


# ------------------------------------------------------------------------------------------------
# Builders


def _build(
    arch: str, defaults: dict[str, Any], kwargs: dict[str, Any], pretrained: bool, weights: str | None
) -> VisionMoE:
    return build_model(VisionMoE, arch, defaults, kwargs, pretrained=pretrained, weights=weights, base_cfg=_vit_cfg())


@register_model
def vmoe_tiny_patch32_224(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> VisionMoE:
    """V-MoE Ti/32 (ViT-Ti: 192 wide, 12 blocks, 3 heads; patch 32), 8 experts in every other block,
    expert-choice router (capacity factor 2). ``weights`` may be a dense timm ViT of that shape (upcycled); timm
    publishes no Ti/32 weights, so there is no pretrained tag."""
    return _build(
        "vmoe_tiny_patch32_224",
        {"embed_dim": 192, "depth": 12, "num_heads": 3, "num_experts": 8},
        kwargs,
        pretrained,
        weights,
    )


@register_model
def vmoe_small_patch32_224(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> VisionMoE:
    """V-MoE S/32 as in the published relaxed-router experiment: ViT-S (384 wide, 12 blocks, 6 heads), 32 experts
    in every other block, expert choice with k = 28 tokens per expert in groups of 400 tokens (8 images of 50);
    trains with AdamW lr 1e-3, weight decay 0.1; ``topk="soft"`` (tag ``relaxed_topk_jft300m``) for the relaxed
    router. A ``capacity_factor`` given replaces the published k (k = round(capacity_factor * n / E)); with
    ``router="token_choice"`` neither the published k nor the groups apply.
    ``pretrained=True``: timm's dense ``vit_small_patch32_224.augreg_in21k_ft_in1k`` upcycled (tag
    ``augreg_in21k_ft_in1k``, see :data:`default_cfgs` for the settings that compute the dense model exactly).
    ``weights``: a checkpoint, ``save_pretrained`` output or ``hf-hub:`` id (a dense ViT's is upcycled)."""
    kwargs.setdefault("optimizer", functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))
    defaults = {"embed_dim": 384, "depth": 12, "num_heads": 6, "num_experts": 32, "k": 28, "group_size": 400}
    if kwargs.get("router", "expert_choice") != "expert_choice":  # the published k and groups are expert choice's
        del defaults["k"], defaults["group_size"]
    elif "capacity_factor" in kwargs:  # the caller sizes the experts' buffers: the published k no longer applies
        del defaults["k"]
    return _build("vmoe_small_patch32_224", defaults, kwargs, pretrained, weights)
