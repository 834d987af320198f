"""From a prototype's activation map to a region of the input image (paper Section 2.3).

The activation (similarity) map over patch positions, (H', W'), is upsampled to the image size
with bicubic interpolation (as the reference does with OpenCV's cubic resize), and the region is
the smallest box enclosing the pixels at or above the 95th percentile of the upsampled map.
Boxes are ``[x0, y0, x1, y1]`` in pixels with exclusive ends: ``image[y0:y1, x0:x1]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

UPSAMPLING = "bicubic"
UPSAMPLING_DESCRIPTION = (
    "activation maps are upsampled to the image size by bicubic interpolation "
    "(torch.nn.functional.interpolate, align_corners=False); the box encloses the pixels "
    "at or above the 95th percentile of the upsampled map"
)


def upsample_activation(activation: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Upsample one activation map (H', W') to ``size`` = (height, width); returns float32 (height, width)."""
    tensor = torch.as_tensor(np.asarray(activation, dtype=np.float32))
    if tensor.dim() != 2:
        raise ValueError(f"expected an activation map (H', W'), got shape {tuple(tensor.shape)}")
    up = F.interpolate(tensor[None, None], size=tuple(int(s) for s in size), mode=UPSAMPLING, align_corners=False)
    return up[0, 0].numpy()


def high_activation_box(upsampled: np.ndarray, percentile: float = 95.0) -> list[int]:
    """Smallest box ``[x0, y0, x1, y1]`` (exclusive ends) enclosing pixels >= the percentile."""
    threshold = np.percentile(upsampled, percentile)
    mask = upsampled >= threshold
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def activation_box(activation: torch.Tensor | np.ndarray, size: tuple[int, int], percentile: float = 95.0) -> tuple[list[int], np.ndarray]:
    """Upsample ``activation`` (H', W') to ``size`` and return (box, upsampled map)."""
    upsampled = upsample_activation(activation, size)
    return high_activation_box(upsampled, percentile), upsampled


def box_center(box: list[float]) -> tuple[float, float]:
    """Centre (x, y) of a box [x0, y0, x1, y1]."""
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)


def point_in_box(point: tuple[float, float], box: list[float]) -> bool:
    """Whether (x, y) lies inside [x0, y0, x1, y1] (ends exclusive)."""
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]
