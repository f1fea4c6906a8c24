"""Neural ODEs with width p and L switches (zoo.models.NeuralODE) and the constructive interpolation theorem.

Every check compares with an independent computation: the interpolation with its targets (to 1e-6 in float64),
with the closed-form flow and with scipy's adaptive Runge-Kutta integration of the same piecewise-constant field;
the discretisation with a hand-written Euler / Heun loop (outputs and gradients); the gradients with finite
differences (torch.autograd.gradcheck); backward integration with the initial state, at the rule's order.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import zoo
from zoo.cli import load_recipe
from zoo.errors import ZooError
from zoo.models import NeuralODE
from zoo.models.neural_ode import closed_form_flow, interpolating_controls, interpolation_switches

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def theorem_switches(n: int, p: int, d: int) -> int:
    """The theorem's count, written out here (not read from the code under test)."""
    return 2 * math.ceil(n / p) - (2 if d > n else 1)


def random_pairs(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=torch.float64), torch.rand(n, d, generator=g, dtype=torch.float64)


def scipy_flow(model: NeuralODE, x: torch.Tensor, sigma=lambda u: np.maximum(u, 0.0)) -> np.ndarray:
    """The flow of (N1) with the model's controls, integrated by scipy's RK45 interval by interval."""
    ends = model.interval_ends().detach().numpy()
    out = []
    for point in x.numpy():
        state = point
        for j, field in enumerate(model.fields):
            a, b, w = (t.detach().numpy() for t in (field.a, field.b, field.w))

            def rhs(t, z, a=a, b=b, w=w):
                return w @ sigma(a @ z + b)

            sol = solve_ivp(rhs, (ends[j], ends[j + 1]), state, method="RK45", rtol=1e-12, atol=1e-13)
            state = sol.y[:, -1]
        out.append(state)
    return np.stack(out)


# ------------------------------------------------------------------------------------------------ interpolation


@pytest.mark.parametrize(
    ("n", "p", "d"),
    [(6, 2, 2), (9, 3, 3), (10, 4, 2), (7, 1, 2), (8, 8, 2), (5, 2, 7), (3, 3, 4), (4, 1, 6)],
)
def test_interpolation_is_exact_with_the_theorems_switches(n: int, p: int, d: int) -> None:
    """Every x_n lands on y_n to 1e-6 with exactly 2 ceil(N/p) - 1 switches (- 2 when d > N): through the
    model's Euler steps, its Heun steps, the closed-form flow, and scipy's adaptive integration of the field."""
    x, y = random_pairs(n, d, seed=n * 100 + p * 10 + d)
    model = interpolating_controls(x, y, p, horizon=2.0)
    assert model.switches == theorem_switches(n, p, d) == interpolation_switches(n, p, d)
    assert model.dim == d and all(f.a.shape == (p, d) and f.w.shape == (d, p) for f in model.fields)
    with torch.no_grad():
        assert (model(x) - y).abs().max() < 1e-6
        assert (closed_form_flow(model, x) - y).abs().max() < 1e-6
        heun = interpolating_controls(x, y, p, horizon=2.0, steps=3, rule="heun")
        assert (heun(x) - y).abs().max() < 1e-6
    assert np.abs(scipy_flow(model, x) - y.numpy()).max() < 1e-6
    # each piece is a field whose w_i are orthogonal to its a_k: a_k . x is frozen, the field constant along the flow,
    # so one Euler step of the whole interval is the exact flow (the same result as 3 Heun steps)
    for field in model.fields:
        assert (field.a @ field.w).abs().max() < 1e-9
    with torch.no_grad():
        torch.testing.assert_close(model(x), heun(x), rtol=0, atol=1e-9)


