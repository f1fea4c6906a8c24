"""ImageClassifier's injected training settings with real Lightning trainers and in a plain PyTorch loop: optimiser
and schedule callables, weight-decay groups, schedules bound to the run length, the auxiliary-loss interface."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import zoo
from zoo.errors import ZooError
from zoo.tasks.optim import InverseSqrtLR, WarmupCosineLR, parameter_groups

SGD = functools.partial(torch.optim.SGD, lr=0.1)
CONSTANT = functools.partial(torch.optim.lr_scheduler.ConstantLR, factor=1.0)  # or lr_scheduler=None


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


class RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"limit_val_batches": 0, **kwargs},
    )


# ------------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("data", ["sized", "iterable"])
def test_cosine_with_an_unbounded_run_is_one_clear_error(data: str) -> None:
    # sized data, max_epochs=-1 and max_steps=-1: Lightning estimates inf steps; an iterable dataset of unknown
    # length without max_steps: Lightning reports -1 (the cosine would run over 1 step)
    loader = DataLoader(images() if data == "sized" else Stream(), batch_size=4)
    bounds = {"max_epochs": -1, "max_steps": -1} if data == "sized" else {"max_epochs": 2}
    model = tiny_model(lr_scheduler=WarmupCosineLR)
    with pytest.raises(ZooError, match=r"decays over the whole run") as info:
        trainer(**bounds).fit(model, loader)
    for fix in ("--trainer.max_epochs", "--trainer.max_steps", "MultiStepLR"):
        assert fix in str(info.value)


@pytest.mark.parametrize("schedule", ["constant", "multistep"])
def test_unbounded_run_with_a_schedule_that_needs_no_total_trains(schedule: str) -> None:
    sched = (
        CONSTANT
        if schedule == "constant"
        else functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1], gamma=0.5)
    )
    record = RecordLR()
    model = tiny_model(optimizer=functools.partial(torch.optim.SGD, lr=0.05), lr_scheduler=sched)
    t = trainer(max_epochs=-1, max_steps=4, callbacks=[record])  # bounded by steps only: max_epochs stays -1
    t.fit(model, DataLoader(images(), batch_size=4))
    assert t.global_step == 4
    # two batches per epoch; MultiStepLR steps per epoch (its interval): halved from the second epoch on
    expected = [0.05] * 4 if schedule == "constant" else [0.05, 0.05, 0.025, 0.025]
    assert record.lrs == pytest.approx(expected, rel=1e-9)


def test_cosine_bounded_by_max_steps_alone_decays_to_zero() -> None:
    record = RecordLR()
    t = trainer(max_epochs=-1, max_steps=4, callbacks=[record])
    t.fit(tiny_model(optimizer=SGD), DataLoader(images(), batch_size=4))  # default schedule: the cosine
    assert t.global_step == 4
    # cosine over the 4 steps: 0.1 * (1 + cos(pi * s / 4)) / 2 for s = 0 .. 3
    expected = [0.1, 0.1 * (1 + 2**-0.5) / 2, 0.05, 0.1 * (1 - 2**-0.5) / 2]
    assert record.lrs == pytest.approx(expected, rel=1e-6)


def test_warmup_epochs_count_epochs_in_a_run_bounded_by_steps() -> None:
    # 8 images, batch 4: 2 steps per epoch; warmup_epochs=1 is 2 warm-up steps even without max_epochs
    record = RecordLR()
    model = tiny_model(optimizer=SGD, lr_scheduler=functools.partial(WarmupCosineLR, warmup_epochs=1))
    trainer(max_epochs=-1, max_steps=6, callbacks=[record]).fit(model, DataLoader(images(), batch_size=4))
    cosine = [0.1 * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)]
    assert record.lrs == pytest.approx([0.1 / 3, 0.2 / 3, *cosine], rel=1e-6)


def test_resuming_a_longer_run_stretches_the_schedule(tmp_path) -> None:
    """A run of 1 epoch (2 steps) saved, then resumed with max_epochs=2: the cosine spans the new run's 4 steps (the
    saved 2-step length ended it at lr 0: the resumed epoch trained nothing)."""
    loader = DataLoader(images(), batch_size=4)
    model = tiny_model(optimizer=SGD, lr_scheduler=WarmupCosineLR)
    first = trainer(max_epochs=1)
    first.fit(model, loader)
    first.save_checkpoint(tmp_path / "one.ckpt")
    record = RecordLR()
    resumed = tiny_model(optimizer=SGD, lr_scheduler=WarmupCosineLR)
    trainer(max_epochs=2, callbacks=[record]).fit(resumed, loader, ckpt_path=tmp_path / "one.ckpt")
    cosine = [0.1 * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)]
    assert record.lrs == pytest.approx(cosine[2:], rel=1e-6)


def test_a_restored_schedule_outside_a_trainer_keeps_its_saved_length() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    sched = WarmupCosineLR(torch.optim.SGD([p], lr=1.0), total_steps=4)
    for _ in range(2):
        sched.step()
    again = WarmupCosineLR(torch.optim.SGD([p], lr=1.0))  # unbound: a plain loop restoring a run
    again.load_state_dict(sched.state_dict())
    assert (again.total_steps, again.last_epoch) == (4, 2)
    assert again.get_last_lr() == pytest.approx(sched.get_last_lr())


@pytest.mark.parametrize("schedule", ["cosine", "inverse_sqrt"])
def test_a_param_group_added_during_fit_follows_the_schedule(schedule: str) -> None:
    """Lightning's BaseFinetuning adds the unfrozen parameters as a new group at an epoch start: the zoo's schedules
    step it (torch zips rates and groups strictly, and failed), keeping its ratio to the other groups."""
    from lightning.pytorch.callbacks import BaseFinetuning

    class UnfreezeLayer1(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.layer1, train_bn=False)

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 1:  # the new group starts at a tenth of the current rate
                self.unfreeze_and_add_param_group(pl_module.layer1, optimizer, initial_denom_lr=10.0)
            if epoch == 2:  # and doubles (BackboneFinetuning raises the backbone's rate each epoch)
                optimizer.param_groups[-1]["lr"] *= 2

    class RecordAll(pl.Callback):
        rates: list[list[float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rates.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    sched = WarmupCosineLR if schedule == "cosine" else functools.partial(InverseSqrtLR, warmup_updates=0)
    record = RecordAll()
    t = trainer(max_epochs=3, callbacks=[UnfreezeLayer1(), record])
    model = tiny_model(optimizer=SGD, lr_scheduler=sched)
    t.fit(model, DataLoader(images(), batch_size=4))  # 2 steps per epoch
    assert t.global_step == 6
    assert {len(r) for r in record.rates[:2]} == {2} and {len(r) for r in record.rates[2:]} == {3}
    frozen = {id(p) for p in model.layer1.parameters()}
    assert frozen <= {id(p) for p in t.optimizers[0].param_groups[2]["params"]}
    for step, rates in enumerate(record.rates[2:], start=2):  # the added group: a tenth, then a fifth, of the rate
        assert rates[2] == pytest.approx(rates[0] / (10 if step < 4 else 5), rel=1e-9)
    s = range(2, 6)
    expected = (
        [0.1 * (1 + math.cos(math.pi * k / 6)) / 2 for k in s]
        if schedule == "cosine"
        else [0.1 / math.sqrt(k) for k in s]
    )
    assert [r[0] for r in record.rates[2:]] == pytest.approx(expected, rel=1e-9)


def test_backbone_finetuning_freezes_all_but_the_head_then_trains_it() -> None:
    """Lightning's BackboneFinetuning needs ``model.backbone``: every parameter but the classifier's, without
    changing the state_dict; frozen for the first epoch (batch norms train, its default), then a group of its own."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    model = tiny_model(optimizer=SGD)
    keys = list(model.state_dict())
    backbone = {id(p) for p in model.backbone.parameters()}
    head = {id(p) for p in model.get_classifier().parameters()}
    assert backbone.isdisjoint(head) and backbone | head == {id(p) for p in model.parameters()}
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    class Snapshot(pl.Callback):
        after_first: list[torch.Tensor] = []

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                self.after_first = [w.detach().clone() for w in convs]

    start, snap = [w.detach().clone() for w in convs], Snapshot()
    t = trainer(max_epochs=2, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), snap])
    t.fit(model, DataLoader(images(), batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(start, snap.after_first))  # frozen in epoch 0
    assert not any(torch.equal(a, w) for a, w in zip(snap.after_first, convs))  # trained in epoch 1
    assert {id(w) for w in convs} <= {id(p) for p in t.optimizers[0].param_groups[-1]["params"]}
    assert list(model.state_dict()) == keys


def test_zoo_backbone_finetuning_adds_the_backbone_as_the_tasks_groups(tmp_path) -> None:
    """zoo.callbacks.BackboneFinetuning: at the unfreeze epoch the backbone joins the optimiser as the task's own
    groups (no weight decay on norms and biases; the layer_decay factors), at Lightning's rate (0.1 x the current
    rate), which every added group follows the next epoch (x 2, Lightning's default lambda), also after a
    resume from the checkpoint of the unfreeze epoch."""
    from zoo.callbacks import BackboneFinetuning
    from zoo.tasks.optim import layer_scales

    sgd = functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.01)

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.groups: dict[int, list[dict]] = {}

        def on_train_epoch_start(self, trainer, pl_module):
            groups = trainer.optimizers[0].param_groups
            self.groups[trainer.current_epoch] = [{**g, "params": list(g["params"])} for g in groups]

    def fit(epochs: int, ckpt: str | None = None) -> tuple[torch.nn.Module, Record]:
        torch.manual_seed(0)
        model = tiny_model(optimizer=sgd, lr_scheduler=None, layer_decay=0.5)
        record = Record()
        callbacks = [BackboneFinetuning(unfreeze_backbone_at_epoch=1), record]
        t = pl.Trainer(
            accelerator="cpu", max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        )  # fmt: skip
        t.fit(model, DataLoader(images(), batch_size=4), ckpt_path=ckpt)
        if ckpt is None and epochs == 2:
            t.save_checkpoint(tmp_path / "unfrozen.ckpt")
        return model, record

    model, record = fit(3)
    scales = layer_scales(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    # BatchNorm trains while the rest is frozen (train_bn): the weights are what the callback adds
    added = record.groups[1][len(record.groups[0]) :]
    assert len(added) == 4  # the stem and the three blocks: a layer each
    for group in added:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(0.1 * 0.1 * scales[names[id(p)]])  # the head's rate x 0.1 x factor
            assert group["weight_decay"] == 0.01 and p.ndim == 4  # conv weights: the optimiser's weight decay
    later = record.groups[2][-len(added) :]
    assert [g["lr"] for g in later] == pytest.approx([2 * g["lr"] for g in added])
    fit(2)
    resumed = fit(3, str(tmp_path / "unfrozen.ckpt"))[1]
    assert [g["lr"] for g in resumed.groups[2][-len(added) :]] == pytest.approx([g["lr"] for g in later])


def test_zoo_backbone_finetuning_keeps_norms_and_biases_out_of_weight_decay() -> None:
    """A ViT's backbone joins at the unfreeze epoch in groups without weight decay for its layer norms and biases
    (Lightning's callback put them in one group with the optimiser's decay), and with it for its weight matrices."""
    from zoo.callbacks import BackboneFinetuning

    torch.manual_seed(0)
    model = zoo.sinkformer_vit_tiny_patch16_224(
        img_size=16, patch_size=8, depth=1, num_classes=3, lr_scheduler=None,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.01),
    )  # fmt: skip
    callback = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    start = model.pos_embed.detach().clone()

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                self.after_first = pl_module.pos_embed.detach().clone()

    snap = Snapshot()
    t = trainer(max_epochs=2, callbacks=[callback, snap])
    t.fit(model, DataLoader(TensorDataset(x, torch.arange(8) % 3), batch_size=4))
    assert torch.equal(snap.after_first, start) and not torch.equal(model.pos_embed, start)  # frozen, then trained
    decay = {id(p): g["weight_decay"] for i, _ in callback._added for g in [t.optimizers[0].param_groups[i]]
             for p in g["params"]}  # fmt: skip
    # model.backbone: every parameter but the head's, pos_embed and cls_token (set on the model itself) included
    backbone = {id(p) for p in model.backbone.parameters()}
    head = {id(p) for p in model.get_classifier().parameters()}
    assert backbone.isdisjoint(head) and backbone | head == {id(p) for p in model.parameters()}
    assert {id(model.pos_embed), id(model.cls_token)} <= backbone
    assert set(decay) == backbone
    exempt = model.no_weight_decay()  # timm's: pos_embed, cls_token
    assert {"pos_embed", "cls_token"} <= exempt
    for name, p in model.named_parameters():
        if id(p) in backbone:
            assert decay[id(p)] == (0.0 if p.ndim <= 1 or name in exempt else 0.01), name
    assert any(v == 0.0 for v in decay.values()) and any(v == 0.01 for v in decay.values())


