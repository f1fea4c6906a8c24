"""converters.transform(..., to="momentum"): torchvision/timm ResNets, timm ViTs and torch TransformerEncoders
(CPU, random weights, no network), and ``zoo convert --to momentum``."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
import torch.nn as nn
from helpers import build_resnet_source
from timm.models.vision_transformer import VisionTransformer

import converters
import zoo
from zoo.cli import main
from zoo.errors import ZooError
from zoo.models import MomentumResNet
from zoo.nn import ResidualOf, ResidualStack, StackAsBlock, TransformerEncoderStack

RESNETS = ["tv_resnet18", "tv_resnet50", "timm_resnet18", "timm_resnet50"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def assert_close_to_scale(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} for output scale {scale:.3g}"


def grads_of(model: nn.Module, x: torch.Tensor, loss, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """Gradients of ``loss(model(x))`` w.r.t. the input and every trainable parameter (fixed random state)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss(model(x, **kwargs)).backward()
    out = {"input": x.grad}
    out.update({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    return out


def assert_same_grads(mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-4) -> None:
    assert mine.keys() == ref.keys()
    for k, g in ref.items():
        assert (g is None) == (mine[k] is None), k
        if g is not None:
            assert_close_to_scale(mine[k], g, rtol)


def weighted_sum(out: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out * w).sum()


# ------------------------------------------------------------------------------------------------ registry


def test_momentum_target_serves_two_families() -> None:
    assert "momentum" in converters.list_targets()
    target = converters._get_target("momentum")
    assert target.families == ("resnet", "transformer")
    assert set(converters.list_sources("momentum")) == {
        "torchvision.models.ResNet",
        "timm.models.resnet.ResNet",
        "torch.nn.TransformerEncoder",
        "timm.models.vision_transformer.VisionTransformer",
        "nn.Sequential of timm.models.vision_transformer blocks",
    }
    # single-family targets are unchanged
    assert set(converters.list_sources("depth_scaled")) == {"torchvision.models.ResNet", "timm.models.resnet.ResNet"}
    assert converters._get_target("heun").families == ("resnet",)


def test_register_target_adds_families_and_rejects_a_second_builder() -> None:
    build = lambda spec, options: spec  # noqa: E731
    converters.register_target("_test_multi", "resnet", ("memory",))(build)
    converters.register_target("_test_multi", "transformer", ("gamma",))(build)
    try:
        target = converters._get_target("_test_multi")
        assert target.families == ("resnet", "transformer") and target.options == ("memory", "gamma")
        with pytest.raises(ZooError, match="already registered for family 'resnet'"):
            converters.register_target("_test_multi", "resnet", ())(lambda spec, options: None)
    finally:
        del converters._TARGETS["_test_multi"]


def test_unsupported_source_lists_every_family() -> None:
    with pytest.raises(ZooError, match="cannot convert a torch.nn.modules.linear.Linear to 'momentum'") as err:
        converters.transform(nn.Linear(3, 3), to="momentum")
    for name in (
        "torchvision.models.ResNet",
        "timm.models.resnet.ResNet",
        "torch.nn.TransformerEncoder",
        "timm.models.vision_transformer.VisionTransformer",
    ):
        assert name in str(err.value)


def test_options_are_checked_per_family() -> None:
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False)
    with pytest.raises(
        ZooError, match="unknown option 'lr' for to='momentum' from a torch.nn.TransformerEncoder"
    ) as err:
        converters.transform(enc, to="momentum", lr=0.1)
    assert "memory, gamma, init_velocity" in str(err.value)
    with pytest.raises(ZooError, match="gamma=0 is the plain ResNet"):
        converters.transform(enc, to="momentum", gamma=0.0)  # reversible (default) needs gamma > 0
    model = converters.transform(
        build_resnet_source("tv_resnet18"), to="momentum", label_smoothing=0.1, init_velocity="f", layer_decay=0.9
    )
    assert model.hparams.label_smoothing == 0.1 and all(s.init_velocity == "f" for s in model.stages)
    assert model.layer_decay == 0.9


# ------------------------------------------------------------------------------------------------ ResNets


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_gamma_zero_is_the_source(images, name: str) -> None:
    source = build_resnet_source(name)
    model = converters.transform(source, to="momentum", gamma=0.0, memory="full")
    assert type(model) is MomentumResNet and not model.training
    assert all(s.rule == "momentum" and s.gamma == 0.0 and s.memory == "full" for s in model.stages)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        assert_close_to_scale(model(images), source(images), rtol=1e-5)


@pytest.mark.parametrize("name", ["tv_resnet50", "timm_resnet50"])
def test_resnet_gamma_zero_full_trains_as_the_source(images, monkeypatch, name: str) -> None:
    """Training mode, gamma 0, memory="full", every step on the compiled kernels (the in-place transition blocks,
    the first step from v_0 = 0, the backward writing into its cotangents): the source's output, input and parameter
    gradients, and BatchNorm statistics."""
    from zoo.ops import fixed_point

    monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    source = build_resnet_source(name).train()
    model = converters.transform(source, to="momentum", gamma=0.0, memory="full").train()
    assert max(s.depth for s in model.stages) >= 3  # steps inside a stack, whose backward writes in place
    assert_same_grads(grads_of(model, images, weighted_sum), grads_of(source, images, weighted_sum))
    for k, v in source.state_dict().items():
        if "running_" in k:
            assert_close_to_scale(model.state_dict()[k], v, rtol=1e-5)


@pytest.mark.parametrize("name", ["tv_resnet18", "timm_resnet18"])
def test_resnet_momentum_equals_the_zoo_builder(images, tmp_path, name: str) -> None:
    source = build_resnet_source(name)
    model = converters.transform(source, to="momentum", gamma=0.9)
    assert all(s.memory == "reversible" and s.gamma == 0.9 for s in model.stages)
    weights = tmp_path / "source.pth"
    torch.save(source.state_dict(), weights)
    built = zoo.momentum_resnet18(weights=str(weights)).eval()
    with torch.no_grad():
        out = model(images)
        assert torch.equal(out, built(images))
        # a different function from the source (a starting point for fine-tuning, docs/mathematics.md, section 4)
        assert (out - source(images)).abs().max() > 1e-3 * source(images).abs().max()
    x = images.clone().requires_grad_(True)  # the fixed-point reversible forward
    assert_close_to_scale(model(x), out, rtol=1e-5)


@pytest.mark.parametrize("name", ["tv_resnet18", "timm_resnet18"])
def test_resnet_momentum_keeps_every_first_block_as_published(images, name: str) -> None:
    """The first block of every stage stays an ordinary block (layer1's too, though it keeps the shape), as in
    momentumnet.transform_to_momentumnet(..., keep_first_layer=True); keep_first_block=False moves it into the stack."""
    source = build_resnet_source(name)
    model = converters.transform(source, to="momentum", gamma=0.9)
    assert model.hparams.keep_first_block is True
    assert [s.depth for s in model.stages] == [1, 1, 1, 1] and all(s.transition is not None for s in model.stages)
    with torch.no_grad():  # written out over the source's own blocks: v <- 0.9 v + 0.1 (block(x) - x), x <- x + v
        x = (
            source.maxpool(source.act1(source.bn1(source.conv1(images))))
            if name.startswith("timm")
            else source.maxpool(source.relu(source.bn1(source.conv1(images))))
        )
        for stage in (source.layer1, source.layer2, source.layer3, source.layer4):
            x = stage[0](x)
            v = torch.zeros_like(x)
            for block in list(stage)[1:]:
                v = 0.9 * v + 0.1 * (block(x) - x)
                x = x + v
        ref = source.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))
        assert_close_to_scale(model(images), ref, rtol=1e-5)
    moved = converters.transform(source, to="momentum", gamma=0.9, keep_first_block=False)
    assert moved.layer1.transition is None and moved.layer1.depth == 2
    assert list(moved.state_dict()) == list(model.state_dict()) == list(source.state_dict())
    with torch.no_grad():
        assert (moved(images) - ref).abs().max() > 1e-2 * ref.abs().max()


