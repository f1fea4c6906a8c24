"""Momentum ResNets (docs/mathematics.md, section 4): torchvision layout and weights, exact reversible backprop
against autograd, initial velocity, save/load, Lightning training and gradient accumulation."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_batchnorm as randomise_bn
from torch.utils.data import DataLoader, TensorDataset

import zoo
from zoo import momentum_resnet152  # the builders are importable from the package
from zoo.errors import ZooError
from zoo.models import MomentumResNet

DEPTHS = (18, 34, 50, 101, 152)
SMALL = {"layers": (3, 3, 3), "widths": (8, 16, 32)}  # residual blocks in every stage (N = 3, 2, 2)


def small(seed: int = 0, **kwargs) -> MomentumResNet:
    torch.manual_seed(seed)
    return zoo.momentum_cifar_resnet(**{**SMALL, **kwargs})


def param_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-4) -> None:
    """Every gradient equal up to float rounding, relative to that tensor's largest entry."""
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        scale = float(g.abs().max()) + 1e-12
        torch.testing.assert_close(got[name], g, rtol=0, atol=rtol * scale, msg=name)


# ------------------------------------------------------------------------------------------------ layout


def test_builder_is_importable_and_a_momentum_resnet():
    assert momentum_resnet152 is zoo.models.resnet.momentum_resnet152
    assert zoo.is_model("momentum_resnet152") and zoo.is_model("momentum_resnet56_cifar")
    with torch.device("meta"):
        m = momentum_resnet152()
    assert isinstance(m, MomentumResNet)
    assert [s.depth for s in m.stages] == [2, 7, 35, 2]  # the shape-changing first blocks are transitions
    for s in m.stages:
        assert (s.rule, s.gamma, s.memory, s.init_velocity, s.scale) == ("momentum", 0.9, "reversible", "zero", 1.0)


@pytest.mark.parametrize("depth", DEPTHS)
def test_parameter_names_and_shapes_are_torchvision(depth):
    with torch.device("meta"):  # no memory, no init cost: only names and shapes matter
        ours = getattr(zoo, f"momentum_resnet{depth}")().state_dict()
        theirs = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    assert list(ours) == list(theirs)  # same keys, same order
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


# ------------------------------------------------------------------------------------------------ weights


@pytest.fixture(scope="module")
def tv_resnet18() -> torchvision.models.ResNet:
    torch.manual_seed(0)
    return randomise_bn(torchvision.models.resnet18(), seed=1).eval()


def test_gamma_zero_with_torchvision_weights_is_torchvision(tv_resnet18, tmp_path):
    torch.save(tv_resnet18.state_dict(), tmp_path / "r18.pth")
    m = zoo.momentum_resnet18(weights=str(tmp_path / "r18.pth"), gamma=0.0, memory="full").eval()
    for k, v in tv_resnet18.state_dict().items():  # gamma = 0, step 1: nothing is rescaled
        assert torch.equal(m.state_dict()[k], v), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv_resnet18(x)
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_gamma_zero_needs_full_memory():
    with pytest.raises(ZooError, match="gamma"):
        zoo.momentum_resnet18(gamma=0.0)  # reversible by default: the inverse divides by gamma


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_torchvision_weight_name_from_the_hub_cache(tv_resnet18, name):
    entry = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tv_resnet18.state_dict(), cache)
    m = zoo.momentum_resnet18(weights=name)  # default gamma 0.9, reversible
    assert m.layer1.memory == "reversible" and m.layer1.gamma == 0.9
    sd = m.state_dict()
    for k, v in tv_resnet18.state_dict().items():
        assert torch.equal(sd[k], v), k


# ------------------------------------------------------------------------------------------------ the published model

STAGES = ("layer1", "layer2", "layer3", "layer4")


