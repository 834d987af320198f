"""Errors raised by the data layer."""

from __future__ import annotations

import os


class BadImageError(ValueError):
    """An image file that cannot be used: missing, empty, not an image, truncated, corrupt, too
    large (decompression bomb), or whose annotation cannot be applied to it.

    The message is one line, ``"<path>: <reason>"``; the parts are kept in :attr:`path` and
    :attr:`reason`.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split()) or "unreadable image"
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # keep (path, reason) when sent between DataLoader worker processes
        return (type(self), (self.path, self.reason))
