"""Prepare CUB-200-2011 and Stanford Cars the way the paper used them.

The paper (Section 3; reference code ``img_aug.py``) trains on images cropped to the object's
bounding box, resized to 224 x 224, and augmented offline: for every training image, 10 random
rotations, 10 perspective skews and 10 shears, each flipped left-right with probability 1/2. Push
uses the cropped training images without augmentation; the test images are cropped too.

:func:`prepare_dataset` writes that as ImageFolder trees::

    OUT/
      protopnet-data.json              what was written, from where, with which settings
      train/<class>/<stem>.jpg         cropped, resized training images (push / validation set)
      train_augmented/<class>/<stem>_aug00.jpg ... _aug<3N-1>.jpg
                                       3N augmented copies of each training image (N per operation:
                                       rotations, then skews, then shears; no originals, as in the
                                       reference)
      test/<class>/<stem>.jpg          cropped, resized test images

``<class>`` is the class name (``001.Black_footed_Albatross``), prefixed with the label when the
names would not sort in label order (Stanford Cars); ``<stem>`` is the source file's name without
extension, so an augmented copy names its source (:func:`augmented_sources`, used to keep the
copies of validation images out of training). Augmented copy ``k`` of an image is a function of
``(seed, the image's path inside the dataset)`` only: the same ``seed`` gives the same pictures
whatever the worker count, the order or the class subset.

``OUT`` loads with :func:`protopnet.data.build_dataset` (``train``/``test`` split folders); the
training loop reads ``train_augmented/`` when ``data.offline_augmentation`` is true.

Each split is written into ``OUT/.<split>.partial/`` (every file via a temporary name) and moved
into place when complete, so an interrupted run never leaves a split that looks finished; running
the same command again resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from protopnet.data.augment import _folder_names, offline_augment
from protopnet.data.errors import BadImageError

if TYPE_CHECKING:
    from protopnet.runtime import ProgressBars

logger = logging.getLogger(__name__)

MANIFEST = "protopnet-data.json"
DATASETS = ("cub200", "cars")
FORMATS = {"jpg": "JPEG", "png": "PNG"}
_AUGMENTED = re.compile(r"^(?P<stem>.+)_aug\d+$")

#: What a source directory must hold, in words (for error messages).
EXPECTED = {
    "cub200": "images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, bounding_boxes.txt "
              "and images/ (in SRC or SRC/CUB_200_2011)",
    "cars": "devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, "
            "cars_train/ and cars_test/ (in SRC or SRC/stanford_cars)",
}



class SourceError(ValueError):
    """SRC is not the dataset it should be; the message names the files that were expected."""


# -- finding the source ---------------------------------------------------------------------

def _cub_missing(root: Path) -> list[str]:
    names = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt"]
    missing = [n for n in names if not (root / n).is_file()]
    return missing + ([] if (root / "images").is_dir() else ["images/"])


def _cars_missing(root: Path) -> list[str]:
    missing = [n for n in ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat") if not (root / n).is_file()]
    if not ((root / "cars_test_annos_withlabels.mat").is_file() or (root / "devkit" / "cars_test_annos_withlabels.mat").is_file()):
        missing.append("cars_test_annos_withlabels.mat")
    return missing + [f"{n}/" for n in ("cars_train", "cars_test") if not (root / n).is_dir()]


def find_source(name: str, src: str | os.PathLike[str]) -> Path:
    """The dataset root inside ``src`` (``src`` itself, or its ``CUB_200_2011/`` /
    ``stanford_cars/`` sub-folder).

    Raises:
        SourceError: one line naming ``src``, the expected files and which are missing.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    src = Path(src).expanduser()
    check = _cub_missing if name == "cub200" else _cars_missing
    sub = "CUB_200_2011" if name == "cub200" else "stanford_cars"
    candidates = [src, src / sub]
    for candidate in candidates:
        if candidate.is_dir() and not check(candidate):
            return candidate
    if not src.exists():
        raise SourceError(f"{src}: no such directory; expected a {name} directory with {EXPECTED[name]} (or pass --download)")
    best = min((c for c in candidates if c.is_dir()), key=lambda c: len(check(c)))
    missing = check(best)
    if len(missing) == len(check(Path("/nonexistent-protopnet"))):
        raise SourceError(f"{src}: not a {name} directory; expected {EXPECTED[name]} (or pass --download)")
    raise SourceError(f"{src}: not a complete {name} directory: {', '.join(missing)} missing in {best}; expected {EXPECTED[name]}")


