"""Builders given zoo weights build the head the weights record (issue 13: a folder or checkpoint fine-tuned with 10
classes silently gave 1000 classes and dropped the fine-tuned head). timm's behaviour for pretrained configs: without
an explicit ``num_classes`` the recorded one is built; an explicit other one re-initialises the head, as before."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning
import lightning.pytorch as pl
import pytest
import torch
from helpers import randomize_batchnorm
from torch.utils.data import DataLoader, TensorDataset

import zoo

# builder, small architecture arguments (given again when loading), the fine-tuned class count, an input
FAMILIES = {
    "momentum_resnet18": ({"widths": (4, 4, 8, 8)}, 10, (2, 3, 16, 16)),
    "resnet50": ({"widths": (2, 2, 4, 4)}, 7, (2, 3, 16, 16)),
    "heun_resnet20_cifar": ({"layers": (2, 1, 1), "widths": (4, 4, 4)}, 3, (2, 3, 8, 8)),  # default 10 -> 3
    "depth_scaled_tiny": ({"depth": 2, "widths": (4,)}, 4, (2, 3, 12, 12)),
    "sinkformer_vit_tiny_patch16_224": (
        {"img_size": 16, "patch_size": 8, "embed_dim": 12, "depth": 1, "num_heads": 2},
        10,
        (2, 3, 16, 16),
    ),
    "sinkformer_vit_mnist": ({"embed_dim": 8, "attn_head_dim": 4}, 3, (2, 1, 28, 28)),  # default 10 -> 3
    "vmoe_tiny_patch32_224": (
        {
            "img_size": 16,
            "patch_size": 8,
            "embed_dim": 8,
            "depth": 2,
            "num_heads": 2,
            "num_experts": 2,
            "capacity_factor": None,
        },
        10,
        (2, 3, 16, 16),
    ),
    "set_transformer_modelnet40": ({"embed_dim": 8, "num_heads": 2, "num_inducing": 2, "depth": 1}, 5, (2, 6, 3)),
    "point_cloud_transformer": (
        {"embed_dim": 4, "sample_points": (8, 4), "num_neighbors": 4, "depth": 1, "fuse_dim": 8, "head_dims": (8,)},
        5,
        (2, 16, 3),
    ),
}


def fine_tuned(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    arch, classes, shape = FAMILIES[name]
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=classes, **arch)
    randomize_batchnorm(model, seed=1)
    with torch.no_grad():  # a head unlike any fresh initialisation
        head = model.fc if hasattr(model, "fc") else model.head
        head.weight.normal_(generator=torch.Generator().manual_seed(2))
    return model.eval(), torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def mimic_lightning_checkpoint(model: pl.LightningModule, path: Path) -> None:
    """What Trainer.save_checkpoint writes that matters here: state_dict, hyper_parameters and the version."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
            "epoch": 0,
            "global_step": 1,
        },
        path,
    )


@pytest.mark.parametrize("target", ["folder", "model.safetensors", "last.ckpt"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_builder_builds_the_recorded_head(tmp_path: Path, name: str, target: str) -> None:
    source, x = fine_tuned(name)
    arch, classes, _ = FAMILIES[name]
    path = tmp_path / target
    if target.endswith(".ckpt"):
        mimic_lightning_checkpoint(source, path)
    else:
        source.save_pretrained(path)
    assert zoo.hub.recorded_num_classes(path) == classes
    loaded = zoo.create_model(name, weights=str(path), **arch).eval()
    assert loaded.hparams.num_classes == classes
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))  # the fine-tuned head, exactly
    # an explicit other num_classes: the head is re-initialised, the rest loads (as before)
    other = zoo.create_model(name, weights=str(path), num_classes=classes + 1, **arch)
    head = "fc" if hasattr(other, "fc") else "head"
    assert getattr(other, head).out_features == classes + 1
    mine, theirs = other.state_dict(), source.state_dict()
    body = [k for k in theirs if not k.startswith(f"{head}.")]
    assert body and all(torch.equal(mine[k], theirs[k]) for k in body)


def test_head_from_a_real_lightning_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.resnet18(
        num_classes=10,
        widths=(4, 4, 8, 8),
        lr_scheduler=None,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "fine.ckpt")
    loaded = zoo.resnet18(weights=str(tmp_path / "fine.ckpt"), widths=(4, 4, 8, 8)).eval()
    assert loaded.fc.out_features == 10
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_weights_that_record_no_head_keep_the_builder_default(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = zoo.resnet18(widths=(4, 4, 8, 8), num_classes=10)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")  # a bare state dict records no num_classes
    assert zoo.hub.recorded_num_classes(tmp_path / "plain.pth") is None
    assert zoo.resnet18(weights=str(tmp_path / "plain.pth"), widths=(4, 4, 8, 8)).fc.out_features == 1000


@pytest.mark.parametrize("pool", ["", "max"])
def test_builder_builds_the_recorded_headless_model(tmp_path: Path, pool: str) -> None:
    """A model saved after reset_classifier(0, pool) (timm's feature idiom) reloads through its builder as saved:
    no classifier, the same pooling (an unpooled model stays unpooled)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(zoo.cifar_resnet(layers=(1, 1, 1), widths=(4, 4, 8))).eval()
    model.reset_classifier(0, pool)
    model.save_pretrained(tmp_path / "features")
    loaded = zoo.cifar_resnet(weights=str(tmp_path / "features"), layers=(1, 1, 1), widths=(4, 4, 8)).eval()
    assert loaded.num_classes == 0 and loaded.hparams.global_pool == pool
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
