"""ImageClassifier's learning-rate schedules with real Lightning trainers: the cosine schedule needs a run of known
length, and says so (issue 13: ``--trainer.max_epochs -1`` with the cosine schedule raised an OverflowError)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import zoo
from zoo.errors import ZooError


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return zoo.cifar_resnet(layers=(1, 1, 1), widths=(4, 4, 4), num_classes=3, **kwargs)


def images(n: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


class Stream(IterableDataset):
    """An iterable dataset without a length: Lightning cannot count its batches."""

    def __iter__(self):
        yield from images()


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs)


@pytest.mark.parametrize("data", ["sized", "iterable"])
def test_cosine_with_an_unbounded_run_is_one_clear_error(data: str) -> None:
    # sized data, max_epochs=-1 and max_steps=-1: Lightning estimates inf steps (int(inf) was an OverflowError);
    # an iterable dataset of unknown length without max_steps: Lightning reports -1 (the cosine then ran over 1 step)
    loader = DataLoader(images() if data == "sized" else Stream(), batch_size=4)
    bounds = {"max_epochs": -1, "max_steps": -1} if data == "sized" else {"max_epochs": 2}
    model = tiny_model(scheduler="cosine")
    with pytest.raises(ZooError, match=r"scheduler='cosine' needs a bounded run") as info:
        trainer(**bounds).fit(model, loader)
    text = str(info.value)
    for fix in ("--trainer.max_epochs", "--trainer.max_steps", "scheduler constant or step"):
        assert fix in text


@pytest.mark.parametrize("scheduler", ["constant", "step"])
def test_unbounded_run_with_a_schedule_that_needs_no_total_trains(scheduler: str) -> None:
    model = tiny_model(scheduler=scheduler, milestones=(1,), lr=0.05)
    t = trainer(max_epochs=-1, max_steps=3)  # bounded by steps only: max_epochs stays -1
    t.fit(model, DataLoader(images(), batch_size=4))
    assert t.global_step == 3


def test_cosine_bounded_by_max_steps_alone_decays_to_zero() -> None:
    model = tiny_model(scheduler="cosine", lr=0.1)
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    t = trainer(max_epochs=-1, max_steps=4, callbacks=[Record()])
    t.fit(model, DataLoader(images(), batch_size=4))
    assert t.global_step == 4
    # cosine over the 4 steps: 0.1 * (1 + cos(pi * s / 4)) / 2 for s = 0 .. 3
    expected = [0.1, 0.1 * (1 + 2 ** -0.5) / 2, 0.05, 0.1 * (1 - 2 ** -0.5) / 2]
    assert lrs == pytest.approx(expected, rel=1e-6)