def test_resnet_reversible_grads_equal_full_grads(images) -> None:
    source = build_resnet_source("tv_resnet18").train()
    rev = converters.transform(source, to="momentum", gamma=0.9, memory="reversible")
    full = converters.transform(source, to="momentum", gamma=0.9, memory="full")
    assert rev.training and full.training
    assert_same_grads(grads_of(rev, images, weighted_sum), grads_of(full, images, weighted_sum))
    # running statistics updated once per forward, as with full backprop
    for (k, a), b in zip(rev.state_dict().items(), full.state_dict().values()):
        if "running_" in k:
            assert_close_to_scale(a, b, rtol=1e-5)


def test_resnet_float64_source_keeps_float64_accuracy_with_fixed_point_bits(images) -> None:
    """A float64 source converted with fixed_point_bits=48 (a training option of the momentum target): the
    reversible output is full backprop's to float64 rounding, where the default 2^-32 grid is ~1e-10 off."""
    source = build_resnet_source("tv_resnet18").double().eval()
    x = images[:1].double()
    full = converters.transform(source, to="momentum", gamma=0.9, memory="full")
    want = full(x)
    for bits, low, high in ((32, 1e-12, 1e-8), (48, 0.0, 1e-13)):
        rev = converters.transform(source, to="momentum", gamma=0.9, memory="reversible", fixed_point_bits=bits)
        assert rev.hparams.fixed_point_bits == bits and {s.fixed_point.frac_bits for s in rev.stages} == {bits}
        error = float((rev(x) - want).abs().max() / want.abs().max())
        assert low <= error <= high, (bits, error)


