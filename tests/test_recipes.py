"""Every recipe shipped in zoo/recipes/*.yaml parses (``zoo fit --config <recipe> --print_config``) and builds
its model, data module and trainer with exactly the settings the YAML gives (nothing is trained).

Data modules that read files at construction get a tmp root: CIFAR with ``download: true`` (the check on
disk is skipped and nothing is fetched before ``prepare_data``), image folders with empty class folders.
ImageNet weight names are served from the torch hub cache of the offline fixture (a random file put there).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchvision
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from zoo.cli import ZooCLI, list_recipes, main, resolve_config
from zoo.nn import ResidualStack

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "zoo" / "recipes"  # shipped in the package; the clone's recipes/ is a symlink to it
RECIPES = sorted(RECIPE_DIR.rglob("*.yaml"))  # recipes/*.yaml and recipes/<topic>/*.yaml (nmt/)
RULES = {"DepthScaledResNet": "euler", "HeunNet": "heun", "ResNet": "euler", "MomentumResNet": "momentum"}


def load_recipe(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def plain(value: Any) -> Any:
    """Tuples as lists, recursively, so that YAML values compare with hyperparameters."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert "digits_depth_scaled_resnet.yaml" in names
    assert len(RECIPES) >= 2
    # the clone's recipes/ (README: zoo fit --config recipes/<name>.yaml) is the package's folder
    assert (ROOT / "recipes").resolve() == RECIPE_DIR.resolve()
    assert (ROOT / "recipes" / "digits_depth_scaled_resnet.yaml").is_file()


def test_every_recipe_is_found_by_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``zoo recipes`` names (zoo.cli.list_recipes) are the files; ``--config <name>`` reads that file from any
    folder, with or without ``.yaml``."""
    monkeypatch.chdir(tmp_path)
    names = {p.relative_to(RECIPE_DIR).with_suffix("").as_posix(): p for p in RECIPES}
    assert {k: v.resolve() for k, v in list_recipes().items()} == {k: v.resolve() for k, v in names.items()}
    for name, path in names.items():
        for value in (name, f"{name}.yaml"):
            assert Path(resolve_config(value)).samefile(path)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_print_config(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe parses (nothing is instantiated) and the printed config carries the recipe's values."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    out, err = capsys.readouterr()
    assert "zoo: error" not in err
    printed = yaml.safe_load(out)
    expected = load_recipe(recipe)
    for section in ("model", "data"):
        assert printed[section]["class_path"] == expected[section]["class_path"]
        for key, value in expected[section].get("init_args", {}).items():
            got = printed[section]["init_args"][key]
            if isinstance(value, dict) and "class_path" in value:  # an injected callable: its defaults are printed
                assert got["class_path"] == value["class_path"], (section, key)
                for name, setting in value.get("init_args", {}).items():
                    assert plain(got["init_args"][name]) == plain(setting), (section, key, name)
            else:
                assert plain(got) == plain(value), (section, key)
    for key, value in expected.get("trainer", {}).items():
        if key != "callbacks":
            assert plain(printed["trainer"][key]) == plain(value), ("trainer", key)
    if "seed_everything" in expected:
        assert printed["seed_everything"] == expected["seed_everything"]
    assert list(tmp_path.iterdir()) == []  # printing the config writes nothing


TRAINING = ("optimizer", "lr_scheduler")


def check_training_settings(model: pl.LightningModule, init: dict[str, Any]) -> None:
    """The injected optimiser and schedule are the recipe's (class and settings), built as a plain PyTorch user
    would build them (``configure_optimizers(total_steps=...)``), and are not hyperparameters of the model."""
    assert not set(TRAINING) & set(model.hparams)
    config = model.configure_optimizers(total_steps=10, steps_per_epoch=5)
    opt = config["optimizer"] if isinstance(config, dict) else config
    spec = init.get("optimizer")
    if spec is not None:
        assert type(opt) is import_class(spec["class_path"])
        for name, value in spec.get("init_args", {}).items():
            assert plain(opt.defaults[name]) == plain(value), ("optimizer", name)
    if "lr_scheduler" not in init:  # omitted: the task's default, the cosine
        assert type(config["lr_scheduler"]["scheduler"]).__name__ == "WarmupCosineLR"
    elif init["lr_scheduler"] is None:  # a constant learning rate
        assert not isinstance(config, dict) or "lr_scheduler" not in config
    else:
        sched = config["lr_scheduler"]["scheduler"]
        assert type(sched) is import_class(init["lr_scheduler"]["class_path"])
        for name, value in init["lr_scheduler"].get("init_args", {}).items():
            got = getattr(sched, name)
            got = sorted(got.elements()) if name == "milestones" else got  # MultiStepLR keeps a Counter
            assert plain(got) == plain(value), ("lr_scheduler", name)


def _data_overrides(recipe: dict[str, Any], tmp_path: Path) -> list[str]:
    """Arguments that let the recipe's data module be built without its dataset on disk."""
    data_cls = recipe["data"]["class_path"].rsplit(".", 1)[-1]
    if data_cls == "CIFARDataModule":
        return ["--data.init_args.root", str(tmp_path / "cifar"), "--data.init_args.download", "true"]
    if data_cls == "ImageFolderDataModule":
        root = tmp_path / "imagenet"
        for split in ("train", "val"):
            for cls in ("n01440764", "n01443537"):
                (root / split / cls).mkdir(parents=True)
        return ["--data.init_args.root", str(root)]
    return []


