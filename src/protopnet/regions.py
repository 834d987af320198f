"""From a prototype's activation map to a region of the input image (paper Section 2.3).

The activation (similarity) map over patch positions, (H', W'), is upsampled to the image size
with bicubic interpolation (as the reference does with OpenCV's cubic resize), and the region is
the smallest box enclosing the pixels at or above the 95th percentile of the upsampled map.
:func:`activation_box` does it for one map, :func:`activation_boxes` for a stack of them at once
(the same boxes, one interpolation call and one vectorised percentile). Boxes are
``[x0, y0, x1, y1]`` in pixels with exclusive ends: ``image[y0:y1, x0:x1]``.
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
    return upsample_activations(tensor[None], size)[0].numpy()


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


#: Maps upsampled per chunk, to bound memory (chunk x height x width float32 values).
_CHUNK_PIXELS = 16_000_000


def upsample_activations(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(P, H', W') activation maps -> (P, height, width) float32, upsampled like
    :func:`upsample_activation`."""
    tensor = torch.as_tensor(np.asarray(maps, dtype=np.float32)) if not isinstance(maps, torch.Tensor) else maps.detach().float().cpu()
    if tensor.dim() != 3:
        raise ValueError(f"expected activation maps (P, H', W'), got shape {tuple(tensor.shape)}")
    size = (int(size[0]), int(size[1]))
    if tensor.shape[0] == 0:
        return torch.zeros(0, *size)
    return F.interpolate(tensor[:, None], size=size, mode=UPSAMPLING, align_corners=False)[:, 0]


def activation_boxes(
    maps: torch.Tensor | np.ndarray,
    size: tuple[int, int],
    percentile: float = 95.0,
) -> np.ndarray:
    """Boxes of the pixels >= ``percentile`` of each upsampled map.

    Args:
        maps: (P, H', W') activation (similarity) maps over patch positions.
        size: (height, width) of the picture the boxes live in.
        percentile: the threshold percentile (push uses 95).

    Returns:
        (P, 4) int64 boxes ``[x0, y0, x1, y1]`` with exclusive ends, equal to
        ``activation_box(maps[p], size, percentile)[0]`` for every p.
    """
    tensor = torch.as_tensor(np.asarray(maps, dtype=np.float32)) if not isinstance(maps, torch.Tensor) else maps.detach().float().cpu()
    if tensor.dim() != 3:
        raise ValueError(f"expected activation maps (P, H', W'), got shape {tuple(tensor.shape)}")
    height, width = int(size[0]), int(size[1])
    boxes = np.zeros((tensor.shape[0], 4), dtype=np.int64)
    chunk = max(1, _CHUNK_PIXELS // max(1, height * width))
    for start in range(0, tensor.shape[0], chunk):
        up = upsample_activations(tensor[start : start + chunk], (height, width)).numpy()  # (p, h, w)
        # np.percentile along an axis: the same float32 threshold high_activation_box computes.
        threshold = np.percentile(up.reshape(up.shape[0], -1), percentile, axis=1).astype(up.dtype)  # (p,)
        mask = up >= threshold[:, None, None]  # (p, h, w)
        rows, cols = mask.any(axis=2), mask.any(axis=1)  # (p, h), (p, w)
        y0 = rows.argmax(axis=1)
        y1 = height - rows[:, ::-1].argmax(axis=1)
        x0 = cols.argmax(axis=1)
        x1 = width - cols[:, ::-1].argmax(axis=1)
        boxes[start : start + up.shape[0]] = np.stack([x0, y0, x1, y1], axis=1)
    return boxes
