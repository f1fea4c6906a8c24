"""Proximal-point training with the Frobenius or the Wasserstein-2 distance between neurons.

A network whose hidden units are interchangeable (a two-layer network (1/M) sum_i u_i relu(w_i . x), the residual
function of a mean-field ResNet) is a function of the *empirical measure* of its neurons
mu_W = (1/M) sum_i delta_{W_i}, where the particle W_i collects the parameters of neuron i. One proximal-point
(implicit Euler) step of size gamma on an objective F is

    W_{t+1} = argmin_V  F(V) + (1 / (2 gamma)) d(V, W_t)^2

with one of two distances between the particle sets V, W (M particles each):

    Frobenius:      d_F(V, W)^2 = (1/M) sum_i |V_i - W_i|^2                        (neuron i against neuron i)
    Wasserstein-2:  d_W(V, W)^2 = min over permutations s of (1/M) sum_i |V_i - W_s(i)|^2

d_W is the Wasserstein-2 distance between the equal-weight empirical measures mu_V and mu_W (for equal weights an
optimal transport plan is a permutation, so it is an assignment problem, solved exactly by
``scipy.optimize.linear_sum_assignment``). It ignores the numbering of the neurons, so d_W <= d_F, with equality when
the identity is an optimal assignment (in particular for small steps).

The step is solved by gradient steps from V_0 = W_t, in the metric of d (a particle carries the mass 1/M, so its
gradient in that metric is M times its partial derivative):

    V_{k+1} = V_k - inner_lr * ( M dF/dV(V_k) + (V_k - W_{t, s_k}) / gamma )

with s_k the identity (Frobenius) or an optimal assignment of V_k to W_t (Wasserstein: the envelope gradient of
d_W^2 / 2 is (V - W_s) / M). With the mean-field scaling 1/M of the network, M dF/dV is the O(1) mean-field
gradient, so the same ``gamma`` and ``inner_lr`` serve every width. A fixed point satisfies the optimality
condition M dF/dV(V) + (V - W_s) / gamma = 0, i.e. V = W_s - gamma M dF/dV(V): for small gamma the step is the
gradient-descent step W - gamma M dF/dW(W) up to O(gamma^2), and both distances give the same step (the optimal
assignment is then the identity). One inner step with ``inner_lr = gamma`` is exactly that gradient-descent step.
The inner iteration converges when inner_lr (M L + 1 / gamma) < 2, L the curvature of F; the default
inner_lr = gamma / 2 needs gamma M L < 3.

Which parameters form the particles: each *parameter group* is one particle system. All its tensors share their
first dimension M, and particle i is the concatenation of row i of every tensor (flattened), so that
``{"params": [w, u]}`` with ``w`` (M, d) and ``u`` (M,) makes the particles (w_i, u_i) in R^{d+1}. A group may give
``labels`` (M,) integers: particles with different labels are never matched (the Wasserstein distance of the
measure on (label, particle), i.e. the sum of the per-label distances); a two-layer network with fixed output signs
u_i in {-1, +1} passes its signs, since a neuron of sign +1 cannot stand for one of sign -1.

The assignment is a host computation (scipy) at every inner step: it belongs to the optimiser step, never to a
forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from torch.optim import Optimizer

from zoo.errors import ZooError
from zoo.validation import choice, finite_float, positive_int

__all__ = [
    "DISTANCES",
    "ProximalPoint",
    "frobenius_squared",
    "optimal_assignment",
    "particle_distance_squared",
    "particles",
    "wasserstein2_squared",
]

DISTANCES = ("frobenius", "wasserstein")


def particles(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The particles (M, D) of a group of tensors sharing their first dimension M: row i of every tensor, flattened
    and concatenated (a (M,) tensor gives one coordinate per particle)."""
    if not tensors:
        raise ZooError("a particle group needs at least one tensor")
    m = tensors[0].shape[0] if tensors[0].dim() > 0 else None
    for t in tensors:
        if t.dim() == 0 or t.shape[0] != m:
            shapes = ", ".join(str(tuple(x.shape)) for x in tensors)
            raise ZooError(
                f"the tensors of a particle group must share their first dimension (one row per neuron), got shapes "
                f"{shapes}; put tensors whose rows are not the same neurons in separate parameter groups"
            )
    return torch.cat([t.reshape(m, -1) for t in tensors], dim=1)


def _check_pair(v: torch.Tensor, w: torch.Tensor) -> None:
    if v.dim() != 2 or v.shape != w.shape:
        raise ZooError(
            f"particle sets must be two (M, D) tensors of the same shape, got {tuple(v.shape)} and {tuple(w.shape)}"
        )


def _check_labels(labels: torch.Tensor | None, m: int) -> torch.Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor) or labels.shape != (m,) or labels.is_floating_point():
        got = (
            f"a {labels.dtype} tensor of shape {tuple(labels.shape)}"
            if isinstance(labels, torch.Tensor)
            else type(labels).__name__
        )
        raise ZooError(
            f"labels must be an integer tensor of shape ({m},) (one label per particle), got {got}; "
            "e.g. the fixed output signs of the neurons as torch.long (labels.long())"
        )
    return labels


