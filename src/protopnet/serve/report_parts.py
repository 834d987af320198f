"""The pieces of the HTML reports that the server's pages embed, taken from the report code
itself (never redrawn here): an explanation's blocks (``protopnet.explain.reports``' Jinja2
``explanation_html`` fragment), the reports' one stylesheet, and the files of a prototype's
pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..explain.pictures import prototype_image_files
from ..explain.reports import explanation_html, how_to_read
from ..explain.reports import stylesheet as report_stylesheet


def explanation_fragment(explanation: Any, picture_rows: int = 10) -> str:
    """The explanation as ``protopnet explain``'s page shows it (verdict, score sheets, most
    activated prototypes, how to read it), as HTML to put inside a page, pictures embedded."""
    return str(explanation_html(explanation, picture_rows=picture_rows)) + "\n" + str(how_to_read())


def stylesheet() -> str:
    """The CSS of the reports."""
    return report_stylesheet()


def prototype_files(provenance: dict[str, Any] | None, directory: Any) -> dict[str, Path]:
    """kind (``patch``, ``source``, ``overlay``) -> the prototype's picture file in its model
    directory (paths outside the directory refused)."""
    return prototype_image_files(provenance, directory)
