"""fairseq checkpoint files: the reader, its pickle allow-list, and the zoo model they describe.

A fairseq ``checkpoint*.pt`` is a pickle holding ``model`` (the state dict) and the run's ``args`` (an
``argparse.Namespace``) or ``cfg`` (a dict or an omegaconf config). :func:`read_fairseq_checkpoint` loads it with
``torch.load(weights_only=True)`` and an explicit allow-list of the classes such files hold (nothing named in the
file is imported otherwise); :func:`fairseq_hparams` maps the recorded architecture onto
:class:`zoo.models.translation.SinkformerTranslation`'s arguments (the arch's defaults fill what the args lack; the
run's training settings are not read); :func:`from_fairseq_checkpoint` builds the model and loads the weights.
fairseq itself is never needed. :mod:`converters.fairseq` converts live fairseq models with the same code.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError
from zoo.hub import load_state_dict
from zoo.models.translation import ACTIVATIONS, SinkformerTranslation

__all__ = ["fairseq_arch", "fairseq_hparams", "from_fairseq_checkpoint", "read_fairseq_checkpoint"]

# fairseq's base_architecture defaults (fairseq/models/transformer/transformer_legacy.py), the fields the zoo model
# reads; decoder_embed_dim / decoder_ffn_embed_dim default to the encoder's
_BASE = {
    "encoder_embed_dim": 512,
    "encoder_ffn_embed_dim": 2048,
    "encoder_layers": 6,
    "encoder_attention_heads": 8,
    "encoder_normalize_before": False,
    "encoder_learned_pos": False,
    "decoder_layers": 6,
    "decoder_attention_heads": 8,
    "decoder_normalize_before": False,
    "decoder_learned_pos": False,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "activation_fn": "relu",
    "dropout": 0.1,
    "share_decoder_input_output_embed": False,
    "share_all_embeddings": False,
    "no_token_positional_embeddings": False,
    "no_scale_embedding": False,
    "layernorm_embedding": False,
    "max_source_positions": 1024,
    "max_target_positions": 1024,
    "no_decoder_final_norm": False,
}
_BIG = {
    "encoder_embed_dim": 1024,
    "encoder_ffn_embed_dim": 4096,
    "encoder_attention_heads": 16,
    "decoder_embed_dim": 1024,
    "decoder_ffn_embed_dim": 4096,
    "decoder_attention_heads": 16,
    "dropout": 0.3,
}
FAIRSEQ_ARCHS: dict[str, dict[str, Any]] = {
    "transformer": {},
    "transformer_wmt_en_de": {},
    "transformer_tiny": {
        "encoder_embed_dim": 64,
        "encoder_ffn_embed_dim": 64,
        "encoder_layers": 2,
        "encoder_attention_heads": 2,
        "decoder_layers": 2,
        "decoder_attention_heads": 2,
    },
    "transformer_iwslt_de_en": {
        "encoder_embed_dim": 512,
        "encoder_ffn_embed_dim": 1024,
        "encoder_attention_heads": 4,
        "encoder_layers": 6,
        "decoder_embed_dim": 512,
        "decoder_ffn_embed_dim": 1024,
        "decoder_attention_heads": 4,
        "decoder_layers": 6,
    },
    "transformer_vaswani_wmt_en_de_big": dict(_BIG),
    "transformer_vaswani_wmt_en_fr_big": {**_BIG, "dropout": 0.1},
    "transformer_wmt_en_de_big": {**_BIG, "attention_dropout": 0.1},
    "transformer_wmt_en_de_big_t2t": {
        **_BIG,
        "encoder_normalize_before": True,
        "decoder_normalize_before": True,
        "attention_dropout": 0.1,
        "activation_dropout": 0.1,
    },
}
# options that change the parameters or the function in ways the zoo model does not implement: (name, harmless value)
_UNSUPPORTED = (
    ("adaptive_softmax_cutoff", None),
    ("adaptive_input", False),
    ("cross_self_attention", False),
    ("no_cross_attention", False),
    ("tie_adaptive_weights", False),
    ("quant_noise_pq", 0),
    ("base_layers", 0),
    ("encoder_layers_to_keep", None),
    ("decoder_layers_to_keep", None),
    ("scale_attn", False),
    ("scale_fc", False),
    ("scale_heads", False),
    ("scale_resids", False),
    ("merge_src_tgt_embed", False),
)
# The classes fairseq checkpoint files hold besides tensors and builtins, allowed by name for torch.load's
# weights_only unpickler: the args Namespace, an omegaconf config (fairseq >= 0.10 may pickle one), numpy scalars of
# the training state, fairseq's config enums. Anything else is refused (no fallback to the full unpickler).
_ALLOWED_GLOBALS = (
    "argparse.Namespace",
    "typing.Any",
    "collections.OrderedDict",
    "collections.defaultdict",
    "_codecs.encode",
    "numpy.dtype",
    "numpy.ndarray",
)
_ALLOWED_PREFIXES = (
    "omegaconf.",
    "numpy.core.multiarray.",
    "numpy._core.multiarray.",
    "numpy.dtypes.",
    "fairseq.dataclass.constants.",
)


def _allowed_globals(path: Path) -> list[Any]:
    """The allow-listed classes/functions ``path`` refers to, imported; one ZooError for any other global or for
    an allowed one whose library is missing (omegaconf)."""
    import importlib

    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    refused = sorted(n for n in names if n not in _ALLOWED_GLOBALS and not n.startswith(_ALLOWED_PREFIXES))
    if refused:
        raise ZooError(
            f"{path} holds objects outside the fairseq checkpoint allow-list ({', '.join(refused[:5])}): "
            "load it where those classes exist and torch.save({'model': state_dict, 'args': "
            "argparse.Namespace(...)}) again"
        )
    found = []
    for name in sorted(names):
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            if module.split(".")[0] == "omegaconf":
                raise ZooError(
                    f"{path} stores its config as an omegaconf DictConfig: pip install omegaconf to "
                    "read it (fairseq itself is not needed)"
                ) from None
            raise ZooError(
                f"{path} holds {name}, which cannot be imported here: load the checkpoint where it can "
                "and torch.save({'model': ..., 'args': ...}) again"
            ) from None
    if any(n.startswith("numpy") for n in names):  # a pickled numpy dtype rebuilds through its DType class
        import numpy as np

        found += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return found


def read_fairseq_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A fairseq checkpoint as a dict with ``model`` and ``args`` or ``cfg``, read without fairseq.

    The file is read with ``torch.load(weights_only=True)`` and an explicit allow-list of the classes fairseq
    checkpoints hold (``argparse.Namespace``, omegaconf configs, numpy scalars, fairseq's config enums; nothing is
    unpickled beyond it). Unreadable or truncated files, other classes, a config that needs omegaconf when it is not
    installed, and dicts without ``model`` give one ZooError each.
    """
    if isinstance(checkpoint, Mapping):
        ckpt = dict(checkpoint)
        where = "checkpoint dict"
    else:
        path = Path(checkpoint).expanduser()
        where = str(path)
        if not path.is_file():
            raise ZooError(f"fairseq checkpoint {path} does not exist")
        try:
            allowed = _allowed_globals(path)
            with torch.serialization.safe_globals(allowed):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except ZooError:
            raise
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ZooError(
                f"cannot read fairseq checkpoint {path} ({type(e).__name__}: {first}); is the file "
                "complete? (a truncated download or an interrupted save)"
            ) from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ZooError(f"{where} is not a fairseq checkpoint: expected a dict with a 'model' state dict")
    return dict(ckpt)


