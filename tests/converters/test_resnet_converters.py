"""converters.transform for torchvision and timm ResNets (CPU, random weights, no network)."""

from __future__ import annotations

import copy
import functools
import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from helpers import build_resnet_source

import converters
import zoo
from converters.timm import KEY_RENAMES, rename
from zoo.errors import ZooError
from zoo.models import DepthScaledResNet, HeunNet, ResNet

SOURCES = ["tv_resnet18", "tv_resnet50", "timm_resnet18", "timm_resnet50"]


@pytest.fixture(scope="module")
def sources() -> dict[str, nn.Module]:
    return {name: build_resnet_source(name) for name in SOURCES}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # 64x64 and a batch of 4: at 32x32 the last stage is 1x1, and train-mode BatchNorm over 2 values is
    # so ill-conditioned that float rounding alone changes the output by O(1)
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def assert_close_to_scale(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} for output scale {scale:.3g}"


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches_tracked" in k}


# ------------------------------------------------------------------------------------------------ registry


def test_targets_and_sources_are_listed() -> None:
    assert {"resnet", "depth_scaled", "heun"} <= set(converters.list_targets())
    assert set(converters.list_sources("depth_scaled")) == {"torchvision.models.ResNet", "timm.models.resnet.ResNet"}


# ------------------------------------------------------------------------------------------------ depth_scaled


