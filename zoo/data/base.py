"""The loader plumbing shared by the image and point-cloud data modules (digits, CIFAR, image folders, point clouds).

:class:`ZooDataModule` checks and holds ``batch_size`` / ``num_workers``, builds every DataLoader with the same
settings (pinned memory when CUDA is available, persistent workers when there are workers), builds its datasets on
first use when a loader is asked for before ``setup`` (``Trainer`` calls ``setup``; a script may not), and gives the
predict loader the inputs of the evaluation split without their labels (:class:`InputsOnly`).
"""

from __future__ import annotations

import numbers
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.errors import ZooError

__all__ = ["DataArgumentError", "InputsOnly", "ZooDataModule", "check_loader_args"]


class DataArgumentError(ZooError, ValueError):
    """A bad data module argument (``batch_size``, ``image_size`` ...): a ZooError, the zoo's one error for bad
    input, and a ValueError, as the image modules raised before."""


_LoaderArgumentError = DataArgumentError  # the earlier name


def check_loader_args(batch_size: int, num_workers: int) -> None:
    """Raise one ZooError (also a ValueError) unless ``batch_size`` is an integer >= 1 and ``num_workers`` an
    integer >= 0 (bools and floats refused, as torch's ``BatchSampler`` refuses them)."""
    for name, value, minimum, kind in (
        ("batch_size", batch_size, 1, "a positive integer"),
        ("num_workers", num_workers, 0, "a non-negative integer"),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise DataArgumentError(f"{name} must be {kind}, got {value!r}")


class InputsOnly(Dataset):
    """The inputs of a labelled dataset without their labels: item i is ``dataset[i][0]`` (for prediction)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.collate_fn = getattr(dataset, "collate_fn", None)  # the inputs batch as the dataset's own items do

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index][0]


class ZooDataModule(pl.LightningDataModule):
    """Base of the image and point-cloud data modules: the DataLoaders over the splits that ``setup`` builds.

    Subclasses build ``train_dataset``, ``val_dataset`` and, unless ``test_split = "val"``, ``test_dataset`` in
    ``setup(stage)``, which must be idempotent. A loader asked for before its split exists runs ``setup`` with the
    loader's stage (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``) first.

    Loaders: train shuffled, val / test / predict in a fixed order; test and predict read the ``test_split``
    (``"val"`` for datasets that ship no labelled test split), predict without labels (each batch is the inputs
    tensor alone).

    Args:
        batch_size: samples per batch (an integer >= 1).
        num_workers: DataLoader worker processes (an integer >= 0; 0 loads in the main process).
    """

    test_split: str = "test"

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        """A DataLoader over ``dataset`` with the module's batch size and workers, and the dataset's
        ``collate_fn`` when it has one (clouds of different sizes: :func:`zoo.data.pointcloud.pad_point_clouds`)."""
        return DataLoader(
            dataset,
            collate_fn=getattr(dataset, "collate_fn", None),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
        )

    def _split(self, split: str, stage: str) -> Dataset:
        """The dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``), running ``setup(stage)`` first when it
        has not been built yet."""
        attribute = f"{split}_dataset"
        if getattr(self, attribute) is None:
            self.setup(stage)
        dataset = getattr(self, attribute)
        assert dataset is not None, f"{type(self).__name__}.setup({stage!r}) did not build {attribute}"
        return dataset

    def train_dataloader(self) -> DataLoader:
        """The train split, shuffled."""
        return self._loader(self._split("train", "fit"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The val split in a fixed order."""
        return self._loader(self._split("val", "validate"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The ``test_split`` in a fixed order."""
        if self.test_split == "val":
            return self.val_dataloader()
        return self._loader(self._split(self.test_split, "test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The inputs of the ``test_split`` (no labels) in a fixed order."""
        return self._loader(InputsOnly(self._split(self.test_split, "predict")), shuffle=False)
