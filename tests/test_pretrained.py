"""Pretrained configurations as data (issue 14, point 2): zoo.pretrained and the ResNet families' default_cfgs.

Every tag resolves and builds; every source exists in its library's own table (torchvision's weights enums, timm's
pretrained cfgs), with the accuracy, transforms and classes that library publishes (compared with the library,
not with the zoo's table); timm's transform built from a zoo model is torchvision's own ``weights.transforms()``
on a PIL image; ``create_model("arch.tag", pretrained=True)`` loads weights from the torch hub / Hugging Face caches
that the tests fill themselves, and computes the function its ``conversion`` sentence states (checked against that
formula evaluated with torchvision's blocks); ``weights=`` resolves through the same table; ``list_pretrained``
filters as timm's ``list_pretrained``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_batchnorm, seed_hf_hub_cache
from PIL import Image
from timm.data import create_transform, resolve_data_config

import zoo
from zoo.pretrained import PretrainedCfg, pretrained_cfgs_of, register_pretrained_cfgs, resolve_pretrained_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("", "depth_scaled_", "heun_", "momentum_")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
RESNET_TAGS = [n for n in zoo.list_pretrained() if n.partition(".")[0] in {f"{p}{a}" for p in FAMILIES for a in ARCHS}]
TIMM_SKIPPED = {"tv_in1k", "tv2_in1k", "bamboo"}  # timm's copies of torchvision's weights; bamboo: no classifier


def source_of(name: str) -> tuple[str, str]:
    """(family prefix, torchvision arch) of a ResNet family name ("momentum_resnet50" -> ("momentum_", ...))."""
    arch = name.partition(".")[0]
    prefix = next(p for p in ("depth_scaled_", "heun_", "momentum_", "") if arch.startswith(p))
    return prefix, arch[len(prefix) :]


# ------------------------------------------------------------------------------------------------ the table


def test_every_tag_resolves() -> None:
    names = zoo.list_pretrained()
    assert len(names) == len(set(names)) and len(RESNET_TAGS) == 230
    for name in names:
        arch, _, tag = name.partition(".")
        cfg = zoo.get_pretrained_cfg(name)
        assert isinstance(cfg, PretrainedCfg) and (cfg.architecture, cfg.tag, cfg.name) == (arch, tag, name)
        assert zoo.is_model(arch) and zoo.is_model(name)
        assert cfg.has_weights == (cfg.source is not None)
        assert PretrainedCfg(**cfg.to_dict(remove_null=False)) == cfg  # to_dict is the whole entry
        assert zoo.get_pretrained_cfg(name) is not zoo.get_pretrained_cfg(name)  # copies: the table stays intact
    for arch in {n.partition(".")[0] for n in names}:
        assert zoo.get_pretrained_cfg(arch) == pretrained_cfgs_of(arch)[0]  # the first registered
    # the default tag is the first registered (timm's rule): torchvision's DEFAULT weights for the ResNets
    assert zoo.get_pretrained_cfg("resnet50").tag == "tv2_in1k" and zoo.get_pretrained_cfg("resnet18").tag == "tv_in1k"
    assert zoo.get_pretrained_cfg("momentum_resnet152").tag == "tv2_in1k"
    assert zoo.get_pretrained_cfg("resnet20_cifar") is None  # an architecture without weights


def test_each_family_has_one_tag_per_source_weight() -> None:
    """torchvision's ResNet weights (V1 -> tv_in1k, V2 -> tv2_in1k) and timm's Hub weights of the same layout, for
    every family; the momentum family also at gamma 0 (``<tag>_gamma0``)."""
    for arch in ARCHS:
        tv = {"IMAGENET1K_V1": "tv_in1k", "IMAGENET1K_V2": "tv2_in1k"}
        tv_tags = {tv[w.name] for w in torchvision.models.get_model_weights(arch)}
        timm_tags = {n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")} - TIMM_SKIPPED
        sources = tv_tags | timm_tags
        for prefix in FAMILIES:
            tags = {n.partition(".")[2] for n in zoo.list_pretrained(f"{prefix}{arch}")}
            expected = sources | ({f"{t}_gamma0" for t in sources} if prefix == "momentum_" else set())
            assert tags == expected, (prefix, arch, tags ^ expected)


@pytest.mark.parametrize("name", RESNET_TAGS)
def test_source_exists_in_its_library(name: str) -> None:
    """Every source is in its library's own table, with the same transform keys, classes, license and (torchvision)
    the published accuracy."""
    cfg = zoo.get_pretrained_cfg(name)
    _, arch = source_of(name)
    assert cfg.num_classes == 1000 and (cfg.first_conv, cfg.classifier) == ("conv1", "fc")
    if cfg.source.startswith("hf-hub:"):
        reference = timm.models.get_pretrained_cfg(cfg.source.removeprefix("hf-hub:timm/"))
        assert reference is not None and cfg.hf_hub_id == reference.hf_hub_id == cfg.source.removeprefix("hf-hub:")
        for key in (
            "input_size",
            "test_input_size",
            "crop_pct",
            "test_crop_pct",
            "interpolation",
            "mean",
            "std",
            "crop_mode",
            "num_classes",
            "license",
            "origin_url",
            "paper_ids",
        ):
            assert getattr(cfg, key) == getattr(reference, key), key
        assert cfg.metrics == {}  # timm's cfgs publish no accuracy
        for use_test_size in (False, True):
            assert resolve_data_config(
                {}, pretrained_cfg=cfg.to_dict(), use_test_size=use_test_size
            ) == resolve_data_config({}, pretrained_cfg=reference.to_dict(), use_test_size=use_test_size)
        return
    weights = torchvision.models.get_weight(cfg.source)
    assert torchvision.models.get_model_weights(arch) is type(weights)
    assert cfg.url == weights.url and cfg.num_classes == len(weights.meta["categories"])
    published = weights.meta["_metrics"]["ImageNet-1K"]
    assert cfg.metrics["imagenet-1k/top1"]["value"] == published["acc@1"]
    assert cfg.metrics["imagenet-1k/top5"]["value"] == published["acc@5"]
    assert all(m["kind"] == "published" and m["of"] == "source" for k, m in cfg.metrics.items() if "refit" not in k)
    t = weights.transforms()
    assert cfg.input_size == (3, t.crop_size[0], t.crop_size[0]) and cfg.crop_pct == t.crop_size[0] / t.resize_size[0]
    assert cfg.interpolation == t.interpolation.value and cfg.crop_mode == "center"
    assert cfg.mean == tuple(t.mean) and cfg.std == tuple(t.std)
    assert cfg.license == "bsd-3-clause" and any("may have their own licenses" in n for n in cfg.notes)


def _smooth_and_noisy_image() -> Image.Image:
    g = torch.Generator().manual_seed(0)
    low = F.interpolate(torch.rand(1, 3, 6, 5, generator=g), size=(257, 300), mode="bicubic", align_corners=False)
    img = (low[0] + 0.1 * torch.rand(3, 257, 300, generator=g)).clamp(0, 1)
    return Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.mark.parametrize("name", ["resnet50.tv2_in1k", "heun_resnet101.tv_in1k", "momentum_resnet18.tv_in1k_gamma0"])
def test_timm_transform_of_a_zoo_model_is_torchvisions(name: str) -> None:
    """timm.data.create_transform(**resolve_data_config({}, model=m)) of a zoo model built with a torchvision tag is
    torchvision's weights.transforms(): the same tensor on a PIL image (resize 232 or 256, crop 224, bilinear); a
    wrong crop_pct or interpolation would not be."""
    with torch.device("meta"):
        model = zoo.create_model(name)
    config = resolve_data_config({}, model=model)
    reference = torchvision.models.get_weight(model.pretrained_cfg["source"]).transforms()
    image = _smooth_and_noisy_image()
    expected = reference(image)
    assert torch.equal(create_transform(**config)(image), expected)
    for wrong in ({"crop_pct": 0.9 * config["crop_pct"]}, {"interpolation": "bicubic"}):
        assert not torch.equal(create_transform(**{**config, **wrong})(image), expected)


def test_resolve_data_config_at_a_non_default_size() -> None:
    """A timm tag trained at 176 px (resnet50.a1h_in1k): the zoo model says what timm's says, and its pool_size
    follows the size (ceil(176 / 32) = 6)."""
    with torch.device("meta"):
        model = zoo.create_model("momentum_resnet50.a1h_in1k")
        reference = timm.create_model("resnet50.a1h_in1k")
    for use_test_size in (False, True):
        assert resolve_data_config({}, model=model, use_test_size=use_test_size) == resolve_data_config(
            {}, model=reference, use_test_size=use_test_size
        )
    assert model.pretrained_cfg["pool_size"] == reference.pretrained_cfg["pool_size"] == (6, 6)
    assert resolve_data_config({}, model=model)["input_size"] == (3, 176, 176)
    grey = zoo.create_model("cifar_resnet", in_chans=1, layers=(1, 1, 1), widths=(4, 4, 4))
    config = resolve_data_config({}, model=grey)
    assert config["input_size"] == (1, 32, 32) and len(config["mean"]) == len(config["std"]) == 1


@pytest.mark.parametrize("prefix", FAMILIES)
def test_tags_build_with_their_model_args(prefix: str) -> None:
    with torch.device("meta"):
        for tag in ("tv2_in1k", "a1h_in1k") + (("tv2_in1k_gamma0",) if prefix == "momentum_" else ()):
            model = zoo.create_model(f"{prefix}resnet50.{tag}")
            cfg = zoo.get_pretrained_cfg(f"{prefix}resnet50.{tag}")
            assert model.pretrained_cfg["tag"] == tag and model.pretrained_cfg["source"] == cfg.source
            assert model.pretrained_cfg is model.default_cfg and model.num_classes == 1000
            for key, value in cfg.model_args.items():
                assert model.hparams[key] == value
            assert cfg.conversion
    if prefix == "momentum_":
        assert zoo.get_pretrained_cfg("momentum_resnet50.tv2_in1k").model_args == {"gamma": 0.9}
        assert zoo.get_pretrained_cfg("momentum_resnet50.tv2_in1k_gamma0").model_args == {
            "gamma": 0.0,
            "memory": "full",
        }


def test_momentum_refit_result_is_published_of_the_model() -> None:
    """The published refit: a pretrained ResNet-152 moved to gamma = 0.9 reached 26.5% top-1 error after 1 epoch of
    refit, 23.5% after 5 (Sander et al. 2021)."""
    cfg = zoo.get_pretrained_cfg("momentum_resnet152.tv2_in1k")
    refit = {k: m for k, m in cfg.metrics.items() if m["of"] == "model"}
    assert sorted(m["value"] for m in refit.values()) == [100 - 26.5, 100 - 23.5]
    assert all(m["kind"] == "published" and "after refit" in m["note"] for m in refit.values())
    assert cfg.recipe == "imagenet_refit_momentum_resnet152" and "NOT the source function" in cfg.conversion
    exact = zoo.get_pretrained_cfg("momentum_resnet152.tv2_in1k_gamma0")
    assert not any(m["of"] == "model" for m in exact.metrics.values()) and "exactly" in exact.conversion


# ------------------------------------------------------------------------------------------------ loading


def _blocks_of(layer: torch.nn.Sequential, keep_first: bool) -> tuple[list, list]:
    """(ordinary first blocks, the blocks of the residual stack) of a torchvision stage."""
    first = list(layer)[:1] if keep_first or layer[0].downsample is not None else []
    return first, list(layer)[len(first) :]


def reference_forward(tv: torchvision.models.ResNet, x: torch.Tensor, prefix: str) -> torch.Tensor:
    """The function the tag's conversion sentence states, evaluated with torchvision's blocks B_n."""
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
        first, blocks = _blocks_of(layer, keep_first=prefix == "momentum_")
        for b in first:
            x = b(x)
        if prefix == "heun_":  # x_{n+1} = (x_n + B_{n+1}(B_n(x_n))) / 2, B_N := B_{N-1}
            for n, b in enumerate(blocks):
                x = (x + blocks[min(n + 1, len(blocks) - 1)](b(x))) / 2
        elif prefix == "momentum_":  # v_{n+1} = 0.9 v_n + 0.1 (B_n(x_n) - x_n), x_{n+1} = x_n + v_{n+1}, v_0 = 0
            v = torch.zeros_like(x)
            for b in blocks:
                v = 0.9 * v + 0.1 * (b(x) - x)
                x = x + v
        else:  # the source function
            for b in blocks:
                x = b(x)
    return tv.fc(torch.flatten(tv.avgpool(x), 1))


@pytest.fixture(scope="module")
def tv_resnet18() -> torchvision.models.ResNet:
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18()).eval()


def _cache_torchvision(model: torch.nn.Module, enum: str) -> None:
    """Put ``model``'s weights where torchvision's weights API looks for ``enum`` (no download)."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(torchvision.models.get_weight(enum).url)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)


