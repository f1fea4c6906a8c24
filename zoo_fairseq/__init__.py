"""A fairseq plugin (``--user-dir``) registering Sinkformer translation architectures (docs/mathematics.md, section 5).

    fairseq-train data-bin/iwslt14.tokenized.de-en --user-dir /path/to/zoo_fairseq \\
        --arch sinkformer_iwslt_de_en --sinkhorn-iters 3 --share-decoder-input-output-embed ...

The model ``sinkformer`` is fairseq's own ``TransformerModel`` whose ENCODER self-attentions are
:class:`zoo_fairseq.attention.SinkhornMultiheadAttention`, a subclass of fairseq's ``MultiheadAttention`` with the
same parameters (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) whose forward computes

    C = (W_q x + b_q)(W_k x + b_k)^T / sqrt(d) (+ masks),  A = Sinkhorn_{n_iter}(C),  out = W_o A (W_v x + b_v) + b_o

with :func:`zoo.ops.sinkhorn_attention` (``n_iter`` alternating row / column normalisations of exp(C) over the
valid tokens, (S1)-(S2); ``n_iter=1`` is the row softmax, i.e. fairseq's Transformer). The decoder keeps softmax
attention. The state dict is the plain ``transformer``'s: checkpoints are interchangeable in both directions, and
with the same seed ``--arch sinkformer`` initialises exactly as ``--arch transformer``.

Architectures (fairseq's defaults of the transformer arch named on the right; ``--sinkhorn-iters`` defaults to 3):
``sinkformer`` (``transformer``), ``sinkformer_iwslt_de_en``, ``sinkformer_wmt_en_de``, ``sinkformer_tiny``, and
the aliases ``sinkformer_transformer``, ``sinkformer_transformer_iwslt_de_en``, ... (``"sinkformer_" + fairseq
arch``), the names :meth:`zoo.models.translation.SinkformerTranslation.from_fairseq_checkpoint` already reads.

The package needs fairseq (``pip install "zoo[fairseq]"``, i.e. ``fairseq-fixed==0.12.3.1``); without it,
importing it raises ImportError. :mod:`converters.fairseq` converts a live fairseq model to the native zoo
:class:`~zoo.models.translation.SinkformerTranslation` instead (no plugin needed).
"""

from __future__ import annotations

try:
    import fairseq  # noqa: F401
    from fairseq.models.transformer import TransformerModel  # noqa: F401
except ImportError as _err:  # fairseq absent (or broken): one clear message
    raise ImportError(
        f'zoo_fairseq is a fairseq plugin and needs fairseq ({_err}): pip install "zoo[fairseq]" '
        "(fairseq-fixed==0.12.3.1); the native zoo model zoo.models.translation.SinkformerTranslation and its "
        "from_fairseq_checkpoint need no fairseq"
    ) from _err

from zoo_fairseq.attention import SinkhornMultiheadAttention, sinkhornize  # noqa: E402
from zoo_fairseq.model import (  # noqa: E402
    ARCHS,
    DEFAULT_N_ITER,
    SinkformerModel,
    transformer_arch,
)

__all__ = [
    "ARCHS",
    "DEFAULT_N_ITER",
    "SinkformerModel",
    "SinkhornMultiheadAttention",
    "sinkhornize",
    "transformer_arch",
]
