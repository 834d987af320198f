"""The package's HTML reports, each a Jinja2 template of ``explain/templates/`` rendered by
:func:`protopnet.explain.html.render`:

* one explanation (:func:`explanation_html`, a fragment to embed in another page, and
  :func:`write_explanation_report` / :func:`write_explanation_html`, whole pages);
* the prototype gallery of an analysis (:func:`write_analysis_report`);
* the pruning report (:func:`write_pruning_report`).

The demo's page (``protopnet.demo.write_demo_report``) and the interpretability sections
(``protopnet.interpretability.report``) use the same toolkit.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .html import DataImages, FileImages, Html, Report, Section, fmt, render
from .pictures import draw_from_provenance, prototype_image_files

if TYPE_CHECKING:
    from ..prune import PruneReport
    from .analysis import Analysis
    from .local import Explanation, PrototypeMatch

logger = logging.getLogger(__name__)

Images = DataImages | FileImages


# -- the explanation of one image -------------------------------------------------------------------

def _match_id(match: PrototypeMatch) -> str:
    return f"p{match.prototype:05d}" if match.member is None else f"m{match.member:02d}-p{match.prototype:05d}"


def _picture_source(explanation: Explanation, images: Images, prefix: str) -> Callable[[str, PrototypeMatch], str | None]:
    """``picture(kind, match)``: the src of one picture of an explanation's report, made once:
    ``input`` (the input with the match's box), ``activation`` (its activation map on the input)
    or a kind of the prototype's own pictures (``patch``, ``source``, ``overlay``)."""
    cache: dict[tuple[str, Any], str | None] = {}

    def picture(kind: str, match: PrototypeMatch) -> str | None:
        key = (kind, match.key)
        if key not in cache:
            name = f"{prefix}{_match_id(match)}"
            if kind == "input":
                cache[key] = images.picture(explanation.input_with_box(match), f"{name}-input")
            elif kind == "activation":
                cache[key] = images.picture(explanation.activation_overlay(match), f"{name}-activation")
            else:
                path = match.images.get(kind)
                if path is not None:
                    cache[key] = images.file(path, f"{name}-prototype-{kind}")
                else:
                    drawn = explanation.prototype_picture(match, kind)
                    cache[key] = images.picture(drawn, f"{name}-prototype-{kind}") if drawn is not None else None
        return cache[key]

    return picture


def explanation_html(
    explanation: Explanation,
    images: Images | None = None,
    picture_rows: int = 10,
    prefix: str = "",
    *,
    classes: Sequence[int] | None = None,
    summary: bool = True,
    top_prototypes: bool = True,
) -> Html:
    """One explanation as an HTML fragment (no ``<html>``, no stylesheet) to put in a page:
    the verdict, a score sheet per class (prototype, similarity, weight, points, the total) and
    the most activated prototypes. The page that embeds it styles it with :func:`stylesheet`.

    Every string from outside (class names, file names) is escaped; the fragment has no scripts.

    Args:
        images: where the pictures go: :class:`DataImages` (the default: embedded as data URIs,
            so the fragment stands alone) or :class:`FileImages` (PNG files next to the page).
        picture_rows: rows of each score sheet drawn with pictures; the others are listed as
            text under "more prototypes".
        prefix: prepended to element ids and picture names (several explanations in one page).
        classes: the class indices whose score sheets to show (default: every sheet of the
            explanation, most probable first); ``[explanation.predicted]`` gives the predicted
            class's sheet alone.
        summary: include the verdict (the input picture, the predicted class, the class table).
        top_prototypes: include the most activated prototypes.
    """
    images = images if images is not None else DataImages()
    picture = _picture_source(explanation, images, prefix)
    sheets = explanation.classes if classes is None else [explanation.sheet(int(k)) for k in classes]
    for sheet in sheets:
        explanation.compute_boxes(row.match for row in sheet.rows[:picture_rows])
    if top_prototypes and explanation.top_prototypes:
        explanation.compute_boxes(explanation.top_prototypes)
    input_src = images.picture(explanation.input.picture, f"{prefix}input") if summary else None
    return render(
        "explanation.html", explanation=explanation, prefix=prefix, picture=picture, picture_rows=picture_rows,
        input_src=input_src, sheets=sheets, summary=summary, top=top_prototypes,
    )


def stylesheet() -> str:
    """The one stylesheet of every report (the CSS the pages inline), for pages that embed
    :func:`explanation_html` fragments."""
    from .html import environment

    return environment().loader.get_source(environment(), "style.css")[0]  # type: ignore[union-attr]


def how_to_read() -> Html:
    """The "How to read this" note of explanation pages."""
    return render("how_to_read.html")


def explanation_report(explanation: Explanation, images: Images, picture_rows: int = 10, title: str | None = None) -> Report:
    """A :class:`Report` of one explanation."""
    name = explanation.class_names[explanation.predicted]
    source = explanation.input.path
    report = Report(title or f"Why the model thinks this is “{name}”", subtitle=os.path.basename(source) if source else None)
    report.add(explanation_html(explanation, images, picture_rows))
    report.add(how_to_read())
    return report


def write_explanation_html(explanation: Explanation, path: str | os.PathLike[str], picture_rows: int = 10) -> Path:
    """One self-contained HTML file (pictures as data URIs)."""
    return explanation_report(explanation, DataImages(), picture_rows).write(path)


def write_explanation_report(explanations: Sequence[Explanation], directory: str | os.PathLike[str], picture_rows: int = 10, figure: bool = False) -> Path:
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
    rows, entries = [], []
    for i, explanation in enumerate(explanations, start=1):
        stem = Path(explanation.input.path).stem if explanation.input.path else "image"
        sub = f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:60] or 'image'}"
        _write_one(explanation, directory / sub, picture_rows, figure)
        name = explanation.class_names[explanation.predicted]
        prob = float(explanation.probabilities[explanation.predicted])
        entries.append({"directory": sub, "input": explanation.input.path, "class_name": name, "probability": prob})
        rows.append({"thumb": f"{sub}/images/input.png", "file": os.path.basename(explanation.input.path or sub),
                     "class_name": name, "probability": prob, "directory": sub})
    report = Report(f"Why the model classified {len(explanations)} images as it did")
    report.add(render("explanation_index.html", rows=rows))
    report.add(how_to_read())
    (directory / "explanations.json").write_text(json.dumps({"explanations": entries}, indent=1) + "\n", encoding="utf-8")
    return report.write(directory / "index.html")