def _as_flat_dict(obj: Any, where: str) -> dict[str, Any]:
    """argparse Namespace / dict / omegaconf DictConfig -> a flat dict (``encoder.embed_dim`` ->
    ``encoder_embed_dim``, ``quant_noise.pq`` -> ``quant_noise_pq``)."""
    if obj is None:
        return {}
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    elif type(obj).__module__.startswith("omegaconf"):
        try:
            from omegaconf import OmegaConf
        except ImportError:  # pragma: no cover (unpickling it needed omegaconf)
            raise ZooError(f"{where}: the config is an omegaconf DictConfig: pip install omegaconf") from None
        obj = OmegaConf.to_container(obj, resolve=True)
    if not isinstance(obj, Mapping):
        raise ZooError(f"{where}: the model config is a {type(obj).__name__}, expected an argparse Namespace or a dict")
    flat: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, (Mapping, argparse.Namespace)) and k in ("encoder", "decoder", "quant_noise"):
            for kk, vv in _as_flat_dict(v, where).items():
                flat[f"{k}_{kk}"] = vv
        else:
            flat[k] = v
    return flat


def fairseq_arch(ckpt: Mapping[str, Any]) -> str | None:
    """The ``arch`` the fairseq checkpoint ``ckpt`` (a loaded checkpoint dict) records in its ``args`` /
    ``cfg["model"]`` (None when it cannot be read)."""
    try:
        args = ckpt.get("args")
        if args is not None:
            flat = _as_flat_dict(args, "checkpoint")
        else:
            cfg = ckpt.get("cfg")
            cfg = _as_flat_dict(cfg, "checkpoint") if not isinstance(cfg, Mapping) else dict(cfg)
            flat = _as_flat_dict(cfg.get("model"), "checkpoint")
    except ZooError:
        return None
    arch = flat.get("arch") or flat.get("_name")
    return arch if isinstance(arch, str) else None


