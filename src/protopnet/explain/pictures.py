"""The pictures of an explanation: the input with a box, an activation map over the input, and a
prototype's own pictures (the files saved with its model, or redrawn from its source image by
:func:`protopnet.visualize.prototype_pictures`, the one drawing of a prototype)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..checkpoint import CheckpointError, safe_relative_path
from ..data.images import fit_square, open_image
from ..visualize import draw_box, overlay, prototype_pictures
from .boxes import upsample_activations

logger = logging.getLogger(__name__)


def activation_overlay(picture: Image.Image, activation: np.ndarray, box: Sequence[float]) -> Image.Image:
    """An (H', W') activation map upsampled to ``picture`` (square), blended over it, with ``box``."""
    up = upsample_activations(activation[None], (picture.width, picture.width))[0].numpy()
    return draw_box(overlay(picture, up), box)


def read_picture(path: str | os.PathLike[str]) -> Image.Image | None:
    """A saved picture as RGB, or None (with a warning) when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        logger.warning("cannot read prototype picture %s: %s", path, error)
        return None


def draw_from_provenance(provenance: dict[str, Any] | None, dataset: Any = None) -> dict[str, Image.Image]:
    """Redraw a prototype's pictures (``patch``, ``source``, ``overlay``) from its push
    provenance: from ``dataset``'s item ``dataset_index`` when a dataset is given, else from the
    source file when it still exists; {} when neither can be read (a warning says why)."""
    if not provenance or "activation" not in provenance:
        return {}
    if dataset is not None:
        if int(provenance.get("dataset_index", -1)) < 0:
            return {}
        try:
            picture = dataset.load_image(int(provenance["dataset_index"]))
            return prototype_pictures(picture, provenance["activation"], provenance["box"])
        except (OSError, ValueError, KeyError) as error:
            logger.warning("cannot draw prototype %s: %s", provenance.get("prototype"), error)
            return {}
    if not provenance.get("path"):
        return {}
    path = str(provenance["path"])
    if "://" in path or not os.path.isfile(path):
        return {}
    try:
        size = provenance.get("image_size") or [224, 224]
        picture = fit_square(open_image(path), int(size[0]))
        return prototype_pictures(picture, provenance["activation"], provenance["box"])
    except (OSError, ValueError) as error:
        logger.warning("cannot redraw prototype from %s: %s", path, error)
        return {}


def prototype_image_files(provenance: dict[str, Any] | None, directory: str | os.PathLike[str] | None) -> dict[str, Path]:
    """Existing picture files of a prototype (its provenance entry's ``images``) in ``directory``,
    the model directory it was loaded from; paths outside the directory are refused."""
    if not provenance or not directory:
        return {}
    found = {}
    for kind, relative in dict(provenance.get("images") or {}).items():
        try:
            path = safe_relative_path(Path(directory), relative)
        except CheckpointError:
            continue
        if path.is_file():
            found[kind] = path
    return found