@pytest.fixture(scope="module")
def reference(sources, images):
    """Outputs of each source, computed once: eval mode, and train mode with the BN buffers after it."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            source = copy.deepcopy(sources[name])
            with torch.no_grad():
                out_eval = source(images)
                out_train = source.train()(images)
            cache[name] = {"eval": out_eval, "train": out_train, "buffers": bn_buffers(source)}
        return cache[name]

    return get


@pytest.mark.parametrize("memory", ["full", "adjoint"])
@pytest.mark.parametrize("name", SOURCES)
def test_depth_scaled_preserves_function(sources, reference, images, name: str, memory: str) -> None:
    ref = reference(name)
    model = converters.transform(sources[name], to="depth_scaled", memory=memory)
    assert type(model) is DepthScaledResNet
    assert not model.training
    assert all(stage.memory == memory for stage in model.stages)
    assert model.hparams.num_classes == 1000 and model.hparams.in_chans == 3

    # eval mode, running statistics (with grad enabled: the adjoint path is the one that runs)
    assert_close_to_scale(model(images), ref["eval"])

    # train mode, batch statistics; the running statistics move identically, because folding
    # touches only the last BN's weight and bias, not its statistics
    model.train()
    assert_close_to_scale(model(images), ref["train"])
    mine = bn_buffers(model)
    assert mine.keys() == ref["buffers"].keys()
    for k, theirs in ref["buffers"].items():
        if theirs.is_floating_point():
            assert_close_to_scale(mine[k], theirs)
        else:
            assert torch.equal(mine[k], theirs) and int(theirs) == 1, k


def test_conversion_reads_the_source_as_step_1_weights_silently() -> None:
    """A converter's source is a plain ResNet by definition: folding 1/N into it is no reason for the warning a
    local file without hyperparameters gets (it might be a depth-scaled model's own state_dict)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converters.transform(torchvision.models.resnet18(), to="depth_scaled")


def test_depth_scaled_folds_last_bn_only(sources) -> None:
    source = sources["tv_resnet50"]
    model = converters.transform(source, to="depth_scaled")
    theirs, mine = source.state_dict(), model.state_dict()
    assert theirs.keys() == mine.keys()
    folded = set()
    for name, stage in zip(model.stage_names, model.stages):
        n, offset = stage.depth, 1 if stage.transition is not None else 0
        for j in range(n):
            for leaf in ("weight", "bias"):
                key = f"{name}.{j + offset}.bn3.{leaf}"
                torch.testing.assert_close(mine[key], theirs[key] * n)
                folded.add(key)
    assert len(folded) == 2 * (16 - 4)  # every residual block but the 4 transitions
    for k in theirs.keys() - folded:
        assert torch.equal(mine[k], theirs[k]), k


# ------------------------------------------------------------------------------------------------ resnet


@pytest.mark.parametrize("name", SOURCES)
def test_resnet_target_is_identical(sources, reference, images, name: str) -> None:
    source = sources[name]
    model = converters.transform(source, to="resnet")
    assert type(model) is ResNet and all(stage.step == 1.0 for stage in model.stages)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(name)["eval"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ heun


@pytest.mark.parametrize("name", ["tv_resnet18", "timm_resnet18"])
def test_heun_from_folded_weights(sources, images, name: str) -> None:
    source = sources[name]
    model = converters.transform(source, to="heun", memory="adjoint")
    assert type(model) is HeunNet and all(stage.rule == "heun" for stage in model.stages)
    folded = model.fold_plain_weights(source.state_dict())
    mine = model.state_dict()
    changed = [k for k in folded if not torch.equal(folded[k], source.state_dict()[k])]
    assert changed and all(".bn2." in k for k in changed)  # basic blocks: the last BN is bn2
    for k, v in folded.items():
        assert torch.equal(mine[k], v), k

    model.train()
    out = model(images)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------------ training


def test_converted_model_trains_one_step() -> None:
    source = build_resnet_source("tv_resnet18", num_classes=10).train()
    model = converters.transform(
        source,
        to="depth_scaled",
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.ConstantLR, factor=1.0),
    )
    assert isinstance(model, pl.LightningModule) and model.training
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    opt = model.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.01
    loss = model.loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert model.loss(model(x), y).item() < loss.item()


def test_converted_model_fits_with_a_lightning_trainer(tmp_path) -> None:
    source = build_resnet_source("timm_resnet18", num_classes=4, in_chans=1).train()
    model = converters.transform(
        source, to="depth_scaled", memory="adjoint", optimizer=functools.partial(torch.optim.SGD, lr=0.01)
    )
    assert model.hparams.in_chans == 1
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(
        torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    )
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == 1
    after = model.state_dict()
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert not torch.equal(after["layer1.1.bn2.weight"], before["layer1.1.bn2.weight"])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ hub


@pytest.mark.parametrize("target", ["depth_scaled", "heun"])
def test_save_pretrained_round_trip(sources, images, tmp_path, target: str) -> None:
    model = converters.transform(sources["timm_resnet18"], to=target, memory="adjoint", label_smoothing=0.05)
    model.save_pretrained(tmp_path / "converted")
    loaded = zoo.from_pretrained(tmp_path / "converted").eval()
    assert type(loaded) is type(model)
    assert loaded.hparams.label_smoothing == 0.05 and all(stage.memory == "adjoint" for stage in loaded.stages)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


# ------------------------------------------------------------------------------------------------ state


def test_mode_device_dtype_and_flags_follow_the_source(images) -> None:
    source = build_resnet_source("tv_resnet18").double().train()
    source.layer2[0].bn1.eval()  # a frozen BN inside a training model
    source.layer1[1].bn2.momentum = 0.01
    source.conv1.weight.requires_grad_(False)
    model = converters.transform(source, to="depth_scaled")
    assert model.training and not model.layer2[0].bn1.training and model.layer2[1].bn1.training
    assert model.layer1[1].bn2.momentum == 0.01
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad
    assert all(p.dtype == torch.float64 for p in model.parameters())
    source.eval()
    model.eval()
    with torch.no_grad():
        assert_close_to_scale(model(images.double()), source(images.double()), rtol=1e-10)
    # weights are copied, not shared
    with torch.no_grad():
        model.fc.weight.zero_()
    assert source.fc.weight.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_source_gives_cuda_model(sources, images) -> None:
    source = copy.deepcopy(sources["tv_resnet50"]).cuda()
    model = converters.transform(source, to="depth_scaled", memory="adjoint")
    assert all(p.is_cuda for p in model.parameters())
    with torch.no_grad():
        assert_close_to_scale(model(images.cuda()), source(images.cuda()), rtol=1e-3)


def test_timm_names_need_no_renaming(sources) -> None:
    assert KEY_RENAMES == {}
    model = converters.transform(sources["timm_resnet50"], to="resnet")
    assert {rename(k) for k in sources["timm_resnet50"].state_dict()} == set(model.state_dict())


def test_timm_regularisation_carries_over() -> None:
    source = timm.create_model("resnet18", drop_rate=0.2, drop_path_rate=0.1)
    model = converters.transform(source, to="depth_scaled")
    assert (
        model.hparams.drop_rate == 0.2 and model.hparams.drop_path_rate == 0.1
    )  # the rate timm was given, not its float32 (0.10000000149...)
    assert model.layer4[1].drop_path == pytest.approx(0.1)
    model = converters.transform(source, to="depth_scaled", drop_path_rate=0.0)
    assert model.hparams.drop_path_rate == 0.0


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_target() -> None:
    with pytest.raises(ZooError, match="unknown conversion target 'momentom'") as err:
        converters.transform(torchvision.models.resnet18(), to="momentom")
    assert all(t in str(err.value) for t in ("'resnet'", "'depth_scaled'", "'heun'"))


def test_unsupported_source_type() -> None:
    with pytest.raises(ZooError, match="torch.nn.modules.linear.Linear") as err:
        converters.transform(nn.Linear(3, 3), to="depth_scaled")
    assert "torchvision.models.ResNet" in str(err.value) and "timm.models.resnet.ResNet" in str(err.value)


def test_channels_last_source_gives_a_channels_last_model() -> None:
    """The converted model keeps the source's memory format (as its device, dtype and mode), and its function."""
    source = torchvision.models.resnet18(num_classes=3).eval().to(memory_format=torch.channels_last)
    converted = converters.transform(source, to="depth_scaled")
    convs = [m.weight for m in converted.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    plain = converters.transform(torchvision.models.resnet18(num_classes=3).eval(), to="depth_scaled")
    assert plain.conv1.weight.is_contiguous()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), source(x), rtol=1e-5, atol=1e-5)


