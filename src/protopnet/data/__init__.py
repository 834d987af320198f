"""Datasets for ProtoPNet: the contract (:class:`ProtoDataset`), the built-in synthetic demo,
CUB-200-2011, Stanford Cars, any ImageFolder tree, robust image loading, augmentation and
decoded-picture caches (on disk and in memory). :func:`build_dataset` picks the right one from a spec."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from protopnet.data.augment import (
    AugmentedViews,
    OnlineAugmentation,
    augment_dataset_to_folder,
    offline_augment,
    online_augmentation,
)
from protopnet.data.base import IMAGENET_MEAN, IMAGENET_STD, Annotation, ProtoDataset
from protopnet.data.cache import DecodedCache, MemoryCache, PictureMemory
from protopnet.data.cars import StanfordCars, is_cars_root
from protopnet.data.cub import CUB200, is_cub_root, pretty_class_name, read_cub_metadata
from protopnet.data.errors import BadImageError
from protopnet.data.folder import ImageFolderDataset, list_class_folders
from protopnet.data.images import (
    IMAGE_EXTENSIONS,
    SkipBadImages,
    check_image_header,
    collate_skip_none,
    open_image,
    scan_images,
)
from protopnet.data.synthetic import SyntheticParts

logger = logging.getLogger(__name__)

__all__ = [
    "AugmentedViews",
    "Annotation", "BadImageError", "CUB200", "DecodedCache", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGE_EXTENSIONS", "ImageFolderDataset", "MemoryCache", "OnlineAugmentation", "PictureMemory", "ProtoDataset", "SkipBadImages",
    "DATA_SPEC_HELP", "DataSpecError", "StanfordCars", "SyntheticParts", "augment_dataset_to_folder", "build_dataset",
    "dataset_for_model",
    "check_image_header", "collate_skip_none", "is_cars_root", "is_cub_root", "offline_augment",
    "online_augmentation", "open_image", "pretty_class_name", "read_cub_metadata", "scan_images",
    "train_val_split",
]

_SPLIT_FOLDERS = {"train": ("train",), "test": ("test",), "val": ("val", "valid", "validation")}


def _folder_split(root: Path, split: str) -> tuple[Path, list[str] | None]:
    """The ImageFolder root for ``split`` and the class list shared by all split folders."""
    subfolders = set(list_class_folders(root))
    split_folders = [name for names in _SPLIT_FOLDERS.values() for name in names if name in subfolders]
    if not split_folders:
        if split not in ("train", "all"):
            # Never hand back the training images as a test set.
            raise FileNotFoundError(f"{root}: a flat ImageFolder tree has no {split}/ sub-folder (use split 'all' for the whole tree)")
        return root, None
    wanted = [name for name in _SPLIT_FOLDERS.get(split, (split,)) if name in subfolders]
    if not wanted:
        raise ValueError(f"{root}: has split folders {sorted(split_folders)} but none for split {split!r}")
    classes = sorted({c for name in split_folders for c in list_class_folders(root / name)})
    return root / wanted[0], classes


def build_dataset(
    spec: str | os.PathLike[str],
    split: str = "train",
    image_size: int = 224,
    augment: Callable[[Image.Image], Image.Image] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    **kw: Any,
) -> ProtoDataset:
    """Make the dataset a spec names.

    Args:
        spec: ``"synthetic"`` -> :class:`SyntheticParts`; a CUB-200-2011 root (or a folder holding
            ``CUB_200_2011/``) -> :class:`CUB200`; a Stanford Cars root (or a folder holding
            ``stanford_cars/``) -> :class:`StanfordCars`; any other directory with class
            sub-folders -> :class:`ImageFolderDataset`, using its ``train/`` / ``test/`` (``val/``)
            sub-folder for the split when it has split folders (classes: the union over them).
        split: ``"train"`` or ``"test"`` (``"all"`` for CUB / Cars, ``"val"`` for folders).
        image_size, augment, mean, std: see :class:`ProtoDataset`.
        **kw: passed on to the dataset class (e.g. ``crop="full"``, ``num_classes=5``, ``seed``);
            ``crop`` is accepted and ignored for synthetic data and ImageFolder trees (no boxes).

    Raises:
        ValueError: the spec is none of these (message names the path and what is accepted).
    """
    common = dict(image_size=image_size, augment=augment, mean=mean, std=std)
    if str(spec) == "synthetic":
        kw.pop("crop", None)  # the synthetic pictures have nothing to crop
        return SyntheticParts(split=split, **common, **kw)
    root = Path(spec).expanduser()
    for candidate in (root, root / "CUB_200_2011"):
        if is_cub_root(candidate):
            return CUB200(candidate, split=split, **common, **kw)
    for candidate in (root, root / "stanford_cars"):
        if is_cars_root(candidate):
            return StanfordCars(candidate, split=split, **common, **kw)
    if root.is_dir() and list_class_folders(root):
        crop = kw.pop("crop", "full")
        if crop not in ("bbox", "full"):
            raise ValueError(f"crop must be 'bbox' or 'full', got {crop!r}")
        if crop == "bbox":
            logger.info("%s: an ImageFolder tree has no object boxes, whole pictures are used", root)
        folder, classes = _folder_split(root, split)
        if classes is not None:
            kw.setdefault("classes", classes)
        return ImageFolderDataset(folder, **common, **kw)
    raise ValueError(
        f"{root}: not a dataset: expected 'synthetic', a CUB-200-2011 root (images.txt, "
        "image_class_labels.txt, train_test_split.txt, classes.txt, images/), a Stanford Cars root "
        "(devkit/cars_meta.mat, cars_train/ or cars_test/) or a directory with one sub-folder "
        "of images per class"
    )


DATA_SPEC_HELP = "a directory (ImageFolder tree, CUB-200-2011 or Stanford Cars layout) or 'synthetic' for the built-in dataset"


class DataSpecError(ValueError):
    """A data spec that cannot serve a model: no such directory, or another number of classes
    than the model has. The message is one line and starts with the spec (``repr``)."""


class PreparedFor(Protocol):
    """What :func:`dataset_for_model` reads of a model (a ProtoPNet or an ensemble of them)."""

    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]


def dataset_for_model(model: PreparedFor, spec: str, split: str, **kwargs: Any) -> ProtoDataset:
    """The dataset ``spec`` (a directory or ``"synthetic"``) prepared the way ``model`` expects:
    its image size (``model.image_size``, default 224) and normalisation, unaugmented. For
    ``"synthetic"`` the number of classes follows the model's. ``kwargs`` go to
    :func:`build_dataset` (e.g. ``images_per_class`` of the synthetic data).

    Raises:
        DataSpecError: ``spec`` is no directory, or its classes are not the model's in number.
        ValueError, FileNotFoundError: from :func:`build_dataset` (not a dataset; no such split).
    """
    image_size = int(getattr(model, "image_size", 224))
    extra: dict[str, Any] = dict(kwargs)
    if spec == "synthetic":
        extra.setdefault("num_classes", model.num_classes)
    elif not Path(str(spec)).exists():
        raise DataSpecError(f"{spec!r}: no such directory ({DATA_SPEC_HELP})")
    dataset = build_dataset(str(spec), split=split, image_size=image_size, augment=None, mean=model.mean, std=model.std, **extra)
    if len(dataset.classes) != model.num_classes:
        raise DataSpecError(f"{spec!r} has {len(dataset.classes)} classes but the model has {model.num_classes}")
    return dataset


def train_val_split(
    dataset: ProtoDataset | Sequence[int], val_fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Stratified, deterministic split of item indices.

    Args:
        dataset: a dataset (its ``targets`` are used) or the targets themselves.
        val_fraction: share of each class that goes to validation, in [0, 1); each class gets
            ``round(n_class * val_fraction)`` validation items, but keeps at least one training item.
        seed: the shuffle's seed; the same seed and targets give the same split.

    Returns:
        ``(train_indices, val_indices)``, each sorted, disjoint, together all indices.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    targets = np.asarray(getattr(dataset, "targets", dataset), dtype=np.int64)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        members = members[rng.permutation(len(members))]
        n_val = min(int(round(len(members) * val_fraction)), len(members) - 1)
        val.extend(int(i) for i in members[:n_val])
        train.extend(int(i) for i in members[n_val:])
    return sorted(train), sorted(val)