def torchvision_source(depth: int) -> torchvision.models.ResNet:
    """torchvision ResNet-``depth``, random weights (no download), random BatchNorm statistics, eval mode."""
    torch.manual_seed(depth)
    return randomise_bn(getattr(torchvision.models, f"resnet{depth}")(), seed=depth).eval()


def published_momentum_forward(
    tv: torchvision.models.ResNet, x: torch.Tensor, gamma: float, v_factor: float | None = None
) -> torch.Tensor:
    """Sander et al.'s Momentum ResNet over torchvision's blocks, written out independently: the first block of
    every stage as it is, then v <- gamma v + (1 - gamma) (block(x) - x), x <- x + v over the others (v_0 = 0).
    ``v_factor`` replaces gamma in ``gamma v`` only (the momentumnet package's fixed-point rounding)."""
    v_factor = gamma if v_factor is None else v_factor
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    for name in STAGES:
        stage = getattr(tv, name)
        x = stage[0](x)
        v = torch.zeros_like(x)
        for block in list(stage)[1:]:
            v = v_factor * v + (1 - gamma) * (block(x) - x)
            x = x + v
    return tv.fc(torch.flatten(tv.avgpool(x), 1))


def relative_difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach() - ref.detach()).norm() / ref.detach().norm())


@pytest.mark.parametrize("depth", DEPTHS)
def test_the_first_block_of_every_stage_is_an_ordinary_block(depth):
    with torch.device("meta"):
        default = getattr(zoo, f"momentum_resnet{depth}")()
        moved = getattr(zoo, f"momentum_resnet{depth}")(keep_first_block=False)
        plain = getattr(zoo, f"resnet{depth}")()
    counts = default.layer_counts
    assert all(s.transition is not None for s in default.stages)
    assert [s.depth for s in default.stages] == [n - 1 for n in counts]
    basic = default.block_type == "basic"  # layer1's first basic block keeps the shape (64 -> 64, stride 1)
    assert moved.layer1.depth == counts[0] - (0 if basic else 1) and (moved.layer1.transition is None) == basic
    assert (plain.layer1.transition is None) == basic  # the other families are unchanged
    assert list(default.state_dict()) == list(moved.state_dict()) == list(plain.state_dict())  # same names


def test_first_block_computes_torchvision_basic_block_exactly():
    tv = torchvision_source(18)
    model = zoo.momentum_resnet18()
    model.load_state_dict(tv.state_dict())
    model.eval()
    x = torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(2))
    first = model.layer1[0]
    assert first is model.layer1.transition and first.residual_step is None  # an ordinary block, not f
    with torch.no_grad():
        assert torch.equal(first(x), tv.layer1[0](x))


@pytest.mark.parametrize("depth", [18, 34])
def test_momentum_resnet_is_the_published_rule_over_torchvision_blocks(depth):
    """Against the rule written out over torchvision's own blocks (no momentumnet needed). Before the first block of
    layer1 was kept, ResNet-18/34 differed by 0.34 relative."""
    tv = torchvision_source(depth)
    model = getattr(zoo, f"momentum_resnet{depth}")(gamma=0.9)  # memory="reversible"
    model.load_state_dict(tv.state_dict())
    model.eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = published_momentum_forward(tv, x, 0.9)
        assert relative_difference(model(x), ref) < 1e-5  # no_grad: the float rule of memory="full"
    # with gradients, memory="reversible" runs the fixed-point forward: the same up to its rounding
    assert relative_difference(model(x.clone().requires_grad_(True)), ref) < 1e-5
    moved = getattr(zoo, f"momentum_resnet{depth}")(gamma=0.9, keep_first_block=False)
    moved.load_state_dict(tv.state_dict())
    with torch.no_grad():
        assert relative_difference(moved.eval()(x), ref) > 1e-2  # the option gives the other model


