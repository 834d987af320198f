"""Explanations: local reasoning (paper Figure 3), nearest prototypes and nearest patches
(Figure 5), figures and self-contained HTML reports (Jinja2 templates in ``templates/``, one
stylesheet, rendered by :func:`protopnet.explain.html.render`).

    >>> import protopnet
    >>> e = protopnet.explain(model, "bird.jpg", top_classes=3, top_prototypes=10)
    >>> e.predicted_name, e.classes[0].rows[0].points     # the score sheet of the top class
    >>> e.save_json("out/explanation.json"); e.save_html("out/explanation.html")
    >>> e.to_figure().savefig("out/figure.png")
    >>> from protopnet.explain import explanation_html
    >>> fragment = explanation_html(e)   # verdict and score sheets: an HTML fragment for a page
    >>> from protopnet.explain import analyze, write_analysis_report
    >>> write_analysis_report(analyze(model, {"train": train, "test": test}, k=5), "out/analysis")

``protopnet.explain(model, image, ...)`` is the function :func:`protopnet.explain.local.explain`
(bound by ``protopnet/__init__.py``); import everything else from this package:
``from protopnet.explain import Explanation, analyze``.
"""

from __future__ import annotations

from .analysis import Analysis, analyze
from .boxes import activation_boxes, scale_box
from .html import DataImages, FileImages, Html, Report, Section, render
from .inputs import InputImage
from .local import ClassSheet, Explanation, PrototypeMatch, ScoreRow, build_sheet, explain, nearest_prototypes
from .members import model_members
from .nearest import NearestPatches, TopK, nearest_patches
from .reports import explanation_html, stylesheet, write_analysis_report, write_explanation_html, write_explanation_report, write_pruning_report

__all__ = [
    "Analysis",
    "ClassSheet",
    "DataImages",
    "Explanation",
    "FileImages",
    "Html",
    "InputImage",
    "NearestPatches",
    "PrototypeMatch",
    "Report",
    "ScoreRow",
    "Section",
    "TopK",
    "activation_boxes",
    "analyze",
    "build_sheet",
    "explain",
    "explanation_html",
    "model_members",
    "nearest_patches",
    "nearest_prototypes",
    "render",
    "scale_box",
    "stylesheet",
    "write_analysis_report",
    "write_explanation_html",
    "write_explanation_report",
    "write_pruning_report",
]
