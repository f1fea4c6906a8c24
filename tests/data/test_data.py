"""Tests for the data modules (CPU-only, no network)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from zoo.data import CIFARDataModule, DigitsDataModule, ImageFolderDataModule
from zoo.errors import ZooError

# ----------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=32, channels=3, batch_size=16, augment=False)
    dm.setup("fit")
    return dm


def test_digits_shapes_and_dtype(digits: DigitsDataModule) -> None:
    assert digits.num_classes == 10
    assert digits.class_names == [str(i) for i in range(10)]
    x, y = digits.val_dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long
    assert digits.mean.shape == (3,) and digits.std.shape == (3,)


@pytest.mark.parametrize("channels,size", [(1, 8), (1, 16), (3, 24)])
def test_digits_channels_and_size(channels: int, size: int) -> None:
    dm = DigitsDataModule(image_size=size, channels=channels)
    dm.setup()
    x, _ = dm.val_dataset[0]
    assert x.shape == (channels, size, size)
    if channels == 3:
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def assert_stratified(split_labels: torch.Tensor, all_labels: torch.Tensor) -> None:
    """Each class's count in the split is its share of the whole, to within one image."""
    counts = torch.bincount(split_labels, minlength=10).float()
    expected = torch.bincount(all_labels, minlength=10).float() * len(split_labels) / len(all_labels)
    assert (counts > 0).all()
    assert ((counts - expected).abs() <= 1.0).all(), (counts, expected)


def test_digits_three_splits_disjoint_and_stratified(digits: DigitsDataModule) -> None:
    from sklearn.datasets import load_digits

    all_labels = torch.as_tensor(load_digits().target)
    n_train, n_val, n_test = len(digits.train_dataset), len(digits.val_dataset), len(digits.test_dataset)
    assert (n_val, n_test) == (math.ceil(0.2 * 1797) - math.ceil(0.1 * 1797), math.ceil(0.1 * 1797)) == (180, 180)
    assert n_train == 1797 - 360
    train, val, test = (set(i.tolist()) for i in (digits.train_indices, digits.val_indices, digits.test_indices))
    assert len(train) == n_train and len(val) == n_val and len(test) == n_test
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(1797))
    # labels and images are those of the images the indices name
    for indices, labels in (
        (digits.train_indices, digits.train_labels),
        (digits.val_indices, digits.val_labels),
        (digits.test_indices, digits.test_labels),
    ):
        assert torch.equal(all_labels[indices], labels)
    assert torch.equal(digits.test_dataset[5][0], digits.test_images[5])
    for labels in (digits.val_labels, digits.test_labels, digits.train_labels):
        assert_stratified(labels, all_labels)


