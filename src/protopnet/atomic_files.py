"""Files that are either the old or the whole new version, and the crash-test hook that proves it.

Every file protopnet writes goes through :func:`atomic_write_bytes` (temporary file, fsync,
rename), and a whole directory through :func:`write_directory_atomically` (filled beside its
target, then renamed into place); :func:`clean_interrupted_writes` restores what a kill between
two renames left. :func:`fault_point` lets tests SIGKILL a real run at a named moment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)


# -- crash testing ------------------------------------------------------------------------------

KILL_VARIABLE = "PROTOPNET_KILL_AT"
_kill_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A crash-test hook, inert unless the environment variable ``PROTOPNET_KILL_AT`` is set.

    ``PROTOPNET_KILL_AT=NAME:N`` makes the process SIGKILL itself the N-th time (default 1) it
    reaches ``fault_point(NAME)``, so tests can kill a real ``protopnet train`` at a chosen moment
    and check that ``--resume`` recovers. The points: ``batch`` (after each training batch),
    ``push`` (after each push batch), ``checkpoint-write`` (a checkpoint half-written in its
    temporary directory) and ``directory-swap`` (between the two renames that replace a directory).
    """
    spec = os.environ.get(KILL_VARIABLE)
    if not spec or spec.partition(":")[0] != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] >= int(spec.partition(":")[2] or 1):
        logger.warning("%s=%s: killing this process at %s", KILL_VARIABLE, spec, name)
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


# -- atomic files -------------------------------------------------------------------------------

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old or the whole new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_directory_atomically(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create ``target`` by calling ``fill(tmp_dir)`` on a fresh sibling directory, then renaming
    it into place (an existing ``target`` is replaced). Returns ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        _fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(target, old)
            fault_point("directory-swap")  # a kill here leaves only the old version: see clean_interrupted_writes
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:[a-z0-9_]{8}\.tmp|(?P<kind>old|del)-\d+-\d+)")


def clean_interrupted_writes(directory: str | Path) -> list[str]:
    """Tidy ``directory`` after a process died while writing into it.

    Removes what :func:`atomic_write_bytes` and :func:`write_directory_atomically` leave behind
    when killed: ``.NAME.<random>.tmp`` (a write that never finished), ``.NAME.old-*`` (the
    replaced version) and ``.NAME.del-*`` (a directory being deleted). When ``NAME`` itself is
    missing — the process died between the two renames that replace a directory — its old
    version is renamed back first. Returns the names removed or restored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    done = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name, reverse=True):
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None:
            continue
        target = directory / match["name"]
        if match["kind"] == "old" and not target.exists() and not target.is_symlink():
            os.replace(entry, target)
            logger.warning("restored %s from %s (a replacement was interrupted)", target, entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(entry.name)
    if done:
        logger.info("%s: cleaned up after an interrupted write: %s", directory, ", ".join(done))
    return done
