"""An embedded regression task: targets given by a random mean-field ResNet (the teacher), generated
deterministically from a seed, so it needs no network and no files.

Inputs x ~ N(0, I_d); targets y = T(x) with T the flow of ``teacher_depth`` Euler steps of 1/S_T of the residual
function F(x) = (1/M_T) sum_i u_i cos(w_i . x + b_i), u_i ~ N(0, teacher_scale^2 I), w_i ~ N(0, I / 2)
(density ~ exp(-|w|^2)), b_i ~ U([0, pi]), plus optional Gaussian noise of standard deviation ``noise``. A
mean-field ResNet of the same dimension can represent the teacher exactly (with M >= M_T and S = S_T), and it starts
as the identity (u = 0), so its initial risk is (1/2N) sum |T(x_n) - x_n|^2.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from zoo.data.base import ZooDataModule
from zoo.validation import finite_float, integer, positive_int

__all__ = ["TeacherDataModule", "teacher_regression"]

_SAMPLE_SEED = 1_000_003  # the samples' generator is seeded with seed + this: a stream apart from the teacher's


def teacher_regression(
    num_samples: int,
    dim: int = 4,
    teacher_width: int = 16,
    teacher_depth: int = 4,
    teacher_scale: float = 4.0,
    noise: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` pairs (x, y) of the teacher task (float32), the same for the same arguments on every
    machine (drawn in float64 on the CPU from a generator seeded with ``seed``). The teacher itself depends on
    ``seed``, ``dim``, ``teacher_width`` and ``teacher_depth`` only, so every split made with one seed shares it.

    Args:
        num_samples: number of pairs.
        dim: dimension d of x and y.
        teacher_width: neurons per layer M_T of the teacher.
        teacher_depth: layers S_T of the teacher.
        teacher_scale: standard deviation of the teacher's output weights u.
        noise: standard deviation of the Gaussian noise added to y.
        seed: seed of the teacher and of the samples.
    """
    num_samples = positive_int("num_samples", num_samples)
    dim = positive_int("dim", dim)
    teacher_width = positive_int("teacher_width", teacher_width)
    teacher_depth = positive_int("teacher_depth", teacher_depth)
    teacher_scale = finite_float("teacher_scale", teacher_scale, 0.0)
    noise = finite_float("noise", noise, 0.0)
    # numpy integers too; within the range of torch's seeds, with room for the samples' stream (seed + SAMPLE_SEED)
    seed = integer("seed", seed, -(2**63), 2**64 - 1 - _SAMPLE_SEED, hint="give a seed in [-2**63, 2**64 - 1_000_004]")
    g = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64, "generator": g}
    layers = [
        (
            teacher_scale * torch.randn(teacher_width, dim, **f64),
            torch.randn(teacher_width, dim, **f64) / math.sqrt(2.0),
            math.pi * torch.rand(teacher_width, **f64),
        )
        for _ in range(teacher_depth)
    ]
    # the samples from a second stream, so that the teacher does not depend on num_samples
    gs = torch.Generator().manual_seed(seed + _SAMPLE_SEED)
    x = torch.randn(num_samples, dim, dtype=torch.float64, generator=gs)
    y = x
    for u, w, b in layers:
        y = y + torch.cos(y @ w.T + b) @ u / (teacher_width * teacher_depth)
    if noise:
        y = y + noise * torch.randn(num_samples, dim, dtype=torch.float64, generator=gs)
    return x.float(), y.float()


class TeacherDataModule(ZooDataModule):
    """The teacher regression task (see the module docstring) as train / val / test splits, drawn once from
    ``num_train + num_val + num_test`` samples of one teacher.

    Args:
        dim: dimension d of inputs and targets.
        num_train, num_val, num_test: samples per split.
        teacher_width: neurons per layer of the teacher.
        teacher_depth: layers of the teacher.
        teacher_scale: standard deviation of the teacher's output weights.
        noise: standard deviation of the noise on the targets.
        seed: seed of the teacher and the samples.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        dim: int = 4,
        num_train: int = 512,
        num_val: int = 128,
        num_test: int = 128,
        teacher_width: int = 16,
        teacher_depth: int = 4,
        teacher_scale: float = 4.0,
        noise: float = 0.0,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            positive_int(name, value)
        # checks the teacher's arguments now rather than at setup
        teacher_regression(1, dim, teacher_width, teacher_depth, teacher_scale, noise, seed)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        h = self.hparams
        x, y = teacher_regression(
            h.num_train + h.num_val + h.num_test,
            h.dim,
            h.teacher_width,
            h.teacher_depth,
            h.teacher_scale,
            h.noise,
            h.seed,
        )
        a, b = h.num_train, h.num_train + h.num_val
        self.train_dataset = TensorDataset(x[:a], y[:a])
        self.val_dataset = TensorDataset(x[a:b], y[a:b])
        self.test_dataset = TensorDataset(x[b:], y[b:])
