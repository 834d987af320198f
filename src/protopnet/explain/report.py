"""Self-contained HTML reports a non-programmer can read.

A report is one HTML file with its CSS inline and no network fetches; its pictures are either PNG
files in an ``images/`` folder next to it (:class:`FileImages`) or embedded as data URIs
(:class:`DataImages`). Every string that comes from outside (class names, file names, section
titles and cells) is HTML-escaped; only markup built in this module is trusted (:class:`Html`).

Other code adds sections to a report with :class:`Section` — a title, optional plain-text
introduction and a table of plain values (escaped here)::

    report = Report("Prototype gallery")
    report.add(Section("Interpretability metrics", header=["metric", "value"],
                       rows=[["part consistency", 0.83], ["stability", 0.91]]))
    report.write("out/index.html")

:func:`write_analysis_report` takes such sections as ``extra_sections``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from ..regions import UPSAMPLING_DESCRIPTION

logger = logging.getLogger(__name__)


# -- escaping ----------------------------------------------------------------------------------

class Html(str):
    """A string of trusted markup (built here); any other ``str`` is escaped when rendered."""


def esc(value: Any) -> Html:
    """HTML-escape ``value`` (any object, via ``str``), quotes included; :class:`Html` passes."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` decimals and a real minus sign; anything else as ``str``."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, (int,)):
        return str(value).replace("-", "\u2212")
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}f}".replace("-", "\u2212")
    return str(value)


def percent(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def cell(value: Any) -> Html:
    """A table cell's content: numbers formatted, strings escaped, :class:`Html` kept."""
    if isinstance(value, Html):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return esc(fmt(value))
    return esc(value)


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


def img(src: str | None, alt: str, css: str = "pic", title: str | None = None) -> Html:
    """An ``<img>`` (or a grey placeholder when ``src`` is None); ``alt`` and ``title`` escaped."""
    if src is None:
        return Html(f'<div class="{css} missing" role="img" aria-label="{esc(alt)}">no picture</div>')
    tip = f' title="{esc(title)}"' if title else ""
    return Html(f'<img class="{css}" src="{esc(src)}" alt="{esc(alt)}"{tip}>')


# -- sections and reports -------------------------------------------------------------------------

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
        anchor = f' id="{esc(self.anchor)}"' if self.anchor else ""
        parts = [f'<section class="extra"{anchor}>', f"<h2>{esc(self.title)}</h2>"]
        if self.text:
            parts.append(f"<p>{esc(self.text)}</p>")
        if self.rows or self.header:
            parts.append('<table class="data">')
            if self.header:
                parts.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in self.header) + "</tr></thead>")
            parts.append("<tbody>")
            for row in self.rows:
                parts.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>")
            parts.append("</tbody></table>")
        parts.append("</section>")
        return Html("\n".join(parts))


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
        body = "\n".join(b.render() if isinstance(b, Section) else b for b in self.blocks)
        subtitle = f'<p class="subtitle">{esc(self.subtitle)}</p>' if self.subtitle else ""
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            # No fetches of any kind: everything is inline or a file next to the page.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'\">\n"
            f"<title>{esc(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<header><h1>{esc(self.title)}</h1>{subtitle}</header>\n{body}\n"
            f"<footer>Made by protopnet {esc(_version())}.</footer>\n</main>\n</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path


def _version() -> str:
    from .. import __version__

    return __version__


