"""The point cloud data modules (zoo/data/pointcloud.py): OFF parsing, area-weighted surface sampling, ModelNet40
from HDF5 files (when h5py is installed) and from mesh folders, augmentations, the synthetic dataset, errors.
CPU, tiny files in tmp folders, no network."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from zoo.data.pointcloud import (
    SHAPES,
    ModelNet40DataModule,
    PointCloudAugment,
    PointCloudDataset,
    PointCloudFolderDataModule,
    SyntheticPointCloudDataModule,
    normalize_points,
    read_off,
    sample_surface,
)
from zoo.errors import ZooError

HAS_H5PY = importlib.util.find_spec("h5py") is not None

CUBE_OFF = """OFF
# a unit cube, quads
8 6 12
0 0 0
1 0 0
1 1 0
0 1 0
0 0 1
1 0 1
1 1 1
0 1 1
4 0 3 2 1
4 4 5 6 7
4 0 1 5 4
4 2 3 7 6
4 1 2 6 5
4 0 4 7 3
"""


def write_off(path: Path, vertices: list[list[float]], faces: list[list[int]], merged_header: bool = False) -> Path:
    header = f"OFF{len(vertices)} {len(faces)} 0\n" if merged_header else f"OFF\n{len(vertices)} {len(faces)} 0\n"
    body = "".join(" ".join(map(str, v)) + "\n" for v in vertices)
    body += "".join(f"{len(f)} " + " ".join(map(str, f)) + "\n" for f in faces)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body)
    return path


# ----------------------------------------------------------------------------------------------- meshes


def test_read_off_fan_triangulates_and_reads_modelnet_headers(tmp_path: Path) -> None:
    (tmp_path / "cube.off").write_text(CUBE_OFF)
    v, f = read_off(tmp_path / "cube.off")
    assert v.shape == (8, 3) and v.dtype == torch.float32 and f.shape == (12, 3) and f.dtype == torch.long
    assert f[:2].tolist() == [[0, 3, 2], [0, 2, 1]]
    # ModelNet's "OFF<n_vertices> <n_faces> <n_edges>" header, colours after the indices, a pentagon
    (tmp_path / "m.off").write_text(
        "OFF6 2 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n0 2 0\n5 5 5\n3 0 1 2 255 0 0\n5 0 1 2 3 4\n"
    )
    v, f = read_off(tmp_path / "m.off")
    assert v.shape == (6, 3) and f.tolist() == [[0, 1, 2], [0, 1, 2], [0, 2, 3], [0, 3, 4]]


@pytest.mark.parametrize(
    "text, message",
    [
        ("PLY\n", "must start with 'OFF'"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n", "announces 3 vertices and 1 faces"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "outside 0..2"),
        ("OFF\n3 1 0\n0 0 0\n1 x 0\n0 1 0\n3 0 1 2\n", "unreadable vertex or face line"),
        ("OFF\nthree\n", "expected 'n_vertices n_faces n_edges'"),
    ],
)
def test_bad_off_is_one_clear_error(text: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "bad.off").write_text(text)
    with pytest.raises(ZooError, match=message):
        read_off(tmp_path / "bad.off")
    with pytest.raises(ZooError, match="cannot read mesh"):
        read_off(tmp_path / "missing.off")


def test_surface_sampling_is_uniform_by_area() -> None:
    # two triangles in z = 0 (area 0.5) and z = 1 (area 1.5): a quarter of the points on the first
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 1], [0, 1, 1]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    pts = sample_surface(vertices, faces, 40000, generator=torch.Generator().manual_seed(0))
    assert pts.shape == (40000, 3) and pts.dtype == torch.float32
    low = pts[:, 2] == 0
    assert torch.all(low | (pts[:, 2] == 1))
    assert abs(low.float().mean().item() - 0.25) < 0.01
    # inside each triangle, and uniform: the mean is the centroid
    assert torch.all(pts[low, 0] + pts[low, 1] <= 1 + 1e-6) and torch.all(pts[~low, 0] / 3 + pts[~low, 1] <= 1 + 1e-6)
    assert torch.allclose(pts[low, :2].mean(0), torch.tensor([1 / 3, 1 / 3]), atol=0.01)
    assert torch.allclose(pts[~low, :2].mean(0), torch.tensor([1.0, 1 / 3]), atol=0.02)
    again = sample_surface(vertices, faces, 40000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pts, again)
    assert sample_surface(vertices, faces, 5, batch=3).shape == (3, 5, 3)
    with pytest.raises(ZooError, match="zero surface area"):
        sample_surface(vertices, torch.tensor([[0, 1, 1]]), 5)


# ----------------------------------------------------------------------------------------------- augmentation


def test_augmentations_keep_shapes_and_labels() -> None:
    torch.manual_seed(0)
    x = torch.randn(100, 6)
    rot = PointCloudAugment(scale=None, translate=0.0, rotate=math.pi, shuffle_points=False, up_axis="z")(x)
    assert rot.shape == x.shape and rot.dtype == x.dtype
    assert torch.equal(rot[:, 2], x[:, 2]) and torch.equal(rot[:, 5], x[:, 5])  # about z: z and normal z kept
    torch.testing.assert_close(rot[:, :2].norm(dim=1), x[:, :2].norm(dim=1))
    torch.testing.assert_close(rot[:, 3:5].norm(dim=1), x[:, 3:5].norm(dim=1))  # normals rotated too
    assert not torch.allclose(rot[:, 3:5], x[:, 3:5])
    # the same rotation with colour channels (normals=False): xyz turns, the rest does not
    turn = {"scale": None, "translate": 0.0, "rotate": math.pi, "shuffle_points": False}
    with_normals = PointCloudAugment(**turn)(x, torch.Generator().manual_seed(1))
    rgb = PointCloudAugment(**turn, normals=False)(x, torch.Generator().manual_seed(1))
    assert torch.equal(rgb[:, :3], with_normals[:, :3]) and torch.equal(rgb[:, 3:], x[:, 3:])
    assert not torch.allclose(with_normals[:, 3:5], x[:, 3:5])
    scaled = PointCloudAugment(scale=(0.5, 2.0), translate=0.0, shuffle_points=False)(x)
    ratio = scaled[:, :3] / x[:, :3]
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio)) and ((ratio >= 0.5) & (ratio <= 2.0)).all()
    assert torch.equal(scaled[:, 3:], x[:, 3:])
    moved = PointCloudAugment(scale=None, translate=0.2, shuffle_points=False)(x)
    shift = moved[:, :3] - x[:, :3]
    assert torch.allclose(shift, shift[:1].expand_as(shift)) and (shift.abs() <= 0.2).all()
    jittered = PointCloudAugment(scale=None, translate=0.0, jitter=1.0, jitter_clip=0.05, shuffle_points=False)(x)
    assert ((jittered - x)[:, :3].abs() <= 0.05 + 1e-6).all() and ((jittered - x)[:, :3].abs() > 0).any()
    shuffled = PointCloudAugment(scale=None, translate=0.0)(x)
    assert not torch.equal(shuffled, x) and torch.equal(shuffled[shuffled[:, 0].argsort()], x[x[:, 0].argsort()])
    up_y = PointCloudAugment(scale=None, translate=0.0, rotate=1.0, shuffle_points=False, up_axis="y")(x)
    assert torch.equal(up_y[:, 1], x[:, 1])
    data = PointCloudDataset(
        torch.randn(4, 50, 3),
        torch.tensor([3, 1, 0, 2]),
        num_points=20,
        augment=PointCloudAugment(rotate=0.5, jitter=0.01),
    )
    for i in range(4):
        points, label = data[i]
        assert points.shape == (20, 3) and label.item() == [3, 1, 0, 2][i]
    with pytest.raises(ZooError, match="scale must be None or"):
        PointCloudAugment(scale=(2.0, 1.0))
    with pytest.raises(ZooError, match="up_axis must be one of"):
        PointCloudAugment(up_axis="w")


def test_normalization() -> None:
    x = torch.randn(3, 50, 3) * 5 + 2
    unit = normalize_points(x, "unit_sphere")
    torch.testing.assert_close(unit.norm(dim=-1).amax(dim=-1), torch.ones(3))
    torch.testing.assert_close(unit.mean(dim=1), torch.zeros(3, 3), atol=1e-5, rtol=0)
    std = normalize_points(x, "standardize")
    torch.testing.assert_close(std.std(dim=(1, 2)), torch.ones(3))
    assert normalize_points(x, "none") is x
    with pytest.raises(ZooError, match="unknown normalization"):
        normalize_points(x, "max")


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_data_is_deterministic_and_labelled() -> None:
    a = SyntheticPointCloudDataModule(num_points=32, train_per_class=3, val_per_class=2, seed=1)
    b = SyntheticPointCloudDataModule(num_points=32, train_per_class=3, val_per_class=2, seed=1)
    c = SyntheticPointCloudDataModule(num_points=32, train_per_class=3, val_per_class=2, seed=2)
    for dm in (a, b, c):
        dm.setup()
    assert a.num_classes == len(SHAPES) == 8 and a.class_names == list(SHAPES)
    assert a.train_dataset.points.shape == (24, 32, 3) and a.val_dataset.points.shape == (16, 32, 3)
    assert torch.equal(a.train_dataset.points, b.train_dataset.points)
    assert torch.equal(a.val_dataset.points, b.val_dataset.points)
    assert not torch.equal(a.train_dataset.points, c.train_dataset.points)
    assert not torch.equal(a.train_dataset.points[:, :8], a.val_dataset.points[:, :8].repeat(2, 1, 1)[:24])
    assert torch.bincount(a.train_dataset.labels).tolist() == [3] * 8
    torch.testing.assert_close(a.train_dataset.points.norm(dim=-1).amax(-1), torch.ones(24))  # unit sphere
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (24, 32, 3) and x.dtype == torch.float32 and y.dtype == torch.long
    assert next(iter(a.predict_dataloader())).shape == (16, 32, 3)


def test_synthetic_shapes_lie_on_their_surfaces() -> None:
    g = torch.Generator().manual_seed(0)
    sphere = SHAPES["sphere"](2, 200, g)
    torch.testing.assert_close(sphere.norm(dim=-1), torch.ones(2, 200))
    cube = SHAPES["cube"](2, 200, g)
    assert torch.allclose(cube.abs().amax(dim=-1), torch.ones(2, 200))
    cyl = SHAPES["cylinder"](2, 2000, g)
    r = cyl[..., :2].norm(dim=-1)
    on_side = torch.isclose(r, torch.ones(())) & (cyl[..., 2].abs() <= 1)
    on_caps = torch.isclose(cyl[..., 2].abs(), torch.ones(())) & (r <= 1)
    assert (on_side | on_caps).all() and abs(on_side.float().mean().item() - 2 / 3) < 0.03
    torus = SHAPES["torus"](2, 500, g)
    tube = torch.stack([torus[..., :2].norm(dim=-1) - 1.0, torus[..., 2]], dim=-1).norm(dim=-1)
    torch.testing.assert_close(tube, torch.full((2, 500), 0.35))
    cone = SHAPES["cone"](2, 500, g)
    lateral = ~torch.isclose(cone[..., 2], torch.full((), -1.0))
    torch.testing.assert_close(cone[lateral][:, :2].norm(dim=-1), (1 - cone[lateral][:, 2]) / 2)


def test_bad_synthetic_options_are_one_clear_error() -> None:
    with pytest.raises(ZooError, match="shapes must be at least 2 distinct names"):
        SyntheticPointCloudDataModule(shapes=["sphere", "blob"])
    with pytest.raises(ZooError, match="num_points must be a positive integer"):
        SyntheticPointCloudDataModule(num_points=0)
    with pytest.raises(ZooError, match="batch_size must be a positive integer"):
        SyntheticPointCloudDataModule(batch_size=0)


# ----------------------------------------------------------------------------------------------- ModelNet40


def write_modelnet_meshes(root: Path) -> Path:
    """Two classes (airplane: a unit square in z = 0; bed: a cube), 2 train and 1 test meshes each."""
    square = ([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2, 3]])
    cube = (
        [[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)],
        [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]],
    )
    for name, (v, f) in (("airplane", square), ("bed", cube)):
        for split, n in (("train", 2), ("test", 1)):
            for i in range(n):
                write_off(root / name / split / f"{name}_{split}_{i:04d}.off", v, f, merged_header=i == 1)
    return root


def test_modelnet40_from_mesh_folders(tmp_path: Path) -> None:
    root = write_modelnet_meshes(tmp_path / "ModelNet40")
    cache = tmp_path / "cache" / "clouds.pt"
    dm = ModelNet40DataModule(root=str(root), num_points=64, batch_size=2, normalization="none", cache_file=str(cache))
    dm.setup()
    assert dm.class_names == ["airplane", "bed"] and dm.num_classes == 2 and dm.augmentation.up_axis == "z"
    train, test = dm.train_dataset, dm.val_dataset
    assert train.points.shape == (4, 64, 3) and test.points.shape == (2, 64, 3)
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [0, 1]
    assert torch.equal(train.points[:2, :, 2], torch.zeros(2, 64))  # the square lies in z = 0
    on_cube = ((train.points[2:] == 0) | (train.points[2:] == 1)).any(dim=-1)
    assert on_cube.all() and ((train.points >= 0) & (train.points <= 1)).all()
    assert cache.is_file()
    points, label = train[3]
    assert points.shape == (64, 3) and label.item() == 1
    # the cache rebuilds the same clouds without the meshes
    again = ModelNet40DataModule(
        root=str(tmp_path / "gone"), layout="off", num_points=64, normalization="none", cache_file=str(cache)
    )
    again.setup()
    assert torch.equal(again.train_dataset.points, train.points) and again.class_names == ["airplane", "bed"]
    unit = ModelNet40DataModule(root=str(root), num_points=64)
    unit.setup()
    torch.testing.assert_close(unit.val_dataset.points.norm(dim=-1).amax(-1), torch.ones(2))


@pytest.mark.skipif(not HAS_H5PY, reason="h5py is not installed (optional: pip install h5py)")
def test_modelnet40_hdf5_round_trip(tmp_path: Path) -> None:
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    written = {}
    for name, m in (("ply_data_train0.h5", 5), ("ply_data_train1.h5", 3), ("ply_data_test0.h5", 4)):
        data = rng.standard_normal((m, 100, 3)).astype(np.float32)
        label = rng.integers(0, 40, (m, 1)).astype(np.uint8)
        with h5py.File(tmp_path / name, "w") as f:
            f["data"], f["label"] = data, label
        written[name] = (data, label)
    (tmp_path / "shape_names.txt").write_text("".join(f"class{i}\n" for i in range(40)))
    dm = ModelNet40DataModule(root=str(tmp_path), num_points=50, batch_size=4, normalization="none")
    dm.setup()
    assert dm.class_names[:2] == ["class0", "class1"] and dm.num_classes == 40 and dm.augmentation.up_axis == "y"
    train = np.concatenate([written["ply_data_train0.h5"][0], written["ply_data_train1.h5"][0]])[:, :50]
    assert torch.equal(dm.train_dataset.points, torch.from_numpy(train))
    assert torch.equal(dm.val_dataset.points, torch.from_numpy(written["ply_data_test0.h5"][0][:, :50]))
    assert dm.val_dataset.labels.tolist() == written["ply_data_test0.h5"][1].ravel().tolist()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 50, 3) and y.dtype == torch.long
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(x, dm.val_dataset.points[:4])  # test clouds: no augmentation
    (tmp_path / "ply_data_test0.h5").unlink()
    with pytest.raises(ZooError, match=r"no ply_data_test\*.h5"):
        ModelNet40DataModule(root=str(tmp_path)).setup()


def test_modelnet40_hdf5_without_h5py_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ply_data_train0.h5").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py raises ImportError
    with pytest.raises(ZooError, match="pip install h5py"):
        ModelNet40DataModule(root=str(tmp_path)).setup()


def test_missing_modelnet40_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="does not exist: download modelnet40_ply_hdf5_2048"):
        ModelNet40DataModule(root=str(tmp_path / "nowhere")).setup()
    with pytest.raises(ZooError, match=r"no ModelNet40 data in .*ply_data_train\*.h5.*<class>/train/\*.off"):
        ModelNet40DataModule(root=str(tmp_path)).setup()
    (tmp_path / "chair" / "train").mkdir(parents=True)
    with pytest.raises(ZooError, match="no train meshes"):
        ModelNet40DataModule(root=str(tmp_path), layout="off").setup()
    write_off(tmp_path / "chair" / "train" / "a.off", [[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])
    with pytest.raises(ZooError, match="no test meshes"):
        ModelNet40DataModule(root=str(tmp_path), layout="off").setup()
    with pytest.raises(ZooError, match="layout must be"):
        ModelNet40DataModule(layout="ply")
    ModelNet40DataModule(root=str(tmp_path / "nowhere"))  # nothing is read at construction


# ----------------------------------------------------------------------------------------------- your own clouds


def test_dataset_takes_numpy_float64_and_refuses_class_names() -> None:
    import numpy as np

    points = np.random.default_rng(0).normal(size=(3, 5, 4))  # float64, as numpy makes them
    data = PointCloudDataset(points, np.array([2, 0, 1]))
    cloud, label = data[1]
    assert cloud.dtype == torch.float32 and label.item() == 0
    torch.testing.assert_close(cloud, torch.from_numpy(points[1]).float(), rtol=0, atol=0)
    with pytest.raises(ZooError, match=r"labels must be numbers.*numpy\.unique\(labels, return_inverse=True\)"):
        PointCloudDataset(points, np.array(["ball", "box", "ball"]))
    with pytest.raises(ZooError, match="labels must be integer class indices"):
        PointCloudDataset(points, np.array([0.0, 1.0, 0.0]))


def test_folder_clouds_of_any_size_format_and_dtype_with_labels_from_train(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    files = {}
    for split, classes in (("train", ("ball", "box", "plane")), ("val", ("plane",)), ("test", ("box",))):
        for name in classes:
            for i, n in enumerate((12, 17)):  # clouds of different sizes, 4 channels (xyz + intensity)
                cloud = rng.normal(size=(n, 4))
                f = tmp_path / split / name / (f"{i}.npy" if i else f"{i}.txt")
                f.parent.mkdir(parents=True, exist_ok=True)
                np.save(f, cloud) if i else np.savetxt(f, cloud, delimiter=",")  # float64 .npy, comma text
                files[split, name, i] = cloud
    dm = PointCloudFolderDataModule(str(tmp_path), num_points=10, normalization="none", batch_size=2)
    dm.setup()
    assert dm.class_names == ["ball", "box", "plane"] and dm.num_classes == 3
    # val holds only "plane", test only "box": their labels are the train indices (2, 1), not 0
    assert dm.val_dataset.labels.tolist() == [2, 2] and dm.test_dataset.labels.tolist() == [1, 1]
    assert len(dm.train_dataset) == 6 and dm.train_dataset.points.dtype == torch.float32
    for i in (0, 1):  # each item: 10 distinct points of its own file (a subset, not a resampling)
        source = torch.from_numpy(files["val", "plane", i]).float()
        picked = dm.val_dataset[i][0]
        assert picked.shape == (10, 4)
        assert all(bool((source == row).all(dim=1).any()) for row in picked)
        assert torch.unique(picked, dim=0).shape[0] == 10
    assert len(next(iter(dm.predict_dataloader()))) == 2  # predict reads test


def test_folder_clouds_bad_layouts_are_one_clear_error(tmp_path: Path) -> None:
    import numpy as np

    for split, name, n in (("train", "a", 20), ("train", "b", 20), ("val", "c", 20)):
        (tmp_path / split / name).mkdir(parents=True)
        np.save(tmp_path / split / name / "0.npy", np.zeros((n, 3)))
    with pytest.raises(ZooError, match=r"has classes \['c'\] that .*train lacks"):
        PointCloudFolderDataModule(str(tmp_path), num_points=8).setup()
    (tmp_path / "val" / "c").rename(tmp_path / "val" / "a")
    with pytest.raises(ZooError, match="0.npy has 20 points, fewer than num_points=32: lower num_points"):
        PointCloudFolderDataModule(str(tmp_path), num_points=32).setup()
    np.save(tmp_path / "train" / "b" / "1.npy", np.zeros((20, 6)))
    with pytest.raises(ZooError, match="has 6 channels per point, the clouds before it 3"):
        PointCloudFolderDataModule(str(tmp_path), num_points=8).setup()
    with pytest.raises(ZooError, match="has no train or val folder"):
        PointCloudFolderDataModule(str(tmp_path / "train"), num_points=8).setup()


def test_pad_point_clouds_pads_with_zeros_and_marks_the_padding() -> None:
    from zoo.data.pointcloud import pad_point_clouds

    clouds = [torch.randn(3, 4), torch.randn(5, 4), torch.randn(1, 4)]
    points, labels, mask = pad_point_clouds([(c, torch.tensor(i)) for i, c in enumerate(clouds)])
    assert points.shape == (3, 5, 4) and labels.tolist() == [0, 1, 2] and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [2, 0, 4]
    for cloud, row, padded in zip(clouds, points, mask):
        torch.testing.assert_close(row[~padded], cloud, rtol=0, atol=0)
        assert (row[padded] == 0).all()
    inputs, inputs_mask = pad_point_clouds(clouds)  # prediction: the clouds alone
    assert torch.equal(inputs, points) and torch.equal(inputs_mask, mask)


def _write_clouds_of_many_sizes(root: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for c, name in enumerate(("ball", "box")):
            for i in range(count):
                f = root / split / name / f"{i}.npy"
                f.parent.mkdir(parents=True, exist_ok=True)
                np.save(f, rng.normal(size=(5 + 3 * i + c, 3)) * (1 + c))


def test_whole_clouds_of_many_sizes_train_a_set_transformer_with_padded_batches(tmp_path: Path) -> None:
    """num_points=None: each cloud whole, batches padded with a mask; the Trainer's predictions of a padded batch
    equal each cloud run alone (padding changes nothing), and a model without padding_mask says what to do."""
    import lightning.pytorch as pl

    from zoo.models import PointCloudTransformer, SetTransformer

    _write_clouds_of_many_sizes(tmp_path)
    dm = PointCloudFolderDataModule(str(tmp_path), num_points=None, batch_size=4, normalization="none")
    dm.setup()
    points, labels, mask = next(iter(dm.val_dataloader()))
    assert points.shape[0] == 4 and mask.any() and labels.dtype == torch.long
    torch.manual_seed(0)
    model = SetTransformer(num_classes=2, embed_dim=8, num_heads=2, num_inducing=2, n_iter=3, lr_scheduler=None)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    predicted = torch.cat(trainer.predict(model, datamodule=dm))
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(cloud[None]).softmax(-1) for cloud, _ in dm.val_dataset])
    torch.testing.assert_close(predicted, alone, rtol=1e-5, atol=1e-6)
    pct = PointCloudTransformer(num_classes=2, embed_dim=8, sample_points=(4, 2), num_neighbors=2, depth=1)
    with pytest.raises(ZooError, match="padding_mask.*PointCloudTransformer does not take.*num_points"):
        pct.training_step((points, labels, mask), 0)
    with pytest.raises(ZooError, match=r"third item must be the padding mask.*float32"):
        model.training_step((points, labels, mask.float()), 0)  # e.g. sample weights: not a mask


def test_dataset_of_clouds_of_different_sizes_gives_whole_clouds() -> None:
    clouds = [torch.randn(4, 3).double(), torch.randn(7, 3)]
    data = PointCloudDataset(clouds, [1, 0])
    assert data[0][0].shape == (4, 3) and data[0][0].dtype == torch.float32 and len(data) == 2
    assert data.collate_fn is not None
    as_lists = PointCloudDataset([c.tolist() for c in clouds], [1, 0])  # plain nested lists, as read from JSON
    assert as_lists[1][0].shape == (7, 3) and as_lists.collate_fn is not None
    with pytest.raises(ZooError, match="leave num_points None"):
        PointCloudDataset(clouds, [1, 0], num_points=3)
    with pytest.raises(ZooError, match="one number of channels"):
        PointCloudDataset([torch.randn(4, 3), torch.randn(5, 6)], [0, 1])