def open_source(name: str, root: Path, split: str, image_size: int, classes: int | Sequence[Any] | None) -> Any:
    """The source split as a cropping dataset (CUB200 / StanfordCars with ``crop="bbox"``)."""
    if name == "cub200":
        from protopnet.data.cub import CUB200, read_cub_metadata

        if isinstance(classes, int):
            classes = list(read_cub_metadata(root).classes)[:classes]
        return CUB200(root, split=split, crop="bbox", image_size=image_size, classes=classes)
    from protopnet.data.cars import StanfordCars, read_cars_class_names

    if isinstance(classes, int):
        classes = read_cars_class_names(root)[:classes]
    return StanfordCars(root, split=split, crop="bbox", image_size=image_size, classes=classes)


# -- writing pictures -----------------------------------------------------------------------

def _save(picture: Image.Image, path: Path, image_format: str, quality: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    options = {"quality": quality, "subsampling": 0} if image_format == "jpg" else {}
    picture.convert("RGB").save(tmp, format=FORMATS[image_format], **options)
    os.replace(tmp, path)


def _image_key(dataset: Any, index: int) -> str:
    """A stable identity of an item: its path relative to the dataset root."""
    path = Path(dataset.path(index))
    try:
        return path.relative_to(dataset.root).as_posix()
    except (AttributeError, ValueError):
        return path.name


def augmentation_rng(seed: int, key: str) -> np.random.Generator:
    """The random stream of one image's offline augmentation: a function of ``(seed, key)``."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


class _Writer:
    """Writes the pictures of one split's items (picklable: runs in worker processes too)."""

    def __init__(self, dataset: Any, folder: Path, names: list[tuple[str, str]], copies: int, seed: int,
                 image_format: str, quality: int) -> None:
        self.dataset, self.folder, self.names = dataset, folder, names
        self.copies, self.seed, self.image_format, self.quality = copies, seed, image_format, quality

    def outputs(self, index: int) -> list[Path]:
        class_folder, stem = self.names[index]
        ext = self.image_format
        if self.copies == 0:
            return [self.folder / class_folder / f"{stem}.{ext}"]
        return [self.folder / class_folder / f"{stem}_aug{k:02d}.{ext}" for k in range(3 * self.copies)]

    def __call__(self, indices: list[int]) -> list[tuple[int, int, str | None]]:
        """``[(index, pictures written, reason it was skipped or None), ...]``."""
        done = []
        for index in indices:
            paths = self.outputs(index)
            if paths[-1].exists():  # written by an interrupted earlier run (files are replaced atomically, last one last)
                done.append((index, len(paths), None))
                continue
            try:
                picture = self.dataset.load_image(index)
            except BadImageError as error:
                done.append((index, 0, str(error)))
                continue
            pictures = [picture] if self.copies == 0 else offline_augment(
                picture, augmentation_rng(self.seed, _image_key(self.dataset, index)), self.copies)
            for p, path in zip(pictures, paths):
                _save(p, path, self.image_format, self.quality)
            done.append((index, len(paths), None))
        return done


_WORKER: _Writer | None = None


def _init_worker(writer: _Writer) -> None:
    global _WORKER
    _WORKER = writer


def _run_chunk(indices: list[int]) -> list[tuple[int, int, str | None]]:
    assert _WORKER is not None
    return _WORKER(indices)


def _item_names(dataset: Any, folders: list[str]) -> list[tuple[str, str]]:
    """``(class folder, unique stem)`` of every item."""
    seen: set[tuple[str, str]] = set()
    names = []
    for index in range(len(dataset)):
        folder = folders[int(dataset.targets[index])]
        stem = re.sub(r"[^\w.+-]", "_", Path(dataset.path(index)).stem) or "image"
        stem = re.sub(r"_aug\d+$", lambda m: m.group(0).replace("_aug", "-aug"), stem)  # keep the suffix unambiguous
        candidate, n = stem, 1
        while (folder, candidate) in seen:
            candidate, n = f"{stem}-{n}", n + 1
        seen.add((folder, candidate))
        names.append((folder, candidate))
    return names


def _write_split(dataset: Any, target: Path, folders: list[str], *, copies: int, seed: int, image_format: str,
                 quality: int, workers: int, settings: dict[str, Any], description: str,
                 progress_bars: ProgressBars | None) -> dict[str, Any]:
    """Write one split into ``target`` (through ``.<name>.partial``); returns its manifest entry."""
    partial = target.with_name(f".{target.name}.partial")
    stamp = partial / ".settings.json"
    if partial.exists():
        try:
            same = json.loads(stamp.read_text(encoding="utf-8")) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            logger.info("%s holds an interrupted run with other settings: starting it over", partial)
            shutil.rmtree(partial)
        else:
            logger.info("resuming the interrupted %s in %s", description, partial)
    partial.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings), encoding="utf-8")
    for folder in folders:
        (partial / folder).mkdir(exist_ok=True)
    writer = _Writer(dataset, partial, _item_names(dataset, folders), copies, seed, image_format, quality)
    indices = list(range(len(dataset)))
    chunks = [indices[i:i + 16] for i in range(0, len(indices), 16)]
    skipped: list[dict[str, str]] = []
    written = 0
    start = time.monotonic()
    bar_context = progress_bars(description, len(indices)) if progress_bars is not None else nullcontext()
    with bar_context as bar:
        def collect(results: list[tuple[int, int, str | None]]) -> None:
            nonlocal written
            for index, count, reason in results:
                written += count
                if reason is not None:
                    logger.warning("skipping unreadable image %s", reason)
                    skipped.append({"path": str(dataset.path(index)), "reason": reason})
            if bar is not None:
                bar.update(len(results))

        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(writer,)) as pool:
                for results in pool.map(_run_chunk, chunks):
                    collect(results)
        else:
            for chunk in chunks:
                collect(writer(chunk))
    stamp.unlink()
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    logger.info("%s: %d pictures in %s (%.0f s, %d unreadable images skipped)", description, written, target,
                time.monotonic() - start, len(skipped))
    return {"folder": target.name, "source_images": len(dataset) - len(skipped), "pictures": written,
            "skipped": skipped, "settings": settings}


