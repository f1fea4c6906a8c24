"""Sinkformer vision transformers: timm's ViT with Sinkhorn attention.

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

timm's model protocol, with timm's ``VisionTransformer`` semantics: ``num_classes``, ``num_features``,
``head_hidden_size``, ``feature_info`` (one entry per block, ``blocks.{i}``, reduction = patch size),
``pretrained_cfg`` / ``default_cfg`` (the model as built: its input size), ``reset_classifier``,
``get_classifier``, ``forward_features``, ``forward_head(x, pre_logits)``, ``forward_intermediates``,
``prune_intermediate_layers``, ``set_grad_checkpointing`` (every block recomputed in backward, as timm's
``checkpoint_seq``), ``num_classes=0`` (pooled features) and ``global_pool=''`` (unpooled tokens).
The pretrained configurations (timm's hf-hub weights, the published configurations) are ``default_cfgs``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models._manipulate import checkpoint, checkpoint_seq

from zoo.errors import ZooError
from zoo.hub import HubMixin, load_weights
from zoo.models.arguments import check_model_kwargs, take_indices
from zoo.nn.attention import SinkhornAttention, SinkhornSettings
from zoo.pretrained import PretrainedCfg, build_model, register_pretrained_cfgs
from zoo.registry import register_model
from zoo.tasks import ImageClassifier
from zoo.validation import (
    boolean,
    choice,
    finite_float,
    image_size,
    non_negative_int,
    optional,
    positive_int,
    probability,
)

# timm's VisionTransformer pools, less its attention pools ('map', 'prr', which need modules of their own)
GLOBAL_POOLS = ("token", "avg", "avgmax", "max", "")
OUTPUT_FORMATS = ("NCHW", "NLC")


def intermediates_output(
    intermediates: list[torch.Tensor],
    last: torch.Tensor,
    final_norm: nn.Module,
    num_prefix_tokens: int,
    grid: tuple[int, int],
    *,
    return_prefix_tokens: bool,
    output_fmt: str,
    intermediates_only: bool,
    output_dict: bool,
) -> list[Any] | tuple[torch.Tensor, list[Any]] | dict[str, Any]:
    """What timm's ``VisionTransformer.forward_intermediates`` returns, from the block outputs it took.

    Args:
        intermediates: the outputs (B, prefix + patches, C) of the blocks taken, final norm applied if asked.
        last: the output of the last block run; the final features are ``final_norm(last)``.
        final_norm: the model's final norm.
        num_prefix_tokens: how many class / register tokens lead each sequence.
        grid: the patch grid (H, W) of the images.
        return_prefix_tokens: each intermediate as (patch tokens, prefix tokens).
        output_fmt: the patch tokens as ``"NCHW"`` (B, C, H, W) or ``"NLC"`` (B, patches, C).
        intermediates_only: return the intermediates alone.
        output_dict: return ``{"image_intermediates", "image_intermediates_prefix", "image_features"}``.
    """
    prefix = [y[:, :num_prefix_tokens] for y in intermediates] if num_prefix_tokens else None
    intermediates = [y[:, num_prefix_tokens:] for y in intermediates]
    if output_fmt == "NCHW":
        intermediates = [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
    if output_dict:
        out: dict[str, Any] = {"image_intermediates": intermediates}
        if prefix is not None and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefix
        if not intermediates_only:
            out["image_features"] = final_norm(last)
        return out
    if return_prefix_tokens and prefix is not None:
        intermediates = list(zip(intermediates, prefix))
    if intermediates_only:
        return intermediates
    return final_norm(last), intermediates


INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)  # timm's ViT normalisation (IMAGENET_INCEPTION_MEAN / _STD)


def _norm(dim: int, **kwargs: Any) -> nn.Module:
    return LayerNorm(dim, eps=1e-6, **kwargs)


class SinkformerBlock(nn.Module):
    """timm's pre-norm ``Block`` with :class:`zoo.nn.SinkhornAttention`; ``mlp_ratio=0``: attention only.

    Args:
        dim: the token dimension.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``dim``; 0 for no MLP.
        qkv_bias: whether the qkv projection has a bias.
        qk_norm: whether queries and keys are LayerNorm-ed per head.
        attn_head_dim: the dimension of each head; None for ``dim // num_heads``.
        proj_drop: dropout probability after the attention projection and in the MLP.
        attn_drop: dropout probability on the attention weights.
        init_values: LayerScale's initial value; None for no LayerScale.
        drop_path: stochastic-depth rate of each residual branch.
        n_iter: Sinkhorn half-steps (1 is softmax attention).
        record_stats: whether the attention records its column-sum statistics.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_head_dim: int | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        n_iter: int = 3,
        record_stats: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = _norm(dim)
        self.attn = SinkhornAttention(
            dim,
            num_heads=num_heads,
            attn_head_dim=attn_head_dim,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=_norm if qk_norm else None,
            n_iter=n_iter,
            record_stats=record_stats,
        )
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


