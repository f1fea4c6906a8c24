"""The ResNet families: layout, rules per stage, depth operations, Lightning training."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from helpers import randomize_batchnorm as randomise_bn

import zoo
from zoo.errors import ZooError
from zoo.models import DepthScaledResNet, HeunNet, ResNet


def test_stage_layout_transition_only_where_the_shape_changes():
    m18 = zoo.depth_scaled_resnet18()
    assert m18.layer1.transition is None and m18.layer1.depth == 2  # 64 -> 64, stride 1
    assert all(s.transition is not None and s.depth == 1 for s in m18.stages[1:])
    m50 = zoo.depth_scaled_resnet50()
    assert [s.depth for s in m50.stages] == [2, 3, 5, 2]
    assert m50.layer3.step == pytest.approx(1 / 5)
    assert all(s.rule == "euler" and s.scale == "depth" for s in m50.stages)
    assert all(s.rule == "heun" for s in zoo.heun_resnet34().stages)
    assert all(s.scale == 1.0 for s in zoo.resnet34().stages)


def test_plain_resnet_is_torchvision_exactly():
    tv = torchvision.models.resnet34().eval()
    randomise_bn(tv)
    m = zoo.resnet34()
    m.load_state_dict(tv.state_dict())
    m.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), tv(x), rtol=0, atol=0)


@pytest.mark.parametrize("builder", [zoo.depth_scaled_resnet50, zoo.heun_resnet50])
def test_torchvision_weights_fold_the_depth_factor(builder, tmp_path):
    tv = torchvision.models.resnet50().eval()
    randomise_bn(tv)
    torch.save(tv.state_dict(), tmp_path / "r50.pth")
    with pytest.warns(UserWarning, match="read them as step-1 weights"):  # a plain .pth: it says how it read it
        m = builder(weights=str(tmp_path / "r50.pth")).eval()
    sd_tv, sd = tv.state_dict(), m.state_dict()
    # layer3 has a transition then 5 residual blocks: N = 5 multiplies their last BN, nothing else
    torch.testing.assert_close(sd["layer3.2.bn3.weight"], 5 * sd_tv["layer3.2.bn3.weight"])
    torch.testing.assert_close(sd["layer3.0.bn3.weight"], sd_tv["layer3.0.bn3.weight"])
    torch.testing.assert_close(sd["layer3.2.bn2.weight"], sd_tv["layer3.2.bn2.weight"])
    x = torch.randn(2, 3, 64, 64)
    if builder is zoo.depth_scaled_resnet50:
        with torch.no_grad():
            ref = tv(x)
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_depth_scaled_block_computes_post_activation_step():
    """Inside a stack with step h a torchvision-layout block computes relu(x + h g(x))."""
    m = zoo.depth_scaled_resnet50().eval()
    randomise_bn(m)
    block, h = m.layer3.blocks[1], m.layer3.step
    x = torch.rand(2, 1024, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(x + h * block(x), torch.relu(x + h * block.branch(x)))


def test_tiny_net_matches_the_published_description():
    m = zoo.depth_scaled_tiny(depth=12)
    assert m.conv1.kernel_size == (5, 5) and m.conv1.out_channels == 16
    assert m.layer1.depth == 12 and m.layer1.transition is None and m.layer1.step == pytest.approx(1 / 12)
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in m.layer1.blocks)  # last BN at zero
    x = torch.randn(2, 3, 32, 32)
    assert m.forward_features(x).shape == (2, 16, 10, 10)
    m.eval()
    with torch.no_grad():  # f = 0 at initialisation: the stack is the identity
        feats = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        torch.testing.assert_close(m.layer1(feats), feats)


def test_tied_cifar_resnet_and_depth_operations():
    m = zoo.depth_scaled_cifar_resnet(layers=(4, 4, 4), tied=True)
    assert all(s.is_tied() for s in m.stages)
    n_tied = sum(p.numel() for p in m.parameters())
    assert n_tied < sum(p.numel() for p in zoo.depth_scaled_cifar_resnet(layers=(4, 4, 4)).parameters())
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = m(x)
    m.deepen_stage(2, 9)
    assert m.layer2.depth == 8 and m.layer2.is_tied() and m.hparams["layers"] == [4, 9, 4]
    for s in (1, 2, 3):
        m.untie_stage(s)
    assert not m.hparams["tied"] and not any(s.is_tied() for s in m.stages)
    with torch.no_grad():
        after = m(x)
    assert after.shape == before.shape and torch.isfinite(after).all()
    rebuilt = DepthScaledResNet(**{k: v for k, v in m.hparams.items()})
    rebuilt.load_state_dict(m.state_dict())  # the hparams describe the deepened model
    assert set(m.smoothness()) == {"layer1", "layer2", "layer3"}
    with pytest.raises(ZooError, match="no stage"):
        m.deepen_stage(7, 3)


def test_adjoint_model_gradients_approach_backprop_with_depth():
    errors = []
    for depth in (4, 32):
        torch.manual_seed(0)
        full = zoo.depth_scaled_tiny(depth=depth, num_classes=3, zero_init_last=False)
        adj = zoo.depth_scaled_tiny(depth=depth, num_classes=3, zero_init_last=False, memory="adjoint")
        adj.load_state_dict(full.state_dict())
        x = torch.randn(4, 3, 12, 12)
        g = []
        for m in (full, adj):
            m(x).logsumexp(-1).sum().backward()
            g.append(torch.cat([p.grad.flatten() for p in m.layer1.parameters()]))
        errors.append(float((g[1] - g[0]).norm() / g[0].norm()))
    assert errors[1] < errors[0] / 2, errors


def test_lightning_fit_lowers_the_loss():
    from zoo.data import DigitsDataModule

    pl.seed_everything(0)
    dm = DigitsDataModule(image_size=16, batch_size=32, augment=False)
    model = zoo.heun_cifar_resnet(
        layers=(1, 1, 1),
        memory="adjoint",
        lr_scheduler=None,  # constant rate
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0),
    )
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=15,
        limit_val_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(model, dm, verbose=False)
    before = float(trainer.callback_metrics["val_loss"])
    trainer.fit(model, dm)
    after = float(trainer.callback_metrics["val_loss"])
    assert after < before * 0.8, (before, after)
    assert model.hparams.memory == "adjoint" and model.hparams.rule == "heun"
    assert "weights" not in model.hparams


def test_optimizer_groups_and_schedulers():
    """Training settings are injected (issue 14): the family's default SGD recipe, decay on weights only, a cosine
    schedule over the run; none of them is an architecture argument or a hyperparameter of the checkpoint."""
    m = zoo.depth_scaled_resnet20_cifar()
    assert ResNet.default_optimizer.func is torch.optim.SGD
    assert ResNet.default_optimizer.keywords == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    config = m.configure_optimizers(total_steps=10)
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD) and [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert all(g["lr"] == 0.1 and g["momentum"] == 0.9 for g in opt.param_groups)
    assert isinstance(sched, zoo.tasks.optim.WarmupCosineLR)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(m.conv1.weight) in decayed and id(m.bn1.weight) not in decayed and id(m.fc.bias) not in decayed
    assert len(decayed) + len(opt.param_groups[1]["params"]) == len(list(m.parameters()))
    own = zoo.depth_scaled_resnet20_cifar(optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))
    opt = own.configure_optimizers(total_steps=10)["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert not {"optimizer", "lr_scheduler", "lr", "weight_decay"} & set(own.hparams)
    with pytest.raises(ZooError, match="optimizer must be a callable"):
        zoo.depth_scaled_resnet20_cifar(optimizer="lbfgs")
    for old in ({"lr": 0.1}, {"weight_decay": 1e-3}, {"scheduler": "cosine"}, {"momentum": 0.9}):
        with pytest.raises(ZooError, match=f"{next(iter(old))}.*optimizer=functools.partial"):
            zoo.depth_scaled_resnet20_cifar(**old)
    with pytest.raises(ZooError, match=r"unknown argument 'widht' \(did you mean 'widths'\?\).*, lr_scheduler"):
        zoo.depth_scaled_resnet20_cifar(widht=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rule": "midpoint"}, "rule must be one of 'euler', 'heun', 'momentum', got 'midpoint'"),
        ({"memory": "offload"}, "memory must be one of 'full', 'adjoint', 'reversible', got 'offload'"),
        ({"block": "wide"}, "block must be one of 'basic', 'bottleneck', 'preact', got 'wide'"),
        ({"stem": "deep"}, "stem must be one of 'imagenet', 'cifar', 'tiny', got 'deep'"),
        ({"layers": (2, 0)}, "layers must be"),
        ({"layers": (2, 2), "widths": (8,)}, "widths must be a list of 2 integers >= 1, got \\(8,\\)"),
    ],
)
def test_bad_model_arguments(kwargs, message):
    with pytest.raises(ZooError, match=message):
        ResNet(**kwargs)


def test_family_classes():
    assert isinstance(zoo.create_model("heun_resnet18"), HeunNet)
    assert isinstance(zoo.create_model("depth_scaled_tiny", depth=3), DepthScaledResNet)
    assert isinstance(zoo.depth_scaled_resnet18(), pl.LightningModule)


# ------------------------------------------------------------------------------------------------ builder defaults

PREFIXES = ["", "depth_scaled_", "heun_", "momentum_"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_cifar_and_tiny_builders_take_block_and_stem(prefix: str) -> None:
    """The CIFAR and tiny builders' block, stem, layers and widths are defaults, not fixed arguments (block= gave
    "got multiple values for keyword argument 'block'")."""
    x = torch.randn(1, 3, 16, 16)
    cifar = zoo.create_model(f"{prefix}cifar_resnet", block="bottleneck", layers=(1, 2, 1), widths=(4, 4, 8)).eval()
    assert cifar.block_type == "bottleneck" and cifar.hparams.stem == "cifar" and cifar.num_features == 32
    assert type(cifar.layer2[1]).__name__ == "Bottleneck" and cifar.conv1.kernel_size == (3, 3)
    r20 = zoo.create_model(f"{prefix}resnet20_cifar", block="bottleneck", stem="imagenet").eval()
    assert r20.block_type == "bottleneck" and r20.conv1.kernel_size == (7, 7)
    assert r20.layer_counts == (3, 3, 3) and r20.num_features == 256
    tiny = zoo.create_model(f"{prefix}tiny", block="basic", stem="cifar", layers=(2, 2), widths=(4, 8)).eval()
    assert tiny.block_type == "basic" and tiny.conv1.kernel_size == (3, 3) and tiny.layer_counts == (2, 2)
    assert tiny.hparams.zero_init_last is True and tiny.fc.out_features == 10  # the other defaults stay
    deep = zoo.create_model(f"{prefix}tiny", depth=3, stem="imagenet")
    assert deep.block_type == "preact" and deep.layer_counts == (3,) and deep.conv1.kernel_size == (7, 7)
    with torch.no_grad():
        for model in (cifar, r20, tiny, deep.eval()):
            out = model(x)
            assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_builders_say_what_they_fix(prefix: str) -> None:
    with pytest.raises(
        ZooError,
        match=r"the ResNet-18 builders fix layers=\[2, 2, 2, 2\] and block='basic'.*"
        r"got layers=\(1, 1\)",
    ):
        zoo.create_model(f"{prefix}resnet18", layers=(1, 1))
    with pytest.raises(ZooError, match=r"block='bottleneck'.*got block='basic'"):
        zoo.create_model(f"{prefix}resnet50", block="basic")
    with pytest.raises(ZooError, match=r"give depth or layers, not both"):
        zoo.create_model(f"{prefix}tiny", depth=3, layers=(3,))


def _saved_tensors(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The loss of one training forward, and how many tensors autograd saved for backward outside checkpoints."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).logsumexp(-1).sum()
    return loss, count


@pytest.mark.parametrize(
    "name, memory",
    [
        ("depth_scaled_cifar_resnet", "full"),
        ("heun_cifar_resnet", "full"),
        ("momentum_cifar_resnet", "full"),
        ("heun_cifar_resnet", "adjoint"),
        ("momentum_cifar_resnet", "reversible"),
    ],
)
def test_grad_checkpointing(name: str, memory: str) -> None:
    """set_grad_checkpointing (timm's): under memory='full' every step is recomputed in backward, so autograd
    keeps fewer tensors, while outputs, gradients (with stochastic depth: the random state is replayed) and the
    BatchNorm running statistics (updated once) are those without it; adjoint / reversible stacks store no
    per-step activations already, so it changes nothing there."""
    kwargs = {"layers": (3, 3, 3), "widths": (4, 8, 8), "memory": memory, "drop_path_rate": 0.2}
    if name.startswith("momentum_"):
        kwargs["init_velocity"] = "f"
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = zoo.create_model(name, **kwargs).train()
        randomise_bn(model)
        model.set_grad_checkpointing(checkpointing)
        assert all(s.grad_checkpointing is checkpointing for s in model.stages)
        torch.manual_seed(1)
        loss, saved = _saved_tensors(model, x)
        loss.backward()
        runs.append((loss.detach(), saved, {n: p.grad for n, p in model.named_parameters()}, model.state_dict()))
    (loss0, saved0, grads0, state0), (loss1, saved1, grads1, state1) = runs
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for n, g in grads0.items():
        torch.testing.assert_close(grads1[n], g, rtol=1e-5, atol=1e-7, msg=n)
    for k, v in state0.items():  # running means / variances and num_batches_tracked: one update per forward
        torch.testing.assert_close(state1[k], v, rtol=1e-6, atol=0, msg=k)
    assert int(state1["layer2.0.bn1.num_batches_tracked"]) == 1  # a transition block: one call per forward
    if memory == "full":
        assert saved1 < saved0 / 2, (saved0, saved1)
    else:
        assert saved1 == saved0
    with pytest.raises(ZooError, match="enable"):
        model.set_grad_checkpointing("yes")


@pytest.mark.parametrize(
    "kwargs",
    [{"tied": [2, 3], "widths": (4, 8, 8)}, {"memory": "reversible", "stored_blocks": (1, 1, 2)}],
    ids=["tied-widths", "stored-blocks"],
)
def test_pruned_resnet_round_trips_through_save_pretrained(kwargs, tmp_path):
    """After prune_intermediate_layers the hparams name the stages kept (layers and the per-stage arguments cut to
    them), so save_pretrained rebuilds the pruned model with the same outputs."""
    builder = zoo.momentum_cifar_resnet if "memory" in kwargs else zoo.depth_scaled_cifar_resnet
    m = randomise_bn(builder(layers=(2, 3, 2), **kwargs)).eval()
    assert m.prune_intermediate_layers([1, 2]) == [1, 2]
    m.save_pretrained(tmp_path / "pruned")
    loaded = zoo.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.hparams["layers"] == [2, 3] and loaded.num_features == m.num_features
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def _rescale_warnings(record: list) -> list[str]:
    return [str(w.message) for w in record if "record no hyperparameters" in str(w.message)]


@pytest.mark.parametrize("builder", [zoo.depth_scaled_resnet20_cifar, zoo.heun_resnet20_cifar])
def test_plain_pth_of_a_scaled_model_warns_that_it_was_rescaled(builder, tmp_path):
    """A .pth records no hyperparameters: it is read as step-1 weights and rescaled by 1/h, as documented, with a
    warning saying so and how to load a model's own state_dict unchanged."""
    m = randomise_bn(builder(num_classes=10)).eval()
    torch.save(m.state_dict(), tmp_path / "own.pth")
    with pytest.warns(UserWarning, match=r"step-1 weights .* by 1/h .*model.load_state_dict\(torch.load\(path\)\)"):
        builder(num_classes=10, weights=str(tmp_path / "own.pth"))
    other = builder(num_classes=10)
    with pytest.warns(UserWarning, match="save_pretrained"):
        zoo.load_weights(other, tmp_path / "own.pth")
    # the way the warning points to: the model's own function, silently
    same = builder(num_classes=10)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        same.load_state_dict(torch.load(tmp_path / "own.pth"))
        m.save_pretrained(tmp_path / "folder")
        loaded = builder(weights=str(tmp_path / "folder")).eval()
        zoo.from_pretrained(tmp_path / "folder")
    assert _rescale_warnings(record) == []
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x), m(x))
        torch.testing.assert_close(loaded(x), m(x))


