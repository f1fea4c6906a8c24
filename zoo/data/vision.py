"""Data modules over image datasets on disk: CIFAR-10/100 and ImageNet-style image folders."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from zoo.data.base import DataArgumentError, ZooDataModule
from zoo.errors import ZooError
from zoo.pretrained import CROP_MODES, INTERPOLATIONS

__all__ = [
    "CIFAR_STATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFARDataModule",
    "ImageFilesDataModule",
    "ImageFolderDataModule",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Per-channel mean/std of the training images of each dataset.
CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_CIFAR_CLASSES: dict[str, type[datasets.CIFAR10]] = {
    "cifar10": datasets.CIFAR10,
    "cifar100": datasets.CIFAR100,
}
_CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}

# the pretrained cfgs' interpolations (zoo.pretrained.INTERPOLATIONS) on PIL images; timm's "random" is a training
# option, and evaluation then resizes bilinearly, as timm's does
_INTERPOLATIONS: dict[str, transforms.InterpolationMode] = {
    name: transforms.InterpolationMode(name) for name in INTERPOLATIONS if name != "random"
}
# torchvision's policies, each built with the crops' interpolation
_AUTO_AUGMENT: dict[str, Callable[[transforms.InterpolationMode], Any]] = {
    "randaugment": lambda mode: transforms.RandAugment(interpolation=mode),
    "trivialaugment": lambda mode: transforms.TrivialAugmentWide(interpolation=mode),
    "autoaugment": lambda mode: transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET, interpolation=mode),
    "augmix": lambda mode: transforms.AugMix(interpolation=mode),
}


def _check_mean_std(
    mean: Sequence[float] | None, std: Sequence[float] | None, default: str = "the dataset's"
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` as tuples of floats, None when neither is given; one DataArgumentError for one without the
    other, different lengths, or a standard deviation <= 0."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise DataArgumentError(f"give mean and std together (or neither: {default})")
    if len(mean) != len(std):
        raise DataArgumentError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise DataArgumentError(f"std must be positive, got {tuple(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class CIFARDataModule(ZooDataModule):
    """CIFAR-10 or CIFAR-100 via ``torchvision.datasets`` with the standard augmentation.

    Training images get ``RandomCrop(32, padding=4)`` and a horizontal flip; all images are resized to
    ``image_size`` when it differs from 32 (for fine-tuning ImageNet models) and normalised with the
    dataset's mean/std. ``val_split="test"`` validates on the official test set; a fraction such as
    ``"0.1"`` instead holds out that share of the training set (fixed split, no augmentation). Test and predict
    read the official test set.

    Args:
        root: the folder that holds (or will hold) the extracted ``cifar-*-python`` folder, or that folder itself.
        dataset: ``"cifar10"`` or ``"cifar100"``.
        download: whether torchvision downloads the dataset when it is missing (else a missing dataset is an error).
        batch_size: samples per batch (an integer >= 1).
        num_workers: DataLoader worker processes (an integer >= 0; 0 loads in the main process).
        image_size: the side the images are resized to (an integer >= 8; 32 keeps them as they are).
        augment: whether training images get the random crop and flip.
        val_split: ``"test"``, or the held-out fraction of the training set as a string (``"0.1"``).
        mean: the per-channel mean the images are normalised with; None: the dataset's (``CIFAR_STATS``). A
            pretrained model being fine-tuned wants its own (its ``pretrained_cfg["mean"]``: 0.5 for timm's augreg
            ViTs).
        std: the per-channel standard deviation (positive); None: the dataset's.
    """

    def __init__(
        self,
        root: str = "data/cifar",
        dataset: str = "cifar10",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        image_size: int = 32,
        augment: bool = True,
        val_split: str = "test",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        """Validate the arguments and, unless ``download`` is set, check that the data is on disk."""
        super().__init__(batch_size, num_workers)
        name = str(dataset).lower().replace("-", "")
        if name not in _CIFAR_CLASSES:
            raise ZooError(f"unknown CIFAR dataset {dataset!r}; valid names: {', '.join(_CIFAR_CLASSES)}")
        if int(image_size) != image_size or image_size < 8:
            raise DataArgumentError(f"image_size must be an integer >= 8, got {image_size!r}")
        self.val_fraction = self._parse_val_split(val_split)
        self.save_hyperparameters()
        self.dataset_name = name
        self.dataset_cls = _CIFAR_CLASSES[name]
        self.download = bool(download)
        self.image_size = int(image_size)
        self.augment = bool(augment)
        self.val_split = str(val_split)
        self.num_classes = _CIFAR_NUM_CLASSES[name]
        self.mean, self.std = _check_mean_std(mean, std) or CIFAR_STATS[name]
        self.class_names: list[str] | None = None
        self.root = self._resolve_root(root)
        if not self.download:
            self._check_on_disk()

    @staticmethod
    def _parse_val_split(val_split: str) -> float | None:
        """``None`` for ``"test"``, otherwise the held-out training fraction in (0, 1)."""
        if str(val_split) == "test":
            return None
        try:
            fraction = float(val_split)
        except ValueError:
            fraction = -1.0
        if not 0.0 < fraction < 1.0:
            raise ZooError(
                f"invalid val_split {val_split!r}; use 'test' (the official test set) "
                "or a fraction of the training set such as '0.1'"
            )
        return fraction

    def _resolve_root(self, root: str) -> Path:
        """Accept both the parent folder and the extracted ``cifar-*-python`` folder itself as ``root``."""
        path = Path(os.path.expanduser(str(root)))
        base = self.dataset_cls.base_folder
        if path.name == base and not (path / base).exists():
            return path.parent
        return path

    def _expected_files(self) -> list[Path]:
        """The files torchvision reads for this dataset."""
        cls = self.dataset_cls
        folder = self.root / cls.base_folder
        names = [n for n, _ in cls.train_list] + [n for n, _ in cls.test_list] + [cls.meta["filename"]]
        return [folder / n for n in names]

    def _check_on_disk(self) -> None:
        """Raise ``ZooError`` naming the path and the fix when the dataset files are missing."""
        folder = self.root / self.dataset_cls.base_folder
        if not self.root.is_dir():
            raise ZooError(
                f"{self.dataset_name} root folder '{self.root}' does not exist; "
                "pass download: true to fetch it, or point root at the folder that holds it"
            )
        missing = [p for p in self._expected_files() if not p.is_file()]
        if missing:
            raise ZooError(
                f"{self.dataset_name} not found under '{self.root}' (missing '{missing[0]}'); "
                f"pass download: true to fetch it, or point root at the folder that holds '{folder.name}'"
            )

    def train_transform(self) -> transforms.Compose:
        """Augmentation (when enabled), resize, tensor conversion and normalisation for training."""
        ops: list[Any] = []
        if self.augment:
            ops += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        return transforms.Compose(ops + self._common_ops())

    def eval_transform(self) -> transforms.Compose:
        """Resize, tensor conversion and normalisation for validation and test."""
        return transforms.Compose(self._common_ops())

    def _common_ops(self) -> list[Any]:
        """The deterministic tail shared by train and eval transforms."""
        ops: list[Any] = []
        if self.image_size != 32:
            ops.append(transforms.Resize((self.image_size, self.image_size), antialias=True))
        ops += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return ops

    def prepare_data(self) -> None:
        """Download the dataset when ``download`` is set; otherwise only check that it is present."""
        if self.download:
            self.dataset_cls(str(self.root), train=True, download=True)
            self.dataset_cls(str(self.root), train=False, download=True)
        else:
            self._check_on_disk()

    def _build(self, train: bool, transform: transforms.Compose) -> datasets.CIFAR10:
        """Instantiate the torchvision dataset, turning a corrupt/missing download into a ZooError."""
        try:
            ds = self.dataset_cls(str(self.root), train=train, transform=transform, download=False)
        except RuntimeError as err:
            raise ZooError(
                f"{self.dataset_name} under '{self.root}' is missing or corrupt ({err}); "
                "pass download: true to fetch it again, or point root at a valid copy"
            ) from err
        if self.class_names is None:
            self.class_names = list(ds.classes)
        return ds

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets needed for ``stage`` (idempotent)."""
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            if self.val_fraction is None:
                self.train_dataset = self._build(True, self.train_transform())
                self.val_dataset = self._build(False, self.eval_transform())
            else:
                train_full = self._build(True, self.train_transform())
                eval_full = self._build(True, self.eval_transform())
                n = len(train_full)
                n_val = max(1, round(n * self.val_fraction))
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
                self.train_dataset = Subset(train_full, sorted(perm[n_val:]))
                self.val_dataset = Subset(eval_full, sorted(perm[:n_val]))
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._build(False, self.eval_transform())


