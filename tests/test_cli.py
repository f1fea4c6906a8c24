"""The ``zoo`` command (zoo/cli.py): fit / validate / test / predict through LightningCLI, ``zoo convert``,
and one-line errors without a traceback.

Training runs use the embedded digits recipe shrunk to a few seconds (8x8 images, tiny widths, 2 batches).
Checks that need the real interpreter exit (no ``Traceback`` on stderr) run ``python -m zoo.cli`` in
subprocesses, started together by one module fixture so that their start-up (importing torch and
Lightning, several seconds each) overlaps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
import yaml
from helpers import randomize_batchnorm
from lightning.pytorch.callbacks import ProgressBar

import converters
import zoo
from zoo.cli import AtomicCheckpointIO, ZooCLI, main
from zoo.models import DepthScaledResNet, HeunNet, ResNet

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes" / "digits_depth_scaled_resnet.yaml"
CIFAR = ROOT / "recipes" / "cifar10_tied_deepen.yaml"
IMAGENET = ROOT / "recipes" / "imagenet_finetune_depth_scaled_resnet50.yaml"

# A model and data small enough that one epoch of 2 batches takes about a second.
TINY_MODEL = ["--model.init_args.layers", "[1,1,1]", "--model.init_args.widths", "[4,8,8]"]
TINY_DATA = ["--data.init_args.image_size", "8", "--data.init_args.batch_size", "16"]
QUICK = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.limit_test_batches",
    "2",
    "--trainer.limit_predict_batches",
    "2",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.logger",
    "false",
]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

ZOO_LINE = re.compile(r"^zoo: (.*)$", re.MULTILINE)


def assert_convert_fails(argv: list[str], words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`zoo convert <argv>` exits with 2 and one `zoo: error:` line holding every word, writing nothing."""
    code, _, err = run_main(["convert", *argv, "--out", str(tmp_path / "x")], capsys)
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("zoo: error: ")]
    for word in words:
        assert word in line
    assert not (tmp_path / "x").exists()


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``zoo.cli.main(argv)`` in-process: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def zoo_lines(text: str) -> list[str]:
    return ZOO_LINE.findall(text)


def walk_files(root: Path) -> list[Path]:
    """Every file under ``root``, hidden ones included (atomic_write's temporaries are ``.name.*.tmp``)."""
    return [Path(d) / f for d, _, files in os.walk(root) for f in files]