@pytest.mark.parametrize("depth", DEPTHS)
def test_equals_the_published_momentumnet_package(depth):
    """``momentumnet.transform_to_momentumnet(torchvision_resnet, keep_first_layer=True)`` (the published package,
    the ``bench`` extra) on the same weights, gamma 0.9. The package's residual function for a torchvision block is
    block(x) - x = relu(x + g(x)) - x (``is_residual=False``), the zoo's f; its eval forward is the training rule.

    ``use_backprop=True`` (plain float arithmetic): the same to float rounding (measured at 64x64: 0 in no_grad,
    <= 7e-7 relative with the zoo's fixed-point reversible forward, tested above for ResNet-18/34).
    ``use_backprop=False`` stores v in the package's fixed-point TorchExactRep, whose v *= gamma multiplies by
    58983/65536 = 0.90000916 (its 16-bit rational for 0.9) while the f term keeps 1 - 0.9: that rule, written out,
    is the package to float rounding, and the zoo (exact gamma) differs from it by 7e-6 (ResNet-34) .. 1.2e-4
    (ResNet-152) relative at 64x64, growing with depth."""
    momentumnet = pytest.importorskip("momentumnet")
    tv = torchvision_source(depth)
    model = getattr(zoo, f"momentum_resnet{depth}")(gamma=0.9)
    model.load_state_dict(tv.state_dict())
    model.eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    float_rule = momentumnet.transform_to_momentumnet(tv, gamma=0.9, keep_first_layer=True, use_backprop=True)
    exact_rep = momentumnet.transform_to_momentumnet(tv, gamma=0.9, keep_first_layer=True, use_backprop=False)
    with torch.no_grad():
        out, ref = model(x), float_rule.eval()(x)
        assert relative_difference(out, ref) < 1e-6
        packaged = exact_rep.eval()(x)
        # the package's own rounding of gamma in v (see above), reproduced over torchvision's blocks
        assert relative_difference(published_momentum_forward(tv, x, 0.9, v_factor=58983 / 65536), packaged) < 1e-5
        assert relative_difference(out, packaged) < 3e-4


# ------------------------------------------------------------------------------------------------ reversible backprop


def test_reversible_resnet18_gradients_and_bn_stats_equal_full_backprop():
    torch.manual_seed(0)
    rev = zoo.momentum_resnet18()
    full = zoo.momentum_resnet18(memory="full")
    full.load_state_dict(rev.state_dict())
    assert rev.layer1.memory == "reversible" and rev.layer1.gamma == 0.9
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))
    outs = []
    for m in (rev, full):
        m.train()
        out = m(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach())
    assert torch.isfinite(outs[0]).all()
    # the reversible forward runs in 32-bit fixed point: the same logits up to float rounding
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4 * float(outs[1].abs().max()))
    g_rev, g_full = param_grads(rev), param_grads(full)
    assert len(g_full) == len(list(full.parameters()))
    assert all(torch.isfinite(g).all() for g in g_rev.values())
    assert_grads_close(g_rev, g_full)
    # one forward updates the BatchNorm running statistics once: backward's recomputation leaves them alone
    b_rev, b_full = dict(rev.named_buffers()), dict(full.named_buffers())
    assert b_rev.keys() == b_full.keys()
    for k, v in b_full.items():
        if k.endswith("num_batches_tracked"):
            assert int(b_rev[k]) == int(v) == 1, k
        else:
            torch.testing.assert_close(b_rev[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_float64_reversible_keeps_float64_accuracy_with_more_fixed_point_bits():
    """A float64 Momentum ResNet (Trainer(precision="64-true"), model.double()) under memory="reversible": with
    fixed_point_bits=48 its logits and gradients are full backprop's (autograd in float64) to ~1e-13, where the
    32-bit default rounds every state to 2^-32 (~1e-10 off)."""
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (2,))
    arch = {"layers": (2, 3), "widths": (4, 8)}
    full = randomise_bn(small(memory="full", **arch), seed=1).double().train()
    results = {}
    for bits in (32, 48):
        rev = small(fixed_point_bits=bits, **arch).double().train()
        rev.load_state_dict(full.state_dict())
        assert rev.hparams.fixed_point_bits == bits and {s.fixed_point.frac_bits for s in rev.stages} == {bits}
        results[bits] = rev(x), rev
    out = full(x)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(results[48][0], y).backward()
    scale = float(out.abs().max())
    assert float((results[32][0] - out).abs().max()) > 1e-11 * scale  # the default's 2^-32 grid shows
    torch.testing.assert_close(results[48][0], out, rtol=0, atol=1e-13 * scale)
    assert_grads_close(param_grads(results[48][1]), param_grads(full), rtol=1e-11)
    with pytest.raises(ZooError, match="fixed_point_bits"):
        small(fixed_point_bits=60)


@pytest.mark.parametrize("memory", ["full", "reversible"])
def test_initial_velocity_f_works_and_differs_from_zero(memory):
    zero, f = small(memory=memory), small(memory=memory, init_velocity="f")
    f.load_state_dict(zero.state_dict())
    assert {s.init_velocity for s in f.stages} == {"f"} and {s.init_velocity for s in zero.stages} == {"zero"}
    zero.eval(), f.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = zero(x), f(x)
    assert torch.isfinite(b).all()
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-3)
    f(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in f.parameters() if p.grad is not None)


