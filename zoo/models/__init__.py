"""Model families. Importing this package registers every builder."""

from zoo.models import resnet
from zoo.models.resnet import *  # noqa: F403  (the builders and family classes)
from zoo.models.resnet import DepthScaledResNet, HeunNet, MomentumResNet, ResNet

__all__ = ["DepthScaledResNet", "HeunNet", "MomentumResNet", "ResNet", *resnet.__all__]
