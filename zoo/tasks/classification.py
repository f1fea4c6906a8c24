"""Image classification training logic shared by every image family (ResNets, ViTs, MoE ...)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from zoo.errors import ZooError
from zoo.validation import (
    boolean,
    choice,
    finite_float,
    int_sequence,
    pair_in_unit_interval,
    positive_int,
    probability,
)

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULERS = ("cosine", "step", "constant")


class ImageClassifier(pl.LightningModule):
    """A LightningModule for classification: cross-entropy, accuracy, optimizer and LR schedule.

    Subclasses build the network and implement ``forward(x) -> logits``; the hyperparameters below
    (and the subclass's own arguments) are saved with ``save_hyperparameters``.

    Args:
        num_classes: number of classes of the classifier head.
        optimizer: ``"sgd"`` (momentum, optionally Nesterov), ``"adamw"`` or ``"adam"``.
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 / decoupled weight decay; not applied to norms and biases.
        betas: Adam betas.
        nesterov: Nesterov momentum for SGD.
        scheduler: ``"cosine"`` (per step, after a linear warm-up), ``"step"`` (multiply by
            ``lr_gamma`` at each epoch in ``milestones``) or ``"constant"``.
        warmup_epochs: linear warm-up length (fractions allowed) for ``"cosine"``.
        milestones: epochs at which ``"step"`` decays the learning rate.
        lr_gamma: decay factor of ``"step"``.
        label_smoothing: label smoothing of the cross-entropy.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        nesterov: bool = False,
        scheduler: str = "cosine",
        warmup_epochs: float = 0.0,
        milestones: Sequence[int] = (),
        lr_gamma: float = 0.1,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        choice("optimizer", optimizer, OPTIMIZERS)
        choice("scheduler", scheduler, SCHEDULERS)
        positive_int("num_classes", num_classes)
        finite_float("lr", lr, 0.0, low_open=True)
        probability("momentum", momentum)
        finite_float("weight_decay", weight_decay, 0.0)
        pair_in_unit_interval("betas", betas)
        if boolean("nesterov", nesterov) and optimizer == "sgd" and momentum == 0:
            raise ZooError("nesterov=True needs momentum > 0 (Nesterov's method is a momentum method); "
                           "set momentum (e.g. 0.9) or nesterov=False")
        finite_float("warmup_epochs", warmup_epochs, 0.0)
        int_sequence("milestones", milestones, min_value=0, allow_empty=True)
        finite_float("lr_gamma", lr_gamma, 0.0, low_open=True)
        finite_float("label_smoothing", label_smoothing, 0.0, 1.0)
        self.save_hyperparameters(ignore=["weights"])
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        if num_classes > 5:
            self.val_acc5 = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose keys do not fit with one clear error (before Lightning loads it)."""
        from zoo.hub import check_state_dict

        check_state_dict(self, checkpoint.get("state_dict", {}), source="checkpoint")

    # ---------------------------------------------------------------- steps
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing, computed in float32 (safe under autocast)."""
        return F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_acc(logits.detach(), y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=False)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss + self._routing("train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        acc = self.val_acc if stage == "val" else self.test_acc
        acc(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", acc, prog_bar=True)
        self._routing(stage)
        if stage == "val" and hasattr(self, "val_acc5"):
            self.val_acc5(logits, y)
            self.log("val_acc5", self.val_acc5)

    # ---------------------------------------------------------------- mixture-of-experts layers
    def moe_modules(self) -> list[nn.Module]:
        """The :class:`zoo.nn.MoE` layers of the network (found once, in module order)."""
        layers = self.__dict__.get("_moe_layers")
        if layers is None:
            from zoo.nn.moe import MoE

            layers = [m for m in self.modules() if isinstance(m, MoE)]
            self.__dict__["_moe_layers"] = layers  # a plain attribute: not a submodule, not in the state dict
        return layers

    def _routing(self, stage: str) -> torch.Tensor | float:
        """Log the routing statistics of the last forward of every MoE layer (averaged over layers) and return
        the auxiliary loss ``aux_loss_weight * sum of the layers' aux_loss`` (0.0 without MoE layers).

        Logged (``{stage}_moe/...``): ``aux_loss``, ``dropped_fraction`` (routed assignments over capacity),
        ``router_entropy`` (mean entropy of the gates), ``expert_load_max`` (most tokens an expert got / mean
        tokens per expert: 1 is perfectly balanced), ``expert_load_min`` (fewest / mean: 0 is an idle expert).
        Tensors only: no host sync in the step.
        """
        layers = self.moe_modules()
        if not layers:
            return 0.0
        aux = torch.stack([m.aux_loss.float() for m in layers]).sum()
        load = torch.stack([m.stats["tokens_per_expert"].float() for m in layers])
        stats = {
            "aux_loss": aux.detach(),
            "dropped_fraction": torch.stack([m.stats["dropped_fraction"].float() for m in layers]).mean(),
            "router_entropy": torch.stack([m.stats["router_entropy"].float() for m in layers]).mean(),
            "expert_load_max": (load.amax(dim=1) / load.mean(dim=1).clamp_min(1e-12)).mean(),
            "expert_load_min": (load.amin(dim=1) / load.mean(dim=1).clamp_min(1e-12)).mean(),
        }
        on_step = stage == "train"
        for name, value in stats.items():
            self.log(f"{stage}_moe/{name}", value, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        return self.hparams.get("aux_loss_weight", 0.0) * aux

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)

    # ---------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Two groups: weights with decay; norms, biases and 1-d parameters without."""
        decay, no_decay, seen = [], [], set()
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
                (no_decay if is_norm or name.endswith("bias") or p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.parameter_groups()
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        else:
            opt = torch.optim.Adam(groups, lr=hp.lr, betas=tuple(hp.betas))
        if hp.scheduler == "constant":
            return opt
        if hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(hp.milestones), gamma=hp.lr_gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = self.trainer.estimated_stepping_batches
        if not (math.isfinite(total) and total >= 1):
            # max_epochs=-1 with max_steps=-1 (inf), or an iterable dataset of unknown length without max_steps
            # (Lightning then reports max_steps, -1): a cosine over an unknown number of steps cannot be laid out
            raise ZooError(
                "scheduler='cosine' needs a bounded run (it decays over the total number of optimizer steps), but "
                f"this trainer's run has no known step count (max_epochs={self.trainer.max_epochs}, "
                f"max_steps={self.trainer.max_steps}); set --trainer.max_epochs N or --trainer.max_steps N "
                "(Trainer(max_epochs=...) / Trainer(max_steps=...)), or use --model.init_args.scheduler constant "
                "or step, which need no total"
            )
        total = int(total)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup = min(int(round(hp.warmup_epochs * total / max_epochs)), total - 1)

        def cosine_with_warmup(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

