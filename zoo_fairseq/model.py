"""The fairseq model ``sinkformer``: fairseq's ``TransformerModel`` with Sinkhorn encoder self-attention.

Encoder layer (post-norm by default, m the source padding): h = LN(h + dropout(MHA_sinkhorn(h; m))),
h = LN(h + dropout(FFN(h))), where MHA_sinkhorn normalises exp(q k^T / sqrt(d)) by ``n_iter`` alternating row /
column normalisations (``--sinkhorn-iters``, stored as ``args.sinkhorn_n_iter``; 1 = softmax = ``transformer``).
Everything else (embeddings, decoder, output, parameter names, arch defaults) is fairseq's ``transformer``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer.transformer_legacy import (
    base_architecture,
    tiny_architecture,
    transformer_iwslt_de_en,
    transformer_wmt_en_de,
)

from zoo.nn.attention import check_n_iter
from zoo_fairseq.attention import SinkhornMultiheadAttention, sinkhornize

__all__ = ["ARCHS", "DEFAULT_N_ITER", "SinkformerModel", "transformer_arch"]

DEFAULT_N_ITER = 3
MODEL_NAME = "sinkformer"

# Sinkformer arch -> the fairseq transformer arch whose defaults it takes (its "sinkformer_" + name alias too)
ARCHS: dict[str, str] = {
    "sinkformer": "transformer",
    "sinkformer_iwslt_de_en": "transformer_iwslt_de_en",
    "sinkformer_wmt_en_de": "transformer_wmt_en_de",
    "sinkformer_tiny": "transformer_tiny",
}
_DEFAULTS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "transformer": base_architecture,
    "transformer_iwslt_de_en": transformer_iwslt_de_en,
    "transformer_wmt_en_de": transformer_wmt_en_de,
    "transformer_tiny": tiny_architecture,
}


def transformer_arch(arch: str) -> str:
    """The fairseq ``transformer`` arch a Sinkformer arch is built on (``sinkformer_iwslt_de_en`` ->
    ``transformer_iwslt_de_en``, alias ``sinkformer_transformer_iwslt_de_en`` -> the same); other names unchanged."""
    if arch in ARCHS:
        return ARCHS[arch]
    if arch.startswith("sinkformer_") and arch[len("sinkformer_") :] in _DEFAULTS:
        return arch[len("sinkformer_") :]
    return arch


def _n_iter_default(args: argparse.Namespace) -> None:
    if getattr(args, "sinkhorn_n_iter", None) is None:
        args.sinkhorn_n_iter = DEFAULT_N_ITER


@register_model(MODEL_NAME)
class SinkformerModel(TransformerModel):
    """fairseq's ``TransformerModel`` whose encoder self-attentions are :class:`SinkhornMultiheadAttention`
    (``--sinkhorn-iters N``, default 3; 1 = ``transformer``). Same state dict as ``transformer``."""

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """fairseq's transformer arguments plus ``--sinkhorn-iters``."""
        super().add_args(parser)
        parser.add_argument(
            "--sinkhorn-iters",
            type=int,
            metavar="N",
            dest="sinkhorn_n_iter",
            help="Sinkhorn half-steps of the encoder self-attention: alternating row / column "
            f"normalisations of exp(QK^T/sqrt(d)); 1 = softmax (default {DEFAULT_N_ITER})",
        )

    @classmethod
    def build_model(cls, args: argparse.Namespace, task: Any) -> SinkformerModel:
        """fairseq's transformer, then its encoder attentions made Sinkhorn in place (the initialisation is the
        ``transformer``'s, draw for draw)."""
        _n_iter_default(args)
        n_iter = check_n_iter(int(args.sinkhorn_n_iter))
        model = super().build_model(args, task)
        sinkhornize(model.encoder, n_iter)
        return model

    @property
    def sinkhorn_n_iter(self) -> int:
        """The encoder's Sinkhorn half-steps."""
        its = {m.n_iter for m in self.encoder.modules() if isinstance(m, SinkhornMultiheadAttention)}
        return its.pop() if len(its) == 1 else -1

    def set_n_iter(self, n_iter: int) -> None:
        """Change the Sinkhorn half-steps of every encoder self-attention (and ``args.sinkhorn_n_iter``)."""
        n_iter = check_n_iter(n_iter)
        sinkhornize(self.encoder, n_iter)
        if isinstance(getattr(self, "args", None), argparse.Namespace):
            self.args.sinkhorn_n_iter = n_iter


def _register(arch: str, base: str) -> None:
    defaults = _DEFAULTS[base]

    def architecture(args: argparse.Namespace) -> None:
        _n_iter_default(args)
        defaults(args)

    architecture.__name__ = arch
    architecture.__doc__ = f"fairseq's ``{base}`` defaults, Sinkhorn encoder (``--sinkhorn-iters`` {DEFAULT_N_ITER})."
    register_model_architecture(MODEL_NAME, arch)(architecture)


for _arch, _base in ARCHS.items():
    _register(_arch, _base)
    _register(f"sinkformer_{_base}", _base)  # alias: the name zoo's from_fairseq_checkpoint reads
