"""Pictures of prototypes and activations (paper Section 2.3, Figures 3 and 5).

Everything here works on PIL pictures of the model's input size and on activation maps over
patch positions; nothing here runs the network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .regions import upsample_activation

logger = logging.getLogger(__name__)

BOX_COLOUR = (255, 215, 0)


def heatmap(upsampled: np.ndarray, colormap: str = "jet") -> Image.Image:
    """Colour an (H, W) map (normalised to its own range) with a matplotlib colormap."""
    import matplotlib

    lo, hi = float(upsampled.min()), float(upsampled.max())
    norm = (upsampled - lo) / (hi - lo) if hi > lo else np.zeros_like(upsampled)
    rgba = matplotlib.colormaps[colormap](norm)  # (H, W, 4) floats
    return Image.fromarray((rgba[..., :3] * 255).astype(np.uint8))


def overlay(picture: Image.Image, upsampled: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend the heatmap of ``upsampled`` (H, W) over ``picture`` (resized to it if needed)."""
    picture = picture.convert("RGB")
    heat = heatmap(upsampled)
    if heat.size != picture.size:
        heat = heat.resize(picture.size, Image.BILINEAR)
    return Image.blend(picture, heat, alpha)


def draw_box(picture: Image.Image, box: Sequence[float], colour: tuple[int, int, int] = BOX_COLOUR, width: int | None = None) -> Image.Image:
    """A copy of ``picture`` with ``box`` [x0, y0, x1, y1] (exclusive ends) drawn on it."""
    out = picture.convert("RGB").copy()
    width = width or max(1, round(max(out.size) / 100))
    x0, y0, x1, y1 = box
    ImageDraw.Draw(out).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
    return out


def crop_box(picture: Image.Image, box: Sequence[float]) -> Image.Image:
    """The region ``box`` of ``picture``."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return picture.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


def prototype_pictures(picture: Image.Image, activation: Any, box: Sequence[float]) -> dict[str, Image.Image]:
    """The three pictures of a pushed prototype: its patch, its source image with the box, and
    the activation overlay on its source image."""
    upsampled = upsample_activation(activation, (picture.height, picture.width))
    return {
        "patch": crop_box(picture, box),
        "source": draw_box(picture, box),
        "overlay": draw_box(overlay(picture, upsampled), box),
    }


def draw_prototype_pictures(provenance: list[dict[str, Any]], dataset: Any) -> Iterator[tuple[int, dict[str, Image.Image]]]:
    """The pictures of every pushed prototype, one prototype at a time: pairs of the prototype's
    index (``entry["prototype"]``) and its :func:`prototype_pictures` (``patch``, ``source``,
    ``overlay``), drawn from its source image in ``dataset``. Hand them to
    :func:`protopnet.checkpoint.save_model` (``pictures=``), which stores them.

    Prototypes whose source image can no longer be read are skipped with a warning.
    """
    cache: dict[int, Image.Image] = {}
    for entry in provenance:
        index = int(entry["dataset_index"])
        try:
            if index not in cache:
                cache[index] = dataset.load_image(index)
        except (OSError, ValueError) as error:
            logger.warning("cannot draw prototype %d: source image %s unreadable (%s)", entry["prototype"], entry["path"], error)
            continue
        yield int(entry["prototype"]), prototype_pictures(cache[index], entry["activation"], entry["box"])