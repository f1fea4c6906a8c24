"""zoo.models.TwoLayerReLU: the mean-field two-layer ReLU regression model, its training by proximal steps inside a
Lightning Trainer, and the generated planar problems it is studied on (zoo.data.planar)."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import zoo
from zoo.data.planar import PlanarDataModule, planar_problem
from zoo.errors import ZooError
from zoo.models import TwoLayerReLU
from zoo.optim import ProximalPoint

pytestmark = pytest.mark.usefixtures("one_thread")


def by_definition(net: TwoLayerReLU, x: torch.Tensor) -> torch.Tensor:
    """(1/M) sum_i u_i relu(<w_i, x~>), one neuron and one input at a time (x~ = (x, 1) with a bias)."""
    out = torch.zeros(x.shape[0], dtype=x.dtype)
    u, weight = net.output_weights.detach(), net.weight.detach()
    for j in range(x.shape[0]):
        xt = torch.cat([x[j], torch.ones(1, dtype=x.dtype)]) if net.has_bias else x[j]
        for i in range(net.width):
            out[j] += u[i] * max(float(weight[i] @ xt), 0.0)
    return out / net.width


@pytest.mark.parametrize("signs, bias", [("fixed", True), ("learned", True), ("learned", False)])
def test_forward_is_the_mean_field_two_layer_network(signs: str, bias: bool) -> None:
    torch.manual_seed(0)
    net = TwoLayerReLU(in_features=3, width=7, signs=signs, bias=bias).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(net(x), by_definition(net, x), rtol=1e-12, atol=1e-14)
    assert net.weight.shape == (7, 3 + int(bias))
    if signs == "fixed":
        assert net.signs.tolist() == [1.0] * 4 + [-1.0] * 3 and net.output is None
        assert [n for n, _ in net.named_parameters()] == ["weight"]
    else:
        assert [n for n, _ in net.named_parameters()] == ["weight", "output"]


def test_gradient_is_the_published_formula_and_dead_neurons_get_none() -> None:
    """dF/dw_i = (2 u_i / (n M)) sum_j e_j s_ij x~_j, e_j = f(x_j) - y_j, s_ij = 1[<w_i, x~_j> > 0]."""
    torch.manual_seed(1)
    net = TwoLayerReLU(in_features=2, width=6).double()
    with torch.no_grad():
        net.weight[2] = torch.tensor([0.1, 0.2, -5.0], dtype=torch.float64)  # activates no input below
    x = torch.rand(9, 2, dtype=torch.float64) * 2 - 1
    y = torch.randn(9, dtype=torch.float64)
    net.objective(x, y).backward()
    xt = torch.cat([x, torch.ones(9, 1, dtype=torch.float64)], 1)
    e = net(x).detach() - y
    s = (xt @ net.weight.detach().T > 0).double()  # (n, M)
    expected = 2 * net.signs[:, None] / (9 * 6) * ((e[:, None] * s).T @ xt)
    torch.testing.assert_close(net.weight.grad, expected, rtol=1e-12, atol=1e-15)
    assert not net.active_neurons(x)[2] and torch.equal(net.weight.grad[2], torch.zeros(3, dtype=torch.float64))


def test_symmetric_initialisation_starts_from_the_zero_function() -> None:
    torch.manual_seed(0)
    net = TwoLayerReLU(in_features=2, width=8, symmetric_init=True, init_scale=0.5)
    assert torch.equal(net.weight[:4], net.weight[4:])
    x = torch.randn(10, 2)
    assert float(net(x).detach().abs().max()) < 1e-6 * float(
        torch.relu(net.preactivations(x)).detach().max()
    )  # cancels to rounding
    norms = TwoLayerReLU(in_features=2, width=4000, init_scale=0.5).weight.norm(dim=1)
    assert abs(float(norms.pow(2).mean()) - 0.25) < 0.02  # E|w_i|^2 = init_scale^2


def test_bad_arguments_and_inputs_are_one_clear_error() -> None:
    with pytest.raises(ZooError, match="even width"):
        TwoLayerReLU(width=5, symmetric_init=True)
    with pytest.raises(ZooError, match="signs"):
        TwoLayerReLU(signs="random")
    with pytest.raises(ZooError, match="training setting"):
        TwoLayerReLU(lr=0.1)
    net = TwoLayerReLU(in_features=2, width=4)
    with pytest.raises(ZooError, match=r"\(B, 2\)"):
        net(torch.zeros(3, 5))
    with pytest.raises(ZooError, match="targets"):
        net.objective(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ZooError, match="lr_scheduler"):
        TwoLayerReLU(
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)
        ).configure_optimizers()


@pytest.mark.parametrize(
    "in_features, shape, hint",
    [
        (1, (3,), r"\(batch, in_features\).*x\.unsqueeze\(-1\)"),  # 3 is the batch size, not the features
        (3, (3,), r"x\.unsqueeze\(0\)"),
        (2, (4, 3, 2), r"x\.reshape\(-1, 2\)"),
        (2, (3, 5), "in_features=5"),
    ],
)
def test_bad_input_shape_hint_names_the_fix(in_features: int, shape: tuple[int, ...], hint: str) -> None:
    with pytest.raises(ZooError, match=hint) as info:
        TwoLayerReLU(in_features=in_features, width=4)(torch.randn(shape))
    if len(shape) == 1:
        assert "in_features=3" not in str(info.value).split("got")[-1]  # no model rebuilt for the batch size


def test_configure_optimizers_gives_the_proximal_method_over_the_neurons() -> None:
    net = TwoLayerReLU(in_features=1, width=4)
    opt = net.configure_optimizers()
    assert isinstance(opt, ProximalPoint) and opt.defaults["distance"] == "wasserstein"
    assert opt.param_groups[0]["params"] == [net.weight] and torch.equal(
        opt.param_groups[0]["labels"], net.signs.long()
    )
    learned = TwoLayerReLU(in_features=1, width=4, signs="learned")
    assert learned.configure_optimizers().param_groups[0]["params"] == [learned.weight, learned.output]
    sgd = TwoLayerReLU(
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1),
    ).configure_optimizers()
    assert isinstance(sgd["optimizer"], torch.optim.SGD) and sgd["lr_scheduler"]["interval"] == "epoch"


@pytest.mark.parametrize("distance", ["frobenius", "wasserstein"])
def test_lightning_trainer_run_is_the_plain_closure_loop(distance: str, tmp_path) -> None:
    """Trainer.fit (automatic optimisation passes its closure to ProximalPoint.step) gives the parameters of the same
    number of proximal steps taken in a plain loop, and lowers the objective."""
    x, y = planar_problem("sine")
    optimizer = functools.partial(ProximalPoint, gamma=0.5, inner_steps=5, distance=distance)
    torch.manual_seed(0)
    net = TwoLayerReLU(in_features=1, width=16, init_scale=0.3, optimizer=optimizer)
    torch.manual_seed(0)
    ref = TwoLayerReLU(in_features=1, width=16, init_scale=0.3, optimizer=optimizer)
    before = float(ref.objective(x, y))
    trainer = pl.Trainer(
        max_epochs=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(net, DataLoader(TensorDataset(x, y), batch_size=len(x)))
    opt = ref.configure_optimizers()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ref.objective(x, y)
        loss.backward()
        return loss

    for _ in range(6):
        opt.step(closure)
    torch.testing.assert_close(net.weight, ref.weight, rtol=1e-5, atol=1e-6)
    assert float(ref.objective(x, y)) < 0.9 * before
    assert trainer.optimizers[0].state[net.weight]["step"] == 6


def test_save_pretrained_round_trip_and_registered_class(tmp_path) -> None:
    torch.manual_seed(0)
    net = TwoLayerReLU(in_features=2, width=6, signs="learned", init_scale=0.5)
    net.save_pretrained(tmp_path / "two_layer")
    back = zoo.from_pretrained(tmp_path / "two_layer")
    assert type(back) is TwoLayerReLU and back.hparams["width"] == 6 and back.hparams["signs"] == "learned"
    x = torch.randn(4, 2)
    torch.testing.assert_close(back(x), net(x))
    assert zoo.registry.model_class("zoo.models.TwoLayerReLU") is TwoLayerReLU


def test_planar_problems_are_the_documented_data() -> None:
    x, y = planar_problem("sine")
    torch.testing.assert_close(x[:, 0], torch.linspace(-1, 1, 20))
    torch.testing.assert_close(y, torch.sin(4 * x[:, 0] - math.pi / 2))
    x, y = planar_problem("linear")
    assert x.shape == (5, 1) and torch.allclose(y, 0.5 * x[:, 0] + 0.6)
    x, y = planar_problem("disc", 4000, seed=3)
    inside = x.pow(2).sum(1) < 2 / math.pi
    assert x.abs().max() <= 1 and torch.equal(y, inside.float() * 2 - 1)
    assert abs(float(inside.float().mean()) - 0.5) < 0.03  # balanced classes
    assert torch.equal(planar_problem("disc", seed=3)[0], planar_problem("disc", seed=3)[0])
    data = PlanarDataModule(problem="disc", num_val=10)
    data.setup("fit")
    (xb, yb) = next(iter(data.train_dataloader()))
    assert xb.shape == (64, 2) and yb.shape == (64,) and data.in_features == 2  # full batch by default
    assert len(data.val_dataset) == 10
    with pytest.raises(ZooError, match="problem"):
        PlanarDataModule(problem="spiral")


def test_non_float_or_non_tensor_inputs_are_one_clear_error() -> None:
    """An integer tensor or a list is refused by the model with the fix (were a dtype RuntimeError from addmm and
    an AttributeError)."""
    net = TwoLayerReLU(in_features=2, width=4)
    with pytest.raises(ZooError, match=r"floating-point tensor.*got a torch.int64 tensor.*torch.as_tensor"):
        net(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ZooError, match=r"floating-point tensor.*got a list"):
        net([[0.0, 1.0]])
    assert repr(net) == "TwoLayerReLU(in_features=2, width=4, signs='fixed', bias=True)"


def test_load_from_checkpoint_of_another_width_is_one_clear_error(tmp_path) -> None:
    """A Lightning checkpoint whose neurons do not fit is refused before loading, naming the mismatched tensors (was
    torch's RuntimeError); a fitting one loads and keeps its weights."""
    torch.manual_seed(0)
    net = TwoLayerReLU(in_features=2, width=6)
    path = tmp_path / "two_layer.ckpt"
    torch.save(
        {
            "state_dict": net.state_dict(),
            "hyper_parameters": dict(net.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    assert torch.equal(TwoLayerReLU.load_from_checkpoint(path).weight, net.weight)
    with pytest.raises(ZooError, match=r"do not fit TwoLayerReLU.*weight \(6, 3\) vs \(4, 3\)"):
        TwoLayerReLU.load_from_checkpoint(path, width=4)


def test_proximal_training_refuses_gradient_accumulation(tmp_path) -> None:
    """Under accumulate_grad_batches=2 Lightning halves the closure's loss (a proximal step on F / 2) and the closure
    re-evaluates only the current batch: one ZooError instead of silently other steps."""
    x, y = planar_problem("sine")
    net = TwoLayerReLU(in_features=1, width=8)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ZooError, match="accumulate_grad_batches=2.*accumulate_grad_batches=1"):
        trainer.fit(net, DataLoader(TensorDataset(x, y), batch_size=len(x)))