# -- the whole preparation ------------------------------------------------------------------

def read_manifest(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a prepared directory, or None."""
    try:
        data = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == "protopnet-data" else None


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


def prepare_dataset(
    name: str,
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    image_size: int = 224,
    augment: int = 10,
    seed: int = 0,
    image_format: str = "jpg",
    quality: int = 95,
    classes: int | Sequence[Any] | None = None,
    workers: int = 0,
    overwrite: bool = False,
    progress_bars: ProgressBars | None = None,
) -> dict[str, Any]:
    """Crop, resize and augment a dataset into ``out`` (layout in the module docstring).

    Args:
        name: ``"cub200"`` or ``"cars"``.
        src: the dataset's directory (official layout; see :data:`EXPECTED`).
        out: where the trees go (created).
        image_size: side of the square pictures (paper: 224).
        augment: augmented copies per image *per operation* (paper / reference: 10, i.e. 30 per
            image); 0 writes no ``train_augmented/``.
        seed: the augmentation's seed.
        image_format: ``"jpg"`` (quality ``quality``, no chroma subsampling) or ``"png"``
            (lossless, about 4x larger: CUB's augmented tree is ~20 GB as PNG).
        classes: keep only these classes (names or ids, as the dataset class accepts) or, as an
            int, the first N classes.
        workers: processes writing pictures (0 or 1: this process).
        overwrite: replace splits that ``out`` already holds with other settings (otherwise that
            is an error); splits with the same settings are kept, not rewritten.
        progress_bars: ``(description, total) -> bar`` for one bar per split
            (:data:`protopnet.runtime.ProgressBars`; the CLI passes tqdm).

    Returns:
        The manifest (also written to ``out/protopnet-data.json``).

    Raises:
        SourceError: ``src`` is not the named dataset (the message lists the missing files).
        FileExistsError: ``out`` holds a split written with other settings and not ``overwrite``.
    """
    if image_format not in FORMATS:
        raise ValueError(f"image format must be one of {', '.join(FORMATS)}, got {image_format!r}")
    if image_size < 1 or augment < 0 or not 1 <= quality <= 100:
        raise ValueError(f"need image_size >= 1, augment >= 0 and 1 <= quality <= 100; got {image_size}, {augment}, {quality}")
    root = find_source(name, src)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    train = open_source(name, root, "train", image_size, classes)
    test = open_source(name, root, "test", image_size, classes)
    if list(train.classes) != list(test.classes):
        raise SourceError(f"{root}: the train and test splits have different classes")
    folders = _folder_names(list(train.classes))
    common = {"dataset": name, "source": str(root.resolve()), "image_size": image_size, "crop": "bbox",
              "image_format": image_format, "quality": quality, "classes": list(train.classes)}
    manifest = read_manifest(out) or {}
    splits: dict[str, Any] = dict(manifest.get("splits") or {})
    plan = [("train", train, 0, common), ("test", test, 0, common)]
    if augment > 0:
        plan.append(("train_augmented", train, augment, {**common, "augment_per_operation": augment, "seed": seed}))
    for split, dataset, copies, settings in plan:
        target = out / split
        done = splits.get(split)
        if done is not None and done.get("settings") == settings and target.is_dir():
            logger.info("%s is already prepared with these settings; keeping it", target)
            continue
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists with other settings (or without {MANIFEST}); "
                                  "choose another --out or pass --overwrite")
        what = f"{split} ({len(dataset)} images{f' x {3 * copies} copies' if copies else ''})"
        splits[split] = _write_split(dataset, target, folders, copies=copies, seed=seed, image_format=image_format,
                                     quality=quality, workers=workers, settings=settings, description=what,
                                     progress_bars=progress_bars)
        manifest = {"format": "protopnet-data", "version": 1, "dataset": name, "image_size": image_size,
                    "classes": list(train.classes), "folders": folders, "splits": splits,
                    "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_manifest(out, manifest)
    if augment == 0 and "train_augmented" in splits:
        logger.info("%s keeps its earlier train_augmented/ (augment=0 leaves it alone)", out)
    manifest = {"format": "protopnet-data", "version": 1, "dataset": name, "image_size": image_size,
                "classes": list(train.classes), "folders": folders, "splits": splits,
                "written": manifest.get("written") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_manifest(out, manifest)
    return manifest


# -- reading the augmented tree back --------------------------------------------------------

def source_key(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(class folder, source stem)`` of a prepared picture: ``train/<c>/<stem>.jpg`` and every
    ``train_augmented/<c>/<stem>_augNN.jpg`` share one key."""
    path = Path(path)
    stem = path.stem
    match = _AUGMENTED.match(stem)
    return path.parent.name, match.group("stem") if match else stem


def augmented_sources(augmented_files: Sequence[str], clean_files: Sequence[str]) -> list[int | None]:
    """For each augmented picture, the index of its source in ``clean_files`` (None if unknown)."""
    index = {source_key(f): i for i, f in enumerate(clean_files)}
    return [index.get(source_key(f)) for f in augmented_files]


def offline_training_items(augmented: Any, clean: Any, train_indices: Sequence[int]) -> list[int]:
    """Indices of ``augmented`` whose source image is among ``clean``'s ``train_indices``.

    Copies of validation images are left out (they would leak the validation set into training);
    copies whose source cannot be found are kept, with a warning.
    """
    keep = set(int(i) for i in train_indices)
    sources = augmented_sources([augmented.path(i) for i in range(len(augmented))], [clean.path(i) for i in range(len(clean))])
    unknown = sum(s is None for s in sources)
    if unknown:
        logger.warning("%d of %d augmented pictures do not name a source image in the train/ tree; they are all "
                       "used for training (copies of validation images among them would leak)", unknown, len(sources))
    chosen = [i for i, s in enumerate(sources) if s is None or s in keep]
    logger.info("offline augmentation: %d of %d augmented pictures come from the %d training images",
                len(chosen), len(sources), len(keep))
    return chosen