def assert_same_function(model: nn.Module, reference: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = model.eval()(x), reference.eval()(x)
    assert out.shape == ref.shape
    scale = ref.abs().max().clamp_min(1.0)
    assert (out - ref).abs().max() <= 1e-4 * scale


# ------------------------------------------------------------------------------------------------
# fit, then validate / test / predict from its checkpoint


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """``zoo fit`` on the digits recipe (tiny overrides) in-process; its root, stdout and checkpoint."""
    root = tmp_path_factory.mktemp("zoo_fit")
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(
                    [
                        "fit",
                        "--config",
                        str(DIGITS),
                        *TINY_MODEL,
                        *TINY_DATA,
                        *QUICK,
                        "--trainer.default_root_dir",
                        str(root / "run"),
                    ]
                )
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(cwd)
    ckpts = sorted((root / "run").rglob("*.ckpt"))
    return {"root": root, "code": code, "out": out.getvalue(), "err": err.getvalue(), "ckpts": ckpts}


def test_fit_prints_val_acc_and_writes_one_complete_checkpoint(fitted: dict) -> None:
    assert fitted["code"] == 0, fitted["err"][-2000:]
    lines = [line for line in zoo_lines(fitted["out"]) if line.startswith("val_acc ")]
    assert len(lines) == 1, fitted["out"][-2000:]
    acc = float(lines[0].split()[1].rstrip(","))
    assert 0.0 <= acc <= 1.0
    assert "val_loss" in lines[0]
    assert "Epoch 0" in fitted["out"] + fitted["err"]  # the progress bar was drawn
    assert len(fitted["ckpts"]) == 1
    ckpt = fitted["ckpts"][0]
    assert f"(checkpoint: {ckpt})" in lines[0]
    assert not [p for p in walk_files(fitted["root"]) if p.name.endswith(".tmp")]
    loaded = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert loaded["hyper_parameters"]["layers"] == [1, 1, 1]
    assert loaded["hyper_parameters"]["widths"] == [4, 8, 8]
    assert loaded["global_step"] == 2
    # the recipe is written next to the run (SaveConfigCallback, overwrite allowed)
    assert any(p.name == "config.yaml" for p in walk_files(fitted["root"] / "run"))


@pytest.mark.parametrize("subcommand, stage", [("validate", "val"), ("test", "test")])
def test_validate_and_test_from_the_fit_checkpoint(
    fitted: dict,
    subcommand: str,
    stage: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert fitted["ckpts"], "fit wrote no checkpoint"
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(
        [
            subcommand,
            "--config",
            str(DIGITS),
            *TINY_MODEL,
            *TINY_DATA,
            *QUICK,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--ckpt_path",
            str(fitted["ckpts"][0]),
        ],
        capsys,
    )
    assert code == 0, err[-2000:]
    lines = [line for line in zoo_lines(out) if line.startswith(f"{stage}_acc ")]
    assert len(lines) == 1, out[-2000:]
    assert f"{stage}_loss " in lines[0]
    assert 0.0 <= float(lines[0].split()[1].rstrip(",")) <= 1.0
    if subcommand == "validate":  # the checkpoint holds the fitted weights: same batches, same val_acc
        (fit_line,) = [line for line in zoo_lines(fitted["out"]) if line.startswith("val_acc ")]
        assert lines[0].split()[1] == fit_line.split()[1]


def test_predict_returns_class_probabilities(
    fitted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``zoo predict`` exits 0; the predictions (softmax over the 10 digits) are kept by the trainer."""
    monkeypatch.chdir(tmp_path)
    args = [
        "predict",
        "--config",
        str(DIGITS),
        *TINY_MODEL,
        *TINY_DATA,
        *QUICK,
        "--trainer.default_root_dir",
        str(tmp_path),
        "--ckpt_path",
        str(fitted["ckpts"][0]),
    ]
    code, out, err = run_main(args, capsys)
    assert code == 0, err[-2000:]
    # main() does not hand the CLI object back: run the same CLI to look at what predict returned
    cli = ZooCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
    predictions = cli.trainer.predict_loop.predictions
    assert len(predictions) == 2
    for batch in predictions:
        assert batch.shape == (16, 10)
        assert torch.allclose(batch.sum(dim=1), torch.ones(16), atol=1e-5)
        assert (batch >= 0).all()


# ------------------------------------------------------------------------------------------------
# progress bar and atomic checkpoints of the main job's trainer


def test_digits_recipe_trains_with_a_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(["fit", "--config", str(DIGITS), "--print_config"], capsys)
    assert code == 0
    config = yaml.safe_load(out)
    assert config["trainer"]["enable_progress_bar"] in (None, True)  # None: Trainer's default, on

    cli = ZooCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(DIGITS), "--trainer.default_root_dir", str(tmp_path)],
    )
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, ProgressBar)
    assert bar.is_enabled
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ------------------------------------------------------------------------------------------------
# one-line errors, checked on the real interpreter exit


def _strip_hparams(ckpt: Path, dest: Path) -> Path:
    """A Lightning checkpoint without ``hyper_parameters``: LightningCLI would otherwise rebuild the model
    from the checkpoint's own hyperparameters (and its keys would fit)."""
    data = torch.load(ckpt, map_location="cpu", weights_only=False)
    data.pop("hyper_parameters", None)
    torch.save(data, dest)
    return dest


def _error_cases(tmp: Path, lightning_ckpt: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (zoo arguments, words the ``zoo: error:`` line must contain)."""
    small = [*TINY_MODEL, *TINY_DATA, *QUICK, "--trainer.default_root_dir", str(tmp / "runs")]
    bad_ckpt = _strip_hparams(lightning_ckpt, tmp / "other_layout.ckpt")
    missing_root = str(tmp / "no_such_data")
    return {
        # run through the installed console script when there is one (see _run_zoo)
        "missing_recipe": (["fit", "--config", str(tmp / "recipes" / "nope.yaml")], ["nope.yaml", "does not exist"]),
        "ckpt_path_missing": (
            ["validate", "--config", str(DIGITS), *small, "--ckpt_path", str(tmp / "nope.ckpt")],
            ["nope.ckpt"],
        ),
        "unknown_model_class": (
            ["fit", "--config", str(DIGITS), "--model.class_path", "zoo.models.NoSuchNet", *small],
            ["NoSuchNet"],
        ),
        "ckpt_keys_do_not_fit": (
            ["validate", "--config", str(DIGITS), *small, "--ckpt_path", str(bad_ckpt)],
            # the fixture's net has 2 blocks per stage and widths 8/16/32: layer1.1.* is unexpected here
            ["do not fit", "unexpected", "layer1.1.", "shape mismatch"],
        ),
        "cifar_root_missing": (
            [
                "fit",
                "--config",
                str(CIFAR),
                *small,
                "--data.init_args.root",
                missing_root,
                "--data.init_args.num_workers",
                "0",
                "--trainer.precision",
                "32-true",
            ],
            [missing_root, "does not exist"],
        ),
        "image_folder_root_missing": (
            [
                "fit",
                "--config",
                str(IMAGENET),
                *small,
                "--model.init_args.weights",
                "null",
                "--model.init_args.layers",
                "[1,1,1,1]",
                "--model.init_args.widths",
                "[4,4,8,8]",
                "--data.init_args.root",
                missing_root,
                "--data.init_args.num_workers",
                "0",
                "--trainer.strategy",
                "auto",
                "--trainer.precision",
                "32-true",
            ],
            [missing_root, "does not exist"],
        ),
        "unknown_rule": (
            ["fit", "--config", str(DIGITS), *small, "--model.init_args.rule", "eulr"],
            ["rule", "'eulr'", "euler", "heun"],
        ),
        "unknown_memory": (
            ["fit", "--config", str(DIGITS), *small, "--model.init_args.memory", "everything"],
            ["memory", "'everything'", "full", "adjoint"],
        ),
        "convert_unknown_torchvision_model": (
            [
                "convert",
                "--from",
                "torchvision:resnet19",
                "--weights",
                "none",
                "--to",
                "depth_scaled",
                "--out",
                str(tmp / "r19"),
            ],
            ["resnet19", "unknown torchvision model"],
        ),
    }


ERROR_CASES = [
    "missing_recipe",
    "unknown_model_class",
    "ckpt_keys_do_not_fit",
    "ckpt_path_missing",
    "cifar_root_missing",
    "image_folder_root_missing",
    "unknown_rule",
    "unknown_memory",
    "convert_unknown_torchvision_model",
]


CONSOLE_SCRIPT = Path(sys.executable).parent / ("zoo.exe" if os.name == "nt" else "zoo")


def _run_zoo(args: list[str], cwd: Path, env: dict[str, str], script: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m zoo.cli ARGS``, or the installed ``zoo`` console script with ``script``."""
    command = [str(CONSOLE_SCRIPT)] if script and CONSOLE_SCRIPT.is_file() else [sys.executable, "-m", "zoo.cli"]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def subprocess_runs(
    tmp_path_factory: pytest.TempPathFactory, lightning_ckpt: tuple[Path, dict]
) -> dict[str, tuple[subprocess.CompletedProcess[str], list[str]]]:
    """Every error case (and one plain ``--print_config``) through ``python -m zoo.cli``, 3 at a time."""
    tmp = tmp_path_factory.mktemp("zoo_errors")
    cases = _error_cases(tmp, lightning_ckpt[0])
    cases["print_config"] = (["fit", "--config", str(DIGITS), "--print_config"], [])
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp / "torch"),
        "HF_HOME": str(tmp / "hf"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            name: pool.submit(_run_zoo, args, tmp, env, name == "missing_recipe") for name, (args, _) in cases.items()
        }
        return {name: (future.result(), cases[name][1]) for name, future in futures.items()}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_is_one_line_without_traceback(subprocess_runs: dict, case: str) -> None:
    proc, words = subprocess_runs[case]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "usage:" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("zoo: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]


def test_console_run_has_no_args_warning(subprocess_runs: dict) -> None:
    proc, _ = subprocess_runs["print_config"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load(proc.stdout)["model"]["class_path"] == "zoo.models.DepthScaledResNet"
    assert "args parameter is intended" not in proc.stderr


def test_ckpt_keys_error_in_process(
    lightning_ckpt: tuple[Path, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The error names the first unexpected keys of the checkpoint, as computed here."""
    monkeypatch.chdir(tmp_path)
    bad = _strip_hparams(lightning_ckpt[0], tmp_path / "other.ckpt")
    code, _, err = run_main(
        [
            "test",
            "--config",
            str(DIGITS),
            *TINY_MODEL,
            *TINY_DATA,
            *QUICK,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--ckpt_path",
            str(bad),
        ],
        capsys,
    )
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("zoo: error: ")]
    model = DepthScaledResNet(layers=[1, 1, 1], widths=[4, 8, 8], stem="cifar", num_classes=10)
    own = model.state_dict()
    unexpected = [k for k in lightning_ckpt[1] if k not in own]
    assert unexpected
    assert f"unexpected ({len(unexpected)}): {', '.join(unexpected[:5])}" in line


# ------------------------------------------------------------------------------------------------
# zoo convert


def test_convert_torchvision_weight_file_to_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    source = randomize_batchnorm(torchvision.models.resnet18()).eval()
    weights = tmp_path / "r18.pth"
    torch.save(source.state_dict(), weights)
    out_dir = tmp_path / "r18"
    code, out, err = run_main(
        [
            "convert",
            "--from",
            "torchvision:resnet18",
            "--weights",
            str(weights),
            "--to",
            "depth_scaled",
            "--out",
            str(out_dir),
        ],
        capsys,
    )
    assert code == 0, err
    assert zoo_lines(out) and zoo_lines(out)[-1].startswith(f"wrote {out_dir} (DepthScaledResNet, 11.")
    assert sorted(p.name for p in out_dir.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # + card
    model = zoo.from_pretrained(out_dir)
    assert type(model) is DepthScaledResNet
    assert list(model.hparams["layers"]) == [2, 2, 2, 2]
    assert_same_function(model, source)


def test_convert_named_torchvision_weights_from_the_hub_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], offline_caches: Path
) -> None:
    """``--weights IMAGENET1K_V1`` loads offline from the torch hub cache (a random file put there)."""
    torch.manual_seed(1)
    source = randomize_batchnorm(torchvision.models.resnet18(), seed=1).eval()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    assert str(cache).startswith(str(offline_caches))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source.state_dict(), cache)
    out_file = tmp_path / "r18.safetensors"
    code, out, err = run_main(
        [
            "convert",
            "--from",
            "torchvision:resnet18",
            "--weights",
            "IMAGENET1K_V1",
            "--to",
            "depth_scaled",
            "--out",
            str(out_file),
        ],
        capsys,
    )
    assert code == 0, err
    assert out_file.is_file()
    assert not [p for p in walk_files(tmp_path) if p.name.endswith(".tmp")]
    model = zoo.from_pretrained(out_file)
    assert type(model) is DepthScaledResNet
    assert_same_function(model, source)


def test_convert_timm_with_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = randomize_batchnorm(timm.create_model("resnet18"), seed=2).eval()
    weights = tmp_path / "timm_r18.safetensors"
    save_file(source.state_dict(), str(weights))
    out_file = tmp_path / "plain.safetensors"
    code, out, err = run_main(
        [
            "convert",
            "--from",
            "timm:resnet18",
            "--weights",
            str(weights),
            "--to",
            "resnet",
            "--out",
            str(out_file),
            "--memory",
            "adjoint",
            "--option",
            "label-smoothing=0.1",
        ],
        capsys,
    )
    assert code == 0, err
    assert zoo_lines(out)[-1].startswith(f"wrote {out_file} (ResNet, ")
    model = zoo.from_pretrained(out_file)
    assert type(model) is ResNet
    assert model.hparams["memory"] == "adjoint"
    assert model.hparams["label_smoothing"] == 0.1
    assert all(stage.memory == "adjoint" for stage in model.stages)
    assert_same_function(model, source)

    code, _, err = run_main(
        [
            "convert",
            "--from",
            "timm:resnet18",
            "--weights",
            str(weights),
            "--to",
            "heun",
            "--out",
            str(tmp_path / "heun"),
        ],
        capsys,
    )
    assert code == 0, err
    assert type(zoo.from_pretrained(tmp_path / "heun")) is HeunNet


def test_convert_unknown_target_lists_the_supported_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(
        [
            "convert",
            "--from",
            "torchvision:resnet18",
            "--weights",
            "none",
            "--to",
            "depth_scaledd",
            "--out",
            str(tmp_path / "x"),
        ],
        capsys,
    )
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("zoo: error: ")]
    assert "'depth_scaledd'" in line
    targets = converters.list_targets()
    assert {"resnet", "depth_scaled", "heun"} <= set(targets)
    for target in targets:
        assert repr(target) in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--from", "timm:resnet19", "--weights", "none", "--to", "depth_scaled"], ["unknown timm model", "resnet19"]),
        (["--from", "resnet18", "--weights", "none", "--to", "depth_scaled"], ["torchvision:<model name>"]),
        (["--from", "keras:resnet18", "--weights", "none", "--to", "depth_scaled"], ["keras:resnet18"]),
        (["--from", "torchvision:resnet18", "--weights", "IMAGENET9K_V9", "--to", "depth_scaled"], ["IMAGENET9K_V9"]),
        (["--from", "timm:resnet18", "--weights", "IMAGENET9K_V9", "--to", "depth_scaled"], ["IMAGENET9K_V9"]),
        (
            ["--from", "torchvision:resnet18", "--weights", "none", "--to", "depth_scaled", "--option", "lr"],
            ["KEY=VALUE"],
        ),
        (
            ["--from", "torchvision:resnet18", "--weights", "none", "--to", "depth_scaled", "--option", "layers=[1,1]"],
            ["'layers'"],
        ),
        (
            ["--from", "torchvision:resnet18", "--weights", "none", "--to", "depth_scaled", "--option", "lr=0.1"],
            ["'lr'"],
        ),
        # no weights given: one error naming the fix, nothing written (a random model only on purpose)
        (["--from", "torchvision:resnet18", "--to", "depth_scaled"], ["needs --weights", "--weights none"]),
    ],
)
def test_convert_errors(argv: list[str], words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_convert_fails(argv, words, tmp_path, capsys)


def test_convert_weight_file_with_another_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Fine-tuned weights of a 7-class resnet18: the source is built with their head, the outputs match."""
    torch.manual_seed(3)
    source = torchvision.models.resnet18(num_classes=7).eval()
    weights = tmp_path / "r18_7.pth"
    torch.save(source.state_dict(), weights)
    code, _, _ = run_main(
        [
            "convert",
            "--from",
            "torchvision:resnet18",
            "--weights",
            str(weights),
            "--to",
            "depth_scaled",
            "--out",
            str(tmp_path / "x"),
        ],
        capsys,
    )
    assert code == 0
    model = zoo.from_pretrained(tmp_path / "x").eval()
    assert model.hparams.num_classes == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-4, atol=1e-5)


def test_convert_weight_file_that_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), weights)
    code, _, err = run_main(
        [
            "convert",
            "--from",
            "torchvision:resnet18",
            "--weights",
            str(weights),
            "--to",
            "depth_scaled",
            "--out",
            str(tmp_path / "x"),
        ],
        capsys,
    )
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("zoo: error: ")]
    assert "for torchvision:resnet18 do not fit" in line
    assert "layer1.2." in line  # resnet34 has 3 blocks in layer1, resnet18 two


def test_convert_weights_none_writes_a_random_model_on_purpose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--weights none`` (any case) is the explicit way to a randomly initialised model; the line says so."""
    out_dir = tmp_path / "random"
    code, out, err = run_main(
        [
            "convert",
            "--from",
            "torchvision:resnet18",
            "--weights",
            "None",
            "--to",
            "depth_scaled",
            "--out",
            str(out_dir),
        ],
        capsys,
    )
    assert code == 0, err
    assert zoo_lines(out)[-1].startswith(f"wrote {out_dir} (DepthScaledResNet, 11.")
    assert "randomly initialised" in zoo_lines(out)[-1]
    assert type(zoo.from_pretrained(out_dir)) is DepthScaledResNet


# ------------------------------------------------------------------------------------------------
# zoo --help, zoo recipes, and --config with a recipe name

RECIPE_FILES = {
    p.relative_to(ROOT / "zoo" / "recipes").with_suffix("").as_posix(): p
    for p in (ROOT / "zoo" / "recipes").rglob("*.yaml")
}


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    listed = re.findall(r"^    (\w+) ", out, re.MULTILINE)  # argparse's subcommand lines
    assert listed == ["fit", "validate", "test", "predict", "convert", "recipes"], out
    assert "the name of a recipe shipped with zoo" in " ".join(out.split())  # --config: a name as well as a path
    code, out, _ = run_main(["convert", "--help"], capsys)
    assert code == 0 and "'none'" in out and "--weights" in out
    code, out, _ = run_main(["recipes", "--help"], capsys)
    assert code == 0 and "--config" in out and "--show" in out


def first_comment_line(path: Path) -> str:
    return next(line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#"))


def test_recipes_lists_every_shipped_recipe_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert {"digits_depth_scaled_resnet", "nmt/numbers_sinkformer"} <= set(RECIPE_FILES)
    code, out, err = run_main(["recipes"], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith("Run one")}
    assert set(rows) == set(RECIPE_FILES), out
    for name, path in RECIPE_FILES.items():
        words = first_comment_line(path).split()[:4]  # the description starts as the recipe's comment does
        assert rows[name].split()[1:5] == words, (name, rows[name])
    assert "zoo fit --config <name>" in out

    code, out, _ = run_main(["recipes", "nmt/*"], capsys)
    assert code == 0
    names = [line.split()[0] for line in out.splitlines() if line and not line.startswith("Run one")]
    assert names == sorted(k for k in RECIPE_FILES if k.startswith("nmt/"))


def test_recipes_show_and_path(capsys: pytest.CaptureFixture[str]) -> None:
    path = RECIPE_FILES["nmt/numbers_sinkformer"]
    assert run_main(["recipes", "--show", "nmt/numbers_sinkformer"], capsys)[1] == path.read_text()
    code, out, _ = run_main(["recipes", "--path", "digits_depth_scaled_resnet.yaml"], capsys)
    assert code == 0 and Path(out.strip()).samefile(RECIPE_FILES["digits_depth_scaled_resnet"])
    code, _, err = run_main(["recipes", "--show", "numbers_sinkformer"], capsys)
    assert code == 2 and "nmt/numbers_sinkformer" in err
    code, _, err = run_main(["recipes", "resnet9000"], capsys)
    assert code == 2 and "no shipped recipe matches 'resnet9000'" in err


def printed_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    code, out, err = run_main([*argv, "--print_config"], capsys)
    assert code == 0, err
    return yaml.safe_load(out)


@pytest.mark.parametrize(
    "value",
    [
        "digits_depth_scaled_resnet",
        "digits_depth_scaled_resnet.yaml",
        "recipes/digits_depth_scaled_resnet.yaml",
        "nmt/numbers_sinkformer",
    ],
)
def test_config_takes_a_recipe_name(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a folder without the files (an installed zoo): the name finds the shipped recipe; the README's
    ``recipes/<name>.yaml`` spelling too."""
    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load(RECIPE_FILES[value.removeprefix("recipes/").removesuffix(".yaml")].read_text())
    for argv in (["fit", "--config", value], ["fit", f"--config={value}"], ["validate", "-c", value]):
        config = printed_config(argv, capsys)
        assert config["model"]["class_path"] == recipe["model"]["class_path"]
        assert config["data"]["init_args"] | recipe["data"]["init_args"] == config["data"]["init_args"]


def test_an_existing_path_wins_over_a_recipe_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    own = yaml.safe_load(DIGITS.read_text()) | {"seed_everything": 1234}
    for name in ("digits_depth_scaled_resnet", "digits_depth_scaled_resnet.yaml"):
        (tmp_path / name).write_text(yaml.safe_dump(own))
        assert printed_config(["fit", "--config", name], capsys)["seed_everything"] == 1234
    assert yaml.safe_load(DIGITS.read_text())["seed_everything"] != 1234


def test_unknown_recipe_name_is_one_error_with_close_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["fit", "--config", "digits_resnet"], capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("zoo: error: 'digits_resnet' does not exist")
    assert "digits_depth_scaled_resnet" in line and "digits_momentum_resnet" in line
    code, _, err = run_main(["fit", "--config", "numbers_sinkformer"], capsys)  # the topic folder is part of it
    assert code == 2 and "nmt/numbers_sinkformer" in err
    code, _, err = run_main(["fit", "--config", "../../etc/passwd_recipe"], capsys)  # names stay in zoo/recipes
    assert code == 2 and "does not exist" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe", ["imagenet_finetune_depth_scaled_resnet50", "imagenet_refit_momentum_resnet152"])
def test_missing_data_is_reported_before_any_weights_are_read(
    recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data module is built before the model: a recipe whose model starts from published weights says the
    dataset is missing without fetching (here: reading) the weights first."""

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read before the data folder was checked")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_weights)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["fit", "--config", recipe, "--trainer.max_epochs=1"], capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("zoo: error: image folder root 'data/imagenet' does not exist; point root at the folder")


# ------------------------------------------------------------------------------------------------
# the main job, unchanged


@pytest.mark.slow
def test_main_job_trains_the_digits(tmp_path: Path) -> None:
    """``zoo fit --config recipes/digits_depth_scaled_resnet.yaml`` as written (6 epochs: minutes on 2 cores)."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zoo.cli",
            "fit",
            "--config",
            str(DIGITS),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in zoo_lines(proc.stdout) if x.startswith("val_acc ")]
    assert float(line.split()[1].rstrip(",")) >= 0.9, line
    ckpt = Path(line.rsplit("(checkpoint: ", 1)[1].rstrip(")"))
    assert ckpt.is_file() and ckpt.name.startswith("epoch=5-")


def test_ckpt_path_takes_a_sharded_checkpoint_folder(tmp_path: Path) -> None:
    """FSDP2's sharded (DCP) checkpoints are folders (a .metadata file and one shard per rank): --ckpt_path takes
    them (the strategy reads them); another folder is one error saying what it lacks."""
    from zoo.cli import _resolve_config_paths

    sharded = tmp_path / "epoch=0-step=2.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    assert _resolve_config_paths(["fit", "--ckpt_path", str(sharded)]) == ["fit", "--ckpt_path", str(sharded)]
    with pytest.raises(zoo.ZooError, match=r"is a folder but not a sharded checkpoint \(no .metadata\)"):
        _resolve_config_paths(["fit", "--ckpt_path", str(tmp_path)])
    with pytest.raises(zoo.ZooError, match=r"does not exist: give a .ckpt file, a sharded checkpoint folder"):
        _resolve_config_paths(["fit", "--ckpt_path", str(tmp_path / "missing.ckpt")])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--trainer.strategy", "zoo.nn.ExpertParallelStrategy", "--trainer.strategy.expert_parallel_size", "0"],
            "zoo: error: expert_parallel_size must be a positive integer, got 0",
        ),
        (["--model.init_args.optimizer.lr", "-1"], "zoo: error: the optimizer refused its arguments: Invalid"),
        (["--optimizer", "SGD", "--optimizer.lr", "-1"], "zoo: error: the optimizer refused its arguments: Invalid"),
        pytest.param(  # a logger whose package is missing: the line says which (jsonargparse spreads it on lines)
            ["--trainer.logger", "WandbLogger"],
            "zoo: error: Problem with given class_path 'lightning.pytorch.loggers.WandbLogger': Requirement 'wandb",
            marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed"),
        ),
        (  # an optimizer argument with optimizer null (the family's default): no class to take it
            ["--model.init_args.optimizer", "null", "--model.init_args.optimizer.lr", "0.05", "--print_config"],
            "zoo: error: optimizer.lr: this configuration names no optimizer class",
        ),
    ],
)
def test_strategy_and_optimizer_arguments_are_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A strategy built from options (jsonargparse keeps only the text of its constructor's error, inside a union
    report) and an optimizer refusing its hyperparameters end in one line, not a traceback."""
    monkeypatch.chdir(tmp_path)
    config = "digits_vmoe_expert_parallel" if "strategy" in argv[0] else "digits_depth_scaled_resnet"
    code, _, err = run_main(["fit", "--config", config, "--trainer.max_epochs=1", *argv], capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(message)
    if "refused" in message:  # the fix names the option the user may have used, LightningCLI's or the model's
        assert "--optimizer.<argument>" in line and "--model.init_args.optimizer.<argument>" in line
    if "null" in argv:  # the fix names the class first, in both forms
        assert "--model.init_args.optimizer SGD --model.init_args.optimizer.lr" in line
        assert "--optimizer SGD --optimizer.lr" in line


# ------------------------------------------------------------------------------------------------
# LightningCLI's --optimizer / --lr_scheduler


def _cli(tmp_path: Path, *argv: str) -> ZooCLI:
    """The digits recipe (tiny overrides) built by ZooCLI without running, with ``argv`` added."""
    return ZooCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=[
            "--config",
            str(DIGITS),
            *TINY_MODEL,
            *TINY_DATA,
            *QUICK,
            "--trainer.default_root_dir",
            str(tmp_path),
            *argv,
        ],
    )


def _decay_of(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> float:
    (group,) = [g for g in optimizer.param_groups if any(p is parameter for p in g["params"])]
    return group["weight_decay"]


def test_cli_optimizer_option_keeps_the_parameter_groups_and_the_recipe_schedule(tmp_path: Path) -> None:
    """``--optimizer AdamW --optimizer.lr ...`` (LightningCLI's way) replaces the optimiser only: norms and biases
    keep no weight decay, and the recipe's run-length schedule stays (Lightning's own override would put every
    parameter in one decayed group and drop the schedule)."""
    cli = _cli(tmp_path, "--optimizer", "AdamW", "--optimizer.lr", "0.003", "--optimizer.weight_decay", "0.2")
    config = cli.model.configure_optimizers(total_steps=10, steps_per_epoch=5)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.AdamW
    assert scheduler.base_lrs == [0.003] * len(optimizer.param_groups)
    norm = next(m for m in cli.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert _decay_of(optimizer, cli.model.fc.weight) == 0.2
    assert _decay_of(optimizer, norm.weight) == 0.0 and _decay_of(optimizer, cli.model.fc.bias) == 0.0
    # the recipe's schedule (cosine over the run, stepped per optimiser step)
    assert isinstance(scheduler, zoo.tasks.optim.WarmupCosineLR)
    assert config["lr_scheduler"]["interval"] == "step"


def test_cli_lr_scheduler_option_alone_replaces_the_schedule_and_keeps_the_optimizer(tmp_path: Path) -> None:
    """``--lr_scheduler`` without ``--optimizer`` is not dropped (Lightning ignores it then): it replaces the
    recipe's schedule, over the recipe's optimiser; Lightning's ``ReduceLROnPlateau`` keeps its ``monitor``."""
    cli = _cli(tmp_path, "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "3")
    config = cli.model.configure_optimizers(total_steps=10, steps_per_epoch=5)
    assert type(config["optimizer"]) is torch.optim.SGD  # the recipe's
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["scheduler"].step_size == 3
    cli = _cli(tmp_path, "--lr_scheduler", "ReduceLROnPlateau", "--lr_scheduler.monitor", "val_acc")
    config = cli.model.configure_optimizers(total_steps=10, steps_per_epoch=5)
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert config["lr_scheduler"]["monitor"] == "val_acc"


def test_cli_run_length_schedule_from_the_lr_scheduler_option_trains(tmp_path: Path) -> None:
    """``--lr_scheduler zoo.tasks.optim.WarmupCosineLR`` is bound to the Trainer's run and stepped per step: the
    learning rate falls from the optimiser's to near zero over the run's 4 steps."""
    cli = _cli(
        tmp_path,
        "--optimizer",
        "SGD",
        "--optimizer.lr",
        "0.05",
        "--lr_scheduler",
        "zoo.tasks.optim.WarmupCosineLR",
        "--trainer.max_epochs",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_checkpointing",
        "false",
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4
    (config,) = cli.trainer.lr_scheduler_configs
    assert config.interval == "step"
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 2
    assert config.scheduler.base_lrs == [0.05, 0.05]
    assert 0.0 <= optimizer.param_groups[0]["lr"] < 0.05 * 0.2


@pytest.mark.parametrize("rank", [0, 1])
def test_error_line_comes_from_each_machines_first_process_only(
    rank: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DDP every process meets the same error: only each machine's first process (LOCAL_RANK 0, as the
    launchers set it) prints the ``zoo: error:`` line, and every process exits with 2 (the launcher sees the
    failure)."""
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    code, out, err = run_main(["fit", "--config", "no_such_recipe_anywhere"], capsys)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("zoo: error:")]
    assert len(lines) == (1 if rank == 0 else 0), err
    assert rank == 0 or err == ""


def test_ckpt_path_without_config_names_the_saved_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``zoo test --ckpt_path <ckpt>`` without ``--config`` is one line that names the ``config.yaml`` zoo fit saved
    beside the checkpoint (``version_N/config.yaml`` for ``version_N/checkpoints/*.ckpt``), else says to give one."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "lightning_logs" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "epoch=0-step=2.ckpt"
    ckpt.write_bytes(b"")
    code, _, err = run_main(["test", "--ckpt_path", str(ckpt)], capsys)
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("zoo: error: ") and "--config" in line
    assert "config.yaml" in line and str(run) not in line  # nothing saved there yet
    (run / "config.yaml").write_text("seed_everything: 0\n")
    code, _, err = run_main(["test", "--ckpt_path", str(ckpt)], capsys)
    (line,) = err.strip().splitlines()
    assert code == 2 and f"--config {run / 'config.yaml'}" in line


def test_output_piped_into_a_reader_that_leaves_is_no_traceback() -> None:
    """``zoo recipes | head -1``: the reader closes the pipe after one line; zoo stops quietly with exit code 0
    (Python's default is a BrokenPipeError traceback)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "zoo.cli", "recipes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader leaves
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert first.startswith(b"cifar10_") and "Traceback" not in err and "BrokenPipe" not in err


def test_a_null_class_path_is_one_line_naming_what_to_give(capsys: pytest.CaptureFixture[str]) -> None:
    """``--model.class_path null`` (or ``class_path: null`` in a file) is one line that says so and what to give,
    not jsonargparse's bare 'Parser key "model":'."""
    code, _, err = run_main(["test", "--config=digits_depth_scaled_resnet", "--model.class_path", "null"], capsys)
    (line,) = [x for x in err.splitlines() if x.startswith("zoo: error:")]
    assert code == 2
    assert line == (
        "zoo: error: model: class_path is null: give a zoo model class (zoo.models.<Class>; see zoo.list_models())"
    )
