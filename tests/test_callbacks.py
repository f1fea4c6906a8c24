"""zoo.callbacks.PredictionWriter: the predictions of a real (tiny) digits model written to .pt and .csv in the
dataset's order, checked against the model applied to the data directly; per-sample outputs of other shapes
(a tuple of dicts, as the translation task returns); the errors; and a 2-process DDP run (gloo) through
``zoo predict`` whose file equals the one-process file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo.callbacks import PredictionWriter
from zoo.cli import main
from zoo.data import DigitsDataModule
from zoo.errors import ZooError
from zoo.models import DepthScaledResNet

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--model.init_args.layers", "[1,1,1]", "--model.init_args.widths", "[4,8,8]"]
TINY_DATA = ["--data.init_args.image_size", "8", "--data.init_args.batch_size", "16"]
QUIET = [
    "--trainer.enable_model_summary",
    "false",
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
]


def tiny_model(seed: int = 0) -> DepthScaledResNet:
    torch.manual_seed(seed)
    model = DepthScaledResNet(layers=[1, 1, 1], widths=[4, 8, 8], stem="cifar", num_classes=10)
    for m in model.modules():  # non-trivial batch-norm statistics, so that eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=8, batch_size=16, augment=False)
    dm.setup()
    return dm


def predict(
    model: pl.LightningModule,
    writer: PredictionWriter,
    datamodule: pl.LightningDataModule | None = None,
    dataloaders: DataLoader | None = None,
) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    trainer.predict(model, datamodule=datamodule, dataloaders=dataloaders, return_predictions=False)


def expected_probabilities(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images).softmax(dim=1)


def leftovers(folder: Path) -> list[str]:
    """atomic_write's temporaries (``.name.*.tmp``) left in ``folder``."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_pt_holds_class_probabilities_in_dataset_order(digits: DigitsDataModule, tmp_path: Path) -> None:
    model = tiny_model()
    writer = PredictionWriter(tmp_path / "out" / "preds.pt")
    predict(model, writer, datamodule=digits)
    data = torch.load(tmp_path / "out" / "preds.pt", weights_only=True)
    assert set(data) == {"index", "predictions"}
    n = len(digits.test_images)
    assert torch.equal(data["index"], torch.arange(n))
    torch.testing.assert_close(
        data["predictions"], expected_probabilities(model, digits.test_images), rtol=1e-5, atol=1e-6
    )
    assert writer.written == n and writer.summary() == f"wrote {n} predictions to {tmp_path / 'out' / 'preds.pt'}"
    assert leftovers(tmp_path / "out") == []


def test_csv_rows_and_top_k(digits: DigitsDataModule, tmp_path: Path) -> None:
    model = tiny_model(1)
    expected = expected_probabilities(model, digits.test_images)
    predict(model, PredictionWriter(tmp_path / "probs.csv"), datamodule=digits)
    rows = list(csv.reader((tmp_path / "probs.csv").open()))
    assert rows[0] == ["index", *digits.class_names]
    table = torch.tensor([[float(x) for x in row] for row in rows[1:]], dtype=torch.float64)
    assert torch.equal(table[:, 0], torch.arange(len(expected), dtype=torch.float64))
    torch.testing.assert_close(table[:, 1:], expected.double(), rtol=1e-5, atol=1e-6)

    predict(model, PredictionWriter(tmp_path / "top3.csv", top_k=3), datamodule=digits)
    rows = list(csv.reader((tmp_path / "top3.csv").open()))
    assert rows[0] == ["index", "top1_class", "top1_score", "top2_class", "top2_score", "top3_class", "top3_score"]
    classes = torch.tensor([[int(row[i]) for i in (1, 3, 5)] for row in rows[1:]])
    scores = torch.tensor([[float(row[i]) for i in (2, 4, 6)] for row in rows[1:]])
    # against the probabilities ranked here: the classes picked hold the scores written, best first
    torch.testing.assert_close(expected.gather(1, classes), scores, rtol=1e-5, atol=1e-6)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert torch.equal(scores[:, 0], expected.max(dim=1).values)

    predict(model, PredictionWriter(tmp_path / "top2.pt", top_k=2), datamodule=digits)
    data = torch.load(tmp_path / "top2.pt", weights_only=True)
    values, indices = expected.sort(dim=1, descending=True)
    assert torch.equal(data["predictions"]["indices"], indices[:, :2])
    torch.testing.assert_close(data["predictions"]["values"], values[:, :2], rtol=1e-5, atol=1e-6)


