"""Mean-field ResNets trained by conditional optimal transport (issue 16, part 2): the definition, the published
initialisation (checked against the densities), the mean-field step scaling (training curves independent of M and
S), the kernel conditioning lambda_0 (against an independent computation), the exponential decay of the risk at a
rate set by lambda_0 / N, the engine's memory modes, the task, the registry, the recipe and the benchmark."""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import zoo
from zoo.data.teacher import TeacherDataModule, teacher_regression
from zoo.models.mean_field import MeanFieldLayer, MeanFieldResNet, sample_gaussian, sample_heavy_tailed

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def sgd(lr: float) -> functools.partial:
    return functools.partial(torch.optim.SGD, lr=lr)


def model64(seed: int = 0, **kwargs) -> MeanFieldResNet:
    torch.manual_seed(seed)
    return MeanFieldResNet(**kwargs).double()


def randomize_u(model: MeanFieldResNet, scale: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.u.copy_(scale * torch.randn(layer.u.shape, generator=g, dtype=layer.u.dtype))


def train(model: MeanFieldResNet, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """Full-batch gradient descent with the model's own optimiser; the risk before every step."""
    opt = model.configure_optimizers()
    risks = []
    for _ in range(steps):
        opt.zero_grad()
        risk = model.risk(model(x), y)
        risks.append(risk.detach())
        risk.backward()
        opt.step()
    return torch.stack(risks)


# ------------------------------------------------------------------------------------------------ definition


def test_forward_is_the_definition() -> None:
    """x_{s+1} = x_s + (1/S) (1/M) sum_i u_i sigma(w_i . x_s + b_i), written out neuron by neuron in numpy."""
    for activation, fn in (("cos", np.cos), ("relu", lambda z: np.maximum(z, 0.0)), ("tanh", np.tanh)):
        model = model64(dim=3, width=5, depth=4, activation=activation)
        randomize_u(model, 2.0)
        x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        expected = x.numpy().copy()
        for layer in model.layers:
            u, w, b = (p.detach().numpy() for p in (layer.u, layer.w, layer.b))
            step = np.zeros_like(expected)
            for n in range(expected.shape[0]):
                for i in range(5):
                    step[n] += u[i] * fn(w[i] @ expected[n] + b[i])
            expected = expected + step / (5 * 4)
        np.testing.assert_allclose(model(x).detach().numpy(), expected, rtol=1e-12, atol=1e-12)
        states = model.trajectory(x)
        assert states.shape == (5, 6, 3)
        torch.testing.assert_close(states[-1], model(x))
        torch.testing.assert_close(states[0], x)


def test_initialisation_starts_at_the_identity() -> None:
    model = model64(dim=2, width=16, depth=3)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert all(torch.equal(layer.u, torch.zeros_like(layer.u)) for layer in model.layers)
    assert torch.equal(model(x), x)


def test_gaussian_law_against_its_density() -> None:
    """density ~ exp(-rho |w|^2) on R^3: sqrt(2 rho) |w| ~ chi(3) (KS test), and the KS test rejects a wrong rho."""
    torch.manual_seed(0)
    rho = 2.5
    w = sample_gaussian(4000, 3, rho, dtype=torch.float64)
    radius = w.norm(dim=1).numpy()
    assert stats.kstest(radius * math.sqrt(2 * rho), stats.chi(3).cdf).pvalue > 0.01
    assert stats.kstest(radius * math.sqrt(2 * 2 * rho), stats.chi(3).cdf).pvalue < 1e-6
    layer = MeanFieldLayer(3, 4000, init="gaussian", rho=rho).double()
    assert stats.kstest(layer.w.detach().norm(dim=1).numpy() * math.sqrt(2 * rho), stats.chi(3).cdf).pvalue > 0.01


def _radial_cdf(d: int, beta: float):
    """CDF of |w| for the density (1 + |w|^2)^-(d/2 + beta) on R^d, by quadrature of r^(d-1) (1 + r^2)^-(d/2+beta)
    (independent of the sampler's beta-prime transform)."""

    def density(r: float) -> float:
        return r ** (d - 1) * (1 + r * r) ** -(d / 2 + beta)

    total = integrate.quad(density, 0, np.inf)[0]
    return np.vectorize(lambda r: integrate.quad(density, 0, r)[0] / total)


@pytest.mark.parametrize(("d", "beta"), [(2, 0.75), (3, 2.0)])
def test_heavy_tailed_law_against_its_density(d: int, beta: float) -> None:
    """|w| against the CDF integrated from the density (KS test), a uniform direction (Archimedes: one coordinate
    of a uniform direction on S^2 is uniform on [-1, 1]; on S^1 the angle is uniform), and the test has power: a
    sample of another beta is rejected."""
    torch.manual_seed(1)
    w = sample_heavy_tailed(3000, d, beta, dtype=torch.float64)
    cdf = _radial_cdf(d, beta)
    radius = w.norm(dim=1).numpy()
    assert stats.kstest(radius, cdf).pvalue > 0.01
    other = sample_heavy_tailed(3000, d, beta + 1.0, dtype=torch.float64).norm(dim=1).numpy()
    assert stats.kstest(other, cdf).pvalue < 1e-6
    if d == 3:
        assert stats.kstest(w[:, 2].numpy() / radius, stats.uniform(-1, 2).cdf).pvalue > 0.01
    else:
        angle = torch.atan2(w[:, 1], w[:, 0]).numpy()
        assert stats.kstest(angle, stats.uniform(-math.pi, 2 * math.pi).cdf).pvalue > 0.01
    layer = MeanFieldLayer(d, 3000, init="heavy_tailed", beta=beta).double()
    assert stats.kstest(layer.w.detach().norm(dim=1).numpy(), cdf).pvalue > 0.01
    assert stats.kstest(layer.b.detach().numpy(), stats.uniform(0, math.pi).cdf).pvalue > 0.01


# ------------------------------------------------------------------------------------------------ mean-field scaling


def test_optimizer_groups_carry_the_mean_field_factor() -> None:
    """Neurons at lr * M * S, the input map and readout at lr; with a schedule the base rates are the scaled ones;
    mean_field_scaling=False leaves every rate alone."""
    model = MeanFieldResNet(dim=3, width=8, depth=5, in_features=6, num_classes=4, optimizer=sgd(0.01))
    opt = model.configure_optimizers()
    neurons = {id(p) for p in model.stack.parameters()}
    seen = 0
    for group in opt.param_groups:
        inside = {id(p) in neurons for p in group["params"]}
        assert len(inside) == 1
        assert group["lr"] == pytest.approx(0.01 * 40 if inside.pop() else 0.01)
        seen += len(group["params"])
    assert seen == len(list(model.parameters()))
    scheduled = MeanFieldResNet(
        dim=3, width=8, depth=5, optimizer=sgd(0.01), lr_scheduler=zoo.tasks.optim.WarmupCosineLR
    ).configure_optimizers(total_steps=10)
    assert [g["lr"] for g in scheduled["optimizer"].param_groups] == pytest.approx([0.4, 0.4])
    plain = MeanFieldResNet(dim=3, width=8, depth=5, mean_field_scaling=False, optimizer=sgd(0.01))
    assert {g["lr"] for g in plain.configure_optimizers().param_groups} == {0.01}


def test_scaling_makes_the_loss_curve_independent_of_width_and_depth() -> None:
    """A fixed problem trained with one learning rate at (M, S) and (2M, 2S): with the mean-field scaling the two
    curves nearly coincide; without it (each parameter at the rate the scaled small network gives its neurons,
    so the small network's curve is the same) the larger network trains about four times slower."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, dtype=torch.float64, generator=g)
    y = x + 0.5 * torch.sin(2 * x.flip(1))
    curves = {}
    for scaling in (True, False):
        for width, depth in ((64, 8), (128, 16)):
            lr = 0.5 if scaling else 0.5 * 64 * 8
            model = model64(dim=2, width=width, depth=depth, mean_field_scaling=scaling, optimizer=sgd(lr))
            curves[scaling, width] = train(model, x, y, 50)
    torch.testing.assert_close(curves[True, 64], curves[False, 64])
    initial = curves[True, 64][0]
    scaled_gap = (curves[True, 64] - curves[True, 128]).abs().max() / initial
    unscaled_gap = (curves[False, 64] - curves[False, 128]).abs().max() / initial
    assert curves[True, 64][-1] < 0.05 * initial  # the problem is learnt
    assert scaled_gap < 0.05
    assert unscaled_gap > 0.3
    assert unscaled_gap > 10 * scaled_gap


# ------------------------------------------------------------------------------------------------ lambda_0


def test_kernel_conditioning_against_an_independent_computation() -> None:
    """lambda_0 = (1/S) sum_s lambda_min(K_s) with the states and kernels written out point by point (numpy),
    for a network away from its initialisation (u != 0, so the states move with depth)."""
    model = model64(dim=2, width=12, depth=3, activation="tanh")
    randomize_u(model, 3.0)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    states = x.numpy().copy()
    lambdas = []
    for layer in model.layers:
        u, w, b = (p.detach().numpy() for p in (layer.u, layer.w, layer.b))
        kernel = np.zeros((5, 5))
        for i in range(5):
            for j in range(5):
                kernel[i, j] = sum(
                    np.tanh(w[m] @ states[i] + b[m]) * np.tanh(w[m] @ states[j] + b[m]) for m in range(12)
                )
        kernel /= 12
        lambdas.append(np.linalg.eigvalsh(kernel)[0])
        states = states + np.tanh(states @ w.T + b) @ u / (12 * 3)
    lam = model.kernel_conditioning(x)
    assert lam.dtype == torch.float64 and lam.ndim == 0
    assert lam.item() == pytest.approx(np.mean(lambdas), rel=1e-10, abs=1e-14)
    assert lam.item() > 0
    # rank at most M: more points than neurons give lambda_0 = 0
    many = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert abs(model.kernel_conditioning(many).item()) < 1e-12


def test_initial_decay_rate_is_the_kernel_quadratic_form() -> None:
    """At u = 0, under the mean-field scaling, the decay of the risk through the u's is
    sum_i (M S) |dL/du_i|^2 = (1/S) sum_s p^T K_s p with p_n = (f(x_n) - y_n) / N, which is >= lambda_0 |p|^2
    = (2 lambda_0 / N) L (the Polyak-Lojasiewicz inequality behind the exponential decay)."""
    model = model64(dim=2, width=32, depth=4)
    g = torch.Generator().manual_seed(6)
    x = 2 * torch.randn(6, 2, dtype=torch.float64, generator=g)
    y = x + 0.1 * torch.randn(6, 2, dtype=torch.float64, generator=g)
    risk = model.risk(model(x), y)
    grads = torch.autograd.grad(risk, [layer.u for layer in model.layers])
    through_u = sum(model.mean_field_scale * gr.pow(2).sum() for gr in grads)
    p = (model(x) - y).detach() / 6
    kernels = model.kernel_matrices(x)
    quadratic = torch.einsum("nd,snm,md->", p, kernels, p) / model.depth
    assert through_u.item() == pytest.approx(quadratic.item(), rel=1e-10)
    assert through_u.item() >= 2 * model.kernel_conditioning(x).item() / 6 * risk.item()


def _fit(time: torch.Tensor, risks: torch.Tensor) -> tuple[float, float]:
    """Least-squares line through (t, log L): (decay rate, R^2)."""
    design = torch.stack([time, torch.ones_like(time)], 1)
    log = risks.log()
    coef = torch.linalg.lstsq(design, log[:, None]).solution[:, 0]
    residual = log - design @ coef
    return -coef[0].item(), 1 - (residual.pow(2).sum() / (log - log.mean()).pow(2).sum()).item()


def test_risk_decays_exponentially_at_a_rate_set_by_lambda0_over_n() -> None:
    """The published convergence result at small scale: from a small initial risk, log L is linear in the
    gradient-flow time t = lr x steps (R^2 > 0.999 once the fast directions are gone), L(t) <= exp(-2 lambda_0 t/N)
    L(0) throughout, the fitted rate is at least 2 lambda_0 / N, and of two problems the one with the larger
    lambda_0 / N (points further apart) converges faster."""
    results = []
    n, lr, steps = 6, 1.0, 200
    for spread in (1.0, 3.0):
        g = torch.Generator().manual_seed(0)
        x = spread * torch.randn(n, 2, dtype=torch.float64, generator=g)
        y = x + 0.05 * torch.randn(n, 2, dtype=torch.float64, generator=g)
        model = model64(dim=2, width=128, depth=8, optimizer=sgd(lr))
        lam = model.kernel_conditioning(x).item()
        risks = train(model, x, y, steps)
        time = lr * torch.arange(steps, dtype=torch.float64)
        assert risks[0] < 5e-3  # a small initial risk
        assert torch.all(risks <= risks[0] * torch.exp(-2 * lam / n * time) * (1 + 1e-9))
        rate, r2 = _fit(time[steps // 2 :], risks[steps // 2 :])
        assert r2 > 0.999
        assert rate >= 2 * lam / n
        results.append((lam / n, rate, risks[-1] / risks[0]))
    (small_lam, small_rate, small_end), (large_lam, large_rate, large_end) = results
    assert large_lam > 10 * small_lam
    assert large_rate > 3 * small_rate
    assert large_end < 1e-3 * small_end


# ------------------------------------------------------------------------------------------------ engine and task


def test_adjoint_memory_and_heun_rule() -> None:
    """The residual-stack memory modes apply: memory='adjoint' gives the same output and gradients close to full
    backprop's (exact up to the reconstruction error, small for a smooth flow); rule='heun' follows its own rule."""
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = {}
    for memory in ("full", "adjoint"):
        model = model64(dim=2, width=16, depth=32, memory=memory)
        randomize_u(model, 0.5)
        out = model(x)
        (out.pow(2).sum()).backward()
        grads[memory] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["adjoint"][0], grads["full"][0])
    for a, b in zip(grads["adjoint"][1], grads["full"][1]):
        assert (a - b).norm() <= 1e-3 * b.norm() + 1e-12
    heun = model64(dim=2, width=16, depth=4, rule="heun")
    randomize_u(heun, 2.0)
    states = heun.trajectory(x)
    f = [layer for layer in heun.layers] + [heun.layers[-1]]
    z = x
    for s in range(4):
        predictor = z + 0.25 * f[s](z)
        z = z + 0.125 * (f[s](z) + f[s + 1](predictor))
        torch.testing.assert_close(states[s + 1], z)
    torch.testing.assert_close(heun(x), z)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_classification_through_input_and_output_maps() -> None:
    """in_features != d: a linear input map; num_classes: a linear readout; cross-entropy and accuracy logged."""
    torch.manual_seed(0)
    model = MeanFieldResNet(dim=4, width=8, depth=2, in_features=6, num_classes=3, task="classification")
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    assert model(x).shape == (10, 3)
    loss = model.training_step((x, y), 0)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model(x), y))
    assert model.predict_step(x, 0).sum(1).allclose(torch.ones(10))
    model.reset_classifier(5)
    assert model(x).shape == (10, 5) and model.hparams.num_classes == 5 and model.pretrained_cfg["num_classes"] == 5
    with pytest.raises(zoo.ZooError, match="num_classes >= 2"):
        model.reset_classifier(0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_regression_risk_is_the_published_risk() -> None:
    model = MeanFieldResNet(dim=3, width=4, depth=2)
    out, target = torch.randn(7, 3), torch.randn(7, 3)
    expected = sum(((out[n] - target[n]) ** 2).sum() for n in range(7)) / (2 * 7)
    torch.testing.assert_close(model.risk(out, target), expected)
    torch.testing.assert_close(model.training_step((out, target), 0), model.risk(model(out), target))


def test_bad_input_is_one_zoo_error() -> None:
    cases = [
        ({"dim": 0}, "dim"),
        ({"width": 2.5}, "width"),
        ({"activation": "sigmoid"}, "activation"),
        ({"init": "uniform"}, "init"),
        ({"rho": 0.0}, "rho"),
        ({"beta": -1.0}, "beta"),
        ({"task": "classification"}, "num_classes >= 2"),
        ({"rule": "momentum"}, "rule"),
        ({"memory": "reversible"}, "memory"),
        ({"lr": 0.1}, "training setting"),
        ({"mean_field_scaling": 1}, "mean_field_scaling"),
    ]
    for kwargs, match in cases:
        with pytest.raises(zoo.ZooError, match=match):
            MeanFieldResNet(**kwargs)
    model = MeanFieldResNet(dim=3, width=4, depth=2)
    with pytest.raises(zoo.ZooError, match=r"shape \(B, 3\)"):
        model(torch.randn(2, 4))
    with pytest.raises(zoo.ZooError, match=r"shape \(B, 3\)"):
        model(torch.randn(3))
    with pytest.raises(zoo.ZooError, match="targets"):
        model.risk(torch.randn(2, 3), torch.randn(2, 2))
    with pytest.raises(zoo.ZooError, match="global_pool"):
        model.reset_classifier(2, "avg")
    with pytest.raises(zoo.ZooError):
        sample_heavy_tailed(3, 2, beta=0.0)


# ------------------------------------------------------------------------------------------------ registry, files


def test_builders_and_save_pretrained_round_trip(tmp_path: Path) -> None:
    assert zoo.list_models("mean_field*") == ["mean_field_resnet", "mean_field_resnet_teacher"]
    model = zoo.create_model("mean_field_resnet_teacher", width=8)
    assert (model.dim, model.width, model.depth) == (4, 8, 8)
    assert "input_size" not in model.pretrained_cfg and model.pretrained_cfg["in_features"] == 4
    randomize_u(model, 1.0)
    model.save_pretrained(tmp_path / "saved")
    again = MeanFieldResNet.from_pretrained(tmp_path / "saved")
    x = torch.randn(3, 4)
    torch.testing.assert_close(again(x), model(x))
    with pytest.raises(zoo.ZooError):
        zoo.create_model("mean_field_resnet", features_only=True)


def test_teacher_data_is_deterministic_and_learnable_by_the_student() -> None:
    """Same seed, same data (another seed, other data); the splits are consecutive parts of one draw; the
    identity (the student at u = 0) has a clearly positive risk."""
    x1, y1 = teacher_regression(50)
    x2, y2 = teacher_regression(50)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(teacher_regression(50, seed=1)[1], y1)
    data = TeacherDataModule(num_train=20, num_val=10, num_test=5, batch_size=8)
    data.setup("fit")
    assert [len(d) for d in (data.train_dataset, data.val_dataset, data.test_dataset)] == [20, 10, 5]
    torch.testing.assert_close(data.val_dataset.tensors[0], teacher_regression(35)[0][20:30])
    assert 0.5 * (y2 - x2).pow(2).sum(1).mean() > 0.1
    with pytest.raises(zoo.ZooError, match="num_train"):
        TeacherDataModule(num_train=0)
    with pytest.raises(zoo.ZooError, match="noise"):
        TeacherDataModule(noise=-1.0)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")
def test_recipe_trains_briefly() -> None:
    """The teacher recipe builds through the CLI and a few steps lower the validation risk."""
    import lightning.pytorch as pl

    from zoo.cli import load_recipe

    model, data = load_recipe("teacher_mean_field_resnet", "--model.init_args.width=16")
    assert isinstance(model, MeanFieldResNet) and model.mean_field_scaling
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
    trainer.fit(model, datamodule=data)
    after = trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
    assert after < 0.7 * before


def test_benchmark_small_mode(tmp_path: Path) -> None:
    """benchmarks/mean_field_scaling.py --small runs, prints its tables and writes the CSV and PNG."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mean_field_scaling.py"), "--small", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "| M | S |" in result.stdout and "lambda_0" in result.stdout
    for name in ("mean_field_scaling.csv", "mean_field_decay.csv", "mean_field_scaling.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "mean_field_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_offers_only_the_modes_the_model_runs() -> None:
    """memory is checked against the model's own modes: 'reversible' (the residual stack's, for the momentum rule)
    is refused by the model, with the reason, not offered and then refused by the stack."""
    for bad in ("bogus", "reversible"):
        with pytest.raises(zoo.ZooError, match=r"memory must be one of 'full', 'adjoint'.*momentum rule") as err:
            MeanFieldResNet(memory=bad)
        assert "'reversible'," not in str(err.value)


def test_weight_decay_is_the_mean_field_penalty() -> None:
    """The neurons' weight decay is divided by M * S (their learning rate is multiplied by it): the penalty
    (wd / 2) (1/(M S)) sum |theta_i|^2, so the decay per step is lr * wd at every size and the curves with weight
    decay converge in M and S as those without do (the unscaled decay lr * M * S * wd made the larger network
    diverge); the input map and readout keep the optimiser's decay."""
    model = MeanFieldResNet(
        dim=3,
        width=8,
        depth=5,
        in_features=6,
        num_classes=4,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, weight_decay=0.1),
    )
    neurons = {id(p) for p in model.stack.parameters()}
    for group in model.configure_optimizers().param_groups:
        inner = id(group["params"][0]) in neurons
        if group["weight_decay"]:
            assert group["weight_decay"] == pytest.approx(0.1 / 40 if inner else 0.1)
            assert group["lr"] * group["weight_decay"] == pytest.approx(0.001)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, dtype=torch.float64, generator=g)
    y = x + 0.5 * torch.sin(2 * x.flip(1))
    curves = []
    for width, depth in ((16, 4), (32, 8)):
        decayed = functools.partial(torch.optim.SGD, lr=0.5, weight_decay=0.02)
        curves.append(train(model64(dim=2, width=width, depth=depth, optimizer=decayed), x, y, 30))
    assert torch.isfinite(curves[1]).all()
    assert (curves[0] - curves[1]).abs().max() < 0.1 * curves[0][0]


