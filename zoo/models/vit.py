"""Sinkformer vision transformers (MATH.md section 5): timm's ViT with Sinkhorn attention.

Every block is pre-norm, with timm's names:

    x = x + drop_path1(ls1(attn(norm1(x))))        attn: Sinkhorn attention, n_iter half-steps (S1)
    x = x + drop_path2(ls2(mlp(norm2(x))))         (no MLP branch when mlp_ratio = 0)

and attention K = Sinkhorn_{n_iter}(exp(q k^T / sqrt(d_head))), out = K v (:class:`zoo.nn.SinkhornAttention`).
``n_iter=1`` is the softmax Transformer: ``sinkformer_vit_small_patch16_224(weights=W, n_iter=1)``
computes timm's ``vit_small_patch16_224`` with the same weights.

Parameter names are timm's ``VisionTransformer`` ones (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.attn.qkv``, ``norm``, ``head`` ...), so timm checkpoints (``.pth``, ``.safetensors``,
``hf-hub:timm/...``) load without renaming; a position embedding of another grid (a 224 checkpoint in a
32x32 model) is resampled as timm does, a classifier of another size is re-initialised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_

from zoo.errors import ZooError
from zoo.hub import HubMixin, load_weights, recorded_num_classes
from zoo.nn.attention import SinkhornAttention, SinkhornSettings, check_n_iter
from zoo.registry import register_model
from zoo.tasks import ImageClassifier
from zoo.validation import boolean, choice, finite_float, image_size, optional, positive_int, probability

GLOBAL_POOLS = ("token", "avg")


def _norm(dim: int, **kwargs: Any) -> nn.Module:
    return LayerNorm(dim, eps=1e-6, **kwargs)


class SinkformerBlock(nn.Module):
    """timm's pre-norm ``Block`` with :class:`zoo.nn.SinkhornAttention`; ``mlp_ratio=0``: attention only."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_norm: bool = False, attn_head_dim: int | None = None, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, init_values: float | None = None, drop_path: float = 0.0,
                 n_iter: int = 3, record_stats: bool = False) -> None:
        super().__init__()
        self.norm1 = _norm(dim)
        self.attn = SinkhornAttention(dim, num_heads=num_heads, attn_head_dim=attn_head_dim, qkv_bias=qkv_bias,
                                      qk_norm=qk_norm, attn_drop=attn_drop, proj_drop=proj_drop,
                                      norm_layer=_norm if qk_norm else None, n_iter=n_iter,
                                      record_stats=record_stats)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = self.mlp = self.ls2 = self.drop_path2 = None
        if mlp_ratio > 0:
            self.norm2 = _norm(dim)
            self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
            self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
            self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        if self.mlp is not None:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class SinkformerViT(SinkhornSettings, HubMixin, ImageClassifier):
    """Vision transformer with Sinkhorn attention (Sinkformer), timm's ``VisionTransformer`` layout and names.

    Args:
        img_size, patch_size, in_chans: input size (int or (H, W)), square patch size, input channels.
        num_classes: classifier outputs.
        embed_dim, depth, num_heads: width, number of blocks, heads per block.
        mlp_ratio: MLP hidden size / embed_dim; 0 removes the MLP branch (attention-only blocks).
        attn_head_dim: width of a head (default embed_dim / num_heads).
        qkv_bias, qk_norm, init_values: qkv bias, LayerNorm of q and k, LayerScale initial value (None: off).
        class_token: prepend a class token; ``global_pool``: ``"token"`` (class token, final ``norm``) or
            ``"avg"`` (mean of the patch tokens, then ``fc_norm``), as timm.
        n_iter: Sinkhorn half-steps of every attention (1 = softmax, the Transformer).
        record_stats: record the column-sum statistics of every attention (see :meth:`attention_stats`).
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: timm's dropout rates
            (stochastic depth linear in the block index up to ``drop_path_rate``).
        weights: a file (timm or zoo state dict, ``.ckpt``, ``.safetensors``, ``save_pretrained`` folder) or
            ``"hf-hub:org/name"`` (e.g. ``"hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k"``). The
            builders given zoo weights and no ``num_classes`` build the head the weights record (so do the
            V-MoE and point-cloud builders).
        optimizer, lr, weight_decay, **kwargs: training hyperparameters of :class:`zoo.tasks.ImageClassifier`
            (ViT defaults: AdamW, lr 5e-4, weight decay 0.05).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        attn_head_dim: int | None = None,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        global_pool: str = "token",
        n_iter: int = 3,
        record_stats: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weights: str | None = None,
        optimizer: str = "adamw",
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        **kwargs: Any,
    ) -> None:
        check_n_iter(n_iter)
        size = image_size("img_size", img_size)
        positive_int("patch_size", patch_size)
        positive_int("in_chans", in_chans)
        positive_int("embed_dim", embed_dim)
        positive_int("depth", depth)
        positive_int("num_heads", num_heads)
        finite_float("mlp_ratio", mlp_ratio, 0.0, hint="give a number >= 0 (0 removes the MLP branch)")
        optional(positive_int, "attn_head_dim", attn_head_dim)
        for name, flag in (("qkv_bias", qkv_bias), ("qk_norm", qk_norm), ("class_token", class_token),
                           ("record_stats", record_stats)):
            boolean(name, flag)
        optional(finite_float, "init_values", init_values)
        choice("global_pool", global_pool, GLOBAL_POOLS)
        for name, rate in (("drop_rate", drop_rate), ("pos_drop_rate", pos_drop_rate),
                           ("proj_drop_rate", proj_drop_rate), ("attn_drop_rate", attn_drop_rate),
                           ("drop_path_rate", drop_path_rate)):
            probability(name, rate)
        if global_pool == "token" and not class_token:
            raise ZooError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")
        if attn_head_dim is None and embed_dim % num_heads:
            raise ZooError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}: give attn_head_dim")
        if 0 < mlp_ratio and int(embed_dim * mlp_ratio) < 1:
            raise ZooError(f"mlp_ratio={mlp_ratio} gives an MLP of {int(embed_dim * mlp_ratio)} hidden units for "
                           f"embed_dim {embed_dim}: use a larger mlp_ratio, or 0 to remove the MLP branch")
        if any(s % patch_size for s in size):
            raise ZooError(f"img_size {img_size} is not a multiple of patch_size {patch_size}: give an img_size whose "
                           f"height and width are multiples of {patch_size}")
        super().__init__(num_classes=num_classes, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
        self.num_prefix_tokens = 1 if class_token else 0
        self.embed_dim = self.num_features = embed_dim
        self.global_pool = global_pool

        self.patch_embed = PatchEmbed(img_size=size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # timm's linspace(0, rate, depth)
        self.blocks = nn.Sequential(*[
            SinkformerBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                            attn_head_dim=attn_head_dim, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                            init_values=init_values, drop_path=rates[i], n_iter=n_iter, record_stats=record_stats)
            for i in range(depth)
        ])
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else _norm(embed_dim)
        self.fc_norm = _norm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()
        if weights is not None:
            load_weights(self, weights)

    def _init_weights(self) -> None:
        """timm's default ViT initialisation: truncated normal (std 0.02) linears and position embedding."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens after the last block and ``norm``: ``(B, prefix + patches, embed_dim)``."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        if attn_mask is None:
            x = self.blocks(x)
        else:
            for block in self.blocks:
                x = block(x, attn_mask=attn_mask)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.forward_head(self.forward_features(x))

    # ---------------------------------------------------------------- Sinkhorn settings and diagnostics
    @property
    def attentions(self) -> list[SinkhornAttention]:
        return [b.attn for b in self.blocks]

    # ---------------------------------------------------------------- weights from timm
    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                         source_hparams: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        """Weight-loader hook: resample a position embedding of another grid (timm's bicubic resampling)."""
        sd = dict(state_dict)
        pos = sd.get("pos_embed")
        if pos is not None and pos.ndim == 3 and pos.shape != self.pos_embed.shape:
            patches = pos.shape[1] - self.num_prefix_tokens
            side = math.isqrt(max(patches, 0))
            if side * side == patches and pos.shape[2] == self.pos_embed.shape[2]:
                sd["pos_embed"] = resample_abs_pos_embed(
                    pos, new_size=list(self.patch_embed.grid_size), old_size=[side, side],
                    num_prefix_tokens=self.num_prefix_tokens,
                )
        return sd


