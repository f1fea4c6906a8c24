"""Optimisation shared by the tasks: weight-decay parameter groups, learning-rate schedules, and the injected
optimiser / schedule factories (LightningCLI's ``OptimizerCallable`` / ``LRSchedulerCallable``).

A task takes ``optimizer`` (``params -> torch.optim.Optimizer``) and ``lr_scheduler`` (``optimizer -> scheduler``)
as callables, in YAML::

    model:
      init_args:
        optimizer:
          class_path: torch.optim.SGD
          init_args: {lr: 0.1, momentum: 0.9, weight_decay: 5.0e-4}
        lr_scheduler:
          class_path: zoo.tasks.optim.WarmupCosineLR
          init_args: {warmup_epochs: 1}

and in Python ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)``. The optimiser
receives :func:`parameter_groups`: its own ``weight_decay`` applies to the weights, norms, biases and other 1-d
parameters get none. Schedules that need the length of the run (:class:`WarmupCosineLR`) have
``bind_run_length``; the task calls it with the Trainer's step count (or the ``total_steps`` given to
``configure_optimizers`` without a Trainer).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from zoo.errors import ZooError
from zoo.validation import finite_float, non_negative_int, optional, positive_int

__all__ = [
    "InverseSqrtLR",
    "LEGACY_TRAINING_ARGS",
    "LearningRateAttribute",
    "LRSchedulerCallable",
    "OptimizerCallable",
    "WarmupCosineLR",
    "build_optimization",
    "check_factory",
    "check_layer_decay",
    "is_legacy_training_arg",
    "layer_scales",
    "parameter_groups",
    "refuse_training_settings",
]

# training settings that were model arguments before the optimiser and schedule were injected: files and checkpoints
# of earlier versions still carry them (zoo.hub drops them), and a model given one refuses it with the new form
LEGACY_TRAINING_ARGS = frozenset(
    {
        "lr",
        "momentum",
        "weight_decay",
        "betas",
        "nesterov",
        "adam_eps",
        "scheduler",
        "warmup_epochs",
        "milestones",
        "lr_gamma",
        "warmup_updates",
        "warmup_init_lr",
    }
)

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


def check_layer_decay(layer_decay: Any) -> float:
    """``layer_decay`` as a float in (0, 1]; one ZooError naming the range otherwise.

    Args:
        layer_decay: the factor per layer given.
    """
    return finite_float(
        "layer_decay", layer_decay, 0.0, 1.0, low_open=True, hint="give a factor per layer in (0, 1], e.g. 0.75"
    )


def layer_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay (BEiT's, as timm's ``param_groups_layer_decay``): the learning-rate factor
    of each parameter, by name, ``layer_decay ** (L - l)`` for a parameter of layer ``l`` out of layers 0 .. L.

    The layers are timm's: ``model.group_matcher(coarse=False)`` orders the parameters (the stem is layer 0, then
    the blocks in order; what it leaves unmatched, the head, is the last layer, at factor 1), through
    ``timm.models.group_parameters``, so a model gets the same factors here as from timm's optimiser factory.

    Args:
        model: a model with timm's ``group_matcher`` (every zoo image family, timm's models).
        layer_decay: the factor per layer, in (0, 1] (BEiT / MAE fine-tuning: 0.65 .. 0.75).
    """
    layer_decay = check_layer_decay(layer_decay)
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        raise ZooError(
            f"layer_decay needs the model's layers in order, timm's group_matcher(), which "
            f"{type(model).__name__} does not have; leave layer_decay unset (or add a group_matcher method)"
        )
    from timm.models import group_parameters

    layer_of = group_parameters(model, matcher(coarse=False), reverse=True)
    last = max(layer_of.values(), default=0)
    return {name: layer_decay ** (last - layer) for name, layer in layer_of.items()}


