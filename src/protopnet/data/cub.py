"""CUB-200-2011 (Caltech-UCSD Birds) in its official layout::

    root/
      images.txt               <image_id> <relative/path.jpg>
      image_class_labels.txt   <image_id> <class_id>
      train_test_split.txt     <image_id> <1 = train | 0 = test>
      bounding_boxes.txt       <image_id> <x> <y> <width> <height>     (pixels, floats)
      classes.txt              <class_id> <name, e.g. 001.Black_footed_Albatross>
      parts/parts.txt          <part_id> <part name, may contain spaces>          (optional)
      parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible 0|1>         (optional)
      images/<relative/path.jpg>

``images.txt`` is the list of images; ids need not start at 1 nor be contiguous (a slice of the
classes loads), lines in the other files about images it does not list are ignored. Class ids are
mapped to labels ``0..K-1`` in increasing class-id order. Any malformed file raises ``ValueError``
naming the file, the line and the problem.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from PIL import Image

from protopnet.data.annotated import AnnotatedImageDataset
from protopnet.data.base import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
_INT = re.compile(r"[+-]?[0-9]+\Z")
_SPLITS = ("train", "test", "all")


def is_cub_root(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory with the CUB-200-2011 annotation files and ``images/``."""
    root = Path(path)
    try:
        return (root / "images").is_dir() and all((root / name).is_file() for name in CUB_FILES)
    except OSError:
        return False


def pretty_class_name(name: str) -> str:
    """``"001.Black_footed_Albatross"`` -> ``"Black footed Albatross"``."""
    return re.sub(r"^\s*\d+\.", "", name).replace("_", " ").strip() or name


# -- parsing ----------------------------------------------------------------------------------