# ------------------------------------------------------------------------------------------------
# Builders

__all__ = [
    "SinkformerBlock",
    "SinkformerViT",
    "sinkformer_vit_base_patch16_224",
    "sinkformer_vit_cats_dogs",
    "sinkformer_vit_mnist",
    "sinkformer_vit_small_patch16_224",
    "sinkformer_vit_tiny_patch16_224",
]


def _build(weights: str | None, defaults: dict[str, Any], kwargs: dict[str, Any]) -> SinkformerViT:
    if weights is not None and "num_classes" not in kwargs:  # build the head the weights hold (timm's behaviour)
        recorded = recorded_num_classes(weights)
        if recorded is not None:
            kwargs["num_classes"] = recorded
    return SinkformerViT(weights=weights, **{**defaults, **kwargs})


@register_model
def sinkformer_vit_tiny_patch16_224(weights: str | None = None, **kwargs: Any) -> SinkformerViT:
    """Sinkformer ViT-Ti/16 (timm ``vit_tiny_patch16_224``: 192 wide, 12 blocks, 3 heads), ``n_iter=3``."""
    return _build(weights, {"embed_dim": 192, "depth": 12, "num_heads": 3}, kwargs)


@register_model
def sinkformer_vit_small_patch16_224(weights: str | None = None, **kwargs: Any) -> SinkformerViT:
    """Sinkformer ViT-S/16 (timm ``vit_small_patch16_224``: 384 wide, 12 blocks, 6 heads), ``n_iter=3``."""
    return _build(weights, {"embed_dim": 384, "depth": 12, "num_heads": 6}, kwargs)


