"""Many activation maps -> many high-activation boxes at once.

:func:`activation_boxes` is the batched form of :func:`protopnet.regions.activation_box` (the
region push records, paper Section 2.3): the same bicubic upsampling
(:data:`protopnet.regions.UPSAMPLING`) and the same 95th-percentile rule, giving the same boxes
bit for bit (tested), but one interpolation call and one vectorised percentile for a whole stack
of maps instead of one Python call per map.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..regions import UPSAMPLING

#: Maps upsampled per chunk, to bound memory (chunk x height x width float32 values).
_CHUNK_PIXELS = 16_000_000


def upsample_activations(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(P, H', W') activation maps -> (P, height, width) float32, upsampled like
    :func:`protopnet.regions.upsample_activation`."""
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
        ``protopnet.regions.activation_box(maps[p], size, percentile)[0]`` for every p.
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
