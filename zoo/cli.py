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


class ZooCLI(LightningCLI):
    """LightningCLI with atomic checkpoints and a one-line summary of the final metrics."""

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
        ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "") if stage == "val" else ""
        _print_rank_zero(f"zoo: {text}" + (f" (checkpoint: {ckpt})" if ckpt else ""))

    def after_fit(self) -> None:
        self._report("val")

    def after_validate(self) -> None:
        self._report("val")

    def after_test(self) -> None:
        self._report("test")


@rank_zero_only
def _print_rank_zero(text: str) -> None:
    print(text, flush=True)


def _check_config_paths(argv: list[str]) -> None:
    """A missing recipe gets one line, not jsonargparse's usage dump."""
    for i, arg in enumerate(argv):
        path = None
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is not None and not Path(path).is_file():
            recipes = Path(__file__).resolve().parent.parent / "recipes"
            hint = f"; recipes are in {recipes}" if recipes.is_dir() else ""
            raise ZooError(f"recipe {path!r} does not exist{hint}")


def run_lightning(argv: list[str]) -> None:
    """``zoo fit|validate|test|predict``: any LightningModule and LightningDataModule by class path."""
    _check_config_paths(argv)
    ZooCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "zoo"},
    )


# ------------------------------------------------------------------------------------------------
# zoo convert


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _build_source(spec: str, weights: str | None) -> Any:
    """``torchvision:<name>`` or ``timm:<name>``, with weights from a name or a file."""
    library, _, name = spec.partition(":")
    if not name or library not in ("torchvision", "timm"):
        raise ZooError(f"--from {spec!r}: use torchvision:<model name> or timm:<model name>")
    weight_file = weights if weights is not None and os.path.exists(weights) else None
    if library == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ZooError(f"unknown torchvision model {name!r}: see torchvision.models.list_models()")
        named = weights if weights is not None and weight_file is None else None
        try:
            model = torchvision.models.get_model(name, weights=named)
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
            raise ZooError(f"--weights {weights!r} is not a file; for timm give a file or 'hub' (timm's pretrained)")
        try:
            model = timm.create_model(name, pretrained=pretrained)
        except Exception as e:  # hub download errors come in many types
            raise ZooError(f"cannot create timm model {name} with pretrained weights ({e})") from None
    if weight_file is not None:
        from zoo.hub import read_weights

        state_dict, _ = read_weights(weight_file)
        result = model.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ZooError(
                f"{weight_file} does not fit {spec}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
    return model.eval()


def convert_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="zoo convert",
        description="Turn a torchvision/timm model with its weights into a zoo variant and save it.",
    )
    parser.add_argument("--from", dest="source", required=True, help="torchvision:<name> or timm:<name>")
    parser.add_argument("--weights", help="weight name (torchvision), 'hub' (timm) or a weight file")
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
    out = save_pretrained(model, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"zoo: wrote {out} ({type(model).__name__}, {n / 1e6:.2f}M parameters)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``zoo`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "convert":
            convert_main(argv[1:])
        else:
            run_lightning(argv)
    except ZooError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
