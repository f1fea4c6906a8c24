"""Sinkformers for translation (Sander et al. 2022): fairseq's encoder-decoder Transformer with Sinkhorn attention in
the encoder self-attention; softmax in the causal decoder self-attention and in the encoder-decoder attention (the
published IWSLT'14 model uses Sinkhorn in the encoder only). ``n_iter=1`` is fairseq's Transformer.

Forward equations (fairseq ``TransformerModel``; E the width, H heads of width d = E / H, V the vocabulary):

Positions and embeddings (encoder on the source x, decoder on ``prev_output_tokens`` = ``</s> y_1 .. y_{n-1}``):

    p_t = pad + #{s <= t : x_s != pad}   for a token,   p_t = pad for padding       (pad = 1: positions start at 2)
    P[p, j] = sin(p w_j), P[p, E/2 + j] = cos(p w_j),  w_j = exp(-j ln(10000) / (E/2 - 1)),  P[pad] = 0
    h_t = dropout(s_E W_emb[x_t] + P[p_t])            s_E = sqrt(E) (1 if no_scale_embedding)

(``learned_pos``: P is a learned table of max_positions + pad + 1 rows; ``layernorm_embedding`` adds a LayerNorm
before the dropout). The encoder zeroes h at padded positions. Left or right padding give the same values at the
valid tokens, since positions count valid tokens only.

Attention (fairseq ``MultiheadAttention``: separate ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``):

    q = W_q h + b_q,  k = W_k m + b_k,  v = W_v m + b_v       split into H heads
    C = q k^T / sqrt(d) (+ -inf at masked keys),  A = Sinkhorn_{n_iter}(C) (n_iter = 1: row softmax)
    MHA(h, m) = W_o concat_heads(dropout_att(A) v) + b_o

Sinkhorn_{n_iter} alternates row and column normalisations of exp(C) over the valid tokens
(:func:`zoo.ops.sinkhorn_attention`, (S1)-(S2)); padded queries get zero rows.

Encoder layer (post-norm, fairseq's default ``encoder_normalize_before=False``; m the source padding):

    h = LN_sa(h + dropout(MHA_sinkhorn(h, h; m)))
    h = LN_ff(h + dropout(W_2 dropout_act(relu(W_1 h + b_1)) + b_2))

Decoder layer (causal self-attention; cross-attention on the encoder output e):

    h = LN_sa(h + dropout(MHA_softmax(h, h; causal)))
    h = LN_ca(h + dropout(MHA_softmax(h, e; m)))
    h = LN_ff(h + dropout(FFN(h)))

Pre-norm (``*_normalize_before=True``): h = h + dropout(sublayer(LN(h))) and a final LayerNorm after the stack.
Output: logits = h W_out^T, W_out = ``decoder.embed_tokens.weight`` with ``share_decoder_input_output_embed``;
log p = log_softmax(logits).

Parameter names are fairseq's, so a fairseq checkpoint's ``model`` state dict loads without renaming
(``encoder.embed_tokens.weight``, ``encoder.embed_positions._float_tensor``, ``encoder.layers.{i}.self_attn.
{k,v,q,out}_proj.{weight,bias}``, ``encoder.layers.{i}.self_attn_layer_norm``, ``fc1``, ``fc2``,
``final_layer_norm``, ``decoder.layers.{i}.encoder_attn.*``, ``encoder_attn_layer_norm``,
``decoder.output_projection.weight``, ``encoder.version`` / ``decoder.version`` = [3.]), and
:meth:`SinkformerTranslation.from_fairseq_checkpoint` builds the model from a checkpoint file (no fairseq needed).
Dictionary conventions are fairseq's: bos 0, pad 1, eos 2, unk 3.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.hub import HubMixin, checkpoint_reads, load_state_dict, load_weights
from zoo.models.arguments import check_model_kwargs
from zoo.nn.attention import SinkhornCore, SinkhornSettings, check_n_iter
from zoo.ops.masks import AllowedMask, PaddingMask
from zoo.pretrained import builder_args_with_recorded
from zoo.registry import register_model
from zoo.tasks.optim import InverseSqrtLR
from zoo.tasks.translation import TranslationTask, check_token_ids, check_token_range
from zoo.validation import boolean, choice, host_read_is_free, integer, non_negative_int, positive_int, probability

__all__ = [
    "EncoderOut",
    "LearnedPositionalEmbedding",
    "MultiheadAttention",
    "SinkformerTranslation",
    "SinusoidalPositionalEmbedding",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "make_positions",
    "sinkformer_transformer_iwslt_de_en",
    "sinkformer_transformer_numbers",
    "sinkformer_transformer_toy",
    "transformer_iwslt_de_en",
    "translation_cfg",
]

BOS, PAD, EOS, UNK = 0, 1, 2, 3
ACTIVATIONS = ("relu", "gelu", "gelu_accurate", "tanh", "linear")
IWSLT14_DE_EN_VOCAB = (8848, 6632)  # fairseq-preprocess on prepare-iwslt14.sh's BPE data: [de] 8848, [en] 6632 types


def _activation(name: str) -> Any:
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "gelu_accurate":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "tanh":
        return torch.tanh
    if name == "linear":
        return lambda x: x
    raise ZooError(f"unknown activation_fn {name!r}: choose one of {', '.join(ACTIVATIONS)}")


# ================================================================================================ positions


def make_positions(tokens: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """fairseq's ``make_positions``: padding_idx + 1, + 2, ... over the non-pad tokens, padding_idx at pads."""
    mask = tokens.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


def sinusoidal_table(num_embeddings: int, embedding_dim: int, padding_idx: int | None) -> torch.Tensor:
    """fairseq's ``SinusoidalPositionalEmbedding.get_embedding`` (sin half then cos half, row padding_idx zero)."""
    half = embedding_dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float) * -step)
    args = torch.arange(num_embeddings, dtype=torch.float).unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1).view(num_embeddings, -1)
    if embedding_dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros(num_embeddings, 1)], dim=1)
    if padding_idx is not None:
        emb[padding_idx, :] = 0
    return emb