def test_test_reports_the_metrics_validate_reports() -> None:
    """validate and test report the same metrics (top-5 accuracy too, with more than 5 classes), each against
    its definition on the model's logits."""
    torch.manual_seed(0)
    model = zoo.cifar_resnet(layers=(1, 1, 1), widths=(4, 4, 4), num_classes=8)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 8, (16,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    t = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    (validated,) = t.validate(model, loader, verbose=False)
    (tested,) = t.test(model, loader, verbose=False)
    assert {k.removeprefix("val_") for k in validated} == {k.removeprefix("test_") for k in tested}
    model.eval()
    with torch.no_grad():
        logits = model(x)
    top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(dim=1).float().mean().item()
    assert tested["test_acc5"] == pytest.approx(top5) and tested["test_acc5"] == pytest.approx(validated["val_acc5"])


def test_cosine_spans_a_run_with_a_gradient_accumulation_schedule() -> None:
    """GradientAccumulationScheduler({0: 1, 1: 2}) on 4 batches per epoch: 4 + 2 + 2 optimiser steps; the cosine
    spans those 8 and ends at 0 (Lightning's estimate counts 12 and left it at a quarter of the peak)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    t = trainer(max_epochs=3, callbacks=[GradientAccumulationScheduler({0: 1, 1: 2})])
    t.fit(tiny_model(optimizer=SGD, lr_scheduler=WarmupCosineLR), DataLoader(images(), batch_size=2))
    sched = t.lr_scheduler_configs[0].scheduler
    assert t.global_step == 8 and sched.total_steps == t.global_step
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_lr_find_reads_and_sets_the_optimizer_learning_rate() -> None:
    """Lightning's Tuner.lr_find needs ``model.lr``: it is the factory's rate, and the suggestion it sets is the
    rate the next fit's optimiser starts from."""
    from lightning.pytorch.tuner import Tuner

    model = tiny_model(optimizer=functools.partial(torch.optim.SGD, lr=0.03))
    assert model.lr == 0.03
    assert tiny_model(optimizer=None).lr == type(model).default_optimizer.keywords["lr"]
    t = trainer(max_epochs=20)
    found = Tuner(t).lr_find(model, DataLoader(images(), batch_size=2), num_training=14, early_stop_threshold=None)
    assert found.suggestion() is not None and model.lr == found.suggestion()
    optimizer = model.configure_optimizers(total_steps=4)["optimizer"]  # the next fit's optimiser
    assert [g["initial_lr"] for g in optimizer.param_groups] == [found.suggestion()] * 2
    with pytest.raises(ZooError, match="lr"):
        model.lr = -1.0
    # a factory that takes the groups alone (LightningCLI's --optimizer builder) is set too, at torch's default 1e-3
    other = tiny_model(optimizer=lambda groups: torch.optim.Adam(groups))
    assert other.lr == 1e-3
    other.lr = 0.25
    optimizer = other.configure_optimizers(total_steps=4)["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam) and {g["initial_lr"] for g in optimizer.param_groups} == {0.25}


@pytest.mark.parametrize(
    "eps, dtype, warns", [(1e-8, torch.float16, True), (1e-6, torch.float16, False), (1e-8, torch.bfloat16, False)]
)
def test_adam_eps_that_vanishes_in_float16_is_named(eps: float, dtype: torch.dtype, warns: bool) -> None:
    """A float16 model (16-true) with Adam's default eps 1e-8 gets NaN in its first steps (eps is 0 in float16):
    one warning names the fix; eps 1e-6, or bfloat16, train finite and get none."""
    import warnings

    model = tiny_model(optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, eps=eps), lr_scheduler=None).to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = model.configure_optimizers(total_steps=4)
    named = [w for w in caught if "eps is 0 in float16" in str(w.message)]
    assert len(named) == int(warns)
    x, y = images(8).tensors
    for _ in range(4):
        optimizer.zero_grad()
        model.loss(model(x.to(dtype)), y).backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters()) != warns


