"""A reversible momentum ResidualStack under Lightning DDP (2 CPU processes, gloo): the gradients
after DDP's all-reduce equal those of one process on the same global batch.

The model is a stack of MLP blocks (no BatchNorm, whose per-process statistics would differ, and no
dropout). Each rank gets a disjoint half of a fixed global batch of 2B samples (DistributedSampler,
shuffle off: rank r takes samples r, r + 2, ...), the loss is a mean over the local B samples, and DDP
averages the two ranks' gradients: the gradient of the mean loss over the 2B samples. Rank 0 saves
its gradients in ``on_before_optimizer_step``; the test compares them with a single-process run on the
global batch, for memory="reversible" and memory="full", and checks that the comparison would catch
a difference (one rank's half alone gives other gradients).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from zoo.nn import ResidualStack

HERE = Path(__file__).resolve().parent
B = 4  # samples per process; the global batch is 2B
MEMORIES = ("reversible", "full")


class MLPBlock(nn.Module):
    """f(x) = W2 tanh(W1 x + b1) + b2: a residual function without BatchNorm or dropout."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class MomentumMLP(pl.LightningModule):
    """Linear embedding, a momentum stack of ``depth`` MLP blocks (gamma 0.9), linear classifier."""

    def __init__(self, memory: str, grad_file: str | None = None, depth: int = 6, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights in every process and every run
        self.embed = nn.Linear(8, dim)
        self.stack = ResidualStack(
            [MLPBlock(dim, 32) for _ in range(depth)], rule="momentum", gamma=0.9, memory=memory, init_velocity="f"
        )
        self.head = nn.Linear(dim, 3)
        self.grad_file = grad_file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stack(self.embed(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)  # mean over this process's samples

    def on_before_optimizer_step(self, optimizer) -> None:  # after DDP's all-reduce
        if self.grad_file and self.trainer.is_global_zero:
            grads = {n: p.grad.detach().clone() for n, p in self.named_parameters()}
            grads["_world_size"] = torch.tensor(self.trainer.world_size)
            torch.save(grads, self.grad_file)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def global_batch() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(2 * B, 8, generator=g), torch.randint(0, 3, (2 * B,), generator=g))


def fit_one_step(model: MomentumMLP, batch_size: int, dataset: TensorDataset | None = None, **trainer_kwargs) -> None:
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, DataLoader(dataset or global_batch(), batch_size=batch_size, shuffle=False))


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_distributed_momentum import B, MEMORIES, MomentumMLP, fit_one_step

for memory in MEMORIES:  # one launch: rank 0 sets LOCAL_RANK, so the second Trainer reuses the processes
    model = MomentumMLP(memory, grad_file={out!r} + f"/ddp_{{memory}}.pt")
    fit_one_step(model, B, accelerator="cpu", devices=2, strategy="ddp")
"""


def assert_same_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        scale = float(g.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(got[name], g, rtol=0, atol=rtol * scale, msg=name)


@pytest.mark.distributed
def test_ddp_gradients_equal_single_process_on_the_global_batch(tmp_path):
    script = tmp_path / "ddp_momentum.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(HERE), out=str(tmp_path))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    assert elapsed < 120, elapsed

    for memory in MEMORIES:
        ddp = torch.load(tmp_path / f"ddp_{memory}.pt")
        assert int(ddp.pop("_world_size")) == 2
        # one process, the whole global batch of 2B samples, mean loss
        single = MomentumMLP(memory, grad_file=str(tmp_path / f"single_{memory}.pt"))
        assert single.stack.memory == memory
        fit_one_step(single, 2 * B, accelerator="cpu", devices=1)
        ref = torch.load(tmp_path / f"single_{memory}.pt")
        assert int(ref.pop("_world_size")) == 1
        assert any(n.startswith("stack.") for n in ref)
        assert_same_grads(ddp, ref)

        # the check is sharp: rank 0's half of the batch alone gives other gradients
        x, y = global_batch().tensors
        half = MomentumMLP(memory, grad_file=str(tmp_path / f"half_{memory}.pt"))
        fit_one_step(half, B, TensorDataset(x[0::2], y[0::2]), accelerator="cpu", devices=1)
        other = torch.load(tmp_path / f"half_{memory}.pt")
        other.pop("_world_size")
        with pytest.raises(AssertionError):
            assert_same_grads(ddp, other)

    # reversible backprop gives autograd's gradients (to the fixed-point rounding of the forward)
    rev, full = torch.load(tmp_path / "ddp_reversible.pt"), torch.load(tmp_path / "ddp_full.pt")
    rev.pop("_world_size"), full.pop("_world_size")
    assert_same_grads(rev, full, rtol=1e-5)
