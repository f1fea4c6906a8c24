"""zoo: residual architectures read as differential equations, as Lightning modules.

    >>> import zoo
    >>> model = zoo.create_model("depth_scaled_resnet50", num_classes=10)
    >>> zoo.list_models("heun_*")[:3]
    ['heun_cifar_resnet', 'heun_resnet101', 'heun_resnet152']
"""

from zoo import models as models
from zoo import nn as nn
from zoo import ops as ops
from zoo.errors import ZooError
from zoo.hub import from_pretrained, load_weights, save_pretrained
from zoo.models import *  # noqa: F403  (every registered builder is importable from zoo)
from zoo.models import __all__ as _model_names
from zoo.registry import create_model, is_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "ZooError",
    "create_model",
    "from_pretrained",
    "is_model",
    "list_models",
    "load_weights",
    "models",
    "nn",
    "ops",
    "register_model",
    "save_pretrained",
    *_model_names,
]
