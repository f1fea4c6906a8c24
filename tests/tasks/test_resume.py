"""A fit resumed from an epoch-end checkpoint repeats the uninterrupted fit: the data's order and augmentation
follow the epoch (zoo.data.base), torch's random generators come back from the checkpoint (zoo.tasks.resume)."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import zoo
from zoo.data import DigitsDataModule
from zoo.data.base import EpochShuffleSampler, SeededSamples, sample_seed
from zoo.errors import ZooError
from zoo.tasks.resume import RNG_STATES_KEY


class StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


class InterruptMidEpoch(pl.Callback):
    """Stop the fit with an error at the end of batch 1 of epoch 1, as a preempted job would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 1:
            raise RuntimeError("preempted")


def resnet() -> pl.LightningModule:
    return zoo.depth_scaled_cifar_resnet(
        layers=(1, 1, 1), widths=(4, 8, 8), num_classes=10,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    )  # fmt: skip


def vit() -> pl.LightningModule:
    """Dropout, drop-path and MixUp / CutMix: draws from torch's generator in every step."""
    return zoo.sinkformer_vit_tiny_patch16_224(
        img_size=16, patch_size=8, in_chans=3, depth=2, embed_dim=32, num_heads=2, num_classes=10,
        drop_rate=0.2, drop_path_rate=0.2, mixup_alpha=0.8, cutmix_alpha=1.0,
    )  # fmt: skip