def fairseq_hparams(ckpt: Mapping[str, Any], where: str = "checkpoint") -> tuple[dict[str, Any], int | None]:
    """Constructor arguments of :class:`SinkformerTranslation` from a fairseq checkpoint's ``args`` / ``cfg``
    (the arch's defaults fill missing fields), and the checkpoint's Sinkhorn ``n_iter`` if it records one.

    Args:
        ckpt: the loaded checkpoint dict (with ``args`` or ``cfg``).
        where: the checkpoint's name in messages.
    """
    args = ckpt.get("args")
    if args is not None:
        model_cfg = _as_flat_dict(args, where)
    else:
        cfg = ckpt.get("cfg")
        if cfg is None:
            raise ZooError(f"{where} has neither 'args' nor 'cfg': cannot tell its architecture")
        cfg = _as_flat_dict(cfg, where) if not isinstance(cfg, Mapping) else dict(cfg)
        model_cfg = _as_flat_dict(cfg.get("model"), where)
        if not model_cfg:
            raise ZooError(f"{where}: cfg['model'] is empty: cannot tell its architecture")
    arch = model_cfg.get("arch") or model_cfg.get("_name")
    base_arch = arch
    if isinstance(arch, str) and arch.startswith("sinkformer"):  # the zoo_fairseq plugin's archs and aliases
        rest = arch[len("sinkformer") :].lstrip("_")
        base_arch = rest if rest in FAIRSEQ_ARCHS else (f"transformer_{rest}" if rest else "transformer")
    if base_arch not in FAIRSEQ_ARCHS:
        raise ZooError(
            f"{where}: architecture {arch!r} is not supported; this converter reads fairseq's "
            f"translation transformer ({', '.join(sorted(FAIRSEQ_ARCHS))})"
        )
    defaults = {**_BASE, **FAIRSEQ_ARCHS[base_arch]}

    def get(name: str) -> Any:
        v = model_cfg.get(name)
        return defaults.get(name) if v is None else v

    for name, harmless in _UNSUPPORTED:
        v = model_cfg.get(name, harmless)
        if v not in (harmless, None, False, 0, "", "None"):
            raise ZooError(
                f"{where}: option {name}={v!r} is not supported by the zoo transformer; convert a "
                f"checkpoint trained without it"
            )
    hp: dict[str, Any] = {}
    for name in (
        "encoder_embed_dim",
        "encoder_ffn_embed_dim",
        "encoder_layers",
        "encoder_attention_heads",
        "decoder_layers",
        "decoder_attention_heads",
        "max_source_positions",
        "max_target_positions",
    ):
        hp[name] = int(get(name))
    hp["decoder_embed_dim"] = int(
        model_cfg.get("decoder_embed_dim") or defaults.get("decoder_embed_dim") or hp["encoder_embed_dim"]
    )
    hp["decoder_ffn_embed_dim"] = int(
        model_cfg.get("decoder_ffn_embed_dim") or defaults.get("decoder_ffn_embed_dim") or hp["encoder_ffn_embed_dim"]
    )
    for name in (
        "encoder_normalize_before",
        "decoder_normalize_before",
        "encoder_learned_pos",
        "decoder_learned_pos",
        "share_decoder_input_output_embed",
        "share_all_embeddings",
        "no_token_positional_embeddings",
        "no_scale_embedding",
        "layernorm_embedding",
        "no_decoder_final_norm",
    ):
        hp[name] = bool(get(name))
    for name in ("dropout", "attention_dropout"):
        hp[name] = float(get(name))
    act_drop = model_cfg.get("activation_dropout") or model_cfg.get("relu_dropout") or 0.0
    hp["activation_dropout"] = float(act_drop)
    hp["activation_fn"] = str(get("activation_fn"))
    if hp["activation_fn"] not in ACTIVATIONS:
        raise ZooError(
            f"{where}: activation_fn {hp['activation_fn']!r} is not supported (one of {', '.join(ACTIVATIONS)})"
        )
    for name in ("decoder_output_dim", "decoder_input_dim"):
        v = model_cfg.get(name)
        if v is not None and int(v) != hp["decoder_embed_dim"]:
            raise ZooError(
                f"{where}: {name}={v} differs from decoder_embed_dim={hp['decoder_embed_dim']} (extra "
                "projections): not supported by the zoo transformer"
            )
    n_iter = model_cfg.get("n_iter", model_cfg.get("sinkhorn_n_iter"))
    return hp, (int(n_iter) if n_iter is not None else None)