class SinusoidalPositionalEmbedding(nn.Module):
    """fairseq's non-learned positions; its only state-dict entry is fairseq's ``_float_tensor`` placeholder (the
    table is a non-persistent buffer, grown when a longer input comes).

    Args:
        embedding_dim: the embedding dimension.
        padding_idx: the padding token id; positions start at ``padding_idx + 1``.
        init_size: the rows of the table built at construction.
    """

    def __init__(self, embedding_dim: int, padding_idx: int, init_size: int = 1024) -> None:
        super().__init__()
        self.embedding_dim, self.padding_idx = embedding_dim, padding_idx
        self.register_buffer("_float_tensor", torch.zeros(1))
        self.register_buffer("weights", sinusoidal_table(init_size, embedding_dim, padding_idx), persistent=False)
        self.max_positions = int(1e5)

    def _table(self, size: int) -> torch.Tensor:
        if size > self.weights.size(0):  # a shape check, no device sync
            self.weights = sinusoidal_table(size, self.embedding_dim, self.padding_idx).to(self._float_tensor)
        return self.weights.to(self._float_tensor)

    def forward(self, tokens: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, E); with ``step``, the embedding of decoder position ``step`` for every row."""
        if step is not None:
            pos = self.padding_idx + 1 + step
            return self._table(pos + 1)[pos].expand(tokens.size(0), 1, -1)
        table = self._table(self.padding_idx + 1 + tokens.size(1))
        return table[make_positions(tokens, self.padding_idx)].detach()


class LearnedPositionalEmbedding(nn.Embedding):
    """fairseq's learned positions (``encoder_learned_pos``): max_positions + padding_idx + 1 rows of
    ``embedding_dim`` entries; positions start at ``padding_idx + 1``."""

    def __init__(self, max_positions: int, embedding_dim: int, padding_idx: int) -> None:
        super().__init__(max_positions + padding_idx + 1, embedding_dim, padding_idx)
        nn.init.normal_(self.weight, mean=0, std=embedding_dim**-0.5)
        with torch.no_grad():
            self.weight[padding_idx].zero_()
        self.max_positions = max_positions

    def forward(self, tokens: torch.Tensor, step: int | None = None) -> torch.Tensor:  # type: ignore[override]
        if step is not None:
            pos = torch.full((tokens.size(0), 1), self.padding_idx + 1 + step, device=tokens.device)
        else:
            pos = make_positions(tokens, self.padding_idx)
        return F.embedding(pos, self.weight, self.padding_idx)


def _positional_embedding(max_positions: int, dim: int, padding_idx: int, learned: bool) -> nn.Module:
    if learned:
        return LearnedPositionalEmbedding(max_positions, dim, padding_idx)
    return SinusoidalPositionalEmbedding(dim, padding_idx, init_size=max_positions + padding_idx + 1)


def _embedding(num: int, dim: int, padding_idx: int) -> nn.Embedding:
    """fairseq's ``Embedding``: normal(0, dim^-1/2), padding row zero."""
    m = nn.Embedding(num, dim, padding_idx=padding_idx)
    nn.init.normal_(m.weight, mean=0, std=dim**-0.5)
    nn.init.constant_(m.weight[padding_idx], 0)
    return m


# ================================================================================================ attention


class MultiheadAttention(SinkhornCore, nn.Module):
    """fairseq's ``MultiheadAttention`` parameters (``k_proj``, ``v_proj``, ``q_proj``, ``out_proj``), batch-first,
    with Sinkhorn normalisation (``n_iter`` half-steps; 1 = softmax) and a key/value cache for decoding; the attention
    itself is the zoo.nn core (:class:`zoo.nn.attention.SinkhornCore`).

    ``forward(query, key_value=None, key_padding_mask=None, attn_mask=None, cache=None, static_kv=False)``:
    ``query`` (B, L, E), ``key_value`` (B, S, kdim) (None: self-attention), ``key_padding_mask`` (B, S) bool True
    at pads, ``attn_mask`` bool (B or 1, 1, L, S) True = may attend. With ``cache`` (a dict) the projected keys and
    values are kept: appended to (self-attention) or computed once (``static_kv``, encoder-decoder attention).

    Args:
        embed_dim: the model dimension (queries and output).
        num_heads: attention heads (``embed_dim`` must be divisible by it).
        kdim: the dimension of ``key_value`` for the keys; None for ``embed_dim``.
        vdim: the dimension of ``key_value`` for the values; None for ``embed_dim``.
        dropout: dropout probability on the attention weights.
        n_iter: Sinkhorn half-steps (1 is softmax attention).
        record_stats: whether each forward stores the column-sum statistics of its weights in ``stats``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        n_iter: int = 1,
        record_stats: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ZooError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout = dropout
        self.n_iter = check_n_iter(n_iter)
        self.record_stats, self.stats = bool(record_stats), {}
        self.k_proj = nn.Linear(self.kdim, embed_dim)
        self.v_proj = nn.Linear(self.vdim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        gain = 1 / math.sqrt(2) if self.kdim == self.vdim == embed_dim else 1.0  # fairseq's reset_parameters
        for lin in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(lin.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, n_iter={self.n_iter}"

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key_value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: dict[str, torch.Tensor] | None = None,
        static_kv: bool = False,
    ) -> torch.Tensor:
        B, L, E = query.shape
        q = self._heads(self.q_proj(query))
        if cache is not None and static_kv and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            kv = query if key_value is None else key_value
            k, v = self._heads(self.k_proj(kv)), self._heads(self.v_proj(kv))
            if cache is not None:
                if not static_kv and "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        dropout_p = self.dropout if self.training else 0.0
        # Sinkhorn (or recorded weights): padded queries of the self-attention are left out of the marginals and get
        # zero rows; softmax keeps every row (fairseq computes the padded positions too)
        pad_queries = key_value is None and (self.n_iter > 1 or self.record_stats)
        mask = None if attn_mask is None else AllowedMask(attn_mask)
        if key_padding_mask is not None:
            mask = PaddingMask(key_padding_mask, key_padding_mask if pad_queries else None) & mask
        out, _ = self.attend(q, k, v, mask, dropout_p)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, E))


# ================================================================================================ layers


class _ResidualLayer(nn.Module):
    """What fairseq's encoder and decoder layers share: the feed-forward block (``fc1``, ``fc2``,
    ``final_layer_norm``) and the residual sublayer rule, post-norm x = LN(x + drop(f(x))) or pre-norm
    x = x + drop(f(LN(x))) (``normalize_before``)."""

    def _init_ffn(
        self,
        embed_dim: int,
        ffn_embed_dim: int,
        dropout: float,
        activation_dropout: float,
        activation_fn: str,
        normalize_before: bool,
    ) -> None:
        self.dropout = nn.Dropout(dropout)
        self.activation_fn = _activation(activation_fn)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.normalize_before = normalize_before
        self.fc1 = nn.Linear(embed_dim, ffn_embed_dim)
        self.fc2 = nn.Linear(ffn_embed_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        """fc2(drop(act(fc1(x))))."""
        return self.fc2(self.activation_dropout(self.activation_fn(self.fc1(x))))

    def _sublayer(self, x: torch.Tensor, norm: nn.LayerNorm, fn: Any) -> torch.Tensor:
        y = fn(norm(x) if self.normalize_before else x)
        x = x + self.dropout(y)
        return x if self.normalize_before else norm(x)


class TransformerEncoderLayer(_ResidualLayer):
    """fairseq's ``TransformerEncoderLayer`` (names ``self_attn``, ``self_attn_layer_norm``, ``fc1``, ``fc2``,
    ``final_layer_norm``) with Sinkhorn self-attention.

    Args:
        embed_dim: the model dimension.
        ffn_embed_dim: hidden dimension of the feed-forward block.
        num_heads: attention heads.
        dropout: dropout probability after each sublayer.
        attention_dropout: dropout probability on the attention weights.
        activation_dropout: dropout probability after the feed-forward activation.
        activation_fn: the feed-forward activation (``"relu"``, ``"gelu"`` ...).
        normalize_before: pre-norm (x + drop(f(LN(x)))) when True, post-norm (LN(x + drop(f(x)))) when False.
        n_iter: Sinkhorn half-steps of the self-attention (1 is softmax attention).
        record_stats: whether the self-attention records its column-sum statistics.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_embed_dim: int,
        num_heads: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        activation_fn: str = "relu",
        normalize_before: bool = False,
        n_iter: int = 3,
        record_stats: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(
            embed_dim, num_heads, dropout=attention_dropout, n_iter=n_iter, record_stats=record_stats
        )
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self._init_ffn(embed_dim, ffn_embed_dim, dropout, activation_dropout, activation_fn, normalize_before)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        x = self._sublayer(x, self.self_attn_layer_norm, lambda h: self.self_attn(h, key_padding_mask=padding_mask))
        return self._sublayer(x, self.final_layer_norm, self._ffn)


