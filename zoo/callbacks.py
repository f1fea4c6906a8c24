"""Lightning callbacks shipped with zoo.

``BackboneFinetuning`` is Lightning's, with the zoo's parameter groups for the backbone it unfreezes (weight
decay on weights only, and the task's ``layer_decay``).

``PredictionWriter`` saves what ``predict_step`` returns to one file, in the dataset's order, also under DDP:

    zoo predict --config digits_depth_scaled_resnet --ckpt_path run.ckpt \\
        --trainer.callbacks+=zoo.callbacks.PredictionWriter --trainer.callbacks.output preds.pt

or in a recipe's ``trainer: callbacks:`` list (``class_path: zoo.callbacks.PredictionWriter``, ``init_args: {output:
preds.csv, top_k: 3}``), or in Python: ``Trainer(callbacks=[PredictionWriter("preds.pt")]).predict(model, dm)``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BackboneFinetuning as LightningBackboneFinetuning
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.optim import Optimizer

from zoo.errors import ZooError
from zoo.hub import atomic_write

__all__ = ["BackboneFinetuning", "PredictionWriter"]

_FORMATS = {".pt": "pt", ".pth": "pt", ".csv": "csv"}


class BackboneFinetuning(LightningBackboneFinetuning):
    """Lightning's ``BackboneFinetuning`` (the same arguments and rate schedule: the backbone frozen until
    ``unfreeze_backbone_at_epoch``, then trained from ``backbone_initial_ratio_lr`` times the current rate, that
    rate multiplied by ``lambda_func`` each epoch and, with ``should_align``, capped at the current rate), whose
    backbone joins the optimiser as the zoo task's own groups are built (:func:`zoo.tasks.optim.parameter_groups`):
    weights with the optimiser's weight decay, norms, biases, 1-d parameters and ``no_weight_decay()`` names without
    (Lightning's adds one group with weight decay on everything), and under the task's ``layer_decay`` one pair of
    groups per layer, at the backbone's rate times the layer's factor ``layer_decay ** (L - l)``. Every group it
    added follows the backbone's rate, each keeping its factor; a resumed fit restores them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._added: list[tuple[int, float]] = []  # (index in the optimiser's groups, factor of the backbone's rate)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Unfreeze the backbone at ``unfreeze_backbone_at_epoch`` as the zoo's groups; later, set their rates."""
        from zoo.tasks.optim import parameter_groups

        added = {index for index, _ in self._added}
        # the task's rate: its head's (under layer_decay the first group is the stem's, at a fraction of it)
        current = max(g["lr"] for i, g in enumerate(optimizer.param_groups) if i not in added)
        if epoch == self.unfreeze_backbone_at_epoch:
            given = self.backbone_initial_lr
            rate = given if given is not None else current * self.backbone_initial_ratio_lr
            self.previous_backbone_lr = rate
            self.make_trainable(pl_module.backbone)
            params = self.filter_params(pl_module.backbone, train_bn=self.train_bn, requires_grad=True)
            wanted = {id(p) for p in self.filter_on_optimizer(optimizer, params)}
            self._added = []
            for group in parameter_groups(pl_module, layer_decay=getattr(pl_module, "layer_decay", None)):
                chosen = [p for p in group["params"] if id(p) in wanted]
                if not chosen:
                    continue
                scale = float(group.get("lr_scale", 1.0))
                added = {"params": chosen, "lr": rate * scale}
                if "weight_decay" in group:
                    added["weight_decay"] = group["weight_decay"]
                optimizer.add_param_group(added)
                self._added.append((len(optimizer.param_groups) - 1, scale))
        elif epoch > self.unfreeze_backbone_at_epoch:
            rate = self.lambda_func(epoch + 1) * self.previous_backbone_lr
            rate = current if (self.should_align and rate > current) else rate
            for index, scale in self._added:
                optimizer.param_groups[index]["lr"] = rate * scale
            self.previous_backbone_lr = rate

    def state_dict(self) -> dict[str, Any]:
        """Lightning's state, and the groups this callback added (a resumed fit goes on setting their rates)."""
        return {**super().state_dict(), "zoo_added_groups": [list(pair) for pair in self._added]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore Lightning's state and the groups added (a checkpoint's numbers, checked)."""
        added = state_dict.get("zoo_added_groups", [])
        if not isinstance(added, list) or not all(
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and isinstance(pair[0], int)
            and isinstance(pair[1], (int, float))
            for pair in added
        ):
            raise ZooError("the checkpoint's BackboneFinetuning state is damaged (zoo_added_groups); resume without it")
        self._added = [(int(i), float(scale)) for i, scale in added]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "zoo_added_groups"})


class PredictionWriter(BasePredictionWriter):
    """Write the predictions of ``Trainer.predict`` (``zoo predict``) to ``output``, one entry per sample in the
    order of the predict dataset, atomically (``zoo.hub.atomic_write``: never a half-written file).

    Each batch's output is split into samples: a tensor along its first dimension, a dict of tensors key by
    key, a list or tuple item by item (its length must be the batch size). ``ImageClassifier.predict_step``
    gives class probabilities, (B, num_classes); the translation task a tuple of per-sentence dicts.

    - ``.pt`` / ``.pth`` (``torch.save``; read with ``torch.load(path)``): ``{"index": LongTensor (N,), the
      samples' positions in the predict dataset, ascending; "predictions": the per-sample outputs stacked back
      (a tensor when every sample's is a tensor of one shape, a dict of such for dicts, else a list)}``, and
      ``"files"`` (the inputs' files) when the data module lists them.
      Several predict dataloaders: a list with one such dict per dataloader.
    - ``.csv``: a header, then one row per sample: ``index`` (then ``file``, the input's file, when the data
      module lists them as ``predict_files``: :class:`zoo.data.ImageFilesDataModule`, the image folders) and the
      sample's values (a 1-D prediction per sample; the columns are the data module's ``class_names`` when
      there is one name per column, else the model's ``pretrained_cfg["label_names"]`` (recorded by its fit),
      else 0, 1, ...). Predictions that are not one number or one row per sample need ``.pt``.
    - ``top_k``: instead of the full (N, C) scores, the k best classes per sample, as ``torch.topk`` gives them:
      ``.pt`` holds ``predictions = {"values": (N, k), "indices": (N, k)}``, ``.csv`` the columns
      ``top1_class, top1_score, ..., topk_class, topk_score`` (class indices; scores as predict_step gave them).

    DDP: every process keeps the outputs of its own samples with their dataset indices (Lightning's predict
    sampler splits the dataset without repeating samples); at the end of the epoch they are gathered on rank 0
    (``torch.distributed.gather_object``, no shared file system needed), which writes the one file in dataset
    order; all processes then wait for it (a barrier), so the file exists when ``predict`` returns anywhere.
    With a writer, ``zoo predict`` no longer also keeps the predictions in memory (``return_predictions``
    defaults to false; give ``--return_predictions true`` to keep them).
    """

    def __init__(self, output: str | os.PathLike, top_k: int | None = None) -> None:
        """``output``: the file to write (``.pt``, ``.pth`` or ``.csv``); ``top_k``: keep the k best classes."""
        super().__init__(write_interval="batch")
        path = Path(output)
        if path.is_dir():
            raise ZooError(
                f"PredictionWriter output {str(output)!r} is a folder: give a file path such as "
                f"{path / 'predictions.pt'}"
            )
        if path.suffix.lower() not in _FORMATS:
            raise ZooError(
                f"PredictionWriter output {str(output)!r}: give a file ending in .pt (torch.save, any "
                "predictions) or .csv (one row of numbers per sample)"
            )
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ZooError(
                f"PredictionWriter top_k={top_k!r}: give a positive number of classes, or leave it unset "
                "for all the scores"
            )
        self.output = path
        self.format = _FORMATS[path.suffix.lower()]
        self.top_k = top_k
        self._samples: dict[int, list[tuple[int, Any]]] = {}
        self.written: int | None = None  # samples written (rank 0), None before the end of predict

    # ---------------------------------------------------------------------------------------------- collect
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples = {}
        self.written = None

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Split the batch's output into samples and keep them with their dataset indices (on the CPU)."""
        samples = self._samples.setdefault(dataloader_idx, [])
        if self.top_k is not None:
            prediction = self._top_k(prediction)
        items = _unbatch(_to_cpu(prediction))
        if batch_indices is None or len(batch_indices) == 0:  # not a torch DataLoader: positions count on
            if trainer.world_size > 1:
                raise ZooError(
                    "PredictionWriter under DDP needs the dataset indices of each batch, which Lightning "
                    "records only for torch DataLoaders: return a DataLoader from predict_dataloader"
                )
            start = samples[-1][0] + 1 if samples else 0
            batch_indices = range(start, start + len(items))
        if len(items) != len(batch_indices):
            raise ZooError(
                f"predict_step returned {_describe(prediction)} for a batch of {len(batch_indices)} "
                "samples: PredictionWriter writes one prediction per sample, so the output's first "
                "dimension (or length) must be the batch size"
            )
        if self.format == "csv" and not samples:  # check the first batch: fail before predicting everything
            if dataloader_idx > 0:
                raise ZooError("PredictionWriter: several predict dataloaders need a .pt output (a .csv holds one)")
            _csv_row(items[0], prediction)
        samples.extend(zip((int(i) for i in batch_indices), items))

    def _top_k(self, prediction: Any) -> dict[str, torch.Tensor]:
        if not (isinstance(prediction, torch.Tensor) and prediction.ndim == 2 and prediction.is_floating_point()):
            raise ZooError(
                f"PredictionWriter top_k={self.top_k} needs class scores, a (batch, classes) float tensor, "
                f"from predict_step; it returned {_describe(prediction)}: leave top_k unset"
            )
        if self.top_k > prediction.shape[1]:
            raise ZooError(f"PredictionWriter top_k={self.top_k} is more than the {prediction.shape[1]} classes")
        values, indices = prediction.topk(self.top_k, dim=1)
        return {"values": values, "indices": indices}

    # ---------------------------------------------------------------------------------------------- write
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather every process's samples on rank 0, order them by dataset index and write the file."""
        local = self._samples
        self._samples = {}
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] | None = [None] * trainer.world_size if trainer.global_rank == 0 else None
            torch.distributed.gather_object(local, gathered, dst=0)
            parts = gathered or []
        else:
            parts = [local]
        if trainer.global_rank == 0:
            merged: dict[int, dict[int, Any]] = {}
            for part in parts:
                for loader, samples in part.items():
                    merged.setdefault(loader, {}).update(samples)  # a sample seen twice keeps one entry
            loaders = [dict(sorted(merged[k].items())) for k in sorted(merged)]
            self.written = sum(len(x) for x in loaders)
            names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
            if names is None:  # the names the model's fit recorded (its checkpoint or save_pretrained carries them)
                names = (getattr(pl_module, "pretrained_cfg", None) or {}).get("label_names")
            files = getattr(getattr(trainer, "datamodule", None), "predict_files", None)
            if len(loaders) != 1 or not isinstance(files, (list, tuple)) or max(loaders[0], default=-1) >= len(files):
                files = None  # the data module names the files of its one predict dataset only
            if self.format == "pt":
                tables = [
                    {"index": torch.tensor(list(x), dtype=torch.long), "predictions": _collate(list(x.values()))}
                    for x in loaders
                ]
                if files is not None:
                    tables[0]["files"] = [str(files[i]) for i in loaders[0]]
                data = tables[0] if len(tables) == 1 else tables
                atomic_write(self.output, lambda tmp: torch.save(data, tmp))
            else:
                text = _csv_text(loaders[0] if loaders else {}, names, self.top_k, files)
                atomic_write(self.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        trainer.strategy.barrier("zoo.callbacks.PredictionWriter")

    def summary(self) -> str:
        """One line: what was written where."""
        if self.written is None:
            return f"predictions not written to {self.output} (predict did not finish)"
        return f"wrote {self.written} predictions to {self.output}"


# ------------------------------------------------------------------------------------------------ helpers


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


def _unbatch(prediction: Any) -> list[Any]:
    """One entry per sample: rows of a tensor, dicts of rows of a dict, items of a list or tuple."""
    if isinstance(prediction, torch.Tensor):
        if prediction.ndim == 0:
            raise ZooError(
                "predict_step returned a scalar tensor: PredictionWriter writes one prediction per "
                "sample, so return a tensor whose first dimension is the batch"
            )
        return list(prediction.unbind(0))
    if isinstance(prediction, Mapping):
        columns = {k: _unbatch(v) for k, v in prediction.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ZooError(
                f"predict_step returned a dict whose entries have different batch sizes "
                f"({ {k: len(v) for k, v in columns.items()} }): PredictionWriter needs one per sample"
            )
        (n,) = lengths
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    if isinstance(prediction, (list, tuple)):
        return list(prediction)
    raise ZooError(
        f"predict_step returned {_describe(prediction)}: PredictionWriter writes tensors, dicts of "
        "tensors or one item per sample in a list or tuple"
    )


def _collate(samples: list[Any]) -> Any:
    """Samples stacked back: a tensor for tensors of one shape, a dict of collated entries for dicts with the same
    keys, a tensor for plain numbers, else the list."""
    if not samples:
        return []
    first = samples[0]
    if all(isinstance(s, torch.Tensor) for s in samples) and len({s.shape for s in samples}) == 1:
        return torch.stack(samples)
    if all(isinstance(s, Mapping) for s in samples) and len({tuple(s) for s in samples}) == 1:
        return {k: _collate([s[k] for s in samples]) for k in first}
    if all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in samples):
        return torch.tensor(samples)
    return samples


def _csv_row(sample: Any, prediction: Any) -> list[float]:
    """A sample's numbers for one CSV row (a number, or a 1-D tensor / top-k dict)."""
    if isinstance(sample, Mapping) and set(sample) == {"values", "indices"}:  # top_k
        return [x for pair in zip(sample["indices"].tolist(), sample["values"].tolist()) for x in pair]
    if isinstance(sample, torch.Tensor) and sample.ndim <= 1:
        return sample.reshape(-1).tolist()
    if isinstance(sample, (int, float)) and not isinstance(sample, bool):
        return [sample]
    raise ZooError(
        f"PredictionWriter: a .csv holds one row of numbers per sample, and predict_step returned "
        f"{_describe(prediction)}: write to a .pt file instead (torch.save keeps any predictions)"
    )


def _csv_text(
    samples: Mapping[int, Any],
    class_names: Sequence[str] | None,
    top_k: int | None,
    files: Sequence[str] | None = None,
) -> str:
    rows = [[index, *_csv_row(sample, sample)] for index, sample in samples.items()]
    width = len(rows[0]) - 1 if rows else 0
    if top_k is not None:
        header = [f"top{i}_{kind}" for i in range(1, top_k + 1) for kind in ("class", "score")]
    elif class_names is not None and len(class_names) == width:
        header = [str(name) for name in class_names]
    else:
        header = [str(i) for i in range(width)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if files is not None:  # the input file of each row, after its index
        header = ["file", *header]
        rows = [[row[0], str(files[row[0]]), *row[1:]] for row in rows]
    writer.writerow(["index", *header])
    writer.writerows(rows)
    return out.getvalue()
