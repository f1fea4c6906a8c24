"""The loader plumbing shared by the image and point-cloud data modules (digits, CIFAR, image folders, point clouds).

:class:`ZooDataModule` checks and holds ``batch_size`` / ``num_workers``, builds every DataLoader with the same
settings (pinned memory when CUDA is available, persistent workers when there are workers), builds its datasets on
first use when a loader is asked for before ``setup`` (``Trainer`` calls ``setup``; a script may not), and gives the
predict loader the inputs of the evaluation split without their labels (:class:`InputsOnly`).

Training loaders are resumable: epoch e's order is a permutation seeded by the run's seed and e
(:class:`EpochShuffleSampler`, sharded over the Trainer's processes), and each sample's random augmentation draws
from a generator seeded by (seed, e, index) (:class:`SeededSamples`), and the loader records how far into its
epoch it is (:class:`TrainingLoader`), so a resumed fit sees the same batches, augmented the same way, as the
uninterrupted fit, whatever the number of workers, from an epoch's end or its middle.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zoo.errors import ZooError

__all__ = [
    "DataArgumentError",
    "EpochShuffleSampler",
    "InputsOnly",
    "SeededSamples",
    "TrainingLoader",
    "ZooDataModule",
    "check_loader_args",
    "resume_position",
    "run_seed",
    "sample_seed",
]


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


_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random augmentation in ``epoch`` of a run seeded ``seed``: the three numbers
    mixed by SplitMix64's finaliser (x ^= x >> 30; x *= 0xbf58476d1ce4e5b9; x ^= x >> 27; x *= 0x94d049bb133111eb;
    x ^= x >> 31, once per number folded in), so that neighbouring indices and epochs get unrelated streams; 63
    bits (a valid ``torch.Generator`` seed).

    Args:
        seed: the run's seed.
        epoch: the epoch.
        index: the sample's index in the dataset.
    """
    x = 0x9E3779B97F4A7C15
    for value in (seed, epoch, index):
        x = (x + (int(value) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _MASK64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


class EpochShuffleSampler(DistributedSampler):
    """The training order: in epoch e a permutation seeded by ``seed + e`` (torch's ``DistributedSampler``, whose
    ``set_epoch`` Lightning calls at each epoch's start), this process's shard of it, each index paired with its
    :func:`sample_seed` for :class:`SeededSamples`. The order depends on the seed and the epoch alone, so a fit
    resumed at epoch e (a new process, new workers) continues it; Lightning keeps it under DDP (it is a
    ``DistributedSampler``) rather than swapping in its own.

    Args:
        dataset: the dataset (its length).
        num_replicas: the number of processes sharing the data (the Trainer's world size).
        rank: this process's rank.
        seed: the run's seed, the same in every process.
        drop_last: drop the tail that does not divide evenly among the processes (else repeat the head).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self._resume: tuple[int, int] | None = None  # (epoch, position): where a resumed epoch goes on
        self.skipped = 0  # the positions the current pass skipped (those a resumed fit had taken)

    def resume_at(self, epoch: int, position: int) -> None:
        """Make the next pass, if it is over ``epoch``, start at ``position`` of its order (a fit resumed in the
        middle of that epoch); a pass over another epoch starts at its beginning.

        Args:
            epoch: the epoch the interrupted fit was in.
            position: how many samples of this process's shard it had already taken.
        """
        self._resume = (int(epoch), int(position))

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        start = self.skipped = resume_position(self)
        for position, index in enumerate(super().__iter__()):
            if position >= start:
                yield index, sample_seed(self.seed, self.epoch, index)


def resume_position(order: Any) -> int:
    """Where a pass of ``order`` (a sampler or batch sampler with ``epoch`` and a ``_resume`` of (epoch, position)
    or None) over its current epoch starts: the resumed position while the epoch is the resumed one (torch's
    worker iterator asks for the order twice when it starts), else 0, the resume then forgotten.

    Args:
        order: the sampler or batch sampler.
    """
    resume = order._resume
    if resume is not None and resume[0] != order.epoch:
        order._resume = resume = None
    return resume[1] if resume is not None else 0


class SeededSamples(Dataset):
    """A dataset whose item ``(index, seed)`` is ``dataset[index]`` computed with torch's CPU generator seeded by
    ``seed`` (the random crops, flips and policies of its transform), the generator's state restored after, so
    loading in the main process leaves the training's random stream (dropout, MixUp) as it was. A plain index
    (a sampler Lightning swapped in, e.g. for ``overfit_batches``) reads the item unseeded.

    Args:
        dataset: the dataset whose items are seeded.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.collate_fn = getattr(dataset, "collate_fn", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        state = torch.random.get_rng_state()
        torch.random.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.random.set_rng_state(state)


class _FirstBatchStart:
    """An iterator that creates ``start()``'s iterator at its first ``next``, and knows where in its epoch it is:
    ``epoch`` and ``taken`` (the batches of the epoch trained on, those a resumed pass skipped included), set from
    ``position()`` = (epoch, batches skipped) once the first batch has come (the order is fixed by then)."""

    def __init__(self, start: Any, position: Any) -> None:
        self._start, self._position, self._iterator = start, position, None
        self.epoch: int | None = None
        self.taken = 0

    def __iter__(self) -> _FirstBatchStart:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        if self.epoch is None:
            self.epoch, self.taken = self._position()
        self.taken += 1
        return batch

    def __getstate__(self) -> dict[str, Any]:  # a pickled loop state holds no live iterator (as Lightning's)
        return {"_start": None, "_position": None, "_iterator": None, "epoch": self.epoch, "taken": self.taken}


class TrainingLoader(DataLoader):
    """A DataLoader whose epoch starts at its first batch, and which resumes in the middle of an epoch.

    ``iter()`` returns an iterator that asks the sampler for the epoch's order (and starts the workers'
    prefetching) only when the first batch is requested: Lightning calls ``iter()`` on the training loader before
    it calls the sampler's ``set_epoch``, and with worker processes the order was fixed at that call, so the first
    epoch of a resumed fit repeated epoch 0's. ``state_dict`` / ``load_state_dict`` (Lightning's resumable-loader
    protocol, saved with its loops in every checkpoint) record the epoch and the batches of it already returned,
    and a fit resumed from a checkpoint written in the middle of an epoch goes on with the batches that follow
    (with an :class:`EpochShuffleSampler`, or a batch sampler that has ``resume_at``; other samplers restart the
    epoch, as Lightning does)."""

    _pass: _FirstBatchStart | None = None

    def __iter__(self) -> Any:
        self._pass = _FirstBatchStart(super().__iter__, self._position)
        return self._pass

    def _position(self) -> tuple[int, int]:
        """(the order's epoch, the batches of it this pass skipped)."""
        resumable = self._resumable()
        if resumable is None:
            return int(getattr(self.sampler, "epoch", 0)), 0
        order, per_batch = resumable
        return int(order.epoch), order.skipped // per_batch

    def _resumable(self) -> tuple[Any, int] | None:
        """What can start an epoch in its middle (``resume_at(epoch, position)``, ``skipped``, ``epoch``): a batch
        sampler (positions are batches: ``zoo.data.translation.TokenBatchSampler``) or the sampler (positions are
        samples: :class:`EpochShuffleSampler`), with the positions per batch; None for other samplers."""
        if hasattr(self.batch_sampler, "resume_at"):
            return self.batch_sampler, 1
        if hasattr(self.sampler, "resume_at") and self.batch_size:
            return self.sampler, self.batch_size
        return None

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": the epoch of the last pass begun, "batches": the batches of it trained on so far}`` (those a
        resumed pass skipped included); before any batch, the sampler's epoch and 0."""
        if self._pass is not None and self._pass.epoch is not None:
            return {"epoch": self._pass.epoch, "batches": self._pass.taken}
        return {"epoch": self._position()[0], "batches": 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the recorded epoch after its recorded batches (a checkpoint's numbers, checked).

        Args:
            state_dict: what :meth:`state_dict` returned in the interrupted fit.
        """
        epoch, batches = (
            (state_dict.get(k) for k in ("epoch", "batches")) if isinstance(state_dict, dict) else (None,) * 2
        )
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, batches)):
            raise ZooError(
                "the checkpoint's training-loader state is damaged (expected non-negative integers 'epoch' and "
                f"'batches', got {repr(state_dict)[:200]}); resume from another checkpoint"
            )
        resumable = self._resumable()
        if resumable is not None:
            order, per_batch = resumable
            order.resume_at(epoch, batches * per_batch)


def run_seed(world_size: int) -> int:
    """The seed the training order derives from: ``seed_everything``'s (``PL_GLOBAL_SEED``); without one, torch's
    initial seed in a single process (random unless the script seeded torch) and 0 across processes (every rank
    must shuffle alike, as Lightning's own sampler does).

    Args:
        world_size: the number of processes sharing the data.
    """
    given = os.environ.get("PL_GLOBAL_SEED")
    if given is not None and given.lstrip("-").isdigit():
        return int(given) % 2**63
    return torch.initial_seed() % 2**63 if world_size == 1 else 0  # room for seed + epoch in a generator seed


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
        ``collate_fn`` when it has one (clouds of different sizes: :func:`zoo.data.pointcloud.pad_point_clouds`).
        ``shuffle``: the resumable training order (:class:`EpochShuffleSampler` over :class:`SeededSamples`),
        sharded over the Trainer's data-parallel processes (its ``distributed_sampler_kwargs``) unless its
        ``use_distributed_sampler`` is off. Every loader draws its
        workers' seeds from a generator of its own, not from torch's global one, so that iterating a loader (a
        sanity check, a validation) does not move the training's random stream."""
        sampler = None
        if shuffle:
            # the data-parallel processes as Lightning would shard them (its Trainer switch honoured)
            trainer = getattr(self, "trainer", None)
            connector = getattr(trainer, "_accelerator_connector", None)
            shard = getattr(connector, "use_distributed_sampler", True) and getattr(connector, "is_distributed", False)
            kwargs = (trainer.distributed_sampler_kwargs or {}) if shard else {}
            world, rank = int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))
            dataset = SeededSamples(dataset)
            # the tail is dropped by the batches (drop_last), not by the shards (as Lightning's own sampler)
            sampler = EpochShuffleSampler(dataset, world, rank, run_seed(world))
        generator = torch.Generator().manual_seed(run_seed(1) if shuffle else 0)
        return (TrainingLoader if shuffle else DataLoader)(
            dataset,
            collate_fn=getattr(dataset, "collate_fn", None),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
            generator=generator,
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
