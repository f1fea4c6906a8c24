"""Sinkformers for point clouds: the Set Transformer and the Point Cloud Transformer with
softmax or Sinkhorn attention.

**Set Transformer** (Lee et al. 2019). With the multi-head attention Multihead(X, Y, Y) = concat_h(A_h Y W_V^h) W_O,
A_h = Sinkhorn_{n_iter}(exp(X W_Q^h (Y W_K^h)^T / sqrt(d_head))) (:class:`zoo.nn.SinkhornMultiheadAttention`;
``n_iter=1``: the row softmax, i.e. ``torch.nn.MultiheadAttention``):

    MAB(X, Y) = LN(H + rFF(H)),     H = LN(X + Multihead(X, Y, Y)),     rFF(H) = ReLU(H W + b)
    SAB(X) = MAB(X, X),   ISAB(X) = MAB(X, MAB(I, X))   (I: m learned inducing points)
    PMA_k(Z) = MAB(S, Z)  (S: k learned seeds),          logits = Linear(SAB(PMA_k(ISAB(ISAB(X)))))

(Dropout before the PMA and before the classifier, as in the authors' ModelNet code.) When the query width
differs from the model width (the first ISAB's second MAB reads the raw points), X is first projected by a linear
``q_embed``, as the authors' code does for every query. The authors' code leaves out W_O and scales by
1 / sqrt(d_model); this module keeps the paper's W_O and torch's 1 / sqrt(d_head).

A Sinkhorn PMA with one seed and ``n_iter >= 2`` is mean pooling of the values: with one query row, the column step
gives every key the same mass 1 / n, and the last row step keeps it (so the published Sinkformer pools by the mean).
Padded points (``padding_mask``) are left out as keys and, under Sinkhorn, as queries (no mass in the column steps),
so a padded cloud gets the logits of the cloud alone; their values never matter (they are set to 0 first, so NaN or
inf padding is fine). A fully padded cloud (every point padded: an empty set) has nothing to attend to: it runs as the
one-point cloud {0}, so that no attention row is left without keys (what SDPA gives for such a row depends on the
backend, NaN on some), and its features are then set to zero, so its logits are the classifier's bias and the other
clouds of the batch (outputs and gradients) are as without it. No host read: the same graph for every batch.

**Point Cloud Transformer** (PCT, Guo et al. 2021), shape classification layout of the authors' code:

    input embedding   F0 = LBR(LBR(P))                                        (B, N, E)
    neighbour embedding, per stage s: FPS of S_s centres, kNN (k) around each, features
                      [f_j - f_c, f_c] -> LBR -> LBR -> max over the k neighbours   (B, S_s, 2 D_s)
    4 offset-attention layers  F_{l+1} = F_l + LBR(F_l - A F_l W_V)           (B, S, C)
    concatenation     LBR_{0.2}([F_1, .., F_4, F_ne])  -> max + avg pooling -> (LBR_{0.2} + dropout) x 2 -> Linear

(F_ne: the output of the neighbour embedding, which joins the concatenation in the authors' code; the paper pools
by max and average, the authors' code by max only: ``pooling="max"``.)
LBR = Linear + BatchNorm + ReLU (LeakyReLU 0.2 after the fusion and in the head). The attention scores are
C = Q Q^T with one shared query/key projection Q = F W_QK (C is symmetric) and no scaling, as in PCT.
``attention="pct"`` is the published offset-attention normalisation: softmax over the keys, then L1 over the
queries, A_ji = softmax_j(C)_ij / sum_i' softmax_j(C)_i'j; because C is symmetric this is *two* Sinkhorn
half-steps of exp(C), a column step then a row step. ``attention="sinkhorn"`` replaces that normalisation by the
zoo's Sinkhorn op (rows first, ``n_iter`` half-steps, as the Sinkformers paper replaces the attention):
A = Sinkhorn_{n_iter}(exp(C)), with ``n_iter=1`` the plain row softmax.

Farthest point sampling (:func:`farthest_point_sample`) depends on the point set only: the points are put in
lexicographic order of their coordinates first, the first centre is the point farthest from the centroid and
ties go to the lexicographically first point, so the model is permutation invariant (kNN ties at the k-th
distance, which have probability zero for real-valued coordinates, are the only exception).

**timm's model protocol where it applies**: ``num_classes`` (0: no classifier, ``forward`` returns the pre-logits
features), ``num_features`` (width of ``forward_features``' last dimension), ``head_hidden_size`` (width of the
pre-logits features), ``reset_classifier(num_classes)``, ``get_classifier()``, ``forward_features`` (unpooled:
the Set Transformer's PMA seeds (B, k, E), PCT's fused per-point features (B, S, fuse_dim)) and
``forward_head(x, pre_logits)`` (pooling: the seeds concatenated / PCT's max (+ avg); PCT's LBR head layers;
the classifier). ``pretrained_cfg`` has the keys that apply to point clouds: ``num_classes``, ``classifier``,
license, source and metrics, plus zoo's ``in_chans`` (channels per point) and ``min_num_points``; timm's image
keys (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``) are left out on purpose (a cloud of N
points is not an image: ``timm.data.resolve_data_config`` does not apply; the point preprocessing of a published
configuration is in its ``notes``). ``global_pool`` (the PMA is a learned pooling, PCT's pooling sets its head's
width), ``forward_intermediates`` and ``features_only`` do not apply.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.hub import HubMixin, load_weights
from zoo.models.arguments import check_model_kwargs
from zoo.nn.attention import SinkhornMultiheadAttention, SinkhornSettings, check_n_iter
from zoo.ops.sinkhorn import column_sum_stats, sinkhorn_attention
from zoo.pretrained import IMAGE_KEYS, PretrainedCfg, build_model, register_pretrained_cfgs
from zoo.registry import register_model
from zoo.tasks import ImageClassifier
from zoo.validation import boolean, choice, int_sequence, integer, non_negative_int, positive_int, probability

__all__ = [
    "ISAB",
    "MAB",
    "PMA",
    "SAB",
    "OffsetAttention",
    "PointCloudTransformer",
    "SetTransformer",
    "point_cloud_sinkformer",
    "point_cloud_transformer",
    "default_cfgs",
    "set_sinkformer_modelnet40",
    "set_transformer_modelnet40",
]

ATTENTIONS = ("pct", "sinkhorn")
POOLINGS = ("max+avg", "max")
# timm's image data keys, left out of a point-cloud model's pretrained_cfg (a cloud is not an image)


class _PointCloudProtocol:
    """timm's model protocol where it applies to point clouds (see the module docstring): the classifier
    ``head`` (``nn.Identity`` with ``num_classes=0``) and ``pretrained_cfg`` without the image keys."""

    head: nn.Module
    num_classes: int
    in_chans: int
    head_hidden_size: int
    hparams: Any
    training: bool

    def min_num_points(self) -> int:
        return 1

    def _param_dtype(self) -> torch.dtype:
        """The dtype of the model's parameters (what its input points must have)."""
        return next(self.parameters()).dtype  # type: ignore[attr-defined]

    def pretrained_cfg_as_built(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """``cfg`` for this model as built: timm's image keys dropped, ``num_classes`` of the head, ``in_chans``
        (channels per point) and ``min_num_points`` (the fewest points a cloud may have)."""
        out = {k: v for k, v in cfg.items() if k not in IMAGE_KEYS}
        out["num_classes"] = self.num_classes
        out["in_chans"] = self.in_chans
        out["min_num_points"] = self.min_num_points()
        out.setdefault("classifier", "head")
        return out

    def _set_pretrained_cfg(self) -> None:
        self.pretrained_cfg = self.pretrained_cfg_as_built(PretrainedCfg(input_size=None, classifier="head").to_dict())
        self.default_cfg = self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        """The classifier (``head``; ``nn.Identity`` without one)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier of ``num_classes`` outputs (0: none, ``forward`` returns the pre-logits features),
        initialised as ``nn.Linear``; ``hparams`` follow. ``global_pool`` does not apply (None only)."""
        non_negative_int("num_classes", num_classes)
        if global_pool is not None:
            raise ZooError(
                f"{type(self).__name__} has no global_pool to change (got {global_pool!r}): its pooling is "
                "part of the architecture (the Set Transformer's PMA is learned; PCT's pooling sets its "
                "head's width); call reset_classifier(num_classes) without global_pool"
            )
        ref = next(self.parameters())  # type: ignore[attr-defined]
        self.head = (
            nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)
        self.num_classes = num_classes
        self.set_num_classes(num_classes)  # type: ignore[attr-defined]


def _check_points(points: torch.Tensor, in_chans: int, model: str, dtype: torch.dtype | None = None) -> None:
    """Shape and dtype check of a (B, N, C) point batch (metadata only, no host sync): floating point, and not
    float64 for a model of another dtype (the usual numpy array), whose first Linear would fail obscurely."""
    if not points.is_floating_point() or (points.dtype == torch.float64 and dtype not in (None, torch.float64)):
        raise ZooError(
            f"{model} expects floating point coordinates of the model's dtype ({dtype}), got {points.dtype}: "
            f"give points.to({dtype}) (numpy arrays are float64)"
        )
    if points.dim() != 3 or points.shape[-1] != in_chans:
        if points.dim() == 3 and points.shape[1] == in_chans:
            fix = (
                f"the points look channels first (B, {in_chans}, N): give (batch, points, channels), "
                "e.g. points.transpose(1, 2)"
            )
        elif points.dim() == 2 and points.shape[-1] == in_chans:
            fix = "a single cloud needs a batch dimension: points.unsqueeze(0)"
        elif points.dim() == 3:
            fix = f"give (batch, points, channels) with xyz first, or build the model with in_chans={points.shape[-1]}"
        else:
            fix = "give a 3-D batch (batch, points, channels) with xyz first"
        raise ZooError(
            f"{model} expects points of shape (B, N, {in_chans}) (in_chans={in_chans}: xyz first), got "
            f"{tuple(points.shape)}; {fix}"
        )
    if points.shape[1] < 1:
        raise ZooError(f"{model}: a point cloud needs at least one point, got shape {tuple(points.shape)}")


# ------------------------------------------------------------------------------------------------
# Set Transformer blocks


class MAB(nn.Module):
    """Multihead attention block MAB(X, Y) = LN(H + rFF(H)), H = LN(X + Multihead(X, Y, Y)), rFF(H) = ReLU(HW + b).

    Multihead is :class:`zoo.nn.SinkhornMultiheadAttention` (``batch_first``; ``n_iter=1``: torch's
    ``nn.MultiheadAttention``). ``dim_q != dim``: X is projected by ``q_embed`` (a Linear) first.
    ``layer_norm=False`` drops both LayerNorms (the authors' ``ln=False``).

    Args:
        dim_q: the dimension of X (the queries).
        dim_k: the dimension of Y (the keys and values).
        dim: the block's width (of the attention and of its output).
        num_heads: attention heads (the width must be divisible by it).
        layer_norm: whether the block keeps its two LayerNorms (``False``: the authors' ``ln=False``).
        n_iter: Sinkhorn half-steps (1 is softmax attention).
        record_stats: whether the attention records its column-sum statistics.
    """

    def __init__(
        self,
        dim_q: int,
        dim_k: int,
        dim: int,
        num_heads: int,
        layer_norm: bool = True,
        n_iter: int = 1,
        record_stats: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ZooError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.q_embed = nn.Linear(dim_q, dim) if dim_q != dim else nn.Identity()
        self.attn = SinkhornMultiheadAttention(
            dim, num_heads, kdim=dim_k, vdim=dim_k, batch_first=True, n_iter=n_iter, record_stats=record_stats
        )
        self.norm1 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.ff = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim) if layer_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        query_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, L, dim_q) attends to y (B, S, dim_k); padding masks (B, S) / (B, L) bool, True = padded.

        Padded queries only matter to Sinkhorn (``n_iter > 1``: the column steps sum over the queries): their rows
        are masked out of the kernel (no mass, zero attention output), so they never change the valid rows."""
        x = self.q_embed(x)
        attn_mask = None
        if query_padding_mask is not None and self.attn.n_iter > 1:
            B, L, S = x.shape[0], x.shape[1], y.shape[1]
            heads = self.attn.num_heads  # torch's (B * heads, L, S) bool mask, True = not allowed
            attn_mask = query_padding_mask[:, None, :, None].expand(B, heads, L, S).reshape(B * heads, L, S)
        out = self.attn(x, y, y, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False)[0]
        h = self.norm1(x + out)
        return self.norm2(h + F.relu(self.ff(h)))


class SAB(nn.Module):
    """Set attention block SAB(X) = MAB(X, X) (permutation equivariant).

    Args:
        dim_in: the dimension of X.
        dim: the block's width (of its output).
        num_heads: attention heads (the width must be divisible by it).
        layer_norm: whether the block keeps its two LayerNorms (``False``: the authors' ``ln=False``).
        n_iter: Sinkhorn half-steps (1 is softmax attention).
        record_stats: whether the attention records its column-sum statistics.
    """

    def __init__(
        self,
        dim_in: int,
        dim: int,
        num_heads: int,
        layer_norm: bool = True,
        n_iter: int = 1,
        record_stats: bool = False,
    ) -> None:
        super().__init__()
        self.mab = MAB(dim_in, dim_in, dim, num_heads, layer_norm, n_iter, record_stats)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mab(x, x, key_padding_mask=padding_mask)


class ISAB(nn.Module):
    """Induced set attention block ISAB(X) = MAB(X, H), H = MAB(I, X) with m learned inducing points I (m, dim):
    O(n m) instead of O(n^2), permutation equivariant.

    Args:
        dim_in: the dimension of X.
        dim: the block's width (of H, I and the output).
        num_inducing: m, the number of inducing points.
        num_heads: attention heads (the width must be divisible by it).
        layer_norm: whether the block keeps its two LayerNorms (``False``: the authors' ``ln=False``).
        n_iter: Sinkhorn half-steps (1 is softmax attention).
        record_stats: whether the attention records its column-sum statistics.
    """

    def __init__(
        self,
        dim_in: int,
        dim: int,
        num_heads: int,
        num_inducing: int,
        layer_norm: bool = True,
        n_iter: int = 1,
        record_stats: bool = False,
    ) -> None:
        super().__init__()
        self.inducing = nn.Parameter(torch.empty(1, num_inducing, dim))
        nn.init.xavier_uniform_(self.inducing)
        self.mab0 = MAB(dim, dim_in, dim, num_heads, layer_norm, n_iter, record_stats)
        self.mab1 = MAB(dim_in, dim, dim, num_heads, layer_norm, n_iter, record_stats)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim_in) -> (B, N, dim); padded points (``padding_mask`` True) are never attended to."""
        h = self.mab0(self.inducing.expand(x.shape[0], -1, -1), x, key_padding_mask=padding_mask)
        return self.mab1(x, h, query_padding_mask=padding_mask)


class PMA(nn.Module):
    """Pooling by multihead attention PMA_k(Z) = MAB(S, Z) with k learned seeds S (k, dim): (B, N, dim) -> (B, k, dim).

    With Sinkhorn attention (``n_iter >= 2``) and one seed it is mean pooling of the value projections.

    Args:
        dim: the width of Z, of the seeds and of the output.
        num_seeds: k, the number of seeds (pooled vectors).
        num_heads: attention heads (the width must be divisible by it).
        layer_norm: whether the block keeps its two LayerNorms (``False``: the authors' ``ln=False``).
        n_iter: Sinkhorn half-steps (1 is softmax attention).
        record_stats: whether the attention records its column-sum statistics.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_seeds: int = 1,
        layer_norm: bool = True,
        n_iter: int = 1,
        record_stats: bool = False,
    ) -> None:
        super().__init__()
        self.seeds = nn.Parameter(torch.empty(1, num_seeds, dim))
        nn.init.xavier_uniform_(self.seeds)
        self.mab = MAB(dim, dim, dim, num_heads, layer_norm, n_iter, record_stats)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mab(self.seeds.expand(x.shape[0], -1, -1), x, key_padding_mask=padding_mask)


class SetTransformer(_PointCloudProtocol, SinkhornSettings, HubMixin, ImageClassifier):
    """Set Transformer / Set Sinkformer classifier of point clouds (or any set of vectors), see the module docstring.

    ``forward(points, padding_mask=None)``: points (B, N, in_chans) -> logits (B, num_classes); ``padding_mask``
    (B, N) bool, True = padded point: padded points are never attended to (and their values, even NaN or inf, never
    matter), so a padded cloud gives the logits of the cloud alone. Permutation invariant in the points for every
    ``n_iter``.

    A fully padded cloud (every point padded) is an empty set: its features (``forward_features``) are zero, so its
    pre-logits are zero and its logits the classifier's bias, finite under softmax and Sinkhorn, with or without
    autocast or torch.compile. It changes nothing for the other clouds of its batch: their outputs are those of the
    batch without it, and its loss reaches only the classifier's bias (no gradient through the encoder, the PMA or
    the decoder; the gradient of the other clouds' loss is that of the batch without it). This is decided per sample
    by masking (no host read, no data-dependent branch): the empty cloud runs as the one-point cloud {0} so that
    no attention row is left without keys (SDPA's output for such a row depends on the backend: NaN on some, and
    0 * NaN in backward would poison every gradient); with ``record_stats`` that one point counts in the statistics.

    Args:
        in_chans: channels per point (3: xyz).
        num_classes: classifier outputs (0: none; ``forward`` returns the concatenated seeds).
        embed_dim: width of every block.
        num_heads: attention heads of every block.
        depth: number of ISAB encoder blocks.
        num_inducing: inducing points per ISAB.
        num_seeds: PMA seeds k (the classifier reads the k pooled vectors concatenated).
        decoder_depth: SABs after the PMA (the paper's decoder SAB(PMA_k(Z)); with k=1 its attention is trivial).
        layer_norm: the two LayerNorms of every MAB.
        n_iter: Sinkhorn half-steps of every attention (1 = softmax: the Set Transformer; 21: the published
            Sinkformer).
        record_stats: record the column-sum statistics of every attention (:meth:`attention_stats`).
        drop_rate: dropout before the PMA and before the classifier (0.5 in the published ModelNet model).
        weights: a file (state dict, ``.ckpt``, ``.safetensors``, ``save_pretrained`` folder) or ``"hf-hub:org/name"``.
        **kwargs: the training settings of :class:`zoo.tasks.ImageClassifier` (``optimizer``, ``lr_scheduler``,
            ``label_smoothing``); without ``optimizer``, :attr:`default_optimizer` (the published Adam 1e-3).
            The ModelNet40 builders also set the published schedule (lr / 10 after epoch 200 of 300).
    """

    same_function_args = frozenset({"num_classes", "record_stats", "label_smoothing", "drop_rate"})

    default_optimizer = functools.partial(torch.optim.Adam, lr=1e-3)

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 40,
        embed_dim: int = 256,
        num_heads: int = 4,
        depth: int = 2,
        num_inducing: int = 16,
        num_seeds: int = 1,
        decoder_depth: int = 1,
        layer_norm: bool = True,
        n_iter: int = 1,
        record_stats: bool = False,
        drop_rate: float = 0.0,
        weights: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_model_kwargs(type(self), kwargs, ImageClassifier)
        non_negative_int(
            "num_classes", num_classes, hint="give the number of classes, or 0 for a model without a classifier"
        )
        for name, value in (
            ("in_chans", in_chans),
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("depth", depth),
            ("num_inducing", num_inducing),
            ("num_seeds", num_seeds),
        ):
            positive_int(name, value)
        non_negative_int("decoder_depth", decoder_depth)
        boolean("layer_norm", layer_norm)
        boolean("record_stats", record_stats)
        probability("drop_rate", drop_rate)
        if embed_dim % num_heads:
            raise ZooError(
                f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}: give an embed_dim that "
                f"is a multiple of num_heads"
            )
        super().__init__(num_classes=num_classes, **kwargs)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.head_hidden_size = num_seeds * embed_dim
        opts = {"layer_norm": layer_norm, "n_iter": n_iter, "record_stats": record_stats}
        self.encoder = nn.ModuleList(
            [ISAB(in_chans if i == 0 else embed_dim, embed_dim, num_heads, num_inducing, **opts) for i in range(depth)]
        )
        self.pool_drop = nn.Dropout(drop_rate)
        self.pool = PMA(embed_dim, num_heads, num_seeds, **opts)
        self.decoder = nn.ModuleList([SAB(embed_dim, embed_dim, num_heads, **opts) for _ in range(decoder_depth)])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_seeds * embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._set_pretrained_cfg()
        if weights is not None:
            load_weights(self, weights)

    @property
    def attentions(self) -> list[SinkhornMultiheadAttention]:
        return [m for m in self.modules() if isinstance(m, SinkhornMultiheadAttention)]

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise learning-rate decay ...), in the order the data flows: each encoder
        block, the pooling block, each decoder block; the head comes last.

        Args:
            coarse: timm's coarse grouping; the same groups here (a block is the smallest unit).
        """
        return {"encoder": r"^encoder\.(\d+)", "pool": r"^pool\.", "decoder": r"^decoder\.(\d+)"}

    def forward_features(self, points: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled (and decoded) seeds (B, num_seeds, embed_dim); zero for a fully padded cloud (see the class)."""
        _check_points(points, self.in_chans, type(self).__name__, self._param_dtype())
        if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.shape != points.shape[:2]):
            raise ZooError(
                f"padding_mask must be a bool tensor of shape (B, N) = {tuple(points.shape[:2])} with True = padded "
                f"point, got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        empty = None
        if padding_mask is not None:
            # by masking, computed once here (no host read): padded points set to 0 (their values never matter, even
            # NaN / inf); a fully padded cloud runs as the one-point cloud {0} (its first point unpadded), so that no
            # attention row is left without keys, and its features are set to zero at the end
            points = points.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            empty = padding_mask.all(dim=1, keepdim=True)  # (B, 1)
            first = torch.arange(padding_mask.shape[1], device=padding_mask.device) == 0
            padding_mask = padding_mask & ~(empty & first)
        x = points
        for block in self.encoder:
            x = block(x, padding_mask)
        z = self.pool(self.pool_drop(x), padding_mask)
        for block in self.decoder:
            z = block(z)
        return z if empty is None else z.masked_fill(empty.unsqueeze(-1), 0.0)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The seeds (B, num_seeds, embed_dim) concatenated (B, head_hidden_size), dropout, and (unless
        ``pre_logits``) the classifier."""
        x = self.head_drop(x.flatten(1))
        return x if pre_logits else self.head(x)

    def forward(self, points: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_classes) of points (B, N, in_chans)."""
        return self.forward_head(self.forward_features(points, padding_mask))


# ------------------------------------------------------------------------------------------------
# Point Cloud Transformer: sampling and grouping


def index_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``points[b, idx[b, ...]]``: points (B, N, C), idx (B, ...) long -> (B, ..., C)."""
    B = points.shape[0]
    flat = idx.reshape(B, -1)
    out = points.gather(1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return out.reshape(*idx.shape, points.shape[-1])


def _stable_argsort(key: torch.Tensor) -> torch.Tensor:
    """``key.argsort(dim=1, stable=True)`` of a (B, N) float tensor, without a stable sort, which ONNX cannot express
    (``torch.onnx.export`` has no ``aten.sort.stable``): a first sort ranks the distinct values (equal values share a
    rank: 0.0 and -0.0, and the NaNs, which sort last), and the keys (rank, position) are unique, so any sort of them
    gives the stable order."""
    N = key.shape[1]
    order = key.argsort(dim=1)
    s = key.gather(1, order)
    same = (s[:, 1:] == s[:, :-1]) | (s[:, 1:].isnan() & s[:, :-1].isnan())
    rank = torch.cat([torch.zeros_like(order[:, :1]), (~same).long()], dim=1).cumsum(1)
    rank = torch.empty_like(order).scatter_(1, order, rank)
    return (rank * N + torch.arange(N, device=key.device)).argsort(dim=1)


def _lexicographic_order(xyz: torch.Tensor) -> torch.Tensor:
    """(B, N) permutation sorting each cloud by x, then y, then z (stable sorts, least significant key first)."""
    B, N, D = xyz.shape
    perm = torch.arange(N, device=xyz.device).expand(B, N)
    for d in reversed(range(D)):
        key = xyz[..., d].gather(1, perm)
        perm = perm.gather(1, _stable_argsort(key))
    return perm


def _sq_dist(planes: tuple[torch.Tensor, ...], center: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """sum_d (x_d - c_d)^2 with one (..., N) plane per coordinate: every distance is computed alone, in the same
    order of operations for any point order (one plane per coordinate is also much faster on CPU than (..., N, 3))."""
    d = (planes[0] - center[0]).square_()
    for x, c in zip(planes[1:], center[1:]):
        d += (x - c).square_()
    return d


@torch.no_grad()
def farthest_point_sample(xyz: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Indices (B, num_samples) of iterative farthest point sampling, independent of the order of the points.

    c_0 = argmax_i |x_i - mean(x)|,  c_s = argmax_i min_{t < s} |x_i - x_{c_t}|   (ties: lexicographically first)

    The points are put in lexicographic order of their coordinates before the loop (so the centroid, every
    distance and every tie are computed the same way for any ordering of the input); the returned indices index
    the input. Vectorised over the batch, one loop over the ``num_samples`` steps, no host sync.
    """
    B, N, D = xyz.shape
    if num_samples > N:
        raise ZooError(
            f"farthest_point_sample: cannot sample {num_samples} points from a cloud of {N}: give at least "
            f"{num_samples} points (or sample fewer)"
        )
    order = _lexicographic_order(xyz)
    planes = tuple(xyz[..., d].gather(1, order) for d in range(D))  # (B, N) each, in lexicographic order
    far = _sq_dist(planes, tuple(x.mean(1, keepdim=True) for x in planes)).argmax(-1)  # argmax: first maximum
    idx = torch.empty(B, num_samples, dtype=torch.long, device=xyz.device)
    dist = torch.full((B, N), float("inf"), dtype=xyz.dtype, device=xyz.device)
    for s in range(num_samples):
        idx[:, s] = far
        center = tuple(x.gather(1, far.unsqueeze(1)) for x in planes)  # (B, 1) each
        dist = torch.minimum(dist, _sq_dist(planes, center))
        far = dist.argmax(-1)
    return order.gather(1, idx)


@torch.no_grad()
def knn(xyz: torch.Tensor, centers: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, S, k) of the k nearest points of xyz (B, N, 3) to each of centers (B, S, 3) (in no set order)."""
    if k > xyz.shape[1]:
        raise ZooError(f"knn: cannot take {k} neighbours among {xyz.shape[1]} points: give more points or a smaller k")
    planes = tuple(xyz[..., d].unsqueeze(1) for d in range(xyz.shape[-1]))  # (B, 1, N)
    center = tuple(centers[..., d].unsqueeze(2) for d in range(centers.shape[-1]))  # (B, S, 1)
    return _sq_dist(planes, center).topk(k, dim=-1, largest=False, sorted=False).indices


def sample_and_group(
    xyz: torch.Tensor, features: torch.Tensor, num_samples: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PCT's sampling and grouping: FPS centres c and, for each, its k nearest points j with features
    [f_j - f_c, f_c]. xyz (B, N, 3), features (B, N, D) -> centres (B, S, 3), grouped (B, S, k, 2D)."""
    idx = farthest_point_sample(xyz, num_samples)
    new_xyz = index_points(xyz, idx)
    center = index_points(features, idx).unsqueeze(2)  # (B, S, 1, D)
    grouped = index_points(features, knn(xyz, new_xyz, k))  # (B, S, k, D)
    return new_xyz, torch.cat([grouped - center, center.expand_as(grouped)], dim=-1)


class _LBR(nn.Sequential):
    """Linear (no bias) + BatchNorm over every leading position + ReLU (or LeakyReLU) on (..., C) tensors."""

    def __init__(self, dim_in: int, dim_out: int, negative_slope: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim_in, dim_out, bias=False),
            nn.BatchNorm1d(dim_out),
            nn.LeakyReLU(negative_slope) if negative_slope else nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear, norm, act = self
        y = linear(x)
        return act(norm(y.reshape(-1, y.shape[-1])).reshape(y.shape))


class _NeighborEmbedding(nn.Module):
    """One sampling-and-grouping stage: (B, N, D) -> (B, S, 2D) = max_k LBR(LBR([f_j - f_c, f_c]))."""

    def __init__(self, dim: int, num_samples: int, k: int) -> None:
        super().__init__()
        self.num_samples, self.k = num_samples, k
        self.lbr1 = _LBR(2 * dim, 2 * dim)
        self.lbr2 = _LBR(2 * dim, 2 * dim)

    def forward(self, xyz: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_xyz, grouped = sample_and_group(xyz, features, self.num_samples, self.k)
        return new_xyz, self.lbr2(self.lbr1(grouped)).amax(dim=2)


class OffsetAttention(nn.Module):
    """PCT's offset-attention layer on (B, N, C): F_out = F + LBR(F - A V), V = F W_V + b, C = (F W_QK)(F W_QK)^T.

    ``attention="pct"`` (published): A = L1-over-queries(softmax-over-keys(C))^T, i.e. A_ji = P_ij / sum_i' P_i'j
    with P = softmax_j(C) (+1e-9 as PCT), so out_j = sum_i A_ji v_i; with C symmetric these are two Sinkhorn
    half-steps of exp(C) (columns, then rows). ``attention="sinkhorn"``: A = Sinkhorn_{n_iter}(exp(C)), rows first
    (:func:`zoo.ops.sinkhorn_attention`, scale 1 as PCT); ``n_iter=1`` is the row softmax.
    ``record_stats``: column-sum statistics of A in ``self.stats`` after each forward. ``channels``: C, the width
    of the input and output (the shared query / key projection has C / 4 channels).
    """

    def __init__(self, channels: int, attention: str = "pct", n_iter: int = 1, record_stats: bool = False) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ZooError(f"unknown attention {attention!r}: choose one of {', '.join(ATTENTIONS)}")
        self.attention = attention
        self.n_iter = check_n_iter(n_iter)
        self.record_stats, self.stats = bool(record_stats), {}
        self.qk = nn.Linear(channels, channels // 4, bias=False)  # shared query / key projection (PCT)
        self.v = nn.Linear(channels, channels)
        self.trans = _LBR(channels, channels)
        self.trans[0] = nn.Linear(channels, channels)  # PCT's trans_conv has a bias

    def extra_repr(self) -> str:
        return f"attention={self.attention!r}" + (f", n_iter={self.n_iter}" if self.attention == "sinkhorn" else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, v = self.qk(x), self.v(x)
        if self.attention == "pct":
            p = torch.bmm(q, q.transpose(1, 2)).softmax(dim=-1)
            a = (p / (1e-9 + p.sum(dim=1, keepdim=True))).transpose(1, 2)
            out = torch.bmm(a, v)
        elif self.record_stats:
            out, a = sinkhorn_attention(q, q, v, n_iter=self.n_iter, scale=1.0, return_weights=True)
        else:
            out = sinkhorn_attention(q, q, v, n_iter=self.n_iter, scale=1.0)
        if self.record_stats:
            self.stats = column_sum_stats(a.detach())
        return x + self.trans(x - out)


class PointCloudTransformer(_PointCloudProtocol, SinkhornSettings, HubMixin, ImageClassifier):
    """Point Cloud Transformer (PCT) / Point Cloud Sinkformer classifier, see the module docstring.

    ``forward(points)``: points (B, N, in_chans) with xyz in the first 3 channels (used for sampling and
    grouping; all channels are features) -> logits (B, num_classes). Needs N >= ``sample_points[0]``.

    Args:
        in_chans: channels per point (3: xyz; 6: xyz + normals).
        num_classes: classifier outputs (0: none; ``forward`` returns the last head layer's features).
        embed_dim: width E of the input embedding; stage s of the neighbour embedding doubles it, the attention
            layers are E * 2^len(sample_points) wide (published: 64 -> 128 -> 256).
        sample_points: FPS centres of each sampling-and-grouping stage, non-increasing (published: 512, 256).
        num_neighbors: k of the kNN grouping (published: 32).
        depth: offset-attention layers (published: 4).
        fuse_dim: width after the concatenation of the attention outputs (published: 1024).
        head_dims: widths of the LBR + dropout layers of the classifier (published: 512, 256).
        pooling: ``"max+avg"`` (the paper: max and average pooling concatenated) or ``"max"`` (the authors' code).
        attention: ``"pct"`` (softmax + L1, the published PCT) or ``"sinkhorn"`` (``n_iter`` half-steps).
        n_iter: Sinkhorn half-steps with ``attention="sinkhorn"`` (1 = softmax attention).
        record_stats: record the column-sum statistics of every attention (:meth:`attention_stats`).
        drop_rate: dropout of the classifier layers (published: 0.5).
        label_smoothing: of the cross-entropy (published: 0.2).
        weights: a file (state dict, ``.ckpt``, ``.safetensors``, ``save_pretrained`` folder) or ``"hf-hub:org/name"``.
        **kwargs: the training settings of :class:`zoo.tasks.ImageClassifier` (``optimizer``, ``lr_scheduler``);
            without ``optimizer``, :attr:`default_optimizer`; with the task's default schedule (cosine over the run)
            these are the published settings (SGD lr 0.01, momentum 0.9, weight decay 5e-4).
    """

    same_function_args = frozenset({"num_classes", "record_stats", "label_smoothing", "drop_rate"})

    default_optimizer = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 40,
        embed_dim: int = 64,
        sample_points: Sequence[int] = (512, 256),
        num_neighbors: int = 32,
        depth: int = 4,
        fuse_dim: int = 1024,
        head_dims: Sequence[int] = (512, 256),
        pooling: str = "max+avg",
        attention: str = "pct",
        n_iter: int = 1,
        record_stats: bool = False,
        drop_rate: float = 0.5,
        label_smoothing: float = 0.2,
        weights: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_model_kwargs(type(self), kwargs, ImageClassifier)
        non_negative_int(
            "num_classes", num_classes, hint="give the number of classes, or 0 for a model without a classifier"
        )
        choice("attention", attention, ATTENTIONS)
        if attention == "pct" and n_iter != 1:
            raise ZooError(
                f"n_iter={n_iter} needs attention='sinkhorn' (attention='pct' is PCT's softmax + L1 "
                f"normalisation, which has no iterations)"
            )
        choice("pooling", pooling, POOLINGS)
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_neighbors", num_neighbors),
            ("depth", depth),
            ("fuse_dim", fuse_dim),
        ):
            positive_int(name, value)
        integer("in_chans", in_chans, 3, hint="the first 3 channels are xyz: give in_chans >= 3")
        boolean("record_stats", record_stats)
        probability("drop_rate", drop_rate)
        sample_points = int_sequence("sample_points", sample_points, min_value=1)
        head_dims = int_sequence("head_dims", head_dims, min_value=1, allow_empty=True)
        if any(b > a for a, b in zip(sample_points, sample_points[1:])):
            raise ZooError(f"sample_points must not increase from one stage to the next, got {sample_points!r}")
        if len(sample_points) > 1 and num_neighbors > min(sample_points[:-1]):
            raise ZooError(
                f"num_neighbors={num_neighbors} exceeds the {min(sample_points[:-1])} points a later "
                f"stage groups from (sample_points={sample_points!r}): use fewer neighbours"
            )
        super().__init__(num_classes=num_classes, label_smoothing=label_smoothing, **kwargs)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.sample_points = sample_points
        self.embedding = nn.Sequential(_LBR(in_chans, embed_dim), _LBR(embed_dim, embed_dim))
        self.neighbor_embedding = nn.ModuleList(
            [_NeighborEmbedding(embed_dim * 2**s, n, num_neighbors) for s, n in enumerate(sample_points)]
        )
        channels = embed_dim * 2 ** len(sample_points)
        self.channels = channels
        self.pre_attention = nn.Sequential(_LBR(channels, channels), _LBR(channels, channels))
        self.blocks = nn.ModuleList([OffsetAttention(channels, attention, n_iter, record_stats) for _ in range(depth)])
        self.fuse = _LBR(channels * (depth + 1), fuse_dim, negative_slope=0.2)
        self.pooling = pooling
        self.num_features = fuse_dim  # channels of forward_features (timm's); the pooled width is 2x for max+avg
        layers: list[nn.Module] = []
        width = fuse_dim * (2 if pooling == "max+avg" else 1)
        for d in head_dims:
            layers += [_LBR(width, d, negative_slope=0.2), nn.Dropout(drop_rate)]
            width = d
        self.mlp_head = nn.Sequential(*layers)
        self.head_hidden_size = width
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self._set_pretrained_cfg()
        if weights is not None:
            load_weights(self, weights)

    def min_num_points(self) -> int:
        return self.sample_points[0]

    @property
    def attentions(self) -> list[OffsetAttention]:
        return list(self.blocks)

    def set_n_iter(self, n_iter: int) -> None:
        """Change the Sinkhorn half-steps of every attention (``attention="sinkhorn"`` only)."""
        if any(b.attention != "sinkhorn" for b in self.blocks):
            raise ZooError("set_n_iter needs attention='sinkhorn' (attention='pct' has no iterations)")
        super().set_n_iter(n_iter)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise learning-rate decay ...): the stem (point and neighbour embeddings,
        the layer before attention), each offset-attention block in order, the fusing layer; the head layers come
        last.

        Args:
            coarse: timm's coarse grouping; the same groups here (a block is the smallest unit).
        """
        return {
            "stem": r"^embedding|^neighbor_embedding|^pre_attention",
            "blocks": r"^blocks\.(\d+)",
            "fuse": r"^fuse\.",
        }

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        """The fused per-centre features before pooling (B, S, fuse_dim), S = ``sample_points[-1]``."""
        _check_points(points, self.in_chans, type(self).__name__, self._param_dtype())
        if points.shape[1] < self.sample_points[0]:
            raise ZooError(
                f"PointCloudTransformer samples {self.sample_points[0]} centres by farthest point sampling: clouds "
                f"need at least {self.sample_points[0]} points, got {points.shape[1]} (give more points, or build "
                f"the model with smaller sample_points)"
            )
        xyz = points[..., :3].detach()
        x = self.embedding(points)
        for stage in self.neighbor_embedding:
            xyz, x = stage(xyz, x)
        outs = [x]  # the neighbour embedding joins the concatenation (the authors' code)
        x = self.pre_attention(x)
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return self.fuse(torch.cat([*outs[1:], outs[0]], dim=-1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Max (+ average, concatenated) pooling over the centres (B, num_features or 2 num_features), the LBR +
        dropout head layers (B, head_hidden_size) and (unless ``pre_logits``) the classifier."""
        x = torch.cat([x.amax(dim=1), x.mean(dim=1)], dim=-1) if self.pooling == "max+avg" else x.amax(dim=1)
        x = self.mlp_head(x)
        return x if pre_logits else self.head(x)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of points (B, N, in_chans)."""
        return self.forward_head(self.forward_features(points))


# ------------------------------------------------------------------------------------------------
# Published configurations (no weights are published): the Sinkformers paper's ModelNet40 models

SINKFORMERS_PAPER = "arXiv:2110.11773"  # Sander, Ablin, Blondel, Peyre: Sinkformers (AISTATS 2022)
_SET_NOTE = (
    "ModelNet40, 5000 points sampled on each mesh surface, standardised, rotation about z in +-0.1 pi and "
    "scaling in [0.8, 1.25]; Adam lr 1e-3, batch 64, 300 epochs, lr / 10 after epoch 200"
)
_PCT_NOTE = (
    "ModelNet40 (PointNet's HDF5 files), 1024 points scaled to the unit sphere, scaling U(2/3, 3/2) and "
    "translation U(-0.2, 0.2); SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine, label smoothing 0.2, "
    "batch 32, 300 epochs"
)


_SET_MODELNET40 = {
    "in_chans": 3,
    "num_classes": 40,
    "embed_dim": 256,
    "num_heads": 4,
    "depth": 2,
    "num_inducing": 16,
    "num_seeds": 1,
    "decoder_depth": 1,
    "layer_norm": True,
}
_PCT_MODELNET40 = {
    "in_chans": 3,
    "num_classes": 40,
    "embed_dim": 64,
    "sample_points": (512, 256),
    "num_neighbors": 32,
    "depth": 4,
    "fuse_dim": 1024,
    "head_dims": (512, 256),
    "pooling": "max+avg",
}


def _published(architecture: dict[str, Any], metrics: dict[str, float], recipe: str, note: str) -> PretrainedCfg:
    """A published configuration: its architecture as ``model_args`` (a model built otherwise loses the published
    accuracies, which are of this architecture), its accuracies, and the recipe that trains it."""
    return PretrainedCfg(
        input_size=None,
        num_classes=architecture["num_classes"],
        classifier="head",
        paper_ids=SINKFORMERS_PAPER,
        recipe=recipe,
        model_args=dict(architecture),
        metrics={
            f"modelnet40/top1_{stat}": {
                "value": value,
                "kind": "published",
                "of": "model",
                "note": f"{stat} test accuracy over runs",
            }
            for stat, value in metrics.items()
        },
        notes=(f"published configuration without weights: {note}",),
    )


default_cfgs: dict[str, PretrainedCfg] = register_pretrained_cfgs(
    {
        "set_sinkformer_modelnet40.sinkformers_paper": _published(
            {**_SET_MODELNET40, "n_iter": 21}, {"best": 89.1, "median": 88.4}, "modelnet40_set_sinkformer", _SET_NOTE
        ),
        "set_transformer_modelnet40.sinkformers_paper": _published(
            {**_SET_MODELNET40, "n_iter": 1},
            {"best": 87.8, "median": 86.3},
            "modelnet40_set_sinkformer",
            _SET_NOTE + " (the recipe with --model.init_args.n_iter 1)",
        ),
        "point_cloud_sinkformer.sinkformers_paper": _published(
            {**_PCT_MODELNET40, "attention": "sinkhorn", "n_iter": 21},
            {"median": 92.8},
            "modelnet40_pct",
            _PCT_NOTE + " (the recipe with --model.init_args.attention sinkhorn --model.init_args.n_iter 21)",
        ),
        "point_cloud_transformer.sinkformers_paper": _published(
            {**_PCT_MODELNET40, "attention": "pct", "n_iter": 1}, {"median": 92.5}, "modelnet40_pct", _PCT_NOTE
        ),
    }
)


# ------------------------------------------------------------------------------------------------
# Builders

_SET_TRAINING = {"drop_rate": 0.5}
# the published schedule: lr / 10 after epoch 200 (of 300)
_SET_SCHEDULE = functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[200], gamma=0.1)
_PCT_TRAINING = {"drop_rate": 0.5, "label_smoothing": 0.2}


@register_model
def set_transformer_modelnet40(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> SetTransformer:
    """The ModelNet40 Set Transformer (softmax, ``n_iter=1``): 2 ISAB (256 wide, 4 heads, 16 inducing points),
    PMA (1 seed) + SAB, dropout 0.5, 40 classes; trains with Adam lr 1e-3, lr / 10 after epoch 200 (of 300; batch
    64, 5000 points). Published (Sinkformers paper): best 87.8%, median 86.3%; no weights:
    ``pretrained=True`` is an error (nothing to load); ``weights=`` loads any source zoo reads."""
    kwargs.setdefault("lr_scheduler", _SET_SCHEDULE)
    defaults = {**_SET_MODELNET40, **_SET_TRAINING, "n_iter": 1}
    return build_model(
        SetTransformer, "set_transformer_modelnet40", defaults, kwargs, pretrained=pretrained, weights=weights
    )


@register_model
def set_sinkformer_modelnet40(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> SetTransformer:
    """The ModelNet40 Set Sinkformer: :func:`set_transformer_modelnet40` with 21 Sinkhorn half-steps in every
    attention. Published (Sinkformers paper): best 89.1%, median 88.4%; no weights (recipe
    ``modelnet40_set_sinkformer``): ``pretrained=True`` is an error (nothing to load); ``weights=`` loads any
    source zoo reads."""
    kwargs.setdefault("lr_scheduler", _SET_SCHEDULE)
    defaults = {**_SET_MODELNET40, **_SET_TRAINING, "n_iter": 21}
    return build_model(
        SetTransformer, "set_sinkformer_modelnet40", defaults, kwargs, pretrained=pretrained, weights=weights
    )


@register_model
def point_cloud_transformer(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> PointCloudTransformer:
    """PCT (Guo et al. 2021) for ModelNet40: embedding 64, neighbour embedding 512 / 256 centres with 32
    neighbours, 4 offset-attention layers (256 wide, softmax + L1), fusion 1024, max + avg pooling, head 512 / 256
    with dropout 0.5, label smoothing 0.2; trains with SGD lr 0.01 (PCT_Pytorch's ``--lr 1e-4`` x 100), momentum
    0.9, weight decay 5e-4, cosine (1024 points, batch 32). Published (Sinkformers paper): median 92.5%; no
    weights (recipe ``modelnet40_pct``): ``pretrained=True`` is an error (nothing to load); ``weights=`` loads any
    source zoo reads."""
    defaults = {**_PCT_MODELNET40, **_PCT_TRAINING, "attention": "pct", "n_iter": 1}
    return build_model(
        PointCloudTransformer, "point_cloud_transformer", defaults, kwargs, pretrained=pretrained, weights=weights
    )


@register_model
def point_cloud_sinkformer(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> PointCloudTransformer:
    """The Point Cloud Sinkformer: :func:`point_cloud_transformer` with the offset-attention normalisation
    replaced by 21 Sinkhorn half-steps (``attention="sinkhorn"``). Published (Sinkformers paper): median 92.8%; no
    weights: ``pretrained=True`` is an error (nothing to load); ``weights=`` loads any source zoo reads."""
    defaults = {**_PCT_MODELNET40, **_PCT_TRAINING, "attention": "sinkhorn", "n_iter": 21}
    return build_model(
        PointCloudTransformer, "point_cloud_sinkformer", defaults, kwargs, pretrained=pretrained, weights=weights
    )
