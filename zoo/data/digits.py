"""The embedded default dataset: scikit-learn's 8x8 handwritten digits, upsampled to small images.

``load_digits()`` ships inside scikit-learn, so this data module needs no network and no files on disk.
It is meant for smoke tests, tutorials and quick experiments on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from zoo.data.base import DataArgumentError, ZooDataModule
from zoo.errors import ZooError

__all__ = ["DigitsDataModule", "RandomTranslate"]

_NUM_SAMPLES = 1797


def _split_sizes(val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Images in the val and test splits: ``ceil(1797 * (val_fraction + test_fraction))`` held out and
    ``ceil(1797 * test_fraction)`` of them for test (scikit-learn's rounding of a fractional ``test_size``)."""
    held_out = math.ceil(_NUM_SAMPLES * (val_fraction + test_fraction))
    n_test = math.ceil(_NUM_SAMPLES * test_fraction)
    return held_out - n_test, n_test


class RandomTranslate(Dataset):
    """Wrap a tensor dataset and shift each image randomly by up to ``max_shift`` pixels.

    The shift is implemented as zero padding followed by a random crop back to the original size. It draws
    from torch's global RNG, so ``lightning.seed_everything`` makes it deterministic.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int) -> None:
        """Store ``images`` (N, C, H, W), ``labels`` (N,) and the maximum shift in pixels."""
        if images.shape[0] != labels.shape[0]:
            raise DataArgumentError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
        if max_shift < 0:
            raise DataArgumentError(f"max_shift must be >= 0, got {max_shift}")
        self.images = images
        self.labels = labels
        self.max_shift = int(max_shift)

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the randomly translated image and its (unchanged) label."""
        image = self.images[index]
        s = self.max_shift
        if s > 0:
            h, w = image.shape[-2:]
            padded = F.pad(image, (s, s, s, s))
            top, left = torch.randint(0, 2 * s + 1, (2,)).tolist()
            image = padded[:, top : top + h, left : left + w]
        return image, self.labels[index]