# ------------------------------------------------------------------------------------------------ zoo convert


@pytest.mark.parametrize("out_name", ["converted", "converted.safetensors"])
def test_cli_convert_to_momentum(images, tmp_path, out_name: str) -> None:
    source = build_resnet_source("tv_resnet18")
    weights = tmp_path / "r18.pth"
    torch.save(source.state_dict(), weights)
    out = tmp_path / out_name
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(
            [
                "convert",
                "--from",
                "torchvision:resnet18",
                "--weights",
                str(weights),
                "--to",
                "momentum",
                "--gamma",
                "0.9",
                "--out",
                str(out),
            ]
        )
    assert f"wrote {out} (MomentumResNet" in stdout.getvalue()
    built = zoo.momentum_resnet18(weights=str(out)).eval()
    loaded = zoo.from_pretrained(out).eval()
    assert type(loaded) is MomentumResNet
    assert all(s.gamma == 0.9 and s.memory == "reversible" for s in loaded.stages)
    reference = converters.transform(source, to="momentum", gamma=0.9)
    with torch.no_grad():
        ref = reference(images)
        assert torch.equal(built(images), ref)
        assert torch.equal(loaded(images), ref)


def test_cli_refuses_to_save_a_non_zoo_result(tmp_path, monkeypatch) -> None:
    import zoo.cli

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    monkeypatch.setattr(zoo.cli, "_build_source", lambda spec, weights: vit)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        main(
            [
                "convert",
                "--from",
                "timm:vit_tiny_patch16_224",
                "--weights",
                "none",
                "--to",
                "momentum",
                "--out",
                str(tmp_path / "x"),
            ]
        )
    assert "gives a VisionTransformer, not a zoo model" in err.getvalue()
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ TransformerEncoder


def build_encoder(batch_first: bool, dropout: float = 0.0, norm_first: bool = False) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
    nested = batch_first and not norm_first  # where torch can take its nested-tensor path
    return nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(16), enable_nested_tensor=nested).eval()


