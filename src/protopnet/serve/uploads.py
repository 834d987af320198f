"""Pictures sent to the server: limits, decoding, and a file name that is safe to show.

An upload is bytes, never a path: it is decoded by :func:`protopnet.data.images.open_image` (the
same checks as every dataset image: header size checked before decoding, PIL's decompression-bomb
guard turned into an error, truncated data refused) from a temporary file whose name the server
makes. The client's file name is only ever shown, after :func:`display_name` has cleaned it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import unicodedata
from dataclasses import dataclass

from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and a one-line message for the person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass(frozen=True)
class UploadLimits:
    """How much a single request may send.

    Attributes:
        max_bytes: the largest request body (the picture and the form around it).
        max_pixels: the largest picture, width x height, checked on the header before decoding.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_bytes < 1024:
            raise ValueError(f"max_bytes must be at least 1024, got {self.max_bytes}")
        if self.max_pixels < 64:
            raise ValueError(f"max_pixels must be at least 64, got {self.max_pixels}")


def display_name(filename: str | None, limit: int = 80) -> str | None:
    """The client's file name made safe to show: its last path component only, control and
    format characters removed, at most ``limit`` characters; None when nothing is left."""
    if not filename:
        return None
    base = str(filename).replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    if cleaned in ("", ".", ".."):
        return None
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "\u2026"


def decode_picture(data: bytes, limits: UploadLimits) -> Image.Image:
    """The RGB picture in ``data``.

    Raises:
        RequestError: 400 for an empty body, 413 for too many bytes or pixels (decompression bombs
            included), 415 for anything that is not a readable image (unknown format, truncated or
            corrupt data). The message never names a server path.
    """
    from ..data.errors import BadImageError
    from ..data.images import open_image

    if not data:
        raise RequestError(400, "the picture is empty (0 bytes): choose an image file (JPEG, PNG, ...)")
    if len(data) > limits.max_bytes:
        raise RequestError(413, f"the picture is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    handle, path = tempfile.mkstemp(prefix="protopnet-upload-", suffix=".bin")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        try:
            return open_image(path, max_pixels=limits.max_pixels)
        except BadImageError as error:
            reason = error.reason
            status = 413 if "too large" in reason else 415
            raise RequestError(status, f"not a usable picture: {reason}") from None
    finally:
        try:
            os.unlink(path)
        except OSError as error:  # pragma: no cover - the temporary directory vanished
            logger.warning("cannot remove temporary upload %s: %s", path, error)