def _seed_torchvision_cache(recipe: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Put a random torchvision checkpoint in the (tmp) torch hub cache for a recipe naming one."""
    init = recipe["model"].get("init_args", {})
    weights = init.get("weights")
    if not weights or os.sep in weights or "." in weights or weights.startswith("hf-hub:"):
        return None
    model_cls = import_class(recipe["model"]["class_path"])
    arch = model_cls(**{k: v for k, v in init.items() if k not in ("weights", "memory", *TRAINING)}).torchvision_arch
    assert arch, f"weights {weights!r} named, but the recipe's layout is no torchvision architecture"
    entry = torchvision.models.get_model_weights(arch)[weights]
    torch.manual_seed(0)
    state_dict = torchvision.models.get_model(arch).state_dict()
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, cache)
    return state_dict


def _seed_hf_hub_cache(recipe: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Put random weights of the recipe's own architecture in the (tmp, offline) Hugging Face cache for a recipe
    naming ``hf-hub:`` weights (a timm checkpoint for the ViT recipes: the zoo ViT has timm's names)."""
    init = recipe["model"].get("init_args", {})
    weights = init.get("weights")
    if not weights or not weights.startswith("hf-hub:"):
        return None
    from helpers import seed_hf_hub_cache

    torch.manual_seed(0)
    model_cls = import_class(recipe["model"]["class_path"])
    state_dict = model_cls(**{k: v for k, v in init.items() if k not in ("weights", *TRAINING)}).state_dict()
    seed_hf_hub_cache(weights[len("hf-hub:") :].partition("@")[0], state_dict)
    return state_dict


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_instantiates_what_it_says(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expected = load_recipe(recipe)
    source_weights = _seed_torchvision_cache(expected)
    hub_weights = _seed_hf_hub_cache(expected)
    args = [
        "--config",
        str(recipe),
        *_data_overrides(expected, tmp_path),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    cli = ZooCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
    )

    # model: class, every init argument (weights is not a hyperparameter), and the stages it implies
    model, init = cli.model, expected["model"].get("init_args", {})
    assert type(model) is import_class(expected["model"]["class_path"])
    for key, value in init.items():
        if key not in ("weights", *TRAINING):
            assert plain(model.hparams[key]) == plain(value), key
    check_training_settings(model, init)
    if type(model).__name__ in RULES:  # the ResNet families: residual stages
        if "layers" in init:
            assert list(model.layer_counts) == list(init["layers"])
            assert len(model.stages) == len(init["layers"])
        stages = model.stages
        assert all(isinstance(s, ResidualStack) for s in stages)
        assert {s.rule for s in stages} == {RULES[type(model).__name__]}
        assert {s.memory for s in stages} == {init.get("memory", "full")}
        # the depth-scaled families step 1/N; the momentum rule (M1) and the plain ResNet step 1
        assert {s.scale for s in stages} == (
            {1.0} if type(model).__name__ in ("MomentumResNet", "ResNet") else {"depth"}
        )
        if init.get("tied"):
            assert all(s.is_tied() for s in stages if s.depth > 1)
    if type(model).__name__ == "SinkformerViT":  # Sinkhorn attention in every block
        assert len(model.blocks) == init.get("depth", 12)
        assert {b.attn.n_iter for b in model.blocks} == {init.get("n_iter", 3)}
    if "num_classes" in init:
        head = model.fc if hasattr(model, "fc") else model.head
        assert head.out_features == init["num_classes"]
    if source_weights is not None:  # the named weights were loaded (the classifier is not folded)
        torch.testing.assert_close(model.fc.weight, source_weights["fc.weight"])
    if hub_weights is not None:  # the hf-hub weights were loaded
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in hub_weights.items())

    # data module: class and arguments (root is overridden above)
    data, data_init = cli.datamodule, expected["data"].get("init_args", {})
    assert type(data) is import_class(expected["data"]["class_path"])
    for key, value in data_init.items():
        if key not in ("root", "download"):
            assert plain(data.hparams[key]) == plain(value), key
    assert [p.name for p in tmp_path.iterdir() if p.name != "imagenet"] == []  # nothing downloaded or written

    # trainer
    trainer_cfg = expected.get("trainer", {})
    if "max_epochs" in trainer_cfg:
        assert cli.trainer.max_epochs == trainer_cfg["max_epochs"]
    for callback in trainer_cfg.get("callbacks", []):
        cls = import_class(callback["class_path"])
        found = [c for c in cli.trainer.callbacks if type(c) is cls]
        assert found, callback["class_path"]
        if cls is ModelCheckpoint:
            monitor = callback.get("init_args", {}).get("monitor")
            assert found[0].monitor == monitor
            # the monitored metric is one the model logs in validation
            assert monitor in ("val_acc", "val_loss", "val_acc5")