def test_digits_train_split_is_the_two_way_split_of_earlier_versions() -> None:
    """The val and test splits come out of the held-out 20% of earlier versions: the training split (and so what
    the recipes train) is unchanged, and val_fraction=0.2, test_fraction=0 is that two-way split exactly, without a
    test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    old_train, old_val = train_test_split(np.arange(1797), test_size=0.2, stratify=y, random_state=0, shuffle=True)
    three = DigitsDataModule(image_size=8)
    two = DigitsDataModule(image_size=8, val_fraction=0.2, test_fraction=0)
    three.setup()
    two.setup()
    assert three.train_indices.tolist() == two.train_indices.tolist() == old_train.tolist()
    assert two.val_indices.tolist() == old_val.tolist()
    assert set(three.val_indices.tolist()) | set(three.test_indices.tolist()) == set(old_val.tolist())
    with pytest.raises(ZooError, match="test_fraction=0"):
        two.test_dataloader()
    with pytest.raises(ZooError, match="test_fraction=0"):
        two.predict_dataloader()


def test_digits_split_is_deterministic() -> None:
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_images, b.val_images)
    assert torch.equal(a.val_labels, b.val_labels)
    assert torch.equal(a.test_indices, b.test_indices) and torch.equal(a.test_images, b.test_images)
    assert not torch.equal(a.val_indices, c.val_indices)
    assert not torch.equal(a.test_indices, c.test_indices)


def test_digits_setup_is_idempotent(digits: DigitsDataModule) -> None:
    val = digits.val_images
    digits.setup("fit")
    digits.setup("test")
    assert digits.val_images is val


def test_digits_normalisation(digits: DigitsDataModule) -> None:
    x = digits.train_images
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(std, torch.ones(3), atol=1e-3)


def test_digits_augmentation_changes_images_keeps_labels() -> None:
    dm = DigitsDataModule(image_size=32, augment=True)
    dm.setup()
    pl.seed_everything(0, verbose=False)
    n = 64
    changed = 0
    for i in range(n):
        x, y = dm.train_dataset[i]
        assert x.shape == dm.train_images[i].shape
        assert y == dm.train_labels[i]
        changed += int(not torch.equal(x, dm.train_images[i]))
    assert changed > n // 2
    # seeded: the same draws give the same images
    pl.seed_everything(0, verbose=False)
    first = torch.stack([dm.train_dataset[i][0] for i in range(8)])
    pl.seed_everything(0, verbose=False)
    second = torch.stack([dm.train_dataset[i][0] for i in range(8)])
    assert torch.equal(first, second)


def test_digits_dataloaders() -> None:
    dm = DigitsDataModule(image_size=16, channels=1, batch_size=32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and y.shape == (32,)
    val = dm.val_dataloader()
    assert sum(b[0].shape[0] for b in val) == len(dm.val_dataset)
    test = list(dm.test_dataloader())  # the held-out split, in a fixed order
    assert torch.equal(torch.cat([b[1] for b in test]), dm.test_labels)
    assert torch.equal(torch.cat([b[0] for b in test]), dm.test_images)
    pred = list(dm.predict_dataloader())  # the test images, without labels
    assert isinstance(pred[0], torch.Tensor) and pred[0].shape == (32, 1, 16, 16)
    assert torch.equal(torch.cat(pred), dm.test_images)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 4},
        {"channels": 2},
        {"val_fraction": 0.0},
        {"val_fraction": 1.0},
        {"batch_size": 0},
        {"test_fraction": -0.1},
        {"test_fraction": 1.0},
        {"val_fraction": 0.5, "test_fraction": 0.5},
        {"test_fraction": 0.002},
    ],
)
def test_digits_rejects_bad_arguments(kwargs: dict) -> None:
    # the zoo's one error for bad input, still a ValueError as before
    with pytest.raises(ZooError) as info:
        DigitsDataModule(**kwargs)
    assert isinstance(info.value, ValueError) and str(next(iter(kwargs))) in str(info.value)


# ----------------------------------------------------------------------------------------------- CIFAR


def _write_fake_cifar10(root: Path, n_per_batch: int = 6) -> None:
    # The real files are Python-2 pickles that torchvision loads with encoding="latin1", which turns their
    # keys into ``str``; a Python-3 pickle therefore needs ``str`` keys to be read the same way.
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=n_per_batch).tolist(),
            "batch_label": name,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)


@pytest.fixture
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # torchvision verifies the md5 of every file: once via ``_check_integrity`` and once for the metadata file
    # via the module-level ``check_integrity``; the fake files cannot match, so both checks are bypassed.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    root = tmp_path / "cifar"
    _write_fake_cifar10(root)
    return root


def test_cifar_missing_root_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ZooError, match="nowhere") as info:
        CIFARDataModule(root=str(missing), download=False)
    assert "download" in str(info.value)


def test_cifar_empty_root_raises(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="download: true"):
        CIFARDataModule(root=str(tmp_path), download=False)


def test_cifar_bad_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="cifar100"):
        CIFARDataModule(root=str(tmp_path), dataset="svhn")


def test_cifar_fake_loaders(fake_cifar: Path) -> None:
    dm = CIFARDataModule(root=str(fake_cifar), batch_size=4, num_workers=0)
    assert dm.num_classes == 10
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 6
    assert dm.class_names == [f"class{i}" for i in range(10)]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.long
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32)


def test_cifar_fake_resize_and_root_is_batches_folder(fake_cifar: Path) -> None:
    root = fake_cifar / "cifar-10-batches-py"
    dm = CIFARDataModule(root=str(root), image_size=48, batch_size=3, num_workers=0)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 48, 48)
    assert next(iter(dm.predict_dataloader())).shape == (3, 3, 48, 48)


def test_cifar_normalises_with_the_mean_and_std_given(fake_cifar: Path) -> None:
    """A fine-tuned model's own normalisation (an augreg ViT's 0.5 / 0.5): pixels p in [0, 1] become 2 p - 1."""
    own = CIFARDataModule(root=str(fake_cifar), batch_size=6, num_workers=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    plain = CIFARDataModule(root=str(fake_cifar), batch_size=6, num_workers=0)
    assert plain.mean == (0.4914, 0.4822, 0.4465) and own.mean == (0.5,) * 3
    x, _ = next(iter(own.val_dataloader()))
    pixels = torch.stack([torchvision.transforms.functional.to_tensor(own.val_dataset.data[i]) for i in range(6)])
    torch.testing.assert_close(x, 2 * pixels - 1, rtol=0, atol=1e-6)
    with pytest.raises(ZooError, match="give mean and std together"):
        CIFARDataModule(root=str(fake_cifar), std=(0.5,) * 3)


def test_cifar_fraction_val_split(fake_cifar: Path) -> None:
    dm = CIFARDataModule(root=str(fake_cifar), val_split="0.2", batch_size=4, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 30
    assert set(dm.train_dataset.indices).isdisjoint(dm.val_dataset.indices)
    with pytest.raises(ZooError, match="val_split"):
        CIFARDataModule(root=str(fake_cifar), val_split="train")


# ----------------------------------------------------------------------------------------- ImageFolder


def _write_image_folder(root: Path, classes: list[str], split_dirs: tuple[str, ...] = ("train", "val")) -> None:
    rng = np.random.default_rng(0)
    for split in split_dirs:
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 256, size=(20 + i, 28, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img{i}.png")


def test_image_folder_loaders(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, ["cat", "dog", "fish"])
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=4, num_workers=0)
    assert dm.num_classes == 3
    assert dm.class_names == ["cat", "dog", "fish"]
    assert dm.resize_size == 16 * 256 // 224
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.shape == (4,)
    batches = list(dm.val_dataloader())
    assert batches[0][0].shape == (4, 3, 16, 16)
    labels = torch.cat([b[1] for b in batches])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_image_folder_val_shares_train_mapping(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, ["a", "b", "c"], split_dirs=("train",))
    _write_image_folder(tmp_path, ["c"], split_dirs=("val",))
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, batch_size=8, num_workers=0)
    dm.setup("validate")
    _, y = next(iter(dm.val_dataloader()))
    assert y.tolist() == [2, 2, 2]


def test_image_folder_missing_val_raises(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, ["cat", "dog"], split_dirs=("train",))
    with pytest.raises(ZooError, match="val") as info:
        ImageFolderDataModule(root=str(tmp_path))
    assert str(tmp_path / "val") in str(info.value)


def test_image_folder_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="nowhere"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere"))


def _tiny_vit(**kwargs):
    import zoo

    torch.manual_seed(0)
    return zoo.sinkformer_vit_tiny_patch16_224(
        **{"img_size": 16, "patch_size": 8, "depth": 1, "num_classes": 3, **kwargs}
    )


def test_image_folder_preprocesses_as_the_models_pretrained_cfg(tmp_path: Path) -> None:
    """Left None, size, crop, mean / std and interpolation follow the Trainer's model's pretrained_cfg (an augreg
    ViT: mean 0.5, bicubic, crop_pct 0.9): the validation images equal timm's own eval transform of that cfg."""
    from timm.data import create_transform, resolve_data_config

    _write_image_folder(tmp_path, ["cat", "dog", "fish"])
    dm = ImageFolderDataModule(root=str(tmp_path), batch_size=9, num_workers=0)
    assert (dm.image_size, dm.mean, dm.interpolation) == (224, (0.485, 0.456, 0.406), "bilinear")  # no model yet
    model = _tiny_vit(optimizer=lambda groups: torch.optim.SGD(groups, lr=0.0), lr_scheduler=None)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=dm)
    assert (dm.image_size, dm.resize_size, dm.mean, dm.std) == (16, 17, (0.5,) * 3, (0.5,) * 3)
    assert dm.interpolation == "bicubic"
    timm_eval = create_transform(**resolve_data_config({}, model=model))
    want = torch.stack([timm_eval(Image.open(path).convert("RGB")) for path, _ in dm.val_dataset.samples])
    torch.testing.assert_close(next(iter(dm.val_dataloader()))[0], want, rtol=0, atol=1e-6)
    assert model.pretrained_cfg["mean"] == (0.5,) * 3  # and the fit records them as before


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("input_size, crop_pct", [((16, 16), 0.875), ((16, 16), 1.0), ((12, 20), 0.9), ((20, 12), 1.0)])
def test_eval_transform_crops_as_timms_for_every_crop_mode_and_shape(
    tmp_path: Path, crop_mode: str, input_size: tuple[int, int], crop_pct: float
) -> None:
    """The evaluation transform of a cfg with each of timm's crop modes, square and non-square input sizes, on
    images wider, taller and smaller than the crop: equal to timm's create_transform of the same cfg (border: the
    fitted image padded with the mean colour)."""
    from timm.data import create_transform, resolve_data_config

    _write_image_folder(tmp_path, ["cat", "dog"])
    cfg = {
        "input_size": (3, *input_size),
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
        "interpolation": "bicubic",
        "mean": (0.5, 0.25, 0.75),
        "std": (0.5, 0.5, 0.5),
    }
    timm_eval = create_transform(**resolve_data_config({}, pretrained_cfg=cfg))
    for module in (
        ImageFolderDataModule(root=str(tmp_path), num_workers=0),
        __import__("zoo.data", fromlist=["ImageFilesDataModule"]).ImageFilesDataModule(str(tmp_path), num_workers=0),
    ):
        module._resolve(cfg)
        assert (module.crop_mode, module.crop_pct) == (crop_mode, crop_pct)
        ours = module.eval_transform()
        rng = np.random.default_rng(1)
        for shape in ((30, 50), (50, 30), (9, 7), (16, 16)):
            image = Image.fromarray(rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8))
            want = timm_eval(image)
            assert want.shape == (3, *input_size)
            torch.testing.assert_close(ours(image), want, rtol=0, atol=1e-6)


