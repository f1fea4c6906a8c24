"""The translation recipe under Lightning DDP as written (no ``use_distributed_sampler: false``, which it needed
before: Lightning could not inject its sampler into the token-batch sampler): 2 CPU processes (gloo) through the
zoo CLI train the numbers recipe on a small draw; its checkpoint validated on one process gives the metrics the
2-process validation reported: the token-batch sampler shards the validation examples so that each is seen once
(an example seen twice or missed would change the loss, BLEU and exact-match accuracy)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.data.translation import NumbersDataModule

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "zoo" / "recipes" / "nmt" / "numbers_sinkformer.yaml"
# a small numbers task (numbers below 10^4): 41 validation sentences in 5 batches, odd numbers both, so that sharding
# the batches with padding (as for training) would count a batch twice
SIZES = {"train_size": 400, "valid_size": 41, "test_size": 8, "max_number": 9999, "max_tokens": 64}
DATA = [arg for k, v in SIZES.items() for arg in (f"--data.init_args.{k}", str(v))]


def zoo(tmp_path: Path, subcommand: str, *args: str, devices: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "zoo.cli",
        subcommand,
        "--config",
        str(RECIPE),
        *DATA,
        *args,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def reported(proc: subprocess.CompletedProcess) -> dict[str, float]:
    """The metrics of the ``zoo: val_...`` line (printed once, by rank 0)."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("zoo: val_")]
    assert len(lines) == 1, proc.stdout
    return {k: float(v) for k, v in re.findall(r"(val_\w+) (-?[0-9.]+|nan)", lines[0])}


@pytest.mark.distributed
def test_numbers_recipe_trains_and_validates_under_ddp_as_written(tmp_path: Path) -> None:
    assert "use_distributed_sampler" not in RECIPE.read_text()
    dm = NumbersDataModule(**SIZES)
    assert len(dm.val_dataloader()) % 2 == 1
    # 5 epochs (about 100 updates a process) with a short warm-up: enough for non-zero BLEU and exact matches
    fit = zoo(
        tmp_path,
        "fit",
        "--trainer.max_epochs",
        "5",
        "--model.init_args.lr_scheduler.init_args.warmup_updates",
        "5",
        devices=2,
    )
    assert "distributed_backend=gloo" in fit.stderr + fit.stdout
    trained = reported(fit)
    assert {"val_loss", "val_bleu", "val_exact", "val_exact_len1", "val_exact_len4"} <= set(trained)
    assert trained["val_bleu"] > 1 and trained["val_exact"] > 0  # it learned something: the comparison can fail
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert len(ckpts) == 1
    # fit's last validation (2 processes) was of the checkpoint's weights: one process gives the same metrics
    one = reported(zoo(tmp_path, "validate", "--ckpt_path", str(ckpts[0]), devices=1))
    assert set(trained) == set(one) and trained == pytest.approx(one, abs=2e-4)  # printed with 4 decimals
