"""The ``zoo`` command: LightningCLI subcommands (fit, validate, test, predict) plus ``zoo convert`` and
``zoo recipes``.

    zoo recipes                                                   # the recipes shipped in the package
    zoo fit --config digits_depth_scaled_resnet --trainer.max_epochs 3
    zoo fit --config my_recipe.yaml                               # any file: a path that exists always wins
    zoo convert --from torchvision:resnet50 --weights IMAGENET1K_V2 --to depth_scaled --out r50_ds/
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
import types
import typing
import uuid
import warnings
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from enum import Enum
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentError
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from zoo.errors import ZooError
from zoo.hub import CHECKPOINT_CLASS_KEY, atomic_write, load_checkpoint_file
from zoo.registry import model_class
from zoo.tasks.optim import is_legacy_training_arg

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_HELP = {
    "fit": "Train (and validate) a model on a data module: zoo fit --config <recipe>.",
    "validate": "One pass over the validation split (--ckpt_path a checkpoint).",
    "test": "One pass over the test split (--ckpt_path a checkpoint).",
    "predict": "Predict on the data module's predict split; save with zoo.callbacks.PredictionWriter.",
}
# zoo's own subcommands, dispatched by main() before LightningCLI; listed in ``zoo --help`` beside Lightning's
ZOO_SUBCOMMANDS = {
    "convert": "Turn a torchvision/timm model with its weights into a zoo model and save it (zoo convert --help).",
    "recipes": "List the recipes shipped with zoo; --config takes their names (zoo recipes --help).",
}
DESCRIPTION = (
    "zoo: residual networks read as differential equations. fit/validate/test/predict are Lightning's "
    "CLI (any option of the model, data and trainer: zoo fit --config <recipe> --print_config shows "
    "them); convert and recipes are zoo's."
)
CONFIG_HELP = (
    "A recipe: a YAML/JSON file, or the name of a recipe shipped with zoo (see zoo recipes), e.g. "
    "digits_depth_scaled_resnet or nmt/numbers_sinkformer; a file that exists wins over a recipe name."
)

# ------------------------------------------------------------------------------------------------
# the shipped recipes

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
RECIPE_SUFFIXES = (".yaml", ".yml")


def list_recipes(filter: str = "") -> dict[str, Path]:
    """The recipes shipped in ``zoo/recipes``, by name (the path below that folder without ``.yaml``, e.g.
    ``digits_depth_scaled_resnet``, ``nmt/numbers_sinkformer``), sorted. ``filter``: a shell-style pattern
    (``digits_*``, ``*sinkformer*``) or, without wildcards, a substring of the name."""
    if not RECIPE_DIR.is_dir():
        return {}
    found = {
        p.relative_to(RECIPE_DIR).with_suffix("").as_posix(): p
        for p in RECIPE_DIR.rglob("*")
        if p.suffix in RECIPE_SUFFIXES and p.is_file()
    }
    if filter:
        wildcard = any(c in filter for c in "*?[")
        found = {k: v for k, v in found.items() if (fnmatch.fnmatchcase(k, filter) if wildcard else filter in k)}
    return dict(sorted(found.items()))


SUMMARY_WIDTH = 120


def recipe_summary(path: str | os.PathLike) -> str:
    """The first sentence of the leading comment of the recipe file ``path`` (its description; lines joined, cut at
    about ``SUMMARY_WIDTH`` characters), or ``""`` when the file does not start with a comment."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            if text or lines:
                break
            continue
        text = text.lstrip("#").strip()
        if not text or line.startswith("#  "):  # a blank comment line or an indented command ends the paragraph
            if lines:
                break
            continue
        lines.append(text)
    summary = " ".join(lines)
    end = re.search(r"[.!?](\s+(?=[A-Z])|$)", summary)  # a sentence ends before a capital (not "e.g. x")
    summary = summary[: end.start() + 1] if end else summary
    if len(summary) > SUMMARY_WIDTH:
        summary = summary[: SUMMARY_WIDTH - 4].rsplit(" ", 1)[0] + " ..."
    return summary


def _recipe_name(value: str) -> str:
    """``--config`` value as a recipe name: ``.yaml`` dropped, and a leading ``recipes/`` (the clone's folder,
    as the README writes it) or ``zoo/recipes/`` as well."""
    name = value.replace(os.sep, "/")
    for suffix in RECIPE_SUFFIXES:
        name = name.removesuffix(suffix)
    for prefix in ("zoo/recipes/", "recipes/"):
        name = name.removeprefix(prefix)
    return name


def resolve_config(value: str) -> str:
    """A ``--config`` value as a file path: a file that exists as given is taken as it is; otherwise a shipped
    recipe of that name (with or without ``.yaml``); otherwise one ZooError listing the close recipe names."""
    if Path(value).is_file():
        return value
    recipes = list_recipes()
    name = _recipe_name(value)
    if name in recipes:
        return str(recipes[name])
    raise _unknown_recipe(value, name, recipes)