def test_optimizer_that_refuses_its_arguments_is_one_clear_error() -> None:
    model = tiny_model(optimizer=functools.partial(torch.optim.SGD, lr=-1.0))
    with pytest.raises(ZooError, match=r"the optimizer refused its arguments: Invalid learning rate: -1.0"):
        model.configure_optimizers()


def test_warmup_cosine_against_its_formula() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = WarmupCosineLR(opt, warmup_steps=3, min_lr_ratio=0.1, total_steps=10)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = [2.0 * (t + 1) / 4 for t in range(3)]
    decay = [2.0 * (0.1 + 0.9 * (1 + math.cos(math.pi * min(1.0, (t - 3) / 7))) / 2) for t in range(3, 12)]
    assert seen == pytest.approx(warm + decay, rel=1e-12)
    with pytest.raises(ZooError, match="warmup_epochs or warmup_steps"):
        WarmupCosineLR(opt, warmup_epochs=1, warmup_steps=2)
    with pytest.raises(ZooError, match="steps per epoch"):
        WarmupCosineLR(torch.optim.SGD([p], lr=1.0), warmup_epochs=1, total_steps=10)


def test_inverse_sqrt_against_fairseq_formula() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=5e-4)
    sched = InverseSqrtLR(opt, warmup_updates=4, warmup_init_lr=1e-7)
    seen = []
    for _ in range(9):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = [1e-7 + u * (5e-4 - 1e-7) / 4 for u in range(4)]
    decay = [5e-4 * math.sqrt(4 / u) for u in range(4, 9)]
    assert seen == pytest.approx(warm + decay, rel=1e-12)


