"""Lightning data modules: the embedded digits dataset, CIFAR-10/100, ImageNet-style image folders, unlabelled
images to predict on, point clouds (ModelNet40 files, your own clouds in class folders, the embedded synthetic
shapes), translation (fairseq binarized data, parallel text, the embedded number words). The image and
point-cloud modules share :class:`ZooDataModule`'s loaders."""

from zoo.data.base import ZooDataModule
from zoo.data.digits import DigitsDataModule
from zoo.data.pointcloud import ModelNet40DataModule, PointCloudFolderDataModule, SyntheticPointCloudDataModule
from zoo.data.translation import FairseqBinarizedDataModule, NumbersDataModule, ParallelTextDataModule
from zoo.data.vision import CIFARDataModule, ImageFilesDataModule, ImageFolderDataModule

__all__ = [
    "CIFARDataModule",
    "DigitsDataModule",
    "FairseqBinarizedDataModule",
    "ImageFilesDataModule",
    "ImageFolderDataModule",
    "ModelNet40DataModule",
    "NumbersDataModule",
    "ParallelTextDataModule",
    "PointCloudFolderDataModule",
    "SyntheticPointCloudDataModule",
    "ZooDataModule",
]
