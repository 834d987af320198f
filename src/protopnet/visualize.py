"""Pictures of prototypes and activations (paper Section 2.3, Figures 3 and 5).

Everything here works on PIL pictures of the model's input size and on activation maps over
patch positions; nothing here runs the network.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .regions import upsample_activation, upsample_activations

logger = logging.getLogger(__name__)

BOX_COLOUR = (255, 215, 0)


@functools.lru_cache(maxsize=8)
def _colour_table(colormap: str) -> np.ndarray:
    """(N, 3) uint8: the RGB of each of the matplotlib colormap's N entries, as ``heatmap``
    writes them."""
    import matplotlib

    cmap = matplotlib.colormaps[colormap]
    return (cmap(np.arange(cmap.N))[:, :3] * 255).astype(np.uint8)


def heatmap(upsampled: np.ndarray, colormap: str = "jet") -> Image.Image:
    """Colour an (H, W) map (normalised to its own range) with a matplotlib colormap.

    The colours are those of calling the colormap on the normalised map (value x takes entry
    ``min(floor(x * N), N - 1)``), looked up in a table of its N entries rather than computed
    per pixel."""
    table = _colour_table(colormap)
    lo, hi = float(upsampled.min()), float(upsampled.max())
    norm = (upsampled - lo) / (hi - lo) if hi > lo else np.zeros_like(upsampled)
    index = np.clip((norm * len(table)).astype(np.int64), 0, len(table) - 1)  # (H, W)
    return Image.fromarray(np.take(table, index, axis=0))  # (H, W, 3); take is a faster gather than table[index]


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
    return _pictures(picture, upsample_activation(activation, (picture.height, picture.width)), box)


def _pictures(picture: Image.Image, upsampled: np.ndarray, box: Sequence[float]) -> dict[str, Image.Image]:
    return {
        "patch": crop_box(picture, box),
        "source": draw_box(picture, box),
        "overlay": draw_box(overlay(picture, upsampled), box),
    }


def draw_prototype_pictures(
    provenance: list[dict[str, Any]], dataset: Any, *, chunk: int = 64, workers: int | None = None
) -> Iterator[tuple[int, dict[str, Image.Image]]]:
    """The pictures of every pushed prototype, in provenance order: pairs of the prototype's
    index (``entry["prototype"]``) and its :func:`prototype_pictures` (``patch``, ``source``,
    ``overlay``), drawn from its source image in ``dataset``. Hand them to
    :func:`protopnet.checkpoint.save_model` (``pictures=``), which stores them.

    ``chunk`` prototypes at a time: their source images are read by ``workers`` threads (default:
    up to 4, the CPU's cores; decoding releases the GIL) and their activation maps upsampled in
    one call, so memory stays bounded however many prototypes there are. Prototypes whose source
    image can no longer be read are skipped with a warning.
    """
    workers = workers or min(4, os.cpu_count() or 1)

    def load(index: int) -> Image.Image | Exception:
        try:
            return dataset.load_image(index)
        except (OSError, ValueError) as error:
            return error

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="protopnet-draw") as pool:
        for start in range(0, len(provenance), chunk):
            entries = provenance[start : start + chunk]
            indices = sorted({int(entry["dataset_index"]) for entry in entries})
            pictures = dict(zip(indices, pool.map(load, indices)))
            groups: dict[tuple[tuple[int, ...], tuple[int, int]], list[int]] = {}  # (map shape, picture size) -> positions
            for n, entry in enumerate(entries):
                picture = pictures[int(entry["dataset_index"])]
                if not isinstance(picture, Exception):
                    groups.setdefault((np.shape(entry["activation"]), (picture.height, picture.width)), []).append(n)
            upsampled: dict[int, np.ndarray] = {}
            for (_, size), members in groups.items():
                maps = np.asarray([entries[n]["activation"] for n in members], dtype=np.float32)  # (P, H', W')
                upsampled.update(zip(members, upsample_activations(maps, size).numpy()))
            for n, entry in enumerate(entries):
                picture = pictures[int(entry["dataset_index"])]
                if isinstance(picture, Exception):
                    logger.warning("cannot draw prototype %d: source image %s unreadable (%s)", entry["prototype"], entry["path"], picture)
                    continue
                yield int(entry["prototype"]), _pictures(picture, upsampled[n], entry["box"])
