"""What converted models keep of the source's timm protocol: heads without a classifier and the other head poolings
(compared with the source's outputs and gradients, through depth scaling's folded weights), the source's data config
(``timm.data.resolve_data_config``), and a momentum ViT's per-block outputs (CPU, random weights, no network)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
from helpers import build_resnet_source
from timm.data import resolve_data_config

import converters
import zoo


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def assert_close_to_scale(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    assert out.shape == ref.shape
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} for output scale {scale:.3g}"


def without_classifier(name: str) -> nn.Module:
    lib, arch = name.split(":")
    if name == "timm:reset_classifier":
        model = build_resnet_source("timm_resnet26")
        model.reset_classifier(0, "max")
        return model
    model = build_resnet_source(f"{lib}_{arch}")
    model.fc = nn.Identity()  # torchvision's idiom for a feature extractor
    return model


@pytest.mark.parametrize(
    ("build", "num_features"),
    [
        (lambda: build_resnet_source("timm_resnet18", num_classes=0), 512),
        (lambda: build_resnet_source("timm_resnet18", num_classes=0, global_pool="catavgmax"), 1024),
        (lambda: build_resnet_source("timm_resnet18", num_classes=0, global_pool=""), 512),
        (lambda: build_resnet_source("timm_resnet18", num_classes=5, global_pool="avgmax"), 5),
        (lambda: build_resnet_source("timm_resnet18", num_classes=5, global_pool="fastmax"), 5),
        (lambda: without_classifier("timm:reset_classifier"), 2048),
        (lambda: without_classifier("tv:resnet18"), 512),
    ],
    ids=["num_classes=0", "catavgmax", "unpooled", "avgmax", "fastmax", "reset_classifier(0,max)", "tv-fc-identity"],
)
@pytest.mark.parametrize("to", ["resnet", "depth_scaled"])
def test_heads_convert_to_the_same_function(images, build, num_features: int, to: str) -> None:
    source = build()
    model = converters.transform(source, to=to)
    with torch.no_grad():
        ref = source(images)
        out = model(images)
    assert out.shape[1] == num_features
    assert model.num_classes == getattr(source, "num_classes", 0 if isinstance(source.fc, nn.Identity) else None)
    assert_close_to_scale(out, ref)
    # train mode: batch statistics, and the gradients of every weight
    source.train()
    model.train()
    out, ref = model(images), source(images)
    assert_close_to_scale(out, ref, rtol=1e-4)  # the folded N, rounded, through batch statistics
    out.square().mean().backward()
    ref.square().mean().backward()
    assert_gradients_match_the_source(model, source, depth_scaled=to == "depth_scaled")


def folded_depths(source: nn.Module) -> dict[str, int]:
    """{residual block name: N} for the blocks whose last BatchNorm depth scaling folds by N, from the source's
    structure alone: in each stage (``layer1`` ... ``layer4``) the block with a ``downsample`` stays an ordinary
    block (the stage's transition) and N counts the others."""
    depths = {}
    for stage_name, stage in source.named_children():
        if not stage_name.startswith("layer"):
            continue
        blocks = [(f"{stage_name}.{i}", b) for i, b in enumerate(stage) if getattr(b, "downsample", None) is None]
        depths.update({name: len(blocks) for name, _ in blocks})
    return depths


def assert_gradients_match_the_source(
    model: nn.Module, source: nn.Module, depth_scaled: bool, rtol: float = 1e-4
) -> None:
    """Every parameter's gradient is the source's, except that depth scaling multiplies the last BatchNorm of a
    block by N (w' = N w, the same function): there dL/dw' = dL/dw / N and w' = N w are checked instead."""
    depths = folded_depths(source) if depth_scaled else {}
    mine = dict(model.named_parameters())
    folded = 0
    for name, p in source.named_parameters():
        block, _, leaf = name.rpartition(".")
        block, _, norm = block.rpartition(".")
        last_norm = "bn3" if hasattr(source.get_submodule(block), "bn3") else "bn2"
        n = depths.get(block, 1) if norm == last_norm and leaf in ("weight", "bias") else 1
        folded += n > 1
        torch.testing.assert_close(mine[name].detach(), n * p.detach(), rtol=1e-6, atol=0)
        assert_close_to_scale(n * mine[name].grad, p.grad, rtol=rtol)
    if depth_scaled:
        # every block outside a transition has its last norm's weight and bias folded
        assert folded == 2 * sum(n > 1 for n in depths.values())


@pytest.mark.parametrize("name", ["tv_resnet34", "timm_resnet50"])
def test_depth_scaled_gradients_are_the_sources_through_the_fold(name: str) -> None:
    # stages of 3-6 blocks, so N = 2 ... 5 (the heads test's ResNet-18/26 have one block past each transition)
    # running statistics (the heads test above covers batch statistics), so that no batch variance over few values
    # amplifies the rounding of the fold
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    source = build_resnet_source(name).eval()
    model = converters.transform(source, to="depth_scaled").eval()
    out, ref = model(images), source(images)
    assert_close_to_scale(out, ref, rtol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    assert max(folded_depths(source).values()) == 5
    assert_gradients_match_the_source(model, source, depth_scaled=True, rtol=1e-5)


def test_feature_extractor_saves_and_loads(images, tmp_path) -> None:
    source = build_resnet_source("timm_resnet18", num_classes=0, global_pool="")
    model = converters.transform(source, to="depth_scaled").eval()
    model.save_pretrained(tmp_path / "features")
    loaded = zoo.from_pretrained(tmp_path / "features").eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
        assert_close_to_scale(loaded(images), source(images))


def data_config(model: nn.Module) -> dict:
    return resolve_data_config({}, model=model)


def test_resnet_takes_the_sources_data_config(tmp_path) -> None:
    # a timm tag with its own evaluation transform (bicubic, crop 0.95, test size 288); no weights are read
    source = timm.create_model("resnet18.a1_in1k", pretrained=False).eval()
    expected = data_config(source)
    assert expected["interpolation"] == "bicubic" and expected["crop_pct"] == 0.95
    for to in ("resnet", "depth_scaled", "heun", "momentum"):
        model = converters.transform(source, to=to)
        assert data_config(model) == expected, to
        assert model.pretrained_cfg["test_input_size"] == source.pretrained_cfg["test_input_size"]
        assert model.pretrained_cfg["num_classes"] == 1000 and model.pretrained_cfg["pool_size"] == (7, 7)
    model.save_pretrained(tmp_path / "m")
    assert data_config(zoo.from_pretrained(tmp_path / "m")) == expected
    # a source without a pretrained_cfg (torchvision) keeps the zoo's own
    plain = converters.transform(build_resnet_source("tv_resnet18"), to="resnet")
    assert data_config(plain) == data_config(zoo.models.ResNet(layers=(2, 2, 2, 2)))


@pytest.mark.parametrize("to", ["sinkhorn", "moe"])
def test_vit_takes_the_sources_data_config(to: str) -> None:
    # crop 1.0 and other mean / std than the zoo ViT's defaults
    source = timm.create_model(
        "vit_tiny_patch16_384.augreg_in21k_ft_in1k",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=3,
    ).eval()
    source.pretrained_cfg = {**source.pretrained_cfg, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    model = converters.transform(source, to=to)
    assert type(model) is not type(source)  # the zoo family
    expected = {**data_config(source), "input_size": (3, 32, 32)}  # the zoo ViT states the size it takes
    assert data_config(model) == expected


def test_momentum_vit_gives_the_sources_per_block_outputs() -> None:
    # at gamma = 0 the momentum state after block n is the source's x_n, so timm's per-block protocol carries over
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3
    ).eval()
    model = converters.transform(source, to="momentum", gamma=0.0, memory="full").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in (model, copy.deepcopy(model)):
            mine = m.forward_intermediates(x, indices=1, intermediates_only=True)
            ref = source.forward_intermediates(x, indices=1, intermediates_only=True)
            assert len(mine) == len(ref) == 1 and mine[0].shape == (2, 48, 4, 4)
            assert_close_to_scale(mine[0], ref[0])
            final, every = m.forward_intermediates(x, norm=True)
            final_ref, every_ref = source.forward_intermediates(x, norm=True)
            assert_close_to_scale(final, final_ref)
            for got, want in zip(every, every_ref, strict=True):
                assert_close_to_scale(got, want)
        assert_close_to_scale(model.forward_head(model.forward_features(x)), source(x))
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers(indices=1) == source.prune_intermediate_layers(indices=1) == [2]
        assert_close_to_scale(pruned.forward_features(x), source.forward_features(x))
