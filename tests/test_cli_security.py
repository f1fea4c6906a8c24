"""``zoo validate/test/predict/fit --ckpt_path`` never imports or runs what a file names, and every bad checkpoint,
trainer setting, ``zoo convert --option`` value or ``--weights`` file ends with one ``zoo: error:`` line.

Lightning's own ``--ckpt_path`` handling hands a checkpoint's ``_class_path`` and hyperparameters to jsonargparse,
which imports the module a crafted file names. The crafted files here name a module (written to tmp_path) that
writes a marker file when it is imported; each test checks that the marker never appears, and that importing the
module really writes it (so the check can fail). Checkpoints are made by hand: the errors come before any weight
is loaded. Everything runs in-process except one real ``python -m zoo.cli`` run.
"""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from test_cli import DIGITS, QUICK, ROOT, TINY_DATA, TINY_MODEL, assert_convert_fails, run_main

from zoo.cli import AtomicCheckpointIO, ZooCLI, _checkpoint_model
from zoo.errors import ZooError

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

VALIDATE = ["validate", "--config", str(DIGITS), *TINY_MODEL, *TINY_DATA, *QUICK]


def marker_module(folder: Path, name: str) -> Path:
    """``folder/name.py``: a module that writes ``folder/name.MARKER`` when imported (and defines a
    LightningModule ``Net``); returns the marker's path."""
    marker = folder / f"{name}.MARKER"
    (folder / f"{name}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "import lightning.pytorch as pl\n\n\n"
        "class Net(pl.LightningModule):\n"
        "    def __init__(self, width: int = 1):\n"
        "        super().__init__()\n"
    )
    return marker


def assert_import_writes(folder: Path, name: str, marker: Path) -> None:
    """The module does write its marker when imported (in a fresh interpreter): the checks can fail."""
    assert not marker.exists()
    subprocess.run(
        [sys.executable, "-c", f"import {name}"],
        cwd=folder,
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(folder)},
    )
    assert marker.read_text() == "imported"


def lightning_file(path: Path, hyper_parameters: Any) -> Path:
    """A Lightning-shaped checkpoint: an (empty) state dict and the given hyperparameters."""
    torch.save(
        {
            "state_dict": {},
            "pytorch-lightning_version": pl.__version__,
            "epoch": 0,
            "global_step": 0,
            "hyper_parameters": hyper_parameters,
        },
        path,
    )
    return path


def run_zoo(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``run_main`` that also turns an escaped exception (a traceback on the console) into exit code 1, so that
    a test can check its marker before the error line: (exit code, stderr)."""
    try:
        code, _, err = run_main(argv, capsys)
    except Exception as e:
        return 1, f"{capsys.readouterr().err}Traceback: {type(e).__name__}: {e}"
    return code, err


def one_error_line(code: int, err: str) -> str:
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("zoo: error: ")]
    return line


class _Parsed(Exception):
    pass


def parsed_model_config(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The model's configuration after ``--ckpt_path`` updated it (the run stops before anything is built)."""

    def stop(cli: ZooCLI) -> None:
        raise _Parsed(cli.config[cli.config.subcommand].model)

    with monkeypatch.context() as patch, pytest.raises(_Parsed) as caught:
        patch.setattr(ZooCLI, "instantiate_classes", stop)
        ZooCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            parser_kwargs={"exit_on_error": False},
        )
    return caught.value.args[0]


# ------------------------------------------------------------------------------------------------
# 1. a checkpoint's class path and hyperparameters import nothing


def test_ckpt_class_path_of_a_foreign_module_is_never_imported(tmp_path: Path) -> None:
    """The real command: ``zoo validate --ckpt_path`` of a file whose ``_class_path`` names a module on the
    PYTHONPATH refuses it in one line; the module's import side effect never happens."""
    marker = marker_module(tmp_path, "zoo_side_effect_ckpt")
    ckpt = lightning_file(tmp_path / "crafted.ckpt", {"_class_path": "zoo_side_effect_ckpt.Net", "width": 2})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zoo.cli",
            *VALIDATE,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--ckpt_path",
            str(ckpt),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not marker.exists()
    line = one_error_line(proc.returncode, proc.stderr)
    assert "'zoo_side_effect_ckpt.Net' is not a registered zoo model class" in line
    assert "zoo.models.MomentumResNet" in line  # the classes a file may name
    assert_import_writes(tmp_path, "zoo_side_effect_ckpt", marker)


