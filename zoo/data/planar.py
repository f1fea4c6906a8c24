"""Small generated regression problems in one and two dimensions, on which two-layer ReLU networks are studied
(inputs augmented with a constant 1, so that a neuron of a 1-d problem is a point of the plane: slope and bias).

- ``"sine"``: x_j on a uniform grid of [-1, 1], y = sin(4 x - pi/2) (1-d inputs: neurons in R^2).
- ``"linear"``: x_j on a uniform grid of [-1, 1], y = 0.5 x + 0.6 (1-d inputs; five points by default).
- ``"disc"``: x_j uniform on [-1, 1]^2, y = +1 inside the disc of radius sqrt(2 / pi) (half of the square's
  area, so the two classes are balanced), -1 outside: a 2-d classification problem regressed on +-1 labels with
  the squared loss (2-d inputs: neurons in R^3).

The training points of the 1-d problems are the grid (``num_train`` points); their validation points are drawn
uniformly on [-1, 1]; the disc's points are all drawn uniformly. Everything is generated from ``seed``, in float32.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from zoo.data.base import ZooDataModule
from zoo.validation import choice, finite_float, integer, non_negative_int, positive_int

__all__ = ["PLANAR_PROBLEMS", "PlanarDataModule", "planar_problem"]

PLANAR_PROBLEMS = ("sine", "linear", "disc")
_DEFAULT_POINTS = {"sine": 20, "linear": 5, "disc": 64}


def _seed(seed: int) -> int:
    """``seed`` checked: an integer (numpy's too) that torch's generator takes, with room for the val split's
    seed + 1."""
    return integer("seed", seed, -(2**63), 2**64 - 2, hint="give a seed in [-2**63, 2**64 - 2]")


def _targets(problem: str, x: torch.Tensor) -> torch.Tensor:
    if problem == "sine":
        return torch.sin(4 * x[:, 0] - math.pi / 2)
    if problem == "linear":
        return 0.5 * x[:, 0] + 0.6
    inside = x.pow(2).sum(dim=1) < 2 / math.pi
    return torch.where(inside, 1.0, -1.0)


def planar_problem(
    problem: str, num_points: int | None = None, split: str = "train", seed: int = 0, noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, d) and targets (n,) of a generated problem (see the module docstring), float32.

    Args:
        problem: "sine", "linear" or "disc".
        num_points: n (None: 20 for sine, 5 for linear, 64 for disc).
        split: "train" (the grid of the 1-d problems) or "val" (uniform random points).
        seed: seed of the random points and of the noise.
        noise: standard deviation of Gaussian noise added to the targets.
    """
    choice("problem", problem, PLANAR_PROBLEMS)
    choice("split", split, ("train", "val"))
    n = _DEFAULT_POINTS[problem] if num_points is None else positive_int("num_points", num_points)
    finite_float("noise", noise, 0.0)
    g = torch.Generator().manual_seed(_seed(seed) + (0 if split == "train" else 1))
    if problem == "disc":
        x = torch.rand(n, 2, generator=g) * 2 - 1
    elif split == "train":
        x = torch.linspace(-1.0, 1.0, n)[:, None]
    else:
        x = torch.rand(n, 1, generator=g) * 2 - 1
    y = _targets(problem, x)
    if noise:
        y = y + noise * torch.randn(n, generator=g)
    return x, y


class PlanarDataModule(ZooDataModule):
    """One of the generated problems of :func:`planar_problem` as a LightningDataModule: batches (x, y) with x
    (B, d) and y (B,). Val, test and predict read the validation points.

    Args:
        problem: "sine", "linear" or "disc".
        num_train: training points (None: the problem's default, 20 / 5 / 64).
        num_val: validation points.
        noise: standard deviation of Gaussian noise on the training targets.
        seed: seed of the generated points.
        batch_size: samples per batch; None: the whole training set (full-batch training, as the proximal-point
            method is defined).
        num_workers: DataLoader worker processes.
    """

    test_split = "val"

    def __init__(
        self,
        problem: str = "sine",
        num_train: int | None = None,
        num_val: int = 200,
        noise: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        choice("problem", problem, PLANAR_PROBLEMS)
        n = _DEFAULT_POINTS[problem] if num_train is None else positive_int("num_train", num_train)
        positive_int("num_val", num_val)
        finite_float("noise", noise, 0.0)
        _seed(seed)
        non_negative_int("num_workers", num_workers)
        super().__init__(n if batch_size is None else batch_size, num_workers)
        self.save_hyperparameters()
        self.problem = problem
        self.num_train = n

    @property
    def in_features(self) -> int:
        """Input dimension d of the problem."""
        return 2 if self.problem == "disc" else 1

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        x, y = planar_problem(self.problem, self.num_train, "train", hp.seed, hp.noise)
        self.train_dataset = TensorDataset(x, y)
        self.val_dataset = TensorDataset(*planar_problem(self.problem, hp.num_val, "val", hp.seed))