def test_initial_velocity_f_reversible_gradients_equal_full():
    rev = small(init_velocity="f", drop_path_rate=0.2)  # random stochastic depth is replayed in backward
    full = small(init_velocity="f", drop_path_rate=0.2, memory="full")
    full.load_state_dict(rev.state_dict())
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for m in (rev, full):
        m.train()
        torch.manual_seed(3)
        F.cross_entropy(m(x), y).backward()
    assert_grads_close(param_grads(rev), param_grads(full))


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"gamma": 0.75, "memory": "full", "init_velocity": "f"}, {"gamma": 0.5, "init_velocity": "f"}],
    ids=["default", "full-f", "reversible-f"],
)
@pytest.mark.parametrize("target", ["folder", "m.safetensors"])
def test_save_pretrained_round_trip_keeps_momentum_settings(tmp_path, kwargs, target):
    source = randomise_bn(small(seed=4, **kwargs), seed=4).eval()
    source.save_pretrained(tmp_path / target)
    loaded = zoo.from_pretrained(tmp_path / target)
    assert type(loaded) is MomentumResNet
    expected = {"gamma": 0.9, "memory": "reversible", "init_velocity": "zero", **kwargs}
    for key, value in expected.items():
        assert loaded.hparams[key] == value, key
        assert {getattr(s, key) for s in loaded.stages} == {value}, key
    assert MomentumResNet.from_pretrained(tmp_path / target).hparams["gamma"] == expected["gamma"]
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ Lightning


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _images(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_lightning_fit_two_steps_reversible_changes_the_weights():
    model = small(seed=5, optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), lr_scheduler=None)
    assert model.layer1.memory == "reversible"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, DataLoader(_images(8), batch_size=4))
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    for name in ("conv1.weight", "layer1.1.conv1.weight", "layer3.2.bn2.weight", "fc.weight"):
        assert not torch.equal(after[name], before[name]), name  # stack blocks (reversible) were trained too
    assert int(after["layer1.1.bn1.num_batches_tracked"]) == 2  # one running-stat update per forward