def test_reduce_on_plateau_monitors_the_validation_loss() -> None:
    model = tiny_model(lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    config = model.configure_optimizers()
    assert config["lr_scheduler"]["monitor"] == "val_loss" and config["lr_scheduler"]["interval"] == "epoch"


# ------------------------------------------------------------------------------------------------ plain PyTorch


def test_plain_pytorch_loop_with_the_recipe_optimiser_and_decay_groups() -> None:
    model = tiny_model(
        optimizer=functools.partial(torch.optim.SGD, lr=0.5, weight_decay=0.1),
        lr_scheduler=functools.partial(WarmupCosineLR, warmup_steps=1),
    )
    config = model.configure_optimizers(total_steps=3)  # no Trainer
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim > 1
    }  # conv and linear weights
    norms = {
        f"{m}.{n}"
        for m, mod in model.named_modules()
        if isinstance(mod, torch.nn.BatchNorm2d)
        for n, _ in mod.named_parameters(recurse=False)
    }
    assert {names[id(p)] for p in no_decay["params"]} == norms | {
        n for n, _ in model.named_parameters() if n.endswith("bias")
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    x, y = images()[:]
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = opt.param_groups[0]["lr"]
    assert lr == pytest.approx(0.25)  # warm-up step 0 of 1: lr / 2
    opt.zero_grad()
    model.loss(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    sched.step()
    # plain SGD (no momentum): p - lr (g + wd p) for weights, p - lr g for norms and biases
    for n, p in model.named_parameters():
        wd = 0.1 if p.ndim > 1 else 0.0
        torch.testing.assert_close(p.detach(), before[n] - lr * (grads[n] + wd * before[n]), rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # cosine from its peak


def test_configure_optimizers_without_a_trainer_needs_the_run_length_for_the_cosine() -> None:
    with pytest.raises(ZooError, match=r"configure_optimizers\(total_steps=N\)"):
        tiny_model().configure_optimizers()
    opt = tiny_model(lr_scheduler=CONSTANT).configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9  # the family default
    assert isinstance(tiny_model(optimizer=SGD, lr_scheduler=None).configure_optimizers(), torch.optim.SGD)


def test_timm_no_weight_decay_names_are_exempt() -> None:
    model = zoo.sinkformer_vit_tiny_patch16_224(img_size=32, depth=1)
    decay, no_decay = parameter_groups(model)
    exempt = {id(p) for p in no_decay["params"]}
    assert id(model.pos_embed) in exempt and id(model.cls_token) in exempt
    assert id(model.blocks[0].attn.qkv.weight) not in exempt


def test_training_settings_are_not_hyperparameters_and_strings_get_the_new_form() -> None:
    model = tiny_model(optimizer=SGD, lr_scheduler=CONSTANT)
    assert "optimizer" not in model.hparams and "lr_scheduler" not in model.hparams
    with pytest.raises(ZooError, match=r"optimizer must be a callable.*class_path: torch.optim.SGD"):
        tiny_model(optimizer="sgd")
    with pytest.raises(ZooError, match=r"lr_scheduler must be a callable.*WarmupCosineLR"):
        tiny_model(lr_scheduler="cosine")
    with pytest.raises(ZooError, match=r"lr is a training setting, not an argument of ResNet"):
        tiny_model(lr=0.1)


# ------------------------------------------------------------------------------------------------ layer-wise decay


def _layer_decay_model(name: str) -> torch.nn.Module:
    import timm

    from converters import transform
    from zoo.models import PointCloudTransformer, SetTransformer

    torch.manual_seed(0)
    if name == "timm_momentum_vit":
        return transform(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3), to="momentum")
    build = {
        "resnet": tiny_model,
        "momentum": lambda: zoo.momentum_cifar_resnet(layers=(2, 1, 1), widths=(4, 4, 4), num_classes=3),
        "vit": lambda: zoo.sinkformer_vit_tiny_patch16_224(img_size=32, depth=2, num_classes=3),
        "vmoe": lambda: zoo.vmoe_tiny_patch32_224(img_size=64, depth=2, num_experts=2, num_classes=3),
        "set": lambda: SetTransformer(num_classes=3, embed_dim=16, num_heads=2, num_inducing=4),
        "pct": lambda: PointCloudTransformer(
            num_classes=3, embed_dim=8, sample_points=(16, 8), num_neighbors=4, depth=2, fuse_dim=16, head_dims=(8,)
        ),
        "neural_ode": lambda: zoo.neural_ode_digits(dim=4, width=3, switch_times="learned"),
    }
    return build[name]()


@pytest.mark.parametrize("name", ["resnet", "momentum", "vit", "vmoe", "set", "pct", "neural_ode", "timm_momentum_vit"])
def test_layer_decay_groups_are_timms(name: str) -> None:
    """Every parameter gets the learning-rate factor and weight decay of timm's own ``param_groups_layer_decay``
    (BEiT's recipe) through the model's ``group_matcher``: the stem lowest, the head at 1. (V-MoE's per-expert
    biases are 2-d: timm decays them, the zoo exempts every bias.)"""
    from timm.optim import param_groups_layer_decay

    model = _layer_decay_model(name)
    model.get_classifier().weight.requires_grad_(False)  # frozen parameters are left out, as timm's
    ours = {
        id(p): (group["lr_scale"], group.get("weight_decay") == 0.0)
        for group in parameter_groups(model, layer_decay=0.6)
        for p in group["params"]
    }
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    theirs = {
        id(p): (group["lr_scale"], group["weight_decay"] == 0.0)
        for group in param_groups_layer_decay(model, weight_decay=1.0, no_weight_decay_list=nwd, layer_decay=0.6)
        for p in group["params"]
    }
    expert_biases = {id(p) for n, p in model.named_parameters() if n.endswith("bias") and p.ndim > 1}
    assert (name == "vmoe") == bool(expert_biases)
    for key in expert_biases:
        assert ours[key][1] and not theirs[key][1]
        theirs[key] = (theirs[key][0], True)
    assert ours == theirs
    assert len({scale for scale, _ in ours.values()}) >= 4  # stem, at least two blocks, the head
    assert max(scale for scale, _ in ours.values()) == 1.0


def test_layer_decay_rates_hold_their_ratios_through_the_schedule() -> None:
    """A fit with layer_decay=0.5 starts each layer at lr * 0.5 ** (L - l), stem to head, and the cosine keeps
    the ratios at every step."""
    model = tiny_model(optimizer=SGD, lr_scheduler=WarmupCosineLR, layer_decay=0.5)

    class RecordAll(pl.Callback):
        def __init__(self) -> None:
            self.lrs: list[list[float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    record = RecordAll()
    t = trainer(max_epochs=2, callbacks=[record])
    t.fit(model, DataLoader(images(), batch_size=2))
    groups = t.optimizers[0].param_groups
    layers = 1 + 3 + 1  # the stem, three blocks, the head
    want = sorted({0.1 * 0.5 ** (layers - 1 - layer) for layer in range(layers)})
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx(want)
    rate = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
    assert rate[id(model.fc.weight)] == pytest.approx(0.1) and rate[id(model.conv1.weight)] == pytest.approx(want[0])
    assert all("lr_scale" not in g for g in groups)
    moving = [lrs for lrs in record.lrs if max(lrs) > 0]
    assert len(moving) >= 6 and len({round(max(lrs), 9) for lrs in moving}) >= 3  # the rate did move
    for lrs in moving:
        assert [lr / max(lrs) for lr in lrs] == pytest.approx([g["initial_lr"] / 0.1 for g in groups])
    # model.lr (Tuner.lr_find) moves the whole ladder: the head at the new rate, the others in proportion
    model.lr = 0.3
    optimizer = model.configure_optimizers(total_steps=4)["optimizer"]
    assert sorted({g["initial_lr"] for g in optimizer.param_groups}) == pytest.approx([3 * lr for lr in want])


def test_layer_decay_from_a_recipe_override() -> None:
    """``--model.init_args.layer_decay`` on a recipe: the ViT's head at the recipe's rate, the stem lowest."""
    from zoo.cli import load_recipe

    model, _ = load_recipe(
        "digits_sinkformer_vit", "--model.init_args.layer_decay=0.75", "--model.init_args.cutmix_alpha=1.0"
    )
    assert model.layer_decay == 0.75 and "layer_decay" not in model.hparams  # a training setting
    assert model.cutmix_alpha == 1.0 and model.mixup_alpha == 0.0 and "cutmix_alpha" not in model.hparams
    optimizer = model.configure_optimizers(total_steps=10, steps_per_epoch=5)["optimizer"]
    rate = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    base = model.lr
    depth = len(model.blocks)
    assert rate[id(model.head.weight)] == pytest.approx(base)
    assert rate[id(model.blocks[-1].attn.qkv.weight)] == pytest.approx(base * 0.75)
    assert rate[id(model.patch_embed.proj.weight)] == pytest.approx(base * 0.75 ** (depth + 1))


@pytest.mark.parametrize("value", [0.0, 1.5, float("nan"), -0.5])
def test_bad_layer_decay_is_one_clear_error(value: float) -> None:
    with pytest.raises(ZooError, match=r"layer_decay.*\(0, 1\]"):
        tiny_model(layer_decay=value)


def test_layer_decay_without_a_group_matcher_names_the_fix() -> None:
    with pytest.raises(ZooError, match=r"group_matcher.*leave layer_decay unset"):
        parameter_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)), layer_decay=0.5)


# ------------------------------------------------------------------------------------------------ MixUp / CutMix


def test_probability_targets_get_the_cross_entropy_with_smoothing_before_mixing() -> None:
    """``-sum_c q_c log softmax(z)_c`` with q = (1 - eps) p + eps / C, computed here by hand; for a mixed target
    that is timm's Mixup (each one-hot label smoothed, then blended)."""
    model = tiny_model(label_smoothing=0.1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
    a, b, lam = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2]), 0.3
    smooth = lambda y: 0.9 * torch.nn.functional.one_hot(y, 3).double() + 0.1 / 3  # noqa: E731
    mixed = lam * torch.nn.functional.one_hot(a, 3).double() + (1 - lam) * torch.nn.functional.one_hot(b, 3).double()
    want = -(lam * smooth(a) + (1 - lam) * smooth(b)).mul(logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(model.loss(logits, mixed), want.float(), rtol=1e-6, atol=0)
    with pytest.raises(ZooError, match=r"logits' shape \(4, 3\).*\(4, 5\)"):
        model.loss(logits, torch.rand(4, 5))


def _distinct_neighbours(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3  # y_i != y_(i-1) for every i


def test_mixup_blends_each_image_with_its_neighbour_and_the_targets_alike() -> None:
    model = tiny_model(mixup_alpha=0.8)
    x, y = _distinct_neighbours()
    torch.manual_seed(0)
    xm, ym = model.mix_batch(x, y)
    lam = ym[0, y[0]].item()
    assert 0 < lam < 1 and ym.dtype == torch.float32
    onehot = torch.nn.functional.one_hot(y, 3).float()
    torch.testing.assert_close(ym, lam * onehot + (1 - lam) * onehot.roll(1, 0))
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.roll(1, 0))


def test_cutmix_pastes_one_box_from_the_neighbour_and_weights_by_area() -> None:
    model = tiny_model(cutmix_alpha=1.0)
    x, y = _distinct_neighbours()
    for seed in range(20):
        torch.manual_seed(seed)
        xm, ym = model.mix_batch(x, y)
        from_neighbour = (xm == x.roll(1, 0)).all(dim=(0, 1)) & (xm != x).any(dim=(0, 1))
        assert ((xm == x) | (xm == x.roll(1, 0))).all()
        rows, cols = from_neighbour.any(1).nonzero().flatten(), from_neighbour.any(0).nonzero().flatten()
        area = from_neighbour.sum().item()
        if area:  # a box: every pixel inside its bounding rows x columns
            assert area == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        lam = 1 - area / 64
        onehot = torch.nn.functional.one_hot(y, 3).float()
        torch.testing.assert_close(ym, lam * onehot + (1 - lam) * onehot.roll(1, 0))


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float16])
def test_mixing_under_a_half_default_dtype(default: torch.dtype) -> None:
    """Lightning's bf16-true / 16-true make the default dtype half while training: the mixing weights are still
    drawn (torch's Beta has no half sampler), the images stay in their dtype, the targets float32."""
    model = tiny_model(mixup_alpha=0.8, cutmix_alpha=1.0).to(default)
    x, y = _distinct_neighbours()
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        for seed in range(4):
            torch.manual_seed(seed)
            xm, ym = model.mix_batch(x.to(default), y)
            assert xm.dtype == default and ym.dtype == torch.float32 and torch.isfinite(model.loss(model(xm), ym))
    finally:
        torch.set_default_dtype(before)
    assert torch.get_default_dtype() == before