def test_crop_mode_and_crop_pct_arguments_win_over_the_models_cfg(tmp_path: Path) -> None:
    """Given crop_mode / crop_pct / image_size win over the cfg's; a non-square image_size gives non-square
    training and evaluation crops."""
    _write_image_folder(tmp_path, ["cat", "dog"])
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=(8, 12), crop_pct=0.5, crop_mode="squash", num_workers=0)
    dm._resolve({"input_size": (3, 16, 16), "crop_pct": 1.0, "crop_mode": "border"})
    assert (dm.image_size, dm.resize_size, dm.crop_mode) == ((8, 12), (16, 24), "squash")
    image = Image.open(tmp_path / "train" / "cat" / "img0.png").convert("RGB")
    assert dm.eval_transform()(image).shape == dm.train_transform()(image).shape == (3, 8, 12)
    # squash: the whole 20 x 28 image resized to 16 x 24, then the centre 8 x 12 of it
    resized = torchvision.transforms.functional.resize(image, [16, 24], antialias=True)
    want = torchvision.transforms.functional.to_tensor(torchvision.transforms.functional.center_crop(resized, [8, 12]))
    want = torchvision.transforms.functional.normalize(want, dm.mean, dm.std)
    torch.testing.assert_close(dm.eval_transform()(image), want, rtol=0, atol=1e-6)


