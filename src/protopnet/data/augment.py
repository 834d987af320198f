"""Training augmentation, on PIL pictures, built on ``torchvision.transforms.v2``.

* :func:`online_augmentation` — random flip, small rotation, shear and perspective skew (and
  optional colour jitter) applied to every training picture as it is loaded (uses torch's RNG, so
  DataLoader workers get their own streams).
* :func:`offline_augment` — the paper's offline augmentation (rotation, skew, shear, each with a
  random left-right flip; the reference code made 10 of each per training image with the Augmentor
  library), deterministic given a numpy Generator; :func:`augment_dataset_to_folder` writes a
  whole dataset augmented this way as an ImageFolder tree.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from protopnet.data.errors import BadImageError


class _Lazy:
    """A module (or one of its attributes) imported on first use: importing torchvision costs
    seconds (it pulls in torch._dynamo), which every ``protopnet`` command would pay otherwise."""

    def __init__(self, module: str, attribute: str | None = None) -> None:
        self._where = (module, attribute)

    def __getattr__(self, name: str) -> Any:
        import importlib

        module, attribute = self._where
        target = importlib.import_module(module)
        return getattr(getattr(target, attribute) if attribute else target, name)


v2: Any = _Lazy("torchvision.transforms.v2")
F: Any = _Lazy("torchvision.transforms.v2.functional")
InterpolationMode: Any = _Lazy("torchvision.transforms", "InterpolationMode")

logger = logging.getLogger(__name__)

#: ImageNet mean colour, 0..255: fills the corners uncovered by rotation / shear / skew, so they
#: normalise to about zero.
FILL = (124, 116, 104)


class OnlineAugmentation:
    """Callable ``PIL.Image (S, S) -> PIL.Image (S, S)``; see :func:`online_augmentation`."""

    def __init__(self, image_size: int, transforms: list[Any]) -> None:
        self.image_size = int(image_size)
        self.transform = v2.Compose(list(transforms) or [v2.Identity()])

    def __call__(self, picture: Image.Image) -> Image.Image:
        out = self.transform(picture)
        if out.size != (self.image_size, self.image_size):
            out = out.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return out

    def __repr__(self) -> str:
        return f"OnlineAugmentation(image_size={self.image_size}, {self.transform!r})"


def online_augmentation(
    image_size: int,
    flip: bool = True,
    rotation: float = 15.0,
    shear: float = 10.0,
    skew: float = 0.2,
    colour_jitter: float = 0.0,
    fill: Sequence[int] = FILL,
) -> OnlineAugmentation:
    """The on-the-fly training augmentation.

    Args:
        image_size: side ``S`` of the pictures (the output is always ``S x S``).
        flip: random horizontal flip (p = 0.5).
        rotation: maximum rotation in degrees (uniform in ``[-rotation, rotation]``); 0 disables.
        shear: maximum shear angle in degrees along x and y; 0 disables.
        skew: perspective distortion scale (0..1), applied with p = 0.5; 0 disables.
        colour_jitter: brightness / contrast / saturation jitter (e.g. 0.2); 0 (default) disables.
        fill: RGB colour of the uncovered corners.
    """
    fill = tuple(int(v) for v in fill)
    transforms: list[Any] = []
    if flip:
        transforms.append(v2.RandomHorizontalFlip(p=0.5))
    if rotation > 0 or shear > 0:
        transforms.append(
            v2.RandomAffine(
                degrees=float(rotation),
                shear=(-float(shear), float(shear), -float(shear), float(shear)) if shear > 0 else None,
                interpolation=InterpolationMode.BILINEAR,
                fill=fill,
            )
        )
    if skew > 0:
        transforms.append(v2.RandomPerspective(distortion_scale=float(skew), p=0.5, fill=fill))
    if colour_jitter > 0:
        transforms.append(v2.ColorJitter(brightness=colour_jitter, contrast=colour_jitter, saturation=colour_jitter))
    return OnlineAugmentation(image_size, transforms)


# -- offline augmentation (the paper's data preparation) ------------------------------------

def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _crop_back(picture: Image.Image, width: float, height: float) -> Image.Image:
    """Centre crop to ``width x height`` and resize back to the original size."""
    size = picture.size
    crop_w, crop_h = max(1, int(math.floor(width))), max(1, int(math.floor(height)))
    cropped = F.center_crop(picture, [crop_h, crop_w])
    return cropped.resize(size, Image.Resampling.BILINEAR)


def rotate_and_crop(picture: Image.Image, angle: float) -> Image.Image:
    """Rotate by ``angle`` degrees, then crop the largest centred rectangle of the same aspect
    ratio with no uncovered corners and resize it back to the picture's size (as Augmentor does)."""
    w, h = picture.size
    rotated = F.rotate(picture, angle, interpolation=InterpolationMode.BILINEAR)
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    k = min(w / (w * c + h * s), h / (w * s + h * c))
    return _crop_back(rotated, k * w, k * h)


