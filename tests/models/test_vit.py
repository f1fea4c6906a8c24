"""The Sinkformer ViT family (zoo/models/vit.py): timm's names and, at n_iter=1, timm's function; timm weights
from files and hf-hub (resampled position embedding, new head); the published configurations; training,
saving and reloading; column-sum statistics; errors. CPU, random weights, no network."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import timm
import torch
from helpers import seed_hf_hub_cache
from timm.layers import resample_abs_pos_embed
from torch.utils.data import DataLoader, TensorDataset

import zoo
from zoo.errors import ZooError
from zoo.models import SinkformerViT

BUILDERS = [
    "sinkformer_vit_tiny_patch16_224",
    "sinkformer_vit_small_patch16_224",
    "sinkformer_vit_base_patch16_224",
    "sinkformer_vit_cats_dogs",
    "sinkformer_vit_mnist",
]


def images(n: int = 2, size: int = 32, chans: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


def timm_vit(name: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **{"img_size": 32, "num_classes": 7, "depth": 3, **kwargs}).eval()
    with torch.no_grad():  # timm initialises biases and layer norms to constants: randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_builders_registered_with_timm_sizes() -> None:
    assert set(BUILDERS) <= set(zoo.list_models("sinkformer_*"))
    assert set(BUILDERS) <= set(zoo.models.__all__)
    for name, (dim, heads) in {
        "sinkformer_vit_tiny_patch16_224": (192, 3),
        "sinkformer_vit_small_patch16_224": (384, 6),
    }.items():
        mine = zoo.create_model(name, img_size=32, depth=2)
        ref = timm.create_model(name.removeprefix("sinkformer_"), img_size=32, depth=2)
        assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert mine.embed_dim == dim and mine.blocks[0].attn.num_heads == heads and mine.hparams.n_iter == 3
    assert zoo.sinkformer_vit_base_patch16_224.__doc__ and "768" in zoo.sinkformer_vit_base_patch16_224.__doc__


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"global_pool": "avg"},
        {"qk_norm": True, "init_values": 0.1},
        {"class_token": False, "global_pool": "avg", "qkv_bias": False},
    ],
)
def test_one_iteration_is_timms_function_with_timms_weights(variant: dict) -> None:
    ref = timm_vit(**variant)
    mine = zoo.sinkformer_vit_tiny_patch16_224(img_size=32, num_classes=7, depth=3, n_iter=1, **variant).eval()
    mine.load_state_dict(ref.state_dict())  # strict: the same names
    x = images()
    with torch.no_grad():
        assert close(mine(x), ref(x))
        mine.set_n_iter(3)
        assert not close(mine(x), ref(x), 1e-3)


def test_timm_weights_from_files_and_hf_hub_resampled_and_new_head(tmp_path) -> None:
    ref = timm_vit(img_size=64, num_classes=10, depth=2)
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "vit.pth")
    seed_hf_hub_cache("timm/vit_tiny_patch16_224.fake", sd)
    expected_pos = resample_abs_pos_embed(sd["pos_embed"], new_size=[2, 2], old_size=[4, 4], num_prefix_tokens=1)
    for weights in (str(tmp_path / "vit.pth"), "hf-hub:timm/vit_tiny_patch16_224.fake"):
        mine = zoo.sinkformer_vit_tiny_patch16_224(img_size=32, depth=2, num_classes=5, weights=weights)
        assert torch.equal(mine.pos_embed, expected_pos)
        assert torch.equal(mine.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
        assert mine.head.weight.shape == (5, 192)  # another label set: head re-initialised
    same = zoo.sinkformer_vit_tiny_patch16_224(
        img_size=64, depth=2, num_classes=10, n_iter=1, weights=str(tmp_path / "vit.pth")
    ).eval()
    x = images(size=64)
    with torch.no_grad():
        assert close(same(x), ref(x))


def test_mnist_model_one_block_one_head_no_mlp_any_patch_size() -> None:
    for patch in (1, 4, 7, 14, 28):
        model = zoo.sinkformer_vit_mnist(patch_size=patch)
        assert len(model.blocks) == 1 and model.blocks[0].attn.num_heads == 1 and model.blocks[0].mlp is None
        assert not any(".mlp." in k or ".norm2." in k for k in model.state_dict())
        assert model.pos_embed.shape[1] == (28 // patch) ** 2 + 1
        assert model(images(2, 28, 1)).shape == (2, 10)
    with pytest.raises(ZooError, match="not a multiple of patch_size 5"):
        zoo.sinkformer_vit_mnist(patch_size=5)


def test_cats_dogs_configuration_of_the_published_experiment() -> None:
    model = zoo.sinkformer_vit_cats_dogs()
    hp = model.hparams
    assert (hp.depth, hp.num_heads, hp.patch_size, hp.embed_dim, hp.num_classes) == (6, 8, 16, 128, 2)
    assert model.blocks[0].attn.head_dim == 64 and model.blocks[0].mlp.fc1.out_features == 128
    assert hp.n_iter == 3 and not {"optimizer", "lr", "lr_scheduler", "weight_decay"} & set(hp)
    opt = model.configure_optimizers()  # the published training: Adam lr 5e-5, constant (no schedule)
    assert type(opt) is torch.optim.Adam and {g["lr"] for g in opt.param_groups} == {5e-5}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0}
    mnist = zoo.sinkformer_vit_mnist().configure_optimizers(total_steps=10)["optimizer"]
    assert type(mnist) is torch.optim.Adam and mnist.defaults["lr"] == 5e-4
    plain = zoo.sinkformer_vit_tiny_patch16_224(img_size=32, depth=1).configure_optimizers(total_steps=10)
    assert type(plain["optimizer"]) is torch.optim.AdamW and plain["optimizer"].defaults["lr"] == 5e-4
    assert plain["optimizer"].defaults["weight_decay"] == 0.05  # SinkformerViT.default_optimizer
    small = zoo.sinkformer_vit_cats_dogs(img_size=64, num_classes=3, n_iter=5)
    assert small(images(2, 64)).shape == (2, 3) and small.blocks[5].attn.n_iter == 5


def test_trains_saves_and_reloads(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    model = zoo.sinkformer_vit_mnist(
        patch_size=7, img_size=28, optimizer=functools.partial(torch.optim.Adam, lr=3e-3), lr_scheduler=None
    )
    x, y = images(16, 28, 1), torch.arange(16) % 10
    before = model.loss(model(x), y).item()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert model.loss(out, y).item() < before
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    saved = model.save_pretrained(tmp_path / "m")
    for reloaded in (
        SinkformerViT.load_from_checkpoint(ckpt),
        zoo.from_pretrained(saved),
        zoo.sinkformer_vit_mnist(patch_size=7, weights=str(ckpt)),
    ):
        with torch.no_grad():
            assert close(reloaded.eval()(x), out)
    model.set_n_iter(5)
    assert SinkformerViT.from_pretrained(model.save_pretrained(tmp_path / "m5.safetensors")).blocks[0].attn.n_iter == 5


def test_attention_stats_per_layer() -> None:
    model = zoo.sinkformer_vit_tiny_patch16_224(img_size=32, depth=3, record_stats=True, n_iter=1)
    assert model.attention_stats() == {}
    model(images())
    stats = model.attention_stats()
    assert list(stats) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert all(t.dim() == 0 and not t.requires_grad for s in stats.values() for t in s.values())
    model.set_record_stats(False)
    assert model.attention_stats() == {} and model.hparams.record_stats is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_iter": 0}, "n_iter must be an integer >= 1"),
        ({"n_iter": 2.0}, "n_iter must be an integer >= 1"),
        (
            {"global_pool": "map"},
            "global_pool must be one of 'token', 'avg', 'avgmax', 'max', '', got 'map'.*attention pools",
        ),
        ({"class_token": False}, "global_pool='token' needs class_token=True"),
        ({"patch_size": 10}, "not a multiple of patch_size 10"),
        ({"optimizer": "adamw"}, "optimizer must be a callable that builds the optimizer"),
        ({"lr": 1e-3, "weight_decay": 0.1}, "lr, weight_decay are training settings, not arguments of SinkformerViT"),
        ({"num_classes": -1}, "num_classes must be an integer >= 0"),
        ({"fc_norm": "yes"}, "fc_norm must be True or False"),
    ],
)
def test_bad_options_are_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ZooError, match=message):
        zoo.sinkformer_vit_tiny_patch16_224(img_size=32, depth=1, **kwargs)


def test_recorded_column_sums_are_logged_in_training() -> None:
    """With record_stats=True the task logs the attentions' column sums (train_attention/colsum_dev, _min, _max:
    the mean of the per-attention deviations and the extremes of attention_stats); a V-MoE logs them beside its
    routing statistics; without record_stats nothing is added."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))
    small = dict(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    model = SinkformerViT(**small, n_iter=2, record_stats=True)  # even n_iter ends on columns: sums away from 1
    with torch.no_grad():
        model(x)
    stats = model.attention_stats()
    logged = model.diagnostics()
    assert len(stats) == 2
    want_dev = sum(float(s["dev"]) for s in stats.values()) / 2
    assert float(logged["attention/colsum_dev"]) == pytest.approx(want_dev, rel=1e-6)
    assert float(logged["attention/colsum_min"]) == min(float(s["min"]) for s in stats.values())
    assert float(logged["attention/colsum_max"]) == max(float(s["max"]) for s in stats.values())
    assert SinkformerViT(**small, n_iter=2).diagnostics() == {}
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert {"train_attention/colsum_dev", "train_attention/colsum_min"} <= set(trainer.logged_metrics)
    moe = zoo.models.VisionMoE(**small, num_experts=2, n_iter=2, record_stats=True)
    with torch.no_grad():
        moe(x)
    assert {"attention/colsum_dev", "moe/dropped_fraction"} <= set(moe.diagnostics())
