"""Argument validation (zoo.validation): the checkers themselves, and every family's builders and tasks giving one
ZooError that names the bad argument (issue 13: bad values used to pass silently, truncated or with raw errors)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import zoo
from zoo import validation as v
from zoo.errors import ZooError

NAN, INF = float("nan"), float("inf")


def raises_naming(name: str):
    """One ZooError whose message starts with '<name> must be'."""
    return pytest.raises(ZooError, match=rf"^{re.escape(name)} must be .+, got .+; .+")


# ------------------------------------------------------------------------------------------------ the issue's examples


@pytest.mark.parametrize(
    ("build", "kwargs", "name"),
    [
        (zoo.cifar_resnet, {"layers": "111"}, "layers"),  # was (1, 1, 1)
        (zoo.cifar_resnet, {"layers": (1.7, 1, 1)}, "layers"),  # was truncated to (1, 1, 1)
        (zoo.tiny, {"depth": "3"}, "depth"),  # was int('3')
        (zoo.cifar_resnet, {"drop_path_rate": -1}, "drop_path_rate"),
        (zoo.cifar_resnet, {"label_smoothing": 2}, "label_smoothing"),
        (zoo.cifar_resnet, {"in_chans": "3"}, "in_chans"),  # was a raw torch error
    ],
    ids=["layers-str", "layers-float", "tiny-depth-str", "drop_path_rate", "label_smoothing", "in_chans-str"],
)
def test_issue_examples_give_one_clear_error(build, kwargs: dict, name: str) -> None:
    with raises_naming(name):
        build(**kwargs)


# ------------------------------------------------------------------------------------------------ every family

# builder, argument, bad value: each must give a ZooError naming the argument before anything is built
FAMILY_CASES = [
    # ResNet family (all four classes share the constructor)
    ("cifar_resnet", "layers", (2, 0, 2)),
    ("momentum_cifar_resnet", "layers", []),
    ("heun_cifar_resnet", "layers", 3),
    ("heun_resnet18", "widths", (8, 8)),
    ("heun_resnet18", "widths", (8, 16, 32, 64.5)),
    ("depth_scaled_resnet18", "in_chans", 0),
    ("depth_scaled_resnet18", "in_chans", True),
    ("resnet18", "drop_rate", 1.0),
    ("resnet18", "drop_path_rate", NAN),
    ("resnet18", "scale", -1.0),
    ("resnet18", "scale", INF),
    ("resnet18", "scale", "width"),
    ("ResNet", "block", "wide"),
    ("ResNet", "stem", 3),
    ("resnet18", "rule", "rk4"),
    ("resnet18", "memory", "offload"),
    ("momentum_resnet18", "gamma", 1.0),
    ("momentum_resnet18", "gamma", NAN),
    ("momentum_resnet18", "init_velocity", "one"),
    ("resnet18", "tied", [0]),
    ("resnet18", "tied", "yes"),
    ("resnet18", "zero_init_last", "no"),
    ("momentum_cifar_resnet", "layers", (3.0, 3, 3)),  # integral floats are refused too (strict)
    ("heun_tiny", "depth", 0),
    ("depth_scaled_tiny", "depth", 2.5),
    ("momentum_tiny", "depth", True),
    # ImageClassifier (through the builders of every image family)
    ("resnet20_cifar", "label_smoothing", -0.1),
    ("resnet20_cifar", "label_smoothing", NAN),
    ("resnet20_cifar", "num_classes", -1),  # 0 is timm's features model
    ("resnet20_cifar", "num_classes", 10.0),
    ("resnet20_cifar", "optimizer", "lamb"),  # the former string form: the error shows the callable form
    ("resnet20_cifar", "lr_scheduler", "poly"),
    # SinkformerViT
    ("sinkformer_vit_tiny_patch16_224", "img_size", "224"),
    ("sinkformer_vit_tiny_patch16_224", "img_size", (224,)),
    ("sinkformer_vit_tiny_patch16_224", "img_size", 224.0),
    ("sinkformer_vit_tiny_patch16_224", "patch_size", 0),
    ("sinkformer_vit_tiny_patch16_224", "in_chans", "3"),
    ("sinkformer_vit_tiny_patch16_224", "embed_dim", 192.0),
    ("sinkformer_vit_tiny_patch16_224", "depth", "3"),
    ("sinkformer_vit_tiny_patch16_224", "num_heads", True),
    ("sinkformer_vit_tiny_patch16_224", "mlp_ratio", -1),
    ("sinkformer_vit_tiny_patch16_224", "mlp_ratio", NAN),
    ("sinkformer_vit_tiny_patch16_224", "attn_head_dim", 0),
    ("sinkformer_vit_tiny_patch16_224", "init_values", NAN),
    ("sinkformer_vit_tiny_patch16_224", "qkv_bias", "false"),
    ("sinkformer_vit_tiny_patch16_224", "class_token", 1),
    ("sinkformer_vit_tiny_patch16_224", "drop_path_rate", -1),
    ("sinkformer_vit_tiny_patch16_224", "attn_drop_rate", 1.5),
    ("sinkformer_vit_mnist", "pos_drop_rate", NAN),
    ("sinkformer_vit_mnist", "proj_drop_rate", 1.0),
    ("sinkformer_vit_cats_dogs", "global_pool", "map"),
    # VisionMoE
    ("vmoe_tiny_patch32_224", "num_experts", 0),
    ("vmoe_tiny_patch32_224", "num_experts", 8.0),
    ("vmoe_tiny_patch32_224", "moe_blocks", "1"),
    ("vmoe_tiny_patch32_224", "moe_blocks", (1, -1)),
    ("vmoe_tiny_patch32_224", "moe_every", 0),
    ("vmoe_tiny_patch32_224", "aux_loss_weight", NAN),
    ("vmoe_tiny_patch32_224", "depth", 2.5),
    # SetTransformer
    ("set_transformer_modelnet40", "embed_dim", "256"),
    ("set_transformer_modelnet40", "num_heads", 0),
    ("set_transformer_modelnet40", "depth", 1.5),
    ("set_sinkformer_modelnet40", "decoder_depth", -1),
    ("set_sinkformer_modelnet40", "num_seeds", True),
    ("set_transformer_modelnet40", "in_chans", "3"),
    ("set_transformer_modelnet40", "drop_rate", -0.1),
    ("set_transformer_modelnet40", "layer_norm", 1),
    # PointCloudTransformer
    ("point_cloud_transformer", "sample_points", "512"),
    ("point_cloud_transformer", "sample_points", (512.0, 256)),
    ("point_cloud_transformer", "head_dims", (512, 0)),
    ("point_cloud_transformer", "num_neighbors", 0),
    ("point_cloud_transformer", "in_chans", 2),
    ("point_cloud_sinkformer", "drop_rate", NAN),
    ("point_cloud_sinkformer", "fuse_dim", 1024.0),
    ("point_cloud_transformer", "attention", "linear"),
    ("point_cloud_transformer", "label_smoothing", 2),
    # SinkformerTranslation and the TranslationTask
    ("sinkformer_transformer_toy", "src_vocab_size", 64.0),
    ("sinkformer_transformer_toy", "tgt_vocab_size", 3),
    ("sinkformer_transformer_toy", "encoder_layers", -1),
    ("sinkformer_transformer_toy", "decoder_layers", 1.5),
    ("sinkformer_transformer_toy", "encoder_embed_dim", "64"),
    ("sinkformer_transformer_toy", "decoder_ffn_embed_dim", 0),
    ("sinkformer_transformer_toy", "decoder_attention_heads", 2.0),
    ("sinkformer_transformer_toy", "max_source_positions", 0),
    ("sinkformer_transformer_toy", "dropout", 1.0),
    ("sinkformer_transformer_toy", "attention_dropout", -0.5),
    ("sinkformer_transformer_toy", "activation_dropout", NAN),
    ("sinkformer_transformer_toy", "encoder_normalize_before", "false"),
    ("sinkformer_transformer_toy", "activation_fn", "swish"),
    ("sinkformer_transformer_toy", "label_smoothing", 1.0),
    ("sinkformer_transformer_toy", "beam", 0),
    ("sinkformer_transformer_toy", "eval_bleu", "yes"),
    ("sinkformer_transformer_toy", "eval_bleu_every_n_epochs", 0),
    ("sinkformer_transformer_toy", "lenpen", NAN),
    ("sinkformer_transformer_toy", "max_len_a", -1.0),
    ("sinkformer_transformer_toy", "max_len_b", -1),
    ("sinkformer_transformer_toy", "min_len", 1.5),
    ("transformer_iwslt_de_en", "unk_penalty", INF),
]


@pytest.mark.parametrize(
    ("builder", "name", "value"), FAMILY_CASES, ids=[f"{b}-{n}={val!r}" for b, n, val in FAMILY_CASES]
)
def test_every_family_refuses_bad_arguments_by_name(builder: str, name: str, value) -> None:
    build = getattr(zoo.models, builder) if builder[0].isupper() else zoo.registry.model_entrypoint(builder)
    with raises_naming(name):
        build(**{name: value})


SCHEDULE_CASES = [
    ("WarmupCosineLR", "warmup_epochs", -1),
    ("WarmupCosineLR", "warmup_epochs", NAN),
    ("WarmupCosineLR", "warmup_steps", 1.5),
    ("WarmupCosineLR", "min_lr_ratio", 2.0),
    ("WarmupCosineLR", "total_steps", 0),
    ("InverseSqrtLR", "warmup_updates", -1),
    ("InverseSqrtLR", "warmup_updates", 4000.0),
    ("InverseSqrtLR", "warmup_init_lr", NAN),
]


@pytest.mark.parametrize(
    ("schedule", "name", "value"), SCHEDULE_CASES, ids=[f"{c}-{n}={val!r}" for c, n, val in SCHEDULE_CASES]
)
def test_schedules_refuse_bad_arguments_by_name(schedule: str, name: str, value) -> None:
    import torch

    from zoo.tasks import optim

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with raises_naming(name):
        getattr(optim, schedule)(opt, **{name: value})


def test_good_values_of_other_types_are_accepted() -> None:
    """numpy integers and floats, lists for tuples, ints for floats: what configs, hparams files and numpy give."""
    m = zoo.cifar_resnet(
        layers=[np.int64(1), 2, 1],
        widths=np.array([4, 8, 8]).tolist(),
        label_smoothing=1,
        drop_path_rate=np.float64(0.1),
        tied=[2],
        in_chans=np.int32(1),
    )
    assert m.layer_counts == (1, 2, 1) and m.conv1.in_channels == 1
    vit = zoo.sinkformer_vit_mnist(img_size=[28, 14], patch_size=7, depth=np.int64(1))
    assert vit.patch_embed.grid_size == (4, 2)


# ------------------------------------------------------------------------------------------------ the checkers


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 3.0, 1.7, "3", None, [3], NAN])
def test_integer_is_strict(value) -> None:
    with raises_naming("n"):
        v.positive_int("n", value)


def test_integer_bounds_and_types() -> None:
    assert v.positive_int("n", np.int64(5)) == 5 and type(v.positive_int("n", np.int64(5))) is int
    assert v.non_negative_int("n", 0) == 0
    assert v.integer("n", 7, 3, 7) == 7
    for bad in (2, 8):
        with pytest.raises(ZooError, match=r"^n must be an integer in \[3, 7\], got"):
            v.integer("n", bad, 3, 7)
    with pytest.raises(ZooError, match=r"give the integer 3, not the float 3\.0"):
        v.positive_int("n", 3.0)


@pytest.mark.parametrize("value", ["111", b"11", 3, {1, 2}, {1: 1}, (1, 0), (1, True), (1, 2.0), (), None])
def test_int_sequence_is_strict(value) -> None:
    with raises_naming("layers"):
        v.int_sequence("layers", value)


def test_int_sequence_options() -> None:
    assert v.int_sequence("m", [0, 3], min_value=0) == (0, 3)
    assert v.int_sequence("m", (), allow_empty=True) == ()
    assert v.int_sequence("w", [np.int64(2), 3], length=2) == (2, 3)
    with pytest.raises(ZooError, match=r"^w must be a list of 3 integers >= 1, got \(2, 3\)"):
        v.int_sequence("w", (2, 3), length=3)


@pytest.mark.parametrize("value", [NAN, INF, -INF, True, "0.1", None, [0.1]])
def test_finite_float_refuses_non_finite_and_non_numbers(value) -> None:
    with raises_naming("x"):
        v.finite_float("x", value)


def test_finite_float_interval_ends() -> None:
    assert v.finite_float("x", 0, 0.0) == 0.0 and type(v.finite_float("x", 1, 0.0)) is float
    with pytest.raises(ZooError, match=r"^x must be a finite number > 0, got 0"):
        v.finite_float("x", 0, 0.0, low_open=True)
    assert v.finite_float("x", 1, 0.0, 1.0) == 1.0
    with pytest.raises(ZooError, match=r"in \[0, 1\)"):
        v.finite_float("x", 1, 0.0, 1.0, high_open=True)
    assert v.probability("p", 0) == 0.0 and v.probability("p", 0.999) == 0.999
    for bad in (1, -1e-9, NAN):
        with raises_naming("p"):
            v.probability("p", bad)


def test_pair_choice_boolean_image_size() -> None:
    assert v.pair_in_unit_interval("betas", [0, 0.5]) == (0.0, 0.5)
    for bad in ((0.9, 1), (0.9,), (0.9, 0.9, 0.9), "ab", (NAN, 0.9), (True, 0.9)):
        with raises_naming("betas"):
            v.pair_in_unit_interval("betas", bad)
    assert v.choice("c", "a", ("a", "b")) == "a"
    with pytest.raises(ZooError, match=r"^c must be one of 'a', 'b', got 'A' \(str\); choose one of 'a', 'b'$"):
        v.choice("c", "A", ("a", "b"))
    assert v.boolean("b", np.bool_(False)) is False
    for bad in (0, 1, "true", None):
        with raises_naming("b"):
            v.boolean("b", bad)
    assert v.image_size("s", 32) == (32, 32) and v.image_size("s", [32, 16]) == (32, 16)
    for bad in (0, (32, 0), (32, 16, 8), 32.0, "32"):
        with raises_naming("s"):
            v.image_size("s", bad)
    assert v.optional(v.positive_int, "n", None) is None and v.optional(v.positive_int, "n", 2) == 2


def test_message_shows_value_type_and_a_fix() -> None:
    with pytest.raises(ZooError) as info:
        v.int_sequence("layers", (1.7, 1, 1))
    text = str(info.value)
    assert text.startswith("layers must be a non-empty list of integers >= 1, got (1.7, 1, 1) (tuple); ")
    assert "entry 0 is 1.7 (float)" in text and "never truncated" in text
