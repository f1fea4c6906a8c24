"""timm's model protocol on every registered image model (issue 14, point 1).

timm's own model tests (pytorch-image-models, tests/test_models.py: test_model_forward, test_model_backward,
test_model_default_cfgs / _non_std, test_model_forward_features, test_model_forward_intermediates(_features)),
ported and run over every registered image model (ResNet families, Sinkformer ViTs, V-MoE) and the point-cloud
models where the notion applies, at small sizes: the family's own architecture with small widths / depths, and
inputs of the size the model's ``pretrained_cfg`` says (a ViT built at 32 px must say 32 px). Stronger than timm
where the issue asks: ``reset_classifier(0)`` gives the values of ``forward_head(pre_logits=True)``, not only the
shape. The ResNets are also compared with timm's own ResNet on the same weights.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from helpers import randomize_batchnorm
from timm.data import resolve_data_config

import zoo

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------------------ the models, small

FAMILIES = ("", "depth_scaled_", "heun_", "momentum_")
IMAGENET_RESNETS = [f"{p}resnet{d}" for p in FAMILIES for d in (18, 34, 50, 101, 152)]
CIFAR_RESNETS = [
    f"{p}{s}" for p in FAMILIES for s in ("resnet20_cifar", "resnet56_cifar", "resnet110_cifar", "cifar_resnet")
]
TINY_RESNETS = ["tiny", "depth_scaled_tiny", "heun_tiny", "momentum_tiny"]
VITS = [
    "sinkformer_vit_tiny_patch16_224",
    "sinkformer_vit_small_patch16_224",
    "sinkformer_vit_base_patch16_224",
    "sinkformer_vit_cats_dogs",
    "sinkformer_vit_mnist",
]
VMOES = ["vmoe_tiny_patch32_224", "vmoe_small_patch32_224"]
POINT_CLOUDS = [
    "set_transformer_modelnet40",
    "set_sinkformer_modelnet40",
    "point_cloud_transformer",
    "point_cloud_sinkformer",
]
# vector-input models (mean-field ResNets): num_classes, reset_classifier, forward_features / forward_head and a
# pretrained_cfg without image keys apply; forward_intermediates, feature_info and features_only do not (no spatial
# map; the states x_0 .. x_S come from model.trajectory)
MEAN_FIELD = ["mean_field_resnet", "mean_field_resnet_teacher"]
# neural ODEs with width and switches: flattened images; their features are the state vector, forward_intermediates
# gives the state at the end of each interval ((B, d, 1, 1) as "NCHW", reduction = the image size)
NEURAL_ODES = ["neural_ode_classifier", "neural_ode_digits"]

_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 12, "depth": 2, "num_heads": 2}
_SET = {"embed_dim": 8, "num_heads": 2, "num_inducing": 2, "depth": 1}
_PCT = {"embed_dim": 4, "sample_points": (8, 4), "num_neighbors": 4, "depth": 1, "fuse_dim": 8, "head_dims": (8,)}


def small_kwargs(name: str) -> dict:
    """The family's architecture with small widths and depths. A ResNet has no image size of its own: its cfg is
    overlaid with a small input size (timm's ``pretrained_cfg_overlay``), so that the test reads it as timm's tests
    do and ``pool_size`` is recomputed for it."""
    if name in IMAGENET_RESNETS:  # layers fixed (torchvision's); 64 px: a 2x2 final map
        return {"widths": (4, 4, 8, 8), "pretrained_cfg_overlay": {"input_size": (3, 64, 64)}}
    if name in CIFAR_RESNETS:  # 16 px: a 4x4 final map
        return {"layers": (2, 2, 2), "widths": (4, 8, 8), "pretrained_cfg_overlay": {"input_size": (3, 16, 16)}}
    if name in TINY_RESNETS:  # pooled to 10x10 whatever the input: its 32 px CIFAR input, feature_info's reference
        return {"depth": 2, "widths": (4,)}
    if name == "sinkformer_vit_mnist":
        return {"embed_dim": 8, "depth": 2, "attn_head_dim": 4}
    if name in VITS:
        return dict(_VIT)
    if name in VMOES:
        return {**_VIT, "embed_dim": 8, "num_experts": 2}
    if name.startswith("set_"):
        return dict(_SET)
    if name.startswith("point_cloud_"):
        return dict(_PCT)
    if name in MEAN_FIELD:
        return {"dim": 3, "width": 8, "depth": 2, "num_classes": 3}
    if name in NEURAL_ODES:
        return {"dim": 6, "width": 4, "switches": 2, "steps": 2}
    raise AssertionError(f"no small configuration for {name}")


POINT_SHAPES = {"set_": (6, 3), "point_cloud_": (16, 3)}  # (points, coordinates)


def create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = zoo.create_model(name, **{**small_kwargs(name), **kwargs})
    return model


def inputs(model: torch.nn.Module, name: str, batch_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name in POINT_CLOUDS:
        shape = next(v for k, v in POINT_SHAPES.items() if name.startswith(k))
        return torch.randn(batch_size, *shape, generator=g)
    if name in MEAN_FIELD:
        return torch.randn(batch_size, model.in_features, generator=g)
    return torch.randn(batch_size, *model.pretrained_cfg["input_size"], generator=g)


IMAGE_MODELS = IMAGENET_RESNETS + CIFAR_RESNETS + TINY_RESNETS + VITS + VMOES + NEURAL_ODES
STD_MODELS = IMAGENET_RESNETS + CIFAR_RESNETS + TINY_RESNETS  # NCHW features with a pool_size (timm's "std")
# token or vector features (timm's NON_STD_FILTERS: vit_* ...)
NON_STD_MODELS = VITS + VMOES + POINT_CLOUDS + MEAN_FIELD + NEURAL_ODES
INTERMEDIATE_MODELS = STD_MODELS + VITS + VMOES + NEURAL_ODES  # forward_intermediates / feature_info / features_only


def test_every_registered_image_model_is_covered() -> None:
    not_images = set(zoo.list_models(family="translation"))
    assert set(zoo.list_models()) - not_images == set(IMAGE_MODELS + POINT_CLOUDS + MEAN_FIELD)


# ------------------------------------------------------------------------------------------------ timm's tests


@pytest.mark.parametrize("name", IMAGE_MODELS + POINT_CLOUDS + MEAN_FIELD)
def test_model_forward(name: str) -> None:
    """timm's test_model_forward: one forward pass, no NaN; set_grad_checkpointing changes no output."""
    model = create(name).eval()
    x = inputs(model, name, 1)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, model.num_classes)
    assert not torch.isnan(out).any()
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing()
        with torch.no_grad():
            again = model(x)
        torch.testing.assert_close(again, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", IMAGE_MODELS + POINT_CLOUDS + MEAN_FIELD)
def test_model_backward(name: str) -> None:
    """timm's test_model_backward: num_classes=42, training mode, every parameter gets a gradient."""
    model = create(name, num_classes=42).train()
    n_params = sum(p.numel() for p in model.parameters())
    out = model(inputs(model, name, 2))
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert sum(p.grad.numel() for p in model.parameters() if p.grad is not None) == n_params
    assert out.shape == (2, 42)
    assert not torch.isnan(out).any()


def _check_names(model: torch.nn.Module, cfg: dict) -> None:
    """timm: the cfg's classifier and first conv name parameters of the model."""
    state_dict = model.state_dict()
    if cfg.get("num_classes"):
        classifier = cfg["classifier"]
        for c in (classifier,) if isinstance(classifier, str) else classifier:
            assert f"{c}.weight" in state_dict, f"{c} not in the model's parameters"
    first_conv = cfg.get("first_conv")
    if first_conv is not None:  # point clouds have no image stem
        for c in (first_conv,) if isinstance(first_conv, str) else first_conv:
            assert f"{c}.weight" in state_dict, f"{c} not in the model's parameters"


@pytest.mark.parametrize("name", STD_MODELS)
def test_model_default_cfgs(name: str) -> None:
    """timm's test_model_default_cfgs (NCHW models): pool_size, num_features, head_hidden_size, reset_classifier(0)
    (here: equal to forward_head(pre_logits=True) in value), reset_classifier(0, '') and num_classes=0 /
    global_pool='' at build give the unpooled map, classifier and first conv names."""
    model = create(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg
    pool_size = cfg["pool_size"]
    x = inputs(model, name, 1)
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        assert features.shape[-2:] == pool_size, f"unpooled feature shape {features.shape} != config {pool_size}"
        assert features.shape[1] == model.num_features
        assert pre.shape[1] == model.head_hidden_size

        model.reset_classifier(0)
        assert model.num_classes == 0 and model.hparams.num_classes == 0
        out = model(x)
        assert out.ndim == 2 and out.shape[1] == model.head_hidden_size
        assert torch.equal(out, pre)

        model.reset_classifier(0, "")
        out = model(x)
        assert out.ndim == 4 and out.shape[-2:] == pool_size
        assert torch.equal(out, features)

        unpooled = create(name, num_classes=0, global_pool="").eval()
        out = unpooled(x)
        assert out.ndim == 4 and out.shape[-2:] == pool_size
    _check_names(create(name), cfg)


@pytest.mark.parametrize("name", NON_STD_MODELS)
def test_model_default_cfgs_non_std(name: str) -> None:
    """timm's test_model_default_cfgs_non_std (token models: ViTs, V-MoE, and the point clouds): num_features,
    head_hidden_size, reset_classifier(0) equal to forward_head(pre_logits=True), num_classes=0 at build, names."""
    model = create(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.default_cfg
    x = inputs(model, name, 1)
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        assert features.shape[-1 if features.ndim == 3 else 1] == model.num_features
        assert pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == pre.shape and torch.equal(out, pre)
        headless = create(name, num_classes=0).eval()
        out = headless(x)  # the pre-logits features (timm checks num_features, equal to it for its ViTs)
        assert out.shape[-1] == model.head_hidden_size
    _check_names(create(name), cfg)


def _check_features(
    outputs: list[torch.Tensor], channels: list[int], reductions: list[float], size: tuple[int, int], batch_size: int
) -> None:
    """timm's checks of feature maps against feature_info: channels, spatial size <= ceil(size / reduction) + 1."""
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[1] == c
        assert o.shape[2] <= math.ceil(size[0] / r) + 1 and o.shape[3] <= math.ceil(size[1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()


@pytest.mark.parametrize("name", INTERMEDIATE_MODELS)
def test_model_forward_intermediates(name: str) -> None:
    """timm's test_model_forward_intermediates: every feature of feature_info, NCHW, its channels and reduction;
    the final output is forward_features'; set_grad_checkpointing changes nothing."""
    model = create(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = inputs(model, name, 1)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        _check_features(intermediates, info.channels(), info.reduction(), tuple(x.shape[-2:]), 1)
        assert torch.allclose(output, model.forward_features(x))
        model.set_grad_checkpointing()
        again, _ = model.forward_intermediates(x, output_fmt="NCHW")
    torch.testing.assert_close(again, output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", INTERMEDIATE_MODELS)
def test_model_forward_intermediates_features(name: str) -> None:
    """timm's test_model_forward_features / _intermediates_features: features_only=True (feature_cls='getter')
    returns the feature_info maps; its pretrained_cfg drops the classifier keys (timm's pretrained_cfg_for_features);
    resolve_data_config still gives the model's input size."""
    model = create(name, features_only=True, feature_cls="getter").eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    x = inputs(model, name, 1)
    with torch.no_grad():
        outputs = model(x)
    _check_features(outputs, channels, reductions, tuple(x.shape[-2:]), 1)
    assert not {"num_classes", "classifier"} & set(model.pretrained_cfg)
    assert resolve_data_config({}, model=model)["input_size"] == tuple(x.shape[1:])


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_resolve_data_config_gives_the_size_as_built(name: str) -> None:
    """timm.data.resolve_data_config reads the model's pretrained_cfg: the input size it was built or configured
    at (ViTs at 32 px, not timm's 224 px default), one mean / std per input channel."""
    model = create(name)
    config = resolve_data_config({}, model=model)
    size = small_kwargs(name).get("img_size")
    if size is not None:
        assert config["input_size"] == (3, size, size)
    else:
        assert config["input_size"] == model.pretrained_cfg["input_size"]
    channels = config["input_size"][0]
    assert len(config["mean"]) == channels and len(config["std"]) == channels


# ------------------------------------------------------------------------------------------------ ResNet vs timm


def _timm_and_zoo(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    reference = randomize_batchnorm(timm.create_model(arch)).eval()
    model = zoo.create_model(arch).eval()
    model.load_state_dict(reference.state_dict())
    return reference, model


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_protocol_equals_timm_resnet(arch: str) -> None:
    """Independent check: timm's own ResNet with the same state dict (zoo's plain ResNet shares torchvision's and
    timm's parameter names) gives the same intermediates for every indices form, the same feature_info (channels,
    reductions), the same pruning, features_only maps, pooled features and heads."""
    reference, model = _timm_and_zoo(arch)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert [(i["num_chs"], i["reduction"]) for i in model.feature_info] == [
        (i["num_chs"], i["reduction"]) for i in reference.feature_info
    ]
    assert (model.num_features, model.head_hidden_size) == (reference.num_features, reference.head_hidden_size)
    with torch.no_grad():
        for kwargs in ({}, {"indices": 2}, {"indices": [0, -1]}, {"indices": [1, 3], "stop_early": True}):
            out, inter = model.forward_intermediates(x, **kwargs)
            ref_out, ref_inter = reference.forward_intermediates(x, **kwargs)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
            assert len(inter) == len(ref_inter)
            for a, b in zip(inter, ref_inter):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        only = model.forward_intermediates(x, indices=3, intermediates_only=True)
        assert isinstance(only, list) and len(only) == 3
        torch.testing.assert_close(
            model.forward_head(model.forward_features(x), pre_logits=True),
            reference.forward_head(reference.forward_features(x), pre_logits=True),
        )
        for pool in ("max", "avgmax", "catavgmax"):
            model.reset_classifier(0, pool)
            reference.reset_classifier(0, pool)
            assert model.head_hidden_size == reference.head_hidden_size
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)

    reference, model = _timm_and_zoo(arch)
    assert model.prune_intermediate_layers([1, 2]) == reference.prune_intermediate_layers([1, 2])
    assert (model.num_features, model.num_classes) == (reference.num_features, reference.num_classes)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    timm_features = randomize_batchnorm(timm.create_model(arch, features_only=True, out_indices=(0, 2, 4))).eval()
    features = zoo.create_model(arch, features_only=True, out_indices=(0, 2, 4)).eval()
    features.model.load_state_dict(timm_features.state_dict(), strict=False)
    assert features.feature_info.channels() == timm_features.feature_info.channels()
    assert features.feature_info.reduction() == timm_features.feature_info.reduction()
    with torch.no_grad():
        for a, b in zip(features(x), timm_features(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forward_intermediates_bad_input_is_one_zoo_error() -> None:
    model = create("cifar_resnet").eval()
    x = torch.randn(1, 3, 16, 16)
    for indices in (5, [4], [-5], [], "1", 0, True):
        with pytest.raises(zoo.ZooError, match="indices"):
            model.forward_intermediates(x, indices=indices)
    with pytest.raises(zoo.ZooError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(zoo.ZooError, match="global_pool='' .* needs num_classes=0"):
        zoo.cifar_resnet(global_pool="")
    with pytest.raises(zoo.ZooError, match="global_pool must be one of"):
        zoo.cifar_resnet(num_classes=0, global_pool="mean")
    with pytest.raises(zoo.ZooError, match="num_classes"):
        zoo.cifar_resnet(num_classes=-1)
    with pytest.raises(zoo.ZooError, match="feature_cls must be 'getter'"):
        zoo.cifar_resnet(features_only=True, feature_cls="hook")
    with pytest.raises(zoo.ZooError, match="only apply with features_only=True"):
        zoo.cifar_resnet(out_indices=(1, 2))


# ------------------------------------------------------------------------------------------------ arguments, head


@pytest.mark.parametrize("name", zoo.list_models())
def test_unknown_argument_is_one_zoo_error_before_anything_is_built(name: str, monkeypatch) -> None:
    """Every registered model (translation included) refuses a keyword argument neither it nor its task takes with
    one ZooError naming it and the valid ones, before any parameter exists (not Python's TypeError from the task)."""

    def no_parameters(*args, **kwargs):
        raise AssertionError(f"{name} built a parameter before refusing the unknown argument")

    monkeypatch.setattr(torch.nn.Module, "register_parameter", no_parameters)
    message = r"unknown argument 'bogus_arg': remove or rename it; .* takes .*\bweights\b"
    with pytest.raises(zoo.ZooError, match=message):
        zoo.create_model(name, bogus_arg=1)


def test_unknown_arguments_are_named_together() -> None:
    with pytest.raises(zoo.ZooError, match=r"unknown arguments 'foo', 'bar': remove or rename them; ResNet takes"):
        zoo.cifar_resnet(foo=1, bar=2)


def test_unknown_argument_suggests_the_close_name_and_lists_the_task_arguments() -> None:
    with pytest.raises(zoo.ZooError, match=r"SinkformerViT got the unknown argument 'deph' \(did you mean 'depth'\?\)"):
        zoo.sinkformer_vit_tiny_patch16_224(deph=3)
    with pytest.raises(zoo.ZooError, match=r"'num_expert' \(did you mean 'num_experts'\?\).*label_smoothing"):
        zoo.vmoe_tiny_patch32_224(num_expert=3)
    with pytest.raises(zoo.ZooError, match=r"SinkformerTranslation got the unknown argument 'num_classes'.*beam"):
        zoo.sinkformer_transformer_toy(num_classes=3)
    with pytest.raises(zoo.ZooError, match=r"PointCloudTransformer got the unknown argument 'foo'"):
        zoo.models.PointCloudTransformer(foo=1)
    with pytest.raises(zoo.ZooError, match=r"'widht' \(did you mean 'width'\?\)"):
        zoo.models.TwoLayerReLU(widht=3)
    with pytest.raises(zoo.ZooError, match="lr is a training setting"):  # the training settings keep their message
        zoo.neural_ode_classifier(lr=0.1)


# one model of every family class that has reset_classifier
RESET_MODELS = [
    "resnet20_cifar",
    "depth_scaled_tiny",
    "heun_resnet20_cifar",
    "momentum_resnet20_cifar",
    "sinkformer_vit_tiny_patch16_224",
    "vmoe_tiny_patch32_224",
    "set_transformer_modelnet40",
    "point_cloud_transformer",
    "mean_field_resnet",
    "neural_ode_classifier",
]


@pytest.mark.parametrize("name", RESET_MODELS)
def test_reset_classifier_updates_pretrained_cfg(name: str) -> None:
    """The cfg describes the model as built, its number of classes included: reset_classifier updates it (and its
    alias default_cfg) with hparams."""
    model = create(name)
    for n in (3, 0):
        model.reset_classifier(n)
        assert model.num_classes == model.hparams["num_classes"] == n
        assert model.pretrained_cfg["num_classes"] == model.default_cfg["num_classes"] == n
        assert model.default_cfg is model.pretrained_cfg
