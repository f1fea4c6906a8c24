"""The model registry: names, patterns, builders, and the architectures the builders produce."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchvision

import zoo
from zoo import registry
from zoo.models import DepthScaledResNet, HeunNet, MomentumResNet, ResNet

FAMILIES = {"": ResNet, "depth_scaled_": DepthScaledResNet, "heun_": HeunNet, "momentum_": MomentumResNet}
IMAGENET_DEPTHS = (18, 34, 50, 101, 152)
SMALL_SUFFIXES = ("resnet20_cifar", "resnet56_cifar", "resnet110_cifar", "cifar_resnet", "tiny")
IMAGENET_NAMES = [f"{p}resnet{d}" for p in FAMILIES for d in IMAGENET_DEPTHS]
SMALL_NAMES = [f"{p}{s}" for p in FAMILIES for s in SMALL_SUFFIXES]
VIT_NAMES = [
    f"sinkformer_vit_{s}" for s in ("tiny_patch16_224", "small_patch16_224", "base_patch16_224", "cats_dogs", "mnist")
]
VMOE_NAMES = ["vmoe_small_patch32_224", "vmoe_tiny_patch32_224"]
POINTCLOUD_NAMES = [
    "point_cloud_sinkformer",
    "point_cloud_transformer",
    "set_sinkformer_modelnet40",
    "set_transformer_modelnet40",
]
TRANSLATION_NAMES = [
    "sinkformer_transformer_iwslt_de_en",
    "sinkformer_transformer_numbers",
    "sinkformer_transformer_toy",
    "transformer_iwslt_de_en",
]
NEURAL_ODE_NAMES = ["neural_ode_classifier", "neural_ode_digits"]
MEAN_FIELD_NAMES = ["mean_field_resnet", "mean_field_resnet_teacher"]
OTHER_FAMILY_NAMES = VIT_NAMES + VMOE_NAMES + POINTCLOUD_NAMES + TRANSLATION_NAMES + NEURAL_ODE_NAMES + MEAN_FIELD_NAMES


def test_list_models_has_every_family_and_variant() -> None:
    names = zoo.list_models()
    # natural order: the same names as sorted, and the numbers by value
    assert sorted(names) == sorted(set(names))
    assert [n for n in names if n.startswith("resnet")][:5] == [
        "resnet18",
        "resnet20_cifar",
        "resnet34",
        "resnet50",
        "resnet56_cifar",
    ]
    for prefix in ("depth_scaled_", "heun_", "momentum_"):
        for depth in IMAGENET_DEPTHS:
            assert f"{prefix}resnet{depth}" in names
        for suffix in SMALL_SUFFIXES:
            assert f"{prefix}{suffix}" in names
    assert set(names) == {*IMAGENET_NAMES, *SMALL_NAMES, *OTHER_FAMILY_NAMES}


def test_list_models_patterns_and_family() -> None:
    heun = zoo.list_models("heun_*")
    assert heun and all(n.startswith("heun_") for n in heun)
    assert len(heun) == len(IMAGENET_DEPTHS) + len(SMALL_SUFFIXES)
    assert zoo.list_models("*resnet50") == ["depth_scaled_resnet50", "heun_resnet50", "momentum_resnet50", "resnet50"]
    assert zoo.list_models("resnet*_cifar") == ["resnet20_cifar", "resnet56_cifar", "resnet110_cifar"]
    # natural order, as timm's: the depths by value, not by their digits
    assert zoo.list_models("momentum_resnet1[0-9]*") == [
        "momentum_resnet18",
        "momentum_resnet101",
        "momentum_resnet110_cifar",
        "momentum_resnet152",
    ]
    assert zoo.list_models("*tiny") == ["depth_scaled_tiny", "heun_tiny", "momentum_tiny", "tiny"]
    assert zoo.list_models("no_such_model*") == []
    assert set(zoo.list_models(family="resnet")) == {*IMAGENET_NAMES, *SMALL_NAMES}
    assert set(zoo.list_models(family="vit")) == set(VIT_NAMES)
    assert zoo.list_models(family="vmoe") == VMOE_NAMES
    assert zoo.list_models(family="pointcloud") == POINTCLOUD_NAMES
    assert zoo.list_models(family="translation") == TRANSLATION_NAMES
    assert zoo.list_models(family="neural_ode") == NEURAL_ODE_NAMES
    assert zoo.list_models(family="mean_field") == MEAN_FIELD_NAMES
    assert zoo.is_model("depth_scaled_resnet50") and not zoo.is_model("depth_scaled_resnet51")


@pytest.mark.parametrize("name", IMAGENET_NAMES + SMALL_NAMES + OTHER_FAMILY_NAMES)
def test_builder_importable_from_zoo(name: str) -> None:
    builder = getattr(importlib.import_module("zoo"), name)
    assert builder is registry.model_entrypoint(name)
    assert name in zoo.__all__
    assert builder.__name__ == name and builder.__doc__


def test_from_zoo_import() -> None:
    from zoo import depth_scaled_resnet50, heun_resnet20_cifar, heun_tiny

    assert depth_scaled_resnet50 is registry.model_entrypoint("depth_scaled_resnet50")
    assert heun_resnet20_cifar.__module__ == "zoo.models.resnet"
    assert callable(heun_tiny)


def test_create_model_class_and_kwargs() -> None:
    m = zoo.create_model("depth_scaled_resnet20_cifar", layers=(1, 1, 1), num_classes=7, label_smoothing=0.1)
    assert type(m) is DepthScaledResNet
    assert m.hparams.layers == (1, 1, 1) and m.hparams.label_smoothing == 0.1
    assert m.fc.out_features == 7 and m.fc.in_features == 64
    assert [s.rule for s in m.stages] == ["euler"] * 3

    h = zoo.create_model("heun_cifar_resnet", layers=(3, 2, 2), widths=(8, 16, 32))
    assert type(h) is HeunNet
    assert h.num_features == 32 and h.fc.out_features == 10
    assert [s.rule for s in h.stages] == ["heun"] * 3
    assert h.layer1.depth == 3 and h.layer1.step == pytest.approx(1 / 3)
    assert h.layer2.depth == 1  # first block of a stage that changes the shape is the transition

    p = zoo.create_model("resnet20_cifar", layers=(2, 2, 2))
    assert type(p) is ResNet and p.layer1.step == 1.0

    t = zoo.create_model("depth_scaled_tiny", depth=5)
    assert type(t) is DepthScaledResNet and t.layer1.depth == 5 and t.layer1.step == pytest.approx(0.2)
    assert all(not b.bn2.weight.detach().any() for b in t.layer1.blocks)  # zero_init_last by default


def test_unknown_model_suggests_close_matches() -> None:
    with pytest.raises(zoo.ZooError, match="depth_scaled_resnet50") as info:
        zoo.create_model("depth_scaled_resnet5O")
    assert "unknown model 'depth_scaled_resnet5O'" in str(info.value)
    with pytest.raises(zoo.ZooError, match="heun_resnet18"):
        zoo.create_model("heun_resent18")
    with pytest.raises(zoo.ZooError, match="unknown model 'xyz'") as info:
        zoo.create_model("xyz")
    assert "Did you mean" not in str(info.value)


def test_register_model_refuses_a_second_builder_of_the_same_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_MODEL_ENTRYPOINTS", dict(registry._MODEL_ENTRYPOINTS))
    monkeypatch.setattr(registry, "_MODEL_FAMILY", dict(registry._MODEL_FAMILY))

    def my_test_net(weights=None, **kwargs):
        return torch.nn.Identity()

    assert zoo.register_model(my_test_net) is my_test_net
    assert zoo.register_model(my_test_net) is my_test_net  # the same function again is fine
    assert zoo.list_models("my_test_*") == ["my_test_net"]
    assert zoo.list_models(family="test_registry") == ["my_test_net"]

    def other():
        pass

    other.__name__ = "my_test_net"
    with pytest.raises(zoo.ZooError, match="already registered"):
        zoo.register_model(other)


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_small_models_build(name: str) -> None:
    model = zoo.create_model(name).eval()
    prefix = next(p for p in ("depth_scaled_", "heun_", "momentum_", "") if name.startswith(p))
    assert type(model) is FAMILIES[prefix]
    assert model.fc.out_features == 10
    if name.endswith("_cifar"):  # ResNet-(6n+2): n blocks per stage, the first of stages 2 and 3 a transition
        n = (int(name.split("resnet")[1].split("_")[0]) - 2) // 6
        first = n - 1 if prefix == "momentum_" else n  # Momentum ResNets keep every stage's first block
        assert [s.depth for s in model.stages] == [first, n - 1, n - 1]
    if name.endswith(("resnet20_cifar", "cifar_resnet", "tiny")):  # the cheap ones also run
        with torch.no_grad():
            out = model(torch.randn(1, 3, 16, 16))
        assert out.shape == (1, 10) and torch.isfinite(out).all()


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_imagenet_models_match_torchvision_layout(depth: int) -> None:
    with torch.device("meta"):  # no memory, no initialisation: only the structure is compared
        reference = torchvision.models.get_model(f"resnet{depth}")
        models = {prefix: zoo.create_model(f"{prefix}resnet{depth}") for prefix in FAMILIES}
    ref_sd = reference.state_dict()
    for prefix, model in models.items():
        assert type(model) is FAMILIES[prefix]
        assert model.torchvision_arch == f"resnet{depth}"
        assert _numel(model) == _numel(reference)
        sd = model.state_dict()
        assert list(sd) == list(ref_sd)
        assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}


@pytest.mark.parametrize("name", IMAGENET_NAMES + SMALL_NAMES + OTHER_FAMILY_NAMES)
def test_every_builder_builds_with_its_defaults(name: str) -> None:
    """The argument checks (zoo.validation) accept every builder's own defaults (meta device: no memory)."""
    with torch.device("meta"):
        model = zoo.create_model(name)
    assert isinstance(model, torch.nn.Module) and sum(p.numel() for p in model.parameters()) > 0