def test_mixup_and_cutmix_together_pick_one_per_batch() -> None:
    model = tiny_model(mixup_alpha=0.8, cutmix_alpha=1.0)
    x, y = _distinct_neighbours()
    kinds = set()
    for seed in range(30):
        torch.manual_seed(seed)
        xm, _ = model.mix_batch(x, y)
        kinds.add("cutmix" if ((xm == x) | (xm == x.roll(1, 0))).all() else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_a_fit_mixes_training_batches_and_never_validation_batches() -> None:
    """Training forwards see mixed images (not the data's), validation forwards the data's own; the loss stays
    finite and the run is repeatable under a seed."""
    data = images(8)

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        model = tiny_model(optimizer=SGD, lr_scheduler=None, mixup_alpha=0.8, cutmix_alpha=1.0)
        seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        model.register_forward_pre_hook(lambda m, args: seen[m.training].append(args[0].clone()))
        t = trainer(max_epochs=2, limit_val_batches=1.0, num_sanity_val_steps=0)
        t.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
        assert torch.isfinite(t.callback_metrics["train_loss"]) and torch.isfinite(t.callback_metrics["val_loss"])
        return seen[True], seen[False], model.fc.weight.detach().clone()

    train_in, val_in, weights = run()
    raw = data.tensors[0]
    assert len(train_in) == 4 and not any(torch.equal(x, raw[:4]) or torch.equal(x, raw[4:]) for x in train_in)
    assert all(torch.equal(x, raw[i % 2 * 4 : i % 2 * 4 + 4]) for i, x in enumerate(val_in))
    again = run()
    assert all(torch.equal(a, b) for a, b in zip(train_in, again[0])) and torch.equal(weights, again[2])


def test_probability_targets_from_the_data_train_and_evaluate() -> None:
    """A pipeline's own mixing (class probabilities as targets) trains; accuracy counts the most likely class."""
    x, y = images(8).tensors
    probs = 0.7 * torch.nn.functional.one_hot(y, 3).float() + 0.1
    t = trainer(max_epochs=1, limit_val_batches=1.0)
    model = tiny_model(optimizer=SGD, lr_scheduler=None)
    t.fit(model, DataLoader(TensorDataset(x, probs), batch_size=4))
    (soft,) = t.validate(model, DataLoader(TensorDataset(x, probs), batch_size=4), verbose=False)
    (hard,) = t.validate(model, DataLoader(TensorDataset(x, y), batch_size=4), verbose=False)
    assert soft["val_acc"] == hard["val_acc"]


@pytest.mark.parametrize("bad", [{"mixup_alpha": -0.1}, {"cutmix_alpha": float("inf")}, {"mixup_alpha": "0.8"}])
def test_bad_mixing_strength_is_one_clear_error(bad: dict) -> None:
    with pytest.raises(ZooError, match=r"(mixup|cutmix)_alpha.*Beta concentration"):
        tiny_model(**bad)


def test_mixing_a_batch_that_is_not_images_names_the_fix() -> None:
    from zoo.models import SetTransformer

    model = SetTransformer(num_classes=3, embed_dim=8, num_heads=2, num_inducing=2, mixup_alpha=0.8)
    with pytest.raises(ZooError, match=r"mix image batches \(B, C, H, W\).*\(2, 16, 3\).*set both to 0"):
        model.training_step((torch.randn(2, 16, 3), torch.tensor([0, 1])), 0)


# ------------------------------------------------------------------------------------------------ checkpointing


def test_grad_checkpointing_turns_on_the_familys_checkpointing_in_a_fit() -> None:
    """``grad_checkpointing=True`` (timm's flag, for a recipe): a block runs twice per step (its recompute in
    backward), and one SGD step leaves the weights the run without it leaves."""

    def fit(checkpointing: bool) -> tuple[int, torch.Tensor, bool]:
        torch.manual_seed(0)
        model = zoo.sinkformer_vit_tiny_patch16_224(
            img_size=16, patch_size=8, depth=2, num_classes=3, grad_checkpointing=checkpointing,
            optimizer=SGD, lr_scheduler=None,
        )  # fmt: skip
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))  # the recompute may stop early
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        trainer(max_steps=1).fit(model, DataLoader(TensorDataset(x, torch.tensor([0, 1, 2, 0])), batch_size=4))
        return len(calls), model.blocks[0].mlp.fc1.weight.detach(), model.grad_checkpointing

    assert fit(False)[0] == 1 and fit(False)[2] is False
    calls, weights, on = fit(True)
    assert calls == 2 and on is True and "grad_checkpointing" not in tiny_model().hparams
    torch.testing.assert_close(weights, fit(False)[1], rtol=0, atol=1e-7)
    with pytest.raises(ZooError, match="SetTransformer has no activation checkpointing"):
        zoo.models.SetTransformer(num_classes=3, embed_dim=8, num_heads=2, num_inducing=2, grad_checkpointing=True)


