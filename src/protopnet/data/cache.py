"""Pictures decoded and resized once, then served again: from a file or from memory.

JPEG decoding and resizing are a fixed cost of every epoch on a CPU, the same in every
precision; with a cache an item costs a memory copy.

- :class:`DecodedCache` (``data.cache``): every picture decoded once into a memory-mapped file,
  shared by DataLoader workers and by the runs that name the same ``cache_dir``.
- :class:`MemoryCache` (``data.memory_cache_max_gb``, the default with ``num_workers=0``): each
  picture kept in memory the first time a run reads it, within a budget; nothing is written.

DecodedCache's files in ``cache_dir``::

    <name>.u8     raw uint8 array (N, S, S, 3), the pictures in item order
    <name>.json   {"version", "n", "size", "fingerprint", "ok": [bool] * N, "reasons": {index: reason}}

Both are written to a temporary file first and moved into place with ``os.replace`` (data first,
then the sidecar), so a crash never leaves a cache that looks valid. The fingerprint covers the
dataset's type, ``cache_token`` (crop mode, annotations...), picture size, every item's path and,
for local files, their size and modification time: any change rebuilds the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from protopnet.data.base import Annotation, ProtoDataset
from protopnet.data.errors import BadImageError

logger = logging.getLogger(__name__)

_VERSION = 1
# attributes the wrappers set themselves: never looked up on the wrapped dataset
_OWN_ATTRIBUTES = frozenset({"dataset", "_array", "_ok", "_reasons", "_pictures_kept"})


def dataset_fingerprint(dataset: ProtoDataset) -> tuple[str, str]:
    """``(name_digest, full_digest)``: the first ignores file sizes and times (it names the cache
    files), the second includes them (it validates the content)."""
    name = hashlib.sha256()
    full = hashlib.sha256()
    header = f"{type(dataset).__module__}.{type(dataset).__qualname__}|{getattr(dataset, 'cache_token', '')}|{dataset.image_size}|{len(dataset)}\n"
    name.update(header.encode())
    full.update(header.encode())
    for index in range(len(dataset)):
        path = str(dataset.path(index))
        name.update(path.encode("utf-8", "surrogateescape") + b"\n")
        stamp = ""
        if "://" not in path:
            try:
                info = os.stat(path)
                stamp = f"{info.st_size}:{info.st_mtime_ns}"
            except OSError:
                stamp = "missing"
        full.update(f"{path}|{stamp}\n".encode("utf-8", "surrogateescape"))
    return name.hexdigest()[:20], full.hexdigest()


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _WrappedDataset(ProtoDataset):
    """A ProtoDataset that serves another one's pictures differently: ``classes``, ``targets``,
    ``path``, ``annotation``, ``image_size``, ``mean``, ``std`` and ``augment`` (reading and
    setting it) act on the wrapped :attr:`dataset`, and so does any other attribute (``split``,
    ``crop``, ``part_names``...). Subclasses implement :meth:`load_image`."""

    dataset: ProtoDataset

    # -- forwarding ---------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:  # type: ignore[override]
        return self.dataset.classes

    @property
    def targets(self) -> list[int]:  # type: ignore[override]
        return self.dataset.targets

    @property
    def image_size(self) -> int:  # type: ignore[override]
        return self.dataset.image_size

    @property
    def mean(self) -> tuple[float, ...]:  # type: ignore[override]
        return self.dataset.mean

    @property
    def std(self) -> tuple[float, ...]:  # type: ignore[override]
        return self.dataset.std

    @property
    def augment(self) -> Callable[[Image.Image], Image.Image] | None:  # type: ignore[override]
        return self.dataset.augment

    @augment.setter
    def augment(self, value: Callable[[Image.Image], Image.Image] | None) -> None:
        self.dataset.augment = value

    def __len__(self) -> int:
        return len(self.dataset)

    def path(self, index: int) -> str:
        return self.dataset.path(index)

    def annotation(self, index: int) -> Annotation:
        return self.dataset.annotation(index)

    def __getattr__(self, name: str) -> Any:  # anything else (split, crop, part_names...)
        if name.startswith("__") or name in _OWN_ATTRIBUTES:
            raise AttributeError(name)
        return getattr(self.dataset, name)


class DecodedCache(_WrappedDataset):
    """Wrap a ProtoDataset; serve ``load_image`` from a uint8 memmap ``(N, S, S, 3)``.

    Args:
        dataset: any ProtoDataset (its ``load_image`` must be deterministic: no augmentation
            happens there, augmentation is applied after, by this wrapper's ``augment``).
        cache_dir: where the cache files live (created if needed; can be shared by datasets).
        rebuild: rebuild even when a valid cache exists.

    Everything but the pictures is the wrapped dataset's (see :class:`_WrappedDataset`).
    Items whose picture could not be decoded are remembered: ``load_image`` raises the same
    BadImageError without touching the file again, and :attr:`bad_items` lists them.
    """

    def __init__(self, dataset: ProtoDataset, cache_dir: str | os.PathLike[str], rebuild: bool = False) -> None:
        # no ProtoDataset.__init__: image_size, mean, std, augment are forwarded properties
        self.dataset = dataset
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        name, self.fingerprint = dataset_fingerprint(dataset)
        stem = f"{type(dataset).__name__}-{dataset.image_size}px-{name}"
        self.data_path = self.cache_dir / f"{stem}.u8"
        self.meta_path = self.cache_dir / f"{stem}.json"
        self._array: np.memmap | None = None
        meta = None if rebuild else self._read_meta()
        if meta is None:
            meta = self._build()
        self._ok: list[bool] = [bool(v) for v in meta["ok"]]
        self._reasons: dict[int, str] = {int(k): str(v) for k, v in meta.get("reasons", {}).items()}

    # -- cache files --------------------------------------------------------------------------
    def _read_meta(self) -> dict[str, Any] | None:
        n, size = len(self.dataset), self.dataset.image_size
        try:
            meta = json.loads(self.meta_path.read_text())
            valid = (
                isinstance(meta, dict)
                and meta.get("version") == _VERSION
                and meta.get("n") == n
                and meta.get("size") == size
                and meta.get("fingerprint") == self.fingerprint
                and isinstance(meta.get("ok"), list)
                and len(meta["ok"]) == n
                and self.data_path.stat().st_size == n * size * size * 3
            )
        except (OSError, ValueError):
            valid = False
        if not valid:
            if self.meta_path.exists():
                logger.info("cache %s is stale or invalid: rebuilding", self.meta_path)
            return None
        return meta

    def _build(self) -> dict[str, Any]:
        n, size = len(self.dataset), self.dataset.image_size
        logger.info("decoding %d pictures (%d px) into %s", n, size, self.data_path)
        start = time.monotonic()
        ok = [False] * n
        reasons: dict[str, str] = {}
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{self.data_path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            if n:
                array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, size, size, 3))
                for index in range(n):
                    try:
                        picture = self.dataset.load_image(index).convert("RGB")
                        if picture.size != (size, size):
                            raise BadImageError(self.dataset.path(index),
                                                f"load_image returned {picture.size}, expected {size}x{size}")
                        array[index] = np.asarray(picture)  # (S, S, 3)
                        ok[index] = True
                    except BadImageError as error:
                        reasons[str(index)] = error.reason
                        logger.warning("unreadable image, remembered in the cache: %s", error)
                    if (index + 1) % 1000 == 0:
                        logger.info("decoded %d / %d pictures", index + 1, n)
                array.flush()
                del array
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is ordinary data
            os.replace(tmp, self.data_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {"version": _VERSION, "n": n, "size": size, "fingerprint": self.fingerprint, "ok": ok, "reasons": reasons}
        _atomic_write_bytes(self.meta_path, json.dumps(meta).encode())
        logger.info("cache built in %.1f s (%d unreadable)", time.monotonic() - start, n - sum(ok))
        return meta

    def _pictures(self) -> np.memmap:
        if self._array is None:  # opened lazily, so DataLoader workers each map the file themselves
            n, size = len(self.dataset), self.dataset.image_size
            self._array = np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=(n, size, size, 3))
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    # -- serving ------------------------------------------------------------------------------
    def load_image(self, index: int) -> Image.Image:
        """The cached RGB ``(S, S)`` picture of item ``index``; BadImageError if it was unreadable."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range 0..{len(self) - 1}")
        if not self._ok[index]:
            raise BadImageError(self.dataset.path(index), self._reasons.get(index, "unreadable image"))
        return Image.fromarray(np.array(self._pictures()[index]))  # copy out of the map

    @property
    def bad_items(self) -> list[tuple[int, str, str]]:
        """``[(index, path, reason), ...]`` of the items that could not be decoded."""
        return [(i, self.dataset.path(i), self._reasons.get(i, "unreadable image"))
                for i, ok in enumerate(self._ok) if not ok]


