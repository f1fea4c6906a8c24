"""Weights in and out: one loader for torchvision weight names, local files and the Hugging Face Hub.

``load_weights(model, weights)`` accepts

- a torchvision weight name of the model's torchvision architecture (``"IMAGENET1K_V2"``,
  ``"DEFAULT"``), fetched through torchvision's own weight API and torch hub cache, so a file
  already in ``$TORCH_HOME/hub/checkpoints`` loads offline;
- a local file: ``.safetensors``, ``.pth`` / ``.pt`` / ``.bin`` (a state dict, or a dict holding
  one under ``state_dict`` / ``model``), a Lightning ``.ckpt``, or a ``save_pretrained`` folder;
- ``"hf-hub:org/name"`` (optionally ``@revision``): a Hub repository written by ``save_pretrained``
  (``config.json`` + ``model.safetensors``) or holding a plain ``pytorch_model.bin``.

Every state dict goes through the model's ``adapt_state_dict(state_dict, source_hparams)`` hook, when it
has one, with the hyperparameters the weights were saved with: the config of ``save_pretrained``, the
``hyper_parameters`` of a Lightning checkpoint, or None for any other file (torchvision, timm, a plain
``.pth``). A depth-scaled ResNet uses it to fold the step of the source into its weights, so that, e.g.,
``depth_scaled_resnet50(weights=W)`` computes the same function as torchvision's ``resnet50(weights=W)``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from zoo.errors import ZooError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_META_CONFIG = "zoo.config"
_META_ALIASES = "zoo.aliases"
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "heads.head.")


# ------------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp creates the file 0600; give it the mode an ordinary open() would (0666 & ~umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------------------------------
# safetensors with tied weights


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict; tensors sharing storage (tied blocks) are stored once and aliased."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype, t.device)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.contiguous().cpu()
    meta = dict(metadata or {})
    meta.setdefault("format", "pt")
    if aliases:
        meta[_META_ALIASES] = json.dumps(aliases)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict (aliases expanded) and the file's metadata."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    for alias, name in json.loads(meta.get(_META_ALIASES, "{}")).items():
        tensors[alias] = tensors[name]
    return tensors, meta


# ------------------------------------------------------------------------------------------------
# Reading weights from any source


def read_weights(
    weights: str | os.PathLike, model: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Resolve ``weights`` to ``(state_dict, source_hparams)``; ``source_hparams`` is None for weights
    that do not record the hyperparameters they were trained with (torchvision, timm, ``.pth``)."""
    spec = str(weights)
    if spec.startswith("hf-hub:"):
        return _read_hf_hub(spec[len("hf-hub:"):])
    path = Path(spec).expanduser()
    if path.is_dir():
        file = path / WEIGHTS_NAME
        if not file.is_file():
            raise ZooError(f"folder {path} holds no {WEIGHTS_NAME}: point weights at a save_pretrained folder")
        return _read_file(file)
    if path.is_file():
        return _read_file(path)
    if model is not None and getattr(model, "torchvision_arch", None) and _TORCHVISION_NAME.fullmatch(spec):
        return _read_torchvision(model.torchvision_arch, spec), None
    arch = getattr(model, "torchvision_arch", None) if model is not None else None
    hint = f", nor a torchvision weight name of {arch}" if arch else ""
    raise ZooError(
        f"weights {spec!r} is not an existing file or folder{hint}; give a path, "
        "a torchvision weight name such as 'IMAGENET1K_V1', or 'hf-hub:org/name'"
    )


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if path.suffix == ".safetensors":
        try:
            sd, meta = read_safetensors(path)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ZooError(f"cannot read {path} as safetensors ({e}); is the file complete?") from None
        config = json.loads(meta[_META_CONFIG]) if _META_CONFIG in meta else None
        return sd, (config or {}).get("init_args") if config is not None else None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ZooError(f"cannot read weights from {path}: {str(e).splitlines()[0]}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        # a Lightning checkpoint records its module's hyperparameters (another module's are just
        # passed on: what they lack, e.g. a step scale, means the plain source architecture)
        hparams = obj.get("hyper_parameters")
        is_lightning = "pytorch-lightning_version" in obj or isinstance(hparams, Mapping)
        return dict(obj["state_dict"]), dict(hparams or {}) if is_lightning else None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        return dict(obj["model"]), None
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None
    raise ZooError(f"{path} holds no state dict (expected tensors, or a dict with 'state_dict' or 'model')")


# "IMAGENET1K_V2", "DEFAULT" or torchvision's enum spelling "ResNet50_Weights.IMAGENET1K_V2"
_TORCHVISION_NAME = re.compile(r"(?:\w+_Weights\.)?\w+")


def _read_torchvision(arch: str, name: str) -> dict[str, torch.Tensor]:
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    enum_name, _, name = name.rpartition(".")
    if enum_name and enum_name != enum.__name__:
        raise ZooError(f"{enum_name}.{name} are not weights of {arch}: use {enum.__name__}.<name> or just <name>")
    try:
        entry = enum[name]
    except KeyError:
        valid = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))
        raise ZooError(f"{name!r} is not a torchvision weight of {arch}: choose one of {valid}") from None
    try:
        return entry.get_state_dict(progress=True, check_hash=False)
    except OSError as e:  # URLError is an OSError: no network and nothing in the cache
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)
        raise ZooError(
            f"cannot fetch {arch} {name} from {entry.url} ({e}); without network put the file at {cache}"
        ) from None


