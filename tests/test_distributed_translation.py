"""The translation recipe under Lightning DDP as written (no ``use_distributed_sampler: false``): 2 CPU processes
(gloo) through the zoo CLI train the numbers recipe, then validate its checkpoint on 2 processes and on 1; the
token-batch sampler shards the validation split so that every example is seen once, so the two validations give
the same loss, BLEU and exact-match accuracy (an example seen twice or missed would change them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "zoo" / "recipes" / "nmt" / "numbers_sinkformer.yaml"
# a small numbers task: 9 length-6 numbers at most, 47 validation sentences (an odd number: the two processes get
# different numbers of examples)
DATA = ["--data.init_args.train_size", "400", "--data.init_args.valid_size", "47", "--data.init_args.test_size", "8",
        "--data.init_args.max_number", "9999", "--data.init_args.max_tokens", "128"]


def zoo(tmp_path: Path, *args: str, devices: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "zoo.cli", *args, "--config", str(RECIPE), *DATA,
           "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
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
    fit = zoo(tmp_path, "fit", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", devices=2)
    assert "distributed_backend=gloo" in fit.stderr + fit.stdout
    trained = reported(fit)
    assert {"val_loss", "val_bleu", "val_exact", "val_exact_len1", "val_exact_len4"} <= set(trained)
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert len(ckpts) == 1
    two = reported(zoo(tmp_path, "validate", "--ckpt_path", str(ckpts[0]), devices=2))
    one = reported(zoo(tmp_path, "validate", "--ckpt_path", str(ckpts[0]), devices=1))
    print(trained, two, one)
    assert set(two) == set(one) and two == pytest.approx(one, abs=2e-4)  # printed with 4 decimals
    assert two == pytest.approx(trained, abs=2e-4)  # fit's last validation was of the same weights