class TransformerDecoderLayer(_ResidualLayer):
    """fairseq's ``TransformerDecoderLayer`` (``self_attn``, ``self_attn_layer_norm``, ``encoder_attn``,
    ``encoder_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``); softmax attention everywhere.

    Args:
        embed_dim: the model dimension.
        ffn_embed_dim: hidden dimension of the feed-forward block.
        num_heads: attention heads.
        encoder_embed_dim: the encoder's output dimension; None for ``embed_dim``.
        dropout: dropout probability after each sublayer.
        attention_dropout: dropout probability on the attention weights.
        activation_dropout: dropout probability after the feed-forward activation.
        activation_fn: the feed-forward activation (``"relu"``, ``"gelu"`` ...).
        normalize_before: pre-norm (x + drop(f(LN(x)))) when True, post-norm (LN(x + drop(f(x)))) when False.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_embed_dim: int,
        num_heads: int,
        encoder_embed_dim: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        activation_fn: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dim, num_heads, dropout=attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.encoder_attn = MultiheadAttention(
            embed_dim, num_heads, kdim=encoder_embed_dim, vdim=encoder_embed_dim, dropout=attention_dropout
        )
        self.encoder_attn_layer_norm = nn.LayerNorm(embed_dim)
        self._init_ffn(embed_dim, ffn_embed_dim, dropout, activation_dropout, activation_fn, normalize_before)

    def forward(
        self,
        x: torch.Tensor,
        encoder_out: torch.Tensor,
        encoder_padding_mask: torch.Tensor,
        self_attn_mask: torch.Tensor | None,
        cache: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        sa_cache = None if cache is None else cache.setdefault("self", {})
        ca_cache = None if cache is None else cache.setdefault("cross", {})
        x = self._sublayer(
            x, self.self_attn_layer_norm, lambda h: self.self_attn(h, attn_mask=self_attn_mask, cache=sa_cache)
        )
        x = self._sublayer(
            x,
            self.encoder_attn_layer_norm,
            lambda h: self.encoder_attn(
                h, encoder_out, key_padding_mask=encoder_padding_mask, cache=ca_cache, static_kv=True
            ),
        )
        return self._sublayer(x, self.final_layer_norm, self._ffn)


# ================================================================================================ encoder / decoder


class EncoderOut(NamedTuple):
    """Encoder output (B, S, E) and source padding mask (B, S), True at pads."""

    out: torch.Tensor
    padding_mask: torch.Tensor


class _TokenEmbedder(nn.Module):
    """The input embedding fairseq's encoder and decoder share (``version`` buffer, ``embed_tokens``,
    ``embed_positions``, ``layernorm_embedding``, dropout):

        x = dropout(LN_emb(embed_scale * E[tokens] + P[positions]))     embed_scale = sqrt(dim) unless no_scale
    """

    def __init__(
        self,
        embed_tokens: nn.Embedding,
        dropout: float,
        max_positions: int,
        learned_pos: bool,
        no_token_positional_embeddings: bool,
        layernorm_embedding: bool,
        no_scale_embedding: bool,
    ) -> None:
        super().__init__()
        self.register_buffer("version", torch.Tensor([3]))
        dim = embed_tokens.embedding_dim
        self.padding_idx = embed_tokens.padding_idx
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if no_scale_embedding else math.sqrt(dim)
        self.embed_positions = (
            None
            if no_token_positional_embeddings
            else _positional_embedding(max_positions, dim, self.padding_idx, learned_pos)
        )
        self.layernorm_embedding = nn.LayerNorm(dim) if layernorm_embedding else None
        self.dropout = nn.Dropout(dropout)

    def embed(self, tokens: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Embedded tokens (B, T, dim); ``step``: the decoder position of a single incremental token."""
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + (self.embed_positions(tokens) if step is None else self.embed_positions(tokens, step=step))
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout(x)


class TransformerEncoder(_TokenEmbedder):
    """fairseq's ``TransformerEncoder`` (``embed_tokens``, ``embed_positions``, ``layers``, ``layer_norm`` when
    pre-norm, ``layernorm_embedding`` when asked, ``version`` buffer).

    Args:
        embed_tokens: the source token embedding (its dimension is the model's).
        layers: the number of encoder layers.
        ffn_embed_dim: hidden dimension of the feed-forward block.
        num_heads: attention heads.
        dropout: dropout probability after each sublayer (and of the embeddings).
        attention_dropout: dropout probability on the attention weights.
        activation_dropout: dropout probability after the feed-forward activation.
        activation_fn: the feed-forward activation (``"relu"``, ``"gelu"`` ...).
        normalize_before: pre-norm (x + drop(f(LN(x)))) when True, post-norm (LN(x + drop(f(x)))) when False.
        max_positions: the longest input (positions embedded).
        learned_pos: learned positions (:class:`LearnedPositionalEmbedding`) instead of sinusoidal ones.
        no_token_positional_embeddings: whether no positions are added to the token embeddings.
        layernorm_embedding: whether a LayerNorm follows the embedding (``layernorm_embedding``).
        no_scale_embedding: whether the token embeddings are not scaled by sqrt(dim).
        n_iter: Sinkhorn half-steps of the self-attention (1 is softmax attention).
        record_stats: whether the self-attention records its column-sum statistics.
    """

    def __init__(
        self,
        embed_tokens: nn.Embedding,
        *,
        layers: int,
        ffn_embed_dim: int,
        num_heads: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        activation_fn: str,
        normalize_before: bool,
        max_positions: int,
        learned_pos: bool,
        no_token_positional_embeddings: bool,
        layernorm_embedding: bool,
        no_scale_embedding: bool,
        n_iter: int,
        record_stats: bool,
    ) -> None:
        super().__init__(
            embed_tokens,
            dropout,
            max_positions,
            learned_pos,
            no_token_positional_embeddings,
            layernorm_embedding,
            no_scale_embedding,
        )
        dim = embed_tokens.embedding_dim
        self.max_source_positions = max_positions
        self.layers = nn.ModuleList(
            [
                TransformerEncoderLayer(
                    dim,
                    ffn_embed_dim,
                    num_heads,
                    dropout,
                    attention_dropout,
                    activation_dropout,
                    activation_fn,
                    normalize_before,
                    n_iter,
                    record_stats,
                )
                for _ in range(layers)
            ]
        )
        self.layer_norm = nn.LayerNorm(dim) if normalize_before else None

    def forward(self, src_tokens: torch.Tensor) -> EncoderOut:
        padding_mask = src_tokens.eq(self.padding_idx)
        x = self.embed(src_tokens)
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))  # fairseq: zero the padded positions
        for layer in self.layers:
            x = layer(x, padding_mask)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return EncoderOut(x, padding_mask)