def test_no_rescale_warning_where_nothing_is_rescaled_or_the_source_is_published(tmp_path):
    """Silent where folding is what was asked (a torchvision weight name: a plain ResNet by definition) or where the
    weights keep their values (step-1 models)."""
    tv = randomise_bn(torchvision.models.resnet18()).eval()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)  # the tmp torch hub (conftest)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tv.state_dict(), cache)
    torch.save(zoo.resnet20_cifar().state_dict(), tmp_path / "plain.pth")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        folded = zoo.depth_scaled_resnet18(weights="IMAGENET1K_V1", widths=None).eval()
        zoo.depth_scaled_resnet18(pretrained=True)
        zoo.resnet20_cifar(weights=str(tmp_path / "plain.pth"))
        zoo.momentum_resnet20_cifar(weights=str(tmp_path / "plain.pth"))
        # torchvision's downloaded file named by its path: torchvision's weights (its name says so), folded silently
        from_file = zoo.depth_scaled_resnet18(weights=str(cache)).eval()
    assert _rescale_warnings(record) == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), tv(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_file(x), folded(x), rtol=0, atol=0)
    # the same tensors under another name may be a depth-scaled model's own state_dict: the warning stays
    os.replace(cache, tmp_path / "mine.pth")
    with pytest.warns(UserWarning, match="record no hyperparameters"):
        zoo.depth_scaled_resnet18(weights=str(tmp_path / "mine.pth"))