def _vit_cfg(**changes: Any) -> PretrainedCfg:
    """timm's ViT data config (bicubic, crop 0.9, mean = std = 0.5, fixed input size) with ``changes``."""
    base = {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "mean": INCEPTION_MEAN,
        "std": INCEPTION_STD,
        "fixed_input_size": True,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    return PretrainedCfg(**{**base, **changes})


class SinkformerViT(SinkhornSettings, HubMixin, ImageClassifier):
    """Vision transformer with Sinkhorn attention (Sinkformer), timm's ``VisionTransformer`` layout and names.

    Args:
        img_size: input size, an int or (H, W).
        patch_size: side of the square patches.
        in_chans: input channels.
        num_classes: classifier outputs; 0: no classifier (``forward`` returns the pooled features, as timm).
        embed_dim: the token width.
        depth: the number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden size / embed_dim; 0 removes the MLP branch (attention-only blocks).
        attn_head_dim: width of a head (default embed_dim / num_heads).
        qkv_bias: whether the qkv projections have a bias.
        qk_norm: whether q and k are LayerNorm-ed per head.
        init_values: LayerScale's initial value (None: no LayerScale).
        class_token: prepend a class token.
        global_pool: ``"token"`` (class token), ``"avg"``, ``"max"``, ``"avgmax"`` (over the patch tokens) or
            ``""`` (no pooling: ``forward`` returns every token), as timm.
        fc_norm: the final LayerNorm after the pooling (``fc_norm``) instead of before it (``norm``); None: after
            it for the average / max pools, as timm.
        final_norm: whether there is a final LayerNorm at all (timm's ``final_norm``); False: neither ``norm`` nor
            ``fc_norm`` (what :meth:`prune_intermediate_layers` leaves with ``prune_norm``, or with ``prune_head``
            after an average / max pool, and records so that ``save_pretrained`` rebuilds it).
        n_iter: Sinkhorn half-steps of every attention (1 = softmax, the Transformer).
        record_stats: record the column-sum statistics of every attention (see :meth:`attention_stats`).
        drop_rate: timm's dropout rate before the classifier.
        pos_drop_rate: dropout rate after the position embedding.
        proj_drop_rate: dropout rate after the attention projections and in the MLPs.
        attn_drop_rate: dropout rate on the attention weights.
        drop_path_rate: stochastic depth, linear in the block index up to this rate.
        weights: a file (timm or zoo state dict, ``.ckpt``, ``.safetensors``, ``save_pretrained`` folder) or
            ``"hf-hub:org/name"`` (e.g. ``"hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k"``). The
            builders given zoo weights and no ``num_classes`` build the head the weights record (so do the
            V-MoE and point-cloud builders).
        **kwargs: the training settings of :class:`zoo.tasks.ImageClassifier` (``optimizer``, ``lr_scheduler``
            callables, ``label_smoothing``); without ``optimizer``, :attr:`default_optimizer`.
    """

    same_function_args = frozenset(
        {
            "num_classes",
            "record_stats",
            "label_smoothing",
            "drop_rate",
            "pos_drop_rate",
            "proj_drop_rate",
            "attn_drop_rate",
            "drop_path_rate",
        }
    )

    #: AdamW, lr 5e-4, weight decay 0.05 (DeiT's ViT recipe; norms, biases, pos_embed and cls_token undecayed)
    default_optimizer = functools.partial(torch.optim.AdamW, lr=5e-4, weight_decay=0.05)

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
        fc_norm: bool | None = None,
        final_norm: bool = True,
        n_iter: int = 3,
        record_stats: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weights: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_model_kwargs(type(self), kwargs, ImageClassifier)
        size = image_size("img_size", img_size)
        positive_int("patch_size", patch_size)
        positive_int("in_chans", in_chans)
        non_negative_int(
            "num_classes",
            num_classes,
            hint="give the number of classes, or 0 for a model without "
            "a classifier (forward returns the pooled features, as timm's num_classes=0)",
        )
        positive_int("embed_dim", embed_dim)
        positive_int("depth", depth)
        positive_int("num_heads", num_heads)
        finite_float("mlp_ratio", mlp_ratio, 0.0, hint="give a number >= 0 (0 removes the MLP branch)")
        optional(positive_int, "attn_head_dim", attn_head_dim)
        for name, flag in (
            ("qkv_bias", qkv_bias),
            ("qk_norm", qk_norm),
            ("class_token", class_token),
            ("record_stats", record_stats),
            ("final_norm", final_norm),
        ):
            boolean(name, flag)
        optional(boolean, "fc_norm", fc_norm)
        optional(finite_float, "init_values", init_values)
        self._check_pool(global_pool, class_token)
        for name, rate in (
            ("drop_rate", drop_rate),
            ("pos_drop_rate", pos_drop_rate),
            ("proj_drop_rate", proj_drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            probability(name, rate)
        if attn_head_dim is None and embed_dim % num_heads:
            raise ZooError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}: give attn_head_dim")
        if 0 < mlp_ratio and int(embed_dim * mlp_ratio) < 1:
            raise ZooError(
                f"mlp_ratio={mlp_ratio} gives an MLP of {int(embed_dim * mlp_ratio)} hidden units for "
                f"embed_dim {embed_dim}: use a larger mlp_ratio, or 0 to remove the MLP branch"
            )
        if any(s % patch_size for s in size):
            raise ZooError(
                f"img_size {img_size} is not a multiple of patch_size {patch_size}: give an img_size whose "
                f"height and width are multiples of {patch_size}"
            )
        super().__init__(num_classes=num_classes, **kwargs)
        self.num_classes = num_classes
        self.num_prefix_tokens = 1 if class_token else 0
        self.has_class_token = class_token
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.global_pool = global_pool
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # timm's linspace(0, rate, depth)
        self.blocks = nn.Sequential(
            *[
                SinkformerBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    attn_head_dim=attn_head_dim,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    init_values=init_values,
                    drop_path=rates[i],
                    n_iter=n_iter,
                    record_stats=record_stats,
                )
                for i in range(depth)
            ]
        )
        # timm's feature_info: every block, at the patch grid (stride = patch size)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        self.norm = _norm(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = _norm(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        # timm's pretrained_cfg of the model as built (a builder replaces it with its table entry, as built)
        self.pretrained_cfg = self.pretrained_cfg_as_built(_vit_cfg().to_dict())
        self.default_cfg = self.pretrained_cfg
        if weights is not None:
            load_weights(self, weights)

    @staticmethod
    def _check_pool(global_pool: Any, class_token: bool) -> None:
        choice(
            "global_pool",
            global_pool,
            GLOBAL_POOLS,
            hint="choose 'token', 'avg', 'avgmax', 'max' or '' (no "
            "pooling); timm's attention pools 'map' and 'prr' are not available",
        )
        if global_pool == "token" and not class_token:
            raise ZooError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")

    def _init_weights(self) -> None:
        """timm's default ViT initialisation: truncated normal (std 0.02) linears and position embedding."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _init_linear(m)

    # ---------------------------------------------------------------- timm's model protocol
    def pretrained_cfg_as_built(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """``cfg`` (timm's ``pretrained_cfg`` keys) for this model as built: ``input_size`` = (in_chans, H, W) of
        its patch embedding, the only size it takes (``fixed_input_size``: the position embedding has one grid);
        ``mean`` / ``std`` with one value per input channel (a cfg of another channel count gets the mean of its
        values, repeated); ``num_classes`` of the head. ``timm.data.resolve_data_config({}, model=m)`` reads it."""
        out = dict(cfg)
        chans = self.patch_embed.proj.in_channels
        height, width = self.patch_embed.img_size
        out["input_size"] = (chans, height, width)
        out["fixed_input_size"] = True
        for key in ("test_input_size", "min_input_size"):
            if key in out and tuple(out[key]) != out["input_size"]:
                del out[key]
        for key, default in (("mean", INCEPTION_MEAN), ("std", INCEPTION_STD)):
            values = tuple(out.get(key) or default)
            out[key] = values if len(values) == chans else (sum(values) / len(values),) * chans
        out["num_classes"] = self.num_classes
        out.setdefault("first_conv", "patch_embed.proj")
        out.setdefault("classifier", "head")
        return out

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay besides norms and biases (timm's: position embedding, class token)."""
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's ViT parameter groups (layer-wise learning-rate decay ...): the stem (patch and position
        embedding, class token), each block in order, the final norm; the head and ``fc_norm`` come last.

        Args:
            coarse: timm's coarse grouping; the same groups here (a block is the smallest unit).
        """
        return {
            "stem": r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward instead of keeping its activations (timm's ``checkpoint_seq``, one
        block per segment, non-reentrant): the same gradients for about one block's activations of memory."""
        self.grad_checkpointing = boolean("enable", enable)

    def get_classifier(self) -> nn.Module:
        """The classifier (``head``; ``nn.Identity`` without one)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head of ``num_classes`` outputs (0: none, ``forward`` returns the pooled features) and, when
        given, a new ``global_pool`` (``''``: unpooled tokens); the final norm stays where it is (timm). The new
        head is initialised as the constructor does (truncated normal, std 0.02); ``hparams`` follow, so a
        checkpoint or ``save_pretrained`` rebuilds this model."""
        non_negative_int("num_classes", num_classes)
        if global_pool is not None:
            self._check_pool(global_pool, self.has_class_token)
            self.global_pool = global_pool
            self._record_structure()
        ref = self.pos_embed
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            _init_linear(self.head)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)
        self.num_classes = num_classes
        self.set_num_classes(num_classes)

    # ---------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens after the last block and ``norm``: ``(B, prefix + patches, embed_dim)``."""
        x = self._embed(x)
        if attn_mask is not None:
            for block in self.blocks:
                x = block(x, attn_mask=attn_mask)
        elif self.grad_checkpointing:
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """timm's ``global_pool_nlc``: the class token, or the average / max / their mean over the patch tokens;
        ``''``: the tokens unchanged."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        x = x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, ``fc_norm``, head dropout and (unless ``pre_logits``) the classifier."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (pooled features with ``num_classes=0``; every token with ``global_pool=''``)."""
        return self.forward_head(self.forward_features(x))

    def _take_indices(self, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
        return take_indices(len(self.blocks), indices, "blocks")

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]] | dict[str, Any]:
        """timm's ``VisionTransformer.forward_intermediates``: the outputs of the blocks ``indices`` (None: all, an
        int n: the last n, a list: those, negative from the end), with ``norm`` the final norm applied to each,
        the patch tokens as ``(B, C, H, W)`` (``"NCHW"``) or ``(B, patches, C)`` (``"NLC"``), with their prefix
        (class) tokens when ``return_prefix_tokens`` (pairs); and, unless ``intermediates_only``, the final
        features (``forward_features``). ``stop_early``: no block past the last one taken."""
        choice("output_fmt", output_fmt, OUTPUT_FORMATS)
        take_indices, max_index = self._take_indices(indices)
        intermediates = []
        height, width = x.shape[-2:]
        x = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        for i, block in enumerate(blocks):
            if attn_mask is not None:
                x = block(x, attn_mask=attn_mask)
            elif self.grad_checkpointing:
                x = checkpoint(block, x)
            else:
                x = block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        return intermediates_output(
            intermediates,
            x,
            self.norm,
            self.num_prefix_tokens,
            self.patch_embed.dynamic_feat_size((height, width)),
            return_prefix_tokens=return_prefix_tokens,
            output_fmt=output_fmt,
            intermediates_only=intermediates_only,
            output_dict=output_dict,
        )

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm with ``prune_norm``, the head and
        ``fc_norm`` with ``prune_head``) for feature extraction; returns the absolute indices kept (timm)."""
        take_indices, max_index = self._take_indices(indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        self._record_structure()
        return take_indices

    def _record_structure(self) -> None:
        """Keep ``hparams`` true to the model after :meth:`reset_classifier` / :meth:`prune_intermediate_layers`
        (its pooling, blocks and final norms), so that a checkpoint or ``save_pretrained`` rebuilds exactly it."""
        has_norm, has_fc_norm = (not isinstance(m, nn.Identity) for m in (self.norm, self.fc_norm))
        self.hparams["global_pool"] = self.global_pool
        self.hparams["depth"] = len(self.blocks)
        self.hparams["final_norm"] = has_norm or has_fc_norm
        if has_norm or has_fc_norm:
            self.hparams["fc_norm"] = has_fc_norm

    # ---------------------------------------------------------------- Sinkhorn settings and diagnostics
    @property
    def attentions(self) -> list[SinkhornAttention]:
        return [b.attn for b in self.blocks]

    # ---------------------------------------------------------------- weights from timm
    def adapt_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], source_hparams: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        """Weight-loader hook: resample a position embedding of another grid (timm's bicubic resampling)."""
        sd = dict(state_dict)
        pos = sd.get("pos_embed")
        if pos is not None and pos.ndim == 3 and pos.shape != self.pos_embed.shape:
            patches = pos.shape[1] - self.num_prefix_tokens
            side = math.isqrt(max(patches, 0))
            if side * side == patches and pos.shape[2] == self.pos_embed.shape[2]:
                sd["pos_embed"] = resample_abs_pos_embed(
                    pos,
                    new_size=list(self.patch_embed.grid_size),
                    old_size=[side, side],
                    num_prefix_tokens=self.num_prefix_tokens,
                )
        return sd


def _init_linear(m: nn.Linear) -> None:
    trunc_normal_(m.weight, std=0.02)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# Pretrained configurations (timm's default_cfgs): timm's hf-hub weights, and the published configurations

SINKFORMERS_PAPER = "arXiv:2110.11773"  # Sander, Ablin, Blondel, Peyre: Sinkformers (AISTATS 2022)
_TIMM_RESULTS = "timm's results-imagenet.csv (top-1 of the source model, i.e. of n_iter=1)"
_SINKHORN_CONVERSION = (
    "timm's weights unchanged, every attention normalised by 3 Sinkhorn half-steps (rows, columns, rows) of the "
    "same kernel exp(q k^T / sqrt(d_head)) instead of one row softmax: before fine-tuning this is another function "
    "than the source ViT (whose accuracy does not carry over; not measured here); n_iter=1 computes timm's model "
    "exactly"
)


def _from_timm(source: str, top1: float) -> PretrainedCfg:
    """A tag loading timm's ``source`` weights (hf-hub), with timm's data config (checked against timm's table
    in the tests) and the source's published ImageNet-1k top-1."""
    return _vit_cfg(
        source=f"hf-hub:timm/{source}",
        hf_hub_id=f"timm/{source}",
        license="apache-2.0",
        origin_url="https://github.com/google-research/vision_transformer",
        paper_ids="arXiv:2106.10270",
        model_args={"n_iter": 3},
        conversion=_SINKHORN_CONVERSION,
        metrics={"imagenet-1k/top1": {"value": top1, "kind": "published", "of": "source", "note": _TIMM_RESULTS}},
        notes=(f"weights of timm's {source}",),
    )


# the published configurations' architectures (the builders' defaults; a tag's model_args: a model built otherwise
# loses the published accuracies, which are of this architecture)
_CATS_DOGS = {
    "img_size": 224,
    "patch_size": 16,
    "in_chans": 3,
    "embed_dim": 128,
    "depth": 6,
    "num_heads": 8,
    "attn_head_dim": 64,
    "mlp_ratio": 1.0,
    "qkv_bias": False,
    "num_classes": 2,
    "n_iter": 3,
}
_MNIST = {
    "img_size": 28,
    "in_chans": 1,
    "embed_dim": 128,
    "depth": 1,
    "num_heads": 1,
    "attn_head_dim": 64,
    "mlp_ratio": 0.0,
    "qkv_bias": False,
    "num_classes": 10,
    "n_iter": 3,
}  # any patch size dividing 28

default_cfgs: dict[str, PretrainedCfg] = register_pretrained_cfgs(
    {
        "sinkformer_vit_tiny_patch16_224.augreg_in21k_ft_in1k": _from_timm(
            "vit_tiny_patch16_224.augreg_in21k_ft_in1k", 75.452
        ),
        "sinkformer_vit_small_patch16_224.augreg_in21k_ft_in1k": _from_timm(
            "vit_small_patch16_224.augreg_in21k_ft_in1k", 81.402
        ),
        "sinkformer_vit_small_patch16_224.augreg_in1k": _from_timm("vit_small_patch16_224.augreg_in1k", 78.842),
        "sinkformer_vit_base_patch16_224.augreg2_in21k_ft_in1k": _from_timm(
            "vit_base_patch16_224.augreg2_in21k_ft_in1k", 85.108
        ),
        "sinkformer_vit_base_patch16_224.augreg_in21k_ft_in1k": _from_timm(
            "vit_base_patch16_224.augreg_in21k_ft_in1k", 84.534
        ),
        "sinkformer_vit_base_patch16_224.augreg_in1k": _from_timm("vit_base_patch16_224.augreg_in1k", 79.154),
        "sinkformer_vit_cats_dogs.sinkformers_paper": _vit_cfg(
            num_classes=2,
            paper_ids=SINKFORMERS_PAPER,
            model_args=_CATS_DOGS,
            metrics={
                "cats-vs-dogs/top1": {
                    "value": 79.5,
                    "kind": "published",
                    "of": "model",
                    "note": "median test accuracy; the Transformer (n_iter=1): 79.0%",
                }
            },
            notes=("published configuration without weights: Adam lr 5e-5, batch 64 (no zoo recipe ships for it)",),
        ),
        "sinkformer_vit_mnist.sinkformers_paper": _vit_cfg(
            input_size=(1, 28, 28),
            mean=(0.1307,),
            std=(0.3081,),
            crop_pct=1.0,
            num_classes=10,
            paper_ids=SINKFORMERS_PAPER,
            model_args=_MNIST,
            notes=(
                "published configuration without weights: one attention layer, one head, no MLP, any patch size; "
                "published without a number: the Sinkformer beats the Transformer at small patches and ties at "
                "patch 28 (one token); Adam lr 5e-4 (no zoo recipe ships for it); mean / std: MNIST's usual ones",
            ),
        ),
    }
)


# ------------------------------------------------------------------------------------------------
# Builders

__all__ = [
    "SinkformerBlock",
    "SinkformerViT",
    "default_cfgs",
    "sinkformer_vit_base_patch16_224",
    "sinkformer_vit_cats_dogs",
    "sinkformer_vit_mnist",
    "sinkformer_vit_small_patch16_224",
    "sinkformer_vit_tiny_patch16_224",
]


def _build(
    arch: str, defaults: dict[str, Any], kwargs: dict[str, Any], pretrained: bool, weights: str | None
) -> SinkformerViT:
    return build_model(
        SinkformerViT, arch, defaults, kwargs, pretrained=pretrained, weights=weights, base_cfg=_vit_cfg()
    )


@register_model
def sinkformer_vit_tiny_patch16_224(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> SinkformerViT:
    """Sinkformer ViT-Ti/16 (timm ``vit_tiny_patch16_224``: 192 wide, 12 blocks, 3 heads), ``n_iter=3``.
    ``pretrained=True``: timm's ``augreg_in21k_ft_in1k`` weights (hf-hub), see :data:`default_cfgs`."""
    return _build(
        "sinkformer_vit_tiny_patch16_224", {"embed_dim": 192, "depth": 12, "num_heads": 3}, kwargs, pretrained, weights
    )


@register_model
def sinkformer_vit_small_patch16_224(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> SinkformerViT:
    """Sinkformer ViT-S/16 (timm ``vit_small_patch16_224``: 384 wide, 12 blocks, 6 heads), ``n_iter=3``.
    ``pretrained=True``: timm's ``augreg_in21k_ft_in1k`` weights (hf-hub); tag ``augreg_in1k`` too."""
    return _build(
        "sinkformer_vit_small_patch16_224", {"embed_dim": 384, "depth": 12, "num_heads": 6}, kwargs, pretrained, weights
    )


@register_model
def sinkformer_vit_base_patch16_224(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> SinkformerViT:
    """Sinkformer ViT-B/16 (timm ``vit_base_patch16_224``: 768 wide, 12 blocks, 12 heads), ``n_iter=3``.
    ``pretrained=True``: timm's ``augreg2_in21k_ft_in1k`` weights (hf-hub, timm's default); tags
    ``augreg_in21k_ft_in1k``, ``augreg_in1k`` too."""
    return _build(
        "sinkformer_vit_base_patch16_224", {"embed_dim": 768, "depth": 12, "num_heads": 12}, kwargs, pretrained, weights
    )


@register_model
def sinkformer_vit_cats_dogs(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> SinkformerViT:
    """The published cats-vs-dogs Sinkformer (Sinkformers paper): 224 px, patch 16, 128 wide, depth 6, 8 heads
    of width 64, MLP 128, no qkv bias, 2 classes, ``n_iter=3``; trains with Adam lr 5e-5 at a constant rate
    (published median test accuracy 79.5%, the Transformer 79.0%). No weights are published: ``pretrained=True``
    is an error; ``weights=`` loads any source zoo reads."""
    kwargs.setdefault("optimizer", functools.partial(torch.optim.Adam, lr=5e-5))
    kwargs.setdefault("lr_scheduler", None)  # constant learning rate
    return _build("sinkformer_vit_cats_dogs", _CATS_DOGS, kwargs, pretrained, weights)


@register_model
def sinkformer_vit_mnist(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> SinkformerViT:
    """The published MNIST Sinkformer (Sinkformers paper): one block, one head of width 64, no MLP, 128 wide,
    28x28x1 input, ``patch_size`` any divisor of 28 (default 7), ``n_iter=3``; trains with Adam lr 5e-4 (the
    Sinkformer is better than the Transformer at small patches). No weights are published: ``pretrained=True`` is
    an error; ``weights=`` loads any source zoo reads."""
    kwargs.setdefault("optimizer", functools.partial(torch.optim.Adam, lr=5e-4))
    return _build("sinkformer_vit_mnist", {**_MNIST, "patch_size": 7}, kwargs, pretrained, weights)