def test_interpolation_moves_a_whole_neighbourhood_smoothly() -> None:
    """The flow is a diffeomorphism: points near x_n land near y_n (continuity), and backward integration from the
    targets recovers the inputs exactly (the discretisation of these fields is exact both ways)."""
    x, y = random_pairs(6, 3, seed=3)
    model = interpolating_controls(x, y, 2)
    with torch.no_grad():
        near = model(x + 1e-9)
        assert (near - y).abs().max() < 1e-4
        back = model.integrate(y, model.horizon, 0.0)
    assert (back - x).abs().max() < 1e-6


def test_interpolation_refuses_data_outside_its_assumptions() -> None:
    x, y = random_pairs(5, 2, seed=0)
    with pytest.raises(ZooError, match="inputs 1 and 3 are the same point"):
        interpolating_controls(torch.cat([x[:3], x[1:2]]), y[:4], 2)
    with pytest.raises(ZooError, match="targets .* same point"):
        interpolating_controls(x[:4], torch.cat([y[:3], y[:1]]), 2)
    with pytest.raises(ZooError, match="d >= 2"):
        interpolating_controls(x[:, :1], y[:, :1], 2)
    with pytest.raises(ZooError, match="width"):
        interpolating_controls(x, y, 0)
    with pytest.raises(ZooError, match="same shape"):
        interpolating_controls(x, y[:4], 2)
    with pytest.raises(ZooError, match="NaN or infinite"):
        interpolating_controls(x.clone().fill_(float("nan")), y, 2)
    with pytest.raises(ZooError, match=r"\(N, d\)"):
        interpolating_controls(x[0], y[0], 2)
    with pytest.raises(ZooError, match="horizon"):
        interpolating_controls(x, y, 2, horizon=0.0)


def test_adjoint_gradients_are_exact_for_exactly_invertible_steps() -> None:
    """memory='adjoint' rebuilds the states by reverse steps; with the interpolating fields a reverse Euler step
    inverts the forward one exactly, so its gradients equal full backprop's."""
    x, y = random_pairs(5, 3, seed=1)
    grads = {}
    for memory in ("full", "adjoint"):
        model = interpolating_controls(x, y, 2, steps=2, memory=memory)
        inputs = x.clone().requires_grad_(True)
        loss = (model(inputs) - y.flip(0)).pow(2).sum()
        loss.backward()
        grads[memory] = [inputs.grad] + [p.grad for p in model.parameters()]
    for full, adjoint in zip(grads["full"], grads["adjoint"], strict=True):
        torch.testing.assert_close(adjoint, full, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ the discretisation


def small_model(**kwargs) -> NeuralODE:
    options = {"dim": 3, "width": 4, "switches": 2, "steps": 3, "embed": False, "num_classes": 0, **kwargs}
    torch.manual_seed(0)
    model = NeuralODE(in_features=options["dim"], **options).double()
    if model.learned_times:  # unequal intervals
        with torch.no_grad():
            model.time_logits.normal_(0.0, 0.5)
    return model


def direct(model: NeuralODE, z: torch.Tensor, rule: str) -> torch.Tensor:
    """(N1) by a hand-written loop: k steps of size (tau_{j+1} - tau_j) / k per interval, Euler or Heun."""
    lengths = model.interval_lengths()
    for j, field in enumerate(model.fields):

        def f(x, field=field):
            return torch.relu(x @ field.a.T + field.b) @ field.w.T

        h = lengths[j] / model.steps
        for _ in range(model.steps):
            if rule == "euler":
                z = z + h * f(z)
            else:
                fz = f(z)
                z = z + h / 2 * (fz + f(z + h * fz))
    return z


@pytest.mark.parametrize("rule", ["euler", "heun"])
@pytest.mark.parametrize("times", ["uniform", "learned", (0.2, 0.7)])
def test_rules_match_a_direct_implementation(rule: str, times) -> None:
    """Outputs and gradients (input, every control, the switch-time logits) equal a hand-written loop; memory
    'adjoint' gives the same output."""
    model = small_model(rule=rule, switch_times=times)
    z = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = model(z)
    expected = direct(model, z, rule)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    params = list(model.parameters())
    got = torch.autograd.grad(out.pow(2).sum(), [z, *params])
    want = torch.autograd.grad(expected.pow(2).sum(), [z, *params])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    adjoint = small_model(rule=rule, switch_times=times, memory="adjoint")
    torch.testing.assert_close(adjoint(z), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", ["euler", "heun"])
def test_adjoint_gradients_converge_to_full_backprop(rule: str) -> None:
    """memory='adjoint' rebuilds the states approximately: its gradient error shrinks as the steps get finer."""
    z = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    errors = []
    for steps in (4, 16):
        grads = []
        for memory in ("full", "adjoint"):
            model = small_model(rule=rule, steps=steps, memory=memory, activation="tanh")
            inputs = z.clone().requires_grad_(True)
            model(inputs).pow(2).sum().backward()
            grads.append(torch.cat([inputs.grad.flatten()] + [p.grad.flatten() for p in model.parameters()]))
        errors.append(float((grads[1] - grads[0]).norm() / grads[0].norm()))
    assert 0 < errors[1] < errors[0] / 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rule": "euler"},
        {"rule": "heun", "switch_times": "learned"},
        {"rule": "heun", "semi_autonomous": True},
        {"rule": "euler", "switch_times": "learned", "semi_autonomous": True, "activation": "softplus"},
    ],
)
def test_gradients_match_finite_differences(kwargs) -> None:
    """torch.autograd.gradcheck in float64 on a tiny model (tanh unless said: no kink for finite differences)."""
    model = small_model(**{"activation": "tanh", "dim": 2, "width": 3, "switches": 1, "steps": 2, **kwargs})
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    z = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)

    def fn(z, *values):
        return torch.func.functional_call(model, dict(zip(names, values)), (z,))

    assert torch.autograd.gradcheck(fn, (z, *params), eps=1e-6, atol=1e-7)


