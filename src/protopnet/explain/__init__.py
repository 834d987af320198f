"""Explanations: local reasoning (paper Figure 3), nearest prototypes and nearest patches
(Figure 5), figures and self-contained HTML reports.

    >>> import protopnet
    >>> e = protopnet.explain(model, "bird.jpg", top_classes=3, top_prototypes=10)
    >>> e.predicted_name, e.classes[0].rows[0].points     # the score sheet of the top class
    >>> e.save_json("out/explanation.json"); e.save_html("out/explanation.html")
    >>> e.to_figure().savefig("out/figure.png")
    >>> from protopnet.explain import analyze, write_analysis_report
    >>> write_analysis_report(analyze(model, {"train": train, "test": test}, k=5), "out/analysis")

This package is itself callable: ``protopnet.explain(model, image, ...)`` is
:func:`protopnet.explain.local.explain`, so ``protopnet.explain.Explanation`` and friends stay
reachable as attributes of the same object.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .analysis import Analysis, analyze
from .boxes import activation_boxes, scale_box
from .local import ClassSheet, Explanation, InputImage, PrototypeMatch, ScoreRow, build_sheet, explain, model_members, nearest_prototypes
from .nearest import NearestPatches, TopK, nearest_patches
from .report import DataImages, FileImages, Html, Report, Section, write_analysis_report, write_demo_report, write_explanation_html, write_explanation_report

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
    "model_members",
    "nearest_patches",
    "nearest_prototypes",
    "scale_box",
    "write_analysis_report",
    "write_demo_report",
    "write_explanation_html",
    "write_explanation_report",
]


class _CallableModule(types.ModuleType):
    """Lets ``protopnet.explain(model, image)`` call :func:`explain` while ``protopnet.explain``
    remains this package (so ``import protopnet.explain as e`` and ``e.Explanation`` work)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Explanation:
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