@pytest.mark.parametrize(
    "hparams",
    [
        {"class_path": "{name}.Net"},  # no _class_path: Lightning merged the dict into the model's config as it is
        {"_class_path": "zoo.models.DepthScaledResNet", "class_path": "{name}.Net"},
        {"_class_path": "zoo.models.DepthScaledResNet", "init_args": {"class_path": "{name}.Net"}},
        {
            "_class_path": "zoo.models.DepthScaledResNet",
            "_instantiator": "{name}.Net",
            "label_smoothing": "{{class_path: {name}.Net}}",
        },
    ],
    ids=["class_path_key", "both_keys", "init_args_key", "instantiator_and_yaml_string"],
)
def test_ckpt_hyperparameters_naming_a_module_import_nothing(
    hparams: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    name = f"zoo_side_effect_{request.node.callspec.id}"
    marker = marker_module(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    hparams = {
        k: v.format(name=name) if isinstance(v, str) else {kk: vv.format(name=name) for kk, vv in v.items()}
        for k, v in hparams.items()
    }
    ckpt = lightning_file(tmp_path / "crafted.ckpt", hparams)
    result = run_zoo([*VALIDATE, "--ckpt_path", str(ckpt)], capsys)
    assert not marker.exists()
    assert name not in sys.modules
    assert str(ckpt) in one_error_line(*result)
    assert_import_writes(tmp_path, name, marker)


def test_ckpt_on_the_users_own_class_sets_only_plain_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class given with --model (not a zoo class) may be named by its checkpoint; an argument whose type
    takes a class (here ``backbone: nn.Module | None``) is refused, in either spelling, and imports nothing."""
    marker = marker_module(tmp_path, "zoo_side_effect_backbone")
    (tmp_path / "zoo_user_net.py").write_text(
        "import lightning.pytorch as pl\nimport torch.nn as nn\n\n\n"
        "class UserNet(pl.LightningModule):\n"
        "    def __init__(self, width: int = 4, backbone: nn.Module | None = None):\n"
        "        super().__init__()\n"
        "        self.save_hyperparameters()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--model", "zoo_user_net.UserNet", "--data", "zoo.data.DigitsDataModule"]
    good = lightning_file(tmp_path / "good.ckpt", {"_class_path": "zoo_user_net.UserNet", "width": 8})
    model = parsed_model_config([*args, "--ckpt_path", str(good)], monkeypatch)
    assert model.class_path == "zoo_user_net.UserNet" and model.init_args.width == 8
    for backbone in ("zoo_side_effect_backbone.Net", {"class_path": "zoo_side_effect_backbone.Net"}):
        bad = lightning_file(tmp_path / "bad.ckpt", {"_class_path": "zoo_user_net.UserNet", "backbone": backbone})
        result = run_zoo([*args, "--ckpt_path", str(bad)], capsys)
        assert not marker.exists()
        line = one_error_line(*result)
        assert "'backbone'" in line and "could name code to import" in line
    assert_import_writes(tmp_path, "zoo_side_effect_backbone", marker)


def test_ckpt_class_path_resolves_through_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any registered spelling of a zoo class works; the checkpoint's class and hyperparameters replace the
    recipe's (Lightning's behaviour), the recipe's other arguments stay."""
    monkeypatch.chdir(tmp_path)
    ckpt = lightning_file(
        tmp_path / "heun.ckpt",
        {
            "_class_path": "zoo.HeunNet",
            "gamma": 0.5,
            "label_smoothing": 0.25,
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
        },
    )
    model = parsed_model_config([*VALIDATE, "--ckpt_path", str(ckpt)], monkeypatch)
    assert model.class_path == "zoo.models.resnet.HeunNet"
    assert (model.init_args.gamma, model.init_args.label_smoothing) == (0.5, 0.25)
    assert model.init_args.stem == "cifar" and model.init_args.num_classes == 10  # the recipe's
    # the recipe's own spelling of the same class is kept
    path, init_args = _checkpoint_model(
        "x.ckpt",
        {"_class_path": "zoo.models.resnet.DepthScaledResNet", "gamma": 0.5},
        chosen="zoo.models.DepthScaledResNet",
    )
    assert (path, init_args) == ("zoo.models.DepthScaledResNet", {"gamma": 0.5})
    # checkpoints written before training settings were injected: those arguments are dropped
    old = {
        "_class_path": "zoo.models.DepthScaledResNet",
        "gamma": 0.5,
        "optimizer": "sgd",
        "lr": 0.1,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "momentum": 0.9,
    }
    assert _checkpoint_model("old.ckpt", old, chosen=None)[1] == {"gamma": 0.5}


@pytest.mark.parametrize(
    "hparams, words",
    [
        ({"_class_path": "zoo.models.HeunNet", "gamma": "strong"}, ["do not fit", "gamma"]),
        (
            {"_class_path": "zoo.models.HeunNet", "depth_of_field": 3},
            ["'depth_of_field'", "not an argument of HeunNet"],
        ),
        ({"_class_path": "zoo.models.HeunNet", "layers": [1, torch.zeros(1)]}, ["'layers'", "could name code"]),
        ({"_class_path": "os.system"}, ["'os.system' is not a registered zoo model class"]),
        (["not", "a", "dict"], ["'hyper_parameters' is a list"]),
    ],
)
def test_ckpt_hyperparameters_are_checked_against_the_signature(
    hparams: Any, words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = lightning_file(tmp_path / "c.ckpt", hparams)
    line = one_error_line(*run_zoo([*VALIDATE, "--ckpt_path", str(ckpt)], capsys))
    for word in words:
        assert word in line


# ------------------------------------------------------------------------------------------------
# 2. a file that is not a (complete) Lightning checkpoint: one line


class _RunsCode:
    """Pickles to a call of ``exec``: loading it with ``weights_only=False`` writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (file, words of the error line besides the file name)."""
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    good = lightning_file(tmp_path / "good.ckpt", {"_class_path": "zoo.models.DepthScaledResNet"})
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, not a checkpoint\n")
    plain = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, plain)
    code = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _RunsCode(tmp_path / "RAN")}, code)
    return {
        "empty": (empty, ["empty"]),
        "truncated": (truncated, []),
        "text": (text, []),
        "plain_state_dict": (plain, ["not a Lightning checkpoint", "--model.init_args.weights"]),
        "code": (code, ["exec", "weights_only=True"]),
    }