METHOD_NOTE = f"How the highlighted regions are found: {UPSAMPLING_DESCRIPTION}."

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; --good: #1a7f37; --bad: #c9372c; --accent: #0b5cad; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--ink); background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 40px; }
header h1 { font-size: 26px; margin: 0 0 4px; }
.subtitle { color: var(--muted); margin: 0 0 18px; }
h2 { font-size: 20px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 18px 0 6px; }
p { margin: 6px 0 10px; }
a { color: var(--accent); }
.note { background: var(--bg); border-left: 4px solid var(--accent); padding: 8px 14px; color: var(--muted); }
.summary { display: flex; gap: 28px; align-items: flex-start; flex-wrap: wrap; }
.summary > div:last-child { flex: 1; min-width: 320px; }
.verdict { font-size: 18px; }
.verdict strong { font-size: 22px; }
table { border-collapse: collapse; margin: 8px 0 14px; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: middle; }
th { background: var(--bg); font-weight: 600; font-size: 13px; color: var(--muted); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.negative td.points { color: var(--bad); }
tr.positive td.points { color: var(--good); }
td.points { font-weight: 700; }
tr.total td { border-top: 2px solid var(--ink); border-bottom: none; font-weight: 700; }
td.words { max-width: 300px; }
.tag { display: inline-block; font-size: 11px; padding: 1px 6px; border-radius: 8px; background: #fde7e4; color: var(--bad); margin-left: 4px; white-space: nowrap; }
img.pic, div.pic { width: 104px; height: 104px; object-fit: contain; border: 1px solid var(--line); border-radius: 4px; background: #fff; display: block; }
img.big, div.big { width: 224px; height: 224px; object-fit: contain; border: 1px solid var(--line); border-radius: 4px; display: block; }
img.small, div.small { width: 76px; height: 76px; object-fit: contain; border: 1px solid var(--line); border-radius: 3px; display: block; }
.missing { display: flex !important; align-items: center; justify-content: center; color: var(--muted); font-size: 12px; background: var(--bg) !important; }
details { margin: 4px 0 14px; }
summary { cursor: pointer; color: var(--accent); }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px; width: 236px; background: #fff; }
.card .pics { display: flex; gap: 6px; }
.card p { margin: 6px 0 0; font-size: 13px; }
.strip { display: flex; flex-wrap: wrap; gap: 8px; margin: 4px 0 10px; }
.strip figure { margin: 0; width: 84px; font-size: 11px; color: var(--muted); }
.strip figcaption { overflow-wrap: anywhere; }
.strip figure.other img { border: 2px solid var(--bad); }
.strip figure.same img { border: 2px solid var(--good); }
.purity-bar { display: block; height: 6px; background: #eee; border-radius: 3px; margin-top: 3px; overflow: hidden; }
.purity-bar span { display: block; height: 100%; background: var(--good); }
.proto-detail { border-top: 1px solid var(--line); padding-top: 6px; }
.proto-detail .head { display: flex; gap: 14px; align-items: center; }
.splits { display: flex; flex-wrap: wrap; gap: 8px 40px; }
.splits p { margin: 6px 0 2px; }
table.totals { width: 100%; }
table.totals td.num { text-align: right; }
.proto-detail .back { font-size: 12px; margin: 0 0 8px; }
h2.demo-image { font-size: 22px; margin-top: 56px; border-bottom: 3px solid var(--accent); }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 8px; }
"""


# -- the explanation of one image -------------------------------------------------------------------

def _proto_name(match: Any) -> str:
    return match.label


def _match_id(match: Any) -> str:
    return f"p{match.prototype:05d}" if match.member is None else f"m{match.member:02d}-p{match.prototype:05d}"


def explanation_blocks(explanation: Any, images: Any, picture_rows: int = 10, prefix: str = "") -> list[Html]:
    """The blocks of an explanation's report: the verdict, one score sheet per top class, the most
    activated prototypes, and how to read it.

    Args:
        images: a :class:`FileImages` or :class:`DataImages`.
        picture_rows: rows of each score sheet drawn with pictures; the others are listed as text
            under "more prototypes".
        prefix: prepended to picture names (several explanations in one folder).
    """
    cache: dict[tuple[str, Any], str | None] = {}

    def picture(kind: str, match: Any) -> str | None:
        key = (kind, match.key)
        if key not in cache:
            if kind == "input":
                cache[key] = images.picture(explanation.input_with_box(match), f"{prefix}{_match_id(match)}-input")
            elif kind == "activation":
                cache[key] = images.picture(explanation.activation_overlay(match), f"{prefix}{_match_id(match)}-activation")
            else:
                path = match.images.get(kind)
                name = f"{prefix}{_match_id(match)}-prototype-{kind}"
                if path is not None:
                    cache[key] = images.file(path, name)
                else:
                    drawn = explanation.prototype_picture(match, kind)
                    cache[key] = images.picture(drawn, name) if drawn is not None else None
        return cache[key]

    names = explanation.class_names
    predicted = explanation.predicted
    blocks: list[Html] = []
    source = explanation.input.path
    input_src = images.picture(explanation.input.picture, f"{prefix}input")
    pred_name = esc(names[predicted])
    prob = percent(float(explanation.probabilities[predicted]))
    top_rows = "".join(
        f'<tr><td><a href="#{prefix}class-{s.class_index}">{esc(s.class_name)}</a></td>'
        f'<td class="num">{percent(s.probability)}</td><td class="num">{esc(fmt(s.logit))}</td></tr>'
        for s in explanation.classes
    )
    file_line = f"<p>Image: <code>{esc(os.path.basename(source))}</code></p>" if source else ""
    blocks.append(
        Html(
            f'<section class="summary" id="{prefix}summary">'
            f'<div>{img(input_src, "the image that was classified", "big")}</div>'
            f'<div>{file_line}<p class="verdict">The model says: <strong class="predicted-class">{pred_name}</strong> '
            f"({prob} sure).</p>"
            "<p>It decides by finding parts of the image that look like <em>prototypes</em> — parts of "
            "training images it learned to recognise — and adding up points for each class.</p>"
            f'<table class="top-classes"><thead><tr><th>Class</th><th class="num">Probability</th>'
            f'<th class="num">Total points</th></tr></thead><tbody>{top_rows}</tbody></table></div></section>'
        )
    )

    for sheet in explanation.classes:
        explanation.compute_boxes(row.match for row in sheet.rows[:picture_rows])
        cname = esc(sheet.class_name)
        shown, rest = sheet.rows[:picture_rows], sheet.rows[picture_rows:]
        parts = [
            f'<section class="sheet" id="{prefix}class-{sheet.class_index}" data-class-index="{sheet.class_index}">',
            f"<h2>Score sheet for <q>{cname}</q>: {esc(fmt(sheet.logit))} points ({percent(sheet.probability)})</h2>",
            "<p>Each row is one prototype. <b>Similarity</b> says how closely the boxed part of the image "
            "matches the prototype; the <b>weight</b> says how much that prototype counts for this class; "
            "<b>points = similarity × weight</b>. All the rows add up to the class's total.</p>",
            _sheet_table(sheet, shown, picture, with_pictures=True),
        ]
        if rest:
            subtotal = math.fsum(r.points for r in rest)
            parts.append(
                f"<details><summary>{len(rest)} more prototypes, together {esc(fmt(subtotal))} points</summary>"
                + _sheet_table(sheet, rest, picture, with_pictures=False)
                + "</details>"
            )
        parts.append(
            f'<table class="totals"><tbody><tr class="total"><td>Total for <q>{cname}</q></td>'
            f'<td class="num sheet-total">{esc(fmt(sheet.logit))} points</td></tr></tbody></table></section>'
        )
        blocks.append(Html("\n".join(parts)))

    if explanation.top_prototypes:
        explanation.compute_boxes(explanation.top_prototypes)
        cards = []
        for match in explanation.top_prototypes:
            cards.append(
                '<div class="card top-prototype">'
                f'<div class="pics">{img(picture("input", match), "the image with the most similar part boxed")}'
                f'{img(picture("patch", match), "the prototype")}</div>'
                f"<p><b>{esc(_proto_name(match))}</b><br>similarity {esc(fmt(match.similarity))}</p></div>"
            )
        blocks.append(
            Html(
                f'<section class="top" id="{prefix}top-prototypes"><h2>The prototypes this image activates most</h2>'
                "<p>Over all classes, these prototypes found the most similar parts in the image "
                "(left: the image with the part boxed; right: the prototype).</p>"
                f'<div class="gallery">{"".join(cards)}</div></section>'
            )
        )
    return blocks


def _sheet_table(sheet: Any, rows: Sequence[Any], picture: Any, with_pictures: bool) -> str:
    cname = esc(sheet.class_name)
    head = (
        "<th>This part of the image</th><th>looks like this prototype</th><th>from this training image</th>"
        "<th>Activation map</th>" if with_pictures else "<th>Prototype</th>"
    )
    out = [
        f'<table class="score-sheet" data-class-index="{sheet.class_index}"><thead><tr>{head}'
        '<th>In words</th><th class="num">Similarity</th><th class="num">Weight</th><th class="num">Points</th></tr></thead><tbody>'
    ]
    for row in rows:
        match = row.match
        points = fmt(row.points, 2)
        what = "that prototype" if row.own_class else f"a prototype of <q>{esc(match.class_name)}</q>"
        if row.points >= 0:
            words = f"This part looks like {what} — {esc(fmt(row.points, 2))} points for <q>{cname}</q>."
        else:
            words = f"This part looks like {what} — that takes {esc(fmt(-row.points, 2))} points away from <q>{cname}</q>."
        if not row.own_class:
            words += '<span class="tag">negative reasoning</span>'
        kind = "positive" if row.points >= 0 else "negative"
        if with_pictures:
            pictures = (
                f"<td>{img(picture('input', match), 'the part of the image', title=f'box {match.box}')}</td>"
                f"<td>{img(picture('patch', match), 'the prototype')}</td>"
                f"<td>{img(picture('source', match), 'the training image the prototype comes from')}</td>"
                f"<td>{img(picture('activation', match), 'where the image is similar to the prototype')}</td>"
            )
        else:
            pictures = f"<td>{esc(_proto_name(match))}</td>"
        out.append(
            f'<tr class="score-row {kind}{"" if row.own_class else " other-class"}" data-prototype="{match.prototype}">'
            f"{pictures}<td class=\"words\"><b>{esc(_proto_name(match))}</b><br>{words}</td>"
            f'<td class="num">{esc(fmt(row.similarity))}</td><td class="num">{esc(fmt(row.weight))}</td>'
            f'<td class="num points">{esc(points)}</td></tr>'
        )
    out.append("</tbody></table>")
    return "".join(out)


def _how_to_read() -> Html:
    return Html(
        '<section class="how" id="how-to-read"><h2>How to read this</h2><p class="note">'
        "The model compares every part of the image with each prototype. The activation map shows where "
        "the image is most similar to a prototype (red: most similar); the box marks that region. "
        "Rows marked <span class=\"tag\">negative reasoning</span> use a prototype of another class: "
        "resembling it changes this class's points by its (usually negative) weight. "
        f"{esc(METHOD_NOTE)}</p></section>"
    )


def explanation_report(explanation: Any, images: Any, picture_rows: int = 10, title: str | None = None) -> Report:
    """A :class:`Report` of one explanation."""
    name = explanation.class_names[explanation.predicted]
    source = explanation.input.path
    report = Report(title or f"Why the model thinks this is “{name}”", subtitle=os.path.basename(source) if source else None)
    for block in explanation_blocks(explanation, images, picture_rows):
        report.add(block)
    report.add(_how_to_read())
    return report


def write_explanation_html(explanation: Any, path: str | os.PathLike[str], picture_rows: int = 10) -> Path:
    """One self-contained HTML file (pictures as data URIs)."""
    return explanation_report(explanation, DataImages(), picture_rows).write(path)


def write_explanation_report(explanations: Sequence[Any], directory: str | os.PathLike[str], picture_rows: int = 10, figure: bool = False) -> Path:
    """Write explanations under ``directory``; returns ``directory/index.html``.

    One explanation: ``directory/explanation.json``, ``directory/index.html`` and its pictures in
    ``directory/images/``. Several: each goes to its own sub-directory ``NN-<file stem>/`` laid out
    the same way, and ``directory/index.html`` lists them (picture, predicted class, link);
    ``directory/explanations.json`` lists the sub-directories in input order.

    Args:
        figure: also save the Figure-3-style matplotlib figure as ``figure.png``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if len(explanations) == 1:
        _write_one(explanations[0], directory, picture_rows, figure)
        return directory / "index.html"
    listing, entries = [], []
    for i, explanation in enumerate(explanations, start=1):
        stem = Path(explanation.input.path).stem if explanation.input.path else "image"
        sub = f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:60] or 'image'}"
        _write_one(explanation, directory / sub, picture_rows, figure)
        name = explanation.class_names[explanation.predicted]
        prob = float(explanation.probabilities[explanation.predicted])
        entries.append({"directory": sub, "input": explanation.input.path, "class_name": name, "probability": prob})
        thumb = f"{sub}/images/input.png"
        listing.append(
            f'<tr class="image-row"><td>{img(thumb, "the image")}</td>'
            f"<td><code>{esc(os.path.basename(explanation.input.path or sub))}</code></td>"
            f'<td><b>{esc(name)}</b></td><td class="num">{percent(prob)}</td>'
            f'<td><a href="{esc(sub)}/index.html">see why</a></td></tr>'
        )
    report = Report(f"Why the model classified {len(explanations)} images as it did")
    report.add(
        Html(
            '<section id="images"><table class="data images"><thead><tr><th>Image</th><th>File</th><th>The model says</th>'
            f'<th class="num">Probability</th><th></th></tr></thead><tbody>{"".join(listing)}</tbody></table></section>'
        )
    )
    report.add(_how_to_read())
    (directory / "explanations.json").write_text(json.dumps({"explanations": entries}, indent=1) + "\n", encoding="utf-8")
    return report.write(directory / "index.html")


def _write_one(explanation: Any, directory: Path, picture_rows: int, figure: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    explanation.save_json(directory / "explanation.json")
    explanation_report(explanation, FileImages(directory), picture_rows).write(directory / "index.html")
    if figure:
        fig = explanation.to_figure()
        fig.savefig(directory / "figure.png", dpi=110)


# -- the global analysis ------------------------------------------------------------------------

def write_analysis_report(
    analysis: Any,
    directory: str | os.PathLike[str],
    extra_sections: Iterable[Section] = (),
    title: str | None = None,
) -> Path:
    """Write ``directory/index.html`` (prototype gallery grouped by class with purity, each
    prototype linked to its nearest patches in every split), ``directory/analysis.json`` and the
    pictures in ``directory/images/``. Returns the HTML path.

    Args:
        extra_sections: more :class:`Section` objects (e.g. interpretability metrics), appended.
    """
    from ..visualize import crop_box, draw_box, prototype_pictures

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images = FileImages(directory)
    model = analysis.model
    names = list(model.class_names)
    classes = model.prototype_classes.tolist()
    splits = list(analysis.splits)
    purity = {split: analysis.purity(split) for split in splits}
    boxes = {split: analysis.boxes(split) for split in splits}

    # The prototypes' own pictures: the model directory's files, else redrawn from the train split.
    provenance = getattr(model, "provenance", None) or []
    from .local import prototype_image_files

    train = analysis.datasets.get("train")
    proto_src: dict[int, dict[str, str | None]] = {}
    for j in range(len(classes)):
        found = prototype_image_files(provenance[j] if j < len(provenance) else None, getattr(model, "source_directory", None))
        entry: dict[str, str | None] = {}
        for kind in ("patch", "source"):
            if kind in found:
                entry[kind] = images.file(found[kind], f"prototypes/p{j:05d}-{kind}")
        if len(entry) < 2 and j < len(provenance) and train is not None and provenance[j].get("dataset_index", -1) >= 0:
            try:
                picture = train.load_image(int(provenance[j]["dataset_index"]))
                drawn = prototype_pictures(picture, provenance[j]["activation"], provenance[j]["box"])
                for kind in ("patch", "source"):
                    entry.setdefault(kind, images.picture(drawn[kind], f"prototypes/p{j:05d}-{kind}"))
            except (OSError, ValueError, KeyError) as error:
                logger.warning("cannot draw prototype %d: %s", j, error)
        proto_src[j] = entry

    # The nearest patches' pictures: each dataset image read once.
    patch_src: dict[tuple[str, int, int], tuple[str, str]] = {}
    for split in splits:
        nearest = analysis.splits[split]
        dataset = analysis.datasets[split]
        wanted: dict[int, list[tuple[int, int]]] = {}
        for j in range(nearest.indices.shape[0]):
            for slot in range(nearest.k):
                index = int(nearest.indices[j, slot])
                if index >= 0:
                    wanted.setdefault(index, []).append((j, slot))
        for index, uses in sorted(wanted.items()):
            try:
                picture = dataset.load_image(index)
            except (OSError, ValueError) as error:
                logger.warning("cannot draw nearest patch from %s: %s", dataset.path(index) if hasattr(dataset, "path") else index, error)
                continue
            for j, slot in uses:
                box = [int(v) for v in boxes[split][j, slot]]
                base = f"nearest/{split}/p{j:05d}-{slot}"
                patch_src[(split, j, slot)] = (
                    images.picture(crop_box(picture, box), f"{base}-patch"),
                    images.picture(draw_box(picture, box), f"{base}-image"),
                )

    report = Report(title or "Prototype gallery", subtitle=f"{len(classes)} prototypes, {len(names)} classes, {analysis.k} nearest patches per prototype")
    summary_rows = "".join(
        f'<tr><td>{esc(split)}</td><td class="num">{analysis.splits[split].scanned}</td>'
        f'<td class="num mean-purity">{percent(analysis.mean_purity(split))}</td></tr>'
        for split in splits
    )
    report.add(
        Html(
            '<section id="summary"><p>Each prototype is a part of a training image that the model learned to '
            "look for. Below, the prototypes are grouped by the class they vote for. For each one, the "
            f"<b>purity</b> is the share of its {analysis.k} most similar image parts (nearest patches) that come "
            "from images of its own class: a pure prototype stands for something typical of its class; a prototype "
            "whose nearest patches come from many classes often shows background. Click a prototype to see its "
            "nearest patches.</p>"
            '<table class="data"><thead><tr><th>Data split</th><th class="num">Images scanned</th>'
            f'<th class="num">Mean purity</th></tr></thead><tbody>{summary_rows}</tbody></table>'
            f'<p class="note">{esc(METHOD_NOTE)}</p></section>'
        )
    )

    gallery = ['<section id="gallery"><h2>Prototypes by class</h2>']
    for k, name in enumerate(names):
        members = [j for j, c in enumerate(classes) if c == k]
        if not members:
            continue
        gallery.append(f'<section class="class-group" id="class-{k}"><h3>{esc(name)}</h3><div class="gallery">')
        for j in members:
            stats = []
            for split in splits:
                value = purity[split][j]
                width = 0 if math.isnan(value) else round(100 * value)
                stats.append(
                    f'<p>{esc(split)} purity: <b class="purity" data-split="{esc(split)}">{percent(value)}</b>'
                    f'<span class="purity-bar"><span style="width:{width}%"></span></span></p>'
                )
            gallery.append(
                f'<div class="card prototype-card" data-prototype="{j}">'
                f'<a href="#prototype-{j}"><div class="pics">{img(proto_src[j].get("patch"), f"prototype {j}")}'
                f'{img(proto_src[j].get("source"), f"the training image of prototype {j}")}</div>'
                f"<p><b>Prototype {j}</b></p></a>{''.join(stats)}</div>"
            )
        gallery.append("</div></section>")
    gallery.append("</section>")
    report.add(Html("".join(gallery)))

    details = ['<section id="nearest"><h2>Nearest patches of each prototype</h2>'
               "<p>For each prototype, the image parts most similar to it, most similar first "
               "(green frame: from the prototype's own class; red frame: from another class).</p>"]
    for j, k in enumerate(classes):
        details.append(
            f'<section class="proto-detail" id="prototype-{j}"><div class="head">{img(proto_src[j].get("patch"), f"prototype {j}", "small")}'
            f"<h3>Prototype {j} — class <q>{esc(names[k])}</q></h3></div>"
        )
        columns = []
        for split in splits:
            nearest = analysis.splits[split]
            dataset = analysis.datasets[split]
            figures = []
            for slot in range(nearest.k):
                index = int(nearest.indices[j, slot])
                if index < 0:
                    continue
                label = int(nearest.labels[j, slot])
                same = "same" if label == k else "other"
                srcs = patch_src.get((split, j, slot))
                path = dataset.path(index) if hasattr(dataset, "path") else str(index)
                tip = f"{path} — distance {fmt(float(nearest.distances[j, slot]))}"
                figures.append(
                    f'<figure class="nearest-patch {same}" data-label="{label}">'
                    f'<a href="{esc(srcs[1]) if srcs else "#"}">{img(srcs[0] if srcs else None, f"nearest patch {slot + 1}", "small", title=tip)}</a>'
                    f"<figcaption>{esc(names[label])}<br>d = {esc(fmt(float(nearest.distances[j, slot]), 2))}</figcaption></figure>"
                )
            columns.append(
                f'<div><p>{esc(split)} data — purity <b>{percent(purity[split][j])}</b></p>'
                f'<div class="strip" data-split="{esc(split)}">{"".join(figures)}</div></div>'
            )
        details.append(f'<div class="splits">{"".join(columns)}</div><p class="back"><a href="#class-{k}">back to the gallery</a></p></section>')
    details.append("</section>")
    report.add(Html("".join(details)))
    for section in extra_sections:
        report.add(section)
    (directory / "analysis.json").write_text(json.dumps(analysis.to_json(), indent=1) + "\n", encoding="utf-8")
    return report.write(directory / "index.html")


# -- the demo ---------------------------------------------------------------------------------------

_DEMO_FIGURES = (
    ("test_accuracy", "Test accuracy", percent),
    ("top5", "Top-5 test accuracy", percent),
    ("validation_accuracy", "Validation accuracy", percent),
    ("localization", "Prototypes on the class-defining part", percent),
    ("localization_chance", "… the same for boxes placed at random", percent),
    ("prototypes", "Prototypes", str),
    ("classes", "Classes", str),
    ("train_seconds", "Training time (seconds)", lambda v: f"{float(v):.1f}"),
)


def write_demo_report(
    model: Any,
    dataset: Any,
    indices: Sequence[int],
    directory: str | os.PathLike[str],
    figures: dict[str, Any] | None = None,
    picture_rows: int = 5,
) -> Path:
    """The demo's page, ``directory/index.html``: the run's figures, then the explanation (score
    sheets of the two most probable classes) of each test image ``dataset[i]`` for i in
    ``indices``, with its true class. Each explanation's JSON goes to
    ``directory/explanations/NN.json``. Returns the HTML path."""
    from .local import explain

    directory = Path(directory)
    images = FileImages(directory)
    report = Report("ProtoPNet demo: this looks like that", subtitle="A model trained on the built-in synthetic dataset, explained")
    rows = []
    for key, label, show in _DEMO_FIGURES:
        value = (figures or {}).get(key)
        if value is not None:
            rows.append([label, show(value)])
    if rows:
        report.add(Section("How well it works", rows=rows, header=["", "value"], anchor="figures"))
    names = list(model.class_names)
    for n, index in enumerate(indices, start=1):
        explanation = explain(model, dataset.load_image(int(index)), top_classes=min(2, len(names)), top_prototypes=4)
        explanation.save_json(directory / "explanations" / f"{n:02d}.json")
        truth = names[int(dataset.targets[int(index)])]
        verdict = "right" if explanation.predicted == int(dataset.targets[int(index)]) else "wrong"
        report.add(Html(f'<h2 class="demo-image">Test image {n}: truly <q>{esc(truth)}</q> — the model is {verdict}</h2>'))
        for block in explanation_blocks(explanation, images, picture_rows, prefix=f"image{n}-"):
            report.add(block)
    report.add(_how_to_read())
    report.add(Html('<p class="note">For every prototype\'s nearest training and test patches, run '
                    "<code>protopnet analyze MODEL_DIR --data synthetic --out DIR</code>.</p>"))
    return report.write(directory / "index.html")