def _unknown_recipe(value: str, name: str, recipes: Mapping[str, Path]) -> ZooError:
    """The error for a ``--config`` / ``--show`` value that is no file and no recipe, with the close names."""
    base = name.rsplit("/", 1)[-1]
    close = difflib.get_close_matches(name, recipes, n=5, cutoff=0.6)
    close += [k for k in recipes if k not in close and base and (base in k or k.rsplit("/", 1)[-1] == base)]
    close += [k for k in difflib.get_close_matches(base, recipes, n=5, cutoff=0.6) if k not in close]
    hint = (
        f"close recipe names: {', '.join(close[:6])}"
        if close
        else f"zoo recipes lists the {len(recipes)} shipped recipes"
    )
    return ZooError(
        f"{value!r} does not exist: it is neither a file nor a recipe shipped with zoo; {hint} "
        "(give a recipe name, e.g. digits_depth_scaled_resnet, or the path of a YAML file)"
    )


def recipes_main(argv: list[str]) -> None:
    """``zoo recipes``: the shipped recipes with their one-line descriptions; ``--show NAME`` prints one.
    ``argv``: the command-line arguments after ``recipes``."""
    parser = argparse.ArgumentParser(
        prog="zoo recipes",
        description="List the recipes shipped with zoo (name and the first line of its comment). Any subcommand's "
        "--config takes a name as well as a path: zoo fit --config digits_depth_scaled_resnet. A file "
        "that exists wins over a recipe of the same name. To change a recipe, copy it: "
        "zoo recipes --show NAME > my.yaml, edit, zoo fit --config my.yaml (or override single "
        "settings on the command line: --trainer.max_epochs 3).",
    )
    parser.add_argument(
        "filter",
        nargs="?",
        default="",
        help="only names matching this shell-style pattern (digits_*, *sinkformer*) or, without "
        "wildcards, holding this text",
    )
    parser.add_argument("--show", metavar="NAME", help="print the recipe NAME (its YAML) instead of the list")
    parser.add_argument("--path", metavar="NAME", help="print the file path of the recipe NAME")
    args = parser.parse_args(argv)
    if args.show or args.path:
        value = args.show or args.path
        recipes, name = list_recipes(), _recipe_name(value)
        if name not in recipes:
            raise _unknown_recipe(value, name, recipes)
        path = recipes[name]
        print(path.read_text(encoding="utf-8") if args.show else path, end="" if args.show else "\n")
        return
    recipes = list_recipes(args.filter)
    if not recipes and not list_recipes():
        raise ZooError(
            f"no recipes found in {RECIPE_DIR}: this zoo was installed without its package data; "
            "reinstall it (pip install zoo), or give --config the path of a YAML file"
        )
    if not recipes:
        raise ZooError(f"no shipped recipe matches {args.filter!r}: zoo recipes without a filter lists them all")
    width = max(len(name) for name in recipes)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_summary(path)}".rstrip())
    print(f"\nRun one: zoo fit --config <name>; show or copy one: zoo recipes --show <name>. Files: {RECIPE_DIR}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: never half-written on disk; read back
    with ``torch.load(weights_only=True)`` whatever the caller asks (nothing in a checkpoint file runs code)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not support storage_options")
        import torch

        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint at ``path`` through ``zoo.hub.load_checkpoint_file``: one clear ZooError for an empty,
        truncated or foreign file, or one that holds code. ``weights_only=False`` (``zoo validate
        --weights_only false``) is not honoured. ``map_location=None`` loads on the CPU, as Lightning's default
        ``lambda storage, loc: storage`` does; any other value is handed to ``torch.load``."""
        if not _is_local_file_protocol(path):  # s3://, gs://, http...: Lightning's fsspec reader, weights only
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if map_location is None:
            return load_checkpoint_file(path)
        import torch

        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception:
            load_checkpoint_file(path)  # raises the clear error for a bad file
            raise


def _exception_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return chain


def _summarise_config_error(error: BaseException) -> str:
    """One line out of jsonargparse's nested report: the ZooError a constructor raised, the class path
    that does not import, or the first error jsonargparse lists."""
    chain = _exception_chain(error)
    for e in chain:
        if isinstance(e, ZooError):
            return str(e)
    for e in chain:
        hint = _no_optimizer_class_hint(str(e))
        if hint:
            return hint
    for e in reversed(chain):
        text = str(e)
        if text.startswith("Problem with given class_path"):
            missing = "has no attribute" in text or "No module named" in text
            hint = " (zoo's model classes are zoo.models.<Class>; see zoo.list_models())" if missing else ""
            return " ".join(text.split()) + hint
    text = str(error)
    key = re.search(r'Parser key "([\w.]+)"', text)
    if key and "key='class_path', val=None" in text:  # --model.class_path null / class_path: null in a file
        what = "a zoo model class (zoo.models.<Class>; see zoo.list_models())" if key.group(1) == "model" else "a class"
        return f"{key.group(1)}: class_path is null: give {what}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"{type(error).__name__} while reading the configuration"
    # jsonargparse lists why each member of a union refused the value; "Expected a <class 'NoneType'>" is the
    # optional's None member, never the reason
    details = [line[2:] for line in lines[1:] if line.startswith("- ") and not line.startswith("- Expected a <class")]
    return " ".join(lines[:1] + details[:1])


def _no_optimizer_class_hint(text: str) -> str | None:
    """For ``--model.init_args.optimizer.lr 0.05`` on a configuration whose optimizer is null (the family's
    ``default_optimizer``): jsonargparse has no class to give the argument to and reports it against the abstract
    ``torch.optim.Optimizer``; the line says to name the class first. None for any other error.

    Args:
        text: one error of the chain jsonargparse raised.
    """
    found = re.search(
        r"Option '(\w+)' is not accepted\. Got value: Namespace\(class_path='torch\.optim\.Optimizer'", text
    )
    if not found or 'Parser key "optimizer"' not in text:
        return None
    arg = found.group(1)
    return (
        f"optimizer.{arg}: this configuration names no optimizer class (optimizer: null, the family's "
        f"default_optimizer), so nothing takes {arg}: name the class first, e.g. --model.init_args.optimizer SGD "
        f"--model.init_args.optimizer.{arg} <value> (or LightningCLI's --optimizer SGD --optimizer.{arg} <value>)"
    )


def _union_member_error(error: BaseException) -> str | None:
    """The constructor's message out of jsonargparse's "Does not validate against any of the Union subtypes" (an
    argument typed ``str | Strategy`` ..., whose class raised while being built: jsonargparse keeps only the text
    of that error); None for any other error."""
    for e in _exception_chain(error):
        text = str(e)
        if "Does not validate against any of the Union subtypes" not in text or "Errors:" not in text:
            continue
        listed: list[list[str]] = []
        for line in text.split("Errors:", 1)[1].splitlines():
            if line.strip().startswith("- "):
                listed.append([line.strip()[2:]])
            elif listed and line.strip():  # a reason on several lines: "Problem with given class_path 'X':" and why
                listed[-1].append(line.strip())
        reasons = [" ".join(r) for r in listed if not r[0].startswith("Expected a ")]
        if reasons:
            return reasons[0]
    return None


_PLAIN_LEAF_TYPES = (bool, int, float, str, type(None))
_PLAIN_CONTAINERS = (list, tuple, dict, set, frozenset, Sequence, Mapping, AbstractSet, typing.Union, types.UnionType)


def _is_plain_type(annotation: Any) -> bool:
    """Whether jsonargparse reads values of this type without importing anything: numbers, strings, enums and
    literals, in unions and containers. ``Any``, an untyped argument or a class type may take a class path
    (``{"class_path": "some.module.Class"}`` or just ``"some.module.Class"``) that jsonargparse imports."""
    if annotation in _PLAIN_LEAF_TYPES or (isinstance(annotation, type) and issubclass(annotation, Enum)):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return True
    if origin in _PLAIN_CONTAINERS:
        return all(a is Ellipsis or _is_plain_type(a) for a in typing.get_args(annotation))
    return False


def _is_plain_value(value: Any) -> bool:
    """Numbers, strings and None in lists, tuples and string-keyed dicts."""
    if isinstance(value, _PLAIN_LEAF_TYPES):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain_value(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain_value(v) for k, v in value.items())
    return False


def _checkpoint_model(path: str, hparams: Mapping[str, Any], chosen: str | None) -> tuple[str, dict[str, Any]]:
    """``(class_path, init_args)`` for the model a checkpoint's hyperparameters describe, checked before
    jsonargparse sees them: the class is a registered zoo class (resolved by the registry, never imported by
    the name in the file) or exactly the class ``chosen`` on the command line / in the recipe (already
    imported at the user's word); every argument is a named, plainly typed argument of its signature with
    plain data (jsonargparse then checks the values against the types)."""
    from jsonargparse._parameter_resolvers import get_signature_parameters

    init_args = dict(hparams)
    init_args.pop("_instantiator", None)  # Lightning's: a function named by the file, never used here
    # the checkpoint's weights are its state_dict: a file never makes the model read another file or the network
    init_args.pop("weights", None)
    name = init_args.pop("_class_path", chosen)
    if name is None:
        raise ZooError(f"{path} does not say which model it holds: give --model (e.g. zoo.models.ResNet)")
    try:
        cls = model_class(name)
    except ZooError as e:
        if name != chosen:
            also = f", or the model given with --model ({chosen})" if chosen else ""
            raise ZooError(f"checkpoint {path}: {e}{also}") from None
        module, _, attr = chosen.rpartition(".")
        cls = getattr(importlib.import_module(module), attr)  # the user's own class, named on the command line
        class_path = chosen
    else:
        try:  # the recipe's spelling of the same class keeps the recipe's init_args in place
            same = chosen is not None and model_class(chosen) is cls
        except ZooError:
            same = False
        class_path = chosen if same else f"{cls.__module__}.{cls.__qualname__}"
    params = {p.name: p.annotation for p in get_signature_parameters(cls, None, logger=False)}
    for key in [k for k, v in init_args.items() if is_legacy_training_arg(k, v, params)]:
        del init_args[key]  # a training setting saved as a model argument before they were injected
    for key, value in init_args.items():
        if key not in params:
            raise ZooError(
                f"checkpoint {path} sets {key!r}, which is not an argument of {cls.__name__}: the file "
                f"was written for another model; give the matching --model"
            )
        if not _is_plain_type(params[key]) or not _is_plain_value(value):
            raise ZooError(
                f"checkpoint {path} sets {key!r} of {cls.__name__} (type {params[key]}) to "
                f"{type(value).__name__} data that could name code to import; a checkpoint may only "
                f"hold numbers, strings and lists of them: give {key} on the command line instead"
            )
    return class_path, init_args


def _missing_config_hint(error: BaseException, args: Any) -> str:
    """For a run without ``--config`` that lacks its model or data: the hint to give one, naming the ``config.yaml``
    that ``zoo fit`` saved beside a ``--ckpt_path`` checkpoint (``version_N/config.yaml`` for
    ``version_N/checkpoints/*.ckpt``) when there is one; ``""`` otherwise.

    Args:
        error: the parser's error.
        args: the command-line arguments LightningCLI parsed (None: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if args is None else args) if isinstance(args, (list, tuple, type(None))) else []
    if "arguments are required" not in str(error) or _option_values(argv, "--config", "-c"):
        return ""
    for path in _option_values(argv, "--ckpt_path"):
        config = Path(path).resolve().parent.parent / "config.yaml"
        if config.is_file():
            return f"; give --config {config} (the configuration zoo fit saved with this checkpoint)"
    return "; give --config <recipe> (zoo recipes lists them) or the config.yaml zoo fit saved"


def _trainer_error(error: BaseException, subcommand: str | None) -> str:
    """Lightning's configuration error in one line, with where to change it."""
    text = " ".join(str(error).split()) or type(error).__name__
    return (
        f"{text} (a trainer setting: change it with --trainer.<option> or in the recipe's trainer: section; "
        f"zoo {subcommand or 'fit'} --print_config shows them all)"
    )


class ZooCLI(LightningCLI):
    """LightningCLI with atomic checkpoints read without running code, one-line configuration errors and a
    one-line summary of the final metrics; its help lists zoo's own subcommands (convert, recipes)."""

    def init_parser(self, **kwargs: Any) -> Any:
        parser = super().init_parser(**kwargs)
        parser._option_string_actions["--config"].help = CONFIG_HELP
        return parser

    def add_core_arguments_to_parser(self, parser: Any) -> None:
        """Lightning's trainer, model and data arguments, with ``data`` before ``model``: the classes are
        instantiated in that order, so a missing dataset is reported before a model builder fetches weights."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        required = self.datamodule_class is not None  # Lightning's rule: optional when none was given
        parser.add_lightning_class_args(
            self._datamodule_class, "data", subclass_mode=self.subclass_mode_data, required=required
        )
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)

    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        """Lightning's subcommands, then zoo's (``main`` runs those before LightningCLI: listed for ``--help``)."""
        super()._add_subcommands(parser, **kwargs)
        from jsonargparse import ArgumentParser

        action = parser._subcommands_action
        for choice in getattr(action, "_choices_actions", []):  # Lightning's first docstring lines end mid-sentence
            choice.help = LIGHTNING_HELP.get(choice.dest, choice.help)
        for name, text in ZOO_SUBCOMMANDS.items():
            action.add_subcommand(name, ArgumentParser(prog=f"zoo {name}", description=text), help=text)

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``: the checkpoint's hyperparameters update the model's configuration (Lightning's
        behaviour), read safely. Lightning hands the file's ``_class_path`` and hyperparameters straight to
        jsonargparse, which imports the module a crafted file names; here the file is read by
        ``zoo.hub.load_checkpoint_file`` and checked by ``_checkpoint_model`` first."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        path = self.config[subcommand].get("ckpt_path")
        if not path or not Path(path).is_file():  # "last", "best", "registry:...": Lightning finds the file
            return
        checkpoint = load_checkpoint_file(path, mmap=True)  # its hyperparameters only: the tensors stay unread
        if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
            raise ZooError(
                f"{path} is not a Lightning checkpoint (it has no 'state_dict'): --ckpt_path takes a "
                ".ckpt written by zoo fit or a Trainer; for plain weights use --model.init_args.weights "
                f"{path}"
            )
        hparams = checkpoint.get("hyper_parameters") or {}
        if not isinstance(hparams, Mapping):
            raise ZooError(
                f"{path}: 'hyper_parameters' is a {type(hparams).__name__}, not a dict; "
                "the checkpoint was not written by Lightning"
            )
        model = self.config[subcommand].get("model")
        chosen = getattr(model, "class_path", None)
        if not set(hparams) - {"_instantiator"}:
            return
        recorded = checkpoint.get(CHECKPOINT_CLASS_KEY)  # a plain Trainer's checkpoint of a zoo model names it here
        if "_class_path" not in hparams and isinstance(recorded, str):
            hparams = {**hparams, "_class_path": recorded}
        class_path, init_args = _checkpoint_model(str(path), hparams, chosen)
        update = {subcommand: {"model": {"class_path": class_path, "init_args": init_args}}}
        try:
            self.config = self.parser.parse_object(update, self.config)
        except ArgumentError as e:
            raise ZooError(
                f"the hyperparameters in checkpoint {path} do not fit {class_path}: {_summarise_config_error(e)}"
            ) from None

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:  # the parser is built with exit_on_error=False
            raise ZooError(_summarise_config_error(e) + _missing_config_hint(e, args)) from None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as e:  # jsonargparse wraps a constructor's ZooError in its own errors
            if any(isinstance(x, ZooError) for x in _exception_chain(e)):
                raise ZooError(_summarise_config_error(e)) from None
            union = _union_member_error(e)
            if union is not None:
                raise ZooError(union) from None
            raise

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as e:  # Trainer(...) refusing its arguments
            raise ZooError(_trainer_error(e, self.subcommand)) from None
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO or strategy._checkpoint_io is None:
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning's, and ``predict`` with a :class:`zoo.callbacks.PredictionWriter` does not also keep every
        prediction in memory unless ``--return_predictions true`` says so."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            from zoo.callbacks import PredictionWriter

            if any(isinstance(c, PredictionWriter) for c in self.trainer.callbacks):
                kwargs["return_predictions"] = False
        return kwargs

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """LightningCLI's ``--optimizer`` / ``--lr_scheduler`` on a zoo model replace its ``optimizer`` /
        ``lr_scheduler`` factories, as ``--model.init_args.optimizer`` / ``--model.init_args.lr_scheduler`` do: the
        model's parameter groups (no weight decay on norms, biases and ``no_weight_decay()``), its schedules bound
        to the run length (``WarmupCosineLR`` steps per optimiser step) and its ``val_loss`` monitor still apply,
        and one given alone keeps the other from the recipe. Lightning's own replacement of
        ``configure_optimizers`` (one parameter group, no schedule without ``--lr_scheduler``, ``--lr_scheduler``
        ignored without ``--optimizer``) stays for models that are not zoo's.

        Args:
            subcommand: the subcommand being run (``fit`` ...).
        """
        zoo_model = hasattr(self.model, "optimizer_factory") and hasattr(self.model, "lr_scheduler_factory")
        if not self.auto_configure_optimizers or not zoo_model:
            super()._add_configure_optimizers_method_to_model(subcommand)
            return
        optimizer_init = self._get(self.config_init, "optimizer")
        lr_scheduler_init = self._get(self.config_init, "lr_scheduler")
        if optimizer_init:
            self.model.optimizer_factory = functools.partial(_instantiate_from_config, optimizer_init)
        if lr_scheduler_init:
            self.model.lr_scheduler_factory = functools.partial(_instantiate_from_config, lr_scheduler_init)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except MisconfigurationException as e:  # found when the run starts (a strategy's or the model's set-up)
            raise ZooError(_trainer_error(e, self.subcommand)) from None

    def _report(self, stage: str) -> None:
        metrics = self.trainer.callback_metrics
        keys = [k for k in sorted(metrics) if k.startswith(stage)]
        if not keys:
            return
        text = ", ".join(f"{k} {float(metrics[k]):.4f}" for k in keys)
        if self.subcommand == "fit":  # the checkpoint that was written (best if monitored, else last)
            callback = self.trainer.checkpoint_callback
            ckpt = (getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")) or ""
        else:  # the checkpoint that was evaluated
            ckpt = self.trainer.ckpt_path or ""
        _print_rank_zero(f"zoo: {text}" + (f" (checkpoint: {ckpt})" if ckpt else ""))

    def after_fit(self) -> None:
        self._report("val")

    def after_validate(self) -> None:
        self._report("val")

    def after_test(self) -> None:
        self._report("test")

    def after_predict(self) -> None:
        from zoo.callbacks import PredictionWriter

        writers = [c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)]
        if writers:
            text = "; ".join(w.summary() for w in writers)
            _print_rank_zero(f"zoo: {text}")
            return
        outputs = self.trainer.predict_loop.predictions or []
        batches = [b for group in outputs for b in (group if isinstance(group, list) else [group])]
        count = sum(len(b) for b in batches if hasattr(b, "__len__"))
        _print_rank_zero(
            f"zoo: predicted {count} samples in {len(batches)} batches (to save them: "
            "--trainer.callbacks+=zoo.callbacks.PredictionWriter --trainer.callbacks.output preds.pt)"
        )


def _instantiate_from_config(config: Any, args: Any) -> Any:
    """The class a LightningCLI ``--optimizer`` / ``--lr_scheduler`` value names, built on ``args`` (the
    parameter groups, or the optimiser): ``config`` holds ``class_path`` and ``init_args``."""
    from lightning.pytorch.cli import instantiate_class

    return instantiate_class(args, config)


@rank_zero_only
def _print_rank_zero(text: str) -> None:
    print(text, flush=True)


def _option_values(argv: list[str], *names: str) -> list[str]:
    """Values of ``--name value`` and ``--name=value`` on the command line."""
    values = []
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif "=" in arg and arg.split("=", 1)[0] in names:
            values.append(arg.split("=", 1)[1])
    return values


# --ckpt_path values that name a checkpoint Lightning finds itself, not a file
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry", "null", "None")


def _resolve_config_paths(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config``/``-c`` value made a file path (:func:`resolve_config`: a file as given,
    else a shipped recipe's path); a missing recipe or checkpoint gets one line, not a usage dump or a traceback."""
    resolved = list(argv)
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            resolved[i + 1] = resolve_config(argv[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    for path in _option_values(argv, "--ckpt_path"):
        if path in _CKPT_KEYWORDS or path.startswith("registry:") or Path(path).is_file():
            continue
        if Path(path).is_dir() and (Path(path) / ".metadata").is_file():  # a sharded (DCP) checkpoint: FSDP2 reads it
            continue
        what = "is a folder but not a sharded checkpoint (no .metadata)" if Path(path).is_dir() else "does not exist"
        raise ZooError(
            f"checkpoint {path!r} {what}: give a .ckpt file, a sharded checkpoint folder (FSDP2's "
            "save_distributed_checkpoint), 'last' or 'best'"
        )
    return resolved


class _DropLightningTips(logging.Filter):
    """Lightning's advertisements for its cloud products ("Tip: ... litlogger / litmodels"), printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud" not in record.getMessage()


def quiet_lightning() -> None:
    """Drop the lines a ``zoo`` run prints every time that need no action: Lightning's cloud tips, its note that
    the default logger is CSV when TensorBoard is not installed (the docs say how to view either), and a
    deprecation inside Lightning's own pytree helper on this torch. Lightning's other messages stay."""
    tips = _DropLightningTips()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(tips)
    warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def run_lightning(argv: list[str], from_command_line: bool = False) -> None:
    """``zoo fit|validate|test|predict``: any LightningModule and LightningDataModule by class path.

    ``from_command_line``: ``argv`` is ``sys.argv[1:]``, which LightningCLI reads itself (a recipe name given
    to ``--config`` is replaced there by the recipe's path, so that DDP's worker processes, started again with
    ``sys.argv``, read the same file).
    """
    quiet_lightning()
    resolved = _resolve_config_paths(argv)
    if from_command_line and resolved != argv:
        sys.argv[1:] = resolved
    ZooCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if from_command_line else resolved,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "zoo", "exit_on_error": False, "description": DESCRIPTION},
    )


def load_recipe(recipe: str, *overrides: str) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The model and data module a recipe builds, for use without a Trainer (a plain PyTorch loop):

        model, data = zoo.cli.load_recipe("digits_depth_scaled_resnet", "--model.init_args.optimizer.lr=0.05")
        config = model.configure_optimizers(total_steps=N, steps_per_epoch=M)   # the recipe's optimiser

    ``recipe`` is a shipped recipe name or a YAML path; ``overrides`` are command-line options as ``zoo fit``
    takes them. The model carries the recipe's optimiser and schedule (``configure_optimizers``); the data module
    is not set up yet (call ``prepare_data()`` and ``setup("fit")``).
    """
    args = ["--config", resolve_config(recipe), *overrides]
    cli = ZooCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
        save_config_callback=None,
        parser_kwargs={"prog": "zoo", "exit_on_error": False, "description": DESCRIPTION},
    )
    return cli.model, cli.datamodule


# ------------------------------------------------------------------------------------------------
# zoo convert


def _parse_value(key: str, text: str) -> Any:
    """``--option KEY=VALUE``: the value read as YAML (numbers, lists, true/false, null; anything else a string)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ZooError(
            f"--option {key}={text!r}: not a YAML value ({problem}); write e.g. {key}=[1,2] for a list, "
            f"or quote a string: {key}='\"{text}\"'"
        ) from None


def _classifier_size(model: Any, state_dict: dict[str, Any]) -> int | None:
    """``out_features`` the weights give the model's last ``nn.Linear`` (the head), when it differs."""
    import torch.nn as nn

    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    name, head = linears[-1]
    weight = state_dict.get(f"{name}.weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] == head.out_features:
        return None
    return int(weight.shape[0])


def _build_source(spec: str, weights: str | None) -> Any:
    """``torchvision:<name>`` or ``timm:<name>``, with weights from a name or a file (any head size)."""
    library, _, name = spec.partition(":")
    if not name or library not in ("torchvision", "timm"):
        raise ZooError(f"--from {spec!r}: use torchvision:<model name> or timm:<model name>")
    # a local file, or a Hugging Face Hub repository ("hf-hub:timm/vit_small_patch16_224.augreg_in21k"), read
    # by zoo.hub and loaded into the source model
    is_file = weights is not None and (os.path.exists(weights) or weights.startswith("hf-hub:"))
    weight_file = weights if is_file else None
    if library == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ZooError(f"unknown torchvision model {name!r}: see torchvision.models.list_models()")
        named = weights if weights is not None and weight_file is None else None

        def build(**kwargs: Any) -> Any:
            try:
                return torchvision.models.get_model(name, weights=named, **kwargs)
            except (ValueError, KeyError) as e:
                raise ZooError(f"torchvision weights {weights!r} for {name}: {e}") from None
            except OSError as e:
                raise ZooError(f"cannot fetch torchvision weights {weights!r} for {name} ({e})") from None
    else:
        import timm

        if not timm.is_model(name):
            raise ZooError(f"unknown timm model {name!r}: see timm.list_models()")
        pretrained = weights is not None and weight_file is None
        if pretrained and weights not in ("hub", "pretrained"):
            raise ZooError(
                f"--weights {weights!r} is not a file; for timm give a file, 'hf-hub:org/name' or 'hub' "
                "(timm's pretrained)"
            )

        def build(**kwargs: Any) -> Any:
            try:
                return timm.create_model(name, pretrained=pretrained, **kwargs)
            except Exception as e:  # hub download errors come in many types
                raise ZooError(f"cannot create timm model {name} with pretrained weights ({e})") from None

    model = build()
    if weight_file is not None:
        from zoo.hub import check_state_dict, read_weights

        state_dict, _ = read_weights(weight_file)
        num_classes = _classifier_size(model, state_dict)
        if num_classes is not None:  # fine-tuned weights with another head: build the source to fit
            model = build(num_classes=num_classes)
        check_state_dict(model, state_dict, source=f"{weight_file} for {spec}")
        model.load_state_dict(state_dict)
    return model.eval()


def convert_main(argv: list[str]) -> None:
    """``zoo convert``: build a torchvision / timm model with its weights, convert it with
    :func:`converters.transform` and save the result (``--out``: a folder or a ``.safetensors`` file) atomically.
    ``argv``: the command-line arguments after ``convert``."""
    parser = argparse.ArgumentParser(
        prog="zoo convert",
        description="Turn a torchvision/timm model with its weights into a zoo variant and save it "
        "(save_pretrained layout: zoo.from_pretrained reads it back).",
    )
    parser.add_argument("--from", dest="source", required=True, help="torchvision:<name> or timm:<name>")
    parser.add_argument(
        "--weights",
        help="required: a weight name (torchvision, e.g. IMAGENET1K_V2), 'hub' (timm's "
        "pretrained), 'hf-hub:org/name', a weight file, or 'none' for a randomly "
        "initialised model (a file named none: ./none)",
    )
    parser.add_argument("--to", required=True, help="target variant (see converters.list_targets())")
    parser.add_argument("--out", required=True, help="output folder (save_pretrained layout) or .safetensors file")
    parser.add_argument("--memory", help="memory strategy of the result (full, adjoint, ...)")
    parser.add_argument("--gamma", type=float, help="momentum term (momentum targets)")
    parser.add_argument("--n-iter", dest="n_iter", type=int, help="Sinkhorn half-steps (sinkhorn targets)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other option of the target, value parsed as YAML; repeatable",
    )
    args = parser.parse_args(argv)
    if args.weights is None:
        raise ZooError(
            "zoo convert needs --weights: give the source's weights (a torchvision weight name such as "
            "IMAGENET1K_V2, 'hub' for timm's pretrained, 'hf-hub:org/name' or a weight file), or "
            "--weights none to convert a randomly initialised model on purpose"
        )
    weights = None if args.weights.lower() == "none" else args.weights
    options: dict[str, Any] = {
        k: v for k, v in (("memory", args.memory), ("gamma", args.gamma), ("n_iter", args.n_iter)) if v is not None
    }
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ZooError(f"--option {item!r}: write KEY=VALUE")
        options[key.replace("-", "_")] = _parse_value(key, value)
    import converters
    from zoo.hub import save_pretrained

    source = _build_source(args.source, weights)
    model = converters.transform(source, to=args.to, **options)
    if not hasattr(model, "hparams"):
        raise ZooError(
            f"converting {args.source} to {args.to!r} gives a {type(model).__qualname__}, not a zoo model: "
            "save_pretrained cannot record how to rebuild it; call converters.transform in Python"
        )
    out = save_pretrained(model, args.out)
    n = sum(p.numel() for p in model.parameters())
    random = ", randomly initialised: --weights none" if weights is None else ""
    print(f"zoo: wrote {out} ({type(model).__name__}, {n / 1e6:.2f}M parameters{random})")


# ------------------------------------------------------------------------------------------------
# one error line per machine under a distributed launch

# the id of one launch, set by the process that starts it (LOCAL_RANK not yet set): Lightning's launcher
# (_SubprocessScriptLauncher) copies the environment into the processes it starts, so they all share it
LAUNCH_ID_ENV = "ZOO_LAUNCH_ID"
# what a launcher tells each process; read when main() starts as well, because Lightning deletes WORLD_SIZE when
# its run ends (LightningEnvironment.teardown), before main() reports the error
LAUNCH_VARS = ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
# the processes of one launch on one machine record the error lines they printed here (the temp folder)
ERROR_RECORD_PREFIX = "zoo-error-lines-"
ERROR_RECORD_MAX_AGE_S = 24 * 3600  # a record left behind (a process of the launch never failed) is removed then
ERROR_RECORD_LOCK_S = 10.0  # how long a failing process waits for the record before printing as if alone


def _process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks after boot, field 22 of ``/proc/<pid>/stat``): with the pid it
    names one process (a pid is reused, not with the same start); ``""`` where ``/proc`` is not readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (command)", which may hold spaces
    return fields[19] if len(fields) > 19 else ""


def _launch_key(launch: Mapping[str, str]) -> str | None:
    """What the processes of one distributed launch on this machine share and no later launch has, or None outside
    a launch (no ``LOCAL_RANK``; under a launcher other than Lightning's, no ``WORLD_SIZE``).

    Under Lightning's launcher: :data:`LAUNCH_ID_ENV`, made by the first process (the command itself, the parent
    of the others) and inherited by the others; it starts with that process's pid, so a value left over in a
    shell's environment is not taken. Under torchrun (and other launchers that start every process): the
    launcher's pid and start time (the parent of all of them), with the run id and restart count torchrun sets
    (a restart starts new processes under the same launcher), the rendezvous address and SLURM's job step.

    Args:
        launch: the :data:`LAUNCH_VARS` this process was given.
    """
    if not launch.get("LOCAL_RANK"):
        return None
    launch_id = os.environ.get(LAUNCH_ID_ENV, "")
    if launch_id.split("-", 1)[0] in (str(os.getpid()), str(os.getppid())):
        return f"zoo {launch_id} {socket.gethostname()}"
    if not launch.get("WORLD_SIZE"):
        return None
    parent = os.getppid()
    names = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID")
    return " ".join(
        ["launcher", str(parent), _process_start(parent), socket.gethostname()]
        + [f"{name}={os.environ.get(name, '')}" for name in (*names, "SLURM_STEP_ID")]
    )


def _first_to_meet(message: str, key: str, processes: int | None = None) -> bool:
    """Whether this process is the first of the launch ``key`` on this machine to meet the error ``message``.

    Each failing process appends a JSON line ``[processes, message]`` to a file in the temp folder named after
    ``key`` (one per user and launch), under an exclusive lock (``fcntl.flock``), and is first when no line holds
    the message yet. The file holds one line per failed process; the last process of the machine to fail (as many
    lines as the largest ``processes`` any line gives) removes it; a record older than a day is removed by the next
    failing run. Raises ImportError without ``fcntl`` (not Linux or macOS), OSError when the file cannot be used,
    TimeoutError when the lock is held for longer than :data:`ERROR_RECORD_LOCK_S`.

    Args:
        message: the error's message, as printed.
        key: the launch (:func:`_launch_key`).
        processes: how many processes the launch has on this machine (None: not known here).
    """
    import fcntl

    folder = Path(tempfile.gettempdir())
    user = str(os.getuid()) if hasattr(os, "getuid") else ""
    prefix = f"{ERROR_RECORD_PREFIX}{user}-"
    path = folder / (prefix + hashlib.sha256(key.encode()).hexdigest()[:24])
    for stale in folder.glob(prefix + "*"):
        try:
            if stale != path and time.time() - stale.stat().st_mtime > ERROR_RECORD_MAX_AGE_S:
                stale.unlink()
        except OSError:
            pass
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)  # not through a planted link
    with open(os.open(path, flags, 0o600), "r+", encoding="utf-8") as record:
        deadline = time.monotonic() + ERROR_RECORD_LOCK_S
        while True:
            try:
                fcntl.flock(record.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} stayed locked") from None
                time.sleep(0.01)
        record.seek(0)
        lines = []
        for line in record.read().splitlines():
            try:
                size, text = json.loads(line)
            except (ValueError, TypeError):  # not written by this function: count it, match nothing
                size, text = None, None
            lines.append((size if isinstance(size, int) else None, text))
        record.write(json.dumps([processes, message]) + "\n")
        record.flush()
        sizes = [size for size, _ in lines if size is not None] + ([processes] if processes is not None else [])
        if sizes and len(lines) + 1 >= max(sizes):  # every process of this machine failed: none reads it again
            path.unlink(missing_ok=True)
    return all(text != message for _, text in lines)


def _print_error(message: str, started: Mapping[str, str]) -> None:
    """Print ``zoo: error: <message>`` to stderr, once per machine under a distributed launch.

    Under DDP every process usually meets the same error (each parses the same options and sets up the same data):
    that line comes once per machine, so that an error only one machine meets (its data folder missing) is still
    shown. An error only some processes meet (one rank's data shard, one device) is printed by the process that
    meets it: each distinct message once per machine, by the first process that meets it. The processes cannot ask
    each other (torch.distributed may not be set up yet, or hang after an error): they share a small file in the
    machine's temp folder named after the launch (:func:`_first_to_meet`). Where that file cannot be used, only the
    machine's first process (LOCAL_RANK 0, as Lightning's launchers and torchrun set it) prints; outside a launch
    (no LOCAL_RANK) the process prints.

    Args:
        message: the error's message.
        started: the :data:`LAUNCH_VARS` the process had when it started (Lightning deletes ``WORLD_SIZE``
            before an error gets here).
    """
    launch = {**started, **{name: os.environ[name] for name in LAUNCH_VARS if name in os.environ}}
    first = launch.get("LOCAL_RANK", "0") in ("", "0")
    key = _launch_key(launch)
    if key is not None:
        size = launch.get("LOCAL_WORLD_SIZE") or launch.get("WORLD_SIZE", "")
        try:
            first = _first_to_meet(message, key, int(size) if size.isdigit() else None)
        except (ImportError, OSError, TimeoutError):
            pass
    if first:
        print(f"zoo: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``zoo`` console script; ``argv``: its arguments (None: ``sys.argv[1:]``)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    started = {name: os.environ[name] for name in LAUNCH_VARS if name in os.environ}
    # a process no launcher started (no LOCAL_RANK) may start a launch: the processes Lightning's DDP launcher starts
    # from here inherit its id, with which they share their record of the error lines printed (see _launch_key)
    starts_launch = "LOCAL_RANK" not in os.environ
    previous_launch = os.environ.get(LAUNCH_ID_ENV)
    if starts_launch:
        os.environ[LAUNCH_ID_ENV] = f"{os.getpid()}-{uuid.uuid4().hex}"
    try:
        if argv and argv[0] == "convert":
            convert_main(argv[1:])
        elif argv and argv[0] == "recipes":
            recipes_main(argv[1:])
        else:
            run_lightning(argv, from_command_line)
    except ZooError as e:
        # under DDP the line comes once per machine for each distinct error, from the first process that meets it
        # (see _print_error); every process exits with 2, so that the launcher sees the failure
        _print_error(str(e), started)
        raise SystemExit(2) from None
    except BrokenPipeError:
        # the reader of stdout left (zoo recipes | head): nothing more to say; stdout goes to devnull so that the
        # interpreter's final flush does not raise again (the recipe of Python's signal documentation)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    finally:
        if starts_launch:  # main() called from Python: leave the caller's environment as it was
            if previous_launch is None:
                os.environ.pop(LAUNCH_ID_ENV, None)
            else:
                os.environ[LAUNCH_ID_ENV] = previous_launch


if __name__ == "__main__":
    main()
