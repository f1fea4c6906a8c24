"""Point cloud data modules: ModelNet40 (HDF5 files or ``.off`` mesh folders) and an embedded synthetic default.

Every module yields ``(points, label)`` with points (num_points, C) float32 (xyz first) and the train split
augmented by :class:`PointCloudAugment` (random anisotropic scaling, translation, rotation about the up axis,
jitter with clipping, shuffling of the point order), drawn from torch's global RNG in ``__getitem__`` (so
``lightning.seed_everything`` makes it deterministic). ModelNet40 has a train and a test split only: the val,
test and predict loaders all read the test split, as the published experiments do.

Meshes are turned into point clouds by sampling points uniformly on the surface (:func:`sample_surface`):
a triangle t with probability area_t / sum area, then barycentric coordinates

    p = (1 - sqrt(r1)) a + sqrt(r1) (1 - r2) b + sqrt(r1) r2 c,     r1, r2 ~ U(0, 1).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from zoo.data.base import ZooDataModule
from zoo.errors import ZooError

__all__ = [
    "SHAPES",
    "ModelNet40DataModule",
    "PointCloudAugment",
    "PointCloudDataset",
    "PointCloudFolderDataModule",
    "SyntheticPointCloudDataModule",
    "normalize_points",
    "pad_point_clouds",
    "read_off",
    "read_points",
    "sample_surface",
]

AXES = {"x": 0, "y": 1, "z": 2}
NORMALIZATIONS = ("unit_sphere", "standardize", "none")


# ------------------------------------------------------------------------------------------------ geometry


def normalize_points(points: torch.Tensor, mode: str = "unit_sphere") -> torch.Tensor:
    """Normalise clouds ``points`` (..., N, C) on their xyz channels (the first three) by ``mode``:

    ``"unit_sphere"``: x <- (x - mean) / max_i |x_i - mean| (PointNet's ModelNet40 files);
    ``"standardize"``: x <- (x - mean) / std over all coordinates of the cloud (the Set Transformer's ModelNet40);
    ``"none"``: unchanged.
    """
    if mode not in NORMALIZATIONS:
        raise ZooError(f"unknown normalization {mode!r}: choose one of {', '.join(NORMALIZATIONS)}")
    if mode == "none":
        return points
    xyz = points[..., :3]
    if mode == "unit_sphere":
        xyz = xyz - xyz.mean(dim=-2, keepdim=True)
        xyz = xyz / xyz.norm(dim=-1).amax(dim=-1)[..., None, None].clamp_min(1e-12)
    else:
        xyz = (xyz - xyz.mean(dim=(-2, -1), keepdim=True)) / xyz.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return torch.cat([xyz, points[..., 3:]], dim=-1)


def _rotation_about(axis: int, angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) by ``angle`` (...) about coordinate ``axis`` (right-handed)."""
    c, s = angle.cos(), angle.sin()
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = torch.zeros(*angle.shape, 3, 3, dtype=angle.dtype)
    r[..., axis, axis] = 1.0
    r[..., i, i], r[..., i, j], r[..., j, i], r[..., j, j] = c, -s, s, c
    return r


def sample_surface(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    num_points: int,
    generator: torch.Generator | None = None,
    batch: int | None = None,
) -> torch.Tensor:
    """``num_points`` points uniformly on a triangle mesh (area-weighted triangle, uniform barycentric point).

    vertices (V, 3), faces (F, 3) long -> (num_points, 3), or (batch, num_points, 3) independent samples.
    ``generator``: the random generator drawn from; None for torch's global one.
    """
    if faces.dim() != 2 or faces.shape[-1] != 3 or faces.shape[0] == 0:
        raise ZooError(f"sample_surface needs triangles (F, 3) with F >= 1, got faces of shape {tuple(faces.shape)}")
    v = vertices.to(torch.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    area = 0.5 * torch.linalg.cross(b - a, c - a).norm(dim=-1)
    if not bool(area.sum() > 0):
        raise ZooError("sample_surface: the mesh has zero surface area (every triangle is degenerate)")
    m = 1 if batch is None else batch
    tri = torch.multinomial(area.expand(m, -1), num_points, replacement=True, generator=generator)  # (m, n)
    r1 = torch.rand(m, num_points, 1, dtype=torch.float64, generator=generator).sqrt()
    r2 = torch.rand(m, num_points, 1, dtype=torch.float64, generator=generator)
    pts = (1 - r1) * a[tri] + r1 * (1 - r2) * b[tri] + r1 * r2 * c[tri]
    pts = pts.to(torch.float32)
    return pts[0] if batch is None else pts


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def read_off(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse the OFF mesh file ``path``: vertices (V, 3) float32 and triangles (F, 3) long (polygons
    fan-triangulated).

    Accepts comments (``#``), blank lines, extra per-vertex / per-face values (colours), and ModelNet's header
    with the counts on the ``OFF`` line itself (``OFF490 518 0``).
    """
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise ZooError(f"cannot read mesh {path}: {e.strerror or e}") from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]

    def bad(why: str) -> ZooError:
        return ZooError(f"{path} is not a valid OFF mesh: {why}")

    if not lines or not lines[0].upper().startswith("OFF"):
        raise bad("the first line must start with 'OFF'")
    rest, pos = lines[0][3:].strip(), 1
    if not rest:
        if len(lines) < 2:
            raise bad("no vertex / face counts")
        rest, pos = lines[1], 2
    try:
        counts = [int(t) for t in rest.split()]
        n_vertices, n_faces = counts[0], counts[1]
    except (ValueError, IndexError):
        raise bad(f"expected 'n_vertices n_faces n_edges', got {rest!r}") from None
    if len(lines) < pos + n_vertices + n_faces:
        raise bad(
            f"the header announces {n_vertices} vertices and {n_faces} faces, the file has "
            f"{len(lines) - pos} data lines"
        )
    try:
        vertices = torch.tensor(
            [[float(t) for t in ln.split()[:3]] for ln in lines[pos : pos + n_vertices]], dtype=torch.float32
        ).reshape(n_vertices, 3)
        triangles: list[list[int]] = []
        for ln in lines[pos + n_vertices : pos + n_vertices + n_faces]:
            tokens = ln.split()
            k = int(tokens[0])
            idx = [int(t) for t in tokens[1 : 1 + k]]
            if k < 3 or len(idx) != k:
                raise ValueError(ln)
            triangles.extend([idx[0], idx[i], idx[i + 1]] for i in range(1, k - 1))
    except (ValueError, RuntimeError) as e:
        raise bad(f"unreadable vertex or face line ({str(e)[:60]})") from None
    faces = torch.tensor(triangles, dtype=torch.long).reshape(-1, 3)
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= n_vertices):
        raise bad(f"a face refers to a vertex outside 0..{n_vertices - 1}")
    return vertices, faces


# ------------------------------------------------------------------------------------------------ augmentation


class PointCloudAugment:
    """Random training augmentation of one cloud (N, C) (xyz first; with ``normals``, channels 3:6 are normals
    and turn with the points; otherwise the channels after xyz, colour or intensity, are left as they are).

    In order: rotation about the up axis by U(-rotate, rotate) radians, anisotropic scaling by U(scale) per axis,
    translation by U(-translate, translate) per axis, jitter N(0, jitter^2) clipped to [-jitter_clip, jitter_clip],
    and a random permutation of the points (``shuffle_points``). Draws from torch's global RNG (or ``generator``).
    ``up_axis`` (``"x"``, ``"y"`` or ``"z"``) is the axis the rotation turns about.
    """

    def __init__(
        self,
        scale: Sequence[float] | None = (2 / 3, 1.5),
        translate: float = 0.2,
        rotate: float = 0.0,
        jitter: float = 0.0,
        jitter_clip: float = 0.05,
        shuffle_points: bool = True,
        up_axis: str = "z",
        normals: bool = True,
    ) -> None:
        if scale is not None and (len(scale) != 2 or not 0 < scale[0] <= scale[1]):
            raise ZooError(f"scale must be None or (low, high) with 0 < low <= high, got {scale!r}")
        if translate < 0 or rotate < 0 or jitter < 0 or jitter_clip < 0:
            raise ZooError(
                "translate, rotate, jitter and jitter_clip must be >= 0, got "
                f"{translate}, {rotate}, {jitter}, {jitter_clip}"
            )
        if up_axis not in AXES:
            raise ZooError(f"up_axis must be one of {', '.join(AXES)}, got {up_axis!r}")
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))
        self.translate, self.rotate = float(translate), float(rotate)
        self.jitter, self.jitter_clip = float(jitter), float(jitter_clip)
        self.shuffle_points, self.up_axis = bool(shuffle_points), up_axis
        self.normals = bool(normals)

    def __repr__(self) -> str:
        return (
            f"PointCloudAugment(scale={self.scale}, translate={self.translate}, rotate={self.rotate}, "
            f"jitter={self.jitter}, jitter_clip={self.jitter_clip}, shuffle_points={self.shuffle_points}, "
            f"up_axis={self.up_axis!r}, normals={self.normals})"
        )

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The augmented cloud (N, C): same shape and dtype."""
        g = generator
        xyz, rest = points[:, :3], points[:, 3:]
        if self.rotate > 0:
            angle = (torch.rand((), generator=g) * 2 - 1) * self.rotate
            r = _rotation_about(AXES[self.up_axis], angle).to(points.dtype)
            xyz = xyz @ r.T
            if self.normals and rest.shape[1] >= 3:
                rest = torch.cat([rest[:, :3] @ r.T, rest[:, 3:]], dim=1)
        if self.scale is not None:
            lo, hi = self.scale
            xyz = xyz * (lo + (hi - lo) * torch.rand(3, generator=g)).to(points.dtype)
        if self.translate > 0:
            xyz = xyz + ((torch.rand(3, generator=g) * 2 - 1) * self.translate).to(points.dtype)
        if self.jitter > 0:
            noise = (torch.randn(xyz.shape, generator=g) * self.jitter).clamp(-self.jitter_clip, self.jitter_clip)
            xyz = xyz + noise.to(points.dtype)
        out = torch.cat([xyz, rest], dim=1)
        if self.shuffle_points:
            out = out[torch.randperm(out.shape[0], generator=g)]
        return out


def _as_tensor(name: str, values: Any) -> torch.Tensor:
    """``values`` (a tensor, a numpy array, a list of numbers) as a tensor; strings are one ZooError."""
    if isinstance(values, torch.Tensor):
        return values
    try:
        import numpy as np

        array = np.asarray(values)
    except ValueError:
        raise ZooError(
            f"{name} must be one array; clouds of different sizes: give a list of (P_i, C) clouds, or use "
            "PointCloudFolderDataModule(num_points=None)"
        ) from None
    if array.dtype.kind not in "biuf":
        raise ZooError(
            f"{name} must be numbers, got a {array.dtype} array; for class names as labels, map them to indices "
            "first (e.g. numpy.unique(labels, return_inverse=True)[1]), or use PointCloudFolderDataModule"
        )
    return torch.from_numpy(array)


def _check_sampling(num_points: Any, normalization: Any, whole: bool = False) -> None:
    """One ZooError for a data module's ``num_points`` (a positive integer; None too where ``whole`` clouds are
    allowed) or ``normalization`` (a known name)."""
    if whole and num_points is None:
        pass
    elif isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        either = " (or null: every cloud whole, batches padded)" if whole else ""
        raise ZooError(f"num_points must be a positive integer{either}, got {num_points!r}")
    if normalization not in NORMALIZATIONS:
        raise ZooError(f"unknown normalization {normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")


def pad_point_clouds(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor] | torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
    """Collate clouds of different sizes (a DataLoader's ``collate_fn``): the points zero-padded to the largest
    cloud, (B, N_max, C), with ``padding_mask`` (B, N_max), True = padded point, the models' convention. Samples
    ``(points, label)`` give ``(points, labels, padding_mask)``; clouds alone (prediction) ``(points,
    padding_mask)``.

    Args:
        samples: the dataset's items: (N_i, C) clouds, or (cloud, label) pairs.
    """
    labelled = isinstance(samples[0], (tuple, list))
    clouds = [sample[0] if labelled else sample for sample in samples]
    sizes = torch.tensor([cloud.shape[0] for cloud in clouds])
    points = torch.nn.utils.rnn.pad_sequence(clouds, batch_first=True)
    padding_mask = torch.arange(points.shape[1]) >= sizes[:, None]
    if not labelled:
        return points, padding_mask
    return points, torch.stack([torch.as_tensor(sample[1]) for sample in samples]), padding_mask


class PointCloudDataset(Dataset):
    """Clouds ``points`` (M, P, C) and ``labels`` (M,) (tensors or numpy arrays; points stored as float32, labels
    as class indices 0..K-1): item i is ``num_points`` of cloud i (the first ones, or a random subset with
    ``subsample="random"``), augmented by ``augment`` when given.

    ``points`` may also be a list of clouds of different sizes (P_i, C): items are then whole clouds
    (``num_points`` None), batched by :func:`pad_point_clouds` (``collate_fn``) with a padding mask.

    Args:
        points: the clouds (M, P, C), xyz first, floating point; or a list of (P_i, C) clouds.
        labels: the class indices (M,), integers.
        num_points: points per item (None: all P).
        augment: a transform of one cloud (N, C) (e.g. :class:`PointCloudAugment`); None for none.
        subsample: ``"first"`` or ``"random"`` (a new random subset at every access).
    """

    def __init__(
        self,
        points: torch.Tensor,
        labels: torch.Tensor,
        num_points: int | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        subsample: str = "first",
    ) -> None:
        self.collate_fn: Callable[..., Any] | None = None
        if isinstance(points, (list, tuple)) and len({tuple(_as_tensor("points", c).shape) for c in points}) > 1:
            self._set_clouds(points, labels, num_points, augment)  # clouds of different sizes
            return
        points, labels = _as_tensor("points", points), _as_tensor("labels", labels)
        if points.dim() != 3 or labels.shape != points.shape[:1]:
            raise ZooError(
                f"points must be (M, P, C) and labels (M,), got {tuple(points.shape)} and {tuple(labels.shape)}; "
                "clouds of different sizes: give them as a list of (P_i, C) clouds (batched with a padding mask), "
                "or keep one file per cloud and use PointCloudFolderDataModule"
            )
        if not points.is_floating_point():
            raise ZooError(f"points must be floating point coordinates, got {points.dtype}: give points.float()")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ZooError(
                f"labels must be integer class indices 0..K-1, got {labels.dtype}: map your labels to indices first "
                "(e.g. numpy.unique(labels, return_inverse=True)[1])"
            )
        num_points = points.shape[1] if num_points is None else int(num_points)
        if num_points > points.shape[1]:
            raise ZooError(f"num_points={num_points} exceeds the {points.shape[1]} points per cloud of the data")
        if subsample not in ("first", "random"):
            raise ZooError(f"subsample must be 'first' or 'random', got {subsample!r}")
        # float32 as every model expects (a float64 numpy array would fail in the first Linear)
        self.points, self.labels = points.to(torch.float32), labels.long()
        self.num_points, self.augment, self.subsample = num_points, augment, subsample

    def _set_clouds(self, clouds: Sequence[Any], labels: Any, num_points: int | None, augment: Callable | None) -> None:
        """A list of clouds (P_i, C) of any sizes: whole clouds as items, batched with :func:`pad_point_clouds`."""
        if num_points is not None:
            raise ZooError(
                "num_points applies to clouds of one size (M, P, C); a list of clouds of different sizes gives each "
                "cloud whole, batched with a padding mask: leave num_points None (or resample the clouds to one size)"
            )
        tensors = [_as_tensor("points", cloud) for cloud in clouds]
        labels = _as_tensor("labels", labels)
        channels = {t.shape[-1] for t in tensors if t.dim() == 2}
        if not tensors or any(t.dim() != 2 or t.shape[0] < 1 for t in tensors) or len(channels) != 1:
            raise ZooError(
                "points given as a list must be non-empty (P_i, C) clouds with one number of channels C, got "
                f"shapes {[tuple(t.shape) for t in tensors[:4]]}{' ...' if len(tensors) > 4 else ''}"
            )
        if labels.shape != (len(tensors),):
            raise ZooError(f"labels must be ({len(tensors)},), one per cloud, got {tuple(labels.shape)}")
        if not all(t.is_floating_point() for t in tensors):
            raise ZooError("points must be floating point coordinates: give each cloud as float")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ZooError(f"labels must be integer class indices 0..K-1, got {labels.dtype}")
        self.points = [t.to(torch.float32) for t in tensors]
        self.labels = labels.long()
        self.num_points, self.augment, self.subsample = None, augment, "first"
        self.collate_fn = pad_point_clouds

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cloud = self.points[index]
        if self.num_points is None:
            pass
        elif self.subsample == "random" and self.num_points < cloud.shape[0]:
            cloud = cloud[torch.randperm(cloud.shape[0])[: self.num_points]]
        else:
            cloud = cloud[: self.num_points]
        if self.augment is not None:
            cloud = self.augment(cloud)
        return cloud, self.labels[index]


class _PointCloudDataModule(ZooDataModule):
    """The point cloud modules' common part: the train augmentation, and a train loader that drops its last
    incomplete batch. Subclasses set ``train_dataset`` and ``val_dataset`` in setup; val, test and predict read
    the val split."""

    test_split = "val"
    num_classes: int
    class_names: list[str]

    def __init__(self, batch_size: int, num_workers: int, augment_args: dict[str, Any]) -> None:
        super().__init__(batch_size, num_workers)
        self.augmentation = PointCloudAugment(**augment_args)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented train split (the last incomplete batch is dropped: BatchNorm needs 2 samples)."""
        train = self._split("train", "fit")
        return self._loader(train, shuffle=True, drop_last=len(train) > self.batch_size)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ ModelNet40


def _sorted_files(root: Path, pattern: str) -> list[Path]:
    """Files matching pattern, in natural order (ply_data_train2 before ply_data_train10)."""
    return sorted(root.glob(pattern), key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


class ModelNet40DataModule(_PointCloudDataModule):
    """ModelNet40 (12311 CAD models, 40 classes; 9843 train, 2468 test) from one of the usual layouts:

    - ``layout="hdf5"``: ``modelnet40_ply_hdf5_2048`` (PointNet's files): ``ply_data_train*.h5`` and
      ``ply_data_test*.h5`` with datasets ``data`` (M, 2048, 3) and ``label`` (M, 1), and ``shape_names.txt``
      (class names). Needs h5py (``pip install h5py``). Clouds are already on the unit sphere, y is up.
    - ``layout="off"``: the ModelNet40 mesh folders ``<root>/<class>/{train,test}/*.off``; ``num_points`` points are
      sampled once per mesh, uniformly on the surface (fixed ``seed``), z is up. ``cache_file`` (a ``.pt`` path)
      keeps the sampled clouds, since reading 12311 meshes takes minutes.
    - ``layout="auto"``: whichever of the two ``root`` holds.

    Nothing is read before ``setup`` (missing files: one ZooError saying what is expected where; nothing is
    downloaded). Val, test and predict use the test split.

    Args:
        root: the folder of the HDF5 files or of the 40 class folders.
        num_points: points per cloud (HDF5: the first ``num_points`` of the 2048, as PCT).
        normalization: ``"unit_sphere"``, ``"standardize"`` (the Set Transformer's) or ``"none"``.
        scale: the per-axis scaling range (low, high) of the train augmentation (:class:`PointCloudAugment`; the
            defaults are PCT's: scaling U(2/3, 3/2) and translation U(-0.2, 0.2) per axis, shuffled points); None
            for no scaling.
        translate: the per-axis translation bound of the train augmentation.
        rotate: the rotation bound (radians) of the train augmentation, about the up axis.
        jitter: the standard deviation of the train augmentation's jitter (0: none).
        jitter_clip: the bound the jitter is clipped to.
        shuffle_points: whether the train augmentation permutes the points.
        up_axis: axis of the rotation augmentation: ``"auto"`` (y for HDF5, z for meshes) or x / y / z.
        batch_size: samples per batch (an integer >= 1).
        num_workers: DataLoader worker processes (an integer >= 0; 0 loads in the main process).
        seed: the seed of the mesh sampling.
        layout: ``"hdf5"``, ``"off"`` or ``"auto"`` (above).
        cache_file: a ``.pt`` file that keeps the clouds sampled from the meshes (``layout="off"``); None for none.
    """

    def __init__(
        self,
        root: str = "data/modelnet40_ply_hdf5_2048",
        layout: str = "auto",
        num_points: int = 1024,
        batch_size: int = 32,
        num_workers: int = 0,
        normalization: str = "unit_sphere",
        scale: Sequence[float] | None = (2 / 3, 1.5),
        translate: float = 0.2,
        rotate: float = 0.0,
        jitter: float = 0.0,
        jitter_clip: float = 0.05,
        shuffle_points: bool = True,
        up_axis: str = "auto",
        seed: int = 0,
        cache_file: str | None = None,
    ) -> None:
        if layout not in ("auto", "hdf5", "off"):
            raise ZooError(f"layout must be 'auto', 'hdf5' or 'off', got {layout!r}")
        _check_sampling(num_points, normalization)
        if up_axis != "auto" and up_axis not in AXES:
            raise ZooError(f"up_axis must be 'auto' or one of {', '.join(AXES)}, got {up_axis!r}")
        super().__init__(
            batch_size,
            num_workers,
            {
                "scale": scale,
                "translate": translate,
                "rotate": rotate,
                "jitter": jitter,
                "jitter_clip": jitter_clip,
                "shuffle_points": shuffle_points,
                "up_axis": "z" if up_axis == "auto" else up_axis,
            },
        )
        self.save_hyperparameters()
        self.root, self.layout, self.num_points = Path(root).expanduser(), layout, num_points
        self.normalization, self.up_axis, self.seed = normalization, up_axis, int(seed)
        self.cache_file = None if cache_file is None else Path(cache_file).expanduser()
        self.num_classes = 40
        self.class_names = [str(i) for i in range(40)]

    # ---------------------------------------------------------------- reading
    def _detect_layout(self) -> str:
        if self.layout != "auto":
            return self.layout
        if any(self.root.glob("ply_data_train*.h5")):
            return "hdf5"
        if any(self.root.glob("*/train/*.off")):
            return "off"
        raise ZooError(
            f"no ModelNet40 data in {self.root}: expected either the HDF5 files (modelnet40_ply_hdf5_2048: "
            f"ply_data_train*.h5, ply_data_test*.h5, shape_names.txt) or the mesh folders "
            f"(ModelNet40/<class>/train/*.off, <class>/test/*.off); download one of them and give its folder as root"
        )

    def _read_hdf5(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        try:
            import h5py
        except ImportError:
            raise ZooError(
                "reading the ModelNet40 HDF5 files needs h5py: pip install h5py (or use the .off "
                "mesh folders with layout='off')"
            ) from None
        import numpy as np

        splits = {}
        for split in ("train", "test"):
            files = _sorted_files(self.root, f"ply_data_{split}*.h5")
            if not files:
                raise ZooError(
                    f"no ply_data_{split}*.h5 in {self.root}: the ModelNet40 HDF5 folder "
                    f"(modelnet40_ply_hdf5_2048) holds ply_data_train0..4.h5 and ply_data_test0..1.h5"
                )
            data, labels = [], []
            for f in files:
                try:
                    with h5py.File(f, "r") as h5:
                        data.append(np.asarray(h5["data"], dtype=np.float32))
                        labels.append(np.asarray(h5["label"]).reshape(-1).astype(np.int64))
                except (OSError, KeyError) as e:
                    raise ZooError(
                        f"cannot read {f} as a ModelNet40 HDF5 file with datasets 'data' and 'label' ({e})"
                    ) from None
            points = torch.from_numpy(np.concatenate(data))
            if points.dim() != 3 or points.shape[-1] < 3:
                raise ZooError(f"{files[0]}: dataset 'data' must be (M, P, 3), got {tuple(points.shape)}")
            splits[split] = (points, torch.from_numpy(np.concatenate(labels)))
        names = self.root / "shape_names.txt"
        if names.is_file():
            self.class_names = [ln.strip() for ln in names.read_text().splitlines() if ln.strip()]
        return splits

    def _read_meshes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.cache_file is not None and self.cache_file.is_file():
            cached = torch.load(self.cache_file, weights_only=True)
            if cached.get("num_points") == self.num_points and cached.get("seed") == self.seed:
                self.class_names = list(cached["class_names"])
                return {s: (cached[f"{s}_points"], cached[f"{s}_labels"]) for s in ("train", "test")}
        classes = sorted(p.name for p in self.root.iterdir() if (p / "train").is_dir()) if self.root.is_dir() else []
        if not classes:
            raise ZooError(
                f"no ModelNet40 mesh folders in {self.root}: expected <root>/<class>/train/*.off and "
                f"<root>/<class>/test/*.off (the ModelNet40.zip folders)"
            )
        self.class_names = classes
        g = torch.Generator().manual_seed(self.seed)
        splits = {}
        for split in ("train", "test"):
            clouds, labels = [], []
            for label, name in enumerate(classes):
                for f in sorted((self.root / name / split).glob("*.off")):
                    vertices, faces = read_off(f)
                    clouds.append(sample_surface(vertices, faces, self.num_points, generator=g))
                    labels.append(label)
            if not clouds:
                raise ZooError(f"no {split} meshes in {self.root}: expected <root>/<class>/{split}/*.off")
            splits[split] = (torch.stack(clouds), torch.tensor(labels, dtype=torch.long))
        if self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "num_points": self.num_points,
                    "seed": self.seed,
                    "class_names": classes,
                    **{f"{s}_points": p for s, (p, _) in splits.items()},
                    **{f"{s}_labels": y for s, (_, y) in splits.items()},
                },
                self.cache_file,
            )
        return splits

    def setup(self, stage: str | None = None) -> None:
        """Read (or sample) both splits once; later calls are no-ops."""
        if self.val_dataset is not None:
            return
        if not self.root.is_dir() and not (self.cache_file is not None and self.cache_file.is_file()):
            raise ZooError(
                f"ModelNet40 root {self.root} does not exist: download modelnet40_ply_hdf5_2048 (HDF5) or "
                f"ModelNet40 (.off meshes) and give its folder as root (nothing is downloaded)"
            )
        layout = "off" if not self.root.is_dir() else self._detect_layout()
        splits = self._read_hdf5() if layout == "hdf5" else self._read_meshes()
        if self.up_axis == "auto":
            self.augmentation.up_axis = "y" if layout == "hdf5" else "z"
        self.num_classes = len(self.class_names)
        (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
        if self.num_points > train_x.shape[1]:
            raise ZooError(
                f"num_points={self.num_points} exceeds the {train_x.shape[1]} points per cloud of the "
                f"files in {self.root}"
            )
        train_x = normalize_points(train_x[:, : self.num_points], self.normalization)
        test_x = normalize_points(test_x[:, : self.num_points], self.normalization)
        self.train_dataset = PointCloudDataset(train_x, train_y, self.num_points, augment=self.augmentation)
        self.val_dataset = PointCloudDataset(test_x, test_y, self.num_points)


# ------------------------------------------------------------------------------------------------ your own clouds

CLOUD_SUFFIXES = (".npy", ".txt", ".xyz", ".csv", ".pts", ".off")


def read_points(path: str | os.PathLike) -> torch.Tensor:
    """One cloud (P, C) float32 from ``path``: ``.npy`` (a (P, C) array, read without pickle), ``.txt`` /
    ``.xyz`` / ``.csv`` / ``.pts`` (one point a line, values separated by spaces or commas, e.g. ModelNet40's
    ``x,y,z,nx,ny,nz`` files; ``#`` comments) or ``.off`` (the mesh's vertices; sample its surface with
    :func:`sample_surface` for points on it). Any float or integer dtype is read as float32."""
    import numpy as np

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CLOUD_SUFFIXES:
        raise ZooError(f"cannot read {path} as a point cloud: use one of {', '.join(CLOUD_SUFFIXES)}")
    try:
        if suffix == ".off":
            return read_off(path)[0]
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            text = path.read_text(errors="replace").replace(",", " ")
            array = np.loadtxt(text.splitlines(), ndmin=2, comments="#")
    except (OSError, ValueError) as e:
        raise ZooError(f"cannot read {path} as a point cloud: {str(e)[:120]}") from None
    if array.ndim != 2 or array.shape[1] < 3 or array.dtype.kind not in "biuf":
        raise ZooError(
            f"{path}: a cloud must be numbers of shape (points, channels >= 3), got {array.dtype} {array.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)


class PointCloudFolderDataModule(_PointCloudDataModule):
    """Your own clouds, one file per cloud, in class folders: ``<root>/<split>/<class>/<cloud>`` with split
    ``train``, ``val`` and optionally ``test`` (files read by :func:`read_points`: ``.npy``, ``.txt`` / ``.xyz`` /
    ``.csv`` / ``.pts``, ``.off`` vertices). Class names are the train folder names, sorted, and label i is the
    i-th name in every split (a val / test folder that train lacks is one ZooError, never a silent new label);
    ``class_names`` and ``num_classes`` give them (build the model with ``num_classes=dm.num_classes``).

    Clouds may have different numbers of points and channels stored as any float or integer dtype: each is read
    as float32, normalised (``normalization``) and cut to ``num_points`` points, a random subset drawn once with
    ``seed`` (the same points in every epoch and run; the train augmentation shuffles them). A cloud with fewer
    points, or with a different number of channels than the others, is one ZooError naming the file. Without a
    ``test`` folder, test and predict read ``val``.

    Args:
        root: the folder holding ``train/``, ``val/`` (and ``test/``).
        num_points: points per cloud (every cloud needs at least this many); None: every cloud whole, the
            batches zero-padded to their largest cloud with a ``padding_mask`` (``(points, labels,
            padding_mask)``, :func:`pad_point_clouds`), for the models that take one (the Set Transformers).
        normalization: ``"unit_sphere"``, ``"standardize"`` or ``"none"`` (:func:`normalize_points`, xyz only).
        scale: the per-axis scaling range (low, high) of the train augmentation (:class:`PointCloudAugment`); None
            for no scaling.
        translate: the per-axis translation bound of the train augmentation.
        rotate: the rotation bound (radians) of the train augmentation, about ``up_axis``.
        jitter: the standard deviation of the train augmentation's jitter (0: none).
        jitter_clip: the bound the jitter is clipped to.
        shuffle_points: whether the train augmentation permutes the points.
        up_axis: the axis the rotation augmentation turns about (x, y or z).
        normals: whether channels 3:6 are normals, which the rotation turns with the points; False for colour,
            intensity or other channels the rotation leaves alone.
        batch_size: samples per batch (an integer >= 1).
        num_workers: DataLoader worker processes (an integer >= 0; 0 loads in the main process).
        seed: the seed of the subsets of ``num_points`` points.
    """

    def __init__(
        self,
        root: str,
        num_points: int | None = 1024,
        normalization: str = "unit_sphere",
        scale: Sequence[float] | None = (2 / 3, 1.5),
        translate: float = 0.2,
        rotate: float = 0.0,
        jitter: float = 0.0,
        jitter_clip: float = 0.05,
        shuffle_points: bool = True,
        up_axis: str = "z",
        normals: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        _check_sampling(num_points, normalization, whole=True)
        super().__init__(
            batch_size,
            num_workers,
            {
                "scale": scale,
                "translate": translate,
                "rotate": rotate,
                "jitter": jitter,
                "jitter_clip": jitter_clip,
                "shuffle_points": shuffle_points,
                "up_axis": up_axis,
                "normals": normals,
            },
        )
        self.save_hyperparameters()
        self.root, self.num_points = Path(root).expanduser(), num_points
        self.normalization, self.seed = normalization, int(seed)
        self.class_names: list[str] = []
        self.num_classes = 0
        self.in_chans: int | None = None
        if (self.root / "test").is_dir():
            self.test_split = "test"

    def _read_split(self, split: str, g: torch.Generator) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        folder = self.root / split
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if split == "train":
            self.class_names, self.num_classes = classes, len(classes)
        unknown = sorted(set(classes) - set(self.class_names))
        if unknown:
            raise ZooError(
                f"{folder} has classes {unknown} that {self.root / 'train'} lacks: every class needs training "
                "clouds (labels follow the train folders), so move or remove those folders"
            )
        clouds, labels = [], []
        for label, name in enumerate(self.class_names):
            files = sorted(f for f in (folder / name).glob("*") if f.suffix.lower() in CLOUD_SUFFIXES)
            for f in files:
                cloud = read_points(f)
                if self.in_chans is None:
                    self.in_chans = cloud.shape[1]
                if cloud.shape[1] != self.in_chans:
                    raise ZooError(
                        f"{f} has {cloud.shape[1]} channels per point, the clouds before it {self.in_chans}: "
                        "give every cloud the same channels (xyz first)"
                    )
                if self.num_points is None:  # whole clouds, batched with a padding mask
                    clouds.append(normalize_points(cloud, self.normalization))
                    labels.append(label)
                    continue
                if cloud.shape[0] < self.num_points:
                    raise ZooError(
                        f"{f} has {cloud.shape[0]} points, fewer than num_points={self.num_points}: lower "
                        "num_points (or null: every cloud whole, batches padded), or remove (or resample) that cloud"
                    )
                pick = torch.randperm(cloud.shape[0], generator=g)[: self.num_points]
                clouds.append(normalize_points(cloud[pick], self.normalization))
                labels.append(label)
        if not clouds:
            raise ZooError(f"no clouds in {folder}: expected {folder}/<class>/<cloud>.npy (or .txt, .xyz, .csv, .off)")
        labels_tensor = torch.tensor(labels, dtype=torch.long)
        return (clouds if self.num_points is None else torch.stack(clouds)), labels_tensor

    def setup(self, stage: str | None = None) -> None:
        """Read every split once; later calls are no-ops."""
        if self.val_dataset is not None:
            return
        missing = [s for s in ("train", "val") if not (self.root / s).is_dir()]
        if missing:
            raise ZooError(
                f"{self.root} has no {' or '.join(missing)} folder: expected <root>/train/<class>/<cloud>.npy and "
                "<root>/val/<class>/<cloud>.npy (optionally <root>/test/...)"
            )
        g = torch.Generator().manual_seed(self.seed)
        train = self._read_split("train", g)
        val = self._read_split("val", g)
        test = self._read_split("test", g) if self.test_split == "test" else None
        self.train_dataset = PointCloudDataset(*train, augment=self.augmentation)
        self.val_dataset = PointCloudDataset(*val)
        if test is not None:
            self.test_dataset = PointCloudDataset(*test)


# ------------------------------------------------------------------------------------------------ synthetic


def _box_mesh() -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)])
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return v, torch.tensor([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])


def _tetrahedron_mesh() -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    return v, torch.tensor([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])


def _octahedron_mesh() -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0], [0, 0, -1.0]])
    f = [[a, b, c] for a in (0, 1) for b in (2, 3) for c in (4, 5)]
    return v, torch.tensor(f)


def _pyramid_mesh() -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, 1.0, -1.0], [0.0, 0.0, 1.0]])
    return v, torch.tensor([[0, 2, 1], [0, 3, 2], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])


def _sphere(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, n, 3, generator=g)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _cylinder(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Radius 1, height 2 (z in [-1, 1]), with its two caps: side 4 pi, caps 2 pi of the area."""
    theta = torch.rand(m, n, generator=g) * 2 * math.pi
    side = torch.rand(m, n, generator=g) < 2 / 3
    cap_z = torch.where(torch.rand(m, n, generator=g) < 0.5, 1.0, -1.0)
    rad = torch.where(side, 1.0, torch.rand(m, n, generator=g).sqrt())
    z = torch.where(side, torch.rand(m, n, generator=g) * 2 - 1, cap_z)
    return torch.stack([rad * theta.cos(), rad * theta.sin(), z], dim=-1)


def _cone(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Apex (0, 0, 1), base radius 1 at z = -1: lateral area pi sqrt(5), base pi."""
    theta = torch.rand(m, n, generator=g) * 2 * math.pi
    lateral = torch.rand(m, n, generator=g) < math.sqrt(5) / (math.sqrt(5) + 1)
    rho = torch.rand(m, n, generator=g).sqrt()  # radius density proportional to the radius on both parts
    z = torch.where(lateral, 1 - 2 * rho, torch.full_like(rho, -1.0))
    return torch.stack([rho * theta.cos(), rho * theta.sin(), z], dim=-1)


def _torus(m: int, n: int, g: torch.Generator, major: float = 1.0, minor: float = 0.35) -> torch.Tensor:
    """Uniform on the torus surface: the tube angle phi has density proportional to (R + r cos phi)."""
    phi = torch.empty(m, n)
    filled = torch.zeros(m, dtype=torch.long)
    while bool((filled < n).any()):
        cand = torch.rand(m, 2 * n, generator=g) * 2 * math.pi
        keep = torch.rand(m, 2 * n, generator=g) * (major + minor) < major + minor * cand.cos()
        for i in range(m):
            got = cand[i][keep[i]][: n - int(filled[i])]
            phi[i, int(filled[i]) : int(filled[i]) + got.numel()] = got
            filled[i] += got.numel()
    theta = torch.rand(m, n, generator=g) * 2 * math.pi
    ring = major + minor * phi.cos()
    return torch.stack([ring * theta.cos(), ring * theta.sin(), minor * phi.sin()], dim=-1)


def _mesh_sampler(mesh: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., torch.Tensor]:
    def sample(m: int, n: int, g: torch.Generator) -> torch.Tensor:
        vertices, faces = mesh()
        return sample_surface(vertices, faces, n, generator=g, batch=m)

    return sample


SHAPES: dict[str, Callable[[int, int, torch.Generator], torch.Tensor]] = {
    "sphere": _sphere,
    "cube": _mesh_sampler(_box_mesh),
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "tetrahedron": _mesh_sampler(_tetrahedron_mesh),
    "octahedron": _mesh_sampler(_octahedron_mesh),
    "pyramid": _mesh_sampler(_pyramid_mesh),
}
"""The synthetic classes: (m, n, generator) -> m clouds of n points on the shape's surface."""


def synthetic_point_clouds(
    shapes: Sequence[str], per_class: int, num_points: int, seed: int, noise: float = 0.01, stretch: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` clouds (num_points, 3) of each shape, deterministic in ``seed``: each cloud is stretched by
    U(1 - stretch, 1 + stretch) per axis, rotated about z by U(0, 2 pi), jittered by N(0, noise^2) and put on the
    unit sphere. Returns points (len(shapes) * per_class, num_points, 3) and labels, class-major."""
    g = torch.Generator().manual_seed(seed)
    clouds = []
    for name in shapes:
        x = SHAPES[name](per_class, num_points, g)
        x = x * (1 + stretch * (2 * torch.rand(per_class, 1, 3, generator=g) - 1))
        x = x @ _rotation_about(2, torch.rand(per_class, generator=g) * 2 * math.pi).transpose(-1, -2)
        x = x + noise * torch.randn(x.shape, generator=g)
        clouds.append(normalize_points(x, "unit_sphere"))
    labels = torch.arange(len(shapes)).repeat_interleave(per_class)
    return torch.cat(clouds).to(torch.float32), labels


class SyntheticPointCloudDataModule(_PointCloudDataModule):
    """The embedded point cloud dataset: clouds on simple parametric surfaces, no files, deterministic in ``seed``.

    Classes (``shapes``, default all 8): sphere, cube, cylinder (with caps), cone (with base), torus,
    tetrahedron, octahedron, square pyramid; points sampled uniformly on each surface, every cloud stretched by
    U(0.75, 1.25) per axis, rotated about z, jittered (``noise``) and put on the unit sphere. Train and val clouds
    come from independent draws; the train split is augmented like ModelNet40 (:class:`PointCloudAugment`).

    Args:
        shapes: class names, a subset of :data:`SHAPES` (their order gives the labels).
        num_points: points per cloud.
        train_per_class: clouds per class in the train split.
        val_per_class: clouds per class in the val split.
        noise: standard deviation of the jitter baked into every cloud.
        scale: the per-axis scaling range (low, high) of the train augmentation; None for no scaling.
        translate: the per-axis translation bound of the train augmentation.
        rotate: the rotation bound (radians) of the train augmentation, about z.
        jitter: the standard deviation of the train augmentation's jitter (0: none).
        jitter_clip: the bound the jitter is clipped to.
        shuffle_points: whether the train augmentation permutes the points.
        batch_size: samples per batch (an integer >= 1).
        num_workers: DataLoader worker processes (an integer >= 0; 0 loads in the main process).
        seed: the seed of the data draw.
    """

    def __init__(
        self,
        shapes: Sequence[str] | None = None,
        num_points: int = 256,
        train_per_class: int = 100,
        val_per_class: int = 25,
        noise: float = 0.01,
        batch_size: int = 32,
        num_workers: int = 0,
        scale: Sequence[float] | None = (2 / 3, 1.5),
        translate: float = 0.2,
        rotate: float = 0.0,
        jitter: float = 0.0,
        jitter_clip: float = 0.05,
        shuffle_points: bool = True,
        seed: int = 0,
    ) -> None:
        shapes = list(SHAPES) if shapes is None else list(shapes)
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown or len(shapes) < 2 or len(set(shapes)) != len(shapes):
            raise ZooError(f"shapes must be at least 2 distinct names among {', '.join(SHAPES)}, got {shapes!r}")
        for name, value in (
            ("num_points", num_points),
            ("train_per_class", train_per_class),
            ("val_per_class", val_per_class),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ZooError(f"{name} must be a positive integer, got {value!r}")
        if noise < 0:
            raise ZooError(f"noise must be >= 0, got {noise}")
        super().__init__(
            batch_size,
            num_workers,
            {
                "scale": scale,
                "translate": translate,
                "rotate": rotate,
                "jitter": jitter,
                "jitter_clip": jitter_clip,
                "shuffle_points": shuffle_points,
                "up_axis": "z",
            },
        )
        self.save_hyperparameters()
        self.shapes, self.num_points, self.seed = shapes, num_points, int(seed)
        self.train_per_class, self.val_per_class, self.noise = train_per_class, val_per_class, float(noise)
        self.num_classes = len(shapes)
        self.class_names = list(shapes)

    def setup(self, stage: str | None = None) -> None:
        """Generate both splits once (about 0.1 s for the defaults); later calls are no-ops."""
        if self.val_dataset is not None:
            return
        train = synthetic_point_clouds(self.shapes, self.train_per_class, self.num_points, self.seed, self.noise)
        val = synthetic_point_clouds(
            self.shapes, self.val_per_class, self.num_points, self.seed + 1_000_003, self.noise
        )
        self.train_dataset = PointCloudDataset(*train, augment=self.augmentation)
        self.val_dataset = PointCloudDataset(*val)