class TransformerDecoder(_TokenEmbedder):
    """fairseq's ``TransformerDecoder`` (``embed_tokens``, ``embed_positions``, ``layers``, ``layer_norm`` when
    pre-norm, ``output_projection`` tied to ``embed_tokens`` with ``share_input_output_embed``, ``version``).

    Args:
        embed_tokens: the target token embedding (its dimension is the model's).
        layers: the number of decoder layers.
        ffn_embed_dim: hidden dimension of the feed-forward block.
        num_heads: attention heads.
        encoder_embed_dim: the encoder's output dimension.
        dropout: dropout probability after each sublayer (and of the embeddings).
        attention_dropout: dropout probability on the attention weights.
        activation_dropout: dropout probability after the feed-forward activation.
        activation_fn: the feed-forward activation (``"relu"``, ``"gelu"`` ...).
        normalize_before: pre-norm (x + drop(f(LN(x)))) when True, post-norm (LN(x + drop(f(x)))) when False.
        no_final_norm: whether a pre-norm decoder ends without its final LayerNorm.
        max_positions: the longest input (positions embedded).
        learned_pos: learned positions (:class:`LearnedPositionalEmbedding`) instead of sinusoidal ones.
        no_token_positional_embeddings: whether no positions are added to the token embeddings.
        layernorm_embedding: whether a LayerNorm follows the embedding (``layernorm_embedding``).
        no_scale_embedding: whether the token embeddings are not scaled by sqrt(dim).
        share_input_output_embed: whether the output projection is tied to ``embed_tokens``.
    """

    def __init__(
        self,
        embed_tokens: nn.Embedding,
        *,
        layers: int,
        ffn_embed_dim: int,
        num_heads: int,
        encoder_embed_dim: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        activation_fn: str,
        normalize_before: bool,
        no_final_norm: bool,
        max_positions: int,
        learned_pos: bool,
        no_token_positional_embeddings: bool,
        layernorm_embedding: bool,
        no_scale_embedding: bool,
        share_input_output_embed: bool,
    ) -> None:
        super().__init__(
            embed_tokens,
            dropout,
            max_positions,
            learned_pos,
            no_token_positional_embeddings,
            layernorm_embedding,
            no_scale_embedding,
        )
        dim = embed_tokens.embedding_dim
        self.max_target_positions = max_positions
        self.layers = nn.ModuleList(
            [
                TransformerDecoderLayer(
                    dim,
                    ffn_embed_dim,
                    num_heads,
                    encoder_embed_dim,
                    dropout,
                    attention_dropout,
                    activation_dropout,
                    activation_fn,
                    normalize_before,
                )
                for _ in range(layers)
            ]
        )
        self.layer_norm = nn.LayerNorm(dim) if normalize_before and not no_final_norm else None
        self.share_input_output_embed = share_input_output_embed
        self.output_projection = nn.Linear(dim, embed_tokens.num_embeddings, bias=False)
        if share_input_output_embed:
            self.output_projection.weight = embed_tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0, std=dim**-0.5)

    def forward(
        self,
        prev_output_tokens: torch.Tensor,
        encoder_out: EncoderOut,
        cache: list[dict[str, dict[str, torch.Tensor]]] | None = None,
        step: int | None = None,
        features_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V). With ``cache`` (a list, filled on the first call) and ``step``, ``prev_output_tokens``
        is the last token of each row (B, 1) at decoder position ``step`` (decoding, no padding)."""
        incremental = cache is not None
        x = self.embed(prev_output_tokens, step=step if incremental else None)
        mask = None
        if not incremental:
            T = prev_output_tokens.size(1)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            pad = prev_output_tokens.eq(self.padding_idx)
            eye = torch.eye(T, dtype=torch.bool, device=x.device)
            # causal, padded keys masked (a padded query keeps itself, so that no row is empty)
            mask = causal & (~pad[:, None, None, :] | eye)
        else:
            while len(cache) < len(self.layers):
                cache.append({})
        for i, layer in enumerate(self.layers):
            x = layer(x, encoder_out.out, encoder_out.padding_mask, mask, None if cache is None else cache[i])
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x if features_only else self.output_projection(x)


# ================================================================================================ the model


class SinkformerTranslation(SinkhornSettings, HubMixin, TranslationTask):
    """fairseq's encoder-decoder Transformer with Sinkhorn attention in the encoder (Sinkformer, Sander et al. 2022),
    fairseq's parameter names and its ``transformer_iwslt_de_en`` shape by default.

    Args:
        src_vocab_size: the source dictionary's size (4 specials + the lines of ``dict.{lang}.txt``).
        tgt_vocab_size: the target dictionary's size (default: the source's).
        encoder_layers: encoder layers (6).
        encoder_embed_dim: encoder width (512).
        encoder_ffn_embed_dim: hidden width of the encoder's feed-forward blocks (1024).
        encoder_attention_heads: encoder attention heads (4).
        decoder_layers: decoder layers (6).
        decoder_embed_dim: decoder width (512).
        decoder_ffn_embed_dim: hidden width of the decoder's feed-forward blocks (1024).
        decoder_attention_heads: decoder attention heads (4).
        encoder_normalize_before: pre-norm encoder layers (fairseq's default False: post-norm).
        decoder_normalize_before: pre-norm decoder layers (fairseq's default False: post-norm).
        no_decoder_final_norm: drop the decoder's final LayerNorm of the pre-norm variant.
        share_decoder_input_output_embed: tie ``decoder.output_projection`` to ``decoder.embed_tokens`` (fairseq's
            ``--share-decoder-input-output-embed``; arch default False, the published IWSLT command sets it).
        share_all_embeddings: one embedding for encoder, decoder and output (a joined dictionary: equal sizes).
        dropout: dropout after every sublayer and of the embeddings (0.3, the IWSLT command).
        attention_dropout: dropout on the attention weights (0).
        activation_dropout: dropout after the feed-forward activation (0).
        activation_fn: the feed-forward activation (``"relu"``).
        max_source_positions: the longest source the encoder embeds (1024).
        max_target_positions: the longest target the decoder embeds (1024).
        encoder_learned_pos: learned encoder positions instead of sinusoidal ones (fairseq's option; off).
        decoder_learned_pos: learned decoder positions instead of sinusoidal ones (fairseq's option; off).
        no_token_positional_embeddings: no positions added to the token embeddings (fairseq's option; off).
        layernorm_embedding: a LayerNorm after the embeddings (fairseq's option; off).
        no_scale_embedding: token embeddings not scaled by sqrt(width) (fairseq's option; off).
        n_iter: Sinkhorn half-steps of the encoder self-attention (1 = the Transformer); the decoder always uses
            softmax. Default 3 (3 to 5 give near doubly stochastic matrices).
        record_stats: record the column-sum statistics of the encoder attentions (:meth:`attention_stats`).
        weights: a zoo checkpoint / ``save_pretrained`` output / ``hf-hub:``, or a fairseq checkpoint file whose
            shape matches (see :meth:`from_fairseq_checkpoint` to build the model from the checkpoint itself).
        **kwargs: the training and decoding settings of :class:`zoo.tasks.translation.TranslationTask`:
            ``optimizer`` / ``lr_scheduler`` (injected callables; default fairseq's IWSLT'14 Adam: AdamW (0.9, 0.98),
            lr 5e-4, weight decay 1e-4, and inverse_sqrt with 4000 warm-up updates), ``label_smoothing`` (0.1),
            ``eval_bleu``, ``beam``, ``lenpen``, ``max_len_a``, ``max_len_b`` ...
    """

    same_function_args = frozenset(
        {"record_stats", "label_smoothing", "dropout", "attention_dropout", "activation_dropout"}
    )

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int | None = None,
        encoder_layers: int = 6,
        encoder_embed_dim: int = 512,
        encoder_ffn_embed_dim: int = 1024,
        encoder_attention_heads: int = 4,
        decoder_layers: int = 6,
        decoder_embed_dim: int = 512,
        decoder_ffn_embed_dim: int = 1024,
        decoder_attention_heads: int = 4,
        encoder_normalize_before: bool = False,
        decoder_normalize_before: bool = False,
        no_decoder_final_norm: bool = False,
        share_decoder_input_output_embed: bool = False,
        share_all_embeddings: bool = False,
        dropout: float = 0.3,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        activation_fn: str = "relu",
        max_source_positions: int = 1024,
        max_target_positions: int = 1024,
        encoder_learned_pos: bool = False,
        decoder_learned_pos: bool = False,
        no_token_positional_embeddings: bool = False,
        layernorm_embedding: bool = False,
        no_scale_embedding: bool = False,
        n_iter: int = 3,
        record_stats: bool = False,
        weights: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_n_iter(n_iter)
        check_model_kwargs(type(self), kwargs, TranslationTask)
        tgt_vocab_size = src_vocab_size if tgt_vocab_size is None else tgt_vocab_size
        for name, v in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size)):
            integer(
                name,
                v,
                UNK + 1,
                hint="fairseq's 4 special symbols come first: give the dictionary's size "
                "(4 + the lines of dict.{lang}.txt)",
            )
        for name, v in (("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers)):
            non_negative_int(name, v)
        for name, v in (
            ("encoder_embed_dim", encoder_embed_dim),
            ("encoder_ffn_embed_dim", encoder_ffn_embed_dim),
            ("encoder_attention_heads", encoder_attention_heads),
            ("decoder_embed_dim", decoder_embed_dim),
            ("decoder_ffn_embed_dim", decoder_ffn_embed_dim),
            ("decoder_attention_heads", decoder_attention_heads),
            ("max_source_positions", max_source_positions),
            ("max_target_positions", max_target_positions),
        ):
            positive_int(name, v)
        for name, v in (
            ("dropout", dropout),
            ("attention_dropout", attention_dropout),
            ("activation_dropout", activation_dropout),
        ):
            probability(name, v)
        for name, v in (
            ("encoder_normalize_before", encoder_normalize_before),
            ("decoder_normalize_before", decoder_normalize_before),
            ("no_decoder_final_norm", no_decoder_final_norm),
            ("share_decoder_input_output_embed", share_decoder_input_output_embed),
            ("share_all_embeddings", share_all_embeddings),
            ("encoder_learned_pos", encoder_learned_pos),
            ("decoder_learned_pos", decoder_learned_pos),
            ("no_token_positional_embeddings", no_token_positional_embeddings),
            ("layernorm_embedding", layernorm_embedding),
            ("no_scale_embedding", no_scale_embedding),
            ("record_stats", record_stats),
        ):
            boolean(name, v)
        for side, dim, heads in (
            ("encoder", encoder_embed_dim, encoder_attention_heads),
            ("decoder", decoder_embed_dim, decoder_attention_heads),
        ):
            if dim % heads:
                raise ZooError(
                    f"{side}_embed_dim {dim} is not divisible by {side}_attention_heads {heads}: give an "
                    f"embed_dim that is a multiple of the heads"
                )
        choice("activation_fn", activation_fn, ACTIVATIONS)
        if share_all_embeddings:
            if src_vocab_size != tgt_vocab_size:
                raise ZooError(
                    f"share_all_embeddings needs a joined dictionary (one vocabulary), got source "
                    f"{src_vocab_size} and target {tgt_vocab_size} symbols: build the data with "
                    "joined_dictionary=True (fairseq-preprocess --joined-dictionary)"
                )
            if encoder_embed_dim != decoder_embed_dim:
                raise ZooError(
                    f"share_all_embeddings needs encoder_embed_dim == decoder_embed_dim, got "
                    f"{encoder_embed_dim} and {decoder_embed_dim}"
                )
            share_decoder_input_output_embed = True
        super().__init__(**kwargs)
        self.hparams["tgt_vocab_size"] = tgt_vocab_size
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.pad, self.eos, self.unk, self.bos = PAD, EOS, UNK, BOS
        enc_embed = _embedding(src_vocab_size, encoder_embed_dim, PAD)
        dec_embed = enc_embed if share_all_embeddings else _embedding(tgt_vocab_size, decoder_embed_dim, PAD)
        shared = {
            "dropout": dropout,
            "attention_dropout": attention_dropout,
            "activation_dropout": activation_dropout,
            "activation_fn": activation_fn,
            "no_token_positional_embeddings": no_token_positional_embeddings,
            "layernorm_embedding": layernorm_embedding,
            "no_scale_embedding": no_scale_embedding,
        }
        self.encoder = TransformerEncoder(
            enc_embed,
            layers=encoder_layers,
            ffn_embed_dim=encoder_ffn_embed_dim,
            num_heads=encoder_attention_heads,
            normalize_before=encoder_normalize_before,
            max_positions=max_source_positions,
            learned_pos=encoder_learned_pos,
            n_iter=n_iter,
            record_stats=record_stats,
            **shared,
        )
        self.decoder = TransformerDecoder(
            dec_embed,
            layers=decoder_layers,
            ffn_embed_dim=decoder_ffn_embed_dim,
            num_heads=decoder_attention_heads,
            encoder_embed_dim=encoder_embed_dim,
            normalize_before=decoder_normalize_before,
            no_final_norm=no_decoder_final_norm,
            max_positions=max_target_positions,
            learned_pos=decoder_learned_pos,
            share_input_output_embed=share_decoder_input_output_embed,
            **shared,
        )
        self.pretrained_cfg = translation_cfg(
            src_vocab_size, tgt_vocab_size, source=None if weights is None else str(weights)
        )
        self.default_cfg = self.pretrained_cfg  # timm's alias
        if weights is not None:
            self.load_any_weights(weights)

    # ---------------------------------------------------------------- forward
    def forward(self, src_tokens: torch.Tensor, prev_output_tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of the target given the source (B, S) and the shifted target (B, T) (integer ids; shapes
        and dtypes are checked, and the ids' range against the vocabularies where reading it costs no device sync:
        on the CPU, outside torch.compile)."""
        check_token_ids("src_tokens", src_tokens)
        check_token_ids("prev_output_tokens", prev_output_tokens, batch_size=src_tokens.size(0))
        if host_read_is_free(src_tokens):
            check_token_range("src_tokens", src_tokens, self.src_vocab_size, "source")
            check_token_range("prev_output_tokens", prev_output_tokens, self.tgt_vocab_size, "target")
        return self.decoder(prev_output_tokens, self.encoder(src_tokens))

    def get_normalized_probs(self, logits: torch.Tensor, log_probs: bool = True) -> torch.Tensor:
        """log_softmax (or softmax) over the vocabulary in float32 (float64 stays float64)."""
        logits = _at_least_float32(logits)
        return F.log_softmax(logits, -1) if log_probs else F.softmax(logits, -1)

    # ---------------------------------------------------------------- incremental decoding (Seq2SeqDecoder)
    def forward_encoder(self, src_tokens: torch.Tensor) -> EncoderOut:
        """The encoder's output for the source ids (B, S) (shape and dtype checked, and the ids' range where reading
        it costs no device sync, as in :meth:`forward`)."""
        check_token_ids("src_tokens", src_tokens)
        if host_read_is_free(src_tokens):
            check_token_range("src_tokens", src_tokens, self.src_vocab_size, "source")
        return self.encoder(src_tokens)

    def forward_decoder_step(
        self, tokens: torch.Tensor, step: int, encoder_out: EncoderOut, cache: list[dict[str, Any]]
    ) -> torch.Tensor:
        """log p(next | tokens so far) (N, V) from the last token (N, 1) at position ``step``; ``cache`` (a list,
        empty at step 0) keeps each layer's self-attention keys/values and the encoder-attention keys/values,
        so a step costs O(step) attention, not O(step^2)."""
        logits = self.decoder(tokens, encoder_out, cache=cache, step=step)
        return F.log_softmax(_at_least_float32(logits[:, -1]), dim=-1)

    @staticmethod
    def reorder_state(
        encoder_out: EncoderOut, cache: list[dict[str, Any]], index: torch.Tensor
    ) -> tuple[EncoderOut, list[dict[str, Any]]]:
        """Rows ``index`` of the encoder output and of every cached key/value (beam reordering)."""
        enc = EncoderOut(encoder_out.out.index_select(0, index), encoder_out.padding_mask.index_select(0, index))
        new = [
            {part: {k: v.index_select(0, index) for k, v in d.items()} for part, d in layer.items()} for layer in cache
        ]
        return enc, new

    def max_decoder_positions(self) -> int:
        pos = self.decoder.embed_positions
        limit = getattr(pos, "max_positions", self.decoder.max_target_positions) if pos is not None else 10**9
        return min(self.decoder.max_target_positions, limit)

    def translate(self, src_tokens: torch.Tensor, beam: int | None = None, **kwargs: Any) -> list[torch.Tensor]:
        """The best translation (token ids ending in eos) of each source sentence (B, S), by beam search: one clear
        ZooError for ids that are not a (B, S) integer tensor of the source vocabulary; an empty batch gives [].
        ``beam`` (None: the task's) and the decoding options in ``kwargs`` are those of :meth:`generate`."""
        return [h[0]["tokens"] for h in self.generate(src_tokens, beam=beam, **kwargs)]

    # ---------------------------------------------------------------- Sinkhorn settings and diagnostics
    @property
    def attentions(self) -> list[MultiheadAttention]:
        """The encoder self-attentions, the only Sinkhorn ones (``set_n_iter``, ``set_record_stats`` and
        ``attention_stats`` of :class:`zoo.nn.attention.SinkhornSettings` act on them)."""
        return [layer.self_attn for layer in self.encoder.layers]

    encoder_attentions = attentions

    def check_dictionaries(self, src_dict: Any = None, tgt_dict: Any = None) -> None:
        """One ZooError when a dictionary's size differs from the model's vocabulary (a Dictionary, a dict.txt path
        or a size); both sides in the one message, so that one edit fixes the configuration.

        Args:
            src_dict: the source dictionary (None: not checked).
            tgt_dict: the target dictionary (None: not checked).
        """
        problems, fixes = [], []
        for side, d, n in (("source", src_dict, self.src_vocab_size), ("target", tgt_dict, self.tgt_vocab_size)):
            if d is None:
                continue
            size = _dictionary_size(d)
            if size != n:
                key = "src_vocab_size" if side == "source" else "tgt_vocab_size"
                problems.append(
                    f"the {side} dictionary has {size} symbols but the model's {side} embedding has {n} rows"
                )
                fixes.append(f"{key}: {size}")
        if problems:
            raise ZooError(
                f"vocabulary size mismatch: {'; '.join(problems)}: set {', '.join(fixes)} (or use the dictionaries "
                "the weights were trained with)"
            )

    # ---------------------------------------------------------------- weights
    def load_any_weights(self, weights: str | os.PathLike) -> None:
        """Load zoo weights (see :func:`zoo.hub.load_weights`) or the ``model`` of a fairseq checkpoint file."""
        path = Path(str(weights)).expanduser()
        if _may_be_fairseq_checkpoint(path):
            from converters.fairseq_checkpoint import read_fairseq_checkpoint  # the reader lives with the converters

            ckpt = read_fairseq_checkpoint(path)
            if "args" in ckpt or "cfg" in ckpt:
                load_state_dict(self, ckpt["model"], source=str(path))
                return
        load_weights(self, weights)

    def adapt_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], source_hparams: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        """Weight-loader hook: fairseq's own upgrades of old checkpoints (``upgrade_state_dict_named``): drop the
        stored sinusoidal table ``embed_positions.weights``, add ``_float_tensor``, rename ``layer_norms.{0,1,2}``,
        take ``output_projection.weight`` from ``embed_out`` or the tied embedding; the ``version`` buffers become
        the model's."""
        sd = dict(state_dict)
        own = self.state_dict()
        for side in ("encoder", "decoder"):
            sd.pop(f"{side}.embed_positions.weights", None)
            key = f"{side}.embed_positions._float_tensor"
            if key in own:
                sd[key] = own[key]
            version = sd.get(f"{side}.version")
            normalize_before = self.hparams[f"{side}_normalize_before"]
            limit = 2 if side == "encoder" else 3  # fairseq: encoder < 2, decoder <= 2 are old checkpoints
            if version is not None and normalize_before and float(version.flatten()[0]) < limit:
                raise ZooError(
                    f"this checkpoint's {side} (version {float(version.flatten()[0]):g}) predates the "
                    "final LayerNorm of pre-norm transformers (fairseq < 0.6): not supported"
                )
            if f"{side}.version" in own:
                sd[f"{side}.version"] = own[f"{side}.version"]
            names = (
                {"0": "self_attn_layer_norm", "1": "final_layer_norm"}
                if side == "encoder"
                else {"0": "self_attn_layer_norm", "1": "encoder_attn_layer_norm", "2": "final_layer_norm"}
            )
            for k in list(sd):
                parts = k.split(".")
                if k.startswith(f"{side}.layers.") and len(parts) == 6 and parts[3] == "layer_norms":
                    sd[".".join(parts[:3] + [names.get(parts[4], parts[4]), parts[5]])] = sd.pop(k)
        if "decoder.output_projection.weight" not in sd:
            src = "decoder.embed_tokens.weight" if self.decoder.share_input_output_embed else "decoder.embed_out"
            if src in sd:
                sd["decoder.output_projection.weight"] = sd[src]
        sd.pop("decoder.embed_out", None)
        if self.hparams.share_all_embeddings:
            for a, b in (
                ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
                ("decoder.embed_tokens.weight", "encoder.embed_tokens.weight"),
            ):
                if a not in sd and b in sd:
                    sd[a] = sd[b]
        return sd

    @classmethod
    def from_fairseq_checkpoint(
        cls,
        checkpoint: str | os.PathLike | Mapping[str, Any],
        n_iter: int | None = None,
        src_dict: Any = None,
        tgt_dict: Any = None,
        **overrides: Any,
    ) -> SinkformerTranslation:
        """A model with the architecture and weights of a fairseq ``transformer`` checkpoint (no fairseq needed):
        :func:`converters.fairseq_checkpoint.from_fairseq_checkpoint`, where the arguments are described (the
        file reader and its pickle allow-list live there, beside the fairseq converter)."""
        from converters.fairseq_checkpoint import from_fairseq_checkpoint  # the reader lives with the converters

        return from_fairseq_checkpoint(checkpoint, n_iter=n_iter, src_dict=src_dict, tgt_dict=tgt_dict, **overrides)


SINKFORMERS_PAPER = "arXiv:2110.11773"  # Sander, Ablin, Blondel, Peyre: Sinkformers (AISTATS 2022)


def translation_cfg(src_vocab_size: int, tgt_vocab_size: int, **entries: Any) -> dict[str, Any]:
    """A translation model's ``pretrained_cfg`` (timm's dict, alias ``default_cfg``) with the keys that apply to a
    sequence-to-sequence model: ``architecture``, ``tag``, ``source`` (the weights it was built from), ``license``,
    ``classifier`` (the output projection over the target vocabulary), ``paper_ids``, ``conversion``,
    ``description``, ``recipe``, and, for timm's ``num_classes`` (no classes here), the vocabulary sizes
    ``src_vocab_size`` / ``tgt_vocab_size``. timm's image keys (``input_size``, ``mean`` ...) do not apply."""
    cfg: dict[str, Any] = {
        "architecture": None,
        "tag": None,
        "source": None,
        "license": None,
        "classifier": "decoder.output_projection",
        "src_vocab_size": int(src_vocab_size),
        "tgt_vocab_size": int(tgt_vocab_size),
        "paper_ids": SINKFORMERS_PAPER,
    }
    cfg.update(entries)
    return cfg


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _dictionary_size(d: Any) -> int:
    if isinstance(d, int):
        return d
    if isinstance(d, (str, os.PathLike)):
        from zoo.data.translation import Dictionary

        return len(Dictionary.load(d))
    return len(d)


# ================================================================================================ builders


def _may_be_fairseq_checkpoint(path: Path) -> bool:
    """Whether the weights at ``path`` may be a fairseq checkpoint (a pickle of its own: ``args`` or ``cfg`` and
    ``model``) rather than zoo weights (a ``.safetensors`` file, a Lightning ``.ckpt``, a folder, a hub id)."""
    return path.is_file() and path.suffix not in (".safetensors", ".ckpt")


# the arguments a builder's name fixes: zoo weights recording other values are of another architecture
_SHAPE_ARGS = tuple(
    f"{side}_{name}"
    for side in ("encoder", "decoder")
    for name in ("layers", "embed_dim", "ffn_embed_dim", "attention_heads")
)


def _build(
    arch: str, weights: str | None, defaults: dict[str, Any], kwargs: dict[str, Any], **cfg: Any
) -> SinkformerTranslation:
    # zoo weights of this class: the arguments they record, as every builder takes them (zoo.pretrained); a fairseq
    # checkpoint records fairseq's arguments, and the builder's own apply. One read of the file for both.
    with checkpoint_reads():
        merged = (
            {**defaults, **kwargs}
            if weights is None or _may_be_fairseq_checkpoint(Path(str(weights)).expanduser())
            else builder_args_with_recorded(SinkformerTranslation, arch, weights, defaults, kwargs, _SHAPE_ARGS)
        )
        model = SinkformerTranslation(weights=weights, **merged)
    model.pretrained_cfg.update(architecture=arch, **cfg)
    return model


_IWSLT_DESCRIPTION = (
    "IWSLT'14 German-English (fairseq's prepare-iwslt14.sh); published test BLEU (Sinkformers "
    "paper): Transformer 34.43 after 30 epochs, 34.68 after 5 more at lr/10; the same weights with "
    "Sinkhorn attention 33.81 untrained, 34.73 after the 5 epochs"
)
_IWSLT = {
    "src_vocab_size": IWSLT14_DE_EN_VOCAB[0],
    "tgt_vocab_size": IWSLT14_DE_EN_VOCAB[1],
    "encoder_layers": 6,
    "encoder_embed_dim": 512,
    "encoder_ffn_embed_dim": 1024,
    "encoder_attention_heads": 4,
    "decoder_layers": 6,
    "decoder_embed_dim": 512,
    "decoder_ffn_embed_dim": 1024,
    "decoder_attention_heads": 4,
    "share_decoder_input_output_embed": True,
    "dropout": 0.3,
}


@register_model
def sinkformer_transformer_iwslt_de_en(weights: str | None = None, **kwargs: Any) -> SinkformerTranslation:
    """The published IWSLT'14 de-en Sinkformer (Sander et al. 2022): fairseq's ``transformer_iwslt_de_en`` (6+6
    layers, 512 wide, 4 heads, FFN 1024, post-norm) with Sinkhorn attention in the encoder (``n_iter=3``),
    ``--share-decoder-input-output-embed``, dropout 0.3; fairseq's dictionary sizes of prepare-iwslt14.sh (de 8848,
    en 6632). Trains with the task's defaults, fairseq's IWSLT'14 command: AdamW (0.9, 0.98), lr 5e-4, weight decay
    1e-4, inverse_sqrt with 4000 warm-up updates, label smoothing 0.1.
    ``weights``: loaded when given (as :class:`SinkformerTranslation`'s ``weights``); keyword arguments override the
    defaults."""
    return _build(
        "sinkformer_transformer_iwslt_de_en",
        weights,
        {**_IWSLT, "n_iter": 3},
        kwargs,
        recipe="nmt/iwslt14_de_en_sinkformer",
        description=_IWSLT_DESCRIPTION,
    )


@register_model
def transformer_iwslt_de_en(weights: str | None = None, **kwargs: Any) -> SinkformerTranslation:
    """fairseq's ``transformer_iwslt_de_en`` as the published baseline (``n_iter=1``: softmax attention, the
    Transformer itself; 34.43 BLEU after 30 epochs in the Sinkformers paper); otherwise as
    :func:`sinkformer_transformer_iwslt_de_en` (``weights`` and keyword arguments too)."""
    return _build(
        "transformer_iwslt_de_en",
        weights,
        {**_IWSLT, "n_iter": 1},
        kwargs,
        recipe="nmt/iwslt14_de_en_sinkformer",
        description=_IWSLT_DESCRIPTION,
    )


@register_model
def sinkformer_transformer_toy(
    weights: str | None = None, src_vocab_size: int = 64, **kwargs: Any
) -> SinkformerTranslation:
    """A toy model for tests and toy data: fairseq's ``transformer_tiny`` shape (2+2 layers, 64 wide, 2 heads,
    FFN 64) with Sinkhorn encoder attention (``n_iter=3``), dropout 0.1; ``src_vocab_size`` 64 by default.
    ``weights``: loaded when given (as :class:`SinkformerTranslation`'s ``weights``); keyword arguments override the
    defaults."""
    defaults = {
        "src_vocab_size": src_vocab_size,
        "encoder_layers": 2,
        "encoder_embed_dim": 64,
        "encoder_ffn_embed_dim": 64,
        "encoder_attention_heads": 2,
        "decoder_layers": 2,
        "decoder_embed_dim": 64,
        "decoder_ffn_embed_dim": 64,
        "decoder_attention_heads": 2,
        "dropout": 0.1,
        "n_iter": 3,
    }
    return _build("sinkformer_transformer_toy", weights, defaults, kwargs)


@register_model
def sinkformer_transformer_numbers(weights: str | None = None, **kwargs: Any) -> SinkformerTranslation:
    """The embedded task's model (:class:`zoo.data.translation.NumbersDataModule`, German number words to English):
    2+2 layers, 64 wide, 4 heads, FFN 128, shared decoder embeddings, dropout 0.1, ``n_iter=3``, greedy validation
    BLEU (beam 1); trains with AdamW (0.9, 0.98) lr 3e-3 without weight decay and inverse_sqrt with 100 warm-up
    updates (the ``nmt/numbers_sinkformer`` recipe's settings), label smoothing 0.1.
    ``weights``: loaded when given (as :class:`SinkformerTranslation`'s ``weights``); keyword arguments override the
    defaults."""
    from zoo.data.translation import NUMBERS_SRC_VOCAB_SIZE, NUMBERS_TGT_VOCAB_SIZE

    defaults = {
        "src_vocab_size": NUMBERS_SRC_VOCAB_SIZE,
        "tgt_vocab_size": NUMBERS_TGT_VOCAB_SIZE,
        "encoder_layers": 2,
        "encoder_embed_dim": 64,
        "encoder_ffn_embed_dim": 128,
        "encoder_attention_heads": 4,
        "decoder_layers": 2,
        "decoder_embed_dim": 64,
        "decoder_ffn_embed_dim": 128,
        "decoder_attention_heads": 4,
        "share_decoder_input_output_embed": True,
        "dropout": 0.1,
        "n_iter": 3,
        "beam": 1,
        "max_len_a": 1.0,
        "max_len_b": 5,
    }
    kwargs.setdefault("optimizer", NUMBERS_OPTIMIZER)
    kwargs.setdefault("lr_scheduler", NUMBERS_LR_SCHEDULER)
    return _build(
        "sinkformer_transformer_numbers",
        weights,
        defaults,
        kwargs,
        recipe="nmt/numbers_sinkformer",
        description="the embedded German-to-English number-words task (zoo.data.translation."
        "NumbersDataModule); its recipe reaches val BLEU 100.0, exact match 100% at every "
        "number length (measured, CPU, 10 epochs)",
    )


# the numbers recipe's training settings (zoo/recipes/nmt/numbers_sinkformer.yaml)
NUMBERS_OPTIMIZER = functools.partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
NUMBERS_LR_SCHEDULER = functools.partial(InverseSqrtLR, warmup_updates=100)


_MOVED_TO_CONVERTERS = ("fairseq_arch", "fairseq_hparams", "from_fairseq_checkpoint", "read_fairseq_checkpoint")


def __getattr__(name: str) -> Any:
    """The fairseq checkpoint reader moved to :mod:`converters.fairseq_checkpoint`; its old names here keep
    working for one release with a FutureWarning."""
    if name in _MOVED_TO_CONVERTERS:
        import warnings

        import converters.fairseq_checkpoint as moved

        warnings.warn(
            f"zoo.models.translation.{name} is deprecated and will be removed in the next release; use "
            f"converters.fairseq_checkpoint.{name} (same function)",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(moved, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