class PictureMemory:
    """The decoded pictures of one split, kept in memory for a run and shared by the
    :class:`MemoryCache` wrappers of that split (the clean and the augmented training set are
    the same pictures), within ``max_bytes``. Pictures past the budget are not kept: they are
    decoded every time they are read. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.used_bytes = 0
        self._pictures: dict[int, np.ndarray] = {}  # index -> (S, S, 3) uint8, read-only
        self._lock = threading.Lock()
        self._full = False

    def __len__(self) -> int:
        return len(self._pictures)

    def __getstate__(self) -> dict[str, Any]:
        # a copy (a spawned DataLoader worker, deepcopy) starts empty, with a lock of its own
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_bytes"])  # type: ignore[misc]

    def get(self, index: int) -> np.ndarray | None:
        return self._pictures.get(index)

    def keep(self, index: int, picture: Image.Image) -> None:
        """Keep ``picture`` (RGB) as item ``index``'s, if the budget allows."""
        if index in self._pictures or self._over_budget(picture.width * picture.height * 3):
            return  # no copy made of a picture that will not be kept
        # np.array copies: the kept pixels are not those of the picture handed to the reader,
        # who may change it
        array = np.array(picture if picture.mode == "RGB" else picture.convert("RGB"), dtype=np.uint8)  # (S, S, 3)
        array.flags.writeable = False
        with self._lock:
            if index in self._pictures or self._over_budget(array.nbytes):
                return
            self._pictures[index] = array
            self.used_bytes += array.nbytes

    def _over_budget(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would exceed the budget (logged once, the first time)."""
        if self.used_bytes + nbytes <= self.max_bytes:
            return False
        if not self._full:
            self._full = True
            logger.info("%d decoded pictures kept in memory (%.2f GiB, the budget); the others are decoded each time",
                        len(self._pictures), self.used_bytes / 2**30)
        return True


class MemoryCache(_WrappedDataset):
    """Wrap a ProtoDataset so each picture is decoded once per run and then served from memory.

    Args:
        dataset: any ProtoDataset whose ``load_image`` is deterministic (augmentation happens
            after it, by this wrapper's ``augment``).
        memory: where the pictures are kept (:class:`PictureMemory`); pass the same one to the
            wrappers of one split so they share it.

    ``load_image`` returns the same pixels as the wrapped dataset's, as a new picture each time.
    Unreadable items are not remembered: they raise BadImageError from the wrapped dataset on
    every read. Meant for loading in the main process (``num_workers=0``): each DataLoader
    worker would fill its own copy.
    """

    def __init__(self, dataset: ProtoDataset, memory: PictureMemory) -> None:
        # no ProtoDataset.__init__: image_size, mean, std, augment are forwarded properties
        self.dataset = dataset
        self._pictures_kept = memory

    @property
    def memory(self) -> PictureMemory:
        return self._pictures_kept

    def load_image(self, index: int) -> Image.Image:
        index = int(index)
        kept = self._pictures_kept.get(index)
        if kept is not None:
            return Image.fromarray(kept)  # an RGB picture from an array is a copy of its pixels
        picture = self.dataset.load_image(index)
        self._pictures_kept.keep(index, picture)
        return picture
