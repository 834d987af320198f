"""The one HTML toolkit: Jinja2 templates (``explain/templates/``), one stylesheet, one renderer.

Every report of the package (an explanation, the prototype gallery, pruning, interpretability
metrics, the demo page) is a template rendered by :func:`render`. Autoescaping is on: every value
a template prints is HTML-escaped (``html.escape``, quotes included) unless it is trusted markup —
an :class:`Html` string built here or by a template. A page is self-contained: its CSS is inline
and its pictures are PNG files next to it (:class:`FileImages`) or data URIs (:class:`DataImages`).

Other code adds sections to a page with :class:`Section` — a title, optional plain-text
introduction and a table of plain values (escaped when rendered)::

    report = Report("Prototype gallery")
    report.add(Section("Interpretability metrics", header=["metric", "value"],
                       rows=[["part consistency", 0.83], ["stability", 0.91]]))
    report.write("out/index.html")
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jinja2
from PIL import Image

from ..regions import UPSAMPLING_DESCRIPTION

METHOD_NOTE = f"How the highlighted regions are found: {UPSAMPLING_DESCRIPTION}."


# -- escaping and formatting ---------------------------------------------------------------------

class Html(str):
    """A string of trusted markup; any other ``str`` is escaped when rendered."""

    def __html__(self) -> str:  # what Jinja2 and markupsafe take as already safe
        return str(self)


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` decimals and a real minus sign; anything else as ``str``."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return str(value).replace("-", "\u2212")
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}f}".replace("-", "\u2212")
    return str(value)


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage with ``digits`` decimals; None and NaN as a dash."""
    return "—" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}%"


def cell(value: Any) -> str:
    """A table cell's text: numbers formatted; anything else as it is (escaped when printed)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(value)
    return value


# -- rendering ---------------------------------------------------------------------------------------

def _finalize(value: Any) -> Any:
    # Escape with html.escape (``&quot;``, ``&#x27;``) rather than markupsafe's numeric entities,
    # so every page of the package escapes the same way; trusted markup passes as it is.
    if hasattr(value, "__html__"):
        return value
    return Html(html.escape(str(value), quote=True))


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The Jinja2 environment of the package's templates (autoescaping on)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("protopnet.explain", "templates"),
        autoescape=True,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(fmt=fmt, percent=percent, cell=cell, fsum=math.fsum, basename=lambda p: os.path.basename(str(p)))
    env.globals.update(method_note=METHOD_NOTE, version=_version)
    return env


def render(template: str, **context: Any) -> Html:
    """Render the template ``template`` (a file name under ``explain/templates/``) with
    ``context``; the result is trusted markup."""
    return Html(environment().get_template(template).render(**context))


def _version() -> str:
    from .. import __version__

    return __version__


# -- pictures ----------------------------------------------------------------------------------

class DataImages:
    """Pictures embedded in the page as ``data:image/png;base64,...`` URIs."""

    def picture(self, picture: Image.Image, name: str) -> str:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def file(self, path: str | os.PathLike[str], name: str) -> str:
        with Image.open(path) as image:
            return self.picture(image.convert("RGB"), name)


class FileImages:
    """Pictures written as PNG files under ``root/folder/`` and referenced relatively.

    Names are made by the report code (never from class or file names), so they are safe paths.
    """

    def __init__(self, root: str | os.PathLike[str], folder: str = "images") -> None:
        self.root = Path(root)
        self.folder = folder
        (self.root / folder).mkdir(parents=True, exist_ok=True)

    def _relative(self, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name) or ".." in name:
            raise ValueError(f"unsafe picture name {name!r}")
        return f"{self.folder}/{name}.png" if not name.endswith(".png") else f"{self.folder}/{name}"

    def picture(self, picture: Image.Image, name: str) -> str:
        relative = self._relative(name)
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, format="PNG")
        return relative

    def file(self, path: str | os.PathLike[str], name: str) -> str:
        relative = self._relative(name)
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return relative


# -- sections and pages -------------------------------------------------------------------------

@dataclass
class Section:
    """A titled part of a report: an optional plain-text introduction and a table.

    Attributes:
        title: the heading (escaped).
        rows: table rows; each value is formatted and escaped (wrap trusted markup in
            :class:`Html` to keep it as is).
        header: column titles (escaped), or None.
        text: a paragraph before the table (escaped), or None.
        anchor: the section's id (letters, digits, ``-``, ``_``), or None.
    """

    title: str
    rows: Sequence[Sequence[Any]] = ()
    header: Sequence[str] | None = None
    text: str | None = None
    anchor: str | None = None

    def render(self) -> Html:
        return render("section.html", section=self)


@dataclass
class Report:
    """An HTML page made of blocks: :class:`Section` objects or trusted :class:`Html`."""

    title: str
    subtitle: str | None = None
    blocks: list[Section | Html] = field(default_factory=list)

    def add(self, block: Section | Html) -> "Report":
        if not isinstance(block, (Section, Html)):
            raise TypeError(f"a report block is a Section or Html, got {type(block).__name__} (plain strings would not be escaped)")
        self.blocks.append(block)
        return self

    def render(self) -> str:
        body = [b.render() if isinstance(b, Section) else b for b in self.blocks]
        return str(render("page.html", title=self.title, subtitle=self.subtitle, blocks=body))

    def write(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path
