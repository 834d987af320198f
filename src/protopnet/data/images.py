"""Robust image loading, and skipping unreadable images during training.

:func:`open_image` is the one place a file becomes a picture: it fully decodes the file (so a
truncated or corrupt file fails *here*, not halfway through an epoch inside a DataLoader worker),
converts every colour mode to 8-bit RGB, and refuses decompression bombs from the header alone.
Every failure is a :class:`~protopnet.data.errors.BadImageError` with a one-line
``"<path>: <reason>"`` message.

For training on real-world folders, :class:`SkipBadImages` + :func:`collate_skip_none` drop
unreadable items from batches instead of crashing, and :func:`scan_images` lists them up front::

    loader = DataLoader(SkipBadImages(dataset), batch_size=..., collate_fn=collate_skip_none)
    for batch in loader:
        if batch is None:      # every item of this batch was unreadable
            continue
        images, labels = batch  # (B', 3, S, S), (B',) with B' <= B
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset, default_collate

from protopnet.data.errors import BadImageError

logger = logging.getLogger(__name__)

#: File extensions (lower case) treated as images when listing folders.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_warned_truncated_flag = False


def is_image_file(name: str | os.PathLike[str]) -> bool:
    """True when the file name has an image extension (case-insensitive) and is not hidden."""
    base = os.path.basename(os.fspath(name))
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _pixel_limit_reason(size: tuple[int, int], max_pixels: int | None) -> str | None:
    width, height = size
    if width <= 0 or height <= 0:
        return f"invalid image size {width}x{height}"
    if max_pixels is not None and width * height > max_pixels:
        return (
            f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} pixels (possible decompression bomb)"
        )
    return None


def _stat_file(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except (OSError, ValueError) as error:  # permission denied, NUL in path, name too long...
        raise BadImageError(path, f"cannot access file ({error})") from None
    if stat.S_ISDIR(info.st_mode):
        raise BadImageError(path, "is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise BadImageError(path, "not a regular file")
    if info.st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")


def _warn_if_truncated_allowed() -> None:
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        _warned_truncated_flag = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set (by some other code): truncated images "
            "will decode silently instead of being reported as bad"
        )


def to_rgb(image: Image.Image, path: str | os.PathLike[str] = "<image>") -> Image.Image:
    """Convert a decoded picture of any PIL mode to a new 8-bit RGB picture.

    Greyscale and palette pictures are expanded; CMYK / YCbCr are converted; pictures with an alpha
    channel (RGBA, LA, PA, or a palette/greyscale ``transparency`` entry) are composited on white;
    16-bit and 32-bit greyscale (``I;16*``, ``I``: 16-bit sample range) are scaled to 0..255;
    float pictures (``F``) are taken as 0..1 when their maximum is <= 1, else as 0..255.
    Raises BadImageError for a mode that cannot be converted.
    """
    mode = image.mode
    try:
        if mode in _WIDE_GREY_MODES:
            values = np.asarray(image).astype(np.float64)  # (H, W)
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
            top = float(values.max()) if values.size else 0.0
            if mode == "F":
                scaled = values * 255.0 if top <= 1.0 else values
            elif top > 65535:  # genuine 32-bit data: stretch its range
                scaled = values * (255.0 / top)
            else:  # 16-bit samples
                scaled = values / 257.0
            grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)  # (H, W)
            return Image.fromarray(grey).convert("RGB")
        if mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except BadImageError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for odd modes
        raise BadImageError(path, f"cannot convert colour mode {mode!r} to RGB ({error})") from None


def open_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> Image.Image:
    """Open, fully decode and convert an image file to an RGB picture of its own size.

    Args:
        path: the image file. Its content decides the format, not its extension.
        max_pixels: refuse pictures with more pixels than this (checked on the header, before any
            decoding). Whatever the value, pictures above PIL's own limit
            (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 M pixels, where PIL warns of a
            decompression bomb) are refused too; PIL's global settings are left untouched.

    Returns:
        a new ``RGB`` PIL picture, ``(W, H)`` as in the file (EXIF orientation is *not* applied,
        so annotation coordinates stay valid).

    Raises:
        BadImageError: missing / empty / not an image / truncated / corrupt / too large, with a
            one-line ``"<path>: <reason>"`` message.

    PIL's bomb warning is turned into an error with ``warnings.catch_warnings`` for the duration
    of the call; like any use of it, that is process-wide, so prefer worker processes to threads
    when loading in parallel. If other code sets ``ImageFile.LOAD_TRUNCATED_IMAGES``, truncated
    files decode silently (a warning is logged once).
    """
    path = os.fspath(path)
    _stat_file(path)
    _warn_if_truncated_allowed()
    with warnings.catch_warnings():
        # PIL warns (instead of raising) between 1x and 2x its pixel limit: make that an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                reason = _pixel_limit_reason(image.size, max_pixels)
                if reason is not None:
                    raise BadImageError(path, reason)
                image.load()  # full decode: truncated / corrupt data fails here
                return to_rgb(image, path)
        except BadImageError:
            raise
        except Image.UnidentifiedImageError:
            raise BadImageError(path, "not an image (unrecognised file format)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImageError(path, f"image too large, possible decompression bomb: {error}") from None
        except MemoryError:
            raise BadImageError(path, "image too large to decode (out of memory)") from None
        except Exception as error:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error...
            raise BadImageError(
                path, f"truncated or corrupt image data ({type(error).__name__}: {error})"
            ) from None


def check_image_header(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> tuple[int, int]:
    """Cheap check of an image file: it exists, is not empty, its header names a known image
    format and its size is within limits. Does not decode pixels, so it cannot see truncation.

    Returns:
        ``(width, height)`` from the header. Raises BadImageError otherwise.
    """
    path = os.fspath(path)
    _stat_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                size = image.size
        except Image.UnidentifiedImageError:
            raise BadImageError(path, "not an image (unrecognised file format)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImageError(path, f"image too large, possible decompression bomb: {error}") from None
        except Exception as error:  # noqa: BLE001
            raise BadImageError(path, f"corrupt image header ({type(error).__name__}: {error})") from None
    reason = _pixel_limit_reason(size, max_pixels)
    if reason is not None:
        raise BadImageError(path, reason)
    return size


def fit_square(picture: Image.Image, size: int) -> Image.Image:
    """Resize a picture to ``size x size`` (aspect ratio not kept, as in the paper), bilinear with
    antialiasing when shrinking. Returns the picture itself when it already has that size."""
    if picture.size == (size, size):
        return picture
    return picture.resize((size, size), Image.Resampling.BILINEAR)


def _is_local_path(path: str) -> bool:
    return "://" not in path


def scan_images(
    dataset: Any, *, full: bool = False, max_pixels: int | None = None
) -> list[tuple[int, str, str]]:
    """List the unreadable items of a dataset.

    Args:
        dataset: a ProtoDataset (anything with ``__len__``, ``path(i)``, ``load_image(i)``).
        full: False (default) checks each file's header only (fast: missing, empty, non-image,
            too large); True calls ``dataset.load_image(i)`` for every item, which also finds
            truncated / corrupt files and unusable annotations (as slow as one epoch of decoding).
            Items whose path is not a local file (``synthetic://...``) are checked only when full.

    Returns:
        ``[(index, path, reason), ...]`` in index order; empty when everything is readable.
    """
    bad: list[tuple[int, str, str]] = []
    for index in range(len(dataset)):
        path = str(dataset.path(index))
        try:
            if full:
                dataset.load_image(index)
            elif _is_local_path(path):
                check_image_header(path, max_pixels=max_pixels)
        except BadImageError as error:
            bad.append((index, path, error.reason))
    if bad:
        logger.warning("%d of %d images are unreadable (first: %s: %s)", len(bad), len(dataset),
                       bad[0][1], bad[0][2])
    return bad


class SkipBadImages(Dataset):
    """Wrap a dataset so an unreadable item yields ``None`` instead of raising.

    ``__getitem__`` returns ``dataset[index]`` (``(image (3, S, S), label)``) or None when it
    raised :class:`BadImageError`; a warning is logged once per file and the failure is recorded
    in :attr:`bad_items`. Use with :func:`collate_skip_none`. Every other attribute (``classes``,
    ``targets``, ``path``, ``annotation``, ``load_image``...) is forwarded to the wrapped dataset.

    Note: with ``DataLoader(num_workers > 0)`` items are loaded in worker processes, so the
    :attr:`bad_items` of the main-process object stays empty; use :func:`scan_images` (or
    :class:`~protopnet.data.cache.DecodedCache`, which remembers bad items) to get the list.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._bad: dict[int, tuple[str, str]] = {}
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except BadImageError as error:
            self._bad[int(index)] = (error.path, error.reason)
            if error.path not in self._warned:
                self._warned.add(error.path)
                logger.warning("skipping unreadable image %s: %s", error.path, error.reason)
            return None

    @property
    def bad_items(self) -> list[tuple[int, str, str]]:
        """``[(index, path, reason), ...]`` of the items that failed so far in this process."""
        return [(index, path, reason) for index, (path, reason) in sorted(self._bad.items())]

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails; guard against recursion while unpickling
        if name.startswith("__") or name in ("dataset", "_bad", "_warned"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_skip_none(batch: Sequence[Any]) -> Any:
    """DataLoader ``collate_fn`` that drops ``None`` items (unreadable images) and collates the rest
    with PyTorch's default collate: ``[(image (3, S, S), label), ...]`` -> ``(images (B', 3, S, S),
    labels (B',))``. Returns None when every item of the batch was None."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)