def _read_hf_hub(repo: str) -> tuple[dict[str, torch.Tensor], bool]:
    repo_id, _, revision = repo.partition("@")
    from huggingface_hub import hf_hub_download

    errors = []
    for filename in (WEIGHTS_NAME, "pytorch_model.bin"):
        try:
            path = hf_hub_download(repo_id, filename, revision=revision or None)
        except Exception as e:  # missing file, no network and no cache ...
            errors.append(f"{filename}: {type(e).__name__}")
            continue
        return _read_file(Path(path))
    raise ZooError(
        f"cannot get weights of hf-hub:{repo} ({'; '.join(errors)}); check the name, or the cache when offline"
    )


# ------------------------------------------------------------------------------------------------
# Loading into a model


def load_weights(model: nn.Module, weights: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load ``weights`` (see the module docstring) into ``model``; returns the model."""
    state_dict, source_hparams = read_weights(weights, model)
    load_state_dict(model, state_dict, source_hparams=source_hparams, strict=strict, source=str(weights))
    return model


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                    source_hparams: Mapping[str, Any] | None = None, strict: bool = True,
                    source: str = "state dict") -> nn.Module:
    """Load with one clear error listing the keys that do not fit.

    The state dict goes through ``model.adapt_state_dict(state_dict, source_hparams)`` first, when the
    model has that hook (``source_hparams``: the hyperparameters the weights were saved with, None for
    a source architecture such as a torchvision ResNet). A classifier whose shape differs from the
    model's (other ``num_classes``) is left at its initialisation, as timm does when fine-tuning on a
    new label set.
    """
    sd = dict(state_dict)
    own = model.state_dict()
    if not any(k in own for k in sd):
        for prefix in ("model.", "module.", "net."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                break
    if hasattr(model, "adapt_state_dict"):
        sd = model.adapt_state_dict(sd, source_hparams)
    skipped = [
        k for k in sd
        if k.startswith(_CLASSIFIER_PREFIXES) and k in own and sd[k].shape != own[k].shape
    ]
    for k in skipped:
        del sd[k]
    check_state_dict(model, sd, source, strict=strict, ignore=skipped)
    model.load_state_dict(sd, strict=False)
    if skipped:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"zoo: classifier {', '.join(skipped)} not loaded (other num_classes): trained from scratch")
    return model


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                     strict: bool = True, ignore: list[str] | tuple = ()) -> None:
    """Raise one ZooError listing the first missing / unexpected / mis-shaped keys, if any."""
    own = model.state_dict()
    sd = state_dict
    missing = [k for k in own if k not in sd and k not in ignore]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
                  if k in own and hasattr(sd[k], "shape") and sd[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys and (strict or label == "shape mismatch"):
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise ZooError(f"weights from {source} do not fit {type(model).__name__}: {'; '.join(parts)}")


# ------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained (Hugging Face Hub layout: config.json + model.safetensors)


def model_config(model: nn.Module) -> dict[str, Any]:
    """What ``from_pretrained`` needs to rebuild ``model``: its class and constructor arguments."""
    cls = type(model)
    hparams = dict(getattr(model, "hparams", {}))
    hparams.pop("weights", None)
    config = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": hparams}
    try:
        json.dumps(config)
    except TypeError as e:
        raise ZooError(f"hyperparameters of {cls.__name__} are not JSON-serialisable ({e})") from None
    return config


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into a folder, or one ``.safetensors`` file
    whose metadata holds the config. Each file is written to a temporary name, then renamed."""
    path = Path(path)
    config = model_config(model)
    meta = {_META_CONFIG: json.dumps(config)}
    state_dict = model.state_dict()
    if path.suffix == ".safetensors":
        return save_safetensors(state_dict, path, meta)
    save_safetensors(state_dict, path / WEIGHTS_NAME, meta)
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return path


def _resolve_pretrained(src: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    spec = str(src)
    if spec.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo_id, _, revision = spec[len("hf-hub:"):].partition("@")
        try:
            file = hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision or None)
        except Exception as e:
            raise ZooError(f"cannot get {WEIGHTS_NAME} of {spec} ({type(e).__name__}); check the name") from None
        path = Path(file)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / WEIGHTS_NAME
        if not path.is_file():
            raise ZooError(f"no pretrained model at {spec}: expected a save_pretrained folder or .safetensors file")
    state_dict, meta = read_safetensors(path)
    if _META_CONFIG not in meta:
        raise ZooError(f"{path} was not written by zoo's save_pretrained (no config in its metadata)")
    return json.loads(meta[_META_CONFIG]), state_dict


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ZooError(f"model class {class_path} from the config cannot be imported") from None


def from_pretrained(src: str | os.PathLike, cls: type | None = None, **overrides: Any) -> nn.Module:
    """Rebuild a model saved by ``save_pretrained`` (folder, ``.safetensors`` or ``hf-hub:``)."""
    config, state_dict = _resolve_pretrained(src)
    model_cls = _import_class(config["class_path"])
    if cls is not None and not issubclass(model_cls, cls):
        raise ZooError(f"{src} holds a {model_cls.__name__}, not a {cls.__name__}")
    model = model_cls(**{**config["init_args"], **overrides})
    load_state_dict(model, state_dict, source_hparams=config["init_args"], source=str(src))
    return model


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` for zoo models."""

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Save config and weights (folder or single ``.safetensors`` file)."""
        return save_pretrained(self, path)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, **overrides: Any) -> nn.Module:
        """Load a model saved by ``save_pretrained``; keyword arguments override its config."""
        return from_pretrained(src, cls=cls, **overrides)
