"""Fetch and unpack the official dataset archives: checksummed, resumable, safely extracted.

* :func:`download_file` streams a URL to ``<dest>.part``, resumes a partial file with an HTTP
  ``Range`` request, verifies the published MD5 / SHA-256, and only then moves the file to
  ``dest``. A partial file that turns out corrupt (wrong checksum after resuming) is deleted and
  the download restarts once from the beginning; a fresh download with a wrong checksum is
  deleted and reported.
* :func:`extract_archive` unpacks a tar archive (``.tgz``, ``.tar.gz``, ``.tar``) after checking
  every member: no absolute paths, no ``..``, no links leaving the target, no devices — and then
  extracts with tarfile's ``filter="data"`` as a second line of defence.
* :data:`CUB_200_2011` and :data:`STANFORD_CARS` name the official files and their checksums.
  The Stanford Cars files were served from ``ai.stanford.edu/~jkrause``, which has often been
  unreachable since 2023; :func:`with_base_url` points the same files (same names, same
  checksums) at a mirror.

Nothing here prints; progress is reported through a ``byte_progress(done_bytes, total_bytes)``
callback (the CLI draws the bar) and events go to the module logger.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

#: ``byte_progress(done_bytes, total_bytes_or_None)``: how far a download is (cumulative, unlike
#: the per-batch counts of :data:`protopnet.runtime.Progress`).
ByteProgress = Callable[[int, "int | None"], None]

USER_AGENT = "protopnet-data/1 (+https://github.com/; dataset download)"


class DownloadError(OSError):
    """A file could not be fetched (the message names the URL and the reason)."""


class ChecksumError(DownloadError):
    """A fetched file does not have the published checksum (the file was deleted)."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target directory, or is not a plain file,
    directory or in-tree link (the message names the member)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where it is, what it is called locally, its published checksum.

    Attributes:
        url: the official URL.
        filename: the local file name.
        md5, sha256: the published checksum(s) (hex); at least one should be given.
        extract: unpack after download (archives) or keep as it is (e.g. a ``.mat`` file).
    """

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    extract: bool = True


#: Caltech-UCSD Birds-200-2011 (Wah et al. 2011), from CaltechDATA (record 65de6-vp158); the
#: MD5 is the one published with the dataset and used by torchvision-style loaders.
CUB_200_2011: tuple[RemoteFile, ...] = (
    RemoteFile(
        url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
        filename="CUB_200_2011.tgz",
        md5="97eceeb196236b17998738112f37df78",
    ),
)

#: Stanford Cars (Krause et al. 2013): devkit, train and test images, labelled test annotations.
#: The official host has often been down; pass a mirror with :func:`with_base_url`.
STANFORD_CARS: tuple[RemoteFile, ...] = (
    RemoteFile("https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz", "car_devkit.tgz",
               md5="c3b158d763b6e2245038c8ad08e45376"),
    RemoteFile("https://ai.stanford.edu/~jkrause/car196/cars_train.tgz", "cars_train.tgz",
               md5="065e5b463ae28d29e77c1b4b166cfe61"),
    RemoteFile("https://ai.stanford.edu/~jkrause/car196/cars_test.tgz", "cars_test.tgz",
               md5="4ce7ebf6a94d07f1952d94dd34c4d501"),
    RemoteFile("https://ai.stanford.edu/~jkrause/car196/cars_test_annos_withlabels.mat",
               "cars_test_annos_withlabels.mat", md5="b0a2b23655a3edd16d84508592a98d10", extract=False),
)


def with_base_url(files: Sequence[RemoteFile], base_url: str) -> tuple[RemoteFile, ...]:
    """The same files (names and checksums) fetched from ``base_url/<filename>`` instead.

    A ``base_url`` that already ends in one file's name (a one-file dataset such as CUB) is taken
    as that file's full URL.
    """
    base = base_url.strip()
    if len(files) == 1 and _url_basename(base) == files[0].filename:
        return (replace(files[0], url=base),)
    base = base.rstrip("/") + "/"
    return tuple(replace(f, url=base + f.filename) for f in files)


def _url_basename(url: str) -> str:
    path = urllib.request.urlparse(url).path
    return PurePosixPath(path).name


# -- checksums ----------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike[str], algorithm: str = "md5", chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: str | os.PathLike[str], md5: str | None = None, sha256: str | None = None) -> str | None:
    """None when ``path`` matches every given checksum, else a one-line description of the mismatch."""
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected:
            actual = file_digest(path, algorithm)
            if actual.lower() != expected.lower():
                return f"{algorithm.upper()} {actual} does not match the published {expected.lower()}"
    return None


# -- download -------------------------------------------------------------------------------

def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value or "")
    return int(match.group(1)) if match else None


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    md5: str | None = None,
    sha256: str | None = None,
    byte_progress: ByteProgress | None = None,
    attempts: int = 3,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    retry_wait: float = 2.0,
    progress: ByteProgress | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``) and verify its checksum.

    Args:
        url: ``http(s)://`` or ``file://``.
        dest: the final path; an existing file with the right checksum is kept as it is.
        md5, sha256: the expected checksum(s); without either, the file is not verified.
        byte_progress: called as ``byte_progress(done_bytes, total_bytes_or_None)`` while bytes
            arrive. ``progress``: the earlier name of ``byte_progress``, still accepted.
        attempts: tries for network errors and truncated transfers (each resumes what arrived).
        timeout: seconds to wait for the server on each read.

    Returns:
        ``dest``.

    Raises:
        DownloadError: an HTTP error (404, ...) or the network failing ``attempts`` times.
        ChecksumError: the complete file does not match; it is deleted (a resumed partial file
            that ends up wrong is deleted and fetched once more from the start first).
    """
    if byte_progress is None:
        byte_progress = progress
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        problem = check_file(dest, md5, sha256)
        if problem is None:
            logger.info("%s is already here and verified", dest)
            return dest
        logger.warning("%s exists but %s: downloading it again", dest, problem)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    restarted = False
    failures = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            complete = _fetch(url, part, offset, byte_progress, timeout, chunk_size)
        except DownloadError:
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:  # network trouble: retry, resuming
            failures += 1
            reason = getattr(error, "reason", None) or error
            if failures >= attempts:
                raise DownloadError(f"{url}: download failed after {attempts} attempts ({reason}); run again to resume") from None
            logger.warning("%s: %s; retrying (%d/%d)", url, reason, failures, attempts - 1)
            time.sleep(retry_wait * failures)
            continue
        if not complete:
            failures += 1
            if failures >= attempts:
                raise DownloadError(f"{url}: the transfer keeps ending early; run again to resume")
            logger.warning("%s: transfer ended early at %d bytes; resuming", url, part.stat().st_size)
            continue
        problem = check_file(part, md5, sha256)
        if problem is None:
            os.replace(part, dest)
            logger.info("downloaded %s (%d bytes)", dest, dest.stat().st_size)
            return dest
        part.unlink(missing_ok=True)
        if offset > 0 and not restarted:
            # The bytes kept from an earlier attempt were bad: start over, once.
            logger.warning("%s: %s after resuming; the partial file was corrupt, downloading from scratch", url, problem)
            restarted = True
            continue
        raise ChecksumError(f"{url}: {problem}; the file was deleted (a changed or corrupt file on the server, or a wrong --url)")


