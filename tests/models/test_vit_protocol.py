"""timm's model protocol on the Sinkformer ViT and the V-MoE (zoo/models/vit.py, vmoe.py), checked against timm's
own VisionTransformer with the same weights (the zoo ViT has timm's parameter names; n_iter=1 is timm's function):
forward_intermediates and prune_intermediate_layers, feature_info and features_only, num_classes=0 and
global_pool='', reset_classifier, gradient checkpointing, pretrained_cfg and timm's data config at other sizes, the
pretrained table against timm's own table, pretrained=True from the (offline) Hugging Face cache, and the published
configurations without weights. CPU, random weights, no network."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
from helpers import seed_hf_hub_cache
from PIL import Image
from timm.models import VisionTransformer

import zoo
from zoo.errors import ZooError
from zoo.models import SinkformerViT, VisionMoE
from zoo.models import vit as vit_module
from zoo.models import vmoe as vmoe_module

RECIPES = Path(zoo.__file__).parent / "recipes"
VARIANTS = [{}, {"global_pool": "avg"}, {"class_token": False, "global_pool": "avg"}, {"global_pool": "max"}]


def images(n: int = 2, size: int = 32, chans: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off timm's constant initialisations (zero biases, unit norms would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def pair(**variant: Any) -> tuple[SinkformerViT, VisionTransformer]:
    """A zoo ViT at n_iter=1 and timm's VisionTransformer of the same shape, with the same (random) weights."""
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3, "num_classes": 7, **variant}
    mine = randomize(zoo.sinkformer_vit_tiny_patch16_224(n_iter=1, **args)).eval()
    ref = VisionTransformer(**args).eval()
    ref.load_state_dict(mine.state_dict())  # strict: timm's names
    return mine, ref


def assert_same(a: Any, b: Any) -> None:
    """Equal structure (lists, tuples, dicts) and tensors equal to float rounding."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert isinstance(a, (list, tuple)) and type(a) is type(b) and len(a) == len(b), (type(a), type(b))
        for x, y in zip(a, b):
            assert_same(x, y)


# ------------------------------------------------------------------------------------------------ timm's functions


CALLS = [
    {},
    {"indices": 2, "norm": True},
    {"indices": [0, -1], "return_prefix_tokens": True},
    {"indices": [1], "stop_early": True, "intermediates_only": True, "output_fmt": "NLC"},
    {"indices": (0, 2), "output_dict": True, "return_prefix_tokens": True, "norm": True},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=["token", "avg", "avg-no-class-token", "max"])
def test_forward_intermediates_is_timms(variant: dict) -> None:
    mine, ref = pair(**variant)
    x = images()
    assert mine.feature_info == ref.feature_info  # every block, reduction = patch size
    with torch.no_grad():
        for call in CALLS:
            assert_same(mine.forward_intermediates(x, **call), ref.forward_intermediates(x, **call))
        assert_same(mine(x), ref(x))
        assert_same(mine.forward_features(x), ref.forward_features(x))
        assert_same(
            mine.forward_head(mine.forward_features(x), pre_logits=True),
            ref.forward_head(ref.forward_features(x), pre_logits=True),
        )


def test_forward_intermediates_bad_arguments_are_one_clear_error() -> None:
    mine, _ = pair()
    with pytest.raises(ZooError, match=r"indices \[3\] do not select blocks of this model \(3 blocks\)"):
        mine.forward_intermediates(images(), indices=[3])
    with pytest.raises(ZooError, match="output_fmt must be one of 'NCHW', 'NLC', got 'NHWC'"):
        mine.forward_intermediates(images(), output_fmt="NHWC")


@pytest.mark.parametrize(
    "prune", [{"indices": [0, 1], "prune_norm": True}, {"indices": 1}, {"indices": [0], "prune_head": False}]
)
def test_prune_intermediate_layers_is_timms(prune: dict) -> None:
    mine, ref = pair(global_pool="avg")
    assert mine.prune_intermediate_layers(**prune) == ref.prune_intermediate_layers(**prune)
    assert len(mine.blocks) == len(ref.blocks) and type(mine.norm) is type(ref.norm)
    assert type(mine.head) is type(ref.head) and type(mine.fc_norm) is type(ref.fc_norm)
    x = images()
    with torch.no_grad():
        assert_same(mine(x), ref(x))  # pruned head: every token, unpooled
        keep = prune["indices"] if isinstance(prune["indices"], list) else [len(mine.blocks) - 1]
        assert_same(
            mine.forward_intermediates(x, indices=keep, intermediates_only=True),
            ref.forward_intermediates(x, indices=keep, intermediates_only=True),
        )
    if prune.get("prune_head", True):
        assert (mine.num_classes, mine.hparams.num_classes, mine.global_pool) == (0, 0, "")


@pytest.mark.parametrize("variant", VARIANTS, ids=["token", "avg", "avg-no-class-token", "max"])
@pytest.mark.parametrize(
    "prune",
    [{"indices": 2}, {"indices": [0]}, {"indices": [1], "prune_norm": True}, {"indices": [0], "prune_head": False}],
    ids=["last-2", "first-block", "prune-norm", "keep-head"],
)
def test_pruned_model_round_trips_through_save_pretrained(variant: dict, prune: dict, tmp_path: Path) -> None:
    """hparams after prune_intermediate_layers rebuild exactly the pruned model: its blocks, its pooling and its
    final norms (an average pool's fc_norm pruned with the head leaves no final norm at all: final_norm=False)."""
    mine, _ = pair(**variant)
    mine.prune_intermediate_layers(**prune)
    mine.save_pretrained(tmp_path / "pruned")
    loaded = zoo.from_pretrained(tmp_path / "pruned").eval()
    assert len(loaded.blocks) == len(mine.blocks)
    assert (type(loaded.norm), type(loaded.fc_norm)) == (type(mine.norm), type(mine.fc_norm))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), mine(x), rtol=0, atol=0)