def fit(
    root: Path,
    build,
    workers: int,
    interrupt: pl.Callback | None = None,
    resume: Path | None = None,
    every_step: bool = False,
) -> list[torch.Tensor]:
    """A few batches an epoch under the default warm-up cosine schedule (it spans the run), checkpointing every
    epoch's end (3 epochs of 3 batches) or, ``every_step``, every step (2 epochs of 4); ``interrupt``: a callback
    that stops the fit; ``resume``: continue from a checkpoint."""
    pl.seed_everything(0)
    model = build()
    dm = DigitsDataModule(image_size=16, batch_size=32, num_workers=workers, augment=True)
    steps = {"every_n_train_steps": 1} if every_step else {}
    callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=root, save_last=True, **steps)]
    if interrupt is not None:
        callbacks.append(interrupt)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2 if every_step else 3, limit_train_batches=4 if every_step else 3,
        limit_val_batches=0 if every_step else 1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, deterministic=True, default_root_dir=root,
    )  # fmt: skip
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=resume)
    except RuntimeError as error:
        assert isinstance(interrupt, InterruptMidEpoch) and "preempted" in str(error)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "build, workers",
    [(resnet, 0), (resnet, 2), (vit, 0)],
    ids=["resnet-augmented", "resnet-augmented-2-workers", "vit-dropout-droppath-mixup"],
)
def test_a_resumed_fit_repeats_the_uninterrupted_fit(tmp_path: Path, build, workers: int) -> None:
    """Three epochs straight, and one epoch, interrupted, then resumed from its last.ckpt for the other two: the
    weights are bit-identical. Random augmentation (random shifts, in worker processes too), the shuffled order,
    dropout, drop-path and MixUp / CutMix all draw what they drew in the uninterrupted fit."""
    straight = fit(tmp_path / "straight", build, workers)
    fit(tmp_path / "interrupted", build, workers, interrupt=StopAfterFirstEpoch())
    checkpoint = torch.load(tmp_path / "interrupted" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 0 and RNG_STATES_KEY in checkpoint
    resumed = fit(tmp_path / "resumed", build, workers, resume=tmp_path / "interrupted" / "last.ckpt")
    assert len(straight) == len(resumed)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    # and the resumed fit trained: its two epochs moved the weights the interrupted epoch left
    names = [name for name, _ in build().named_parameters()]
    assert any(not torch.equal(checkpoint["state_dict"][name], w) for name, w in zip(names, resumed))


def test_loading_a_checkpoint_outside_a_fit_leaves_the_random_state_alone(tmp_path: Path) -> None:
    """load_from_checkpoint (no Trainer fitting) reads the checkpoint's generator states but does not set them;
    a damaged entry stops a resumed fit with one clear error."""
    fit(tmp_path, resnet, 0, interrupt=StopAfterFirstEpoch())
    path = tmp_path / "last.ckpt"
    torch.manual_seed(123)
    zoo.models.DepthScaledResNet.load_from_checkpoint(path)
    after_load = torch.rand(4)
    torch.manual_seed(123)
    resnet()  # building draws the initial weights, as load_from_checkpoint's build does
    assert torch.equal(after_load, torch.rand(4))
    torch.set_rng_state(torch.load(path, weights_only=True)[RNG_STATES_KEY]["torch"])
    assert not torch.equal(after_load, torch.rand(4))  # what setting the checkpoint's state would have given

    checkpoint = torch.load(path, weights_only=True)
    checkpoint[RNG_STATES_KEY] = {"torch": torch.zeros(7, dtype=torch.uint8), "cuda": None}
    torch.save(checkpoint, tmp_path / "damaged.ckpt")
    with pytest.raises(ZooError, match=f"'{RNG_STATES_KEY}' entry is damaged"):
        fit(tmp_path / "again", resnet, 0, resume=tmp_path / "damaged.ckpt")


def test_epoch_order_follows_the_seed_and_epoch_alone() -> None:
    """Epoch e's order is a permutation of the shard seeded by (seed, e), whatever torch's global generator has
    drawn; the shards of two processes partition it; each index comes with its sample seed."""
    data = list(range(10))

    def order(seed: int, epoch: int, rank: int = 0, replicas: int = 1) -> list[tuple[int, int]]:
        sampler = EpochShuffleSampler(data, replicas, rank, seed)
        sampler.set_epoch(epoch)
        torch.rand(100)  # the global generator moves: the order does not
        return list(sampler)

    assert order(0, 3) == order(0, 3) and sorted(i for i, _ in order(0, 3)) == data
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    assert all(s == sample_seed(0, 3, i) for i, s in order(0, 3))
    halves = [i for rank in (0, 1) for i, _ in order(0, 3, rank, 2)]
    assert sorted(halves) == data
    seeds = {sample_seed(0, e, i) for e in range(5) for i in range(100)}
    assert len(seeds) == 500 and all(0 <= s < 2**63 for s in seeds)


def test_seeded_samples_draw_from_their_seed_and_restore_the_generator() -> None:
    """Item (index, seed) is the wrapped item drawn with torch's generator seeded by seed: the same whatever
    the global state, different for another seed, and the global generator is where it was."""

    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> torch.Tensor:
            return index + torch.rand(3)

    samples = SeededSamples(Noisy())
    torch.manual_seed(5)
    first = samples[(2, 77)]
    after = torch.rand(2)
    torch.manual_seed(6)
    assert torch.equal(samples[(2, 77)], first) and not torch.equal(samples[(2, 78)], first)
    torch.manual_seed(5)
    samples[(1, 9)]
    assert torch.equal(torch.rand(2), after)  # loading drew nothing from the global stream
    assert torch.equal(first, 2 + torch.rand(3, generator=torch.Generator().manual_seed(77)))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_fit_resumed_in_the_middle_of_an_epoch_goes_on_with_the_batches_that_follow(tmp_path: Path, workers):
    """Interrupted in batch 1 of epoch 1 (Lightning runs the checkpoint callback last: the newest checkpoint is
    batch 0's), resumed from that checkpoint: the loader's state in it (epoch 1, 1 batch) makes the resumed epoch
    go on with batches 1 to 3 of the same order, and the weights equal the uninterrupted fit's. (Lightning
    restarted such an epoch's data from its first batch.)"""
    straight = fit(tmp_path / "straight", resnet, workers, every_step=True)
    fit(tmp_path / "interrupted", resnet, workers, InterruptMidEpoch(), every_step=True)
    checkpoint = torch.load(tmp_path / "interrupted" / "last.ckpt", weights_only=True)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    resumed = fit(tmp_path / "resumed", resnet, workers, resume=tmp_path / "interrupted" / "last.ckpt", every_step=True)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_a_damaged_loader_state_is_one_error(tmp_path: Path) -> None:
    fit(tmp_path / "interrupted", resnet, 0, InterruptMidEpoch(), every_step=True)
    checkpoint = torch.load(tmp_path / "interrupted" / "last.ckpt", weights_only=True)
    checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [{"epoch": 1, "batches": -3}]
    torch.save(checkpoint, tmp_path / "damaged.ckpt")
    with pytest.raises(ZooError, match="training-loader state is damaged"):
        fit(tmp_path / "again", resnet, 0, resume=tmp_path / "damaged.ckpt", every_step=True)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_loader_state_follows_its_passes(workers: int) -> None:
    """TrainingLoader's state: the epoch of the pass begun and the batches of it returned; a loader given that
    state goes on with the rest of that epoch's batches (then counts from there), starts any other epoch at its
    beginning, and keeps the last pass's state until a new pass returns its first batch (a checkpoint written
    between set_epoch and the first batch must not skip the new epoch)."""
    from zoo.data.base import TrainingLoader

    data = SeededSamples(torch.arange(20.0))

    def loader() -> TrainingLoader:
        sampler = EpochShuffleSampler(data, 1, 0, seed=3)
        return TrainingLoader(data, batch_size=4, sampler=sampler, num_workers=workers)

    first = loader()
    assert first.state_dict() == {"epoch": 0, "batches": 0}
    epoch0 = [b.tolist() for b in first]
    assert first.state_dict() == {"epoch": 0, "batches": 5} and sorted(sum(epoch0, [])) == list(range(20))
    first.sampler.set_epoch(1)
    assert first.state_dict() == {"epoch": 0, "batches": 5}  # no batch of epoch 1 yet
    it = iter(first)
    epoch1 = [next(it).tolist(), next(it).tolist()]
    assert first.state_dict() == {"epoch": 1, "batches": 2}
    epoch1 += [b.tolist() for b in it]
    assert epoch1 != epoch0

    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "batches": 2})
    resumed.sampler.set_epoch(1)
    it = iter(resumed)
    assert next(it).tolist() == epoch1[2]
    assert resumed.state_dict() == {"epoch": 1, "batches": 3}
    assert [b.tolist() for b in it] == epoch1[3:]
    resumed.sampler.set_epoch(2)
    assert len(list(resumed)) == 5  # the next epoch whole

    other = loader()
    other.load_state_dict({"epoch": 0, "batches": 5})  # an epoch-end state: epoch 1 starts at its beginning
    other.sampler.set_epoch(1)
    assert [b.tolist() for b in other] == epoch1
    with pytest.raises(ZooError, match="training-loader state is damaged"):
        other.load_state_dict([1, 2])  # type: ignore[arg-type]