def test_load_from_checkpoint_keeps_the_recorded_pretrained_cfg(tmp_path: Path) -> None:
    """MeanFieldResNet's checkpoint check no longer shadows HubMixin's hook: load_from_checkpoint gives back the
    architecture and description the checkpoint records (they were dropped), and a checkpoint of another width is
    still one ZooError."""
    import lightning.pytorch as pl

    model = zoo.create_model("mean_field_resnet_teacher", width=8)
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "m.ckpt")
    back = MeanFieldResNet.load_from_checkpoint(tmp_path / "m.ckpt")
    assert back.pretrained_cfg["architecture"] == "mean_field_resnet_teacher"
    assert back.pretrained_cfg["description"] == model.pretrained_cfg["description"]
    with pytest.raises(zoo.ZooError, match="do not fit MeanFieldResNet"):
        MeanFieldResNet.load_from_checkpoint(tmp_path / "m.ckpt", width=4)


def test_kernel_conditioning_of_no_points_is_one_clear_error() -> None:
    model = MeanFieldResNet(dim=3, width=4, depth=2)
    with pytest.raises(zoo.ZooError, match="at least one point"):
        model.kernel_conditioning(torch.zeros(0, 3))
    with pytest.raises(zoo.ZooError, match=r"shape \(B, 3\)"):
        model.kernel_conditioning(torch.zeros(5, 2))


def test_heavy_tailed_model_loads_back(tmp_path: Path) -> None:
    """A model with heavy-tailed w is rebuilt on the meta device to receive its weights: the sampler runs there
    (torch's Gamma validation read a meta tensor, so from_pretrained and weights= failed for every such model)."""
    model = zoo.create_model("mean_field_resnet", dim=3, width=8, depth=2, init="heavy_tailed", beta=0.75)
    randomize_u(model, 1.0)
    model.save_pretrained(tmp_path / "heavy")
    back = zoo.from_pretrained(tmp_path / "heavy")
    assert back.hparams.init == "heavy_tailed"
    x = torch.randn(4, 3)
    torch.testing.assert_close(back(x), model(x))
    assert sample_heavy_tailed(5, 3, device="meta").is_meta
