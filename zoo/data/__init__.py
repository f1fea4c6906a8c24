"""Lightning data modules: the embedded digits dataset, CIFAR-10/100 and ImageNet-style image folders."""

from zoo.data.digits import DigitsDataModule
from zoo.data.vision import CIFARDataModule, ImageFolderDataModule

__all__ = ["CIFARDataModule", "DigitsDataModule", "ImageFolderDataModule"]
