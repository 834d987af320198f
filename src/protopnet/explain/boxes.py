"""Boxes in explanations: many high-activation boxes at once, and boxes moved between picture sizes.

:func:`activation_boxes` (defined in :mod:`protopnet.regions`, next to the one-map form push and
explanations share) is the batched form of :func:`protopnet.regions.activation_box`;
:func:`scale_box` maps a box from the picture the model saw to the original file.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..regions import activation_boxes, upsample_activations

__all__ = ["activation_boxes", "scale_box", "upsample_activations"]


def scale_box(box: Sequence[float], from_size: tuple[int, int], to_size: tuple[int, int]) -> list[int]:
    """Map a box ``[x0, y0, x1, y1]`` (exclusive ends) from a ``from_size`` = (width, height)
    picture to the same region of a ``to_size`` = (width, height) picture (e.g. the resized
    picture the model saw -> the original file). Starts round down and ends round up, so the
    scaled box covers at least the region; the result is clipped to the picture."""
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    x0, y0, x1, y1 = box
    return [
        max(0, math.floor(x0 * sx + 1e-9)),
        max(0, math.floor(y0 * sy + 1e-9)),
        min(int(to_size[0]), math.ceil(x1 * sx - 1e-9)),
        min(int(to_size[1]), math.ceil(y1 * sy - 1e-9)),
    ]
