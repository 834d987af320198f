"""The network: backbones, the prototype layer's pure functions, and :class:`ProtoPNet`."""

from .backbones import Backbone, available_backbones, build_backbone
from .distances import DISTANCES, cosine_distance_maps, distance_maps, l2_distance_maps, min_pool, similarity
from .protopnet import ProtoPNet, ProtoPNetOutput

__all__ = [
    "DISTANCES",
    "Backbone",
    "ProtoPNet",
    "ProtoPNetOutput",
    "available_backbones",
    "build_backbone",
    "cosine_distance_maps",
    "distance_maps",
    "l2_distance_maps",
    "min_pool",
    "similarity",
]