def frobenius_squared(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """d_F(V, W)^2 = (1/M) sum_i |V_i - W_i|^2 for particle sets ``v``, ``w`` of shape (M, D)."""
    _check_pair(v, w)
    return (v - w).pow(2).sum() / v.shape[0]


def optimal_assignment(v: torch.Tensor, w: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """A permutation s (M,) minimising sum_i |V_i - W_s(i)|^2 (V_i is matched with W_s(i)), exact
    (``scipy.optimize.linear_sum_assignment`` on the squared distances, in float64 on the host).

    Args:
        v: the particle set (M, D) to match.
        w: the particle set (M, D) matched to.
        labels: optional (M,) integers; V_i is only matched with a W_j of the same label.
    """
    _check_pair(v, w)
    labels = _check_labels(labels, v.shape[0])
    a = v.detach().to("cpu", torch.float64).numpy()
    b = w.detach().to("cpu", torch.float64).numpy()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ZooError(
            "optimal_assignment got particles with NaN or infinite coordinates: the parameters (or the "
            "objective and its gradient in a ProximalPoint step) are not finite; check the data and the loss for "
            "NaN, or lower gamma / inner_lr if the inner gradient steps diverged"
        )
    m = a.shape[0]
    sigma = np.arange(m)
    groups = [np.arange(m)] if labels is None else [np.flatnonzero(g) for g in _label_masks(labels)]
    for idx in groups:
        # (m, m) squared distances, exact differences, without an (m, m, D) intermediate
        cost = cdist(a[idx], b[idx], "sqeuclidean")
        rows, cols = linear_sum_assignment(cost)
        sigma[idx[rows]] = idx[cols]
    return torch.from_numpy(sigma).to(v.device)


def _label_masks(labels: torch.Tensor) -> list[np.ndarray]:
    lab = labels.detach().cpu().numpy()
    return [lab == value for value in np.unique(lab)]


def wasserstein2_squared(v: torch.Tensor, w: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """d_W(V, W)^2 = min over permutations s of (1/M) sum_i |V_i - W_s(i)|^2: the squared Wasserstein-2 distance
    between the equal-weight empirical measures of the particle sets ``v``, ``w`` (M, D), exact.

    Differentiable in ``v`` and ``w`` (the gradient at a fixed optimal assignment, which is the gradient wherever
    the optimal assignment is unique). ``labels`` (M,): particles of different labels are never matched.
    """
    sigma = optimal_assignment(v, w, labels)
    return (v - w[sigma]).pow(2).sum() / v.shape[0]


def particle_distance_squared(
    v: torch.Tensor, w: torch.Tensor, distance: str = "wasserstein", labels: torch.Tensor | None = None
) -> torch.Tensor:
    """d(V, W)^2 for ``distance`` "frobenius" (:func:`frobenius_squared`) or "wasserstein"
    (:func:`wasserstein2_squared`) between the particle sets ``v`` and ``w`` (M, D); ``labels`` as in
    :func:`optimal_assignment`."""
    choice("distance", distance, DISTANCES)
    if distance == "frobenius":
        return frobenius_squared(v, w)
    return wasserstein2_squared(v, w, labels)


class ProximalPoint(Optimizer):
    """The proximal-point method W_{t+1} = argmin_V F(V) + (1 / (2 gamma)) d(V, W_t)^2 (see the module docstring),
    with d the Frobenius or the Wasserstein-2 distance between the neurons of each parameter group.

    ``step(closure)`` needs the objective, as :class:`torch.optim.LBFGS`: the closure re-evaluates the model at the
    current parameters, computes the gradients (zeroing them first, as usual; this optimiser also clears them before
    each call) and returns the loss; it is called ``inner_steps`` times per step. ``step`` returns the loss of the
    first call, F(W_t). Under a Lightning ``Trainer`` (automatic optimisation) the closure is Lightning's own.

    Each parameter group is one particle system (its tensors share their first dimension M; particle i is row i of
    every tensor); a tensor with ``requires_grad=False`` is a fixed coordinate of the particles: it takes part in
    the matching and is never changed (as torch's optimisers leave frozen parameters alone). A group may set its
    own ``gamma``, ``inner_steps``, ``inner_lr``, ``distance`` and ``labels``::

        ProximalPoint([{"params": [model.weight], "labels": model.signs.long()}], gamma=0.05, distance="wasserstein")

    After a step, ``optimizer.state[group["params"][0]]`` holds ``step`` (the number of steps taken) and
    ``assignment`` (M,), the matching s of the last inner step (V_i is matched with W_t,s(i); the identity for
    Frobenius), and ``stationarity``, how far the last inner iterate V is from solving the proximal problem:
    |M dF/dV(V) + (V - W_s) / gamma| / (|M dF/dV(V)| + |(V - W_s) / gamma|), in [0, 1] (0 at the proximal point,
    1 at V = W_t; large when the inner steps did not converge, e.g. when the optimum sits on a kink of the ReLUs or
    gamma M L is too large for ``inner_lr``).

    Args:
        params: parameters or parameter groups (each group: one set of particles).
        gamma: the step size gamma > 0 (the time step of the implicit Euler scheme).
        inner_steps: gradient steps solving each proximal problem (closure calls per step).
        inner_lr: the inner step size (in the metric of d); None: gamma / 2. With ``inner_steps=1`` and
            ``inner_lr=gamma`` a step is exactly the gradient-descent step W - gamma M dF/dW.
        distance: "frobenius" or "wasserstein".
        labels: per-particle integer labels (M,) of a group (None: all particles may be matched); give it in the
            group dict, as above.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        gamma: float = 0.1,
        inner_steps: int = 20,
        inner_lr: float | None = None,
        distance: str = "wasserstein",
        labels: torch.Tensor | None = None,
    ) -> None:
        defaults = {
            "gamma": gamma,
            "inner_steps": inner_steps,
            "inner_lr": inner_lr,
            "distance": distance,
            "labels": labels,
        }
        self._check_settings(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check_settings(group: dict[str, Any]) -> None:
        finite_float("gamma", group["gamma"], 0.0, low_open=True, hint="give the proximal step size gamma > 0")
        positive_int("inner_steps", group["inner_steps"])
        if group["inner_lr"] is not None:
            finite_float("inner_lr", group["inner_lr"], 0.0, low_open=True, hint="give an inner step size > 0")
        choice("distance", group["distance"], DISTANCES)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (one particle system): its tensors must share their first dimension, its settings are
        checked."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_settings(group)
        rows = particles([p.detach() for p in group["params"]])  # one clear error for mismatched rows
        group["labels"] = _check_labels(group["labels"], rows.shape[0])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One proximal step on every group; returns the closure's loss at the current parameters, F(W_t)
        (detached).

        Args:
            closure: re-evaluates the model, computes the gradients and returns the loss (required).
        """
        if closure is None:
            raise ZooError(
                "ProximalPoint.step needs the objective: call optimizer.step(closure) with a closure that "
                "recomputes the loss and its gradients, as for torch.optim.LBFGS (under Lightning, automatic "
                "optimisation passes one; mixed precision with a gradient scaler does not, use 32-bit or bf16)"
            )
        closure = torch.enable_grad()(closure)
        anchors = [[p.detach().clone() for p in group["params"]] for group in self.param_groups]
        anchor_rows = [particles(a) for a in anchors]
        first_loss = None
        assignments: list[torch.Tensor | None] = [None] * len(self.param_groups)
        residuals: list[torch.Tensor | None] = [None] * len(self.param_groups)
        for k in range(max(group["inner_steps"] for group in self.param_groups)):
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            loss = closure()
            if k == 0:
                first_loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
            for gi, group in enumerate(self.param_groups):
                if k >= group["inner_steps"]:
                    continue
                params = group["params"]
                gamma = group["gamma"]
                lr = gamma / 2 if group["inner_lr"] is None else group["inner_lr"]
                m = params[0].shape[0]
                if group["distance"] == "wasserstein":
                    sigma = optimal_assignment(particles(params), anchor_rows[gi], group["labels"])
                else:
                    sigma = None
                assignments[gi] = sigma
                last = k == group["inner_steps"] - 1
                sums = torch.zeros(3, dtype=torch.float64, device=params[0].device)  # |pull|^2, |force|^2, |sum|^2
                for p, a in zip(params, anchors[gi]):
                    if not p.requires_grad:  # frozen: a fixed coordinate of the particles, matched but not moved
                        continue
                    target = a if sigma is None else a[sigma]
                    direction = (p - target) / gamma
                    if last:  # the optimality condition at the last inner iterate (tensors: no host sync)
                        sums[0] += direction.pow(2).sum()
                    if p.grad is not None:
                        if last:
                            sums[1] += p.grad.pow(2).sum() * m * m
                        direction.add_(p.grad, alpha=m)
                    if last:
                        sums[2] += direction.pow(2).sum()
                    p.sub_(direction, alpha=lr)
                if last:
                    norms = sums.sqrt()
                    residuals[gi] = norms[2] / (norms[0] + norms[1]).clamp_min(torch.finfo(torch.float64).tiny)
        for gi, group in enumerate(self.param_groups):
            state = self.state[group["params"][0]]
            state["step"] = state.get("step", 0) + 1
            m = group["params"][0].shape[0]
            sigma = assignments[gi]
            state["assignment"] = torch.arange(m) if sigma is None else sigma.cpu()
            state["stationarity"] = residuals[gi].detach()
        return first_loss