def from_fairseq_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    n_iter: int | None = None,
    src_dict: Any = None,
    tgt_dict: Any = None,
    **overrides: Any,
) -> SinkformerTranslation:
    """A :class:`SinkformerTranslation` with the architecture and weights of a fairseq ``transformer`` checkpoint.

    Args:
        checkpoint: a ``checkpoint*.pt`` file or the loaded dict (``model`` + ``args`` (argparse Namespace) or
            ``cfg`` (a dict, or an omegaconf DictConfig, which needs omegaconf)). The arch's defaults fill what the
            args lack.
        n_iter: Sinkhorn half-steps of the encoder self-attention (default: the checkpoint's ``n_iter`` or
            ``sinkhorn_n_iter`` if it records one, else 1, which computes exactly the fairseq Transformer's
            function).
        src_dict, tgt_dict: a ``dict.{lang}.txt`` path, a :class:`zoo.data.translation.Dictionary` or a size,
            checked against the embeddings.
        overrides: constructor arguments (architecture options, or ``optimizer`` / ``lr_scheduler`` callables);
            the checkpoint's own training settings (its ``lr``, ``optimizer``, ``weight_decay`` ...) are not read.

    A fairseq checkpoint is a pickle: load only files you trust (the reader uses the ``weights_only`` unpickler
    with the allow-list above). One ZooError for an unreadable or truncated file, an unknown architecture, an
    unsupported option or a vocabulary mismatch.
    """
    ckpt = read_fairseq_checkpoint(checkpoint)
    where = str(checkpoint) if not isinstance(checkpoint, Mapping) else "checkpoint dict"
    hparams, ckpt_n_iter = fairseq_hparams(ckpt, where)
    state_dict = ckpt["model"]
    for side in ("encoder", "decoder"):
        key = f"{side}.embed_tokens.weight"
        other = "decoder" if side == "encoder" else "encoder"
        w = state_dict.get(
            key, state_dict.get(f"{other}.embed_tokens.weight") if hparams.get("share_all_embeddings") else None
        )
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ZooError(
                f"{where}: its model holds no {key} (a 2-d tensor): not a fairseq transformer translation checkpoint"
            )
        hparams["src_vocab_size" if side == "encoder" else "tgt_vocab_size"] = int(w.shape[0])
    hparams["n_iter"] = n_iter if n_iter is not None else (ckpt_n_iter or 1)
    model = SinkformerTranslation(**{**hparams, **overrides})
    model.check_dictionaries(src_dict, tgt_dict)
    load_state_dict(model, state_dict, source=where)
    arch = fairseq_arch(ckpt)
    model.pretrained_cfg.update(
        source=where,
        description=f"fairseq {arch or 'transformer'} checkpoint",
        conversion=(
            "fairseq's parameters by name (fairseq's own upgrades of old checkpoints applied): with "
            "n_iter=1 the model computes the fairseq Transformer's log-probabilities; n_iter > 1 puts "
            "Sinkhorn attention in the encoder self-attention with the same weights"
        ),
    )
    return model
