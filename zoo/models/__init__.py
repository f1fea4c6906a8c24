"""Model families. Importing this package registers every builder."""

from zoo.models import resnet, vit, vmoe
from zoo.models.resnet import *  # noqa: F403  (the builders and family classes)
from zoo.models.resnet import DepthScaledResNet, HeunNet, MomentumResNet, ResNet
from zoo.models.vit import *  # noqa: F403
from zoo.models.vit import SinkformerViT
from zoo.models.vmoe import *  # noqa: F403
from zoo.models.vmoe import VisionMoE

__all__ = ["DepthScaledResNet", "HeunNet", "MomentumResNet", "ResNet", "SinkformerViT", "VisionMoE", *resnet.__all__,
           *(n for n in vit.__all__ if n != "SinkformerViT"), *(n for n in vmoe.__all__ if n != "VisionMoE")]