@pytest.mark.parametrize(
    "name",
    [
        "resnet18.tv_in1k",
        "depth_scaled_resnet18.tv_in1k",
        "heun_resnet18.tv_in1k",
        "momentum_resnet18.tv_in1k",
        "momentum_resnet18.tv_in1k_gamma0",
    ],
)
def test_pretrained_true_computes_what_the_conversion_says(tv_resnet18, name: str) -> None:
    _cache_torchvision(tv_resnet18, "ResNet18_Weights.IMAGENET1K_V1")
    model = zoo.create_model(name, pretrained=True).eval()
    cfg = zoo.get_pretrained_cfg(name)
    assert model.pretrained_cfg["tag"] == cfg.tag and model.pretrained_cfg["source"] == cfg.source
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prefix = "" if name.endswith("_gamma0") else source_of(name)[0]
    with torch.no_grad():
        expected = reference_forward(tv_resnet18, x, prefix)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        if prefix in ("heun_", "momentum_"):  # and it is not the source function, as the sentence says
            assert not torch.allclose(model(x), tv_resnet18(x), rtol=1e-2, atol=1e-2)


def test_weights_names_resolve_through_the_table(tv_resnet18, tmp_path: Path) -> None:
    _cache_torchvision(tv_resnet18, "ResNet18_Weights.IMAGENET1K_V1")
    for spelling in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"):
        model = zoo.resnet18(weights=spelling)
        assert model.pretrained_cfg == zoo.get_pretrained_cfg("resnet18.tv_in1k").to_dict() | {"pool_size": (7, 7)}
    gamma0 = zoo.momentum_resnet18(weights="IMAGENET1K_V1", gamma=0.0, memory="full")
    assert gamma0.pretrained_cfg["tag"] == "tv_in1k_gamma0"
    assert zoo.momentum_resnet18(weights="IMAGENET1K_V1").pretrained_cfg["tag"] == "tv_in1k"
    other = zoo.momentum_resnet18(weights="IMAGENET1K_V1", gamma=0.5)  # no tag computes this: the source's cfg
    assert other.pretrained_cfg["tag"] == "tv_in1k" and "conversion" not in other.pretrained_cfg
    assert any("gamma" in n for n in other.pretrained_cfg["notes"])
    # the V2 names of the deeper nets resolve to their entries (the cfg a build with them gets; no 100 MB file here)
    for spelling in ("IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2", "DEFAULT"):
        assert resolve_pretrained_cfg("resnet50", weights=spelling).tag == "tv2_in1k"
    assert resolve_pretrained_cfg("heun_resnet152", weights="IMAGENET1K_V1").tag == "tv_in1k"
    assert resolve_pretrained_cfg("resnet50", weights="hf-hub:timm/resnet50.a1_in1k").tag == "a1_in1k"
    path = tmp_path / "mine.pth"
    torch.save(tv_resnet18.state_dict(), path)
    mine = zoo.resnet18(weights=str(path))
    assert "tag" not in mine.pretrained_cfg and mine.pretrained_cfg["source"] == str(path)
    assert mine.pretrained_cfg["input_size"] == (3, 224, 224) and "metrics" not in mine.pretrained_cfg