@pytest.mark.parametrize("case", ["empty", "truncated", "text", "plain_state_dict", "code"])
def test_ckpt_path_to_a_bad_file_is_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path, words = _bad_checkpoints(tmp_path)[case]
    result = run_zoo([*VALIDATE, "--ckpt_path", str(path)], capsys)
    assert not (tmp_path / "RAN").exists()
    line = one_error_line(*result)
    assert str(path) in line
    for word in words:
        assert word in line


def test_lightning_restore_reads_with_weights_only(tmp_path: Path) -> None:
    """The trainer's own restore (``strategy.checkpoint_io.load_checkpoint``) goes through the safe loader even
    when asked for ``weights_only=False``; a good file loads on the CPU (Lightning's default placement)."""
    io = AtomicCheckpointIO()
    good = {"state_dict": {"w": torch.randn(3)}, "epoch": 2}
    torch.save(good, tmp_path / "good.ckpt")
    loaded = io.load_checkpoint(tmp_path / "good.ckpt", weights_only=False)
    assert loaded["epoch"] == 2 and loaded["state_dict"]["w"].device.type == "cpu"
    torch.testing.assert_close(loaded["state_dict"]["w"], good["state_dict"]["w"], rtol=0, atol=0)
    assert io.load_checkpoint(tmp_path / "good.ckpt", map_location="meta")["state_dict"]["w"].is_meta

    code = _bad_checkpoints(tmp_path)["code"][0]
    for kwargs in ({"weights_only": False}, {"weights_only": False, "map_location": "cpu"}, {}):
        with pytest.raises(Exception) as caught:
            io.load_checkpoint(code, **kwargs)
        assert not (tmp_path / "RAN").exists()
        assert isinstance(caught.value, ZooError) and "exec" in str(caught.value)
    torch.load(code, weights_only=False)  # the file does carry code
    assert (tmp_path / "RAN").read_text() == "ran"
    with pytest.raises(ZooError, match="empty"):
        io.load_checkpoint(_bad_checkpoints(tmp_path)["empty"][0])


