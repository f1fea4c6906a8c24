"""Modules on the sparse top-k operators of :mod:`zoo.ops.topk`.

* :class:`SmoothTopKLoss`: the Fenchel-Young form of a smooth top-k loss,

      loss(x, t) = f_R(x) - <x, t>,   f_R(x) = max_{0 <= y <= 1, sum y = k} <x, y> - R(y),   R(y) = (lam/p) ||y||_p^p

  f_R is the smoothed sum of the k largest scores and grad f_R = soft_topk_mask(x), so d loss / dx =
  soft_topk_mask(x) - t. (It differs from the Fenchel-Young loss f_R(x) + R(t) - <x, t> by R(t), a constant
  that does not change the gradient.) Published fine-tuning setting: ViT-B/16 on CIFAR-100, SGD momentum 0.9,
  batch 512, 100 steps, cosine schedule with warm-up.
* :class:`SoftTopKMagnitude` and :func:`prune_magnitude`: weight pruning through a parametrization
  weight = soft_topk_magnitude(raw, k) (keeps about k entries of largest magnitude, differentiable). Published
  setting: MLP 784-32-32-10 on MNIST, keep 10% of the weights, lam = 1e-4, SGD lr 1e-2, batch 128, 30 epochs.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from zoo._deprecation import renamed_arguments, renamed_attribute
from zoo.errors import ZooError
from zoo.ops.topk import check_relaxed, soft_topk_magnitude, soft_topk_mask

__all__ = ["SmoothTopKLoss", "SoftTopKMagnitude", "prune_magnitude"]

REDUCTIONS = ("mean", "sum", "none")


class SmoothTopKLoss(nn.Module):
    """loss(x, t) = f_R(x) - <x, t> along the last dim of x (classes), f_R the smoothed sum of the top k.

    Args:
        k: how many classes the smoothed top-k sums (1 <= k <= number of classes).
        p: 2 or 4/3, the exponent of the regulariser (as in :func:`zoo.ops.topk.soft_topk_mask`).
        lam: regularisation strength > 0.
        solver: ``"pav"`` (exact) or ``"dykstra"`` (p = 2 only; approximate).
        dykstra_iters: Dykstra iterations (ignored by PAV).
        n_iter: deprecated name of ``dykstra_iters`` (FutureWarning; giving both is an error).
        reduction: ``"mean"`` (over all leading dims), ``"sum"`` or ``"none"`` (shape x.shape[:-1]).

    ``forward(x, target)``: x of shape (..., C); target either class indices (integer, shape x.shape[:-1]; t is
    their one-hot) or a dense float tensor of x's shape (a k-hot vector or probabilities). The value is computed
    as <x, y*> - R(y*) - <x, t> with y* = soft_topk_mask(x) detached: by the envelope theorem its autograd
    gradient is exactly y* - t.
    """

    n_iter = renamed_attribute("n_iter", "dykstra_iters")

    @renamed_arguments(n_iter="dykstra_iters")
    def __init__(
        self,
        k: int = 1,
        p: float = 2.0,
        lam: float = 1.0,
        solver: str = "pav",
        dykstra_iters: int = 100,
        reduction: str = "mean",
        *,
        n_iter: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ZooError(f"SmoothTopKLoss: k must be an int >= 1, got {k!r}")
        p43 = check_relaxed("SmoothTopKLoss", p, lam, solver, dykstra_iters)
        if reduction not in REDUCTIONS:
            raise ZooError(f"SmoothTopKLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.k, self.p, self.lam, self.solver, self.dykstra_iters = int(k), float(p), float(lam), solver, dykstra_iters
        self.reduction = reduction
        self._q = 4.0 / 3.0 if p43 else 2.0

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, p={self.p:.4g}, lam={self.lam:g}, solver={self.solver!r}, "
            f"dykstra_iters={self.dykstra_iters}, reduction={self.reduction!r}"
        )

    def _target(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        if target.is_floating_point():
            if target.shape != x.shape:
                raise ZooError(
                    f"SmoothTopKLoss: a dense target must have x's shape {tuple(x.shape)}, got {tuple(target.shape)}"
                )
            return target.to(x.dtype)
        if target.dtype == torch.bool or target.is_complex() or target.shape != x.shape[:-1]:
            raise ZooError(
                f"SmoothTopKLoss: target must be class indices (an integer tensor of shape "
                f"{tuple(x.shape[:-1])}) or a float tensor of shape {tuple(x.shape)}, got "
                f"{target.dtype} {tuple(target.shape)}"
            )
        if target.device.type == "cpu" and target.numel() and (bool((target < 0).any()) or bool((target >= C).any())):
            raise ZooError(
                f"SmoothTopKLoss: class indices must be in [0, {C - 1}], got values in "
                f"[{int(target.min())}, {int(target.max())}]"
            )
        return torch.zeros_like(x).scatter_(-1, target.long().unsqueeze(-1), 1.0)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise ZooError("SmoothTopKLoss: x must be a floating-point tensor of scores (..., C)")
        if self.k > x.shape[-1]:
            raise ZooError(f"SmoothTopKLoss: k = {self.k} exceeds the number of classes C = {x.shape[-1]}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xw = x.to(work)
        t = self._target(xw, target)
        with torch.no_grad():
            y = soft_topk_mask(
                xw, self.k, dim=-1, p=self.p, lam=self.lam, solver=self.solver, dykstra_iters=self.dykstra_iters
            )
            reg = (self.lam / self._q) * y.abs().pow(self._q).sum(-1)
        loss = (xw * (y - t)).sum(-1) - reg
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


def _keep_count(keep: int | float, numel: int | None, who: str) -> int:
    """k for ``numel`` entries from a fraction in (0, 1] or an int count (checked only when numel is None)."""
    bad = isinstance(keep, bool) or not isinstance(keep, numbers.Real)
    if not bad and isinstance(keep, numbers.Integral):
        bad = int(keep) < 1
    elif not bad:
        bad = not 0.0 < float(keep) <= 1.0
    if bad:
        raise ZooError(f"{who}: keep must be a fraction in (0, 1] or an int count >= 1, got {keep!r}")
    if numel is None:
        return 0
    if isinstance(keep, numbers.Integral):
        if int(keep) > numel:
            raise ZooError(
                f"{who}: keep = {int(keep)} entries, but the weight has {numel}: keep a count in "
                f"[1, {numel}] or a fraction in (0, 1]"
            )
        return int(keep)
    return min(numel, max(1, round(float(keep) * numel)))


class SoftTopKMagnitude(nn.Module):
    """Parametrization weight = soft_topk_magnitude(raw.flatten(), k).reshape(raw.shape).

    ``keep``: a fraction of the entries in (0, 1] (k = round(keep * numel), at least 1) or an int count. With a
    small lam the weight has k nonzero entries (a few more where magnitudes nearly tie at the k-th), the largest
    in magnitude, scaled by 1 / (1 + lam) for p = 2; gradients reach every raw entry the operator keeps.

        parametrize.register_parametrization(layer, "weight", SoftTopKMagnitude(0.1, lam=1e-4))
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)  # bake the sparse weight

    Args:
        keep: a fraction of the entries in (0, 1] or an int count (above).
        p: 2 or 4/3, as in :func:`zoo.ops.topk.soft_topk_magnitude`.
        lam: regularisation strength > 0.
        solver: ``"pav"`` (exact) or ``"dykstra"`` (p = 2 only; approximate).
        dykstra_iters: Dykstra iterations (ignored by PAV).
        n_iter: deprecated name of ``dykstra_iters`` (FutureWarning; giving both is an error).
    """

    n_iter = renamed_attribute("n_iter", "dykstra_iters")

    @renamed_arguments(n_iter="dykstra_iters")
    def __init__(
        self,
        keep: int | float,
        p: float = 2.0,
        lam: float = 1e-4,
        solver: str = "pav",
        dykstra_iters: int = 100,
        *,
        n_iter: int | None = None,
    ) -> None:
        super().__init__()
        _keep_count(keep, None, "SoftTopKMagnitude")
        check_relaxed("SoftTopKMagnitude", p, lam, solver, dykstra_iters)
        self.keep, self.p, self.lam, self.solver, self.dykstra_iters = keep, float(p), float(lam), solver, dykstra_iters

    def extra_repr(self) -> str:
        return f"keep={self.keep}, p={self.p:.4g}, lam={self.lam:g}, solver={self.solver!r}"

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        k = _keep_count(self.keep, raw.numel(), "SoftTopKMagnitude")
        out = soft_topk_magnitude(
            raw.reshape(-1), k, p=self.p, lam=self.lam, solver=self.solver, dykstra_iters=self.dykstra_iters
        )
        return out.reshape(raw.shape)


def prune_magnitude(
    module: nn.Module,
    keep: int | float = 0.1,
    lam: float = 1e-4,
    p: float = 2.0,
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
) -> nn.Module:
    """Register :class:`SoftTopKMagnitude` on the ``weight`` of every ``layer_types`` layer in ``module``.

    Each layer keeps ``keep`` of its own weights (a fraction, or a count per layer). Layers whose weight already
    carries a SoftTopKMagnitude are left as they are. Returns ``module`` (changed in place). To bake the sparse
    weights in afterwards: ``parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)``.

    Args:
        module: the model to prune (changed in place).
        keep: per layer, a fraction of the weights in (0, 1] or an int count.
        lam: regularisation strength > 0 of :func:`zoo.ops.topk.soft_topk_magnitude`.
        p: 2 or 4/3, as in :func:`zoo.ops.topk.soft_topk_magnitude`.
        layer_types: the layer classes whose ``weight`` is pruned.
    """
    SoftTopKMagnitude(keep, p=p, lam=lam)  # argument checks
    layers = [
        m
        for m in module.modules()
        if isinstance(m, layer_types) and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
    if not layers:
        names = ", ".join(t.__name__ for t in layer_types)
        raise ZooError(f"prune_magnitude: {type(module).__name__} has no layer of type {names} with a weight")
    for layer in layers:
        if parametrize.is_parametrized(layer, "weight") and any(
            isinstance(pm, SoftTopKMagnitude) for pm in layer.parametrizations["weight"]
        ):
            continue
        _keep_count(keep, layer.weight.numel(), f"prune_magnitude ({type(layer).__name__})")
        parametrize.register_parametrization(layer, "weight", SoftTopKMagnitude(keep, p=p, lam=lam))
    return module