def shear_and_crop(picture: Image.Image, angle: float, axis: str) -> Image.Image:
    """Shear by ``angle`` degrees along ``axis`` ("x" or "y"), crop away the uncovered wedges and
    resize back to the picture's size."""
    w, h = picture.size
    t = abs(math.tan(math.radians(angle)))
    if axis == "x":
        sheared = F.affine(picture, angle=0.0, translate=[0, 0], scale=1.0, shear=[float(angle), 0.0],
                           interpolation=InterpolationMode.BILINEAR)
        return _crop_back(sheared, max(1.0, w - h * t), h)
    sheared = F.affine(picture, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, float(angle)],
                       interpolation=InterpolationMode.BILINEAR)
    return _crop_back(sheared, w, max(1.0, h - w * t))


def skew(picture: Image.Image, rng: np.random.Generator, magnitude: float, fill: Sequence[int] = FILL) -> Image.Image:
    """Perspective skew as Augmentor's ``skew(magnitude)``: tilt left/right, tilt forward/backward
    or pull one corner, by up to ``magnitude x`` the picture's larger side."""
    w, h = picture.size
    amount = max(2.0, float(rng.uniform(0.1, 1.0)) * magnitude * max(w, h))  # >= 1 pixel per corner
    start = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]  # tl, tr, br, bl
    end = [list(p) for p in start]
    kind = int(rng.integers(3))
    if kind == 0:  # tilt left or right: one vertical side shrinks
        side = (0, 3) if rng.random() < 0.5 else (1, 2)
        end[side[0]][1] += amount / 2
        end[side[1]][1] -= amount / 2
    elif kind == 1:  # tilt forward or backward: one horizontal side shrinks
        side = (0, 1) if rng.random() < 0.5 else (3, 2)
        end[side[0]][0] += amount / 2
        end[side[1]][0] -= amount / 2
    else:  # one corner moves inwards
        corner = int(rng.integers(4))
        direction = rng.uniform(0, math.pi / 2)
        end[corner][0] += amount * math.cos(direction) * (1 if corner in (0, 3) else -1)
        end[corner][1] += amount * math.sin(direction) * (1 if corner in (0, 1) else -1)
    end = [[int(round(min(max(x, 0), w - 1))), int(round(min(max(y, 0), h - 1)))] for x, y in end]
    return F.perspective(picture, start, end, interpolation=InterpolationMode.BILINEAR, fill=list(fill))


def offline_augment(
    picture: Image.Image,
    rng: np.random.Generator | int,
    copies_per_operation: int = 10,
    rotation: float = 15.0,
    skew_magnitude: float = 0.2,
    shear: float = 10.0,
    flip_probability: float = 0.5,
) -> list[Image.Image]:
    """The paper's offline augmentation of one picture.

    Returns ``3 * copies_per_operation`` new pictures of the same size: first the rotations
    (uniform in ``±rotation`` degrees, cropped back), then the perspective skews (up to
    ``skew_magnitude``), then the shears (``±shear`` degrees along x or y, cropped back); each is
    left-right flipped with ``flip_probability``. Deterministic given ``rng`` (a numpy Generator,
    or an int seed).
    """
    rng = _as_rng(rng)
    picture = picture.convert("RGB")
    out: list[Image.Image] = []

    def maybe_flip(p: Image.Image) -> Image.Image:
        return F.horizontal_flip(p) if rng.random() < flip_probability else p

    for _ in range(copies_per_operation):
        out.append(maybe_flip(rotate_and_crop(picture, float(rng.uniform(-rotation, rotation)))))
    for _ in range(copies_per_operation):
        out.append(maybe_flip(skew(picture, rng, skew_magnitude)))
    for _ in range(copies_per_operation):
        axis = "x" if rng.random() < 0.5 else "y"
        out.append(maybe_flip(shear_and_crop(picture, float(rng.uniform(-shear, shear)), axis)))
    return out


