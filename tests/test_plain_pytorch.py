"""A recipe's model, optimiser, weight-decay groups and schedule in a plain PyTorch loop (no Trainer):
zoo.cli.load_recipe + model.configure_optimizers(total_steps=...)."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.cli import load_recipe
from zoo.errors import ZooError

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")


def test_digits_recipe_trains_in_a_plain_loop(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, data = load_recipe(
        "digits_depth_scaled_resnet",
        "--data.init_args.batch_size=32",
        "--model.init_args.lr_scheduler.init_args.warmup_epochs=0.25",
    )
    data.prepare_data()
    data.setup("fit")
    loader = data.train_dataloader()
    steps = 30
    config = model.configure_optimizers(total_steps=steps, steps_per_epoch=len(loader))
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    # the recipe's SGD (lr 0.1, momentum 0.9, weight decay 5e-4 on weights only), its warm-up (a quarter epoch here)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert sched.warmup == round(0.25 * len(loader))
    torch.manual_seed(0)
    model.train()
    losses, lrs = [], []
    batches = iter(loader)
    for _ in range(steps):
        x, y = next(batches)
        lrs.append(opt.param_groups[0]["lr"])
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    w = sched.warmup
    expected = [
        0.1 * (t + 1) / (w + 1) if t < w else 0.1 * (1 + math.cos(math.pi * (t - w) / (steps - w))) / 2
        for t in range(steps)
    ]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])  # it learns (ln 10 = 2.3 at the start)
    # the checkpoint-free state a plain loop keeps: optimiser and schedule state dicts round-trip
    again = model.configure_optimizers(total_steps=steps, steps_per_epoch=len(loader))
    again["optimizer"].load_state_dict(opt.state_dict())
    again["lr_scheduler"]["scheduler"].load_state_dict(sched.state_dict())
    assert again["lr_scheduler"]["scheduler"].last_epoch == steps


def test_unknown_recipe_is_one_error(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZooError, match="digits_depth_scaled_resnet"):
        load_recipe("digits_depth_scaled_resnt")