def test_wrapped_sources_name_the_model_inside() -> None:
    """A source inside torch.compile or a data-parallel wrapper, or a zoo model already, is refused with the fix;
    the model inside converts."""
    source = torchvision.models.resnet18(num_classes=3).eval()
    with pytest.raises(ZooError, match=r"torch.compile wrapper: convert the model inside, transform\(model._orig_mod"):
        converters.transform(torch.compile(source), to="depth_scaled")
    with pytest.raises(ZooError, match=r"data-parallel wrapper: .*transform\(model.module"):
        converters.transform(nn.DataParallel(source), to="depth_scaled")
    with pytest.raises(ZooError, match=r"a zoo model already: .*zoo.momentum_resnet50\(weights=path\)"):
        converters.transform(zoo.resnet18(num_classes=3), to="momentum")
    with pytest.raises(ZooError, match=r"a zoo ResNet already, and zoo has no 'sinkhorn' variant of it"):
        converters.transform(zoo.resnet18(num_classes=3), to="sinkhorn")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        converted = converters.transform(nn.DataParallel(source).module, to="depth_scaled")
        torch.testing.assert_close(converted(x), source(x), rtol=1e-5, atol=1e-5)


def test_unknown_option() -> None:
    with pytest.raises(ZooError, match="unknown option 'tied'") as err:
        converters.transform(torchvision.models.resnet18(), to="depth_scaled", tied=True)
    assert "memory" in str(err.value) and "lr_scheduler" in str(err.value) and "optimizer" in str(err.value)
    with pytest.raises(ZooError, match="unknown option 'lr'"):  # training settings come as an optimizer callable
        converters.transform(torchvision.models.resnet18(), to="depth_scaled", lr=0.1)
    with pytest.raises(ZooError, match="'layers'"):
        converters.transform(torchvision.models.resnet18(), to="resnet", layers=(1, 1, 1, 1))


def test_bad_option_value_is_a_zoo_error() -> None:
    with pytest.raises(ZooError, match="memory"):
        converters.transform(torchvision.models.resnet18(), to="depth_scaled", memory="everything")


def custom_head(model: nn.Module) -> nn.Module:
    model.fc = nn.Sequential(nn.Dropout(0.5), nn.Linear(512, 3))
    return model


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (torchvision.models.resnext50_32x4d, "ResNeXt (groups=32, width_per_group=4)"),
        (
            lambda: torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], width_per_group=128),
            "wide ResNet (width_per_group=128)",
        ),
        (
            lambda: torchvision.models.ResNet(
                torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], replace_stride_with_dilation=[False, False, True]
            ),
            "dilation",
        ),
        (lambda: timm.create_model("resnet18d"), "deep stem"),
        (lambda: timm.create_model("seresnet18"), "SE/attention"),
        (lambda: timm.create_model("resnet18", aa_layer=nn.AvgPool2d), "anti-aliasing"),
        (lambda: timm.create_model("resnet18", avg_down=True), "average-pool or 3x3 downsampling"),
        (lambda: timm.create_model("resnet18", act_layer="silu"), "the stem activation act1 = SiLU"),
        (lambda: custom_head(timm.create_model("resnet18")), "the classifier fc is Sequential(Dropout, Linear)"),
        (lambda: custom_head(torchvision.models.resnet18()), "the classifier fc is Sequential(Dropout, Linear)"),
        (lambda: timm.create_model("resnet18", global_pool="", num_classes=3), "global_pool='' (no pooling"),
    ],
)
def test_unsupported_variants(build, expected: str) -> None:
    with pytest.raises(ZooError) as err:
        converters.transform(build(), to="depth_scaled")
    assert expected in str(err.value)


def test_timm_resnext_is_rejected() -> None:
    source = timm.create_model("resnet18")
    source.layer1[0].conv2 = nn.Conv2d(64, 64, 3, padding=1, groups=2, bias=False)
    with pytest.raises(ZooError, match=r"grouped convolutions in layer1.0 \(cardinality=2, a ResNeXt\)"):
        converters.transform(source, to="heun")


def test_modified_layers_are_caught_by_the_layout_check() -> None:
    source = torchvision.models.resnet18()
    source.layer3[1].conv1 = nn.Conv2d(256, 256, 3, padding=2, dilation=2, bias=False)
    with pytest.raises(ZooError, match=r"layer3.1.conv1 padding=\(2, 2\) \(zoo: \(1, 1\)\), dilation"):
        converters.transform(source, to="depth_scaled")
    source = torchvision.models.resnet18()
    source.fc = nn.Sequential(nn.Dropout(0.5), nn.Linear(512, 10))
    with pytest.raises(ZooError, match="the classifier fc is Sequential\\(Dropout, Linear\\)"):
        converters.transform(source, to="depth_scaled")
    source = torchvision.models.resnet18()
    source.fc = nn.Linear(512, 10, bias=False)  # a layout difference, named before any weight is read
    with pytest.raises(ZooError, match=r"standard ResNet layout .*fc has no bias \(zoo: one\)"):
        converters.transform(source, to="depth_scaled")


def test_subclass_overriding_forward_is_rejected() -> None:
    class Features(torchvision.models.ResNet):
        def forward(self, x):
            return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    source = Features(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])
    with pytest.raises(ZooError, match="overrides forward"):
        converters.transform(source, to="resnet")