class DigitsDataModule(ZooDataModule):
    """scikit-learn's digits (1797 images, 10 classes) as normalised ``channels x image_size^2`` tensors.

    Three disjoint splits, each stratified (every class in the proportion of the whole) and fixed by ``seed``:
    ``val_fraction + test_fraction`` of the images are held out first (20% by default: exactly the held-out
    split of earlier versions, so the training split and the models the recipes train are unchanged), then the
    held-out images are split into the test split (``test_fraction`` of all images, 180 by default) and the val
    split (the rest, 180). The training split has 1437 images. ``zoo test`` / ``Trainer.test`` report accuracy
    on images that neither training nor model selection (checkpointing on ``val_acc``) saw; ``test_fraction=0``
    gives the two-way train/val split of earlier versions (and no test split). The predict loader yields the
    test images (without labels).
    Images are scaled to [0, 1], bilinearly upsampled, replicated to ``channels`` channels and normalised
    with the per-channel mean/std of the train split (stored as ``mean`` and ``std``). ``train_indices``,
    ``val_indices`` and ``test_indices`` are the images' positions in ``sklearn.datasets.load_digits()``.

    Args:
        image_size: the side of the upsampled square images (an integer >= 8).
        channels: 1 or 3, the number of channels the images are replicated to.
        batch_size: samples per batch (an integer >= 1).
        val_fraction: the share of the images in the val split, in (0, 1).
        test_fraction: the share of the images in the test split, in [0, 1) (0: no test split).
        seed: the seed of the stratified splits.
        num_workers: DataLoader worker processes (an integer >= 0; 0 loads in the main process).
        augment: whether training images are shifted randomly by up to ``image_size // 8`` pixels.
    """

    num_classes: int = 10

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
    ) -> None:
        """Validate the arguments; the tensors themselves are built in ``setup``."""
        super().__init__(batch_size, num_workers)
        if int(image_size) != image_size or image_size < 8:
            raise DataArgumentError(f"image_size must be an integer >= 8, got {image_size!r}")
        if channels not in (1, 3):
            raise DataArgumentError(f"channels must be 1 or 3, got {channels!r}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise DataArgumentError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
        if not 0.0 <= float(test_fraction) < 1.0:
            raise DataArgumentError(f"test_fraction must lie in [0, 1) (0: no test split), got {test_fraction!r}")
        n_val, n_test = _split_sizes(float(val_fraction), float(test_fraction))
        sizes = {"val": n_val, "train": _NUM_SAMPLES - n_val - n_test} | ({"test": n_test} if n_test else {})
        if min(sizes.values()) < self.num_classes:
            raise DataArgumentError(
                f"val_fraction={val_fraction!r}, test_fraction={test_fraction!r} give splits of "
                f"{', '.join(f'{k} {v}' for k, v in sizes.items())} images: a stratified split needs at least one "
                f"image of each of the {self.num_classes} classes in each split"
            )
        self.save_hyperparameters()
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.class_names = [str(i) for i in range(self.num_classes)]
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.train_images: torch.Tensor | None = None
        self.train_labels: torch.Tensor | None = None
        self.val_images: torch.Tensor | None = None
        self.val_labels: torch.Tensor | None = None
        self.test_images: torch.Tensor | None = None
        self.test_labels: torch.Tensor | None = None

    def _to_images(self, flat: torch.Tensor) -> torch.Tensor:
        """Turn (N, 64) values in 0..16 into (N, channels, image_size, image_size) floats in [0, 1]."""
        x = (flat.to(torch.float32) / 16.0).reshape(-1, 1, 8, 8)
        if self.image_size != 8:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x.repeat(1, self.channels, 1, 1).contiguous()

    def setup(self, stage: str | None = None) -> None:
        """Load the digits, split them and build the normalised tensors (once; later calls are no-ops)."""
        if self.val_dataset is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32)
        y = torch.as_tensor(digits.target, dtype=torch.long)
        indices = torch.arange(len(y)).numpy()
        labels = y.numpy()
        # the held-out part first, exactly as the two-way split of earlier versions drew it (test_size 0.2 by
        # default), so the training split is unchanged; the held-out part is then split into test and val
        train_idx, val_idx = train_test_split(
            indices,
            test_size=self.val_fraction + self.test_fraction,
            stratify=labels,
            random_state=self.seed,
            shuffle=True,
        )
        _, n_test = _split_sizes(self.val_fraction, self.test_fraction)
        test_idx = val_idx[:0]
        if n_test:
            val_idx, test_idx = train_test_split(
                val_idx, test_size=n_test, stratify=labels[val_idx], random_state=self.seed, shuffle=True
            )
        train_idx, val_idx, test_idx = (torch.as_tensor(i, dtype=torch.long) for i in (train_idx, val_idx, test_idx))

        train_images = self._to_images(x[train_idx])
        mean = train_images.mean(dim=(0, 2, 3))
        std = train_images.std(dim=(0, 2, 3)).clamp_min(1e-6)
        shape = (1, self.channels, 1, 1)
        self.mean, self.std = mean, std
        self.train_images = (train_images - mean.view(shape)) / std.view(shape)
        self.val_images = (self._to_images(x[val_idx]) - mean.view(shape)) / std.view(shape)
        self.test_images = (self._to_images(x[test_idx]) - mean.view(shape)) / std.view(shape)
        self.train_labels, self.val_labels, self.test_labels = y[train_idx], y[val_idx], y[test_idx]
        self.train_indices, self.val_indices, self.test_indices = train_idx, val_idx, test_idx

        if self.augment:
            self.train_dataset = RandomTranslate(self.train_images, self.train_labels, self.image_size // 8)
        else:
            self.train_dataset = TensorDataset(self.train_images, self.train_labels)
        self.val_dataset = TensorDataset(self.val_images, self.val_labels)
        self.test_dataset = TensorDataset(self.test_images, self.test_labels)

    def _check_test_split(self) -> None:
        if self.test_fraction == 0:
            raise ZooError(
                "DigitsDataModule(test_fraction=0) has no test split: give test_fraction > 0 (e.g. "
                "--data.init_args.test_fraction 0.1) for a held-out split, or validate on the val split"
            )

    def test_dataloader(self) -> DataLoader:
        """The held-out test split in a fixed order (disjoint from train and val)."""
        self._check_test_split()
        return super().test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The test images only (no labels), in the order of ``test_indices``: each batch is a plain
        ``(B, C, H, W)`` tensor."""
        self._check_test_split()
        return super().predict_dataloader()