def copy_controls(source: NeuralODE, target: NeuralODE) -> None:
    for a, b in zip(source.fields, target.fields, strict=True):
        b.load_state_dict(a.state_dict())
    if source.learned_times:
        target.time_logits.copy_(source.time_logits)


@pytest.mark.parametrize(("rule", "order"), [("euler", 1), ("heun", 2)])
def test_backward_integration_recovers_the_initial_state_at_the_rules_order(rule: str, order: int) -> None:
    """The discretised flow converges to the exact one (scipy, tight tolerances) at the rule's order (the error
    falls by 2^order when the steps per interval double), and integrating backward from x(T) (negative steps)
    recovers x(0): for Euler at order 1; for Heun faster than its order 2, at order 3, because the h^3 local errors
    of a step and of the reverse step cancel at leading order (odd powers of h change sign with h), which Euler's
    h^2 local errors do not."""
    reference = small_model(activation="tanh", rule=rule, switch_times="learned")
    with torch.no_grad():
        for field in reference.fields:
            field.w.mul_(3.0)  # a field strong enough for a visible discretisation error
    z = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact = torch.from_numpy(scipy_flow(reference, z, np.tanh))
    forward_errors, round_trip_errors = [], []
    for steps in (8, 16, 32, 64):
        model = small_model(activation="tanh", rule=rule, switch_times="learned", steps=steps)
        with torch.no_grad():
            copy_controls(reference, model)
            end = model.integrate(z, 0.0, model.horizon)
            torch.testing.assert_close(end, model.flow_map(z), rtol=0, atol=0)
            back = model.integrate(end, model.horizon, 0.0)
        forward_errors.append(float((end - exact).norm()))
        round_trip_errors.append(float((back - z).norm()))
    for errors, rate in ((forward_errors, order), (round_trip_errors, 1 if rule == "euler" else 3)):
        ratios = [a / b for a, b in zip(errors[:-1], errors[1:])]
        assert errors[-1] < 1e-2
        for ratio in ratios[1:]:
            assert 2**rate * 0.8 < ratio < 2**rate * 1.25, (errors, ratios)


