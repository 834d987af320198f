"""Measures of interpretability, not only accuracy.

    >>> from protopnet.interpretability import evaluate_interpretability, interpretability_sections
    >>> figures = evaluate_interpretability(model, test_set, train_dataset=train_set)
    >>> figures["consistency"], figures["stability"], figures["deletion_gap"], figures["purity"]
    >>> figures["consistency_fixed_cell"], figures["consistency_random_peak"]   # consistency's floor and chance
    >>> for section in interpretability_sections(figures):   # into any protopnet.explain Report
    ...     report.add(section)

See :mod:`protopnet.interpretability.parts` (consistency and stability, after Huang et al.,
ICCV 2023), :mod:`protopnet.interpretability.baselines` (what a fixed or random peak scores on
the same pictures), :mod:`protopnet.interpretability.deletion` (faithfulness by deletion) and
:mod:`protopnet.interpretability.evaluate` (all figures in one streamed pass).
"""

from .evaluate import DEFINITIONS, METRICS, SCALARS, evaluate_interpretability
from .localization import prototype_localization
from .report import interpretability_html, interpretability_sections

__all__ = [
    "DEFINITIONS",
    "METRICS",
    "SCALARS",
    "evaluate_interpretability",
    "interpretability_html",
    "interpretability_sections",
    "prototype_localization",
]