@register_model
def sinkformer_vit_base_patch16_224(weights: str | None = None, **kwargs: Any) -> SinkformerViT:
    """Sinkformer ViT-B/16 (timm ``vit_base_patch16_224``: 768 wide, 12 blocks, 12 heads), ``n_iter=3``."""
    return _build(weights, {"embed_dim": 768, "depth": 12, "num_heads": 12}, kwargs)


@register_model
def sinkformer_vit_cats_dogs(weights: str | None = None, **kwargs: Any) -> SinkformerViT:
    """The published cats-vs-dogs Sinkformer (MATH.md section 5): 224 px, patch 16, 128 wide, depth 6, 8 heads
    of width 64, MLP 128, no qkv bias, 2 classes, Adam lr 5e-5 (published: 79.5% vs 79.0% Transformer)."""
    defaults = {"img_size": 224, "patch_size": 16, "embed_dim": 128, "depth": 6, "num_heads": 8, "attn_head_dim": 64,
                "mlp_ratio": 1.0, "qkv_bias": False, "num_classes": 2, "optimizer": "adam", "lr": 5e-5,
                "weight_decay": 0.0, "scheduler": "constant"}
    return _build(weights, defaults, kwargs)


@register_model
def sinkformer_vit_mnist(weights: str | None = None, patch_size: int = 7, **kwargs: Any) -> SinkformerViT:
    """The published MNIST Sinkformer (MATH.md section 5): one block, one head of width 64, no MLP, 128 wide,
    28x28x1 input, variable ``patch_size`` (a divisor of 28), Adam lr 5e-4 (Sinkformer better at small patches)."""
    defaults = {"img_size": 28, "patch_size": patch_size, "in_chans": 1, "embed_dim": 128, "depth": 1,
                "num_heads": 1, "attn_head_dim": 64, "mlp_ratio": 0.0, "qkv_bias": False, "num_classes": 10,
                "optimizer": "adam", "lr": 5e-4, "weight_decay": 0.0}
    return _build(weights, defaults, kwargs)