def test_image_folder_arguments_win_over_the_models_cfg(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, ["cat", "dog"])
    dm = ImageFolderDataModule(
        root=str(tmp_path), image_size=8, mean=(0.1, 0.2, 0.3), std=(1, 2, 3), interpolation="nearest", num_workers=0
    )
    dm._resolve(_tiny_vit().pretrained_cfg)
    assert (dm.image_size, dm.resize_size, dm.mean, dm.std) == (8, 8, (0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    assert dm.interpolation == "nearest"
    free = ImageFolderDataModule(root=str(tmp_path), num_workers=0)
    free._resolve({"interpolation": "lanczos"})  # any cfg interpolation timm's transforms take
    assert free.interpolation == "lanczos" and free.eval_transform().transforms[0].interpolation.value == "lanczos"
    free._resolve({"interpolation": "random"})  # timm's training option: evaluation resizes bilinearly
    assert free.interpolation == "bilinear"


def test_image_folder_random_erasing_erases_one_box_of_the_training_image(tmp_path: Path) -> None:
    """With the same seed the pipeline with random_erasing=1 differs from the one without in one box (all
    channels), filled with random normal values."""
    _write_image_folder(tmp_path, ["cat", "dog"])
    image = Image.open(tmp_path / "train" / "cat" / "img0.png").convert("RGB")
    out = {}
    for p in (0.0, 1.0):
        dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, random_erasing=p, num_workers=0)
        torch.manual_seed(3)
        out[p] = dm.train_transform()(image)
    changed = (out[0.0] != out[1.0]).all(dim=0)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    assert changed.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) > 0
    assert ((out[0.0] != out[1.0]).any(dim=0) == changed).all()


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment", "augmix"])
def test_image_folder_auto_augment_policies_change_the_training_images(tmp_path: Path, policy: str) -> None:
    _write_image_folder(tmp_path, ["cat", "dog"])
    image = Image.open(tmp_path / "train" / "cat" / "img0.png").convert("RGB")
    plain = ImageFolderDataModule(root=str(tmp_path), image_size=16, hflip=0.0, num_workers=0)
    policy_dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, hflip=0.0, auto_augment=policy, num_workers=0)
    differs = []
    for seed in range(4):
        torch.manual_seed(seed)
        a = plain.train_transform()(image)
        torch.manual_seed(seed)  # the same crop, then the policy
        b = policy_dm.train_transform()(image)
        assert b.shape == a.shape == (3, 16, 16)
        differs.append(not torch.equal(a, b))
    assert any(differs)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"interpolation": "cubic"}, "interpolation must be one of nearest, bilinear, bicubic, box, hamming, lanczos"),
        ({"auto_augment": "rand-m9"}, "auto_augment must be one of randaugment"),
        ({"mean": (0.5, 0.5, 0.5)}, "give mean and std together"),
        ({"hflip": 2}, r"hflip must be a probability in \[0, 1\]"),
        ({"random_erasing": -0.1}, r"random_erasing must be a probability"),
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"image_size": (8, 0)}, r"image_size must be a positive integer or a \[height, width\] pair"),
        ({"image_size": (8, 12), "resize_size": 16}, "resize_size sizes square crops only.*give crop_pct instead"),
        ({"crop_pct": 1.5}, r"crop_pct must be a fraction in \(0, 1\]"),
        ({"crop_mode": "crop"}, "crop_mode must be one of center, squash, border"),
    ],
)
def test_image_folder_bad_preprocessing_argument_is_one_clear_error(tmp_path: Path, bad: dict, match: str) -> None:
    _write_image_folder(tmp_path, ["cat", "dog"])
    with pytest.raises(ZooError, match=match):
        ImageFolderDataModule(root=str(tmp_path), num_workers=0, **bad)