class _FixedClassImageFolder(datasets.ImageFolder):
    """An ``ImageFolder`` whose class list is given (so train and val share one label mapping)."""

    def __init__(self, root: str, classes: list[str], **kwargs: Any) -> None:
        self._fixed_classes = list(classes)
        super().__init__(root, allow_empty=True, **kwargs)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {c: i for i, c in enumerate(self._fixed_classes)}


def _list_classes(folder: Path) -> list[str]:
    """Sorted names of the class subdirectories of ``folder`` (hidden entries skipped)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _check_preprocessing(
    image_size: Any,
    resize_size: Any,
    crop_pct: Any,
    crop_mode: Any,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    interpolation: Any,
) -> None:
    """One DataArgumentError for a bad size, crop, mean / std or interpolation of :class:`_ModelPreprocessing`'s
    modules (None is always allowed: the model's)."""

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    pair = isinstance(image_size, (list, tuple)) and len(image_size) == 2 and all(map(positive_int, image_size))
    if image_size is not None and not (positive_int(image_size) or pair):
        raise DataArgumentError(
            "image_size must be a positive integer or a [height, width] pair of them (or null: the model's), got "
            f"{image_size!r}"
        )
    if resize_size is not None:
        if pair and image_size[0] != image_size[1]:
            raise DataArgumentError(
                f"resize_size sizes square crops only, and image_size is {list(image_size)}: give crop_pct instead "
                "(the resize is then floor(side / crop_pct) per side)"
            )
        side = (image_size[0] if pair else image_size) or 1
        if not positive_int(resize_size) or resize_size < side:
            raise DataArgumentError(f"resize_size must be an integer >= image_size ({side}), got {resize_size!r}")
    if crop_pct is not None and (
        isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1
    ):
        raise DataArgumentError(f"crop_pct must be a fraction in (0, 1] (or null: the model's), got {crop_pct!r}")
    if crop_mode is not None and crop_mode not in CROP_MODES:
        raise DataArgumentError(
            f"crop_mode must be one of {', '.join(CROP_MODES)} (or null: the model's), got {crop_mode!r}"
        )
    _check_mean_std(mean, std, "the model's")
    if interpolation is not None and interpolation not in _INTERPOLATIONS:
        raise DataArgumentError(
            f"interpolation must be one of {', '.join(_INTERPOLATIONS)} (or null: the model's), got {interpolation!r}"
        )


class _ResizeKeepRatio:
    """Resize by one factor for both sides, to ``size`` = (h, w): the smallest image that covers it
    (``cover=True``: one side equal, the other at least as long) or the largest that fits in it (one side equal,
    the other at most as long); each new side is round(side / ratio)."""

    def __init__(self, size: tuple[int, int], cover: bool, interpolation: transforms.InterpolationMode) -> None:
        self.size, self.cover, self.interpolation = size, cover, interpolation

    def __call__(self, image: Any) -> Any:
        height, width = transforms.functional.get_dimensions(image)[1:]
        ratios = (height / self.size[0], width / self.size[1])
        ratio = min(ratios) if self.cover else max(ratios)
        new_size = [round(height / ratio), round(width / ratio)]
        return transforms.functional.resize(image, new_size, interpolation=self.interpolation, antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, cover={self.cover}, interpolation={self.interpolation.value})"


class _CenterCropOrPad:
    """The centre crop of ``size`` = (h, w), the image first padded evenly to at least that size with ``fill``
    (per channel, 0-255), where torchvision's ``CenterCrop`` would pad with black."""

    def __init__(self, size: tuple[int, int], fill: Sequence[int]) -> None:
        self.size, self.fill = size, list(fill)

    def __call__(self, image: Any) -> Any:
        height, width = transforms.functional.get_dimensions(image)[1:]
        pad_h, pad_w = max(self.size[0] - height, 0), max(self.size[1] - width, 0)
        if pad_h or pad_w:  # left, top, right, bottom: the odd pixel goes right / bottom
            padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]
            image = transforms.functional.pad(image, padding, fill=self.fill)
        return transforms.functional.center_crop(image, list(self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


class _ModelPreprocessing(ZooDataModule):
    """Image data modules that preprocess as the model expects: ``image_size``, ``resize_size``, ``crop_pct``,
    ``crop_mode``, ``mean``, ``std`` and ``interpolation`` from the arguments (``hparams``), else the Trainer's
    model's ``pretrained_cfg`` (read in ``setup``), else ImageNet's; the evaluation transform (resize, crop as
    ``crop_mode`` says, normalise)."""

    def _resolve(self, cfg: Mapping[str, Any]) -> None:
        """Set ``image_size``, ``resize_size``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``,
        ``interpolation``: the arguments given, else the model's ``cfg`` (timm's ``pretrained_cfg`` keys), else
        ImageNet's. Sizes are an int when square, else (height, width)."""
        hp = self.hparams
        size = tuple(cfg.get("input_size") or ())[-2:]
        model_size = size if len(size) == 2 and all(isinstance(s, int) and s >= 1 for s in size) else None
        given = hp.image_size
        height, width = (given, given) if isinstance(given, int) else tuple(given or model_size or (224, 224))
        crop_pct = hp.crop_pct if hp.crop_pct is not None else cfg.get("crop_pct")
        valid = isinstance(crop_pct, (int, float)) and not isinstance(crop_pct, bool) and 0 < crop_pct <= 1
        self.crop_pct = float(crop_pct) if valid else 0.875
        crop_mode = hp.crop_mode or cfg.get("crop_mode")
        self.crop_mode = crop_mode if crop_mode in CROP_MODES else "center"
        if hp.resize_size:
            resize_h = resize_w = int(hp.resize_size)
        else:
            resize_h, resize_w = math.floor(height / self.crop_pct), math.floor(width / self.crop_pct)
        self.image_size: int | tuple[int, int] = height if height == width else (height, width)
        self.resize_size: int | tuple[int, int] = resize_h if resize_h == resize_w else (resize_h, resize_w)
        mean, std = cfg.get("mean"), cfg.get("std")
        rgb = all(isinstance(v, (list, tuple)) and len(v) == 3 for v in (mean, std))  # the folder's images are RGB
        if hp.mean is not None:
            mean, std = hp.mean, hp.std
        elif not rgb:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        interpolation = hp.interpolation or cfg.get("interpolation")
        self.interpolation = interpolation if interpolation in _INTERPOLATIONS else "bilinear"

    def _model_cfg(self) -> Mapping[str, Any]:
        """The ``pretrained_cfg`` of the Trainer's model (empty without a Trainer or a cfg)."""
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        cfg = getattr(model, "pretrained_cfg", None)
        return cfg if isinstance(cfg, Mapping) else {}

    def eval_transform(self) -> transforms.Compose:
        """Resize + crop of ``image_size`` as ``crop_mode`` says + normalisation. With the resize size
        S = ``resize_size`` (floor(side / ``crop_pct``) per side):

        * ``"center"``: the aspect ratio kept, the smallest image that covers S (for a square S, the short side
          resized to S), then the centre crop;
        * ``"squash"``: both sides resized to S (the aspect ratio not kept), then the centre crop;
        * ``"border"``: the aspect ratio kept, the largest image that fits in S, then padded with the mean colour
          where it is smaller than the crop, and the centre crop.
        """
        mode = _INTERPOLATIONS[self.interpolation]
        crop = _pair(self.image_size)
        resize = _pair(self.resize_size)
        ops: list[Any]
        if self.crop_mode == "squash":
            ops = [transforms.Resize(resize, interpolation=mode, antialias=True), transforms.CenterCrop(crop)]
        elif self.crop_mode == "border":
            fill = [round(255 * m) for m in self.mean]
            ops = [_ResizeKeepRatio(resize, cover=False, interpolation=mode), _CenterCropOrPad(crop, fill)]
        elif resize[0] == resize[1]:
            ops = [transforms.Resize(resize[0], interpolation=mode, antialias=True), transforms.CenterCrop(crop)]
        else:
            ops = [_ResizeKeepRatio(resize, cover=True, interpolation=mode), transforms.CenterCrop(crop)]
        return transforms.Compose([*ops, transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a size given as one int (square) or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class ImageFolderDataModule(_ModelPreprocessing):
    """An ImageNet-style dataset: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``, preprocessed as
    the model expects (timm's ``resolve_data_config`` / ``create_transform``).

    Training: ``RandomResizedCrop(image_size)``, a horizontal flip (``hflip``), the ``auto_augment`` policy when
    given, tensor conversion, normalisation, then ``RandomErasing`` (``random_erasing``, random normal values, as
    timm's ``pixel`` mode). Evaluation: a resize to ``resize_size`` and a crop of ``image_size`` as ``crop_mode``
    says (by default the short side resized and the centre crop), normalisation. The class list comes from the
    train folder and is shared by the val folder. Test and predict read the val folder (ImageNet-style datasets
    ship no labelled test split).

    The settings left None follow the ``pretrained_cfg`` of the model being trained (``input_size``, ``mean``,
    ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``: what its weights were trained with, e.g. mean 0.5
    and bicubic for timm's augreg ViTs, or the squashed full image of its CLIP ViTs at 384 px), read in ``setup``
    from the Trainer's model; without a Trainer, or keys the cfg lacks, ImageNet's: 224 px, the ImageNet mean /
    std, bilinear, ``crop_pct`` 0.875, centre crop.

    Args:
        root: the dataset's folder.
        train_dir: the training folder, relative to ``root``.
        val_dir: the validation folder, relative to ``root``.
        image_size: the side of the square crops (a positive integer) or their [height, width]; None: the model's
            input size.
        resize_size: the size evaluation images are resized to before the crop (an integer >= ``image_size``;
            square crops only): their short side (``crop_mode`` center), both sides (squash) or their long side
            (border); None for ``floor(side / crop_pct)`` per side.
        batch_size: samples per batch (an integer >= 1).
        num_workers: DataLoader worker processes (an integer >= 0; 0 loads in the main process).
        mean: the per-channel mean the images are normalised with; None: the model's.
        std: the per-channel standard deviation (positive); None: the model's.
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"``, ``"box"``, ``"hamming"`` or ``"lanczos"``, for
            crops and resizes; None: the model's (its ``"random"``, a training option, evaluates bilinearly).
        hflip: the probability of the training images' horizontal flip, in [0, 1].
        auto_augment: a torchvision policy for the training images: ``"randaugment"``, ``"trivialaugment"``,
            ``"autoaugment"`` (the ImageNet policy) or ``"augmix"``; None for none.
        random_erasing: the probability that a training image gets one random box erased, in [0, 1].
        crop_pct: the fraction of the resized image the crop keeps, in (0, 1]; None: the model's (ImageNet's:
            0.875).
        crop_mode: ``"center"`` (aspect ratio kept, centre crop), ``"squash"`` (both sides resized, aspect ratio
            not kept) or ``"border"`` (the whole image fitted in, padded with the mean colour), timm's crop modes;
            None: the model's.
    """

    test_split = "val"

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        image_size: int | tuple[int, int] | None = None,
        resize_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        hflip: float = 0.5,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        crop_pct: float | None = None,
        crop_mode: str | None = None,
    ) -> None:
        """Check the arguments and that the folders exist, and list the classes (cheap); the datasets are built in
        ``setup``."""
        super().__init__(batch_size, num_workers)
        _check_preprocessing(image_size, resize_size, crop_pct, crop_mode, mean, std, interpolation)
        if auto_augment is not None and auto_augment not in _AUTO_AUGMENT:
            raise DataArgumentError(
                f"auto_augment must be one of {', '.join(_AUTO_AUGMENT)} (or null: none), got {auto_augment!r}"
            )
        for name, value in (("hflip", hflip), ("random_erasing", random_erasing)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise DataArgumentError(f"{name} must be a probability in [0, 1], got {value!r}")
        self.save_hyperparameters()
        self.root = Path(os.path.expanduser(str(root)))
        self.train_path = self.root / train_dir
        self.val_path = self.root / val_dir
        for label, path, fix in (
            ("root", self.root, "point root at the folder that holds the train and val folders"),
            ("train", self.train_path, "point train_dir at it (relative to root)"),
            ("val", self.val_path, "point val_dir at it (relative to root)"),
        ):
            if not path.is_dir():
                raise ZooError(f"image folder {label} '{path}' does not exist; {fix}")
        self.class_names = _list_classes(self.train_path)
        if not self.class_names:
            raise ZooError(f"train folder '{self.train_path}' has no class subdirectories (expected <class>/<images>)")
        unknown = sorted(set(_list_classes(self.val_path)) - set(self.class_names))
        if unknown:
            raise ZooError(
                f"val folder '{self.val_path}' has classes missing from the train folder: {', '.join(unknown[:5])}"
            )
        self.num_classes = len(self.class_names)
        self.hflip = float(hflip)
        self.auto_augment = auto_augment
        self.random_erasing = float(random_erasing)
        self._resolve({})

    def train_transform(self) -> transforms.Compose:
        """RandomResizedCrop + horizontal flip + the auto-augment policy + normalisation + random erasing."""
        mode = _INTERPOLATIONS[self.interpolation]
        ops: list[Any] = [transforms.RandomResizedCrop(self.image_size, interpolation=mode, antialias=True)]
        if self.hflip > 0:
            ops.append(transforms.RandomHorizontalFlip(self.hflip))
        if self.auto_augment is not None:
            ops.append(_AUTO_AUGMENT[self.auto_augment](mode))
        ops += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        if self.random_erasing > 0:
            ops.append(transforms.RandomErasing(self.random_erasing, value="random"))
        return transforms.Compose(ops)

    def _build(self, path: Path, transform: transforms.Compose) -> datasets.ImageFolder:
        """An ImageFolder over ``path`` with the train folder's class mapping."""
        ds = _FixedClassImageFolder(str(path), self.class_names, transform=transform)
        if len(ds) == 0:
            raise ZooError(f"image folder '{path}' contains no readable images")
        return ds

    def setup(self, stage: str | None = None) -> None:
        """Follow the Trainer's model's ``pretrained_cfg`` where the arguments are None, and index the image files
        (idempotent)."""
        if self.train_dataset is None and self.val_dataset is None:
            self._resolve(self._model_cfg())
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build(self.train_path, self.train_transform())
        if self.val_dataset is None:
            self.val_dataset = self._build(self.val_path, self.eval_transform())
            # what predict reads (the val folder), relative to root, for the predictions file
            self.predict_files = [str(Path(path).relative_to(self.root)) for path, _ in self.val_dataset.samples]


class _ImageFiles(torch.utils.data.Dataset):
    """Image files read as RGB and transformed (no labels): item i is ``transform(image i)``."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


class ImageFilesDataModule(_ModelPreprocessing):
    """Unlabelled images to predict on (``zoo predict``, ``Trainer.predict``): the image files under ``root``
    (its folders too, in sorted path order), preprocessed as the model expects, as
    :class:`ImageFolderDataModule` evaluates (the settings left None follow the model's ``pretrained_cfg``: its
    size, mean / std, interpolation, crop_pct and crop_mode). ``predict_files`` lists the files, relative to
    ``root``, in the order of the predictions (``zoo.callbacks.PredictionWriter`` writes them beside the
    predictions). There is no training or validation split: fit, validate and test need labelled data.

    Args:
        root: a folder of images (any depth) or one image file.
        image_size: the side of the square crops (a positive integer) or their [height, width]; None: the model's
            input size.
        resize_size: the size evaluation images are resized to before the crop (an integer >= ``image_size``;
            square crops only): their short side (``crop_mode`` center), both sides (squash) or their long side
            (border); None for ``floor(side / crop_pct)`` per side.
        batch_size: samples per batch (an integer >= 1).
        num_workers: DataLoader worker processes (an integer >= 0; 0 loads in the main process).
        mean: the per-channel mean the images are normalised with; None: the model's.
        std: the per-channel standard deviation (positive); None: the model's.
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"``, ``"box"``, ``"hamming"`` or ``"lanczos"``;
            None: the model's.
        crop_pct: the fraction of the resized image the crop keeps, in (0, 1]; None: the model's (ImageNet's:
            0.875).
        crop_mode: ``"center"`` (aspect ratio kept, centre crop), ``"squash"`` (both sides resized, aspect ratio
            not kept) or ``"border"`` (the whole image fitted in, padded with the mean colour), timm's crop modes;
            None: the model's.
    """

    test_split = "predict"

    def __init__(
        self,
        root: str,
        image_size: int | tuple[int, int] | None = None,
        resize_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        crop_mode: str | None = None,
    ) -> None:
        """Check the arguments and list the image files (cheap)."""
        super().__init__(batch_size, num_workers)
        _check_preprocessing(image_size, resize_size, crop_pct, crop_mode, mean, std, interpolation)
        self.save_hyperparameters()
        self.root = Path(os.path.expanduser(str(root)))
        if self.root.is_file():
            paths = [self.root] if self.root.suffix.lower() in IMG_EXTENSIONS else []
            base = self.root.parent
        elif self.root.is_dir():
            paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            base = self.root
        else:
            raise ZooError(f"images root '{self.root}' does not exist; point root at a folder of images or an image")
        if not paths:
            raise ZooError(
                f"no image files at '{self.root}' (looked for {', '.join(IMG_EXTENSIONS)}); point root at a folder "
                "that holds them"
            )
        self.paths = paths
        self.predict_files = [str(p.relative_to(base)) for p in paths]
        self.predict_dataset: torch.utils.data.Dataset | None = None
        self._resolve({})

    def setup(self, stage: str | None = None) -> None:
        """Follow the Trainer's model's ``pretrained_cfg`` where the arguments are None (once)."""
        if stage not in (None, "predict"):
            raise ZooError(
                f"ImageFilesDataModule holds unlabelled images, for predict only, not {stage}: give labelled data "
                "(zoo.data.ImageFolderDataModule) to fit, validate or test"
            )
        if self.predict_dataset is None:
            self._resolve(self._model_cfg())
            self.predict_dataset = _ImageFiles(self.paths, self.eval_transform())

    def predict_dataloader(self) -> DataLoader:
        """The images in ``predict_files`` order, without labels."""
        if self.predict_dataset is None:
            self.setup("predict")
        return self._loader(self.predict_dataset, shuffle=False)
