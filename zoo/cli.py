"""The ``zoo`` command: LightningCLI subcommands (fit, validate, test, predict) plus ``zoo convert``.

    zoo fit --config recipes/digits_depth_scaled_resnet.yaml --trainer.max_epochs 3
    zoo convert --from torchvision:resnet50 --weights IMAGENET1K_V2 --to depth_scaled --out r50_ds/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentError
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from zoo.errors import ZooError
from zoo.hub import atomic_write

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: never half-written on disk."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not support storage_options")
        import torch

        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


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
    for e in reversed(chain):
        text = str(e)
        if text.startswith("Problem with given class_path"):
            missing = "has no attribute" in text or "No module named" in text
            hint = " (zoo's model classes are zoo.models.<Class>; see zoo.list_models())" if missing else ""
            return " ".join(text.split()) + hint
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return f"{type(error).__name__} while reading the configuration"
    details = [line[2:] for line in lines[1:] if line.startswith("- ") and "NoneType" not in line]
    return " ".join(lines[:1] + details[:1])


class ZooCLI(LightningCLI):
    """LightningCLI with atomic checkpoints, one-line configuration errors and a one-line summary of the
    final metrics."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:  # the parser is built with exit_on_error=False
            raise ZooError(_summarise_config_error(e)) from None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as e:  # jsonargparse wraps a constructor's ZooError in its own errors
            if any(isinstance(x, ZooError) for x in _exception_chain(e)):
                raise ZooError(_summarise_config_error(e)) from None
            raise

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO or strategy._checkpoint_io is None:
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

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
        outputs = self.trainer.predict_loop.predictions or []
        batches = [b for group in outputs for b in (group if isinstance(group, list) else [group])]
        count = sum(len(b) for b in batches if hasattr(b, "__len__"))
        _print_rank_zero(f"zoo: predicted {count} samples in {len(batches)} batches "
                         "(add a lightning BasePredictionWriter callback to save them)")


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


def _check_config_paths(argv: list[str]) -> None:
    """A missing recipe or checkpoint gets one line, not a usage dump or a traceback."""
    for path in _option_values(argv, "--config", "-c"):
        if not Path(path).is_file():
            recipes = Path(__file__).resolve().parent.parent / "recipes"
            hint = f"; recipes are in {recipes}" if recipes.is_dir() else ""
            raise ZooError(f"recipe {path!r} does not exist{hint}")
    for path in _option_values(argv, "--ckpt_path"):
        if path not in _CKPT_KEYWORDS and not path.startswith("registry:") and not Path(path).is_file():
            raise ZooError(f"checkpoint {path!r} does not exist: give a .ckpt file, 'last' or 'best'")


def run_lightning(argv: list[str], from_command_line: bool = False) -> None:
    """``zoo fit|validate|test|predict``: any LightningModule and LightningDataModule by class path.

    ``from_command_line``: ``argv`` is ``sys.argv[1:]``, which LightningCLI reads itself.
    """
    _check_config_paths(argv)
    ZooCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if from_command_line else argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "zoo", "exit_on_error": False},
    )


# ------------------------------------------------------------------------------------------------
# zoo convert


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


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
            raise ZooError(f"--weights {weights!r} is not a file; for timm give a file, 'hf-hub:org/name' or 'hub' "
                           "(timm's pretrained)")

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
    parser = argparse.ArgumentParser(
        prog="zoo convert",
        description="Turn a torchvision/timm model with its weights into a zoo variant and save it.",
    )
    parser.add_argument("--from", dest="source", required=True, help="torchvision:<name> or timm:<name>")
    parser.add_argument("--weights", help="weight name (torchvision), 'hub' (timm), 'hf-hub:org/name' or a weight file")
    parser.add_argument("--to", required=True, help="target variant (see converters.list_targets())")
    parser.add_argument("--out", required=True, help="output folder (save_pretrained layout) or .safetensors file")
    parser.add_argument("--memory", help="memory strategy of the result (full, adjoint, ...)")
    parser.add_argument("--gamma", type=float, help="momentum term (momentum targets)")
    parser.add_argument("--n-iter", dest="n_iter", type=int, help="Sinkhorn half-steps (sinkhorn targets)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other option of the target, value parsed as YAML; repeatable")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {k: v for k, v in (("memory", args.memory), ("gamma", args.gamma),
                                                 ("n_iter", args.n_iter)) if v is not None}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ZooError(f"--option {item!r}: write KEY=VALUE")
        options[key.replace("-", "_")] = _parse_value(value)
    import converters
    from zoo.hub import save_pretrained

    source = _build_source(args.source, args.weights)
    model = converters.transform(source, to=args.to, **options)
    if not hasattr(model, "hparams"):
        raise ZooError(f"converting {args.source} to {args.to!r} gives a {type(model).__qualname__}, not a zoo model: "
                       "save_pretrained cannot record how to rebuild it; call converters.transform in Python")
    out = save_pretrained(model, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"zoo: wrote {out} ({type(model).__name__}, {n / 1e6:.2f}M parameters)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``zoo`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "convert":
            convert_main(argv[1:])
        else:
            run_lightning(argv, from_command_line)
    except ZooError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
