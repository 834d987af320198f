"""The network: backbones, the prototype layer's pure functions, and :class:`ProtoPNet`."""

from .backbones import Backbone, available_backbones, build_backbone
from .distances import l2_distance_maps, min_pool, similarity
from .protopnet import ProtoPNet, ProtoPNetOutput

__all__ = [
    "Backbone",
    "ProtoPNet",
    "ProtoPNetOutput",
    "available_backbones",
    "build_backbone",
    "l2_distance_maps",
    "min_pool",
    "similarity",
]
