"""zoo: residual architectures read as differential equations, as Lightning modules.

>>> import zoo
>>> model = zoo.create_model("depth_scaled_resnet50", num_classes=10)
>>> zoo.list_models("heun_*")[:3]
['heun_cifar_resnet', 'heun_resnet18', 'heun_resnet20_cifar']
>>> model = zoo.create_model("momentum_resnet50.tv2_in1k", pretrained=True)  # doctest: +SKIP
"""

from zoo import data as data
from zoo import models as models
from zoo import nn as nn
from zoo import ops as ops
from zoo import tasks as tasks
from zoo.errors import ZooError
from zoo.hub import from_pretrained, load_weights, save_pretrained
from zoo.models import *  # noqa: F403  (every registered builder is importable from zoo)
from zoo.models import __all__ as _model_names
from zoo.pretrained import get_pretrained_cfg, list_pretrained
from zoo.registry import create_model, is_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "ZooError",
    "create_model",
    "from_pretrained",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "list_pretrained",
    "load_weights",
    "data",
    "models",
    "nn",
    "ops",
    "register_model",
    "save_pretrained",
    "tasks",
    *_model_names,
]
