"""protopnet: interpretable image classification with prototypical parts.

ProtoPNet ("This Looks Like That", Chen et al., NeurIPS 2019): a network that classifies an image
by finding parts of it that look like prototypical parts of training images.

    >>> import protopnet
    >>> model = protopnet.ProtoPNet(backbone="resnet34", num_classes=200)
    >>> out = model(images)                      # out.logits (B, K), out.similarities (B, M)
    >>> protopnet.push(model, train_dataset)     # prototypes become real training patches
    >>> protopnet.save_model(model, "my-model"); protopnet.load_model("my-model")
"""

import logging

from .checkpoint import CheckpointError, UnsafeCheckpointError, load_model
from .config import Config, ConfigError, load_config
from .losses import LossCoefficients, cluster_cost, protopnet_loss, separation_cost
from .model import ProtoPNet, ProtoPNetOutput, available_backbones
from .runtime import RunSettings
from .save import save_model  # draws the prototype pictures, then stores (checkpoint.save_model)
from .train import Trainer, evaluate, train
from .train.push import push_prototypes as push

# ``protopnet.explain`` is the function (protopnet.explain(model, image) -> Explanation); the
# package of the same name stays importable as such: ``from protopnet.explain import analyze``.
# Bound last, after every import that could load the package and set this attribute to it.
from .explain.local import explain

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "LossCoefficients",
    "ProtoPNet",
    "ProtoPNetOutput",
    "RunSettings",
    "Trainer",
    "UnsafeCheckpointError",
    "available_backbones",
    "cluster_cost",
    "evaluate",
    "explain",
    "load_config",
    "load_model",
    "protopnet_loss",
    "push",
    "save_model",
    "separation_cost",
    "train",
    "__version__",
]