# ------------------------------------------------------------------------------------------------ extra losses


class WithAuxLoss(type(tiny_model())):
    """A model with an extra loss through the task's interface (as V-MoE's load balancing)."""

    def auxiliary_losses(self):
        return {"weights_l2": 0.5 * self.fc.weight.pow(2).sum()}

    def diagnostics(self):
        return {"fc_norm": self.fc.weight.detach().norm()}


def test_auxiliary_losses_join_the_training_loss_and_are_logged() -> None:
    torch.manual_seed(0)
    model = WithAuxLoss(
        layers=(1, 1, 1), widths=(4, 4, 4), num_classes=3, stem="cifar", optimizer=SGD, lr_scheduler=CONSTANT
    )
    x, y = images()[:4]
    t = trainer(max_steps=1)
    t.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    assert {"train_weights_l2", "train_fc_norm"} <= set(t.logged_metrics)
    # the returned loss is cross-entropy + 0.5 ||W||^2: its gradient in fc.weight has the extra W
    model.trainer = None  # outside the loop (self.log is then skipped)
    model.train()
    loss = model.training_step((x, y), 0)
    ce = model.loss(model(x), y)
    torch.testing.assert_close(loss - ce, 0.5 * model.fc.weight.pow(2).sum())


def test_features_model_cannot_train_and_says_how_to_fix() -> None:
    model = zoo.cifar_resnet(layers=(1, 1, 1), widths=(4, 4, 4), num_classes=0)
    with pytest.raises(ZooError, match=r"reset_classifier"):
        model.training_step(images()[:2], 0)


