"""Shared machinery of the file datasets with object boxes (CUB-200-2011, Stanford Cars):
optional crop to the object box, resize to ``S x S``, and the same transform applied to the
annotation (object box, part points)."""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Callable, Sequence

from PIL import Image

from protopnet.data.base import IMAGENET_MEAN, IMAGENET_STD, Annotation, ProtoDataset
from protopnet.data.errors import BadImageError
from protopnet.data.images import check_image_header, fit_square, open_image

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in continuous pixel coordinates
CROPS = ("bbox", "full")


class AnnotatedImageDataset(ProtoDataset):
    """Files with a label, an optional object box and optional part points (original pixels).

    Args:
        files: image file per item.
        targets: label per item.
        classes: class names, index = label.
        boxes: object box ``(x0, y0, x1, y1)`` per item in the file's pixel coordinates
            (continuous: a box covering pixels 0..9 is ``(0, 10)``), or None.
        parts: visible part points ``{name: (x, y)}`` per item, or None for none.
        crop: ``"bbox"`` crops each picture to its object box (clamped to the picture) before the
            resize — the paper's setting; ``"full"`` keeps the whole picture.

    ``load_image(i)`` is the crop resized to ``(S, S)``; ``annotation(i)`` maps the object box
    and the parts through the same crop and resize (parts that fall outside the picture are left
    out), so they line up with the picture's pixels.
    """

    def __init__(
        self,
        files: Sequence[str],
        targets: Sequence[int],
        classes: Sequence[str],
        boxes: Sequence[Box | None] | None = None,
        parts: Sequence[dict[str, tuple[float, float]]] | None = None,
        crop: str = "bbox",
        image_size: int = 224,
        augment: Callable[[Image.Image], Image.Image] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(image_size=image_size, mean=mean, std=std, augment=augment)
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.crop = crop
        self.files = [str(f) for f in files]
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.files)
        self.parts = list(parts) if parts is not None else [{} for _ in self.files]
        if not len(self.files) == len(self.targets) == len(self.boxes) == len(self.parts):
            raise ValueError("files, targets, boxes and parts must have the same length")
        if crop == "bbox" and any(box is None for box in self.boxes):
            raise ValueError('crop="bbox" needs an object box for every item')
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return self.files[index]

    @property
    def cache_token(self) -> str:
        """What besides the files decides the pictures (for :class:`DecodedCache`)."""
        digest = hashlib.sha256(repr((self.boxes, self.targets)).encode()).hexdigest()[:16]
        return f"{type(self).__name__}(crop={self.crop},annotations={digest})"

    def region(self, index: int, size: tuple[int, int]) -> Box:
        """The part ``(x0, y0, x1, y1)`` of the original ``(W, H)`` picture that becomes the
        ``S x S`` picture: the object box widened to whole pixels and clamped to the picture, or
        the whole picture. Raises BadImageError when less than one pixel is left."""
        width, height = size
        box = self.boxes[index]
        if self.crop == "full" or box is None:
            return (0.0, 0.0, float(width), float(height))
        # whole pixels: every pixel the box touches, and nothing outside the picture
        x0, y0 = min(max(math.floor(box[0]), 0), width), min(max(math.floor(box[1]), 0), height)
        x1, y1 = min(max(math.ceil(box[2]), 0), width), min(max(math.ceil(box[3]), 0), height)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise BadImageError(
                self.files[index],
                f"object box {list(box)} leaves less than one pixel inside the {width}x{height} picture",
            )
        return (float(x0), float(y0), float(x1), float(y1))

    def load_image(self, index: int) -> Image.Image:
        """The crop (or whole picture), RGB, resized to ``(S, S)``. Raises BadImageError."""
        picture = open_image(self.files[index])
        self._sizes[index] = picture.size
        region = self.region(index, picture.size)
        if region != (0.0, 0.0, float(picture.width), float(picture.height)):
            picture = picture.crop(tuple(int(v) for v in region))  # a strict crop: no context bleeds in
        return fit_square(picture, self.image_size)

    def _original_size(self, index: int) -> tuple[int, int]:
        if index not in self._sizes:
            self._sizes[index] = check_image_header(self.files[index])
        return self._sizes[index]

    def annotation(self, index: int) -> Annotation:
        """Object box and visible parts in the ``S x S`` picture's pixel coordinates (reads the
        file's header for its size the first time)."""
        x0, y0, x1, y1 = self.region(index, self._original_size(index))
        sx, sy = self.image_size / (x1 - x0), self.image_size / (y1 - y0)
        size = float(self.image_size)

        def clamp(value: float) -> float:
            return min(max(value, 0.0), size)

        object_box = None
        box = self.boxes[index]
        if box is not None:
            object_box = [clamp((box[0] - x0) * sx), clamp((box[1] - y0) * sy),
                          clamp((box[2] - x0) * sx), clamp((box[3] - y0) * sy)]
        parts = {}
        for name, (px, py) in self.parts[index].items():
            u, v = (px - x0) * sx, (py - y0) * sy
            if 0.0 <= u <= size and 0.0 <= v <= size:
                parts[name] = (u, v)
        return Annotation(parts=parts, object_box=object_box)
