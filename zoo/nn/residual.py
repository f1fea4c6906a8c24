"""Residual functions of arbitrary blocks, for running existing networks with another forward rule.

A library block that computes ``y = block(x)`` (a transformer block x + attn(...) + mlp(...), any
shape-preserving layer) is the step x_{n+1} = x_n + f(x_n) of the residual function

    f(x) = block(x, *args, **kwargs) - x                                          (ResidualOf)

so a :class:`zoo.nn.ResidualStack` of ``ResidualOf(block)`` computes the source stack exactly with the
Euler rule at step 1 or the momentum rule at gamma = 0 (up to the rounding of x + (block(x) - x)),
and any other rule / gamma from the same weights.

- :class:`ResidualOf`: the wrapper; extra arguments (masks ...) go to the block.
- :class:`StackAsBlock`: a ResidualStack that code looping over a block list runs as one block
  (timm's ``VisionTransformer.forward_features`` loops ``for blk in self.blocks`` when given a mask).
- :class:`TransformerEncoderStack`: ``torch.nn.TransformerEncoder``'s forward (masks, causal
  detection, final norm) on a residual stack of its layers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.nn.residual_stack import ResidualStack

__all__ = ["ResidualOf", "StackAsBlock", "TransformerEncoderStack"]


class ResidualOf(nn.Module):
    """The residual function f(x) = module(x, *args, **kwargs) - x of a block that maps x to x + f(x).

    The wrapped block is the child ``module`` (state-dict names gain a ``module.`` prefix).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ZooError(f"ResidualOf wraps an nn.Module, got {type(module).__name__}")
        self.module = module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.module(x, *args, **kwargs)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            what = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ZooError(
                f"ResidualOf({type(self.module).__name__}) maps shape {tuple(x.shape)} to {what}: "
                "only a block returning a tensor of its input's shape has a residual function"
            )
        return y - x


class StackAsBlock(ResidualStack):
    """A :class:`ResidualStack` that stands in for a list of blocks which other code iterates over.

    ``for blk in stack: x = blk(x, **kwargs)`` yields the stack itself once, so it runs the stack's
    forward rule on the whole stack (iterating the blocks one by one would apply the residual
    functions f_n as if they were blocks). ``len``, indexing and ``blocks`` are ResidualStack's: the
    residual functions. Generic code that slices the block list or collects per-block outputs by
    iterating over it gets the stack once: per-block states x_1 ... x_N come from
    :meth:`ResidualStack.states` (a momentum state is (x_n, v_n); its x_n is block n's output), which
    the converted timm ViT's ``forward_intermediates`` uses.
    """

    def __iter__(self) -> Iterator[nn.Module]:
        return iter((self,))


def _accepted_kwargs(layers: Iterable[nn.Module], names: tuple[str, ...]) -> tuple[str, ...]:
    """The keyword arguments of ``names`` that every layer's forward accepts."""
    accepted = set(names)
    for layer in layers:
        params = inspect.signature(layer.forward).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        accepted &= set(params)
    return tuple(n for n in names if n in accepted)


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled and before)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


class TransformerEncoderStack(nn.Module):
    """``torch.nn.TransformerEncoder`` with its layers run as a residual stack.

    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)`` is the encoder's: both
    masks are canonicalised to ``src``'s dtype as the encoder does, ``is_causal`` is detected from
    ``mask`` when None, and every layer gets ``src_mask``, ``src_key_padding_mask`` and ``is_causal``
    as keyword arguments (those its forward accepts; a mask a layer cannot take is an error). The
    final ``norm``, if any, follows the stack.

    Differences from the encoder's fast path: the input is never converted to a nested tensor, so
    padded positions get computed values (the encoder's nested path returns zeros there; all other
    positions agree). With ``memory="reversible"`` the stack's forward runs without gradients and
    its backward recomputes each layer with gradients; the fused multi-head-attention fast path is
    switched off during such a forward, so both evaluate the same kernels and the rebuild is exact.

    Args:
        layers: a :class:`ResidualStack` whose blocks are ``ResidualOf(layer)``.
        norm: the encoder's final norm, or None.
        batch_first: the layers' layout (``src`` is (batch, seq, feature) when True).
    """

    KWARGS = ("src_mask", "src_key_padding_mask", "is_causal")

    def __init__(self, layers: ResidualStack, norm: nn.Module | None = None, batch_first: bool = False):
        super().__init__()
        if not isinstance(layers, ResidualStack):
            raise ZooError(f"TransformerEncoderStack needs a ResidualStack of layers, got {type(layers).__name__}")
        self.layers = layers
        self.norm = norm
        self.batch_first = batch_first
        self.layer_kwargs = _accepted_kwargs(
            [b.module if isinstance(b, ResidualOf) else b for b in layers.blocks], self.KWARGS
        )

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask,
            mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(mask),
            other_name="mask",
            target_type=src.dtype,
        )
        mask = F._canonical_mask(
            mask=mask, mask_name="mask", other_type=None, other_name="", target_type=src.dtype, check_other=False
        )
        seq_len = src.shape[1 if self.batch_first else 0] if src.dim() == 3 else src.shape[0]
        is_causal = nn.modules.transformer._detect_is_causal_mask(mask, is_causal, seq_len)
        given = {"src_mask": mask, "src_key_padding_mask": src_key_padding_mask, "is_causal": is_causal}
        kwargs = {k: v for k, v in given.items() if k in self.layer_kwargs}
        dropped = [k for k, v in given.items() if k not in kwargs and v is not None and v is not False]
        if dropped:
            raise ZooError(f"the encoder layers do not accept {', '.join(dropped)}")
        reversible = self.layers.memory == "reversible" and torch.is_grad_enabled()
        with _mha_fastpath(not reversible):
            out = self.layers(src, **kwargs)
        return self.norm(out) if self.norm is not None else out
