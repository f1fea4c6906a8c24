"""``torch.nn.TransformerEncoder`` as a residual stack (family ``"transformer"``).

Residual function. An encoder layer (``nn.TransformerEncoderLayer``, post- or pre-norm, or any
layer class with the same call) maps x to layer(x) = x + (its residual branches), so the zoo uses

    f(x) = layer(x, src_mask=mask, src_key_padding_mask=padding_mask, is_causal=is_causal) - x

(:class:`zoo.nn.ResidualOf`), and ``to="momentum"`` computes v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n),
x_{n+1} = x_n + v_{n+1} over the layers: gamma = 0 (``memory="full"``) is the encoder's function; the
reversible memory (default, 0 < gamma < 1) rebuilds the activations in backward.

The result is a :class:`zoo.nn.TransformerEncoderStack` with the encoder's call,
``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)``: masks canonicalised and a
causal mask detected as the encoder does, passed to every layer as keyword arguments (the ones its
forward accepts), then the encoder's final ``norm``. Layers and norm are deep copies (the source is
left unchanged), on the source's device and dtype, in the same train/eval mode.

Fast path: the encoder's nested-tensor path (``enable_nested_tensor``, eval mode without gradients
and a padding mask) is not reproduced: the stack always runs on padded tensors, so padded positions
hold computed values where the encoder's nested path returns zeros (every other position agrees).
The layers' own fused kernel still runs where torch chooses it, except during a reversible forward.
Subclasses overriding the encoder's forward are rejected.
"""

from __future__ import annotations

import copy

import torch.nn as nn

from converters import AttentionSpec, BlockStackSpec, register_source
from zoo.errors import ZooError
from zoo.nn import TransformerEncoderStack

SOURCE_NAME = "torch.nn.TransformerEncoder"


def is_transformer_encoder(model: object) -> bool:
    """True when ``model`` is a ``torch.nn.TransformerEncoder`` (subclasses included)."""
    return isinstance(model, nn.TransformerEncoder)


@register_source(SOURCE_NAME, "transformer", is_transformer_encoder)
def read_transformer_encoder(model: nn.TransformerEncoder) -> BlockStackSpec:
    """Describe (a copy of) the TransformerEncoder ``model`` for the residual-stack targets."""
    label = f"torch {type(model).__name__}"
    if type(model).forward is not nn.TransformerEncoder.forward:
        raise ZooError(f"{label} overrides forward; only torch.nn.TransformerEncoder's own forward converts")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ZooError(f"{label} has no layers to convert (expected a non-empty nn.ModuleList)")
    first = layers[0]
    batch_first = bool(getattr(getattr(first, "self_attn", None), "batch_first", getattr(first, "batch_first", False)))
    twin = copy.deepcopy(model)

    def assemble(stack) -> nn.Module:
        out = TransformerEncoderStack(stack, norm=twin.norm, batch_first=batch_first)
        out.training = twin.training
        return out

    return BlockStackSpec(label=label, copy=twin, blocks=list(twin.layers), assemble=assemble, training=twin.training)


# ------------------------------------------------------------------------------------------------
# Sinkhorn attention (family "attention", to="sinkhorn")

MHA_SOURCE_NAME = "any torch module with nn.MultiheadAttention (nn.TransformerEncoder, nn.Transformer, ...)"


def has_multihead_attention(model: object) -> bool:
    """True when ``model`` is or holds a ``torch.nn.MultiheadAttention``."""
    return isinstance(model, nn.Module) and any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


@register_source(MHA_SOURCE_NAME, "attention", has_multihead_attention)
def read_multihead_attention_model(model: nn.Module) -> AttentionSpec:
    """``model``: any module holding ``nn.MultiheadAttention`` (itself included): each becomes a
    :class:`zoo.nn.SinkhornMultiheadAttention` with the same parameters and call. ``nn.TransformerEncoder``'s
    nested-tensor fast path is turned off (``use_nested_tensor = False``) and ``nn.TransformerEncoderLayer``
    skips its fused kernel (the Sinkhorn module carries a forward pre-hook), since neither calls the
    attention module: both would silently compute softmax attention."""
    if isinstance(model, (nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)):
        base = next(c for c in (nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer) if isinstance(model, c))
        if type(model).forward is not base.forward:
            raise ZooError(f"torch {type(model).__name__} overrides forward; only torch's own forward converts")
    return AttentionSpec(label=f"torch {type(model).__name__}", model=model)
