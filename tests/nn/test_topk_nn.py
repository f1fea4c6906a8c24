"""zoo.nn.topk: SmoothTopKLoss against sparsemax's loss (written here) and a direct SLSQP maximisation,
SoftTopKMagnitude / prune_magnitude as a weight parametrization that prunes and still trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from scipy.optimize import minimize

from zoo.errors import ZooError
from zoo.nn.topk import SmoothTopKLoss, SoftTopKMagnitude, prune_magnitude
from zoo.ops.topk import soft_topk_mask, topk_magnitude

P43 = 4.0 / 3.0


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sparsemax_loss(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Martins & Astudillo (2016): L(z; t) = -z_t + 1/2 sum_{j in S(z)} (z_j^2 - tau^2) + 1/2, with the support
    S(z) and threshold tau of sparsemax from the sorted scores."""
    zs = z.sort(-1, descending=True).values
    ar = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cs = zs.cumsum(-1)
    support = (1 + ar * zs > cs).sum(-1, keepdim=True)
    tau = (cs.gather(-1, support - 1) - 1) / support
    in_s = z > tau
    quad = torch.where(in_s, z * z - tau * tau, 0.0).sum(-1)
    return -z.gather(-1, t[:, None])[:, 0] + 0.5 * quad + 0.5


def smoothed_topk_sum(x: np.ndarray, k: int, lam: float, p: float) -> float:
    """max_{0 <= y <= 1, sum y = k} <x, y> - (lam / p) sum y^p, by SLSQP from the uniform point."""
    n = x.size
    res = minimize(
        lambda y: -(x @ y - lam / p * np.sum(np.abs(y) ** p)),
        np.full(n, k / n),
        jac=lambda y: -(x - lam * np.abs(y) ** (p - 1)),
        bounds=[(0.0, 1.0)] * n,
        constraints=[{"type": "eq", "fun": lambda y: y.sum() - k, "jac": lambda y: np.ones(n)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return -res.fun


# ------------------------------------------------------------------------------------------------ SmoothTopKLoss


def test_k1_p2_is_sparsemax_loss():
    """k = 1, p = 2: f_R(x) = lam * Omega*(x / lam) for the sparsemax regulariser, so loss = lam (L_sparsemax - 1/2)."""
    x, t = rand(6, 9, seed=1) * 2, torch.tensor([0, 3, 8, 2, 2, 5])
    for lam in (0.3, 1.0, 4.0):
        loss = SmoothTopKLoss(k=1, lam=lam, reduction="none")(x, t)
        torch.testing.assert_close(loss, lam * (sparsemax_loss(x / lam, t) - 0.5))


@pytest.mark.parametrize("p,k", [(2.0, 3), (P43, 1), (P43, 4)])
def test_value_is_the_smoothed_top_k_sum_minus_the_target_score(p, k):
    x = rand(4, 7, seed=2) * 2
    t = torch.tensor([1, 0, 6, 3])
    loss = SmoothTopKLoss(k=k, p=p, lam=0.8, reduction="none")(x, t)
    ref = torch.tensor([smoothed_topk_sum(row.numpy(), k, 0.8, p) for row in x]) - x.gather(-1, t[:, None])[:, 0]
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("p,solver", [(2.0, "pav"), (P43, "pav"), (2.0, "dykstra")])
def test_gradient_is_soft_topk_mask_minus_target(p, solver):
    x = rand(5, 8, seed=3).requires_grad_(True)
    t = torch.tensor([0, 7, 3, 3, 1])
    SmoothTopKLoss(k=2, p=p, lam=0.5, solver=solver, dykstra_iters=50, reduction="sum")(x, t).backward()
    onehot = torch.zeros(5, 8, dtype=torch.float64).scatter_(-1, t[:, None], 1.0)
    ref = soft_topk_mask(x.detach(), 2, p=p, lam=0.5, solver=solver, dykstra_iters=50) - onehot
    torch.testing.assert_close(x.grad, ref)
    # a dense (k-hot) target, mean over the leading dims
    x.grad = None
    dense = torch.zeros(5, 8, dtype=torch.float64)
    dense[:, :2] = 1.0
    SmoothTopKLoss(k=2, p=p, lam=0.5, solver=solver, dykstra_iters=50)(x, dense).backward()
    torch.testing.assert_close(
        x.grad, (soft_topk_mask(x.detach(), 2, p=p, lam=0.5, solver=solver, dykstra_iters=50) - dense) / 5
    )


def test_n_iter_is_the_deprecated_name_of_dykstra_iters():
    """SmoothTopKLoss / SoftTopKMagnitude(n_iter=) (the old name): the Dykstra iterations, with a FutureWarning
    naming dykstra_iters, the same results as the new name; the old attribute reads the new one (warning); both
    names given is one ZooError."""
    x, t = rand(3, 8, seed=5), torch.tensor([0, 7, 3])
    new_loss = SmoothTopKLoss(k=2, lam=0.8, solver="dykstra", dykstra_iters=3, reduction="none")
    assert (new_loss(x, t) - SmoothTopKLoss(k=2, lam=0.8, solver="dykstra", reduction="none")(x, t)).abs().max() > 1e-6
    with pytest.warns(FutureWarning, match="SmoothTopKLoss: n_iter= is deprecated.*use dykstra_iters="):
        old_loss = SmoothTopKLoss(k=2, lam=0.8, solver="dykstra", n_iter=3, reduction="none")
    assert old_loss.dykstra_iters == 3 and torch.equal(old_loss(x, t), new_loss(x, t))
    with pytest.warns(FutureWarning, match=r"SmoothTopKLoss.n_iter is deprecated.*use .dykstra_iters"):
        assert old_loss.n_iter == 3
    raw = rand(4, 6, seed=6)
    new_mag = SoftTopKMagnitude(5, lam=0.5, solver="dykstra", dykstra_iters=3)
    with pytest.warns(FutureWarning, match="SoftTopKMagnitude: n_iter= is deprecated.*use dykstra_iters="):
        old_mag = SoftTopKMagnitude(5, lam=0.5, solver="dykstra", n_iter=3)
    assert torch.equal(old_mag(raw), new_mag(raw))
    assert (new_mag(raw) - SoftTopKMagnitude(5, lam=0.5, solver="dykstra")(raw)).abs().max() > 1e-6
    for cls, args in ((SmoothTopKLoss, (2,)), (SoftTopKMagnitude, (5,))):
        with pytest.raises(ZooError, match="n_iter= is the deprecated name of dykstra_iters=; give dykstra_iters"):
            cls(*args, solver="dykstra", n_iter=3, dykstra_iters=3)


def test_reductions_and_leading_dims():
    x, t = rand(2, 3, 6, seed=4, dtype=torch.float32), torch.randint(0, 6, (2, 3))
    none = SmoothTopKLoss(k=2, reduction="none")(x, t)
    assert none.shape == (2, 3)
    # Fenchel-Young: with a target in the capped simplex (a k-hot vector), loss + R(t) >= 0
    khot = torch.zeros_like(x).scatter_(-1, torch.randperm(6)[:2].expand(2, 3, 2), 1.0)
    assert (SmoothTopKLoss(k=2, lam=1.0, reduction="none")(x, khot) + 1.0 * 2 / 2 >= -1e-6).all()
    torch.testing.assert_close(SmoothTopKLoss(k=2)(x, t), none.mean())
    torch.testing.assert_close(SmoothTopKLoss(k=2, reduction="sum")(x, t), none.sum())
    loss = SmoothTopKLoss(k=2)(x.to(torch.bfloat16), t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 0}, "k must be an int >= 1"),
        ({"p": 1.5}, "supported values are p = 2 and p = 4/3"),
        ({"lam": 0.0}, "lam must be"),
        ({"solver": "bogus"}, "unknown solver"),
        ({"reduction": "max"}, "reduction must be one of"),
    ],
)
def test_loss_bad_arguments(kwargs, match):
    with pytest.raises(ZooError, match=match):
        SmoothTopKLoss(**kwargs)