def encoder_inputs(batch_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    src = torch.randn(3, 6, 16, generator=g)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, -2:] = True
    padding[2, -1] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True: not attended
    return (src if batch_first else src.transpose(0, 1)), padding, causal


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_gamma_zero_is_the_source(batch_first: bool, norm_first: bool) -> None:
    source = build_encoder(batch_first, norm_first=norm_first)
    model = converters.transform(source, to="momentum", gamma=0.0, memory="full")
    assert type(model) is TransformerEncoderStack and not model.training
    assert isinstance(model.layers, ResidualStack) and model.layers.depth == 3
    assert all(isinstance(b, ResidualOf) for b in model.layers.blocks)
    src, padding, causal = encoder_inputs(batch_first)
    calls = [
        {},
        {"src_key_padding_mask": padding},
        {"mask": causal},  # causal mask detected, as the encoder does
        {"mask": causal, "is_causal": True},
        {"mask": causal, "src_key_padding_mask": padding},
    ]
    for kwargs in calls:
        # with gradients: the encoder's regular (padded) path
        assert_close_to_scale(model(src, **kwargs), source(src, **kwargs), rtol=1e-5)
        with torch.no_grad():  # fast paths: the same values, except the nested path's zeros at padded positions
            ref, out = source(src, **kwargs), model(src, **kwargs)
            if "src_key_padding_mask" in kwargs:
                keep = ~(padding if batch_first else padding.t())
                ref, out = ref[keep], out[keep]
            assert_close_to_scale(out, ref, rtol=1e-5)


def test_encoder_masks_change_the_output() -> None:
    model = converters.transform(build_encoder(True), to="momentum", gamma=0.9, memory="full")
    src, padding, causal = encoder_inputs(True)
    with torch.no_grad():
        plain = model(src)
        assert (model(src, src_key_padding_mask=padding) - plain)[0, :4].abs().max() > 1e-3
        assert (model(src, mask=causal) - plain)[:, 0].abs().max() > 1e-3
        # causal: the first position sees only itself, whatever the others hold
        src2 = src.clone()
        src2[:, 1:] = 0.0
        torch.testing.assert_close(model(src2, mask=causal)[:, 0], model(src, mask=causal)[:, 0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_reversible_grads_equal_full_grads(batch_first: bool) -> None:
    source = build_encoder(batch_first, dropout=0.1).train()
    rev = converters.transform(source, to="momentum", gamma=0.9)
    full = converters.transform(source, to="momentum", gamma=0.9, memory="full")
    assert rev.layers.memory == "reversible" and rev.training
    src, padding, causal = encoder_inputs(batch_first)
    for kwargs in ({"src_key_padding_mask": padding}, {"mask": causal, "src_key_padding_mask": padding}):
        assert_same_grads(grads_of(rev, src, weighted_sum, **kwargs), grads_of(full, src, weighted_sum, **kwargs))


def test_encoder_reversible_rebuild_is_exact_in_eval_mode() -> None:
    """Frozen eval-mode layers would take torch's fused fast path in the no-grad reversible forward and the
    regular path when recomputed in backward: the stack turns the fast path off so the rebuild is exact."""
    model = converters.transform(build_encoder(True), to="momentum", gamma=0.9)
    model.requires_grad_(False)
    model.layers.record_rebuild = True
    src, padding, _ = encoder_inputs(True)
    x = src.clone().requires_grad_(True)
    model(x, src_key_padding_mask=padding).sum().backward()
    x0, v0 = model.layers.last_rebuild
    assert torch.equal(x0, model.layers.fixed_point.to_fixed(src)) and not v0.any()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_encoder_source_is_left_unchanged() -> None:
    source = build_encoder(True)
    before = copy.deepcopy(source.state_dict())
    model = converters.transform(source, to="momentum", gamma=0.0, memory="full")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    for k, v in source.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------------------ timm ViT


def build_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10, **kwargs
    ).eval()


@pytest.fixture(scope="module")
def vit_images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def token_mask(n: int = 17) -> torch.Tensor:
    mask = torch.zeros(n, n)
    mask[:, -5:] = float("-inf")  # no token attends to the last 5 patches
    return mask


def test_vit_gamma_zero_is_the_source(vit_images) -> None:
    source = build_vit()
    model = converters.transform(source, to="momentum", gamma=0.0, memory="full")
    assert type(model) is VisionTransformer and model is not source and not model.training
    assert isinstance(model.blocks, StackAsBlock) and model.blocks.depth == 4
    assert isinstance(source.blocks, nn.Sequential)  # the source keeps its blocks
    mask = token_mask()
    with torch.no_grad():
        assert_close_to_scale(model(vit_images), source(vit_images), rtol=1e-5)
        # a mask goes through forward_features' block loop, which runs the stack once
        assert_close_to_scale(
            model.forward_features(vit_images, attn_mask=mask),
            source.forward_features(vit_images, attn_mask=mask),
            rtol=1e-5,
        )
        assert (
            model.forward_features(vit_images, attn_mask=mask) - model.forward_features(vit_images)
        ).abs().max() > 1e-3
    # weights are copied, not shared
    with torch.no_grad():
        model.blocks.blocks[0].module.attn.qkv.weight.zero_()
    assert source.blocks[0].attn.qkv.weight.abs().sum() > 0


def test_vit_reversible_grads_equal_full_grads(vit_images) -> None:
    source = build_vit(drop_path_rate=0.1, proj_drop_rate=0.1).train()
    rev = converters.transform(source, to="momentum", gamma=0.9)
    full = converters.transform(source, to="momentum", gamma=0.9, memory="full")
    assert rev.blocks.memory == "reversible" and rev.training and rev.blocks.blocks[1].training
    assert_same_grads(grads_of(rev, vit_images, weighted_sum), grads_of(full, vit_images, weighted_sum))

    class Features(nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, x, attn_mask):
            return self.vit.forward_features(x, attn_mask=attn_mask)

    mask = token_mask()
    assert_same_grads(
        grads_of(Features(rev), vit_images, weighted_sum, attn_mask=mask),
        grads_of(Features(full), vit_images, weighted_sum, attn_mask=mask),
    )


def test_vit_block_sequence_and_grad_checkpointing(vit_images) -> None:
    source = build_vit()
    with torch.no_grad():
        tokens = source.norm_pre(source._pos_embed(source.patch_embed(vit_images)))
        stack = converters.transform(source.blocks, to="momentum", gamma=0.0, memory="full")
        assert type(stack) is StackAsBlock
        assert_close_to_scale(stack(tokens), source.blocks(tokens), rtol=1e-5)
    model = converters.transform(source, to="momentum", gamma=0.9)
    ref = model(vit_images)
    model.set_grad_checkpointing(True)  # timm's checkpoint_seq runs the stack as one function
    assert_close_to_scale(model(vit_images), ref, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ per-block outputs


def tiny_timm_vit(kind: str = "cls") -> nn.Module:
    """A small timm ViT (4 blocks, 4x4 patches of 8 pixels): a class token, registers without a class token, or
    DeiT's distilled subclass (two prefix tokens, its own ``_pos_embed``)."""
    import timm

    torch.manual_seed(0)
    size = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 10}
    if kind == "registers":
        extra = {"reg_tokens": 2, "class_token": False, "global_pool": "avg", "no_embed_class": True}
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **size, **extra).eval()
    name = "deit_tiny_distilled_patch16_224" if kind == "distilled" else "vit_tiny_patch16_224"
    return timm.create_model(name, pretrained=False, **size).eval()