def test_learned_switch_times_stay_ordered_and_flow_between_any_times() -> None:
    model = small_model(switch_times="learned", horizon=2.0)
    with torch.no_grad():
        model.time_logits.copy_(torch.tensor([4.0, -6.0, 1.0]))
    ends = model.interval_ends()
    assert ends[0] == 0 and torch.isclose(ends[-1], torch.tensor(2.0, dtype=ends.dtype))
    assert (torch.diff(ends) > 0).all()
    z = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        trajectory = model.flow(z)  # the interval ends
        assert trajectory.shape == (4, 4, 3)
        torch.testing.assert_close(trajectory[-1], model.flow_map(z))
        # torchdiffeq's convention: the trajectory at given times, the first the initial state; through a switch
        times = [0.0, float(ends[1]), float(ends[2]), 2.0]
        torch.testing.assert_close(model.flow(z, times), trajectory, rtol=1e-12, atol=1e-12)
        middle = model.flow(z, [0.0, 0.5 * float(ends[1]), float(ends[1])])
        assert middle.shape == (3, 4, 3)
        with pytest.raises(ZooError, match="increasing or strictly decreasing"):
            model.flow(z, [0.0, 1.0, 0.5])


def test_semi_autonomous_shares_w_and_a() -> None:
    model = small_model(semi_autonomous=True)
    fields = model.fields
    assert all(f.a is fields[0].a and f.w is fields[0].w for f in fields)
    assert len({id(f.b) for f in fields}) == len(fields)
    plain = small_model()
    count = sum(p.numel() for p in model.parameters())
    assert count == 2 * 3 * 4 + 3 * 4
    assert sum(p.numel() for p in plain.parameters()) == 3 * (2 * 3 * 4 + 4)


def test_bad_arguments_are_one_zoo_error() -> None:
    for kwargs, match in (
        ({"rule": "momentum"}, "rule"),
        ({"memory": "reversible"}, "memory"),
        ({"activation": "swish"}, "activation"),
        ({"switch_times": [0.5]}, "switch_times"),
        ({"switches": 2, "switch_times": [0.6, 0.4]}, "increase"),
        ({"embed": False, "dim": 32}, "embed=False"),
        ({"width": 0}, "width"),
        ({"lr": 0.1}, "training setting"),
    ):
        with pytest.raises(ZooError, match=match):
            NeuralODE(img_size=8, in_chans=1, **kwargs)
    model = zoo.neural_ode_digits()
    with pytest.raises(ZooError, match=r"takes images \(B, 1, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ZooError, match="global_pool"):
        model.reset_classifier(3, "avg")


def test_timm_protocol_over_the_intervals() -> None:
    """forward_intermediates gives the state at each interval's end; the last is forward_features; the head."""
    model = zoo.neural_ode_digits(switches=2, dim=6, width=5).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        final, states = model.forward_intermediates(x)
        assert len(states) == 3 and all(s.shape == (3, 6) for s in states)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(states[-1], final)
        expected = model.flow(model.embed(x.flatten(1)))[1:]
        for s, e in zip(states, expected, strict=True):
            torch.testing.assert_close(s, e)
        only = model.forward_intermediates(x, indices=[0], output_fmt="NCHW", intermediates_only=True)
        assert len(only) == 1 and only[0].shape == (3, 6, 1, 1)
        logits = model(x)
        assert logits.shape == (3, 10)
        torch.testing.assert_close(model.forward_head(final), logits)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), final)
    assert model.pretrained_cfg["input_size"] == (1, 8, 8)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = zoo.neural_ode_digits(switch_times="learned", semi_autonomous=True, dim=6, width=5).eval()
    with torch.no_grad():
        model.time_logits.normal_()
    model.save_pretrained(tmp_path / "node")
    loaded = NeuralODE.from_pretrained(tmp_path / "node").eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.fields[1].a is loaded.fields[0].a


