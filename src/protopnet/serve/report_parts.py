"""The pieces of the HTML reports that the server's pages embed, taken from the report code
itself (never redrawn here): an explanation's blocks, the reports' stylesheet, and the files of a
prototype's pictures.

The report code is moving onto Jinja2 templates (``protopnet.explain.reports``: an
``explanation_html`` fragment and one ``stylesheet``); until that lands, the same blocks come from
``protopnet.explain.report``. This module is the one place that knows which is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def explanation_fragment(explanation: Any, picture_rows: int = 10) -> str:
    """The explanation as ``protopnet explain``'s page shows it (verdict, score sheets, most
    activated prototypes, how to read it), as HTML to put inside a page, pictures embedded."""
    try:
        from ..explain.reports import explanation_html, how_to_read
    except ImportError:
        from ..explain.report import DataImages, explanation_report

        report = explanation_report(explanation, DataImages(), picture_rows)
        return "\n".join(block.render() if hasattr(block, "render") else str(block) for block in report.blocks)
    return str(explanation_html(explanation, picture_rows=picture_rows)) + "\n" + str(how_to_read())


def stylesheet() -> str:
    """The CSS of the reports."""
    try:
        from ..explain.reports import stylesheet as report_stylesheet
    except ImportError:
        from ..explain.report import CSS

        return CSS
    return report_stylesheet()


def prototype_files(provenance: dict[str, Any] | None, directory: Any) -> dict[str, Path]:
    """kind (``patch``, ``source``, ``overlay``) -> the prototype's picture file in its model
    directory (paths outside the directory refused)."""
    try:
        from ..explain.pictures import prototype_image_files
    except ImportError:
        from ..explain.local import prototype_image_files
    return prototype_image_files(provenance, directory)
