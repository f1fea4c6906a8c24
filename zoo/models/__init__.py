"""Model families. Importing this package registers every builder."""

from zoo.models import mean_field, neural_ode, pointcloud, resnet, translation, vit, vmoe
from zoo.models.mean_field import *  # noqa: F403
from zoo.models.mean_field import MeanFieldResNet
from zoo.models.neural_ode import *  # noqa: F403
from zoo.models.neural_ode import NeuralODE
from zoo.models.pointcloud import *  # noqa: F403
from zoo.models.pointcloud import PointCloudTransformer, SetTransformer
from zoo.models.resnet import *  # noqa: F403  (the builders and family classes)
from zoo.models.resnet import DepthScaledResNet, HeunNet, MomentumResNet, ResNet
from zoo.models.translation import *  # noqa: F403
from zoo.models.translation import SinkformerTranslation
from zoo.models.two_layer import TwoLayerReLU
from zoo.models.vit import *  # noqa: F403
from zoo.models.vit import SinkformerViT
from zoo.models.vmoe import *  # noqa: F403
from zoo.models.vmoe import VisionMoE
from zoo.registry import is_model, register_model_class

# the family classes and every registered builder (building blocks stay in their family's module)
__all__ = [
    "DepthScaledResNet",
    "HeunNet",
    "MeanFieldResNet",
    "MomentumResNet",
    "NeuralODE",
    "PointCloudTransformer",
    "ResNet",
    "SetTransformer",
    "SinkformerTranslation",
    "SinkformerViT",
    "TwoLayerReLU",
    "VisionMoE",
    *(n for module in (resnet, vit, vmoe, pointcloud, translation) for n in module.__all__ if is_model(n)),
    *(n for n in mean_field.__all__ if is_model(n)),
    *(n for n in neural_ode.__all__ if is_model(n)),
]

# the classes a config or checkpoint may name (resolved through the registry, never imported by name)
for _cls in (
    DepthScaledResNet,
    HeunNet,
    MeanFieldResNet,
    MomentumResNet,
    NeuralODE,
    PointCloudTransformer,
    ResNet,
    SetTransformer,
    SinkformerTranslation,
    SinkformerViT,
    TwoLayerReLU,
    VisionMoE,
):
    register_model_class(_cls, f"zoo.models.{_cls.__name__}", f"zoo.{_cls.__name__}")
del _cls