def test_imagenet_model_num_classes() -> None:
    with torch.device("meta"):
        m = zoo.depth_scaled_resnet50(num_classes=10)
    assert m.fc.out_features == 10 and m.fc.in_features == 2048
    assert m.torchvision_arch == "resnet50"


def test_small_imagenet_model_runs() -> None:
    model = zoo.heun_resnet18(num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_create_model_with_a_pretrained_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm's naming: "arch.tag" builds arch with that tag's pretrained cfg (no weights unless pretrained=True);
    is_model ignores the tag; a builder without tags keeps its plain signature (pretrained is passed only when
    asked for)."""
    with torch.device("meta"):
        m = zoo.create_model("heun_resnet34.tv_in1k")
    assert type(m) is HeunNet and m.pretrained_cfg["tag"] == "tv_in1k"
    assert m.pretrained_cfg["source"] == "ResNet34_Weights.IMAGENET1K_V1"
    assert zoo.is_model("resnet50.tv2_in1k") and not zoo.is_model("resnet51.tv2_in1k")
    with pytest.raises(zoo.ZooError, match="unknown model 'resnet51'"):
        zoo.create_model("resnet51.tv2_in1k")
    monkeypatch.setattr(registry, "_MODEL_ENTRYPOINTS", dict(registry._MODEL_ENTRYPOINTS))
    monkeypatch.setattr(registry, "_MODEL_FAMILY", dict(registry._MODEL_FAMILY))
    seen = {}

    def my_plain_net(weights=None, **kwargs):
        seen.update(kwargs, weights=weights)
        return torch.nn.Identity()

    zoo.register_model(my_plain_net)
    zoo.create_model("my_plain_net", width=3)
    assert seen == {"width": 3, "weights": None}


@pytest.mark.parametrize("name", IMAGENET_NAMES + SMALL_NAMES)
def test_resnet_builders_are_explicit_functions(name: str) -> None:
    """Builders are ``def`` functions of their module (issue 14: nothing generated with setattr), with timm's
    signature: ``pretrained`` first, then keyword-only ``weights`` and the model's arguments."""
    import inspect

    import zoo.models.resnet as resnet

    builder = registry.model_entrypoint(name)
    assert builder.__qualname__ == name and builder.__module__ == "zoo.models.resnet"
    assert f"\ndef {name}(" in inspect.getsource(resnet)
    params = inspect.signature(builder).parameters
    assert list(params) == ["pretrained", "weights", "kwargs"]
    assert params["pretrained"].default is False and params["weights"].kind is inspect.Parameter.KEYWORD_ONLY


def test_create_model_refuses_a_name_that_is_not_a_string() -> None:
    for bad in (None, 123, "", ("resnet18",)):
        with pytest.raises(zoo.ZooError, match="a model name must be a non-empty string"):
            zoo.create_model(bad)
        with pytest.raises(zoo.ZooError, match="a model name must be a non-empty string"):
            registry.model_entrypoint(bad)
    with pytest.raises(zoo.ZooError, match="pretrained_cfg= gives another; give one"):
        zoo.create_model("resnet18.tv_in1k", pretrained_cfg="a1_in1k")


def test_list_models_options_as_timm() -> None:
    """timm.list_models' filter (one pattern or several), exclude_filters, pretrained and include_tags; zoo's
    family (timm's module) takes several too."""
    assert zoo.list_models(["heun_resnet1*", "momentum_tiny"]) == [
        "heun_resnet18",
        "heun_resnet101",
        "heun_resnet110_cifar",
        "heun_resnet152",
        "momentum_tiny",
    ]
    assert zoo.list_models(("*tiny",), exclude_filters="heun*") == ["depth_scaled_tiny", "momentum_tiny", "tiny"]
    assert zoo.list_models("*resnet50", exclude_filters=["heun*", "momentum*"]) == ["depth_scaled_resnet50", "resnet50"]
    assert zoo.list_models("*", family=["vmoe", "mean_field"]) == MEAN_FIELD_NAMES + VMOE_NAMES
    # pretrained: "arch.tag" names with weights, as timm (and include_tags=False: the architectures)
    tagged = zoo.list_models("resnet18", pretrained=True)
    assert tagged == sorted(zoo.list_pretrained("resnet18", has_weights=True)) and "resnet18.tv_in1k" in tagged
    assert zoo.list_models("resnet18.tv*", pretrained=True) == ["resnet18.tv_in1k"]
    momentum = zoo.list_models("momentum_resnet18", pretrained=True, exclude_filters="*gamma0")
    assert momentum == [n.replace("resnet18.", "momentum_resnet18.") for n in tagged]  # the same sources, gamma 0.9
    assert zoo.list_models("*resnet18", pretrained=True, include_tags=False) == [
        "depth_scaled_resnet18",
        "heun_resnet18",
        "momentum_resnet18",
        "resnet18",
    ]
    assert not zoo.list_models("*_cifar", pretrained=True)  # no weights published for the CIFAR nets
    assert zoo.list_models("resnet20_cifar", include_tags=True) == ["resnet20_cifar"]  # no cfgs: its own name
    assert set(zoo.list_models(pretrained=True)) == set(zoo.list_pretrained(has_weights=True))
    with pytest.warns(FutureWarning, match="use filter="):
        assert zoo.list_models(pattern="heun_tiny") == ["heun_tiny"]
    for bad in ({"filter": 3}, {"exclude_filters": [None]}, {"family": 1}):
        with pytest.raises(zoo.ZooError, match="must be a shell-style pattern or a list of them"):
            zoo.list_models(**bad)


def _zoo_repo_in_hf_cache(repo_id: str, model: torch.nn.Module, tmp_path) -> None:
    """``model``'s save_pretrained folder as the (offline) Hugging Face cache's copy of ``repo_id``."""
    from pathlib import Path

    import huggingface_hub.constants as hf_constants
    from helpers import seed_hf_hub_cache

    model.save_pretrained(tmp_path / "saved")
    seed_hf_hub_cache(repo_id, {})
    snapshot = Path(hf_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    (snapshot / "model.safetensors").write_bytes((tmp_path / "saved" / "model.safetensors").read_bytes())


def test_create_model_of_an_hf_hub_repository(tmp_path) -> None:
    """timm's create_model("hf-hub:org/name", pretrained=True): the model the repository holds, with its weights
    (zoo.from_pretrained), keyword arguments as overrides; anything else is one error pointing to what to call."""
    torch.manual_seed(0)
    source = zoo.momentum_cifar_resnet(layers=(2, 1, 1), widths=(4, 8, 8), gamma=0.5, num_classes=3).eval()
    _zoo_repo_in_hf_cache("org/tiny-momentum", source, tmp_path)
    model = zoo.create_model("hf-hub:org/tiny-momentum", pretrained=True).eval()
    assert type(model) is MomentumResNet and model.hparams.gamma == 0.5 and model.hparams.layers == [2, 1, 1]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert zoo.create_model("hf-hub:org/tiny-momentum", pretrained=True, label_smoothing=0.1).hparams.label_smoothing
    with pytest.raises(zoo.ZooError, match=r"pass pretrained=True \(as in timm\) or call zoo.from_pretrained"):
        zoo.create_model("hf-hub:org/tiny-momentum")
    with pytest.raises(zoo.ZooError, match="weights='x.pth' names others; give one"):
        zoo.create_model("hf-hub:org/tiny-momentum", pretrained=True, weights="x.pth")
    with pytest.raises(zoo.ZooError, match="without the builder options features_only"):
        zoo.create_model("hf-hub:org/tiny-momentum", pretrained=True, features_only=True)
    with pytest.raises(zoo.ZooError, match="is not a Hub repository name"):
        zoo.create_model("hf-hub:", pretrained=True)