def _read_rows(path: Path, fields: int, split_rest: bool = False) -> list[tuple[int, list[str]]]:
    """Non-blank lines of ``path`` as ``(line_number, fields)``. With ``split_rest`` the last field
    is the rest of the line (names with spaces); otherwise the line must have exactly ``fields``
    whitespace-separated fields."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if "\x00" in text:
        raise ValueError(f"{path}, line {text[: text.index(chr(0))].count(chr(10)) + 1}: contains a NUL byte")
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, fields - 1) if split_rest else line.split()
        if len(parts) != fields:
            raise ValueError(f"{path}, line {number}: expected {fields} fields, found {len(parts)}: {line[:80]!r}")
        rows.append((number, parts))
    return rows


def _int(token: str, path: Path, number: int, what: str, minimum: int | None = 0) -> int:
    if not _INT.match(token):
        raise ValueError(f"{path}, line {number}: {what} must be an integer, got {token[:40]!r}")
    value = int(token)
    if minimum is not None and value < minimum:
        raise ValueError(f"{path}, line {number}: {what} must be >= {minimum}, got {value}")
    return value


def _float(token: str, path: Path, number: int, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"{path}, line {number}: {what} must be a number, got {token[:40]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}, line {number}: {what} must be finite, got {token[:40]!r}")
    return value


def _flag(token: str, path: Path, number: int, what: str) -> bool:
    if token not in ("0", "1"):
        raise ValueError(f"{path}, line {number}: {what} must be 0 or 1, got {token[:40]!r}")
    return token == "1"


def _unique(seen: dict, key, path: Path, number: int, what: str) -> None:
    if key in seen:
        raise ValueError(f"{path}, line {number}: duplicate {what} {key!r}")


def _relative_image_path(token: str, path: Path, number: int) -> str:
    pure = PurePosixPath(token.replace("\\", "/"))
    if pure.is_absolute() or token.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", token):
        raise ValueError(f"{path}, line {number}: image path must be relative, got {token[:80]!r}")
    if ".." in pure.parts or not pure.parts or pure.parts == (".",):
        raise ValueError(f"{path}, line {number}: image path must stay inside images/, got {token[:80]!r}")
    return pure.as_posix()


@dataclass
class CubMetadata:
    """Everything the annotation files say, keyed by the files' own ids.

    Attributes:
        images: image id -> path relative to ``root/images``, in increasing id order.
        labels: image id -> class id.
        is_train: image id -> True for the official training split.
        boxes: image id -> ``(x, y, width, height)`` (empty when bounding_boxes.txt is absent).
        classes: class id -> name (``"001.Black_footed_Albatross"``), in increasing id order.
        part_names: part id -> name (empty without parts/).
        parts: image id -> {part name: (x, y)} for the *visible* parts.
    """

    images: dict[int, str]
    labels: dict[int, int]
    is_train: dict[int, bool]
    boxes: dict[int, tuple[float, float, float, float]]
    classes: dict[int, str]
    part_names: dict[int, str] = field(default_factory=dict)
    parts: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)


def read_cub_metadata(root: str | os.PathLike[str], require_boxes: bool = True) -> CubMetadata:
    """Parse and cross-check the annotation files of a CUB-200-2011 root.

    Raises:
        ValueError: a missing required file, or a malformed line (naming the file, the line
            number and the problem), or an inconsistency between files.
    """
    root = Path(root)
    for name in CUB_FILES + (("bounding_boxes.txt",) if require_boxes else ()):
        if not (root / name).is_file():
            raise ValueError(f"{root}: not a CUB-200-2011 root, {name} is missing")

    path = root / "classes.txt"
    classes: dict[int, str] = {}
    names_seen: dict[str, int] = {}
    for number, (cid, name) in _read_rows(path, 2, split_rest=True):
        class_id = _int(cid, path, number, "class id")
        _unique(classes, class_id, path, number, "class id")
        _unique(names_seen, name, path, number, "class name")
        classes[class_id] = name
        names_seen[name] = class_id
    if not classes:
        raise ValueError(f"{path}: no classes")

    path = root / "images.txt"
    images: dict[int, str] = {}
    image_lines: dict[int, int] = {}
    for number, (iid, rel) in _read_rows(path, 2, split_rest=True):
        image_id = _int(iid, path, number, "image id")
        _unique(images, image_id, path, number, "image id")
        images[image_id] = _relative_image_path(rel, path, number)
        image_lines[image_id] = number
    if not images:
        raise ValueError(f"{path}: no images")

    def per_image(name: str, fields: int, parse) -> dict:
        path = root / name
        values: dict = {}
        for number, row in _read_rows(path, fields):
            image_id = _int(row[0], path, number, "image id")
            _unique(values, image_id, path, number, "image id")
            values[image_id] = parse(row[1:], path, number)
        return {k: v for k, v in values.items() if k in images}  # lines about other images: ignored

    def parse_label(row, path, number):
        class_id = _int(row[0], path, number, "class id")
        if class_id not in classes:
            raise ValueError(f"{path}, line {number}: class id {class_id} is not in classes.txt")
        return class_id

    def parse_box(row, path, number):
        x, y, w, h = (_float(t, path, number, what) for t, what in zip(row, ("x", "y", "width", "height")))
        if w <= 0 or h <= 0:
            raise ValueError(f"{path}, line {number}: box width and height must be > 0, got {w} x {h}")
        return (x, y, w, h)

    labels = per_image("image_class_labels.txt", 2, parse_label)
    is_train = per_image("train_test_split.txt", 2, lambda row, p, n: _flag(row[0], p, n, "train flag"))
    boxes = per_image("bounding_boxes.txt", 5, parse_box) if (root / "bounding_boxes.txt").is_file() else {}

    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)) + (
        (("bounding_boxes.txt", boxes),) if require_boxes else ()
    ):
        missing = [i for i in images if i not in table]
        if missing:
            raise ValueError(
                f"{root / name}: no line for image id {missing[0]} (images.txt, line "
                f"{image_lines[missing[0]]}){f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
            )

    part_names: dict[int, str] = {}
    parts: dict[int, dict[str, tuple[float, float]]] = {}
    parts_file, locs_file = root / "parts" / "parts.txt", root / "parts" / "part_locs.txt"
    if parts_file.is_file() and locs_file.is_file():
        names_seen = {}
        for number, (pid, name) in _read_rows(parts_file, 2, split_rest=True):
            part_id = _int(pid, parts_file, number, "part id")
            _unique(part_names, part_id, parts_file, number, "part id")
            _unique(names_seen, name, parts_file, number, "part name")
            part_names[part_id] = name
            names_seen[name] = part_id
        seen: set[tuple[int, int]] = set()
        for number, row in _read_rows(locs_file, 5):
            image_id = _int(row[0], locs_file, number, "image id")
            part_id = _int(row[1], locs_file, number, "part id")
            x = _float(row[2], locs_file, number, "x")
            y = _float(row[3], locs_file, number, "y")
            visible = _flag(row[4], locs_file, number, "visible flag")
            if part_id not in part_names:
                raise ValueError(f"{locs_file}, line {number}: part id {part_id} is not in parts.txt")
            if (image_id, part_id) in seen:
                raise ValueError(f"{locs_file}, line {number}: duplicate location of part {part_id} in image {image_id}")
            seen.add((image_id, part_id))
            if visible and image_id in images:
                parts.setdefault(image_id, {})[part_names[part_id]] = (x, y)
    elif parts_file.is_file() != locs_file.is_file():
        logger.warning("%s: parts/parts.txt and parts/part_locs.txt go together; ignoring part locations", root)

    return CubMetadata(
        images=dict(sorted(images.items())),
        labels=labels,
        is_train=is_train,
        boxes=boxes,
        classes=dict(sorted(classes.items())),
        part_names=dict(sorted(part_names.items())),
        parts=parts,
    )


class CUB200(AnnotatedImageDataset):
    """CUB-200-2011 birds, cropped to the bird's box (the paper's setting) or whole.

    Args:
        root: the directory holding ``images.txt`` etc. (see the module docstring).
        split: ``"train"`` / ``"test"`` (the official split) or ``"all"``.
        crop: ``"bbox"`` (crop to the bounding box, clamped to the picture) or ``"full"``.
        image_size: side ``S`` of the square pictures.
        augment, mean, std: see :class:`ProtoDataset`.
        classes: keep only these classes, given by name (``"001.Black_footed_Albatross"``) or by
            class id (int); labels are then ``0..len(classes)-1`` in increasing class-id order.

    Attributes:
        classes: class names, label order; :func:`pretty_class_name` makes them readable.
        class_ids: the class id of each label.
        image_ids: the image id of each item (items are in increasing image-id order).
        part_names: the annotated part names (``"back"``, ``"beak"``, ... ``"left eye"``).

    ``annotation(i)`` has the bird's box (``object_box``) and the visible parts (``parts``) in
    the ``S x S`` picture's pixel coordinates.
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
        classes: Sequence[str | int] | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"CUB200 split must be one of {_SPLITS}, got {split!r}")
        self.root = Path(root)
        self.split = split
        meta = read_cub_metadata(self.root, require_boxes=(crop == "bbox"))
        class_ids = list(meta.classes)
        if classes is not None:
            by_name = {name: cid for cid, name in meta.classes.items()}
            wanted = set()
            for entry in classes:
                if isinstance(entry, str) and entry in by_name:
                    wanted.add(by_name[entry])
                elif isinstance(entry, int) and not isinstance(entry, bool) and entry in meta.classes:
                    wanted.add(entry)
                else:
                    raise ValueError(f"{self.root / 'classes.txt'}: no class {entry!r}")
            class_ids = [cid for cid in class_ids if cid in wanted]
        label_of = {cid: label for label, cid in enumerate(class_ids)}
        chosen = [
            iid for iid in meta.images
            if meta.labels[iid] in label_of
            and (split == "all" or meta.is_train[iid] == (split == "train"))
        ]
        if not chosen:
            raise ValueError(f"{self.root}: no images in split {split!r} for the selected classes")

        def box(iid: int):
            if iid not in meta.boxes:
                return None
            x, y, w, h = meta.boxes[iid]
            return (x, y, x + w, y + h)

        images_dir = self.root / "images"
        super().__init__(
            files=[str(images_dir / meta.images[iid]) for iid in chosen],
            targets=[label_of[meta.labels[iid]] for iid in chosen],
            classes=[meta.classes[cid] for cid in class_ids],
            boxes=[box(iid) for iid in chosen],
            parts=[meta.parts.get(iid, {}) for iid in chosen],
            crop=crop,
            image_size=image_size,
            augment=augment,
            mean=mean,
            std=std,
        )
        self.class_ids = class_ids
        self.image_ids = chosen
        self.part_names = list(meta.part_names.values())
        logger.info("CUB200 %s: %d images, %d classes, crop=%s", split, len(chosen), len(class_ids), crop)

    @property
    def pretty_classes(self) -> list[str]:
        """Readable class names, label order (``"Black footed Albatross"``)."""
        return [pretty_class_name(name) for name in self.classes]