def test_loss_bad_inputs():
    x = rand(3, 5, seed=5)
    with pytest.raises(ZooError, match="exceeds the number of classes"):
        SmoothTopKLoss(k=6)(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ZooError, match="class indices must be in"):
        SmoothTopKLoss()(x, torch.tensor([0, 5, 1]))
    with pytest.raises(ZooError, match="target must be class indices"):
        SmoothTopKLoss()(x, torch.tensor([0, 1]))
    with pytest.raises(ZooError, match="a dense target must have"):
        SmoothTopKLoss()(x, torch.zeros(3, 4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ pruning


def test_parametrized_linear_is_sparse_and_trains_the_raw_weight():
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    raw = layer.weight.detach().clone()
    parametrize.register_parametrization(layer, "weight", SoftTopKMagnitude(0.1, lam=1e-4))
    w = layer.weight
    k = round(0.1 * w.numel())
    assert k <= int((w != 0).sum()) <= k + 3  # about keep * numel nonzeros
    torch.testing.assert_close(w, topk_magnitude(raw.flatten(), k).reshape(w.shape) / (1 + 1e-4), atol=1e-3, rtol=0)
    x = torch.randn(8, 40)
    layer(x).pow(2).sum().backward()
    g = layer.parametrizations.weight.original.grad
    assert g is not None and (g[w != 0] != 0).all()
    assert int((g != 0).sum()) <= int((w != 0).sum()) + 3  # no gradient to entries the operator sets to 0
    # a count instead of a fraction; baking the sparse weight in
    layer2 = nn.Linear(10, 10)
    parametrize.register_parametrization(layer2, "weight", SoftTopKMagnitude(7, lam=1e-6))
    baked = layer2.weight.detach().clone()
    parametrize.remove_parametrizations(layer2, "weight", leave_parametrized=True)
    assert torch.equal(layer2.weight.detach(), baked) and int((baked != 0).sum()) == 7


def test_prune_magnitude_registers_on_every_layer_and_sgd_lowers_the_loss():
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data[:512], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:512])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    assert prune_magnitude(model, keep=0.3, lam=1e-4) is model
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert all(parametrize.is_parametrized(m, "weight") for m in linears)
    prune_magnitude(model, keep=0.3)  # idempotent
    assert all(len(m.parametrizations["weight"]) == 1 for m in linears)

    def nonzeros_ok() -> bool:
        return all(int((m.weight != 0).sum()) <= round(0.3 * m.weight.numel()) + 3 for m in linears)

    assert nonzeros_ok()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add overhead
    try:
        for _ in range(60):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.85 * losses[0]
    assert nonzeros_ok()  # still sparse after training
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    prune_magnitude(conv, keep=5)
    assert int((conv[0].weight != 0).sum()) in range(5, 8)


def test_pruning_bad_arguments():
    for keep in (0.0, 1.5, -2, True, "0.1"):
        with pytest.raises(ZooError, match="keep must be"):
            SoftTopKMagnitude(keep)
    with pytest.raises(ZooError, match="supported values"):
        SoftTopKMagnitude(0.1, p=3.0)
    with pytest.raises(ZooError, match="keep = 200 entries, but the weight has 100"):
        SoftTopKMagnitude(200)(torch.randn(10, 10))
    with pytest.raises(ZooError, match="has no layer of type"):
        prune_magnitude(nn.ReLU())