def _write_one(explanation: Explanation, directory: Path, picture_rows: int, figure: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    explanation.save_json(directory / "explanation.json")
    explanation_report(explanation, FileImages(directory), picture_rows).write(directory / "index.html")
    if figure:
        fig = explanation.to_figure()
        fig.savefig(directory / "figure.png", dpi=110)


# -- the global analysis ------------------------------------------------------------------------

def write_analysis_report(
    analysis: Analysis,
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
    from ..visualize import crop_box, draw_box

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
    train = analysis.datasets.get("train")
    proto_src: dict[int, dict[str, str | None]] = {}
    for j in range(len(classes)):
        found = prototype_image_files(provenance[j] if j < len(provenance) else None, getattr(model, "source_directory", None))
        entry: dict[str, str | None] = {}
        for kind in ("patch", "source"):
            if kind in found:
                entry[kind] = images.file(found[kind], f"prototypes/p{j:05d}-{kind}")
        if len(entry) < 2 and j < len(provenance) and train is not None:
            for kind, drawn in draw_from_provenance(provenance[j], train).items():
                if kind in ("patch", "source"):
                    entry.setdefault(kind, images.picture(drawn, f"prototypes/p{j:05d}-{kind}"))
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

    groups = []
    for k, name in enumerate(names):
        members = [j for j, c in enumerate(classes) if c == k]
        if members:
            cards = [{"j": j, "patch": proto_src[j].get("patch"), "source": proto_src[j].get("source"),
                      "purity": [(split, purity[split][j]) for split in splits]} for j in members]
            groups.append({"index": k, "name": name, "cards": cards})
    details = []
    for j, k in enumerate(classes):
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
                srcs = patch_src.get((split, j, slot))
                distance = float(nearest.distances[j, slot])
                path = dataset.path(index) if hasattr(dataset, "path") else str(index)
                figures.append({"slot": slot, "label": label, "label_name": names[label], "same": label == k, "distance": distance,
                                "patch": srcs[0] if srcs else None, "image": srcs[1] if srcs else None,
                                "tip": f"{path} — distance {fmt(distance)}"})
            columns.append({"split": split, "purity": purity[split][j], "figures": figures})
        details.append({"j": j, "class_index": k, "class_name": names[k], "patch": proto_src[j].get("patch"), "columns": columns})

    report = Report(title or "Prototype gallery", subtitle=f"{len(classes)} prototypes, {len(names)} classes, {analysis.k} nearest patches per prototype")
    report.add(render(
        "gallery.html", k=analysis.k, groups=groups, details=details,
        splits=[{"name": split, "scanned": analysis.splits[split].scanned, "mean_purity": analysis.mean_purity(split)} for split in splits],
    ))
    for section in extra_sections:
        report.add(section)
    (directory / "analysis.json").write_text(json.dumps(analysis.to_json(), indent=1) + "\n", encoding="utf-8")
    return report.write(directory / "index.html")


# -- pruning ----------------------------------------------------------------------------------------

def render_pruning_report(report: PruneReport, *, dataset: Any = None, source_directory: str | os.PathLike[str] | None = None) -> str:
    """The pruning report as one self-contained HTML page (pictures as data URIs, every string
    escaped): the rule, the accuracy before and after, each pruned prototype with its nearest
    training patches (when ``dataset`` is given) and the kept prototypes."""
    from PIL import Image

    from ..checkpoint import CheckpointError, read_metadata
    from ..prune import REFERENCE_K, REFERENCE_THRESHOLD
    from ..visualize import crop_box

    images = DataImages()
    cache: dict[int, Any] = {}

    def patch_picture(row: dict[str, Any]) -> str | None:
        if dataset is None or row.get("box") is None:
            return None
        index = row["dataset_index"]
        try:
            if index not in cache:
                cache[index] = dataset.load_image(index).convert("RGB")
            crop = crop_box(cache[index], row["box"]).resize((64, 64), Image.Resampling.NEAREST)
        except (OSError, ValueError) as error:
            logger.warning("pruning report: cannot read %s (%s)", row["path"], error)
            return None
        return images.picture(crop, "patch")

    def own_picture(j: int) -> str | None:
        if source_directory is None:
            return None
        try:
            provenance = (read_metadata(source_directory).get("provenance") or [])[j]
            path = prototype_image_files(provenance, source_directory).get("patch")
            return images.file(path, f"prototype-{j}") if path is not None else None
        except (CheckpointError, OSError, IndexError, ValueError):
            return None

    rule = report.to_json()["rule"]["description"]
    page = Report("Prototype pruning")
    page.add(render(
        "pruning.html", report=report, rule=rule[:1].upper() + rule[1:], reference_k=REFERENCE_K,
        reference_threshold=REFERENCE_THRESHOLD, own_picture=own_picture, patch_picture=patch_picture,
    ))
    return page.render()


def write_pruning_report(report: PruneReport, directory: str | os.PathLike[str], *, dataset: Any = None,
                         source_directory: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Write ``pruning.json`` and ``pruning.html`` into ``directory``; returns their paths."""
    from ..atomic_files import atomic_write_json, atomic_write_text

    directory = Path(directory)
    json_path, html_path = directory / "pruning.json", directory / "pruning.html"
    atomic_write_json(json_path, report.to_json())
    atomic_write_text(html_path, render_pruning_report(report, dataset=dataset, source_directory=source_directory))
    return json_path, html_path
