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

import contextlib
import contextvars
import dataclasses
import fcntl
import functools
import glob
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from zoo.errors import ZooError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HF_HUB_PREFIX = "hf-hub:"
CARD_NAME = "README.md"
_META_CONFIG = "zoo.config"
_META_ALIASES = "zoo.aliases"
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "heads.head.")
# the attribute by which a model remembers the weights load_state_dict put into it (see stated_pretrained_cfg)
_LOADED_ATTR = "_zoo_loaded_weights"


# ------------------------------------------------------------------------------------------------
# Atomic writes


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _is_stale(entry: Path) -> bool:
    """True when no live writer holds ``entry`` (a temporary of :func:`atomic_write`): its writer died."""
    try:
        fd = os.open(entry, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # locked: a writer is alive
        return False
    else:
        return True
    finally:
        os.close(fd)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete what killed writers of ``path`` left behind (``.<name>.*.tmp`` beside it, file or folder); a
    temporary that a live writer holds (locked) is kept. Returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if _is_stale(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file.

    ``tmp_path`` lies in a private folder ``.<name>.<random>.tmp`` beside ``path`` that the writer holds locked
    (``flock``) while it writes, so whatever the writer (or a library it calls, such as safetensors, which
    writes its own temporary beside the file it is given) leaves after a kill is named after ``path`` and
    removed by the next write of ``path``. The file gets the mode an ordinary ``open()`` gives
    (``0666 & ~umask``), whatever the writer created it with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmp = folder / path.name
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)
    return path


# ------------------------------------------------------------------------------------------------
# safetensors with tied weights


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write a state dict; tensors sharing storage (tied blocks) are stored once and aliased.

    Args:
        state_dict: the tensors to write, by name.
        path: the ``.safetensors`` file to write (atomically: a temporary name, then renamed).
        metadata: string metadata stored in the file's header (``format`` defaults to ``"pt"``).

    Returns:
        The path written.
    """
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


TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype), read from a file's header


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, str], TensorSpecs]:
    """The metadata and the (shape, dtype) of every tensor of a ``.safetensors`` file (aliases expanded), read
    from its header alone: nothing is allocated for the tensors. One ZooError for a file that is not one.

    Within a :func:`checkpoint_reads` scope (a builder's, :func:`from_pretrained`'s ...), a file's header is read
    once.

    Args:
        path: the ``.safetensors`` file to read.
    """
    meta, specs = _scoped_read("safetensors header", Path(path), _read_safetensors_header)
    return dict(meta), dict(specs)  # the scope's copy stays as read


def _read_safetensors_header(path: Path) -> tuple[dict[str, str], TensorSpecs]:
    from safetensors import safe_open

    if path.is_file() and path.stat().st_size == 0:
        raise ZooError(f"{path} is empty (0 bytes): the file was not written completely; save or download it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            specs = {}
            for k in f.keys():
                piece = f.get_slice(k)
                specs[k] = (tuple(int(n) for n in piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()])
    except ZooError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt or truncated headers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZooError(f"cannot read {path} as safetensors ({first}); is the file complete?") from None
    for alias, name in _aliases(meta, path).items():
        specs[alias] = specs[name]
    return meta, specs


def _aliases(meta: Mapping[str, str], path: Path) -> dict[str, str]:
    """The alias table of a tied state dict (``zoo.aliases`` metadata), checked."""
    try:
        aliases = json.loads(meta.get(_META_ALIASES, "{}"))
    except json.JSONDecodeError as e:
        raise ZooError(f"{path}: metadata {_META_ALIASES!r} is not JSON ({e})") from None
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ZooError(f"{path}: metadata {_META_ALIASES!r} must map tensor names to tensor names")
    return aliases


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict (aliases expanded) and the file's metadata, read from the ``.safetensors`` file ``path``
    (within a :func:`checkpoint_reads` scope, once).

    Args:
        path: the ``.safetensors`` file to read.
    """
    tensors, meta = _scoped_read("safetensors tensors", Path(path), _read_safetensors)
    return dict(tensors), dict(meta)  # the scope's copy stays as read


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    meta, specs = safetensors_header(path)
    aliases = _aliases(meta, Path(path))
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:
        raise ZooError(f"cannot read the tensors of {path} ({type(e).__name__}: {e}); is the file complete?") from None
    for alias, name in aliases.items():
        if name not in tensors:
            raise ZooError(f"{path}: alias {alias!r} names {name!r}, which the file does not hold")
        tensors[alias] = tensors[name]
    return tensors, meta


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


# ------------------------------------------------------------------------------------------------
# One read of a file per call

# the files read in the current checkpoint_reads scope, by what was read and the file's identity on disk; None
# outside any scope (then every read goes to the file)
_SCOPE_READS: contextvars.ContextVar[dict[tuple[Any, ...], Any] | None] = contextvars.ContextVar(
    "zoo_checkpoint_reads", default=None
)
# what a Lightning checkpoint holds for resuming a fit and no zoo reader uses: not kept in a scope's read
_TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers")


@contextlib.contextmanager
def checkpoint_reads() -> Iterator[None]:
    """A scope in which each weight file is read once: a Lightning ``.ckpt`` (or ``.pth``) is loaded once and the
    ``.safetensors`` header once, however many readers ask (its recorded class, hyperparameters, ``pretrained_cfg``
    and weights). Builders (:func:`zoo.pretrained.build_model`, :func:`zoo.pretrained.builder_args_with_recorded`),
    :func:`from_pretrained` and :func:`read_weights` open one themselves; nested scopes share the outermost one, so
    a caller that reads a file through several of them opens one around them all. What was read is
    dropped when the outermost scope ends (nothing is kept between calls), and a file changed on disk within the
    scope (another size, modification time or inode) is read again. Every read is the one it replaces:
    ``torch.load(weights_only=True)`` through :func:`load_checkpoint_file`, the same checks of what it holds."""
    if _SCOPE_READS.get() is not None:  # within a caller's scope: its reads are this call's
        yield
        return
    reads: dict[tuple[Any, ...], Any] = {}
    token = _SCOPE_READS.set(reads)
    try:
        yield
    finally:
        _SCOPE_READS.reset(token)
        reads.clear()


def _scoped_read(kind: str, path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, once per file (and ``kind`` of read) within a :func:`checkpoint_reads` scope; a read that
    fails is not kept (the next asks the file again, and fails the same)."""
    reads = _SCOPE_READS.get()
    if reads is None:
        return read(path)
    try:
        st = os.stat(path)
    except OSError:  # absent, or not readable: the reader raises its own clear error
        return read(path)
    real = os.path.realpath(path)
    key = (kind, real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in reads:
        for old in [k for k in reads if k[:2] == (kind, real)]:  # the file changed on disk: its old read goes
            del reads[old]
        reads[key] = read(path)
    return reads[key]


def _read_checkpoint(path: Path) -> Any:
    """:func:`load_checkpoint_file` for zoo's readers: once per file within a :func:`checkpoint_reads` scope, and
    without a Lightning checkpoint's optimizer and scheduler states (a fit's, which no reader uses)."""
    # mapped: the optimizer and scheduler states dropped here are never read from the file
    obj = _scoped_read("checkpoint", path, lambda p: _without_training_state(load_checkpoint_file(p, mmap=True)))
    return dict(obj) if isinstance(obj, dict) else obj  # readers get their own top level; the scope's stays as read


def _without_training_state(obj: Any) -> Any:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), Mapping):
        return {k: v for k, v in obj.items() if k not in _TRAINING_STATE_KEYS}
    return obj


# ------------------------------------------------------------------------------------------------
# Reading weights from any source


def read_weights(
    weights: str | os.PathLike, model: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Resolve ``weights`` to ``(state_dict, source_hparams)``; ``source_hparams`` is None for weights
    that do not record the hyperparameters they were trained with (torchvision, timm, ``.pth``).

    Args:
        weights: a file, a ``save_pretrained`` folder, ``"hf-hub:org/name"`` or a torchvision weight name.
        model: the model the weights are for; needed only to resolve a torchvision weight name (through its
            ``torchvision_arch``).
    """
    with checkpoint_reads():
        return _read_weights(str(weights), model)


def _read_weights(spec: str, model: nn.Module | None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    repo = _hf_hub_repo(spec)
    if repo is not None:  # save_pretrained's safetensors, else a plain PyTorch state dict
        return _read_file(_hf_hub_file(repo, WEIGHTS_NAME, "pytorch_model.bin"))
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
    if model is not None and arch is None:
        # no torchvision counterpart: never suggest a torchvision weight name, and say why one does not load
        layout = (
            "torchvision weight names load only into a model with torchvision's layout (in_chans=3, the ImageNet "
            "stem, the default widths and a torchvision depth)"
        )
        if hasattr(model, "torchvision_arch"):
            why = f"{layout}, which this {type(model).__name__}{_layout_differences(model)} has not"
            fix = "build the model with that layout for torchvision weights, or give"
        else:
            why = f"{layout}: {type(model).__name__} has no torchvision counterpart"
            fix = "give"
        if _TORCHVISION_WEIGHT_NAME.fullmatch(spec):
            raise ZooError(
                f"weights {spec!r} is not an existing file or folder, and {why}; {fix} a weight file, a "
                "save_pretrained folder or 'hf-hub:org/name'"
            )
        raise ZooError(
            f"weights {spec!r} is not an existing file or folder; give a weight file, a save_pretrained folder "
            "or 'hf-hub:org/name'"
        )
    hint = f", nor a torchvision weight name of {arch}" if arch else ""
    raise ZooError(
        f"weights {spec!r} is not an existing file or folder{hint}; give a path, "
        "a torchvision weight name such as 'IMAGENET1K_V1', or 'hf-hub:org/name'"
    )


def _layout_differences(model: nn.Module) -> str:
    """`` (built with in_chans=1, stem='cifar')``: the arguments by which ``model`` departs from torchvision's
    layout, as far as its hyperparameters say; `` (a depth torchvision has no model of)`` when none does."""
    hp = dict(getattr(model, "hparams", {}) or {})
    expected = {"in_chans": 3, "stem": "imagenet"}
    differ = [f"{k}={hp[k]!r}" for k, v in expected.items() if k in hp and hp[k] != v]
    if hp.get("widths") is not None and tuple(hp["widths"]) != (64, 128, 256, 512):
        differ.append(f"widths={tuple(hp['widths'])!r}")
    return f" (built with {', '.join(differ)})" if differ else " (a depth torchvision has no model of)"


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if path.suffix == ".safetensors":
        sd, meta = read_safetensors(path)
        config = _config_from_metadata(meta, path)
        return sd, config["init_args"] if config is not None else None
    obj = _read_checkpoint(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        # a Lightning checkpoint records its module's hyperparameters (another module's are just
        # passed on: what they lack, e.g. a step scale, means the plain source architecture)
        hparams = obj.get("hyper_parameters")
        is_lightning = "pytorch-lightning_version" in obj or isinstance(hparams, Mapping)
        return _tensors(obj["state_dict"], path), _lightning_init_args(hparams) if is_lightning else None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        return _tensors(obj["model"], path), None
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _tensors(obj, path), None
    raise ZooError(f"{path} holds no state dict (expected tensors, or a dict with 'state_dict' or 'model')")


def _tensors(state_dict: Mapping[Any, Any], path: Path) -> dict[str, torch.Tensor]:
    """A state dict of string keys and tensors, or one ZooError naming the first entry that is not."""
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ZooError(f"{path}: state dict entry {k!r} is a {type(v).__name__}, not a tensor")
    return dict(state_dict)


def _lightning_init_args(hparams: Any) -> dict[str, Any]:
    """A Lightning checkpoint's ``hyper_parameters`` without LightningCLI's own keys (``_class_path`` ...)."""
    if hparams is None:
        return {}
    if not isinstance(hparams, Mapping):
        raise ZooError(f"the checkpoint's hyper_parameters are a {type(hparams).__name__}, not a mapping")
    return {k: v for k, v in hparams.items() if not (isinstance(k, str) and k.startswith("_"))}


def load_checkpoint_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load`` of an untrusted ``.pth`` / ``.pt`` / ``.bin`` / Lightning ``.ckpt`` file: tensors and plain
    containers only (``weights_only=True``, no allow-list beyond torch's own), one clear ZooError for an empty,
    truncated or foreign file. Nothing in the file can run code.

    Args:
        path: the file to load.
        mmap: map the tensors' bytes from the file (``torch.load(mmap=True)``) instead of reading them: only what
            the caller touches is read, so a reader of a checkpoint's hyperparameters, or of its weights without
            its optimizer state, reads neither the rest nor holds it in memory. Files in torch's legacy (pre-zip)
            format, which cannot be mapped, are read whole.
    """
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        raise ZooError(
            f"{str(path)!r} is a sharded checkpoint folder (FSDP2's save_distributed_checkpoint), which only the "
            "fsdp2 strategy reads: run with --trainer.strategy fsdp2, or make one file of it "
            "with zoo.nn.fsdp.consolidate_checkpoint(folder, 'model.ckpt') and give that"
        )
    if not path.is_file():
        raise ZooError(f"checkpoint {str(path)!r} does not exist: give the path of a weight or .ckpt file")
    if path.stat().st_size == 0:
        raise ZooError(f"{path} is empty (0 bytes): the file was not written completely; save or download it again")
    try:
        if mmap and zipfile.is_zipfile(path):  # torch's zip format: the one that maps
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused classes, truncated zip, not a torch file at all, ...
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if isinstance(e, pickle.UnpicklingError) and found:
            # weights_only refuses any class outside plain containers and tensors; say which one
            raise ZooError(
                f"{path} holds the class {found.group(1)}: zoo loads weights with torch.load(weights_only=True) and "
                "never runs code from a file; save the state dict alone (torch.save(model.state_dict(), path)) or "
                "use safetensors"
            ) from None
        reason = re.search(r"WeightsUnpickler error: \s*(.+)", text)
        lines = text.strip().splitlines()
        if reason:
            first = reason.group(1).strip()
        elif isinstance(e, (KeyError, pickle.UnpicklingError, EOFError)):  # pickle's raw "invalid load key" ...
            first = f"not a torch or pickle file: {type(e).__name__} {text.strip()[:40]}"
        else:
            first = lines[0] if lines else type(e).__name__
        raise ZooError(
            f"cannot read weights from {path} ({first}): not a complete torch file; re-save or download it again"
        ) from None


# "IMAGENET1K_V2", "DEFAULT" or torchvision's enum spelling "ResNet50_Weights.IMAGENET1K_V2"
_TORCHVISION_NAME = re.compile(r"(?:\w+_Weights\.)?\w+")
# what reads as a torchvision weight name rather than a mistyped path: "ResNet18_Weights.X" or an upper-case
# member name ("IMAGENET1K_V1", "DEFAULT")
_TORCHVISION_WEIGHT_NAME = re.compile(r"\w+_Weights\.\w+|[A-Z][A-Z0-9_]*")


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


def _hf_hub_repo(spec: str) -> str | None:
    """``org/name[@revision]`` of a ``"hf-hub:org/name[@revision]"`` source; None for any other source."""
    return spec[len(HF_HUB_PREFIX) :] if spec.startswith(HF_HUB_PREFIX) else None


def _hf_hub_file(repo: str, *filenames: str, required: bool = True) -> Path | None:
    """The first of ``filenames`` that the Hub repository ``org/name[@revision]`` holds, through the Hugging Face
    cache (offline once cached). Every download from the Hub goes through here. When none can be had: one
    ZooError naming the repository (and the file, or the files tried), or None when not ``required``."""
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = repo.partition("@")
    failures: list[Exception] = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None))
        except Exception as e:  # missing file, no network and no cache ...
            failures.append(e)
    if not required:
        return None
    if len(filenames) == 1:
        what, why = filenames[0], type(failures[0]).__name__
    else:
        what, why = "weights", "neither " + " nor ".join(filenames)
    raise ZooError(f"cannot get {what} of {HF_HUB_PREFIX}{repo} ({why}); check the name, or the cache when offline")


def recorded_num_classes(weights: str | os.PathLike | None) -> int | None:
    """The ``num_classes`` a zoo weight source records (a ``save_pretrained`` folder or file, an ``hf-hub:``
    repository written by it, a Lightning checkpoint), None for sources that record none (torchvision names,
    timm or plain ``.pth`` files). Builders use it to build the head the weights hold when the caller gives no
    ``num_classes`` (timm's behaviour for pretrained configs)."""
    if weights is None:
        return None
    hparams = recorded_hparams(str(weights))
    value = (hparams or {}).get("num_classes")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ZooError(f"weights {str(weights)!r} record num_classes={value!r}, not a non-negative integer")
    return value


def _recorded_file(spec: str) -> Path | None:
    """The file zoo weights ``spec`` live in: a file as given, a ``save_pretrained`` folder's weights file, an
    ``hf-hub:`` repository's (from the cache or the Hub); None when there is none."""
    repo = _hf_hub_repo(spec)
    if repo is not None:
        return _hf_hub_file(repo, WEIGHTS_NAME, required=False)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
    return path if path.is_file() else None


def recorded_config(spec: str | os.PathLike) -> dict[str, Any] | None:
    """What zoo weights record about their model: ``{"class_path", "init_args"}`` (and ``"pretrained_cfg"`` when
    stored) from ``save_pretrained``'s config, or ``_class_path`` and the hyperparameters of a Lightning checkpoint
    (``class_path`` None when it names none); None for weights that record nothing (torchvision names, plain files).
    The class path is only a name here: :func:`zoo.registry.model_class` resolves registered classes only.

    Args:
        spec: a weight file, a ``save_pretrained`` folder or ``"hf-hub:org/name"``.
    """
    path = _recorded_file(str(spec))
    if path is None:
        return None
    if path.suffix == ".safetensors":
        return _config_from_metadata(safetensors_header(path)[0], path)
    obj = _read_checkpoint(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and "hyper_parameters" in obj:
        hparams = obj["hyper_parameters"]
        config = {"class_path": _checkpoint_class_path(obj), "init_args": _lightning_init_args(hparams)}
        if obj.get(CHECKPOINT_CFG_KEY) is not None:  # unchecked, as save_pretrained's config here
            config["pretrained_cfg"] = obj[CHECKPOINT_CFG_KEY]
        return config
    return None


# where a zoo model's on_save_checkpoint records its registered class in a Lightning checkpoint written by a plain
# Trainer (LightningCLI records it as hyper_parameters["_class_path"]; a key there would reach the constructor
# through Lightning's load_from_checkpoint), and its pretrained_cfg (what save_pretrained keeps in its config)
CHECKPOINT_CLASS_KEY = "zoo_class_path"
CHECKPOINT_CFG_KEY = "zoo_pretrained_cfg"


def _checkpoint_pretrained_cfg(checkpoint: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    """The ``pretrained_cfg`` a zoo model's Lightning checkpoint records, checked as untrusted input
    (:func:`check_pretrained_cfg`); None for a checkpoint that records none."""
    raw = checkpoint.get(CHECKPOINT_CFG_KEY)
    return None if raw is None else check_pretrained_cfg(raw, source)


def _checkpoint_class_path(checkpoint: Mapping[str, Any]) -> str | None:
    """The model class a Lightning checkpoint names: LightningCLI's ``_class_path``, else zoo's own record."""
    hparams = checkpoint.get("hyper_parameters")
    found = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
    if found is None:
        found = checkpoint.get(CHECKPOINT_CLASS_KEY)
    return found if isinstance(found, str) else None


def recorded_hparams(spec: str) -> dict[str, Any] | None:
    """The constructor arguments zoo weights record (save_pretrained config, Lightning hyper_parameters); None
    for weights that record none (torchvision names, plain files) or cannot be read here.

    Args:
        spec: a weight file, a ``save_pretrained`` folder or ``"hf-hub:org/name"``.
    """
    config = recorded_config(spec)
    return config["init_args"] if config is not None else None


def check_recorded_init_args(
    cls: type, init_args: Mapping[str, Any], source: str, largest_numel: int
) -> dict[str, Any]:
    """The constructor arguments a file records, checked before anything is built: training settings of older
    files dropped (:func:`drop_legacy_training_args`), then :func:`check_init_args` with integers bounded by the
    file's largest tensor (a crafted width or depth cannot allocate more than the file holds).

    Args:
        cls: the model class they are for.
        init_args: the recorded arguments.
        source: the file, named in messages.
        largest_numel: the number of elements of the file's largest tensor.
    """
    init_args = drop_legacy_training_args(cls, init_args, source)
    check_init_args(cls, init_args, source, max_int=max(_MAX_INIT_INT, largest_numel))
    return init_args


# ------------------------------------------------------------------------------------------------
# Loading into a model


def load_weights(model: nn.Module, weights: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load ``weights`` (see the module docstring) into ``model``; returns the model.

    Args:
        model: the model to load into.
        weights: a file, a ``save_pretrained`` folder, ``"hf-hub:org/name"`` or a torchvision weight name.
        strict: whether keys missing from or unexpected in the weights are an error (as
            ``nn.Module.load_state_dict``); mis-shaped keys always are.
    """
    state_dict, source_hparams = read_weights(weights, model)
    load_state_dict(
        model,
        state_dict,
        source_hparams=source_hparams,
        strict=strict,
        source=str(weights),
        from_local_file=is_user_weights_file(weights),
    )
    return model


@functools.cache
def _torchvision_file_names() -> frozenset[str]:
    """The file names of torchvision's published weights (``resnet50-11ad3fa6.pth``: the name and the hash prefix
    that ``torch.hub`` checks on download)."""
    import torchvision.models as tvm

    names = set()
    for model_name in tvm.list_models():
        for entry in tvm.get_model_weights(model_name):
            names.add(entry.url.rsplit("/", 1)[-1])
    return frozenset(names)


def is_user_weights_file(weights: str | os.PathLike | None) -> bool:
    """Whether ``weights`` names a local file or folder of the user's (what :func:`weights_from_local_file` tells a
    model's ``adapt_state_dict`` hook): not a torchvision weight name, an ``hf-hub:`` repository, or one of
    torchvision's published weight files (its download in the torch hub cache, or a copy under its own name
    ``resnet50-11ad3fa6.pth``), which hold a plain network's weights by definition.

    Args:
        weights: a weights specification, as :func:`load_weights` takes; None for none.
    """
    return is_local_weights(weights) and Path(str(weights)).name not in _torchvision_file_names()


# True while a model's adapt_state_dict hook runs on weights read from a local file or folder (see
# weights_from_local_file); a context variable, so that the hook's signature stays (state_dict, source_hparams)
_FROM_LOCAL_FILE: contextvars.ContextVar[bool] = contextvars.ContextVar("zoo_weights_from_local_file", default=False)


def is_local_weights(weights: str | os.PathLike | None) -> bool:
    """Whether ``weights`` names a local file or folder (not a torchvision weight name or an ``hf-hub:`` repository).

    Args:
        weights: a weights specification, as :func:`load_weights` takes; None for none.
    """
    return weights is not None and _hf_hub_repo(str(weights)) is None and Path(str(weights)).expanduser().exists()


def weights_from_local_file() -> bool:
    """For a model's ``adapt_state_dict`` hook: whether the weights it adapts were read from a local file or folder
    given by the user (``weights=`` or :func:`load_weights`), rather than a torchvision weight name, an ``hf-hub:``
    repository, a tag's weights or a state dict in memory (a converter's source model). Only such a file can be a
    zoo model's own ``state_dict`` saved without its hyperparameters."""
    return _FROM_LOCAL_FILE.get()


def load_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source_hparams: Mapping[str, Any] | None = None,
    strict: bool = True,
    source: str = "state dict",
    from_local_file: bool = False,
) -> nn.Module:
    """Load with one clear error listing the keys that do not fit.

    The state dict goes through ``model.adapt_state_dict(state_dict, source_hparams)`` first, when the
    model has that hook (``source_hparams``: the hyperparameters the weights were saved with, None for
    a source architecture such as a torchvision ResNet). The classifier (the model's own: its
    ``pretrained_cfg["classifier"]`` and ``get_classifier()``) is lenient, as timm is when fine-tuning on a new
    label set: one whose shape differs from the model's (other ``num_classes``), or that the weights do not hold
    (saved with ``num_classes=0``), is left at its initialisation; one the weights hold for a model without a
    classifier (``num_classes=0``) is dropped; each with an info line. A floating-point tensor of another
    precision is cast to the model's (with an info line); an integer or boolean tensor for a floating-point
    parameter, or the reverse, is refused.

    The model remembers what was loaded (``source``, and whether its classifier came with it), so that
    ``save_pretrained`` states source weights and metrics in the config and model card only when they hold.

    Args:
        model: the model to load into.
        state_dict: the tensors to load, by name (a ``model.`` / ``module.`` / ``net.`` prefix on every key is
            stripped when no key matches the model's as it is).
        source_hparams: the hyperparameters the weights were saved with, passed to ``model.adapt_state_dict``;
            None when unknown.
        strict: whether missing or unexpected keys are an error; mis-shaped keys always are.
        source: where the weights come from, named in messages.
        from_local_file: whether they were read from a local file or folder the user named (what
            :func:`weights_from_local_file` tells the model's ``adapt_state_dict`` hook).
    """
    token = _FROM_LOCAL_FILE.set(bool(from_local_file))
    try:
        fit = _fit_state_dict(model, state_dict, source_hparams, strict, source)
    finally:
        _FROM_LOCAL_FILE.reset(token)
    result = model.load_state_dict(fit.state_dict, strict=False)
    from lightning.pytorch.utilities import rank_zero_info

    if fit.cast:
        cast = fit.cast
        rank_zero_info(
            f"zoo: {source}: cast to the model's precision: {', '.join(cast[:5])}{' ...' if len(cast) > 5 else ''}"
        )
    if fit.mismatched_head:
        rank_zero_info(
            f"zoo: classifier {', '.join(fit.mismatched_head)} not loaded (other num_classes): trained from scratch"
        )
    if fit.absent_head:
        rank_zero_info(
            f"zoo: {source} holds no classifier ({', '.join(fit.absent_head)}: saved with num_classes=0): the "
            "model's classifier is left at its initialisation (trained from scratch)"
        )
    if fit.dropped_head:
        rank_zero_info(
            f"zoo: {source}: classifier {', '.join(fit.dropped_head)} not loaded: the model has no classifier "
            "(num_classes=0)"
        )
    left = set(fit.mismatched_head) | set(fit.absent_head)  # left at their initialisation on purpose
    missing = [k for k in getattr(result, "missing_keys", ()) if k not in left]
    complete = not (missing or getattr(result, "unexpected_keys", ()))
    setattr(
        model,
        _LOADED_ATTR,
        {
            "source": source,
            "complete": complete,
            "head": not (fit.mismatched_head or fit.absent_head or fit.dropped_head),
            "num_classes": getattr(model, "num_classes", None),
        },
    )
    return model


def fit_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source_hparams: Mapping[str, Any] | None = None,
    strict: bool = True,
    source: str = "state dict",
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """What :func:`load_state_dict` loads, checked: ``(state_dict, skipped classifier keys, cast keys)``; the
    skipped classifier keys are the model's classifier keys left at their initialisation (another shape in the
    weights, or none there); a classifier the weights hold for a model without one is left out of the state dict.

    Works on meta tensors too (a model built on the meta device, a file's shapes and dtypes), so that a file
    is checked against an architecture before anything is allocated.

    Args:
        model: the model the state dict is for.
        state_dict: the tensors to check, by name.
        source_hparams: the hyperparameters the weights were saved with (see :func:`load_state_dict`).
        strict: whether missing or unexpected keys are an error; mis-shaped keys always are.
        source: where the weights come from, named in messages.
    """
    fit = _fit_state_dict(model, state_dict, source_hparams, strict, source)
    return fit.state_dict, [*fit.mismatched_head, *fit.absent_head], fit.cast


@dataclasses.dataclass
class _Fit:
    state_dict: dict[str, torch.Tensor]
    mismatched_head: list[str]  # the model's classifier keys of another shape in the weights (left at init)
    absent_head: list[str]  # the model's classifier keys, none of them in the weights (left at init)
    dropped_head: list[str]  # classifier keys of the weights for a model without a classifier (dropped)
    cast: list[str]


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes (``"fc."``) of ``model``'s classifier, as the model itself names it: its
    ``pretrained_cfg["classifier"]`` (timm's key; a name or several) and the module ``get_classifier()`` returns;
    zoo's usual classifier names when the model names none.

    Args:
        model: the model whose classifier is meant.
    """
    names: list[str] = []
    declared = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(declared, str):
        names.append(declared)
    elif isinstance(declared, (list, tuple)):
        names += [n for n in declared if isinstance(n, str)]
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except Exception:  # a model whose get_classifier needs arguments or state it lacks: its cfg says enough
            head = None
        if isinstance(head, nn.Module):
            names += [name for name, module in model.named_modules() if module is head and name]
    if not names:
        return _CLASSIFIER_PREFIXES
    return tuple(dict.fromkeys(f"{n}." for n in names if n))


def _fit_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source_hparams: Mapping[str, Any] | None,
    strict: bool,
    source: str,
) -> _Fit:
    sd = dict(state_dict)
    own = model.state_dict()
    if not any(k in own for k in sd):
        for prefix in ("model.", "module.", "net."):
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                break
    if hasattr(model, "adapt_state_dict"):
        sd = model.adapt_state_dict(sd, source_hparams)
    head = classifier_prefixes(model)
    own_head = [k for k in own if k.startswith(head)]
    their_head = [k for k in sd if k.startswith(head)]
    mismatched = [k for k in their_head if k in own and sd[k].shape != own[k].shape]
    absent = own_head if own_head and not their_head else []  # weights saved without the classifier
    dropped = their_head if their_head and not own_head else []  # a model built without one (num_classes=0)
    for k in [*mismatched, *dropped]:
        del sd[k]
    check_state_dict(model, sd, source, strict=strict, ignore=[*mismatched, *absent])
    cast = []
    for k, v in sd.items():
        mine = own.get(k)
        if mine is None or v.dtype == mine.dtype:
            continue
        if _dtype_kind(v.dtype) != _dtype_kind(mine.dtype):
            raise ZooError(
                f"weights from {source}: {k} is {v.dtype} but the model's is {mine.dtype}; zoo casts only between "
                "floating-point precisions: the file holds the wrong tensor (check its source, or convert it)"
            )
        if mine.is_floating_point():
            cast.append(f"{k} {str(v.dtype).removeprefix('torch.')}")
            sd[k] = v.to(mine.dtype)
    return _Fit(sd, mismatched, absent, dropped, cast)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def check_checkpoint(model: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """A LightningModule's ``on_load_checkpoint``: one clear error when the checkpoint's weights do not fit
    ``model`` (:func:`check_state_dict`), before Lightning loads them. A checkpoint without ``"state_dict"`` is left
    alone: a model-parallel strategy (FSDP2, sharded checkpoints) has loaded the weights into the model itself and
    taken them out of the dict, with its own checks.

    Args:
        model: the model the checkpoint is loaded into.
        checkpoint: the checkpoint dict Lightning passes to ``on_load_checkpoint``.
    """
    if "state_dict" in checkpoint:
        check_state_dict(model, checkpoint["state_dict"], source="checkpoint")


def check_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "state dict",
    strict: bool = True,
    ignore: list[str] | tuple = (),
) -> None:
    """Raise one ZooError listing the first missing / unexpected / mis-shaped keys, if any.

    Args:
        model: the model whose state dict the keys must match.
        state_dict: the tensors to check (anything with a ``shape``), by name.
        source: where the weights come from, named in the message.
        strict: whether missing or unexpected keys are an error; mis-shaped keys always are.
        ignore: keys of the model that may be missing (a classifier left at its initialisation).
    """
    own = model.state_dict()
    sd = state_dict
    missing = [k for k in own if k not in sd and k not in ignore]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in sd
        if k in own and hasattr(sd[k], "shape") and sd[k].shape != own[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys and (strict or label == "shape mismatch"):
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise ZooError(f"weights from {source} do not fit {type(model).__name__}: {'; '.join(parts)}")


# ------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained (Hugging Face Hub layout: config.json + model.safetensors)


def model_config(model: nn.Module) -> dict[str, Any]:
    """What ``from_pretrained`` needs to rebuild ``model``: its class, its constructor arguments and its
    ``pretrained_cfg`` (timm's keys, with source weights and metrics only where they hold:
    :func:`stated_pretrained_cfg`). One ZooError for a model ``from_pretrained`` could not rebuild (a class that
    is not a registered zoo model class, such as a ``features_only`` extractor).

    Args:
        model: the zoo model to describe.
    """
    from zoo.registry import model_class

    cls = type(model)
    class_path = f"{cls.__module__}.{cls.__qualname__}"
    try:
        registered = model_class(class_path) is cls
    except ZooError:
        registered = False
    if not registered:
        raise ZooError(_unsaveable(model))
    sync = getattr(model, "sync_hparams", None)
    if callable(sync):  # settings changed on the modules after construction (a ResNet's stored_blocks)
        sync()
    hparams = dict(getattr(model, "hparams", {}))
    hparams.pop("weights", None)
    config: dict[str, Any] = {"class_path": class_path, "init_args": hparams}
    try:
        json.dumps(config)
    except TypeError as e:
        raise ZooError(f"hyperparameters of {cls.__name__} are not JSON-serialisable ({e})") from None
    cfg = stated_pretrained_cfg(model)
    if cfg is not None:
        stored = _jsonable_cfg(cfg)
        check_pretrained_cfg(stored, f"the pretrained_cfg of this {cls.__name__}")  # what would not load back
        config["pretrained_cfg"] = stored
    return config


def _unsaveable(model: nn.Module) -> str:
    """Why ``save_pretrained`` refuses ``model`` (not a registered zoo model class), and the fix."""
    name = type(model).__name__
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):  # fully_shard swapped its class for FSDP<Class> and its parameters for shards
        base = next((c.__name__ for c in type(model).__mro__[1:] if c is not FSDPModule), name)
        return (
            f"cannot save a {base} sharded by FSDP2 ({name}: each process holds shards of its parameters); save "
            f"from its checkpoint in one process: zoo.models.{base}.load_from_checkpoint(path).save_pretrained(folder) "
            "(a sharded checkpoint folder: zoo.nn.fsdp.consolidate_checkpoint(folder, file) first)"
        )
    inner = getattr(model, "model", None)
    if hasattr(model, "feature_info") and isinstance(inner, nn.Module) and hasattr(inner, "hparams"):
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or "<architecture>"
        return (
            f"cannot save a features_only extractor ({name} over a {type(inner).__name__}): from_pretrained could "
            "not rebuild it, and its model is pruned to the features; save the model before wrapping it (build "
            f"it without features_only=True, then save_pretrained), and build the extractor after loading: "
            f"zoo.create_model({arch!r}, weights=<folder>, features_only=True)"
        )
    return (
        f"cannot save a {name}: it is not a registered zoo model class, so from_pretrained could not rebuild it; "
        "save the zoo model itself (a subclass must be registered with zoo.registry.register_model_class)"
    )


# ------------------------------------------------------------------------------------------------
# pretrained_cfg in and out: what a saved model states about its weights and transforms

# keys of a pretrained_cfg that say where the weights come from and what they compute: true of a model only when
# those weights were loaded into it
_WEIGHT_CLAIMS = ("source", "url", "file", "hf_hub_id", "conversion", "metrics")
# bounds on a stored pretrained_cfg (an untrusted file's): its JSON size, one string, one list or mapping, nesting
_MAX_CFG_BYTES = 1 << 18
_MAX_CFG_STRING = 1 << 14
MAX_CFG_ITEMS = 1024
_MAX_CFG_DEPTH = 6
_CFG_STRINGS = (
    "architecture",
    "tag",
    "source",
    "url",
    "file",
    "hf_hub_id",
    "interpolation",
    "crop_mode",
    "first_conv",
    "license",
    "description",
    "origin_url",
    "paper_name",
    "conversion",
    "recipe",
)
_CFG_TUPLES = ("input_size", "test_input_size", "min_input_size", "pool_size", "mean", "std")


def _cfg_fields() -> frozenset[str]:
    from zoo.pretrained import PretrainedCfg

    return frozenset(f.name for f in dataclasses.fields(PretrainedCfg))


def _weights_hold(model: nn.Module, cfg: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether ``cfg``'s source weights are ``model``'s (loaded through :func:`load_state_dict`, completely, from
    that source) and whether its metrics of the model still apply (the classifier came with the weights and was
    not replaced since)."""
    loaded = getattr(model, _LOADED_ATTR, None)
    source = cfg.get("source")
    if not isinstance(loaded, dict) or not loaded.get("complete") or not isinstance(source, str) or not source:
        return False, False
    from zoo.pretrained import _source_matches, pretrained_cfgs_of

    arch = cfg.get("architecture")
    table = {c.source for c in pretrained_cfgs_of(arch)} if isinstance(arch, str) else set()
    came_from = str(loaded["source"])
    same = came_from in (source, cfg.get("file")) or _source_matches(source, came_from)
    if source in table and not same:
        return False, False  # the cfg names a table entry's weights, but other weights were loaded
    num_classes = getattr(model, "num_classes", None)
    head = loaded.get("head") and loaded.get("num_classes") == num_classes and num_classes != 0
    return True, bool(head)


def stated_pretrained_cfg(model: nn.Module) -> dict[str, Any] | None:
    """``model.pretrained_cfg`` as ``save_pretrained`` states it (config and model card): the source weights,
    their conversion and metrics only when those weights were loaded into this model (a builder's table entry
    describes them whether or not ``pretrained=True`` loaded them), and the metrics of the model only while it
    still computes that function (its classifier came with the weights, with the same ``num_classes``). What is
    left out is named in a note. None for a model without a ``pretrained_cfg``.

    Args:
        model: the model whose ``pretrained_cfg`` is meant.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, Mapping):
        return None
    cfg = dict(cfg)
    weights, head = _weights_hold(model, cfg)
    name = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("architecture") and cfg.get("tag") else None
    notes = list(cfg.get("notes") or ())
    if not weights:
        dropped = [k for k in _WEIGHT_CLAIMS if cfg.get(k)]
        for k in _WEIGHT_CLAIMS:
            cfg.pop(k, None)
        if dropped:
            notes.append(
                f"no weights of {name or 'this configuration'} were loaded into this model (its weights were "
                f"initialised or trained here): its {', '.join(dropped)} are left out"
            )
    elif not head:
        metrics = cfg.get("metrics") or {}
        kept = {k: m for k, m in metrics.items() if not (isinstance(m, Mapping) and m.get("of") == "model")}
        if cfg.get("conversion") or len(kept) != len(metrics):
            cfg["conversion"] = None
            cfg["metrics"] = kept
            notes.append(
                f"the classifier of {cfg['source']} was not loaded (this model has num_classes="
                f"{getattr(model, 'num_classes', None)}): the conversion and the metrics of the model do not apply"
            )
    if notes:
        cfg["notes"] = tuple(notes)
    return {k: v for k, v in cfg.items() if not (k in ("conversion", "metrics") and not v)}


def _jsonable_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``cfg`` that are :class:`~zoo.pretrained.PretrainedCfg`'s, as plain JSON; keys the model
    derives from its arguments (``in_chans`` of a point-cloud model ...) are left to the model to derive again."""
    fields = _cfg_fields()
    out = {}
    for k, v in cfg.items():
        if k not in fields or k == "file":  # file: a path on the saving machine (pretrained=True would load it)
            continue
        try:
            out[k] = json.loads(json.dumps(v, allow_nan=False))
        except (TypeError, ValueError):  # not plain JSON (an object in model_args ...): not stated
            continue
    return out


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    if depth > _MAX_CFG_DEPTH:
        raise ZooError(f"{where} nests deeper than {_MAX_CFG_DEPTH} levels")
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ZooError(f"{where} is {value!r}, not a finite number")
    elif isinstance(value, str):
        if len(value) > _MAX_CFG_STRING:
            raise ZooError(f"{where} is a string of {len(value)} characters (at most {_MAX_CFG_STRING})")
    elif isinstance(value, list):
        if len(value) > MAX_CFG_ITEMS:
            raise ZooError(f"{where} holds {len(value)} entries (at most {MAX_CFG_ITEMS})")
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        if len(value) > MAX_CFG_ITEMS:
            raise ZooError(f"{where} holds {len(value)} entries (at most {MAX_CFG_ITEMS})")
        for k, v in value.items():
            if not isinstance(k, str) or len(k) > _MAX_CFG_STRING:
                raise ZooError(f"{where} has a key that is not a short string: {str(k)[:40]!r}")
            _check_plain(v, f"{where}[{k!r}]", depth + 1)
    else:
        raise ZooError(f"{where} is a {type(value).__name__}, not a JSON value")


def check_pretrained_cfg(raw: Any, source: str) -> dict[str, Any]:
    """A stored ``pretrained_cfg`` (a file's: untrusted) checked and in the types the model uses (tuples for
    timm's sizes, mean and std): a JSON object of :class:`~zoo.pretrained.PretrainedCfg`'s fields only, plain JSON
    values of the field's type and of sane sizes, and what ``PretrainedCfg`` itself checks (sizes, mean / std per
    channel, crop, interpolation, metrics). Nothing named in it is imported or fetched. One ZooError naming the
    key and the fix otherwise.

    Args:
        raw: the stored cfg (parsed JSON).
        source: where it comes from, named in messages.
    """
    from zoo.pretrained import PretrainedCfg

    where = f"{source}: pretrained_cfg"
    if not isinstance(raw, dict):
        raise ZooError(f"{where} must be a JSON object of timm's pretrained_cfg keys, got {type(raw).__name__}")
    try:
        size = len(json.dumps(raw, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ZooError(f"{where} is not plain JSON ({e}); the file is damaged or not zoo's") from None
    if size > _MAX_CFG_BYTES:
        raise ZooError(f"{where} is {size} bytes of JSON (at most {_MAX_CFG_BYTES}); the file is damaged or crafted")
    fields = _cfg_fields()
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:
        raise ZooError(
            f"{where} has keys that are not PretrainedCfg fields: {', '.join(unknown[:5])}; the file is damaged, "
            "crafted or from a newer zoo (upgrade zoo, or remove them from its metadata)"
        )
    for k, v in raw.items():
        _check_plain(v, f"{where}[{k!r}]")
    for k in _CFG_STRINGS:
        if raw.get(k) is not None and not isinstance(raw[k], str):
            raise ZooError(f"{where}[{k!r}] must be a string or null, got {type(raw[k]).__name__}")
    labels = raw.get("label_names")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise ZooError(f"{where}['label_names'] must be a list of strings (one per class) or null, got {labels!r:.80}")
    for k in ("classifier", "paper_ids", "notes"):
        v = raw.get(k)
        if v is not None and not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            raise ZooError(f"{where}[{k!r}] must be a string, a list of strings or null, got {v!r:.80}")
    for k in _CFG_TUPLES:
        v = raw.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)):
            raise ZooError(f"{where}[{k!r}] must be a list of numbers or null, got {v!r:.80}")
    for k in ("model_args", "metrics"):
        if raw.get(k) is not None and not isinstance(raw[k], dict):
            raise ZooError(f"{where}[{k!r}] must be a JSON object, got {type(raw[k]).__name__}")
    if "fixed_input_size" in raw and not isinstance(raw["fixed_input_size"], bool):
        raise ZooError(f"{where}['fixed_input_size'] must be true or false, got {raw['fixed_input_size']!r}")
    kwargs = {k: v for k, v in raw.items() if v is not None or k in ("input_size",)}
    kwargs.setdefault("input_size", None)  # a cfg without image keys (point clouds, vectors)
    if kwargs["input_size"] is None:
        kwargs.setdefault("mean", [0.0] * len(kwargs.get("std") or (0.0,)))
        kwargs.setdefault("std", [1.0] * len(kwargs["mean"]))
    kwargs["model_args"] = kwargs.get("model_args") or {}
    kwargs["metrics"] = kwargs.get("metrics") or {}
    try:
        checked = PretrainedCfg(**kwargs)
    except ZooError as e:
        raise ZooError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ZooError(f"{where} does not describe a PretrainedCfg ({e}); the file is damaged or crafted") from None
    out = dict(raw)
    for k in (*_CFG_TUPLES, "notes"):
        if out.get(k) is not None:
            out[k] = getattr(checked, k) if k != "pool_size" else tuple(out[k])
    for k in ("classifier", "paper_ids", "label_names"):
        if isinstance(out.get(k), list):
            out[k] = tuple(out[k])
    return out


def recorded_pretrained_cfg(spec: str | os.PathLike) -> dict[str, Any] | None:
    """The ``pretrained_cfg`` zoo weights record (``save_pretrained``'s config, in the ``.safetensors``
    metadata; a zoo model's Lightning checkpoint), checked (:func:`check_pretrained_cfg`); None for weights that
    record none (files saved before zoo stored it, torchvision names, plain files).

    Args:
        spec: a weight file, a ``save_pretrained`` folder or ``"hf-hub:org/name"``.
    """
    path = _recorded_file(str(spec))
    if path is None or path.suffix not in (".safetensors", ".ckpt"):  # plain .pth files record none
        return None
    config = recorded_config(path)
    if config is None or config.get("pretrained_cfg") is None:
        return None
    return check_pretrained_cfg(config["pretrained_cfg"], str(spec))


def restore_pretrained_cfg(model: nn.Module, stored: Mapping[str, Any]) -> nn.Module:
    """Give ``model`` (just built and loaded from zoo weights) the ``pretrained_cfg`` those weights record
    (:func:`recorded_pretrained_cfg`), as timm's ``load_model_config_from_hf`` does: its transforms, architecture,
    tag and the source the weights were converted from. What the model derives from its own arguments (the
    ``num_classes`` it was built with, input channels ...) is corrected by its ``pretrained_cfg_as_built`` hook.
    The weights loaded into the model are then taken to be that source's, as far as the file states it.

    Args:
        model: the model to describe (built, its weights loaded).
        stored: the checked stored cfg.
    """
    fields = _cfg_fields()
    own = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg = {**{k: v for k, v in own.items() if k not in fields}, **{k: v for k, v in stored.items() if k != "file"}}
    if isinstance(getattr(model, "num_classes", None), int):
        cfg["num_classes"] = int(model.num_classes)
        if len(cfg.get("label_names") or ()) != cfg["num_classes"]:
            cfg.pop("label_names", None)  # built with another head than the one the names are of
    hook = getattr(model, "pretrained_cfg_as_built", None)
    if callable(hook):
        cfg = hook(cfg)
    model.pretrained_cfg = cfg
    model.default_cfg = model.pretrained_cfg
    loaded = getattr(model, _LOADED_ATTR, None)
    if isinstance(loaded, dict):
        loaded["source"] = cfg.get("source")  # the file states where its weights come from
    return model


def save_pretrained(model: nn.Module, path: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + a ``README.md`` model card into a folder, or one
    ``.safetensors`` file.

    The weights file is the single source of truth: its metadata holds the config, and ``from_pretrained``
    reads only it. ``config.json`` (a copy for people and tools that look for one) and the model card
    (:func:`zoo.model_card.model_card`; ``repo_id`` names the Hub repository in its usage line) are written after
    the weights; each file is written to a temporary name and renamed, so a reader sees either the old or the new
    weights, never a mix, even when a save is killed between the files (``config.json`` and the card then lag
    behind until the next save).

    Args:
        model: the zoo model to save (its ``hparams`` become the config).
        path: a folder, or a file ending in ``.safetensors``.
        repo_id: the Hub repository named in the model card's usage line; None for none.
    """
    from zoo.model_card import model_card

    path = Path(path)
    config = model_config(model)
    meta = {_META_CONFIG: json.dumps(config)}
    state_dict = model.state_dict()
    if path.suffix == ".safetensors":
        return save_safetensors(state_dict, path, meta)
    save_safetensors(state_dict, path / WEIGHTS_NAME, meta)
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    card = model_card(model, config, repo_id=repo_id)
    atomic_write(path / CARD_NAME, lambda tmp: Path(tmp).write_text(card))
    return path


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload zoo model",
    create_pr: bool = False,
) -> Any:
    """Upload ``model`` to the Hugging Face Hub repository ``repo_id`` (created when missing) in
    ``save_pretrained``'s layout (``model.safetensors``, ``config.json``, ``README.md``), through
    ``huggingface_hub`` (its token: ``token``, ``HF_TOKEN`` or ``huggingface-cli login``). Returns the commit
    information; ``zoo.from_pretrained(f"hf-hub:{repo_id}")`` and builders' ``weights="hf-hub:..."`` read it back.

    Args:
        model: the zoo model to upload.
        repo_id: the Hub repository, ``"namespace/name"``.
        private: whether a newly created repository is private (None: the Hub's default).
        token: the Hub token; None for ``HF_TOKEN`` or the stored login.
        revision: the branch to commit to; None for the default branch.
        commit_message: the commit's message.
        create_pr: whether to open a pull request instead of committing to the branch.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ZooError(
            f"repo_id must be 'namespace/name' (a Hub user or organisation and a repository name), got {repo_id!r}"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="zoo-push-") as folder:
        save_pretrained(model, folder, repo_id=repo_id)
        api.create_repo(repo_id=repo_id, private=private, repo_type="model", exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )


def _config_from_metadata(meta: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    """The zoo config of a ``.safetensors`` file's metadata, checked in form; None when there is none."""
    if _META_CONFIG not in meta:
        return None
    try:
        config = json.loads(meta[_META_CONFIG])
    except json.JSONDecodeError as e:
        raise ZooError(
            f"{path}: metadata {_META_CONFIG!r} is not JSON ({e}); the file is damaged or not zoo's"
        ) from None
    if not isinstance(config, dict):
        raise ZooError(f"{path}: metadata {_META_CONFIG!r} must be a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("class_path"), str):
        raise ZooError(f"{path}: metadata {_META_CONFIG!r} lacks 'class_path' (the zoo model class it holds)")
    init_args = config.setdefault("init_args", {})
    if not isinstance(init_args, dict):
        raise ZooError(f"{path}: 'init_args' of {_META_CONFIG!r} must be a JSON object, got {type(init_args).__name__}")
    return config


# init_args a file may not set: they would make the constructor read or fetch something else
_FORBIDDEN_INIT_ARGS = ("weights",)
# no architecture hyperparameter of a zoo model is larger than this unless the file's weights are: a bound that
# keeps a crafted config from building millions of modules on the meta device before the shape check
_MAX_INIT_INT = 1 << 16


@functools.cache
def _init_parser(cls: type) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, fail_untyped=False)
    return parser


def drop_legacy_training_args(cls: type, init_args: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``init_args`` without the training settings an earlier version saved as model arguments (``lr``,
    ``optimizer: "sgd"`` ...), which ``cls`` no longer takes; one info line names what was dropped.

    Args:
        cls: the model class the arguments are for.
        init_args: the constructor arguments read from a file.
        source: where the arguments come from, named in the info line.
    """
    from jsonargparse._parameter_resolvers import get_signature_parameters

    accepted = {p.name for p in get_signature_parameters(cls, None, logger=False)}
    from zoo.tasks.optim import is_legacy_training_arg

    dropped = sorted(k for k, v in init_args.items() if is_legacy_training_arg(k, v, accepted))
    if not dropped:
        return dict(init_args)
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(
        f"zoo: {source} was saved with training settings as model arguments ({', '.join(dropped)}); "
        "they are not part of the model and were dropped (give optimizer= / lr_scheduler= to train)"
    )
    return {k: v for k, v in init_args.items() if k not in dropped}


def check_init_args(cls: type, init_args: Mapping[str, Any], source: str, max_int: int | None = None) -> None:
    """Check a file's constructor arguments against ``cls``'s signature and types (jsonargparse, as LightningCLI
    does) before anything is built; one ZooError naming the key and the reason.

    Args:
        cls: the model class the arguments are for.
        init_args: the constructor arguments read from a file.
        source: where the arguments come from, named in messages.
        max_int: the largest integer any argument (or entry of a list or dict argument) may hold; None for no bound.
    """
    for key in init_args:
        if not isinstance(key, str):
            raise ZooError(f"{source}: init_args key {key!r} is not a string")
        if key in _FORBIDDEN_INIT_ARGS:
            raise ZooError(f"{source}: init_args may not set {key!r} (a file cannot make the model load other files)")
    if max_int is not None:
        for key, value in init_args.items():
            for n in _ints(value):
                if n > max_int:
                    raise ZooError(
                        f"{source}: init_args {key}={value!r} is larger than the file's weights can hold "
                        f"(at most {max_int}); the file is damaged or crafted"
                    )
    from jsonargparse import ArgumentError

    try:
        _init_parser(cls).parse_object(dict(init_args), defaults=False)
    except (ArgumentError, TypeError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ZooError(f"{source}: init_args do not fit {cls.__name__}: {' '.join(lines[:2])}") from None


def _ints(value: Any) -> Iterator[int]:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _ints(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _ints(v)


def build_checked(
    cls: type,
    init_args: Mapping[str, Any],
    specs: TensorSpecs,
    source: str,
    source_hparams: Mapping[str, Any] | None = None,
    max_extra_bytes: int = 1 << 28,
) -> nn.Module:
    """``cls(**init_args)``, after building it on the meta device and checking its state dict against the
    file's tensor shapes and dtypes (``specs``): a config that does not match its weights is refused before any
    memory is allocated. Tensors the file does not hold (non-persistent buffers) may add ``max_extra_bytes``.

    Args:
        cls: the model class to build.
        init_args: its constructor arguments.
        specs: the ``(shape, dtype)`` of every tensor of the file, by name (:func:`safetensors_header`).
        source: where the file comes from, named in messages.
        source_hparams: the hyperparameters the weights were saved with (see :func:`load_state_dict`).
        max_extra_bytes: how many more bytes of tensors the model may hold than the file.
    """
    try:
        with torch.device("meta"):
            skeleton = cls(**init_args)
    except ZooError as e:
        raise ZooError(f"{source}: {e}") from None
    except Exception as e:
        raise ZooError(f"{source}: the config does not build a {cls.__name__} ({type(e).__name__}: {e})") from None
    fake = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in specs.items()}
    fit_state_dict(skeleton, fake, source_hparams, strict=True, source=source)
    file_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
    model_bytes = sum(t.numel() * t.element_size() for t in _unique_tensors(skeleton))
    if model_bytes > file_bytes + max_extra_bytes:
        raise ZooError(
            f"{source}: the config builds {model_bytes / 2**20:.0f} MiB of tensors but the file holds "
            f"{file_bytes / 2**20:.0f} MiB; refusing to allocate for a config that does not match its weights"
        )
    del skeleton, fake
    return cls(**init_args)


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _resolve_source(src: str | os.PathLike) -> Path:
    spec = str(src)
    repo = _hf_hub_repo(spec)
    if repo is not None:
        return _hf_hub_file(repo, WEIGHTS_NAME)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise ZooError(
            f"no pretrained model at {spec}: expected a save_pretrained folder, a .safetensors file, a Lightning "
            ".ckpt or 'hf-hub:org/name'"
        )
    return path


def from_pretrained(src: str | os.PathLike, cls: type | None = None, **overrides: Any) -> nn.Module:
    """Rebuild a model saved by ``save_pretrained`` (folder, ``.safetensors`` or ``hf-hub:``) or a Lightning
    ``.ckpt`` of a zoo model.

    Nothing a file says is imported or called: its class path must name a registered zoo model class, its
    constructor arguments are checked against that class's signature and types, and the architecture is built
    on the meta device and checked against the file's tensor shapes and dtypes before memory is allocated.
    Keyword arguments override the file's constructor arguments. The ``pretrained_cfg`` the file records (its
    transforms, architecture, tag, source) is checked (:func:`check_pretrained_cfg`) and becomes the model's
    (:func:`restore_pretrained_cfg`); a file saved before zoo recorded it gives the class's own, as before.

    The model comes back in evaluation mode (``model.eval()``: dropout off, BatchNorm on its running statistics), as
    Hugging Face's ``from_pretrained`` returns it; call ``model.train()`` to train it outside a Lightning ``Trainer``
    (whose ``fit`` sets training mode itself).

    Args:
        src: a ``save_pretrained`` folder, a ``.safetensors`` file, ``"hf-hub:org/name"`` or a Lightning ``.ckpt``.
        cls: the class the model must be (a subclass of); needed for a checkpoint that does not name its class.
        **overrides: constructor arguments that replace the file's.
    """
    with checkpoint_reads():  # the file is read once
        return _from_pretrained(src, cls, overrides)


def _from_pretrained(src: str | os.PathLike, cls: type | None, overrides: Mapping[str, Any]) -> nn.Module:
    from zoo.registry import model_class

    path = _resolve_source(src)
    source = str(src)
    if path.suffix == ".safetensors":
        meta, specs = safetensors_header(path)
        config = _config_from_metadata(meta, path)
        if config is None:
            raise ZooError(
                f"{path} was not written by zoo's save_pretrained (no config in its metadata); load it "
                "into a model with zoo.load_weights(model, path) or a builder's weights="
            )
        model_cls = model_class(config["class_path"])
        init_args = config["init_args"]
        stored_cfg = config.get("pretrained_cfg")
        if stored_cfg is not None:  # files saved before zoo stored it have none: the class's own cfg, as before
            stored_cfg = check_pretrained_cfg(stored_cfg, source)
        state_dict = None
    else:
        obj = _read_checkpoint(path)
        if not (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)):
            raise ZooError(
                f"{path} is neither a save_pretrained file nor a Lightning checkpoint (no 'state_dict'); "
                "load plain weights with zoo.load_weights(model, path) or a builder's weights="
            )
        hparams = obj.get("hyper_parameters") or {}
        class_path = _checkpoint_class_path(obj)
        if class_path is None and cls is None:
            raise ZooError(
                f"{path} does not name its model class (a checkpoint written outside LightningCLI); "
                "call <Family>.from_pretrained(path), e.g. zoo.models.MomentumResNet.from_pretrained"
            )
        model_cls = model_class(class_path) if class_path is not None else cls
        init_args = _lightning_init_args(hparams)
        stored_cfg = _checkpoint_pretrained_cfg(obj, source)
        state_dict = _tensors(obj["state_dict"], path)
        specs = {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}
    if cls is not None and not issubclass(model_cls, cls):
        raise ZooError(f"{src} holds a {model_cls.__name__}, not a {cls.__name__}")
    largest = max((math.prod(shape) for shape, _ in specs.values()), default=0)
    init_args = check_recorded_init_args(model_cls, init_args, source, largest)
    # arguments added after the file was written take the value that reproduces what it was built with
    init_args = {**getattr(model_cls, "legacy_init_args", {}), **init_args}
    args = {**init_args, **overrides}
    if overrides:
        check_init_args(model_cls, args, source)
    model = build_checked(model_cls, args, specs, source, source_hparams=init_args)
    if state_dict is None:
        state_dict, _ = read_safetensors(path)
    load_state_dict(model, state_dict, source_hparams=init_args, source=source)
    if stored_cfg is not None:
        restore_pretrained_cfg(model, stored_cfg)
    return model.eval()


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` for zoo models."""

    #: constructor arguments that do not change the function trained weights compute (how backward gets its
    #: activations, the loss, dropout rates: identity in evaluation, the head: re-initialised with its own info
    #: line): a builder given zoo weights that record another value takes the caller's without a warning
    same_function_args: ClassVar[frozenset[str]] = frozenset()
    #: constructor arguments that only set the initialisation, which loaded weights replace
    init_only_args: ClassVar[frozenset[str]] = frozenset()

    def sync_hparams(self) -> None:
        """Bring ``hparams`` up to date with settings changed on the model's modules after construction, before
        they are saved (``save_pretrained``, Lightning checkpoints); a family with such settings overrides this
        (a ResNet: ``stored_blocks`` set on its stages)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning's hook: the checkpoint's ``hyper_parameters`` are brought up to date (:meth:`sync_hparams`),
        and the checkpoint names the model's registered class (LightningCLI records it, a plain ``Trainer`` does
        not), so that ``zoo.from_pretrained(ckpt)`` rebuilds a model trained either way, and holds its
        ``pretrained_cfg`` as ``save_pretrained`` does (the transforms, and the source weights where they hold),
        and torch's random generators' states (:func:`zoo.tasks.resume.save_rng_states`).

        Args:
            checkpoint: the checkpoint Lightning is writing.
        """
        from zoo.registry import model_class

        self.sync_hparams()
        cfg = stated_pretrained_cfg(self)  # type: ignore[arg-type]
        if cfg is not None:
            checkpoint[CHECKPOINT_CFG_KEY] = _jsonable_cfg(cfg)
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            hparams.update({k: v for k, v in dict(self.hparams).items() if k in hparams})  # type: ignore[attr-defined]
        cls = type(self)
        path = f"{cls.__module__}.{cls.__qualname__}"
        try:
            if model_class(path) is cls:
                checkpoint[CHECKPOINT_CLASS_KEY] = path
        except ZooError:  # a subclass that is not registered: from_pretrained needs its class given
            pass
        from zoo.tasks.resume import save_rng_states

        save_rng_states(checkpoint)  # a resumed fit draws what this one would have drawn next
        parent = getattr(super(), "on_save_checkpoint", None)
        if callable(parent):
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning's hook (``load_from_checkpoint``, a resumed fit): the ``pretrained_cfg`` the checkpoint
        records becomes the model's, checked as untrusted input; then the task's own checks; in a resumed fit,
        torch's random generators are set to the states the checkpoint holds
        (:func:`zoo.tasks.resume.restore_rng_states`).

        Args:
            checkpoint: the checkpoint Lightning is reading.
        """
        from zoo.tasks.resume import restore_rng_states

        stored = _checkpoint_pretrained_cfg(checkpoint, "the checkpoint")
        parent = getattr(super(), "on_load_checkpoint", None)
        if callable(parent):
            parent(checkpoint)
        if stored is not None:
            restore_pretrained_cfg(self, stored)  # type: ignore[arg-type]
        restore_rng_states(self, checkpoint)

    def on_train_start(self) -> None:
        """Lightning's hook: a resumed fit's training loaders get their position in the epoch from the checkpoint
        (:func:`zoo.tasks.resume.load_pending_loader_states`), then the task's own hook."""
        from zoo.tasks.resume import load_pending_loader_states

        load_pending_loader_states(self.trainer)  # type: ignore[attr-defined]
        parent = getattr(super(), "on_train_start", None)
        if callable(parent):
            parent()

    def save_pretrained(self, path: str | os.PathLike, repo_id: str | None = None) -> Path:
        """Save weights, config and model card (folder) or weights with the config (one ``.safetensors`` file)."""
        return save_pretrained(self, path, repo_id=repo_id)  # type: ignore[arg-type]

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload to the Hugging Face Hub in ``save_pretrained``'s layout (see :func:`zoo.hub.push_to_hub`)."""
        return push_to_hub(self, repo_id, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, **overrides: Any) -> nn.Module:
        """Load a model saved by ``save_pretrained`` (or a Lightning checkpoint of this family); keyword arguments
        override its config."""
        return from_pretrained(src, cls=cls, **overrides)
