"""Image classification training logic shared by every image family (ResNets, ViTs, MoE ...)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from zoo.errors import ZooError
from zoo.tasks.optim import (
    LearningRateAttribute,
    LRSchedulerCallable,
    OptimizerCallable,
    WarmupCosineLR,
    build_optimization,
    check_factory,
    check_layer_decay,
    parameter_groups,
)
from zoo.validation import boolean, finite_float, non_negative_int

__all__ = ["ImageClassifier", "record_class_names", "record_normalisation", "record_num_classes"]


def record_num_classes(model: torch.nn.Module, num_classes: int) -> None:
    """Make ``model.pretrained_cfg`` (and its alias ``default_cfg``) say ``num_classes``, after ``reset_classifier``:
    the cfg describes the model as built (timm's rule), its head included. A model without a cfg is left as it is.

    Args:
        model: the model whose head changed.
        num_classes: its new number of classes (0: no classifier).
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        cfg = {k: v for k, v in cfg.items() if k != "label_names"}  # a new head: the old classes' names no longer hold
        model.pretrained_cfg = {**cfg, "num_classes": int(num_classes)}
        model.default_cfg = model.pretrained_cfg


def record_class_names(model: torch.nn.Module, datamodule: Any) -> None:
    """Make ``model.pretrained_cfg`` (and ``default_cfg``) say ``label_names``, timm's key: the data module's
    ``class_names``, output i's class, when there is one string per class of the classifier (at most 1024), so
    that checkpoints and ``save_pretrained`` carry them (predictions files name their columns with them, as
    Hugging Face's ``id2label``). Anything else leaves the cfg as it is.

    Args:
        model: the model being trained.
        datamodule: the Trainer's data module (None when the data comes as loaders).
    """
    cfg = getattr(model, "pretrained_cfg", None)
    names = getattr(datamodule, "class_names", None)
    outputs = getattr(model, "num_classes", None)
    if not isinstance(cfg, dict) or not isinstance(names, (list, tuple)) or not isinstance(outputs, int):
        return
    from zoo.hub import MAX_CFG_ITEMS  # the bound on a stored cfg's lists: more names would not load back

    if 0 < len(names) == outputs <= MAX_CFG_ITEMS and all(isinstance(n, str) for n in names):
        model.pretrained_cfg = {**cfg, "label_names": tuple(names)}
        model.default_cfg = model.pretrained_cfg


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets)``, or ``(inputs, targets, padding_mask)`` (clouds of different sizes, padded)."""
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        raise ZooError(
            f"a batch must be (inputs, targets) or (inputs, targets, padding_mask), got "
            f"{type(batch).__name__}{f' of {len(batch)} items' if isinstance(batch, (list, tuple)) else ''}"
        )
    if len(batch) == 2:
        return batch[0], batch[1], None
    x, mask = batch[0], batch[2]
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == x.shape[:2]):
        raise ZooError(
            f"a batch's third item must be the padding mask of padded clouds, bool (B, N) = {tuple(x.shape[:2])} "
            f"with True = padded point, got {getattr(mask, 'dtype', type(mask).__name__)} "
            f"{tuple(getattr(mask, 'shape', ()))}; give (inputs, targets) otherwise"
        )
    return x, batch[1], mask


def _class_indices(target: torch.Tensor) -> torch.Tensor:
    """Class indices (B,) of a target: itself, or the most likely class of class probabilities (B, C)."""
    return target.argmax(dim=-1) if target.is_floating_point() else target


def _per_channel(values: Any) -> tuple[float, ...] | None:
    """``values`` (a tensor, a sequence of numbers) as a tuple of floats; None for anything else."""
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist() if values.numel() else None
    if not isinstance(values, (list, tuple)) or not values:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return tuple(float(v) for v in values)


def record_normalisation(model: torch.nn.Module, datamodule: Any) -> None:
    """Make ``model.pretrained_cfg`` (and ``default_cfg``) say the per-channel ``mean`` / ``std`` that
    ``datamodule`` normalises its images with (torchvision's ``Normalize`` convention, on pixels scaled to
    [0, 1]): a model trained on those inputs needs them at inference, and timm's ``resolve_data_config`` /
    ``create_transform`` read them from the cfg. A data module without both, a model without a cfg, or values
    whose number of channels differs from the cfg's leave it as it is.

    Args:
        model: the model being trained.
        datamodule: the Trainer's data module (None when the data comes as loaders).
    """
    cfg = getattr(model, "pretrained_cfg", None)
    mean, std = _per_channel(getattr(datamodule, "mean", None)), _per_channel(getattr(datamodule, "std", None))
    if not isinstance(cfg, dict) or mean is None or std is None or len(mean) != len(std):
        return
    recorded = cfg.get("mean")
    if isinstance(recorded, (list, tuple)) and len(recorded) != len(mean):
        return
    if (mean, std) != (_per_channel(recorded), _per_channel(cfg.get("std"))):
        model.pretrained_cfg = {**cfg, "mean": mean, "std": std}
        model.default_cfg = model.pretrained_cfg


class ImageClassifier(LearningRateAttribute, pl.LightningModule):
    """A LightningModule for classification: cross-entropy, accuracy, and the injected optimiser and schedule.

    Subclasses build the network and implement ``forward(x) -> logits``; the architecture's arguments (and
    ``num_classes``, ``label_smoothing``) are saved with ``save_hyperparameters``; the training settings are not
    (they are not part of the model: a checkpoint or ``save_pretrained`` folder rebuilds the architecture).

    Args:
        num_classes: number of classes of the classifier head.
        optimizer: builds the optimiser from the parameter groups (LightningCLI's ``OptimizerCallable``:
            ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)``, or ``class_path: torch.optim.SGD`` in
            YAML); its ``weight_decay`` applies to weights only (:func:`zoo.tasks.optim.parameter_groups`).
            None: the family's ``default_optimizer``.
        lr_scheduler: builds the schedule from the optimiser (``LRSchedulerCallable``); schedules that need the
            run length (:class:`zoo.tasks.optim.WarmupCosineLR`, the default: cosine over the run) get it from the
            Trainer. None: a constant learning rate.
        label_smoothing: label smoothing of the cross-entropy.
        layer_decay: layer-wise learning-rate decay for fine-tuning (BEiT / MAE: 0.65 .. 0.75): the layers of the
            model's ``group_matcher`` (stem, blocks in order, head) train at ``lr * layer_decay ** (L - l)``, the
            head at ``lr`` (:func:`zoo.tasks.optim.layer_scales`). None: one rate. A training setting, not saved
            with the architecture.
        mixup_alpha: MixUp of the training batches (torchvision's ``transforms.v2.MixUp``): each image blended
            with the next in the batch, ``lam * x_i + (1 - lam) * x_(i-1)``, ``lam ~ Beta(alpha, alpha)``, the
            targets blended alike (class probabilities). 0: off.
        cutmix_alpha: CutMix of the training batches (``transforms.v2.CutMix``): a box of area ``1 - lam`` pasted
            from the next image, the targets weighted by the areas. 0: off; with both on, each batch gets one
            of the two at random (timm's ``switch_prob`` 0.5). Validation and test batches are never mixed.
        grad_checkpointing: turn on the family's activation checkpointing (timm's ``set_grad_checkpointing``:
            the same gradients for less memory and about one more forward) when a Trainer sets the model up,
            as timm's ``--grad-checkpointing`` and Hugging Face's ``gradient_checkpointing``; the point-cloud
            families have none.

    Targets are class indices (B,) or class probabilities (B, num_classes) (a data pipeline's own MixUp / CutMix,
    timm's ``Mixup``): the loss is the cross-entropy against them, accuracy counts the most likely class.

    Extra training losses (an MoE layer's load-balancing loss ...) come from the model through
    :meth:`auxiliary_losses`; :meth:`diagnostics` adds logged values. Both are empty here.
    """

    # the optimiser a family trains with when none is given (LightningCLI shows it as null)
    default_optimizer: OptimizerCallable = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)

    def __init__(
        self,
        num_classes: int = 1000,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        label_smoothing: float = 0.0,
        layer_decay: float | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        non_negative_int(
            "num_classes",
            num_classes,
            hint="give the number of classes, or 0 for a model without a "
            "classifier (forward returns the pooled features, as timm's num_classes=0)",
        )
        self.optimizer_factory = check_factory("optimizer", optimizer)
        self.lr_scheduler_factory = check_factory("lr_scheduler", lr_scheduler)
        finite_float("label_smoothing", label_smoothing, 0.0, 1.0)
        self.layer_decay = None if layer_decay is None else check_layer_decay(layer_decay)
        hint = "give a Beta concentration >= 0 (0: off; timm's fine-tuning recipes: mixup 0.8, cutmix 1.0)"
        self.mixup_alpha = finite_float("mixup_alpha", mixup_alpha, 0.0, hint=hint)
        self.cutmix_alpha = finite_float("cutmix_alpha", cutmix_alpha, 0.0, hint=hint)
        if boolean("grad_checkpointing", grad_checkpointing) and not callable(
            getattr(type(self), "set_grad_checkpointing", None)
        ):
            raise ZooError(
                f"{type(self).__name__} has no activation checkpointing (set_grad_checkpointing); leave "
                "grad_checkpointing false"
            )
        self.checkpoint_in_fit = bool(grad_checkpointing)
        self.save_hyperparameters(
            ignore=[
                "weights",
                "optimizer",
                "lr_scheduler",
                "layer_decay",
                "mixup_alpha",
                "cutmix_alpha",
                "grad_checkpointing",
            ]
        )
        self._make_metrics(num_classes)

    def _make_metrics(self, num_classes: int) -> None:
        """Accuracy metrics for ``num_classes`` classes (none without a classifier)."""
        for name in ("train_acc", "val_acc", "test_acc", "val_acc5", "test_acc5"):
            if hasattr(self, name):
                delattr(self, name)
        if num_classes < 2:
            return
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        if num_classes > 5:
            self.val_acc5 = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
            self.test_acc5 = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")

    def set_num_classes(self, num_classes: int) -> None:
        """Record a new head size (``reset_classifier``): hyperparameters, metrics and ``pretrained_cfg`` /
        ``default_cfg`` (:func:`record_num_classes`) follow.

        Args:
            num_classes: the new number of classes (0: no classifier).
        """
        non_negative_int("num_classes", num_classes)
        self.hparams["num_classes"] = int(num_classes)
        self._make_metrics(int(num_classes))
        record_num_classes(self, num_classes)

    def _check_data_classes(self) -> None:
        """One ZooError when the Trainer's data module has another number of classes than the classifier: fewer
        outputs fail in the loss with torch's "Target k is out of bounds", more train silently on classes that
        never occur (and a predictions file's columns no longer match ``class_names``)."""
        data = getattr(getattr(self, "_trainer", None), "datamodule", None)
        classes, outputs = getattr(data, "num_classes", None), getattr(self, "num_classes", None)
        if not (isinstance(outputs, int) and outputs > 0 and isinstance(classes, int) and classes > 0):
            return  # no classifier (features), or a data module that does not say
        if classes != outputs:
            names = getattr(data, "class_names", None)
            shown = f" ({', '.join(map(str, names[:8]))}{' ...' if len(names) > 8 else ''})" if names else ""
            raise ZooError(
                f"the data module has {classes} classes{shown} but the model's classifier has {outputs} "
                f"outputs: build the model with num_classes={classes} (in a recipe, model.init_args.num_classes: "
                f"{classes}), or model.reset_classifier({classes}) to fine-tune"
            )

    def setup(self, stage: str) -> None:
        """Turn on activation checkpointing when built with ``grad_checkpointing=True`` (the families set their
        own switch while building, after this class's constructor)."""
        if self.checkpoint_in_fit:
            self.set_grad_checkpointing(True)
        super().setup(stage)

    def on_fit_start(self) -> None:
        """Check the data module's number of classes against the classifier's (one ZooError naming the fix), and
        record the data module's normalisation and class names in ``pretrained_cfg`` (:func:`record_normalisation`,
        :func:`record_class_names`), so that the checkpoints and ``save_pretrained`` of this fit carry the transform
        the model was trained with and what its outputs mean."""
        self._check_data_classes()
        super().on_fit_start()
        record_normalisation(self, getattr(self.trainer, "datamodule", None))
        record_class_names(self, getattr(self.trainer, "datamodule", None))

    def on_validation_start(self) -> None:
        """Check the data module's number of classes before ``trainer.validate`` (and each validation of a fit)."""
        self._check_data_classes()
        super().on_validation_start()

    def on_test_start(self) -> None:
        """Check the data module's number of classes before ``trainer.test``."""
        self._check_data_classes()
        super().on_test_start()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose keys do not fit with one clear error (before Lightning loads it)."""
        from zoo.hub import check_checkpoint

        check_checkpoint(self, checkpoint)

    # ---------------------------------------------------------------- steps
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing, computed in float32 (safe under autocast): ``-log softmax(z)_y``
        for a class index y, ``-sum_c p_c log softmax(z)_c`` for class probabilities p (B, num_classes); the
        smoothing mixes the target with the uniform distribution, ``(1 - eps) p + eps / C`` (for mixed targets
        the same as smoothing each label before mixing, as timm's ``Mixup``)."""
        if target.is_floating_point() and target.shape != logits.shape:
            raise ZooError(
                f"class-probability targets must have the logits' shape {tuple(logits.shape)}, got "
                f"{tuple(target.shape)}; give class indices (B,) or probabilities (B, num_classes)"
            )
        target = target.float() if target.is_floating_point() else target
        return F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)

    def mix_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch after MixUp / CutMix (``mixup_alpha``, ``cutmix_alpha``): images (B, C, H, W) and
        class probabilities (B, num_classes); unchanged when both are 0. The mixing weights are drawn on the CPU
        from torch's generator (``seed_everything`` makes runs repeat), so no device value is read.

        Args:
            x: the images (B, C, H, W).
            y: their class indices (B,).
        """
        if not (self.mixup_alpha or self.cutmix_alpha):
            return x, y
        if x.ndim != 4 or y.ndim != 1 or y.is_floating_point():
            raise ZooError(
                f"mixup_alpha / cutmix_alpha mix image batches (B, C, H, W) with class indices (B,), got inputs "
                f"{tuple(x.shape)} and targets {y.dtype} {tuple(y.shape)}; set both to 0 for this data (mix the "
                "batches in the data pipeline instead: the task takes class-probability targets)"
            )
        from torchvision.transforms import v2

        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # bf16-true / 16-true make the default half: Beta has no half sampler
        try:
            mixers = [
                mixer(alpha=alpha, num_classes=self.num_classes)
                for mixer, alpha in ((v2.MixUp, self.mixup_alpha), (v2.CutMix, self.cutmix_alpha))
                if alpha > 0
            ]
        finally:
            torch.set_default_dtype(default)
        mixer = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
        return mixer(x, y)  # targets float32 whatever the images' dtype

    def _check_head(self) -> None:
        if not hasattr(self, "train_acc"):
            raise ZooError(
                f"this model has num_classes={self.hparams.num_classes}: it returns features, not class "
                "scores; give it a classifier before training (model.reset_classifier(num_classes))"
            )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._check_head()
        x, y, padding_mask = _unpack(batch)
        x, y = self.mix_batch(x, y)
        logits = self._logits(x, padding_mask)
        loss = self.loss(logits, y)
        self.train_acc(logits.detach(), _class_indices(y))
        self.log("train_loss", loss, prog_bar=True, sync_dist=False)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss + self._extra_terms("train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: Any, stage: str) -> None:
        self._check_head()
        x, y, padding_mask = _unpack(batch)
        logits = self._logits(x, padding_mask)
        loss = self.loss(logits, y)
        y = _class_indices(y)
        acc = self.val_acc if stage == "val" else self.test_acc
        acc(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", acc, prog_bar=True)
        self._extra_terms(stage)
        top5 = getattr(self, f"{stage}_acc5", None)  # the same metrics for val and test
        if top5 is not None:
            top5(logits, y)
            self.log(f"{stage}_acc5", top5)

    # ---------------------------------------------------------------- extra losses from the model
    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Weighted extra losses of the last forward, added to the training loss (and logged as ``{stage}_{name}``);
        a family with such losses (V-MoE's load balancing) overrides this. Tensors only: no host sync."""
        return {}

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Values of the last forward logged as ``{stage}_{name}`` (per step in training, per epoch otherwise),
        e.g. V-MoE's routing statistics; empty here."""
        return {}

    def _extra_terms(self, stage: str) -> torch.Tensor | float:
        """Log the model's auxiliary losses and diagnostics; return the sum of the losses (0.0 without any)."""
        losses = self.auxiliary_losses()
        on_step = stage == "train"
        for name, value in {**{k: v.detach() for k, v in losses.items()}, **self.diagnostics()}.items():
            self.log(f"{stage}_{name}", value, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        return sum(losses.values()) if losses else 0.0

    def _logits(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """``self(x)``, with the batch's ``padding_mask`` when it has one (clouds of different sizes)."""
        if padding_mask is None:
            return self(x)
        if "padding_mask" not in inspect.signature(self.forward).parameters:
            raise ZooError(
                f"the batch carries a padding_mask (clouds of different sizes), which {type(self).__name__} does not "
                "take; give it clouds of one size (the data module's num_points), or use a Set Transformer"
            )
        return self(x, padding_mask=padding_mask)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x, padding_mask = batch, None
        if isinstance(batch, (list, tuple)):
            x = batch[0]
            last = batch[-1]  # (inputs, padding_mask) of padded clouds; (inputs, targets ...) otherwise
            if (
                len(batch) > 1
                and isinstance(last, torch.Tensor)
                and last.dtype == torch.bool
                and last.shape == x.shape[:2]
            ):
                padding_mask = last
        out = self._logits(x, padding_mask)
        return out.softmax(dim=-1) if hasattr(self, "train_acc") else out  # class probabilities, or features

    @property
    def backbone(self) -> torch.nn.Module:
        """The network without its classifier head (``get_classifier()``) and metrics: what Lightning's
        ``BackboneFinetuning`` freezes, then trains from its ``unfreeze_backbone_at_epoch`` as a parameter group of
        its own (the schedule steps it too). A module the subclass registers as ``backbone`` wins.

        A module built on each access that holds the other top-level modules and the parameters set on the task
        itself (a ViT's ``pos_embed`` and ``cls_token``: they freeze and unfreeze with the blocks). Not a
        submodule, so the ``state_dict`` keys stay as they are."""
        registered = self._modules.get("backbone")
        if registered is not None:
            return registered
        head = self.get_classifier() if callable(getattr(self, "get_classifier", None)) else None
        backbone = torch.nn.Module()
        for name, module in self.named_children():
            if module is not head and not isinstance(module, Metric) and any(True for _ in module.parameters()):
                backbone.add_module(name, module)
        for name, param in self.named_parameters(recurse=False):
            backbone.register_parameter(name, param)
        return backbone

    # ---------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weights (the optimiser's weight decay) and norms, biases, 1-d parameters (no decay); per layer, with
        timm's ``lr_scale``, under ``layer_decay``."""
        return parameter_groups(self, layer_decay=self.layer_decay)

    def configure_optimizers(self, total_steps: int | None = None, steps_per_epoch: float | None = None) -> Any:
        """The optimiser over :meth:`parameter_groups` and its schedule, in Lightning's format.

        Under a Trainer the run length comes from it; in a plain PyTorch loop call
        ``model.configure_optimizers(total_steps=N)`` (and ``steps_per_epoch`` for an epoch-counted warm-up) and
        take ``["optimizer"]`` and ``["lr_scheduler"]["scheduler"]`` (step it every ``["interval"]``).
        """
        trainer = self._trainer if total_steps is None else None
        return build_optimization(
            self,
            self.optimizer_factory or type(self).default_optimizer,
            self.lr_scheduler_factory,
            trainer=trainer,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            layer_decay=self.layer_decay,
        )
