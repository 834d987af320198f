"""Any ImageFolder tree: ``root/<class name>/**/<image>`` (torchvision's layout)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from protopnet.data.base import IMAGENET_MEAN, IMAGENET_STD, ProtoDataset
from protopnet.data.images import IMAGE_EXTENSIONS, fit_square, is_image_file, open_image

logger = logging.getLogger(__name__)


def list_class_folders(root: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the non-hidden sub-directories of ``root``."""
    root = Path(root)
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _list_images(folder: Path) -> list[str]:
    found = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # skip hidden folders
        found.extend(os.path.join(directory, name) for name in names if is_image_file(name))
    return sorted(found)


class ImageFolderDataset(ProtoDataset):
    """Images under ``root/<class>/`` (any depth), each resized to ``S x S`` (aspect not kept).

    Args:
        root: the tree's root; its non-hidden sub-directories are the classes, in sorted order.
        image_size, augment, mean, std: see :class:`ProtoDataset`.
        classes: the class list to use (label order) instead of the sorted folder names — e.g.
            to give a ``test/`` tree the same labels as its ``train/`` tree; a listed class with
            no folder simply has no items, folders not listed are ignored.

    Files are images by extension (case-insensitive: ``IMAGE_EXTENSIONS``); hidden files and
    folders (``.name``) are skipped. Unreadable files raise BadImageError from ``load_image``
    (see :class:`SkipBadImages`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int = 224,
        augment: Callable[[Image.Image], Image.Image] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__(image_size=image_size, mean=mean, std=std, augment=augment)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a directory")
        folders = list_class_folders(self.root)
        if classes is None:
            classes = folders
        elif len(set(classes)) != len(classes):
            raise ValueError(f"{self.root}: duplicate class names in {list(classes)}")
        ignored = sorted(set(folders) - set(classes))
        if ignored:
            logger.warning("%s: ignoring folders that are not among the classes: %s", self.root, ignored)
        self.classes = list(classes)
        self.files: list[str] = []
        self.targets = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            images = _list_images(folder) if folder.is_dir() else []
            if not images:
                logger.warning("%s: class %r has no images", self.root, name)
            self.files.extend(images)
            self.targets.extend([label] * len(images))
        if not self.files:
            raise ValueError(
                f"{self.root}: no images found in class sub-folders (extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return self.files[index]

    def load_image(self, index: int) -> Image.Image:
        """The file's picture, RGB, resized to ``(S, S)``. Raises BadImageError."""
        return fit_square(open_image(self.files[index]), self.image_size)