# ------------------------------------------------------------------------------------------------ the data's transform


def test_a_fit_records_the_data_modules_normalisation(tmp_path) -> None:
    """The digits data module normalises with its train split's own statistics, not the family's 0.5 / 0.5: after a
    fit, pretrained_cfg (what timm's resolve_data_config reads), the checkpoint and save_pretrained say so."""
    from timm.data import resolve_data_config

    from zoo.data import DigitsDataModule

    torch.manual_seed(0)
    model = zoo.cifar_resnet(layers=(1, 1, 1), widths=(4, 4, 4), num_classes=10)
    family_mean = model.pretrained_cfg["mean"]
    dm = DigitsDataModule(image_size=8, channels=3, batch_size=32, augment=False)
    fit = trainer(max_steps=1, default_root_dir=tmp_path)
    fit.fit(model, datamodule=dm)
    ckpt = tmp_path / "fit.ckpt"
    fit.save_checkpoint(ckpt)
    # the statistics of the train split, computed here from the images before normalisation
    train = dm.train_images * dm.std.view(1, -1, 1, 1) + dm.mean.view(1, -1, 1, 1)
    want_mean = train.mean(dim=(0, 2, 3))
    assert family_mean != tuple(want_mean.tolist())
    assert model.pretrained_cfg["mean"] == pytest.approx(want_mean.tolist(), abs=1e-6)
    assert model.pretrained_cfg["std"] == pytest.approx(train.std(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert model.default_cfg is model.pretrained_cfg
    assert resolve_data_config({}, model=model)["mean"] == model.pretrained_cfg["mean"]
    assert zoo.from_pretrained(ckpt).pretrained_cfg["mean"] == model.pretrained_cfg["mean"]
    saved = model.save_pretrained(tmp_path / "saved")
    assert zoo.from_pretrained(saved).pretrained_cfg["std"] == model.pretrained_cfg["std"]


def test_a_fit_records_the_class_names_and_predictions_files_use_them(tmp_path) -> None:
    """After a fit on a data module with class names, pretrained_cfg["label_names"] (timm's key) holds them; the
    checkpoint and save_pretrained carry them; a predictions CSV written without that data module names its
    columns with them; a new head drops them; a stored cfg with names that are not strings is refused."""
    from zoo.callbacks import PredictionWriter
    from zoo.data import DigitsDataModule
    from zoo.hub import check_pretrained_cfg

    torch.manual_seed(0)
    model = zoo.cifar_resnet(layers=(1, 1, 1), widths=(4, 4, 4), num_classes=10)
    assert "label_names" not in model.pretrained_cfg
    dm = DigitsDataModule(image_size=8, channels=3, batch_size=32, augment=False)
    dm.class_names = [f"digit {i}" for i in range(10)]  # as an image folder's class folders would name them
    fit = trainer(max_steps=1, default_root_dir=tmp_path)
    fit.fit(model, datamodule=dm)
    names = tuple(dm.class_names)
    assert model.pretrained_cfg["label_names"] == names and model.default_cfg is model.pretrained_cfg
    fit.save_checkpoint(tmp_path / "fit.ckpt")
    assert zoo.from_pretrained(tmp_path / "fit.ckpt").pretrained_cfg["label_names"] == names
    loaded = zoo.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    assert loaded.pretrained_cfg["label_names"] == names
    writer = PredictionWriter(tmp_path / "p.csv")
    predict = trainer(callbacks=[writer])
    predict.predict(loaded, DataLoader(torch.randn(3, 3, 8, 8), batch_size=2), return_predictions=False)
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == ",".join(["index", *names])
    loaded.reset_classifier(4)
    assert "label_names" not in loaded.pretrained_cfg
    with pytest.raises(ZooError, match=r"label_names'\] must be a list of strings"):
        check_pretrained_cfg({"label_names": [1, 2]}, "a file")
    with pytest.raises(ZooError, match="label_names must be 10 strings, one per class"):
        check_pretrained_cfg({"num_classes": 10, "label_names": ["a", "b"]}, "a file")


def test_a_fit_on_loaders_or_other_channels_keeps_the_cfg(tmp_path) -> None:
    model = tiny_model()
    before = dict(model.pretrained_cfg)
    trainer(max_steps=1, default_root_dir=tmp_path).fit(model, DataLoader(images(), batch_size=4))
    assert model.pretrained_cfg == before

    class OneChannel(pl.LightningDataModule):  # statistics of another number of channels than the cfg's
        mean, std = (0.2,), (0.3,)

        def train_dataloader(self):
            return DataLoader(images(), batch_size=4)

    trainer(max_steps=1, default_root_dir=tmp_path).fit(model, datamodule=OneChannel())
    assert model.pretrained_cfg == before


def test_a_data_module_with_another_number_of_classes_is_one_clear_error() -> None:
    """Every family: fewer outputs than the data's classes failed in the loss with torch's 'Target 3 is out of
    bounds', more trained silently on classes that never occur; fit, validate and test each name the fix."""
    data = zoo.data.DigitsDataModule(batch_size=8)  # 10 classes
    model = tiny_model()  # 3 outputs
    for run in ("fit", "validate", "test"):
        with pytest.raises(
            ZooError,
            match=r"has 10 classes \(0, 1, .*\) but the model's classifier has 3 .*"
            r"num_classes=10.*reset_classifier\(10\)",
        ):
            getattr(trainer(max_steps=1, limit_val_batches=1), run)(model, datamodule=data)
    model.reset_classifier(10)  # the fix the message names
    trainer(max_steps=1, limit_train_batches=1).fit(model, datamodule=data)
    assert model.global_step == 1
