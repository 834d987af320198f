"""The dataset contract every protopnet dataset follows.

A ProtoPNet dataset yields ``(image, label)`` pairs like any torchvision dataset, and in addition
can hand back the *un-normalised* picture the model saw (for push visualisation and reports), the
file it came from (for provenance) and optional annotations (part boxes, part points) in that
picture's pixel coordinates.

Every image is resized to a square ``image_size x image_size`` picture before anything else
(the paper's 224 x 224 setting), so pixel coordinates of boxes, parts and activation maps all live
in one frame: ``[0, image_size)``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import normalise

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Annotation:
    """Ground truth attached to one image, in the resized picture's pixel coordinates.

    Attributes:
        part_box: ``[x0, y0, x1, y1]`` of the class-defining part (synthetic data), or None.
        parts: part name -> ``(x, y)`` for the visible annotated parts (CUB), possibly empty.
        object_box: ``[x0, y0, x1, y1]`` of the whole object, or None.
    """

    part_box: list[float] | None = None
    parts: dict[str, tuple[float, float]] = field(default_factory=dict)
    object_box: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "part_box": self.part_box,
            "parts": {k: list(v) for k, v in self.parts.items()},
            "object_box": self.object_box,
        }


class ProtoDataset(Dataset, ABC):
    """Base class: subclasses implement :meth:`__len__`, :meth:`load_image` and set
    ``classes`` and ``targets``; :meth:`path` and :meth:`annotation` are optional.

    Attributes:
        classes: class names, index = label.
        targets: label of each item, ``len(targets) == len(self)``.
        image_size: side of the square picture every image is resized to.
        mean, std: normalisation applied after ``to_tensor`` (the backbone's).
        augment: optional callable ``PIL.Image -> PIL.Image`` applied before normalisation
            (training only; push and evaluation use ``augment=None``).
    """

    classes: list[str]
    targets: list[int]

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment

    # -- to implement -------------------------------------------------------------------------
    @abstractmethod
    def __len__(self) -> int:
        """Number of items."""

    @abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """The RGB picture of item ``index`` resized to ``image_size x image_size``, before
        augmentation and normalisation. Raises :class:`protopnet.data.BadImageError` when the file
        cannot be read."""

    # -- optional -----------------------------------------------------------------------------
    def path(self, index: int) -> str:
        """Where item ``index`` comes from (a file path, or a ``synthetic://`` address)."""
        return f"item://{index}"

    def annotation(self, index: int) -> Annotation:
        return Annotation()

    # -- shared -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_tensor(self, picture: Image.Image) -> torch.Tensor:
        """PIL RGB picture -> normalised float tensor (3, S, S) (:func:`protopnet.data.transforms.normalise`)."""
        return normalise(picture, self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        picture = self.load_image(index)
        if self.augment is not None:
            picture = self.augment(picture)
        return self.to_tensor(picture), int(self.targets[index])