def test_vmoe_pruned_model_round_trips(tmp_path: Path) -> None:
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 8, "depth": 4, "num_heads": 2, "num_experts": 2}
    for moe in ({"moe_blocks": [1, 3]}, {"moe_every": 2}):
        model = zoo.vmoe_tiny_patch32_224(global_pool="avg", **args, **moe).eval()
        model.prune_intermediate_layers([1])
        assert [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, zoo.nn.MoE)] == [1]
        model.save_pretrained(tmp_path / "pruned")
        loaded = zoo.from_pretrained(tmp_path / "pruned").eval()
        assert loaded.moe_indices == model.moe_indices == [1]
        x = images()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("moe", "keep"),
    [({"moe_every": 2}, [0]), ({"moe_blocks": [3]}, [1]), ({"moe_blocks": [2, 3]}, [0, 1])],
    ids=["every-2-depth-1", "explicit-blocks-cut", "explicit-blocks-cut-2"],
)
def test_vmoe_pruned_of_every_moe_block_round_trips(moe: dict, keep: list[int], tmp_path: Path) -> None:
    """Pruning away every MoE block leaves a dense ViT whose hparams (moe_every=2 at depth 1, or moe_blocks past the
    depth) used to be refused when the saved model was rebuilt; it records moe_blocks=[] and rebuilds exactly,
    checked against the pruned model and against a dense SinkformerViT holding the same weights."""
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 8, "depth": 4, "num_heads": 2, "num_experts": 2}
    model = zoo.vmoe_tiny_patch32_224(global_pool="avg", **args, **moe).eval()
    model.prune_intermediate_layers(keep)
    assert model.moe_indices == [] and model.hparams.moe_blocks == []
    assert not any(isinstance(b.mlp, zoo.nn.MoE) for b in model.blocks)
    model.save_pretrained(tmp_path / "pruned")
    loaded = zoo.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.moe_indices == [] and len(loaded.blocks) == max(keep) + 1
    vit_args = {k: v for k, v in args.items() if k != "num_experts"}
    dense = zoo.models.SinkformerViT(n_iter=1, num_classes=0, global_pool="", final_norm=False, **vit_args)
    dense.blocks = dense.blocks[: max(keep) + 1]
    dense.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), dense.eval()(x), rtol=0, atol=0)


