"""Multi-process training for real: Lightning DDP on 2 CPU processes (gloo) through the zoo CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.distributed
@pytest.mark.parametrize("memory", ["adjoint"])  # SyncBatchNorm needs GPUs: not here
def test_ddp_two_cpu_processes(tmp_path, memory):
    cmd = [
        sys.executable,
        "-m",
        "zoo.cli",
        "fit",
        "--config",
        str(ROOT / "recipes/digits_depth_scaled_resnet.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--model.init_args.memory",
        memory,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("zoo: val_acc")]
    assert len(lines) == 1, proc.stdout  # printed once, by rank 0
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert len(ckpts) == 1 and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.distributed
def test_ddp_two_cpu_processes_vmoe_soft_router(tmp_path):
    """Every expert and the router take part in every step (no unused parameters under DDP); the routing
    statistics are logged and synchronised across the two processes."""
    cmd = [
        sys.executable,
        "-m",
        "zoo.cli",
        "fit",
        "--config",
        str(ROOT / "recipes/digits_vmoe_soft.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("zoo: val_acc")]
    assert len(lines) == 1 and "val_moe/router_entropy" in lines[0], proc.stdout