def parameter_groups(
    model: nn.Module, no_weight_decay: Iterable[str] = (), layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """Parameter groups by weight decay and, with ``layer_decay``, by layer.

    Weights get the optimiser's own ``weight_decay``; the parameters of normalisation layers, biases, every
    parameter with at most one dimension, and the names in ``no_weight_decay`` or in ``model.no_weight_decay()``
    (timm's convention: ``pos_embed``, ``cls_token``) get ``weight_decay=0``. Each parameter appears once (shared
    weights too); frozen parameters are left out. Without ``layer_decay``: the weights' group first (always), then
    the no-decay group (omitted when empty).

    With ``layer_decay`` (:func:`layer_scales`), each group holds one layer's weights or no-decay parameters and
    carries timm's ``lr_scale`` (its rate is ``lr * lr_scale``: :func:`build_optimization` applies it, as torch's
    optimisers ignore the key), stem first.

    Args:
        model: the model whose trainable parameters are grouped.
        no_weight_decay: more parameter names (as in ``named_parameters``) without weight decay.
        layer_decay: the learning-rate factor per layer from the head down, in (0, 1]; None for none.
    """
    skip = set(no_weight_decay)
    if callable(getattr(model, "no_weight_decay", None)):
        skip |= set(model.no_weight_decay())
    scales = None if layer_decay is None else layer_scales(model, layer_decay)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            exempt = isinstance(module, _NORMS) or name.endswith("bias") or p.ndim <= 1 or full in skip
            scale = 1.0 if scales is None else scales.get(full, 1.0)  # unmatched: the head's layer, as timm
            group = groups.get((scale, exempt))
            if group is None:
                group = groups[(scale, exempt)] = {"params": []}
                if exempt:
                    group["weight_decay"] = 0.0
                if scales is not None:
                    group["lr_scale"] = scale
            group["params"].append(p)
    if scales is None:  # the weights' group always, first (the optimiser's own error when it is all empty)
        groups.setdefault((1.0, False), {"params": []})
    # stem first (the smallest factor), weights before no-decay parameters in each layer
    return [groups[key] for key in sorted(groups)]


def is_legacy_training_arg(key: str, value: Any, accepted: Iterable[str]) -> bool:
    """True for a training setting that a file of an earlier version saved as a model argument: one of
    :data:`LEGACY_TRAINING_ARGS` that the class does not take (``accepted``), or the string form of ``optimizer``
    (``"sgd"``, now a callable).

    Args:
        key: the argument's name in the file.
        value: its value.
        accepted: the argument names the model class takes.
    """
    return (key in LEGACY_TRAINING_ARGS and key not in set(accepted)) or (key == "optimizer" and isinstance(value, str))


def refuse_training_settings(cls: type, kwargs: Mapping[str, Any]) -> None:
    """One ZooError for a training setting given as a model argument (``lr=``, ``weight_decay=`` ...), showing the
    injected form (the optimiser and schedule are callables given to the task).

    Args:
        cls: the model class, named in the message.
        kwargs: the keyword arguments it was given.
    """
    given = [k for k in kwargs if k in LEGACY_TRAINING_ARGS]
    if given:
        what = "is a training setting, not an argument" if len(given) == 1 else "are training settings, not arguments"
        raise ZooError(
            f"{', '.join(given)} {what} of {cls.__name__}: give the optimiser and schedule as callables, e.g. "
            "optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4), "
            "lr_scheduler=zoo.tasks.optim.WarmupCosineLR or None for a constant rate (YAML: optimizer: {class_path: "
            f"torch.optim.SGD, init_args: {{lr: 0.1}}}}); default: {cls.__name__}.default_optimizer"
        )


def check_factory(name: str, factory: Any) -> Any:
    """``optimizer`` / ``lr_scheduler`` must be callables (or None); the string form of earlier versions gets one
    error that shows the new form. Returns ``factory``.

    Args:
        name: ``"optimizer"`` or ``"lr_scheduler"``, the argument checked.
        factory: its value.
    """
    if factory is None or callable(factory):
        return factory
    example = (
        "functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9) in Python, or in YAML optimizer: "
        "{class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9}}"
        if name == "optimizer"
        else "functools.partial(zoo.tasks.optim.WarmupCosineLR, warmup_epochs=1) in Python, or in YAML "
        "lr_scheduler: {class_path: zoo.tasks.optim.WarmupCosineLR, init_args: {warmup_epochs: 1}}"
    )
    raise ZooError(
        f"{name} must be a callable that builds the {name.replace('_', ' ')} (LightningCLI's "
        f"{'OptimizerCallable' if name == 'optimizer' else 'LRSchedulerCallable'}), got {factory!r}; "
        f"training settings are no longer model arguments of their own (lr, momentum, weight_decay ...): "
        f"give e.g. {example}"
    )


def _at_learning_rate(factory: Callable[..., Optimizer], lr: float, params: Any) -> Optimizer:
    """``factory(params)`` with its learning rate set to ``lr``: every group's rate times lr / (the optimiser's
    default rate), so groups the factory gives their own rates keep their ratios. Any factory (a
    ``functools.partial``, LightningCLI's ``--optimizer`` builder that takes the groups alone); a module-level
    function under ``functools.partial``, so the model still pickles (DDP spawn)."""
    optimizer = factory(params)
    old = optimizer.defaults.get("lr")
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr"] / old if old else lr
    optimizer.defaults["lr"] = lr
    return optimizer


class LearningRateAttribute:
    """``model.lr``: the learning rate the task's optimiser factory (``optimizer_factory``, else the class's
    ``default_optimizer``) builds with, for Lightning's ``Tuner.lr_find``, which reads it and, with
    ``update_attr=True``, sets it. Setting it makes the optimiser start at the new rate (groups keep their
    ratios), the schedule scaling from it."""

    optimizer_factory: Callable[..., Optimizer] | None
    default_optimizer: Callable[..., Optimizer]

    @property
    def lr(self) -> float:
        """The factory's rate (its ``lr`` argument, or the optimiser's default)."""
        factory = self.optimizer_factory or type(self).default_optimizer
        probe = nn.Parameter(torch.zeros(1))  # the optimiser's defaults, without touching the model
        try:
            return float(factory([probe]).defaults["lr"])
        except Exception as e:  # an optimiser that needs more than plain parameters: hasattr(model, "lr") is False
            raise AttributeError(f"the optimizer factory does not tell its learning rate ({e})") from e

    @lr.setter
    def lr(self, value: float) -> None:
        finite_float("lr", value, 0.0, low_open=True, hint="give a learning rate > 0")
        factory = self.optimizer_factory or type(self).default_optimizer
        self.optimizer_factory = functools.partial(_at_learning_rate, factory, float(value))


def _adopt_added_groups(scheduler: LRScheduler) -> None:
    """Schedule the parameter groups added to the optimiser after ``scheduler`` was built (Lightning's
    ``BaseFinetuning.unfreeze_and_add_param_group``): torch zips the rates with the groups strictly, and failed.

    A group found at rate lr_new while the first group runs at lr_0 of base b_0 gets the base lr_new b_0 / lr_0:
    it goes on from its rate and follows the schedule's factor, keeping its ratio to the other groups (lr_0 = 0:
    its rate is its base). An added group whose rate the callback changed since the last step (BackboneFinetuning
    raises the backbone's rate each epoch) is rebased the same way; the groups the schedule was built with are
    the schedule's alone.

    Args:
        scheduler: the schedule; its ``base_lrs`` grows by one entry per added group.
    """
    groups = scheduler.optimizer.param_groups
    own = getattr(scheduler, "_own_groups", len(scheduler.base_lrs))
    if len(groups) <= own:
        return
    last = list(getattr(scheduler, "_last_lr", None) or scheduler.base_lrs)
    ratio = scheduler.base_lrs[0] / last[0] if scheduler.base_lrs and last[0] > 0 else 1.0
    for i in range(own, len(groups)):
        lr = float(groups[i]["lr"])
        if i >= len(scheduler.base_lrs):
            groups[i].setdefault("initial_lr", lr * ratio)  # torch's record of a group's base rate
            scheduler.base_lrs.append(lr * ratio)
        elif i < len(last) and lr != last[i]:
            scheduler.base_lrs[i] = lr * ratio


class _RunLengthScheduler(LRScheduler):
    """A per-step schedule whose factor depends on the length of the run, known once the Trainer (or the user)
    calls :meth:`bind_run_length`; until then the learning rates stay at their base values."""

    interval = "step"

    def __init__(
        self, optimizer: Optimizer, total_steps: int | None, steps_per_epoch: float | None, last_epoch: int = -1
    ) -> None:
        self.total_steps: int | None = None
        self.steps_per_epoch: float | None = None
        super().__init__(optimizer, last_epoch)
        self._own_groups = len(self.base_lrs)  # groups added later follow _adopt_added_groups
        if total_steps is not None:
            self.bind_run_length(total_steps, steps_per_epoch)

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def bind_run_length(self, total_steps: int, steps_per_epoch: float | None = None) -> None:
        """Fix the number of optimiser steps of the run (and per epoch, for epoch-counted warm-ups); the current
        learning rates are set for the current step."""
        positive_int("total_steps", total_steps, hint="give the number of optimizer steps of the run")
        if steps_per_epoch is not None:
            finite_float("steps_per_epoch", steps_per_epoch, 0.0, low_open=True)
        self.total_steps = int(total_steps)
        self.steps_per_epoch = None if steps_per_epoch is None else float(steps_per_epoch)
        self._on_bind()
        lrs = self._compute(self.last_epoch)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs

    def _on_bind(self) -> None:
        pass

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step (and the rest of the state); a run length bound before the restore wins over the saved
        one. Resuming under a Trainer binds the new run's length first (``max_epochs`` raised for a longer run), and
        the saved one would otherwise end the schedule early (a cosine already at its floor: lr 0 for the added
        epochs). Without a bound length (a plain loop) the saved length is kept.

        Args:
            state_dict: a state from :meth:`state_dict`.
        """
        bound = (self.total_steps, self.steps_per_epoch) if self.total_steps is not None else None
        super().load_state_dict(state_dict)
        if bound is not None and bound != (self.total_steps, self.steps_per_epoch):
            self.bind_run_length(*bound)

    def _compute(self, step: int) -> list[float]:
        f = self.factor(max(step, 0))
        return [base * f for base in self.base_lrs]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        _adopt_added_groups(self)
        if self.total_steps is None:
            if self.last_epoch <= 0:
                return list(self.base_lrs)  # construction: set for real by bind_run_length
            raise ZooError(
                f"{type(self).__name__} was stepped before it knew the length of the run: under a "
                "Trainer the task binds it; in a plain loop build it with total_steps=N (or call "
                "model.configure_optimizers(total_steps=N))"
            )
        return self._compute(self.last_epoch)


class WarmupCosineLR(_RunLengthScheduler):
    """Linear warm-up then cosine decay, per optimiser step t of a run of T steps with W warm-up steps:

        lr(t) = lr (t + 1) / (W + 1)                                              t < W
        lr(t) = lr [r + (1 - r) (1 + cos(pi min(1, (t - W) / (T - W)))) / 2]     t >= W

    with r = ``min_lr_ratio``. W is ``warmup_steps``, or ``warmup_epochs`` (fractions allowed) times the steps
    per epoch, and at most T - 1.

    Args:
        optimizer: the optimiser.
        warmup_epochs: warm-up length in epochs (needs the steps per epoch; the Trainer provides them).
        warmup_steps: warm-up length in optimiser steps (give one of the two).
        min_lr_ratio: final learning rate / peak learning rate.
        total_steps: T, the optimiser steps of the run, when known at construction (a plain PyTorch loop); under a
            Trainer the task sets it.
        steps_per_epoch: optimiser steps per epoch (for ``warmup_epochs``), when known at construction; under a
            Trainer the task sets it.
        last_epoch: the index of the last step taken, -1 for a new run (``torch.optim.lr_scheduler``'s meaning).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_epochs: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        total_steps: int | None = None,
        steps_per_epoch: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        finite_float("warmup_epochs", warmup_epochs, 0.0)
        non_negative_int("warmup_steps", warmup_steps)
        finite_float("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        optional(positive_int, "total_steps", total_steps)
        if warmup_epochs and warmup_steps:
            raise ZooError(f"give warmup_epochs or warmup_steps, not both (got {warmup_epochs} and {warmup_steps})")
        self.warmup_epochs = float(warmup_epochs)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.warmup = 0
        super().__init__(optimizer, total_steps, steps_per_epoch, last_epoch)

    def _on_bind(self) -> None:
        assert self.total_steps is not None
        if self.warmup_epochs:
            if self.steps_per_epoch is None:
                raise ZooError(
                    f"warmup_epochs={self.warmup_epochs} needs the number of steps per epoch: give "
                    "steps_per_epoch (or use warmup_steps)"
                )
            warmup = int(round(self.warmup_epochs * self.steps_per_epoch))
        else:
            warmup = self.warmup_steps
        self.warmup = min(warmup, self.total_steps - 1)

    def factor(self, step: int) -> float:
        assert self.total_steps is not None
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min((step - self.warmup) / max(self.total_steps - self.warmup, 1), 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class InverseSqrtLR(LRScheduler):
    """fairseq's ``inverse_sqrt`` schedule after u updates (lr_0 = ``warmup_init_lr``, W = ``warmup_updates``):

        lr(u) = lr_0 + u (lr - lr_0) / W        u < W
        lr(u) = lr sqrt(W / u)                  u >= W

    (W = 0: lr / sqrt(max(u, 1))). ``warmup_init_lr < 0`` means 0, as fairseq. Per optimiser step.

    Args:
        optimizer: the optimiser; its learning rates are the peak rates lr.
        warmup_updates: W, the number of warm-up updates.
        warmup_init_lr: lr_0, the learning rate at the first update.
        last_epoch: the index of the last step taken, -1 for a new run (``torch.optim.lr_scheduler``'s meaning).
    """

    interval = "step"

    def __init__(
        self, optimizer: Optimizer, warmup_updates: int = 4000, warmup_init_lr: float = -1.0, last_epoch: int = -1
    ) -> None:
        non_negative_int("warmup_updates", warmup_updates)
        finite_float("warmup_init_lr", warmup_init_lr)
        self.warmup_updates = int(warmup_updates)
        self.warmup_init_lr = float(warmup_init_lr)
        super().__init__(optimizer, last_epoch)
        self._own_groups = len(self.base_lrs)  # groups added later follow _adopt_added_groups

    def lr_at(self, update: int, lr: float) -> float:
        """The learning rate after ``update`` updates for the peak ``lr``."""
        w = self.warmup_updates
        if w <= 0:
            return lr / math.sqrt(max(update, 1))
        if update < w:
            w0 = max(self.warmup_init_lr, 0.0)
            return w0 + update * (lr - w0) / w
        return lr * math.sqrt(w / update)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        _adopt_added_groups(self)
        return [self.lr_at(max(self.last_epoch, 0), base) for base in self.base_lrs]


def _trainer_run_length(trainer: Any) -> tuple[int, float | None]:
    """(optimiser steps of the run, optimiser steps per epoch) of a Trainer's fit."""
    total = trainer.estimated_stepping_batches
    if not (math.isfinite(total) and total >= 1):
        # max_epochs=-1 with max_steps=-1 (inf), or an iterable dataset of unknown length without max_steps
        raise ZooError(
            "this learning-rate schedule decays over the whole run, but this trainer's run has no known step count "
            f"(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}); set --trainer.max_epochs N or "
            "--trainer.max_steps N (Trainer(max_epochs=...) / Trainer(max_steps=...)), or give a schedule that "
            "needs no total (e.g. lr_scheduler: {class_path: torch.optim.lr_scheduler.MultiStepLR, ...}, or none)"
        )
    if getattr(trainer, "train_dataloader", None) is None and hasattr(trainer, "fit_loop"):
        # Lightning counts the batches only for runs bounded by epochs; set the data up as it does then
        trainer.fit_loop.setup_data()
    batches = getattr(trainer, "num_training_batches", math.inf)
    per_epoch = None
    if isinstance(batches, (int, float)) and math.isfinite(batches) and batches >= 1:
        per_epoch = max(1.0, math.ceil(batches / max(trainer.accumulate_grad_batches, 1)))
        accumulation = _accumulation_schedule(trainer)
        if accumulation is not None and trainer.max_epochs and trainer.max_epochs > 0:
            # Lightning counts every epoch at the accumulation of the first: with a GradientAccumulationScheduler
            # epoch e takes ceil(batches / a(e)) optimiser steps, and the cosine would stop short of its end
            per_epoch = float(math.ceil(batches / accumulation.get_accumulate_grad_batches(0)))
            counted = sum(
                math.ceil(batches / accumulation.get_accumulate_grad_batches(e)) for e in range(trainer.max_epochs)
            )
            total = min(counted, trainer.max_steps) if trainer.max_steps not in (None, -1) else counted
    elif trainer.max_epochs and trainer.max_epochs > 0:
        per_epoch = total / trainer.max_epochs
    return int(total), per_epoch


def _accumulation_schedule(trainer: Any) -> GradientAccumulationScheduler | None:
    """The trainer's ``GradientAccumulationScheduler`` callback, if it has one."""
    found = [c for c in getattr(trainer, "callbacks", ()) if isinstance(c, GradientAccumulationScheduler)]
    return found[0] if found else None


# the smallest eps a float16 Adam update keeps: 1e-8 (torch's default) rounds to zero in float16, and a second
# moment that underflowed then divides by zero
_HALF_EPS = 1e-7


def _warn_half_eps(optimizer: Optimizer) -> None:
    """Warn when float16 parameters (``precision="16-true"``) meet an optimiser whose ``eps`` is zero in float16:
    its first steps give inf / NaN (Adam's default 1e-8; a bfloat16 or float32 model is not concerned)."""
    eps = [g.get("eps") for g in optimizer.param_groups if any(p.dtype == torch.float16 for p in g["params"])]
    small = [e for e in eps if isinstance(e, (int, float)) and 0 <= e < _HALF_EPS]
    if small:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"zoo: {type(optimizer).__name__}(eps={small[0]:g}) on float16 parameters: eps is 0 in float16, so the "
            f"first steps give inf / NaN; use precision 16-mixed or bf16-true, or give eps >= {_HALF_EPS:g} "
            "(--model.init_args.optimizer.eps 1e-6)"
        )


def build_optimization(
    model: nn.Module,
    optimizer: Callable[..., Optimizer],
    lr_scheduler: Callable[[Optimizer], Any] | None,
    trainer: Any = None,
    total_steps: int | None = None,
    steps_per_epoch: float | None = None,
    layer_decay: float | None = None,
) -> Any:
    """Lightning's ``configure_optimizers`` value: the optimiser over :func:`parameter_groups`, and the schedule
    (with its interval: ``scheduler.interval`` if it has one, else per epoch) bound to the run length.

    With ``layer_decay``, each group's learning rate is the optimiser's times the group's ``lr_scale`` (the key is
    then removed: torch's optimisers and schedules do not read it, timm's schedules would apply it twice); a
    schedule built afterwards scales every group from its own starting rate, so the ratios hold all run.

    The run length comes from ``total_steps`` (and ``steps_per_epoch``) when given, else from the ``trainer``;
    without either, a schedule that needs it gets one clear error.

    Args:
        model: the model whose parameters are optimised.
        optimizer: builds the optimiser from the parameter groups.
        lr_scheduler: builds the schedule from the optimiser; None for a constant learning rate.
        trainer: the Lightning Trainer whose run length binds the schedule; None outside a Trainer.
        total_steps: the number of optimiser steps of the run; None to take it from ``trainer``.
        steps_per_epoch: the number of optimiser steps per epoch; None to take it from ``trainer``.
        layer_decay: layer-wise learning-rate decay (:func:`layer_scales`); None for one rate.
    """
    groups = parameter_groups(model, layer_decay=layer_decay)
    try:
        opt = optimizer(groups)
    except (ValueError, TypeError) as e:  # torch's optimizers check their hyperparameters: lr < 0, betas ...
        raise ZooError(
            f"the optimizer refused its arguments: {e}; fix that value (on the command line: "
            "--optimizer.<argument>, or --model.init_args.optimizer.<argument>, whichever set it)"
        ) from None
    if not isinstance(opt, Optimizer):
        raise ZooError(
            f"optimizer must build a torch.optim.Optimizer from the parameter groups, got {type(opt).__name__}"
        )
    _warn_half_eps(opt)
    scaled = [group for group in opt.param_groups if "lr_scale" in group]
    if layer_decay is not None and len(scaled) != len(groups):
        raise ZooError(
            f"layer_decay: the optimizer {type(opt).__name__} dropped the groups' lr_scale; give a torch.optim "
            "optimizer (it keeps the groups as given), or leave layer_decay unset"
        )
    for group in scaled:
        group["lr"] = group["lr"] * group.pop("lr_scale")
    if lr_scheduler is None:
        return opt
    sched = lr_scheduler(opt)
    if isinstance(sched, _RunLengthScheduler) and sched.total_steps is None:
        if total_steps is None:
            if trainer is None:
                raise ZooError(
                    f"{type(sched).__name__} decays over the whole run: outside a Trainer give the "
                    "number of optimizer steps, model.configure_optimizers(total_steps=N)"
                )
            total_steps, per_epoch = _trainer_run_length(trainer)
            steps_per_epoch = per_epoch if steps_per_epoch is None else steps_per_epoch
        sched.bind_run_length(total_steps, steps_per_epoch)
    config: dict[str, Any] = {"scheduler": sched, "interval": getattr(sched, "interval", "epoch")}
    if isinstance(sched, ReduceLROnPlateau):  # Lightning's subclass (lightning.pytorch.cli) names its monitor
        config["monitor"] = getattr(sched, "monitor", None) or "val_loss"
    return {"optimizer": opt, "lr_scheduler": config}