def test_final_norm_false_is_timms() -> None:
    mine, ref = pair(global_pool="avg", final_norm=False)
    assert isinstance(mine.norm, torch.nn.Identity) and isinstance(mine.fc_norm, torch.nn.Identity)
    with torch.no_grad():
        assert_same(mine(images()), ref(images()))


@pytest.mark.parametrize("variant", VARIANTS[:2], ids=["token", "avg"])
def test_num_classes_zero_and_unpooled_are_timms(variant: dict) -> None:
    mine, ref = pair(**variant)
    x = images()
    features = zoo.sinkformer_vit_tiny_patch16_224(
        n_iter=1,
        num_classes=0,
        **{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3, **variant},
    ).eval()
    features.load_state_dict({k: v for k, v in mine.state_dict().items() if not k.startswith("head.")})
    # '' with the final norm where the pooled model has it (after the pool for "avg": fc_norm)
    unpooled = SinkformerViT(**{**dict(features.hparams), "global_pool": "", "fc_norm": bool(variant)}).eval()
    unpooled.load_state_dict(features.state_dict())
    with torch.no_grad():
        pre_logits = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert isinstance(features.head, torch.nn.Identity) and features.num_classes == 0
        assert_same(features(x), pre_logits)  # num_classes=0: the pooled features, (B, num_features)
        assert features(x).shape == (2, features.num_features) == (2, features.head_hidden_size)
        tokens = ref.forward_features(x)
        out = unpooled(x)  # global_pool='': every token (B, 1 + patches, embed_dim), as timm's
        assert out.shape == (2, 1 + 16, 48) and torch.equal(out, unpooled.forward_head(unpooled.forward_features(x)))
        if not variant:  # the final norm before the pool: the unpooled output is forward_features'
            assert_same(out, tokens)

        # reset_classifier as timm's, and reset_classifier(0) == forward_head(pre_logits=True)
        for args in ((0,), (0, ""), (0, "avg"), (0, "avgmax"), (5, "token" if "global_pool" not in variant else "max")):
            a, b = pair(**variant)
            a.reset_classifier(*args)
            b.reset_classifier(*args)
            assert type(a.get_classifier()) is type(b.get_classifier()) and a.num_classes == b.num_classes == args[0]
            if args[0] == 0:
                assert_same(a(x), b(x))
                assert_same(a(x), a.forward_head(a.forward_features(x), pre_logits=True))
            else:
                assert a(x).shape == b(x).shape == (2, 5) and a.hparams.num_classes == 5


def test_reset_classifier_keeps_hparams_so_the_model_reloads(tmp_path: Path) -> None:
    model, _ = pair()  # class token pooling, final norm before the pool
    model.reset_classifier(3, "avg")  # timm: the norm stays where it is (before the pool)
    assert model.hparams.global_pool == "avg" and model.hparams.fc_norm is False and model.hparams.num_classes == 3
    assert hasattr(model, "val_acc") and model.val_acc.num_classes == 3
    again = SinkformerViT.from_pretrained(model.save_pretrained(tmp_path / "m"))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(ZooError, match="global_pool='token' needs class_token=True"):
        pair(class_token=False, global_pool="avg")[0].reset_classifier(0, "token")
    with pytest.raises(ZooError, match="num_classes must be an integer >= 0"):
        model.reset_classifier(-1)


# ------------------------------------------------------------------------------------------------ features_only