# ------------------------------------------------------------------------------------------------
# 2. trainer settings Lightning refuses: one line


@pytest.mark.parametrize(
    "options, words",
    [
        (["--trainer.accelerator", "cpu", "--trainer.strategy", "fsdp"], ["fsdp", "requires a GPU"]),
        (["--trainer.accelerator", "tpu_v9"], ["invalid accelerator name", "tpu_v9"]),
        (["--trainer.strategy", "no_such_strategy"], ["invalid strategy name"]),
        (["--trainer.accelerator", "cpu", "--trainer.devices", "-3"], ["devices", "int > 0"]),
        (["--trainer.max_epochs", "-2"], ["max_epochs", "-2"]),
    ],
    ids=["fsdp_on_cpu", "unknown_accelerator", "unknown_strategy", "negative_devices", "negative_epochs"],
)
def test_trainer_setting_errors_are_one_line(
    options: list[str],
    words: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_error_line(
        *run_zoo(
            [
                "fit",
                "--config",
                str(DIGITS),
                *TINY_MODEL,
                *TINY_DATA,
                *QUICK,
                "--trainer.default_root_dir",
                str(tmp_path),
                *options,
            ],
            capsys,
        )
    )
    for word in [*words, "--trainer.<option>"]:
        assert word in line
    assert not list(tmp_path.rglob("*.ckpt"))


def test_lightning_configuration_error_at_run_time_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``zoo validate`` of a module without ``validation_step``: Lightning finds it when the run starts."""
    monkeypatch.chdir(tmp_path)
    line = one_error_line(
        *run_zoo(
            [
                "validate",
                "--model",
                "lightning.pytorch.LightningModule",
                "--data",
                "zoo.data.DigitsDataModule",
                *TINY_DATA,
                *QUICK,
                "--trainer.default_root_dir",
                str(tmp_path),
            ],
            capsys,
        )
    )
    assert "validation_step()" in line


# ------------------------------------------------------------------------------------------------
# 2./3. zoo convert: an --option that is not YAML, a --weights file that is not weights


def test_convert_option_that_is_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_convert_fails(
        ["--from", "torchvision:resnet18", "--weights", "none", "--to", "depth_scaled", "--option", "memory=[1,2"],
        ["--option memory=", "not a YAML value", "quote"],
        tmp_path,
        capsys,
    )


@pytest.mark.parametrize("case", ["empty", "truncated", "text", "no_tensors", "list", "code"])
def test_convert_weights_file_that_is_not_weights(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--weights FILE`` is read by zoo.hub.read_weights (``weights_only=True``); nothing in it runs."""
    path = tmp_path / f"{case}.pth"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        torch.save(torchvision.models.resnet18().state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "text":
        path.write_text("conv1.weight: 0.5\n")
    elif case == "no_tensors":
        torch.save({"lr": 0.1, "arch": "resnet18"}, path)
    elif case == "list":
        torch.save([torch.zeros(2)], path)
    else:
        torch.save({"conv1.weight": _RunsCode(tmp_path / "RAN")}, path)
    for source in ("torchvision:resnet18", "timm:resnet18"):
        assert_convert_fails(
            ["--from", source, "--weights", str(path), "--to", "depth_scaled"], [str(path)], tmp_path, capsys
        )
    assert not (tmp_path / "RAN").exists()