@pytest.mark.parametrize("switch_times", ["uniform", [0.2, 0.45, 0.5], "learned"])
def test_pruned_model_flows_to_the_kept_end_and_round_trips(switch_times, tmp_path: Path) -> None:
    """After prune_intermediate_layers the model's features are the state at the end of the last interval kept (as
    forward_intermediates gave it before), its times end there, and its hparams rebuild it exactly."""
    model = zoo.neural_ode_digits(switches=3, switch_times=switch_times, dim=6, width=5).double().eval()
    if switch_times == "learned":
        with torch.no_grad():
            model.time_logits.copy_(torch.tensor([0.3, -0.5, 1.0, 0.2]))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = model.forward_intermediates(x, intermediates_only=True)
        ends = model.interval_ends()
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert model.switches == 1 and model.hparams["switches"] == 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), before[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.interval_ends(), ends[:3], rtol=1e-12, atol=1e-12)
    assert model.hparams["horizon"] == pytest.approx(float(ends[2]), rel=1e-12)
    if isinstance(switch_times, list):
        assert model.hparams["switch_times"] == [0.2]
    model.save_pretrained(tmp_path / "pruned")
    loaded = zoo.from_pretrained(tmp_path / "pruned").double().eval()
    assert loaded.switches == 1 and loaded.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        # flowing between arbitrary times uses the pruned horizon too
        torch.testing.assert_close(loaded.interval_ends(), model.interval_ends(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ recipe, benchmark


def test_recipe_trains_briefly() -> None:
    """The digits recipe builds its model and data module and runs one training and one validation batch."""
    model, data = load_recipe("digits_neural_ode")
    assert isinstance(model, NeuralODE) and model.hparams.num_classes == 10
    trainer = pl.Trainer(
        fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, data)
    assert trainer.state.finished


def test_benchmark_small_mode_writes_its_table_and_figure(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("node_switches", ROOT / "benchmarks" / "node_switches.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = bench.main(["--small", "--out-dir", str(tmp_path)])
    rows = [line for line in text.splitlines() if line.startswith("| 2 ") or line.startswith("| 4 ")]
    assert len(rows) == 2
    assert rows[0].split("|")[4].strip() == str(theorem_switches(4, 2, 2))
    assert rows[1].split("|")[4].strip() == str(theorem_switches(4, 4, 2))
    assert all(float(row.split("|")[6]) < 1e-6 for row in rows)  # the constructive controls' error
    assert (tmp_path / "node_switches.csv").read_text().startswith("width,switches,error")
    assert (tmp_path / "node_switches.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("t_span", [[0.0, 0.5], [0.0, 0.5, 1.0], [1.0, 0.3]])
def test_learned_switch_times_get_their_gradient_through_parts_of_intervals(t_span: list[float]) -> None:
    """A time inside an interval splits it: the part's step is a function of the logits too, so the gradient of
    the flow at arbitrary times matches central finite differences (it ignored the split before)."""
    torch.manual_seed(0)
    model = NeuralODE(
        dim=2,
        width=4,
        switches=2,
        steps=4,
        activation="tanh",
        switch_times="learned",
        in_features=2,
        embed=False,
        num_classes=0,
    ).double()
    with torch.no_grad():
        model.time_logits.copy_(torch.tensor([0.2, -0.1, 0.3]))
    z = torch.randn(3, 2, dtype=torch.float64)

    def value() -> torch.Tensor:
        return model.flow(z, t_span)[-1].square().sum()

    (grad,) = torch.autograd.grad(value(), model.time_logits)
    numeric = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            model.time_logits[i] += 1e-6
            up = value()
            model.time_logits[i] -= 2e-6
            down = value()
            model.time_logits[i] += 1e-6
            numeric[i] = (up - down) / 2e-6
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


# -------------------------------------------------------------------------------------------- inputs and conventions


def test_mixed_dtypes_are_one_zoo_error_and_autocast_still_mixes() -> None:
    """An input or state whose dtype differs from the weights is one ZooError naming both (torch's raw 'mat1 and
    mat2 must have the same dtype' before); under autocast float32 / bfloat16 mix as torch allows, float64 not."""
    model = zoo.neural_ode_digits(dim=4, width=3)
    with pytest.raises(ZooError, match=r"input is torch.float64 but the model's weights are torch.float32"):
        model(torch.randn(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ZooError, match=r"input is torch.float32 .* torch.float64: cast"):
        model.double()(torch.randn(2, 1, 8, 8))
    flow = small_model()  # float64, the input is the state
    with pytest.raises(ZooError, match=r"state is torch.float32 .* torch.float64"):
        flow.flow_map(torch.randn(2, 3))
    with pytest.raises(ZooError, match=r"state is torch.float32"):
        flow.flow(torch.randn(2, 3), [0.0, 0.5])
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)).shape == (2, 10)
        with pytest.raises(ZooError, match="float64"):
            model(torch.randn(2, 1, 8, 8, dtype=torch.float64))


def test_switch_times_as_an_array_or_a_tensor() -> None:
    """The L times as a 1-D numpy array or tensor (np.linspace(0, T, L + 2)[1:-1]) build the model a list builds,
    recorded in hparams as a list of floats (they were refused as not 'a list of the L switch times')."""
    models = []
    for times in ([0.25, 0.5, 0.75], np.linspace(0.0, 1.0, 5)[1:-1], torch.tensor([0.25, 0.5, 0.75])):
        torch.manual_seed(0)
        models.append(NeuralODE(dim=2, width=3, in_features=2, embed=False, num_classes=0, switch_times=times))
        assert models[-1].hparams["switch_times"] == [0.25, 0.5, 0.75]
        assert all(type(t) is float for t in models[-1].hparams["switch_times"])
    z = torch.randn(4, 2)
    for model in models[1:]:
        torch.testing.assert_close(model(z), models[0](z), rtol=0, atol=0)
    with pytest.raises(ZooError, match="switch_times"):
        NeuralODE(img_size=8, in_chans=1, switch_times=np.array([[0.25, 0.5, 0.75]]))


def test_flow_refuses_a_bad_t_span_with_one_zoo_error() -> None:
    """t_span that is not a 1-D sequence of times in [0, T] is one ZooError (a 2-D or 0-d tensor, a bare number
    or a string raised TypeError / ValueError before; NaN was called 'not monotone')."""
    model = small_model()
    z = torch.randn(2, 3, dtype=torch.float64)
    for t_span in (torch.tensor([[0.0, 1.0]]), torch.tensor(0.5), 0.5, "01"):
        with pytest.raises(ZooError, match="t_span must be a 1-D sequence"):
            model.flow(z, t_span)
    with pytest.raises(ZooError, match=r"t_span\[1\] must be a finite number"):
        model.flow(z, [0.0, float("nan")])
    with pytest.raises(ZooError, match=r"t_span\[1\] must be a finite number in \[0, 1\]"):
        model.flow(z, [0.0, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(model.flow(z, np.array([0.0, 1.0])), model.flow(z, [0.0, 1.0]), rtol=0, atol=0)


def test_group_matcher_orders_the_intervals_for_layer_decay() -> None:
    """timm's layer-wise decay groups: the stem (embedding, time logits, shared a / w), then each interval in time
    order, then the head (timm's fallback without group_matcher put intervals 0 .. 2 in the stem's group)."""
    from timm.optim._param_groups import group_parameters

    model = zoo.neural_ode_digits(dim=4, width=3, switch_times="learned")
    layers = group_parameters(model, model.group_matcher(), reverse=True)
    assert layers["embed.weight"] == layers["time_logits"] == 0
    assert [layers[f"intervals.{j}.0.a"] for j in range(4)] == [1, 2, 3, 4]
    semi = zoo.neural_ode_digits(dim=4, width=3, semi_autonomous=True)
    layers = group_parameters(semi, semi.group_matcher(), reverse=True)
    assert layers["intervals.0.0.a"] == layers["intervals.0.0.w"] == 0
    assert [layers[f"intervals.{j}.0.b"] for j in range(4)] == [1, 2, 3, 4]