class Translator(pl.LightningModule):
    """predict_step in the translation task's form: a tuple of per-sample dicts with tokens of varying length."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> tuple[dict, ...]:
        (ids,) = batch
        return tuple(
            {"id": int(i), "tokens": torch.arange(int(i) % 4 + 1), "score": -float(i) / 2, "text": f"s{i}"} for i in ids
        )


def test_per_sample_dicts_of_any_shape(tmp_path: Path) -> None:
    loader = DataLoader(TensorDataset(torch.arange(10) * 10), batch_size=4)
    predict(Translator(), PredictionWriter(tmp_path / "mt.pt"), dataloaders=loader)
    data = torch.load(tmp_path / "mt.pt", weights_only=True)
    assert torch.equal(data["index"], torch.arange(10))
    out = data["predictions"]
    assert torch.equal(out["id"], torch.arange(10) * 10)
    assert [t.tolist() for t in out["tokens"]] == [list(range(i * 10 % 4 + 1)) for i in range(10)]
    assert torch.equal(out["score"], -torch.arange(10) * 10 / 2)
    assert out["text"] == [f"s{i * 10}" for i in range(10)]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"output": "preds.txt"}, [".pt", ".csv"]),
        ({"output": "preds.pt", "top_k": 0}, ["top_k=0"]),
    ],
)
def test_bad_arguments(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ZooError) as info:
        PredictionWriter(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_folder_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out.pt").mkdir()
    for folder in (tmp_path, tmp_path / "out.pt"):
        with pytest.raises(ZooError, match="is a folder"):
            PredictionWriter(folder)


class Volumes(pl.LightningModule):
    """predict_step returning (B, 2, 3) per batch: not one row per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.batches = 0

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches += 1
        return batch[0].float().view(-1, 1, 1).expand(-1, 2, 3)


def test_unwritable_predictions_fail_on_the_first_batch(tmp_path: Path) -> None:
    loader = DataLoader(TensorDataset(torch.arange(12)), batch_size=4)
    model = Volumes()
    with pytest.raises(ZooError, match=r"\.csv holds one row.*shape \(4, 2, 3\).*\.pt"):
        predict(model, PredictionWriter(tmp_path / "v.csv"), dataloaders=loader)
    assert model.batches == 1  # refused before predicting the rest
    with pytest.raises(ZooError, match=r"top_k=2 needs class scores"):
        predict(Volumes(), PredictionWriter(tmp_path / "v.pt", top_k=2), dataloaders=loader)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written
    predict(Volumes(), PredictionWriter(tmp_path / "v.pt"), dataloaders=loader)  # a .pt keeps any shape
    assert torch.load(tmp_path / "v.pt", weights_only=True)["predictions"].shape == (12, 2, 3)


# ------------------------------------------------------------------------------------------------ zoo predict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning checkpoint of the tiny model (written by a Trainer, no training needed)."""
    root = tmp_path_factory.mktemp("writer_ckpt")
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        default_root_dir=root,
    )
    dm = DigitsDataModule(image_size=8, batch_size=16)
    trainer.fit(tiny_model(2).train(), datamodule=dm)
    path = root / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def zoo_predict_args(ckpt: Path, output: Path) -> list[str]:
    """``zoo predict`` with the recipe given by name and the writer added on the command line (README's form)."""
    return [
        "predict",
        "--config",
        "digits_depth_scaled_resnet",
        *TINY_MODEL,
        *TINY_DATA,
        *QUIET,
        "--trainer.accelerator",
        "cpu",
        "--ckpt_path",
        str(ckpt),
        "--trainer.callbacks+=zoo.callbacks.PredictionWriter",
        "--trainer.callbacks.output",
        str(output),
    ]


def test_zoo_predict_writes_the_file(
    checkpoint: Path, digits: DigitsDataModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        main(zoo_predict_args(checkpoint, tmp_path / "preds.pt"))
    assert f"zoo: wrote {len(digits.test_images)} predictions to {tmp_path / 'preds.pt'}" in out.getvalue()
    data = torch.load(tmp_path / "preds.pt", weights_only=True)
    model = DepthScaledResNet.load_from_checkpoint(checkpoint, map_location="cpu")
    torch.testing.assert_close(
        data["predictions"], expected_probabilities(model, digits.test_images), rtol=1e-5, atol=1e-6
    )


@pytest.mark.distributed
def test_zoo_predict_under_ddp_writes_one_file_in_dataset_order(
    checkpoint: Path, digits: DigitsDataModule, tmp_path: Path
) -> None:
    """2 CPU processes (gloo): Lightning's predict sampler deals the samples out in turn (0, 2, 4, ... and 1, 3,
    ...); rank 0 writes one file, in dataset order, equal to the model applied to the test images here."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    cmd = [
        sys.executable,
        "-m",
        "zoo.cli",
        *zoo_predict_args(checkpoint, tmp_path / "ddp.csv"),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.callbacks.top_k",
        "2",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    n = len(digits.test_images)
    assert [x for x in proc.stdout.splitlines() if x.startswith("zoo: ")] == [
        f"zoo: wrote {n} predictions to {tmp_path / 'ddp.csv'}"
    ]  # printed once, by rank 0
    rows = list(csv.reader((tmp_path / "ddp.csv").open()))[1:]
    assert [int(row[0]) for row in rows] == list(range(n))
    model = DepthScaledResNet.load_from_checkpoint(checkpoint, map_location="cpu")
    values, indices = expected_probabilities(model, digits.test_images).topk(2, dim=1)
    assert torch.equal(torch.tensor([[int(row[1]), int(row[3])] for row in rows]), indices)
    torch.testing.assert_close(
        torch.tensor([[float(row[2]), float(row[4])] for row in rows]), values, rtol=1e-5, atol=1e-6
    )
    assert leftovers(tmp_path) == []
