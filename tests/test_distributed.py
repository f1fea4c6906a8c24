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


@pytest.mark.distributed
def test_ddp_fit_resumed_from_a_checkpoint_repeats_the_uninterrupted_fit(tmp_path):
    """DDP on 2 CPU processes, a ViT with dropout, drop-path, MixUp and random shifts (loaded in the main processes:
    a loader worker forked beside gloo's threads can hang at its start on CPU; the single-process tests cover
    workers): 2 epochs straight, and 1 epoch then a resume from its checkpoint for the second (constant rate, so
    the two schedules agree), end with bit-identical weights: each rank's shard of the order, its augmentation and
    its random draws follow the seed and the epoch, and every rank restores the checkpoint's generator state."""
    import torch

    def fit(name: str, epochs: int, ckpt: Path | None = None) -> Path:
        root = tmp_path / name
        cmd = [
            sys.executable, "-m", "zoo.cli", "fit", "--config", str(ROOT / "recipes/digits_sinkformer_vit.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.max_epochs", str(epochs), "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--model.init_args.drop_rate", "0.2",
            "--model.init_args.drop_path_rate", "0.2", "--model.init_args.mixup_alpha", "0.8",
            "--model.init_args.lr_scheduler", "null", "--data.init_args.augment", "true",
            "--data.init_args.num_workers", "0",
        ]  # fmt: skip
        if ckpt is not None:
            cmd += ["--ckpt_path", str(ckpt)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (path,) = root.rglob("*.ckpt")
        return path

    straight = torch.load(fit("straight", 2), weights_only=True)["state_dict"]
    first = fit("first", 1)
    resumed = torch.load(fit("resumed", 2, first), weights_only=True)["state_dict"]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    one_epoch = torch.load(first, weights_only=True)["state_dict"]
    assert not all(torch.equal(straight[k], one_epoch[k]) for k in straight)  # the second epoch trained
