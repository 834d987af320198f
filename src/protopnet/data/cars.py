"""Stanford Cars (196 classes) from the devkit ``.mat`` annotations, in the common layout::

    root/
      devkit/cars_meta.mat               class_names (1 x 196 cell of str)
      devkit/cars_train_annos.mat        annotations: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
      cars_test_annos_withlabels.mat     the same for the test images (also looked for in devkit/)
      cars_train/<fname>                 (a nested cars_train/cars_train/ is accepted too)
      cars_test/<fname>

Boxes are MATLAB's 1-based inclusive pixel indices (``x1..x2``); they become the continuous box
``(x1 - 1, y1 - 1, x2, y2)``. Class ``c`` (1-based) is label ``c - 1``. Reading ``.mat`` files
needs scipy (``pip install 'protopnet[scipy]'``), imported only when a Stanford Cars dataset is
created.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from protopnet.data.annotated import AnnotatedImageDataset
from protopnet.data.base import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

_SPLITS = ("train", "test", "all")
_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def _annotation_file(root: Path, split: str) -> Path | None:
    if split == "train":
        candidates = [root / "devkit" / "cars_train_annos.mat"]
    else:
        candidates = [root / "cars_test_annos_withlabels.mat", root / "devkit" / "cars_test_annos_withlabels.mat"]
    return next((path for path in candidates if path.is_file()), None)


def _image_dir(root: Path, split: str) -> Path:
    folder = root / f"cars_{split}"
    nested = folder / f"cars_{split}"
    return nested if nested.is_dir() else folder


def is_cars_root(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds ``devkit/cars_meta.mat`` and, for at least one split, its
    annotation file and image folder."""
    root = Path(path)
    try:
        if not (root / "devkit" / "cars_meta.mat").is_file():
            return False
        return any(
            _annotation_file(root, split) is not None and _image_dir(root, split).is_dir()
            for split in ("train", "test")
        )
    except OSError:
        return False


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        import scipy.io
    except ImportError:
        raise ImportError(
            "Stanford Cars annotations are MATLAB files and reading them needs scipy: "
            "pip install 'protopnet[scipy]'"
        ) from None
    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as error:  # noqa: BLE001 - scipy raises several kinds for bad files
        raise ValueError(f"{path}: cannot read MATLAB file ({type(error).__name__}: {error})") from None


def _scalar(value: Any, path: Path, row: int, name: str) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"{path}: annotation {row}: field {name} must be one number, got shape {array.shape}")
    try:
        number = float(array.reshape(()).item())
    except (TypeError, ValueError):
        raise ValueError(f"{path}: annotation {row}: field {name} must be a number, got {array!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{path}: annotation {row}: field {name} must be finite, got {number}")
    return number


def read_cars_class_names(root: str | os.PathLike[str]) -> list[str]:
    """The 196 class names of ``devkit/cars_meta.mat`` (label order)."""
    path = Path(root) / "devkit" / "cars_meta.mat"
    if not path.is_file():
        raise ValueError(f"{root}: not a Stanford Cars root, devkit/cars_meta.mat is missing")
    mat = _loadmat(path)
    if "class_names" not in mat:
        raise ValueError(f"{path}: no 'class_names' variable")
    return [str(name).strip() for name in np.atleast_1d(mat["class_names"]).ravel()]


def read_cars_annotations(path: str | os.PathLike[str], num_classes: int) -> list[tuple[str, int, tuple[float, float, float, float]]]:
    """``[(fname, label, (x0, y0, x1, y1)), ...]`` from a devkit annotation file."""
    path = Path(path)
    mat = _loadmat(path)
    if "annotations" not in mat:
        raise ValueError(f"{path}: no 'annotations' variable")
    records = np.atleast_1d(mat["annotations"]).ravel()
    names = records.dtype.names or ()
    missing = [name for name in _FIELDS if name not in names]
    if missing:
        hint = " (the test annotations without labels cannot be used: get cars_test_annos_withlabels.mat)" if missing == ["class"] else ""
        raise ValueError(f"{path}: annotations lack the field(s) {', '.join(missing)}{hint}")
    items = []
    for row, record in enumerate(records):
        x1, y1, x2, y2 = (_scalar(record[name], path, row, name) for name in _FIELDS[:4])
        class_number = _scalar(record["class"], path, row, "class")
        if class_number != int(class_number) or not 1 <= class_number <= num_classes:
            raise ValueError(f"{path}: annotation {row}: class must be an integer in 1..{num_classes}, got {class_number}")
        if x2 < x1 or y2 < y1:
            raise ValueError(f"{path}: annotation {row}: empty box x {x1}..{x2}, y {y1}..{y2}")
        fname = str(np.asarray(record["fname"]).reshape(-1)[0]) if np.asarray(record["fname"]).size else ""
        if not fname or os.path.isabs(fname) or ".." in Path(fname).parts:
            raise ValueError(f"{path}: annotation {row}: bad file name {fname!r}")
        items.append((fname, int(class_number) - 1, (x1 - 1.0, y1 - 1.0, x2, y2)))
    return items


class StanfordCars(AnnotatedImageDataset):
    """Stanford Cars, cropped to the car's box (the paper's setting) or whole.

    Args:
        root: the directory with ``devkit/`` and ``cars_train/`` / ``cars_test/``.
        split: ``"train"``, ``"test"`` or ``"all"``.
        crop: ``"bbox"`` or ``"full"``.
        image_size, augment, mean, std: see :class:`ProtoDataset`.
        classes: keep only these class names (labels renumbered ``0..len-1`` in meta order).

    ``annotation(i).object_box`` is the car's box in the ``S x S`` picture.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        crop: str = "bbox",
        image_size: int = 224,
        augment: Callable[[Image.Image], Image.Image] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        classes: Sequence[str] | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"StanfordCars split must be one of {_SPLITS}, got {split!r}")
        self.root = Path(root)
        self.split = split
        names = read_cars_class_names(self.root)
        keep = list(range(len(names)))
        if classes is not None:
            unknown = [c for c in classes if c not in names]
            if unknown:
                raise ValueError(f"{self.root / 'devkit' / 'cars_meta.mat'}: no class {unknown[0]!r}")
            keep = [label for label, name in enumerate(names) if name in set(classes)]
        new_label = {old: new for new, old in enumerate(keep)}

        files, targets, boxes = [], [], []
        for part in (("train", "test") if split == "all" else (split,)):
            annotations = _annotation_file(self.root, part)
            if annotations is None:
                raise ValueError(f"{self.root}: no annotation file for the {part} split")
            folder = _image_dir(self.root, part)
            for fname, label, box in read_cars_annotations(annotations, len(names)):
                if label in new_label:
                    files.append(str(folder / fname))
                    targets.append(new_label[label])
                    boxes.append(box)
        if not files:
            raise ValueError(f"{self.root}: no images in split {split!r} for the selected classes")
        super().__init__(files, targets, [names[i] for i in keep], boxes=boxes, crop=crop,
                         image_size=image_size, augment=augment, mean=mean, std=std)
        logger.info("StanfordCars %s: %d images, %d classes, crop=%s", split, len(files), len(keep), crop)