def assert_same_structure_close(mine, ref, rtol: float = 1e-5) -> None:
    """``mine`` and ``ref`` are the same nesting of tuples / lists / dicts, their tensors close to scale."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(mine, torch.Tensor)
        assert_close_to_scale(mine, ref, rtol)
    elif isinstance(ref, dict):
        assert isinstance(mine, dict) and mine.keys() == ref.keys()
        for k in ref:
            assert_same_structure_close(mine[k], ref[k], rtol)
    else:
        assert type(mine) is type(ref) and len(mine) == len(ref)
        for a, b in zip(mine, ref):
            assert_same_structure_close(a, b, rtol)


INTERMEDIATE_CALLS = [
    {},
    {"indices": 2},
    {"indices": [0, 2, -1], "output_fmt": "NLC"},
    {"indices": [1], "norm": True, "stop_early": True},
    {"indices": [0, 3], "return_prefix_tokens": True, "intermediates_only": True},
    {"indices": 1, "output_dict": True, "return_prefix_tokens": True, "stop_early": True},
    {"indices": [-2], "output_dict": True, "intermediates_only": True, "output_fmt": "NLC", "norm": True},
]


@pytest.mark.parametrize("kind", ["cls", "registers", "distilled"])
def test_vit_intermediates_at_gamma_zero_are_the_sources(vit_images, kind: str) -> None:
    """At gamma = 0 the state x_{n+1} is block n's output: forward_intermediates is the source's, call by call."""
    source = tiny_timm_vit(kind)
    model = converters.transform(source, to="momentum", gamma=0.0, memory="full")
    with torch.no_grad():
        for call in INTERMEDIATE_CALLS:
            assert_same_structure_close(
                model.forward_intermediates(vit_images, **call), source.forward_intermediates(vit_images, **call)
            )
        mask = token_mask(16 + source.num_prefix_tokens)
        assert_same_structure_close(
            model.forward_intermediates(vit_images, indices=[0, 2], attn_mask=mask),
            source.forward_intermediates(vit_images, indices=[0, 2], attn_mask=mask),
        )
        # timm's DINO interface goes through forward_intermediates
        assert_same_structure_close(
            model.get_intermediate_layers(vit_images, n=2, reshape=True),
            source.get_intermediate_layers(vit_images, n=2, reshape=True),
        )
    with pytest.raises(ZooError, match="do not select blocks"):
        model.forward_intermediates(vit_images, indices=[4])
    with pytest.raises(ZooError, match="output_fmt"):
        model.forward_intermediates(vit_images, output_fmt="NHWC")


def momentum_states(blocks: nn.Module, tokens: torch.Tensor, gamma: float) -> list[torch.Tensor]:
    """x_1 .. x_N of (M1) written out with the source's blocks, step 1, from v_0 = 0 (docs/mathematics.md):
    v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n), x_{n+1} = x_n + v_{n+1}, f_n(x) = block_n(x) - x."""
    x, v, out = tokens, torch.zeros_like(tokens), []
    for block in blocks:
        v = gamma * v + (1 - gamma) * (block(x) - x)
        x = x + v
        out.append(x)
    return out


def test_vit_intermediates_at_gamma_09_are_the_momentum_states(vit_images) -> None:
    source = tiny_timm_vit()
    model = converters.transform(source, to="momentum", gamma=0.9)  # memory="reversible"
    assert model.blocks.memory == "reversible"
    prefix = source.num_prefix_tokens
    with torch.no_grad():
        tokens = source.norm_pre(source.patch_drop(source._pos_embed(source.patch_embed(vit_images))))
        expected = momentum_states(source.blocks, tokens, 0.9)
        final, inter = model.forward_intermediates(vit_images, output_fmt="NLC", return_prefix_tokens=True)
        states = [torch.cat([pre, patches], dim=1) for patches, pre in inter]
        assert len(states) == 4
        for mine, ref in zip(states, expected):
            assert_close_to_scale(mine, ref, rtol=1e-5)
        # the last intermediate is the stack's output before the final norm, bit for bit; the final features are
        # forward_features
        assert torch.equal(states[-1], model.blocks(tokens))
        assert torch.equal(final, model.forward_features(vit_images))
        # not the source's block outputs
        source_last = source.forward_intermediates(vit_images, indices=1, output_fmt="NLC", intermediates_only=True)
        assert (inter[-1][0] - source_last[0]).abs().max() > 1e-2
        # stop early: the final features are the last block run's, normed
        final, inter = model.forward_intermediates(vit_images, indices=[1], stop_early=True, output_fmt="NLC")
        assert torch.equal(final, model.norm(states[1])) and torch.equal(inter[0], states[1][:, prefix:])
    # with gradients the states come from memory="full"'s forward (the reversible stack's forward runs in fixed
    # point): the same values to rounding, and gradients reach the input and the blocks
    x = vit_images.clone().requires_grad_(True)
    final, inter = model.forward_intermediates(x, indices=[0, 3], output_fmt="NLC")
    assert_close_to_scale(inter[1], expected[3][:, prefix:], rtol=1e-5)
    (final.sum() + inter[0].square().sum()).backward()
    assert x.grad is not None and model.blocks.blocks[0].module.attn.qkv.weight.grad is not None


def test_vit_intermediates_under_grad_checkpointing(vit_images) -> None:
    model = converters.transform(tiny_timm_vit(), to="momentum", gamma=0.9, memory="full")
    ref = model.forward_intermediates(vit_images, indices=[1, 3])
    model.set_grad_checkpointing(True)
    final, inter = model.forward_intermediates(vit_images, indices=[1, 3])
    assert_same_structure_close((final, inter), ref, rtol=1e-6)
    inter[0].sum().backward()
    assert model.blocks.blocks[1].module.mlp.fc2.weight.grad is not None
    assert model.blocks.blocks[3].module.mlp.fc2.weight.grad is None  # after the last state used


@pytest.mark.parametrize("memory", ["full", "reversible"])
def test_vit_prune_keeps_the_outputs_kept(vit_images, memory: str) -> None:
    source = tiny_timm_vit()
    model = converters.transform(source, to="momentum", gamma=0.9, memory=memory)
    with torch.no_grad():
        before = model.forward_intermediates(vit_images, output_fmt="NLC", intermediates_only=True)
    reference = copy.deepcopy(source)
    assert model.prune_intermediate_layers([0, -2]) == reference.prune_intermediate_layers([0, -2]) == [0, 2]
    assert model.blocks.depth == 3 and model.blocks.step == 1.0 and model.blocks.memory == memory
    assert model.num_classes == reference.num_classes == 0 and isinstance(model.fc_norm, nn.Identity)
    with torch.no_grad():
        after = model.forward_intermediates(vit_images, indices=[0, 2], output_fmt="NLC", intermediates_only=True)
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[2])
        # the pruned model's features are the last kept block's output, normed
        final, _ = model.forward_intermediates(vit_images, indices=1, output_fmt="NLC", return_prefix_tokens=True)
        assert torch.equal(model.forward_features(vit_images), final)
        assert model(vit_images).shape == reference(vit_images).shape == (3, 17, 48)  # no pooling, no head
    assert model.prune_intermediate_layers(1, prune_norm=True) == [2]
    assert isinstance(model.norm, nn.Identity) and model.blocks.depth == 3
    with pytest.raises(ZooError, match="do not select blocks"):
        model.prune_intermediate_layers([3])


def test_vit_intermediates_survive_deepcopy_and_save(vit_images, tmp_path) -> None:
    import gc
    import weakref

    model = converters.transform(tiny_timm_vit(), to="momentum", gamma=0.9, memory="full")
    with torch.no_grad():
        ref = model.forward_intermediates(vit_images, indices=[0, 3])
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (twin, loaded):
        with torch.no_grad():
            assert_same_structure_close(other.forward_intermediates(vit_images, indices=[0, 3]), ref, rtol=0)
            # the method belongs to the copy: the copy's weights, the copy's blocks pruned
            other.blocks.blocks[0].module.mlp.fc2.bias.add_(1.0)
            assert (other.forward_intermediates(vit_images, indices=[0])[1][0] - ref[1][0]).abs().max() > 0.1
        assert other.prune_intermediate_layers([1]) == [1] and other.blocks.depth == 2
    del other
    assert model.blocks.depth == 4 and model.num_classes == 10
    with torch.no_grad():
        assert_same_structure_close(model.forward_intermediates(vit_images, indices=[0, 3]), ref, rtol=0)
    # the methods hold the model weakly: a deleted model goes with its last reference, no cycle left for gc
    gc.disable()
    try:
        alive = weakref.ref(loaded)
        del loaded
        assert alive() is None
    finally:
        gc.enable()


def test_vit_subclass_overriding_intermediates_is_refused(vit_images) -> None:
    class OwnIntermediates(VisionTransformer):
        def forward_intermediates(self, x, **kwargs):
            return super().forward_intermediates(x, **kwargs)

    torch.manual_seed(0)
    source = OwnIntermediates(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    model = converters.transform(source, to="momentum", gamma=0.0, memory="full")
    with pytest.raises(ZooError, match="its class overrides timm's VisionTransformer version"):
        model.forward_intermediates(vit_images)
    with pytest.raises(ZooError, match="its class overrides"):
        copy.deepcopy(model).forward_intermediates(vit_images)
    assert model.prune_intermediate_layers(1) == [1]  # not overridden: the stack's