def test_gradient_accumulation_reversible_equals_full():
    """accumulate_grad_batches=2: two micro-batches, one SGD step; BN in training mode sees the same
    micro-batches in both models, so reversible and full must reach the same weights and statistics."""
    data = DataLoader(_images(8, seed=1), batch_size=4, shuffle=False)
    states = {}
    for memory in ("reversible", "full"):
        model = small(
            seed=6, memory=memory, optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), lr_scheduler=None
        )
        start = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = _trainer(max_steps=1, accumulate_grad_batches=2, limit_val_batches=0)
        trainer.fit(model, data)
        assert trainer.global_step == 1
        states[memory] = {k: v.clone() for k, v in model.state_dict().items()}
        assert int(states[memory]["layer1.1.bn1.num_batches_tracked"]) == 2  # both micro-batches ran
        for k in ("conv1.weight", "layer2.1.conv2.weight", "fc.weight"):
            assert not torch.equal(states[memory][k], start[k]), k  # the optimizer step was taken
    for k, v in states["full"].items():
        if v.is_floating_point():
            torch.testing.assert_close(states["reversible"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(states["reversible"][k], v), k


def test_manually_accumulated_gradients_reversible_equals_full():
    """Two backward calls add into .grad: the reversible function's parameter gradients accumulate like
    autograd's, and equal the gradient of the summed loss."""
    rev, full = small(seed=7), small(seed=7, memory="full")
    full.load_state_dict(rev.state_dict())
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    for m in (rev, full):
        m.train()
        for x, y in batches:
            (F.cross_entropy(m(x), y) / 2).backward()
    assert_grads_close(param_grads(rev), param_grads(full))
    # and it is the sum of the two separate gradients (one backward per micro-batch)
    singles = []
    for x, y in batches:
        m = small(seed=7, memory="full")
        m.load_state_dict(full.state_dict())  # same weights (BN stats differ, but train mode ignores them)
        m.train()
        (F.cross_entropy(m(x), y) / 2).backward()
        singles.append(param_grads(m))
    assert_grads_close(param_grads(rev), {k: singles[0][k] + singles[1][k] for k in singles[0]})


def test_stored_blocks_set_by_hand_are_recorded_for_checkpoints(tmp_path):
    """record_stored_blocks keeps hparams.stored_blocks true to the stages (it is left as given while it is), so a
    Lightning checkpoint rebuilds the counts; the rebuilt model keeps full backprop's gradients."""
    torch.manual_seed(0)
    model = zoo.momentum_cifar_resnet(layers=(2, 3, 3), widths=(4, 8, 8), num_classes=3, stored_blocks=1)
    model.record_stored_blocks()
    assert model.hparams.stored_blocks == 1  # unchanged: still what the stages hold
    model.layer2.stored_blocks, model.layer3.stored_blocks = 2, 0
    model.record_stored_blocks()
    assert list(model.hparams.stored_blocks) == [1, 2, 0]
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    trainer.save_checkpoint(tmp_path / "planned.ckpt")

    loaded = MomentumResNet.from_pretrained(tmp_path / "planned.ckpt").train()
    assert [s.stored_blocks for s in loaded.stages] == [1, 2, 0]
    full = zoo.momentum_cifar_resnet(layers=(2, 3, 3), widths=(4, 8, 8), num_classes=3, memory="full").train()
    full.load_state_dict(loaded.state_dict())
    for m in (loaded, full):
        F.cross_entropy(m(x), y).backward()
    for (name, p), q in zip(loaded.named_parameters(), full.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_stored_blocks_set_by_hand_are_saved_without_recording_them(tmp_path):
    """Counts set on the stages by hand reach a Lightning checkpoint (the model's on_save_checkpoint) and
    save_pretrained (sync_hparams) without a call to record_stored_blocks: the reloaded model stores the same."""
    model = zoo.momentum_cifar_resnet(layers=(2, 3, 3), widths=(4, 8, 8), num_classes=3)
    model.layer2.stored_blocks, model.layer3.stored_blocks = 2, 1
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    trainer.save_checkpoint(tmp_path / "by_hand.ckpt")
    model.save_pretrained(tmp_path / "by_hand")
    for loaded in (
        zoo.from_pretrained(tmp_path / "by_hand.ckpt"),
        MomentumResNet.load_from_checkpoint(tmp_path / "by_hand.ckpt"),
        zoo.from_pretrained(tmp_path / "by_hand"),
    ):
        assert [s.stored_blocks for s in loaded.stages] == [0, 2, 1]