def test_pretrained_with_another_head_features_and_extractor(tv_resnet18) -> None:
    _cache_torchvision(tv_resnet18, "ResNet18_Weights.IMAGENET1K_V1")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tuned = zoo.depth_scaled_resnet18(pretrained=True, num_classes=10).eval()
    assert tuned.fc.out_features == 10 and tuned.pretrained_cfg["num_classes"] == 10
    assert torch.equal(tuned.conv1.weight, tv_resnet18.conv1.weight)
    headless = zoo.create_model("resnet18.tv_in1k", pretrained=True, num_classes=0).eval()
    assert isinstance(headless.fc, torch.nn.Identity) and headless.pretrained_cfg["num_classes"] == 0
    body = torchvision.models.feature_extraction.create_feature_extractor(
        tv_resnet18, {"relu": "stem", "layer1": "l1", "layer2": "l2", "flatten": "pooled"}
    )
    with torch.no_grad():
        ref = body(x)
        torch.testing.assert_close(headless(x), ref["pooled"], rtol=1e-5, atol=1e-5)
        extractor = zoo.create_model(
            "resnet18.tv_in1k", pretrained=True, features_only=True, out_indices=(0, 1, 2)
        ).eval()
        maps = extractor(x)
    assert extractor.feature_info.channels() == [64, 64, 128] and extractor.feature_info.reduction() == [2, 4, 8]
    for got, key in zip(maps, ("stem", "l1", "l2"), strict=True):
        torch.testing.assert_close(got, ref[key], rtol=1e-5, atol=1e-5)
    assert "classifier" not in extractor.pretrained_cfg and extractor.pretrained_cfg["tag"] == "tv_in1k"