def _folder_names(classes: Sequence[str]) -> list[str]:
    safe = [re.sub(r"[\\/\x00]", "_", name).lstrip(".") or "class" for name in classes]
    if safe == sorted(safe) and len(set(safe)) == len(safe):
        return safe
    width = len(str(len(safe) - 1))
    return [f"{label:0{width}d}.{name}" for label, name in enumerate(safe)]  # keep label order when sorted


def augment_dataset_to_folder(
    dataset: Any,
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    copies_per_operation: int = 10,
    include_original: bool = True,
    **options: Any,
) -> int:
    """Write ``dataset``'s pictures (``load_image``: cropped and resized) plus their offline
    augmentations as an ImageFolder tree ``out_dir/<class>/<index>_<k>.png`` that
    :class:`~protopnet.data.folder.ImageFolderDataset` reads back with the same labels (folder
    names get a label prefix when the class names would not sort in label order).

    Item ``i`` uses ``numpy.random.default_rng([seed, i])``, so the output does not depend on the
    order of processing. Unreadable items are skipped with a warning. ``options`` go to
    :func:`offline_augment`. Returns the number of pictures written.
    """
    out = Path(out_dir)
    folders = _folder_names(list(dataset.classes))
    for name in folders:
        (out / name).mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(len(dataset)):
        try:
            picture = dataset.load_image(index)
        except BadImageError as error:
            logger.warning("skipping unreadable image %s", error)
            continue
        pictures = [picture] if include_original else []
        pictures += offline_augment(picture, np.random.default_rng([seed, index]), copies_per_operation, **options)
        folder = out / folders[int(dataset.targets[index])]
        for k, p in enumerate(pictures):
            p.save(folder / f"{index:06d}_{k:02d}.png")
            written += 1
    logger.info("wrote %d pictures to %s", written, out)
    return written


class AugmentedViews:
    """A dataset of ``views`` fixed views of every item of ``base``: item ``i * views + v`` is
    view ``v`` of ``base`` item ``i`` — view 0 the picture itself, views ``1..views-1`` the
    picture through ``augment`` with torch's RNG seeded by ``(seed, i, v)``.

    The paper's offline augmentation, made in memory instead of on disk: the same fixed copies
    every epoch, so what a frozen backbone makes of them can be computed once
    (``data.feature_cache``). ``base`` is a :class:`~protopnet.data.base.ProtoDataset` without
    augmentation (``load_image``, ``to_tensor``, ``targets``, ``path``).
    """

    def __init__(self, base: Any, augment: Any, views: int, seed: int = 0) -> None:
        if int(views) < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.base, self.augment, self.views, self.seed = base, augment, int(views), int(seed)
        self.classes = list(base.classes)
        self.image_size = base.image_size
        self.targets = [t for t in base.targets for _ in range(self.views)]

    def __len__(self) -> int:
        return len(self.base) * self.views

    def source(self, index: int) -> tuple[int, int]:
        """``(base item, view)`` of an item."""
        return divmod(int(index), self.views)

    def items_of(self, base_indices: Sequence[int]) -> list[int]:
        """Every view of the given base items, in order."""
        return [i * self.views + v for i in base_indices for v in range(self.views)]

    def path(self, index: int) -> str:
        i, v = self.source(index)
        return self.base.path(i) if v == 0 else f"{self.base.path(i)}#view{v}"

    def load_image(self, index: int) -> Image.Image:
        import torch

        i, v = self.source(index)
        picture = self.base.load_image(i)
        if v == 0 or self.augment is None:
            return picture
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + i * 1009 + v) % (2**63 - 1))
            return self.augment(picture)

    def to_tensor(self, picture: Image.Image) -> Any:
        return self.base.to_tensor(picture)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.to_tensor(self.load_image(index)), int(self.targets[index])
