"""Model families. Importing this package registers every builder."""

from zoo.models import pointcloud, resnet, translation, vit, vmoe
from zoo.models.pointcloud import *  # noqa: F403
from zoo.models.pointcloud import PointCloudTransformer, SetTransformer
from zoo.models.resnet import *  # noqa: F403  (the builders and family classes)
from zoo.models.resnet import DepthScaledResNet, HeunNet, MomentumResNet, ResNet
from zoo.models.translation import *  # noqa: F403
from zoo.models.translation import SinkformerTranslation
from zoo.models.vit import *  # noqa: F403
from zoo.models.vit import SinkformerViT
from zoo.models.vmoe import *  # noqa: F403
from zoo.models.vmoe import VisionMoE
from zoo.registry import is_model

# the family classes and every registered builder (building blocks stay in their family's module)
__all__ = ["DepthScaledResNet", "HeunNet", "MomentumResNet", "PointCloudTransformer", "ResNet", "SetTransformer",
           "SinkformerTranslation", "SinkformerViT", "VisionMoE",
           *(n for module in (resnet, vit, vmoe, pointcloud, translation) for n in module.__all__ if is_model(n))]
