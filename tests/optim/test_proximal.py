"""zoo.optim.ProximalPoint: the proximal-point method with the Frobenius or Wasserstein-2 distance between neurons.

Every expected value is computed independently of the optimiser: the network and its objective written out here
(inputs concatenated with a column of ones), gradients by autograd on that expression, optimal matchings by brute
force over all permutations.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from zoo.errors import ZooError
from zoo.models import TwoLayerReLU
from zoo.optim import ProximalPoint, frobenius_squared, optimal_assignment, wasserstein2_squared

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ helpers


def network(weight: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(1/M) sum_i u_i relu(<w_i, (x, 1)>), written out."""
    augmented = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    return (torch.relu(augmented @ weight.T) * u).sum(dim=1) / weight.shape[0]


def objective(weight: torch.Tensor, u: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((network(weight, u, x) - y) ** 2).mean()


def metric_gradient(weight: torch.Tensor, u: torch.Tensor, x: torch.Tensor, y: torch.Tensor, learned: bool):
    """M dF/dW (and M dF/du when the output weights are learned), by autograd on the written-out objective."""
    w = weight.detach().clone().requires_grad_(True)
    uu = u.detach().clone().requires_grad_(learned)
    objective(w, uu, x, y).backward()
    m = weight.shape[0]
    return m * w.grad, (m * uu.grad if learned else None)


def brute_force_w2(v: torch.Tensor, w: torch.Tensor, labels: torch.Tensor | None = None):
    """min over permutations s (respecting labels) of (1/M) sum_i |v_i - w_s(i)|^2, and the minimiser."""
    m = v.shape[0]
    best, best_perm = math.inf, None
    for perm in itertools.permutations(range(m)):
        if labels is not None and any(labels[i] != labels[j] for i, j in enumerate(perm)):
            continue
        cost = sum(float(((v[i] - w[j]) ** 2).sum()) for i, j in enumerate(perm)) / m
        if cost < best:
            best, best_perm = cost, torch.tensor(perm)
    return best, best_perm


def sine_data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(-1, 1, n, dtype=torch.float64)[:, None]
    return x, torch.sin(4 * x[:, 0] - math.pi / 2)


def model(width: int, signs: str = "fixed", init_scale: float = 1.0, seed: int = 0) -> TwoLayerReLU:
    torch.manual_seed(seed)
    return TwoLayerReLU(in_features=1, width=width, signs=signs, init_scale=init_scale).double()


def closure_for(net: TwoLayerReLU, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = net.objective(x, y)
        loss.backward()
        return loss

    return closure


def proximal_step(net: TwoLayerReLU, x, y, steps: int = 1, **settings) -> ProximalPoint:
    opt = ProximalPoint(net.particle_groups(), **settings)
    for _ in range(steps):
        opt.step(closure_for(net, opt, x, y))
    return opt


# ------------------------------------------------------------------------------------------------ the distances


@pytest.mark.parametrize("m, d", [(1, 2), (3, 1), (4, 3), (6, 2)])
def test_w2_is_the_minimum_over_all_permutations_and_at_most_frobenius(m: int, d: int) -> None:
    g = torch.Generator().manual_seed(10 * m + d)
    for _ in range(5):
        v = torch.randn(m, d, generator=g, dtype=torch.float64)
        w = torch.randn(m, d, generator=g, dtype=torch.float64)
        expected, _ = brute_force_w2(v, w)
        w2 = wasserstein2_squared(v, w)
        assert math.isclose(float(w2), expected, rel_tol=1e-12, abs_tol=1e-14)
        assert float(w2) <= float(frobenius_squared(v, w)) + 1e-15
        assert math.isclose(float(frobenius_squared(v, w)), float(((v - w) ** 2).sum()) / m, rel_tol=1e-12)
    if m >= 4:  # labels: only particles of the same label are matched
        labels = torch.tensor([0, 1] * (m // 2))
        expected, perm = brute_force_w2(v, w, labels)
        sigma = optimal_assignment(v, w, labels)
        assert torch.equal(labels[sigma], labels)
        assert math.isclose(float(wasserstein2_squared(v, w, labels)), expected, rel_tol=1e-12)
        assert float(wasserstein2_squared(v, w)) <= expected + 1e-15  # fewer matchings allowed: never smaller


def test_w2_ignores_the_numbering_of_the_neurons_and_frobenius_does_not() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(40, 3, generator=g, dtype=torch.float64)
    w = v + 0.3 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    perm = torch.randperm(40, generator=g)
    assert float(wasserstein2_squared(v, w)) <= float(frobenius_squared(v, w))
    torch.testing.assert_close(wasserstein2_squared(v, w[perm]), wasserstein2_squared(v, w), rtol=1e-12, atol=0)
    torch.testing.assert_close(wasserstein2_squared(v[perm], w), wasserstein2_squared(v, w), rtol=1e-12, atol=0)
    assert float(frobenius_squared(v, w[perm])) > 2 * float(frobenius_squared(v, w))
    # random pairs: W2 <= Frobenius, with equality only where the identity is optimal
    for _ in range(20):
        a, b = torch.randn(2, 30, 2, generator=g, dtype=torch.float64)
        assert float(wasserstein2_squared(a, b)) < float(frobenius_squared(a, b))


# ------------------------------------------------------------------------------------------------ the step


@pytest.mark.parametrize("signs, init_scale, gamma", [("fixed", 0.1, 1.0), ("learned", 0.05, 2.0)])
def test_wasserstein_step_is_invariant_to_permuting_the_neurons(signs: str, init_scale: float, gamma: float) -> None:
    """Permute the neurons (with their signs), step, un-permute: the same parameters. The setting (small, crowded
    neurons, a large step) makes the optimal matching leave the identity, so the assignment is exercised."""
    x, y = sine_data()
    width = 10
    net = model(width, signs, init_scale=init_scale)
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(3))
    inverse = torch.argsort(perm)
    other = model(width, signs, init_scale=init_scale)
    with torch.no_grad():
        other.weight.copy_(net.weight[perm])
        if signs == "learned":
            other.output.copy_(net.output[perm])
        else:
            other.signs.copy_(net.signs[perm])
    opt = ProximalPoint(net.particle_groups(), gamma=gamma, inner_steps=40, distance="wasserstein")
    opt_other = ProximalPoint(other.particle_groups(), gamma=gamma, inner_steps=40, distance="wasserstein")
    matched = False
    for _ in range(4):
        opt.step(closure_for(net, opt, x, y))
        opt_other.step(closure_for(other, opt_other, x, y))
        matched |= not torch.equal(opt.state[net.weight]["assignment"], torch.arange(width))
        torch.testing.assert_close(other.weight[inverse], net.weight, rtol=1e-10, atol=1e-12)
        if signs == "learned":
            torch.testing.assert_close(other.output[inverse], net.output, rtol=1e-10, atol=1e-12)
    assert matched  # a step whose optimal matching was not the identity


@pytest.mark.parametrize("distance", ["frobenius", "wasserstein"])
def test_small_steps_follow_gradient_descent(distance: str) -> None:
    """The proximal step V(gamma) = W - gamma M dF/dW(W) + O(gamma^2): halving gamma divides the gap by 4 (steps
    small enough that no neuron's kink crosses a data point: F is smooth along them)."""
    x, y = sine_data()
    net = model(8)
    w0 = net.weight.detach().clone()
    grad, _ = metric_gradient(w0, net.signs, x, y, learned=False)
    gaps = []
    gammas = [0.01, 0.005, 0.0025, 0.00125]
    for gamma in gammas:
        with torch.no_grad():
            net.weight.copy_(w0)
        proximal_step(net, x, y, gamma=gamma, inner_steps=60, inner_lr=gamma, distance=distance)
        gd_step = w0 - gamma * grad
        gaps.append(float((net.weight.detach() - gd_step).norm()))
        assert gaps[-1] < 0.01 * gamma * float(grad.norm())  # the step is the gradient step, to first order
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    assert all(3.8 < r < 4.2 for r in ratios), (gaps, ratios)


def test_one_inner_step_of_size_gamma_is_a_gradient_descent_step() -> None:
    x, y = sine_data()
    net, ref = model(6, "learned"), model(6, "learned")
    gamma = 0.1
    opt = proximal_step(net, x, y, gamma=gamma, inner_steps=1, inner_lr=gamma, distance="wasserstein")
    assert float(opt.state[net.weight]["stationarity"]) == 1.0  # measured at V = W_t: the gradient alone
    sgd = torch.optim.SGD(ref.parameters(), lr=gamma * 6)  # the metric gradient is M times the partial derivative
    closure_for(ref, sgd, x, y)()
    sgd.step()
    torch.testing.assert_close(net.weight, ref.weight, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(net.output, ref.output, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("distance", ["frobenius", "wasserstein"])
def test_neurons_that_activate_no_data_do_not_move(distance: str) -> None:
    x, y = sine_data()
    net = model(8, "learned")
    dead, alive = torch.tensor([1, 4, 6]), torch.tensor([0, 2, 3, 5, 7])
    with torch.no_grad():  # <w, (x, 1)> < 0 on [-1, 1] for the dead ones; the others activate some points
        net.weight[dead] = torch.tensor([[0.5, -2.0], [-0.3, -1.5], [0.0, -0.1]], dtype=torch.float64)
        net.weight[alive] = torch.tensor(
            [[1.0, 0.5], [-1.0, 0.5], [0.7, 0.2], [-0.4, 0.9], [0.2, 1.0]], dtype=torch.float64
        )
    assert not net.active_neurons(x)[dead].any() and net.active_neurons(x).sum() == 5
    before = (net.weight.detach().clone(), net.output.detach().clone())
    proximal_step(net, x, y, steps=3, gamma=0.2, inner_steps=10, distance=distance)
    assert torch.equal(net.weight[dead], before[0][dead]) and torch.equal(net.output[dead], before[1][dead])
    assert (net.weight[alive] - before[0][alive]).abs().amax(dim=1).min() > 1e-4  # the others did move


def test_inner_solver_reaches_the_proximal_optimum() -> None:
    """After the step, V satisfies the optimality condition of min_V F(V) + d_W(V, W)^2 / (2 gamma) with the optimal
    matching s of V to W (brute force): M dF/dV(V) + (V - W_s) / gamma = 0, for a step that moves the neurons by
    much (gamma M L of order 1) inside one activation pattern, where F is smooth. The Frobenius step is the same
    point (at an exact proximal point the identity is an optimal matching), and both lower the objective."""
    x, y = sine_data()
    net = model(6, "learned", init_scale=1.0, seed=0)
    w0, u0 = net.weight.detach().clone(), net.output.detach().clone()
    gamma = 0.5
    opt = proximal_step(net, x, y, gamma=gamma, inner_steps=400, inner_lr=0.05, distance="wasserstein")
    assert float(opt.state[net.weight]["stationarity"]) < 1e-10  # the optimiser's own report agrees
    v, u = net.weight.detach(), net.output.detach()
    best, sigma = brute_force_w2(torch.cat([v, u[:, None]], 1), torch.cat([w0, u0[:, None]], 1))
    gw, gu = metric_gradient(v, u, x, y, learned=True)
    residual = torch.cat([gw + (v - w0[sigma]) / gamma, (gu + (u - u0[sigma]) / gamma)[:, None]], 1)
    scale = float(torch.cat([v - w0[sigma], (u - u0[sigma])[:, None]], 1).norm() / gamma)
    assert scale > 0.3  # the step is far from a gradient step's size 0
    assert float(residual.norm()) < 1e-10 * scale
    value = float(objective(v, u, x, y)) + best / (2 * gamma)
    assert value < float(objective(w0, u0, x, y)) - 0.01  # V = W_t is a candidate: the optimum is below

    ref = model(6, "learned", init_scale=1.0, seed=0)
    proximal_step(ref, x, y, gamma=gamma, inner_steps=400, inner_lr=0.05, distance="frobenius")
    torch.testing.assert_close(ref.weight, net.weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ref.output, net.output, rtol=1e-9, atol=1e-12)


def test_step_returns_the_objective_before_the_step_and_keeps_state() -> None:
    x, y = sine_data()
    net = model(6)
    f0 = float(objective(net.weight.detach(), net.signs, x, y))
    opt = ProximalPoint(net.particle_groups(), gamma=0.3, inner_steps=5)
    loss = opt.step(closure_for(net, opt, x, y))
    assert math.isclose(float(loss), f0, rel_tol=1e-12)
    assert float(net.objective(x, y).detach()) < f0
    state = opt.state[net.weight]
    assert state["step"] == 1 and state["assignment"].shape == (6,)
    again = ProximalPoint(model(6).particle_groups(), gamma=0.3, inner_steps=5)
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["state"][0]["step"] == 1
    assert torch.equal(again.param_groups[0]["labels"], net.signs.long())


def test_bad_use_is_one_clear_error() -> None:
    net = model(4)
    with pytest.raises(ZooError, match="needs the objective"):
        ProximalPoint(net.parameters(), gamma=0.1).step()
    with pytest.raises(ZooError, match="first dimension"):
        ProximalPoint([torch.zeros(4, 2, requires_grad=True), torch.zeros(3, requires_grad=True)])
    with pytest.raises(ZooError, match="gamma"):
        ProximalPoint(net.parameters(), gamma=0.0)
    with pytest.raises(ZooError, match="distance"):
        ProximalPoint(net.parameters(), distance="sliced")
    with pytest.raises(ZooError, match="labels"):
        ProximalPoint([{"params": [net.weight], "labels": torch.zeros(3, dtype=torch.long)}])
    with pytest.raises(ZooError, match="same shape"):
        wasserstein2_squared(torch.zeros(3, 2), torch.zeros(4, 2))


# ------------------------------------------------------------------------------------------------ the benchmark


def test_benchmark_small_mode_writes_table_csv_and_figure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("proximal_distances", ROOT / "benchmarks" / "proximal_distances.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--small", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| problem" in out and "relative gap" in out
    csv = (tmp_path / "proximal_objective_curves.csv").read_text().splitlines()
    assert csv[0].startswith("problem,")
    assert len(csv) > 10
    png = (tmp_path / "proximal_objective_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:  # both curves start at the same objective and decrease
        assert row["frobenius"][0] == row["wasserstein"][0]
        assert row["frobenius"][-1] < row["frobenius"][0] and row["wasserstein"][-1] < row["wasserstein"][0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_on_cuda_is_the_step_on_cpu() -> None:
    """The matching is computed on the host and applied on the device: same parameters as on the CPU."""
    x, y = sine_data()
    cpu = model(10, "fixed", init_scale=0.1)
    gpu = model(10, "fixed", init_scale=0.1).cuda()
    settings = {"gamma": 1.0, "inner_steps": 20, "distance": "wasserstein"}
    opt_cpu = proximal_step(cpu, x, y, steps=3, **settings)
    opt_gpu = proximal_step(gpu, x.cuda(), y.cuda(), steps=3, **settings)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-9, atol=1e-11)
    assert torch.equal(opt_gpu.state[gpu.weight]["assignment"], opt_cpu.state[cpu.weight]["assignment"])


def test_float_labels_error_names_the_dtype() -> None:
    """The shape is right, the dtype is not: the message says which (it printed only the matching shape)."""
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    with pytest.raises(ZooError, match=r"got a torch.float32 tensor of shape \(3,\).*labels.long\(\)"):
        ProximalPoint([{"params": params, "labels": torch.tensor([0.0, 1.0, 1.0])}])


def test_assignment_of_wide_particles_needs_no_cube_of_memory() -> None:
    """The cost matrix is (M, M): particles of many coordinates (a first layer on 784-pixel inputs) are matched
    without an (M, M, D) array of differences (it took 8 M^2 D bytes: 6 GB for M = 1000, D = 786)."""
    import tracemalloc

    g = torch.Generator().manual_seed(0)
    v = torch.randn(60, 400, generator=g, dtype=torch.float64)
    w = v[torch.randperm(60, generator=g)] + 1e-3 * torch.randn(60, 400, generator=g, dtype=torch.float64)
    tracemalloc.start()
    try:
        sigma = optimal_assignment(v, w)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak  # the (60, 60, 400) differences alone are 11.5 MB
    torch.testing.assert_close(w[sigma], v, atol=1e-2, rtol=0)  # recovers the permutation


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_particles_are_one_clear_error(bad: float) -> None:
    """A NaN target makes the inner gradient step NaN: the next matching says so (was scipy's ValueError 'matrix
    contains invalid numeric entries')."""
    x, y = sine_data()
    net = model(6, "learned")
    y = y.clone()
    y[3] = bad
    with pytest.raises(ZooError, match="NaN or infinite.*not finite"):
        proximal_step(net, x, y, gamma=0.5, inner_steps=3, distance="wasserstein")
    with pytest.raises(ZooError, match="NaN or infinite"):
        wasserstein2_squared(torch.tensor([[0.0], [bad]]), torch.zeros(2, 1))


def test_frozen_tensors_are_matched_but_never_moved() -> None:
    """A tensor with requires_grad=False (here the learned output weights, frozen) stays as it is, as torch's
    optimisers leave frozen parameters alone; before, a Wasserstein matching that left the identity pulled it to the
    matched neurons' values (small crowded neurons and a large step make the matching leave the identity)."""
    x, y = sine_data()
    net = model(10, "learned", init_scale=0.05)
    net.output.requires_grad_(False)
    u0, w0 = net.output.clone(), net.weight.detach().clone()
    proximal_step(net, x, y, steps=4, gamma=2.0, inner_steps=40, distance="wasserstein")
    assert torch.equal(net.output, u0)
    assert not torch.equal(net.weight, w0)


def test_class_docstring_example_runs() -> None:
    """The example in ProximalPoint's docstring builds the optimiser it shows (it passed the float signs buffer as
    labels, which are refused: labels are integers)."""
    import re

    example = re.search(r"^\s+(ProximalPoint\(\[\{.*\))$", ProximalPoint.__doc__, re.M).group(1)
    opt = eval(example, {"ProximalPoint": ProximalPoint, "model": model(4)})  # noqa: S307 - our own docstring
    assert opt.param_groups[0]["labels"].tolist() == [1, 1, -1, -1]