@pytest.mark.parametrize("builder", ["sinkformer_vit_tiny_patch16_224", "vmoe_tiny_patch32_224"])
def test_features_only_feature_info_matches_the_outputs(builder: str) -> None:
    args = {"img_size": 64, "patch_size": 16, "depth": 4}
    torch.manual_seed(0)
    extractor = zoo.create_model(builder, features_only=True, out_indices=(0, 2, -1), **args).eval()
    torch.manual_seed(0)
    full = zoo.create_model(builder, **args).eval()  # the same weights (same seed), not pruned
    info = extractor.feature_info
    assert info.channels() == [192, 192, 192] and info.reduction() == [16, 16, 16]
    assert info.module_name() == ["blocks.0", "blocks.2", "blocks.3"]
    x = images(2, 64)
    with torch.no_grad():
        outs = extractor(x)
        expected = full.forward_intermediates(x, indices=[0, 2, 3], intermediates_only=True)
    assert len(outs) == 3
    for out, want, chans, red in zip(outs, expected, info.channels(), info.reduction()):
        assert out.shape == (2, chans, 64 // red, 64 // red)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert extractor.pretrained_cfg["input_size"] == (3, 64, 64)
    every = zoo.create_model(builder, features_only=True, **args)  # default: every block
    assert every.feature_info.module_name() == [f"blocks.{i}" for i in range(4)]


# ------------------------------------------------------------------------------------------------ checkpointing


def _grads(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    intermediates: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same stochastic depth / dropout draws in both runs
    if intermediates:
        final, inter = model.forward_intermediates(x, indices=[0, 1])
        loss = final.square().mean() + sum(t.square().mean() for t in inter)
    else:
        loss = F.cross_entropy(model(x), y)
    loss = loss + sum(model.auxiliary_losses().values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "build",
    [
        lambda: zoo.sinkformer_vit_tiny_patch16_224(
            img_size=32,
            patch_size=8,
            embed_dim=48,
            num_heads=3,
            depth=3,
            num_classes=5,
            drop_path_rate=0.2,
            proj_drop_rate=0.1,
        ),
        lambda: zoo.vmoe_tiny_patch32_224(
            img_size=32,
            patch_size=8,
            embed_dim=48,
            num_heads=3,
            depth=3,
            num_classes=5,
            num_experts=4,
            router="token_choice",
            k=2,
            capacity_factor=1.0,
            aux_loss_weight=0.5,
            drop_path_rate=0.2,
        ),
    ],
    ids=["vit", "vmoe-token-choice"],
)
@pytest.mark.parametrize("intermediates", [False, True], ids=["forward", "forward_intermediates"])
def test_grad_checkpointing_gives_the_same_gradients(build, intermediates: bool) -> None:
    torch.manual_seed(0)
    model = randomize(build()).train()
    x, y = images(4), torch.arange(4) % 5
    calls = []
    model.blocks[1].register_forward_pre_hook(lambda *_: calls.append(1))
    loss, grads = _grads(model, x, y, intermediates)
    assert len(calls) == 1
    model.set_grad_checkpointing()
    calls.clear()
    loss_ckpt, grads_ckpt = _grads(model, x, y, intermediates)
    assert len(calls) == 2  # the block ran again in backward: its activations were not kept
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    unused = {"head.weight", "head.bias"} if intermediates else set()  # forward_intermediates has no head
    assert set(grads) == {n for n, _ in model.named_parameters()} - unused  # the routers' included
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0, msg=name)
    model.set_grad_checkpointing(False)
    with pytest.raises(ZooError, match="enable must be True or False"):
        model.set_grad_checkpointing("yes")


# ------------------------------------------------------------------------------------------------ data config


def test_data_config_is_the_model_as_built() -> None:
    cases = [
        (zoo.sinkformer_vit_tiny_patch16_224(img_size=64, depth=1), (3, 64, 64), (0.5,) * 3),
        (zoo.vmoe_tiny_patch32_224(img_size=(64, 96), depth=2), (3, 64, 96), (0.5,) * 3),
        (zoo.sinkformer_vit_mnist(patch_size=4), (1, 28, 28), (0.1307,)),
        (
            SinkformerViT(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2),
            (1, 16, 16),
            (0.5,),
        ),  # built from the class (LightningCLI): the family's defaults, one channel
    ]
    for model, size, mean in cases:
        assert model.default_cfg is model.pretrained_cfg
        config = timm.data.resolve_data_config({}, model=model)
        assert config["input_size"] == size and tuple(config["mean"]) == mean
        assert len(config["std"]) == size[0]
        transform = timm.data.create_transform(**config)
        # eval transform: shorter side resized to floor(size / crop_pct), centre crop to the model's size
        resize, crop = transform.transforms[:2]
        crop_pct = model.pretrained_cfg["crop_pct"]
        scaled = tuple(math.floor(s / crop_pct) for s in size[1:])
        assert tuple(crop.size) == size[1:]
        assert resize.size in (scaled[0], scaled) if size[1] == size[2] else tuple(resize.size) == scaled
        picture = Image.new("RGB" if size[0] == 3 else "L", (150, 110), color=90)
        batch = transform(picture).unsqueeze(0)
        assert batch.shape == (1, *size)
        with torch.no_grad():
            assert model.eval()(batch).shape == (1, model.num_classes)


# ------------------------------------------------------------------------------------------------ the table


def test_timm_sourced_tags_match_timms_own_table() -> None:
    names = zoo.list_pretrained("sinkformer_vit_*") + zoo.list_pretrained("vmoe_*")
    sourced = [n for n in names if zoo.get_pretrained_cfg(n).source]
    assert len(sourced) == 7 and set(sourced) <= set(vit_module.default_cfgs) | set(vmoe_module.default_cfgs)
    assert zoo.get_pretrained_cfg("sinkformer_vit_small_patch16_224").tag == "augreg_in21k_ft_in1k"  # the default
    for name in sourced:
        cfg = zoo.get_pretrained_cfg(name)
        source = cfg.source.removeprefix("hf-hub:timm/")
        assert source in timm.list_pretrained(), name  # the tag exists in timm's own table
        theirs = timm.models.get_pretrained_cfg(source)
        for key in (
            "input_size",
            "crop_pct",
            "interpolation",
            "mean",
            "std",
            "num_classes",
            "license",
            "first_conv",
            "classifier",
            "fixed_input_size",
            "crop_mode",
        ):
            assert getattr(cfg, key) == getattr(theirs, key), (name, key)
        assert cfg.hf_hub_id == theirs.hf_hub_id and cfg.source == f"hf-hub:{theirs.hf_hub_id}"
        assert cfg.metrics["imagenet-1k/top1"]["of"] == "source" and cfg.conversion
        # the architectures have timm's shapes (the V-MoE: once its MLPs are upcycled)
        with torch.device("meta"):
            mine = zoo.create_model(name)
            dense = timm.create_model(theirs.architecture)
        ours = {k: v.shape for k, v in mine.state_dict().items()}
        assert ours == {k: v.shape for k, v in mine.adapt_state_dict(dense.state_dict(), None).items()}, name
        assert isinstance(mine, VisionMoE) or ours == {k: v.shape for k, v in dense.state_dict().items()}


def test_published_configurations_without_weights() -> None:
    published = {  # (tag, number of classes, published accuracies of the model) from the papers
        "sinkformer_vit_cats_dogs.sinkformers_paper": (2, {"cats-vs-dogs/top1": 79.5}),
        "sinkformer_vit_mnist.sinkformers_paper": (10, {}),
        "vmoe_small_patch32_224.relaxed_topk_jft300m": (18291, {}),
    }
    for name, (classes, metrics) in published.items():
        cfg = zoo.get_pretrained_cfg(name)
        assert cfg.source is None and cfg.num_classes == classes and cfg.recipe is None
        assert {k: m["value"] for k, m in cfg.metrics.items()} == metrics
        assert all(m["kind"] == "published" and m["of"] == "model" for m in cfg.metrics.values())
        with pytest.raises(ZooError, match=f"{name} is a published configuration without weights"):
            zoo.create_model(name, pretrained=True)
        model = zoo.create_model(name, **({"depth": 2, "num_experts": 2} if "vmoe" in name else {}))
        assert model.pretrained_cfg["tag"] == name.split(".")[1]
        assert model.pretrained_cfg.get("metrics", {}) == cfg.metrics
    relaxed = zoo.create_model("vmoe_small_patch32_224.relaxed_topk_jft300m", depth=2, num_experts=2)
    assert relaxed.blocks[1].mlp.topk == "soft"  # the tag's model_args
    # another architecture than the published one: the published accuracy no longer applies
    transformer = zoo.create_model("sinkformer_vit_cats_dogs", n_iter=1)
    assert transformer.pretrained_cfg.get("metrics", {}) == {} and "n_iter" in transformer.pretrained_cfg["notes"][-1]
    with pytest.raises(ZooError, match="vmoe_tiny_patch32_224 has no pretrained weights"):
        zoo.vmoe_tiny_patch32_224(pretrained=True)


# ------------------------------------------------------------------------------------------------ pretrained=True


def test_pretrained_true_loads_timms_weights_from_the_hf_cache() -> None:
    torch.manual_seed(0)
    ref = randomize(timm.create_model("vit_tiny_patch16_224", depth=2)).eval()  # timm's cfg, 2 blocks (small file)
    seed_hf_hub_cache("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", ref.state_dict())
    x = images(1, 224)
    with torch.no_grad():
        expected = ref(x)
        same = zoo.create_model(
            "sinkformer_vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True, depth=2, n_iter=1
        ).eval()
        assert_same(same(x), expected)  # n_iter=1: timm's model exactly
        assert same.pretrained_cfg["source"] == "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
        sinkformer = zoo.sinkformer_vit_tiny_patch16_224(pretrained=True, depth=2).eval()  # default tag, n_iter=3
        assert sinkformer.pretrained_cfg["tag"] == "augreg_in21k_ft_in1k" and sinkformer.pretrained_cfg["conversion"]
        assert torch.equal(sinkformer.blocks[1].attn.qkv.weight, ref.blocks[1].attn.qkv.weight)
        assert (sinkformer(x) - expected).abs().max() > 1e-3  # another function until fine-tuned
        features = zoo.sinkformer_vit_tiny_patch16_224(pretrained=True, depth=2, num_classes=0, n_iter=1).eval()
        assert_same(features(x), ref.forward_head(ref.forward_features(x), pre_logits=True))
        small = zoo.sinkformer_vit_tiny_patch16_224(pretrained=True, depth=2, num_classes=10, img_size=32)
        assert small.pretrained_cfg["input_size"] == (3, 32, 32) and small.pretrained_cfg["num_classes"] == 10
        assert small.head.weight.shape == (10, 192) and small.pos_embed.shape == (1, 5, 192)  # resampled grid
        assert small(images(1, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    "dense_settings",
    [
        {"router": "expert_choice", "group_size": None, "capacity_factor": None},
        {"router": "token_choice", "k": 2, "normalize_gates": True, "capacity_factor": None},
    ],
    ids=["expert_choice", "token_choice"],
)
def test_vmoe_pretrained_upcycles_timms_dense_weights_exactly_in_the_dense_settings(dense_settings: dict) -> None:
    torch.manual_seed(0)
    ref = randomize(timm.create_model("vit_small_patch32_224", depth=2)).eval()
    seed_hf_hub_cache("timm/vit_small_patch32_224.augreg_in21k_ft_in1k", ref.state_dict())
    x = images(2, 224)
    model = zoo.vmoe_small_patch32_224(pretrained=True, depth=2, num_experts=4, **dense_settings).eval()
    moe = model.blocks[1].mlp
    assert torch.count_nonzero(moe.router.weight) == 0
    assert all(torch.equal(moe.experts.fc1.weight[e], ref.blocks[1].mlp.fc1.weight) for e in range(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
        sparse = zoo.vmoe_small_patch32_224(pretrained=True, depth=2, num_experts=4).eval()  # k=28 of 400 tokens
        assert (sparse(x) - ref(x)).abs().max() > 1e-3
    assert model.pretrained_cfg["source"] == "hf-hub:timm/vit_small_patch32_224.augreg_in21k_ft_in1k"
    assert "upcycled" in model.pretrained_cfg["conversion"]


def test_published_recipes_exist() -> None:
    for cfgs in (vit_module.default_cfgs, vmoe_module.default_cfgs):
        for name, cfg in cfgs.items():
            assert cfg.recipe is None or (RECIPES / f"{cfg.recipe}.yaml").is_file(), name