def test_pretrained_timm_hub_weights_from_the_hf_cache() -> None:
    torch.manual_seed(0)
    reference = randomize_batchnorm(timm.create_model("resnet18")).eval()
    seed_hf_hub_cache("timm/resnet18.a1_in1k", reference.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
        for name in ("resnet18.a1_in1k", "depth_scaled_resnet18.a1_in1k", "momentum_resnet18.a1_in1k_gamma0"):
            model = zoo.create_model(name, pretrained=True).eval()
            assert model.pretrained_cfg["input_size"] == (3, 224, 224)
            assert model.pretrained_cfg["test_input_size"] == (3, 288, 288)
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_pretrained_errors_are_one_zoo_error() -> None:
    with pytest.raises(zoo.ZooError, match="has no pretrained tag 'tv3_in1k'; its tags are tv2_in1k, tv_in1k"):
        zoo.create_model("resnet50.tv3_in1k")
    with pytest.raises(zoo.ZooError, match="resnet20_cifar has no pretrained weights"):
        zoo.create_model("resnet20_cifar", pretrained=True)
    with pytest.raises(zoo.ZooError, match="'resnet20_cifar' has no pretrained cfgs"):
        zoo.create_model("resnet20_cifar.tv_in1k")
    with pytest.raises(zoo.ZooError, match="weights are given by keyword"):
        zoo.resnet18("IMAGENET1K_V1")
    with pytest.raises(zoo.ZooError, match="cannot fetch resnet18 IMAGENET1K_V1"):  # nothing in the (tmp) cache
        zoo.create_model("resnet18.tv_in1k", pretrained=True)
    with pytest.raises(zoo.ZooError, match="not a registered model"):
        zoo.get_pretrained_cfg("no_such_net.tag")


# ------------------------------------------------------------------------------------------------ listing, registering


def test_list_pretrained_filters_as_timm() -> None:
    tags = zoo.list_pretrained("resnet18")
    assert tags == sorted(tags, key=timm.models._registry._natural_key)
    assert tags[:2] == ["resnet18.a1_in1k", "resnet18.a2_in1k"] and "resnet18.tv_in1k" in tags
    assert all(n.startswith("resnet18.") for n in tags)
    assert zoo.list_pretrained("resnet18.tv*") == ["resnet18.tv_in1k"]
    assert zoo.list_pretrained("*resnet50.tv2*", exclude_filters="*gamma0") == [
        "depth_scaled_resnet50.tv2_in1k",
        "heun_resnet50.tv2_in1k",
        "momentum_resnet50.tv2_in1k",
        "resnet50.tv2_in1k",
    ]
    assert zoo.list_pretrained(["resnet18.tv*", "resnet34.tv*"]) == ["resnet18.tv_in1k", "resnet34.tv_in1k"]
    assert zoo.list_pretrained("momentum_resnet152", exclude_filters=["*gamma0", "*a*_in1k"]) == [
        "momentum_resnet152.gluon_in1k",
        "momentum_resnet152.tv2_in1k",
        "momentum_resnet152.tv_in1k",
    ]
    assert zoo.list_pretrained("no_such*") == []
    assert set(zoo.list_pretrained(has_weights=True)) >= set(RESNET_TAGS)
    assert not set(zoo.list_pretrained(has_weights=False)) & set(RESNET_TAGS)
    # timm's own listing with the same filter, restricted to the shared sources
    ours = {n.removeprefix("resnet50.") for n in zoo.list_pretrained("resnet50.*")}
    theirs = {n.removeprefix("resnet50.") for n in timm.list_pretrained("resnet50.*")} - {"bamboo"}
    assert ours == theirs


def test_register_pretrained_cfgs_checks_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    from zoo import pretrained

    monkeypatch.setattr(pretrained, "_PRETRAINED_CFGS", {})
    cfgs = register_pretrained_cfgs(
        {
            "my_net.first": {"num_classes": 3, "input_size": (1, 28, 28), "mean": (0.5,), "std": (0.25,)},
            "my_net.second": PretrainedCfg(source="hf-hub:me/net"),
        }
    )
    assert cfgs["my_net.first"].architecture == "my_net" and zoo.get_pretrained_cfg("my_net").tag == "first"
    assert zoo.list_pretrained() == ["my_net.first", "my_net.second"]
    assert zoo.list_pretrained(has_weights=True) == ["my_net.second"]
    register_pretrained_cfgs({"my_net.second": PretrainedCfg(source="hf-hub:me/net")})  # the same again: fine
    bad = [
        ({"my_net.second": PretrainedCfg(source="other")}, "already registered"),
        ({"my_net": PretrainedCfg()}, "has no tag"),
        ({"my_net.x": {"crop": 0.9}}, "unknown pretrained cfg keys"),
        ({"my_net.x": {"mean": (0.5,)}}, "mean must hold 3 finite numbers"),
        ({"my_net.x": {"crop_pct": 1.5}}, "crop_pct must be in"),
        ({"my_net.x": {"input_size": (3, 224)}}, "input_size must be"),
        ({"my_net.x": {"interpolation": "cubic"}}, "interpolation must be one of"),
        ({"my_net.x": {"metrics": {"top1": {"value": 80.0, "kind": "claimed", "of": "source"}}}}, "kind"),
        ({"my_net.x": {"architecture": "other_net"}}, "says architecture"),
    ]
    for entry, message in bad:
        with pytest.raises(zoo.ZooError, match=message):
            register_pretrained_cfgs(entry)


# ------------------------------------------------------------------------------------------------ weights and cfgs


def test_a_tag_and_other_weights_are_one_error(tv_resnet18, tmp_path: Path) -> None:
    """A tag (or pretrained_cfg) names weights; weights= naming others would leave the tag's transform on them."""
    _cache_torchvision(tv_resnet18, "ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(
        zoo.ZooError,
        match="resnet18.a1_in1k names the weights 'hf-hub:timm/resnet18.a1_in1k', but "
        "weights='IMAGENET1K_V1' names other weights",
    ) as info:
        zoo.create_model("resnet18.a1_in1k", weights="IMAGENET1K_V1")
    assert "zoo.create_model('resnet18.tv_in1k', pretrained=True)" in str(info.value)
    with pytest.raises(
        zoo.ZooError, match="resnet18.tv_in1k names the weights 'ResNet18_Weights.IMAGENET1K_V1'"
    ) as info:
        zoo.create_model("resnet18.tv_in1k", pretrained=True, weights="hf-hub:timm/resnet18.a1_in1k")
    assert "zoo.create_model('resnet18.a1_in1k', pretrained=True)" in str(info.value)
    path = tmp_path / "mine.pth"
    torch.save(tv_resnet18.state_dict(), path)
    with pytest.raises(zoo.ZooError, match="conflicting weights: momentum_resnet18.tv_in1k_gamma0 names"):
        zoo.momentum_resnet18(pretrained_cfg="tv_in1k_gamma0", weights=str(path))
    # the tag's own weights, in any spelling, are no conflict; nor is a cfg without weights
    for spelling in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"):
        model = zoo.create_model("resnet18.tv_in1k", weights=spelling)
        assert model.pretrained_cfg["tag"] == "tv_in1k"
    assert (
        zoo.resnet18(pretrained_cfg={"interpolation": "bilinear"}, weights=str(path)).pretrained_cfg["interpolation"]
        == "bilinear"
    )


def test_pretrained_cfg_overlay(tv_resnet18, tmp_path: Path) -> None:
    """Fields checked (one error listing them); with pretrained=True its file (or state_dict) is the weights loaded,
    as timm's offline loading, keeping the tag's cfg."""
    with pytest.raises(zoo.ZooError, match=r"unknown fields \['foo'\]; the fields are \[.*'crop_pct'"):
        zoo.create_model("resnet18", pretrained_cfg_overlay=dict(foo=1))
    with pytest.raises(zoo.ZooError, match=r"unknown fields \['foo'\]"):
        PretrainedCfg().replace(foo=1)
    with pytest.raises(zoo.ZooError, match="must be a mapping of pretrained cfg fields"):
        zoo.create_model("resnet18", pretrained_cfg_overlay="a1_in1k")
    path = tmp_path / "resnet18.a1_in1k.pth"
    torch.save(tv_resnet18.state_dict(), path)
    x = torch.randn(1, 3, 64, 64)
    model = zoo.create_model("resnet18.a1_in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv_resnet18(x), rtol=1e-4, atol=1e-4)
    cfg = model.pretrained_cfg
    assert (cfg["tag"], cfg["file"], cfg["interpolation"]) == ("a1_in1k", str(path), "bicubic")
    # a Path too, and for the default tag of an architecture (no network: nothing is fetched)
    assert torch.equal(
        zoo.resnet18(pretrained=True, pretrained_cfg_overlay=dict(file=path)).fc.weight, tv_resnet18.fc.weight
    )
    sd = {k: v + 1 if v.is_floating_point() else v for k, v in tv_resnet18.state_dict().items()}
    from_sd = zoo.create_model("resnet18.a1_in1k", pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))
    assert torch.equal(from_sd.conv1.weight, sd["conv1.weight"])
    untouched = zoo.create_model("resnet18.a1_in1k", pretrained_cfg_overlay=dict(file=str(path)))  # timm: no load
    assert not torch.equal(untouched.conv1.weight, tv_resnet18.conv1.weight)
    with pytest.raises(zoo.ZooError, match="pretrained cfg file 'nowhere.pth' of resnet18.a1_in1k does not exist"):
        zoo.create_model("resnet18.a1_in1k", pretrained=True, pretrained_cfg_overlay=dict(file="nowhere.pth"))
    with pytest.raises(zoo.ZooError, match="both name weights to load; give one"):
        zoo.resnet18(weights="IMAGENET1K_V1", pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(zoo.ZooError, match="state_dict must map parameter names to tensors"):
        zoo.resnet18(pretrained=True, pretrained_cfg_overlay=dict(state_dict={"conv1.weight": 1}))


def test_builder_takes_the_hyperparameters_zoo_weights_record(tmp_path: Path) -> None:
    """A builder given zoo weights of its own class builds what was saved (gamma, memory, layers ...), as
    from_pretrained does; a caller's argument wins, with a warning when it changes the function; weights of another
    family keep the builder's arguments (they are converted)."""
    torch.manual_seed(0)
    saved = zoo.momentum_cifar_resnet(layers=(2, 1, 1), widths=(4, 8, 8), gamma=0.0, memory="full", num_classes=3)
    saved = randomize_batchnorm(saved).eval()
    saved.save_pretrained(tmp_path / "m")
    x = torch.randn(2, 3, 16, 16)
    model = zoo.momentum_cifar_resnet(weights=str(tmp_path / "m")).eval()
    assert (model.hparams.gamma, model.hparams.memory, tuple(model.hparams.layers)) == (0.0, "full", (2, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), saved(x))
    with pytest.warns(UserWarning, match=r"gamma=0.5 \(recorded: 0.0\) as asked.*compute another function"):
        other = zoo.momentum_cifar_resnet(weights=str(tmp_path / "m"), gamma=0.5)
    assert other.hparams.gamma == 0.5 and other.hparams.memory == "full"
    half = zoo.momentum_cifar_resnet(layers=(2, 1, 1), widths=(4, 8, 8), gamma=0.5, memory="full", num_classes=3)
    randomize_batchnorm(half).eval().save_pretrained(tmp_path / "half.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full and reversible compute the same function: no warning
        same = zoo.momentum_cifar_resnet(weights=str(tmp_path / "half.safetensors"), memory="reversible").eval()
    assert (same.hparams.gamma, same.hparams.memory) == (0.5, "reversible")
    with torch.no_grad():
        torch.testing.assert_close(same(x), half(x))
    # a plain ResNet's file into the momentum builder: converted, the builder's own gamma (its rule is recorded too)
    zoo.cifar_resnet(layers=(2, 1, 1), widths=(4, 8, 8)).save_pretrained(tmp_path / "plain.safetensors")
    converted = zoo.momentum_cifar_resnet(
        layers=(2, 1, 1), widths=(4, 8, 8), weights=str(tmp_path / "plain.safetensors")
    )
    assert (converted.hparams.gamma, converted.hparams.rule) == (0.9, "momentum")


def test_builder_refuses_zoo_weights_of_another_architecture(tmp_path: Path) -> None:
    """A builder that names an architecture (resnet18, resnet20_cifar) refuses zoo weights recording another one
    (ResNet-34's layers, ResNet-56's) with one ZooError pointing to zoo.from_pretrained, instead of building a
    different model under its name; what a builder only defaults (CIFAR widths) is taken from the weights."""
    zoo.resnet34(num_classes=3).save_pretrained(tmp_path / "r34")
    with pytest.raises(
        zoo.ZooError, match=r"layers=\[3, 4, 6, 3\] \(the builder's: \[2, 2, 2, 2\]\).*zoo.from_pretrained"
    ):
        zoo.resnet18(weights=str(tmp_path / "r34"))
    zoo.resnet56_cifar(widths=(4, 8, 8)).save_pretrained(tmp_path / "r56")
    with pytest.raises(zoo.ZooError, match=r"layers=\[9, 9, 9\] \(the builder's: \[3, 3, 3\]\)"):
        zoo.resnet20_cifar(weights=str(tmp_path / "r56"))
    assert tuple(zoo.from_pretrained(tmp_path / "r56").hparams.layers) == (9, 9, 9)
    zoo.resnet20_cifar(widths=(8, 16, 32)).save_pretrained(tmp_path / "narrow")
    assert tuple(zoo.resnet20_cifar(weights=str(tmp_path / "narrow")).hparams.widths) == (8, 16, 32)


def test_function_preserving_arguments_are_each_familys_own(tmp_path: Path) -> None:
    """Which recorded arguments a caller may change without a warning is each family's knowledge: the names a class
    declares are its constructor's arguments, and a translation model's dropout rates (named ``dropout``, not
    ``drop_rate``) change nothing in evaluation, while its number of Sinkhorn iterations does."""
    from zoo.registry import _MODEL_CLASSES

    for cls in set(_MODEL_CLASSES.values()):
        accepted: set[str] = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                accepted |= set(inspect.signature(klass.__init__).parameters)
        declared = cls.same_function_args | cls.init_only_args
        assert declared <= accepted, (cls.__name__, sorted(declared - accepted))
    torch.manual_seed(0)
    saved = zoo.sinkformer_transformer_toy(dropout=0.3, attention_dropout=0.1, n_iter=3)
    saved.save_pretrained(tmp_path / "toy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = zoo.sinkformer_transformer_toy(weights=str(tmp_path / "toy"), dropout=0.0, attention_dropout=0.0)
    assert (model.hparams.dropout, model.hparams.n_iter) == (0.0, 3)
    with pytest.warns(UserWarning, match=r"n_iter=1 \(recorded: 3\) as asked"):
        zoo.sinkformer_transformer_toy(weights=str(tmp_path / "toy"), n_iter=1)
    # the translation builders take what zoo weights record, as every builder does; their shape is the name's
    assert zoo.sinkformer_transformer_toy(weights=str(tmp_path / "toy")).hparams.dropout == 0.3
    zoo.sinkformer_transformer_toy(encoder_layers=3).save_pretrained(tmp_path / "deeper")
    with pytest.raises(zoo.ZooError, match=r"encoder_layers=3 \(the builder's: 2\).*another architecture"):
        zoo.sinkformer_transformer_toy(weights=str(tmp_path / "deeper"))