def test_image_files_predict_with_the_models_preprocessing_and_name_the_files(tmp_path: Path) -> None:
    """Unlabelled images under a folder (any depth): preprocessed as the model's cfg says (timm's eval transform
    of it), predicted in sorted path order, and the predictions CSV names each row's file and the classes the
    model's fit recorded."""
    import csv

    from timm.data import create_transform, resolve_data_config

    from zoo.callbacks import PredictionWriter
    from zoo.data import ImageFilesDataModule

    _write_image_folder(tmp_path / "new", ["b", "a"], split_dirs=("x",))
    (tmp_path / "new" / "notes.txt").write_text("not an image")
    dm = ImageFilesDataModule(root=str(tmp_path / "new"), batch_size=4, num_workers=0)
    assert dm.predict_files == [f"x/{c}/img{i}.png" for c in ("a", "b") for i in range(3)]
    model = _tiny_vit().eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": ("cat", "dog", "fish")}
    writer = PredictionWriter(tmp_path / "p.csv")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    trainer.predict(model, datamodule=dm, return_predictions=False)
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0] == ["index", "file", "cat", "dog", "fish"]
    assert [r[1] for r in rows[1:]] == dm.predict_files
    timm_eval = create_transform(**resolve_data_config({}, model=model))
    images = torch.stack([timm_eval(Image.open(tmp_path / "new" / f).convert("RGB")) for f in dm.predict_files])
    with torch.no_grad():
        want = model(images).softmax(-1)
    got = torch.tensor([[float(v) for v in r[2:]] for r in rows[1:]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ZooError, match="for predict only, not fit"):
        dm.setup("fit")
    with pytest.raises(ZooError, match="no image files at"):
        ImageFilesDataModule(root=str(tmp_path / "new" / "notes.txt"))
    with pytest.raises(ZooError, match="does not exist"):
        ImageFilesDataModule(root=str(tmp_path / "missing"))


def test_image_folder_predictions_name_the_val_files(tmp_path: Path) -> None:
    from zoo.callbacks import PredictionWriter

    _write_image_folder(tmp_path, ["cat", "dog"])
    dm = ImageFolderDataModule(root=str(tmp_path), batch_size=4, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(tmp_path / "p.pt")]
    )
    trainer.predict(_tiny_vit(num_classes=2).eval(), datamodule=dm, return_predictions=False)
    saved = torch.load(tmp_path / "p.pt")
    assert saved["files"] == [f"val/{c}/img{i}.png" for c in ("cat", "dog") for i in range(3)]
    assert saved["predictions"].shape == (6, 2)