def _fetch(url: str, part: Path, offset: int, byte_progress: ByteProgress | None, timeout: float, chunk_size: int) -> bool:
    """Append to (or restart) ``part`` from ``offset``. True when the transfer is complete."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - user-chosen dataset URL
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # Nothing left to send: the partial file is complete (or longer than the file). The
            # checksum decides; a wrong one deletes it and starts over.
            logger.info("%s: server has no bytes after %d; checking the partial file", url, offset)
            return True
        if 400 <= error.code < 500:
            raise DownloadError(f"{url}: HTTP {error.code} {error.reason} (is the URL right? pass another with --url)") from None
        raise  # 5xx: retried by the caller
    with response:
        status = getattr(response, "status", None) or 200
        if offset and status == 206 and _content_range_start(response.headers.get("Content-Range")) == offset:
            mode = "ab"
            logger.info("%s: resuming at byte %d", url, offset)
        elif status == 206:
            # A range we did not ask for: the body is not the file's start. Drop the partial file.
            logger.warning("%s: unexpected Content-Range %r; starting over", url, response.headers.get("Content-Range"))
            part.unlink(missing_ok=True)
            return False
        else:
            if offset:
                logger.info("%s: the server does not resume (HTTP %s); starting over", url, status)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        done = offset
        if byte_progress is not None:
            byte_progress(done, total)
        with open(part, mode) as handle:
            while True:
                chunk = response.read(chunk_size)
                if not chunk:
                    break
                handle.write(chunk)
                done += len(chunk)
                if byte_progress is not None:
                    byte_progress(done, total)
    return total is None or done >= total


# -- extraction -----------------------------------------------------------------------------

def _check_member(member: tarfile.TarInfo, target: Path) -> None:
    name = member.name
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"[A-Za-z]:", name) or ".." in pure.parts:
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {target}")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise UnsafeArchiveError(f"archive member {name!r} is a device, FIFO or other special file")
    if member.issym() or member.islnk():
        link = PurePosixPath(member.linkname.replace("\\", "/"))
        base = pure.parent if member.issym() else PurePosixPath(".")
        resolved = os.path.normpath(str(target / base / link)) if not link.is_absolute() else str(link)
        if link.is_absolute() or os.path.commonpath([str(target), resolved]) != str(target):
            raise UnsafeArchiveError(f"archive member {name!r} links to {member.linkname!r}, outside {target}")


def extract_archive(archive: str | os.PathLike[str], target: str | os.PathLike[str]) -> list[str]:
    """Unpack a tar archive (any compression tarfile reads) into ``target``.

    Every member is checked before anything is written, so an unsafe archive leaves ``target``
    untouched. Returns the archive's top-level names.

    Raises:
        UnsafeArchiveError: a member with an absolute path, ``..``, a link leaving ``target``, or a
            special file.
        ValueError: ``archive`` is not a tar archive (or is truncated).
    """
    archive, target = Path(archive), Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, target)
            logger.info("extracting %d entries of %s into %s", len(members), archive, target)
            tar.extractall(target, members=members, filter="data")
    except (tarfile.ReadError, EOFError) as error:
        raise ValueError(f"{archive}: not a readable tar archive ({error})") from None
    return sorted({PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts})


def fetch_dataset(
    files: Sequence[RemoteFile],
    directory: str | os.PathLike[str],
    *,
    byte_progress_for: Callable[[RemoteFile], ByteProgress | None] | None = None,
    keep_archives: bool = True,
) -> Path:
    """Download (resuming, verifying) and unpack ``files`` into ``directory``.

    Args:
        byte_progress_for: given each file, returns its ``byte_progress`` callback (or None).
        keep_archives: keep the verified archives after extraction (a re-run then skips the
            download); False deletes them.

    An archive whose extraction finished is remembered by a ``.<name>.extracted`` marker, so
    running again only does what is left.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for remote in files:
        marker = directory / f".{remote.filename}.extracted"
        if remote.extract and marker.exists():
            logger.info("%s was already extracted in %s", remote.filename, directory)
            continue
        path = download_file(remote.url, directory / remote.filename, md5=remote.md5, sha256=remote.sha256,
                             byte_progress=byte_progress_for(remote) if byte_progress_for else None)
        if remote.extract:
            extract_archive(path, directory)
            marker.write_text(remote.md5 or remote.sha256 or "", encoding="utf-8")
            if not keep_archives:
                path.unlink()
    return directory
