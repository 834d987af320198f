"""The interpretability figures as HTML report sections.

:func:`interpretability_sections` turns the dict :func:`evaluate_interpretability` returns into
:class:`protopnet.explain.html.Section` objects — the API the reports use for extra sections
(``Report.add(section)``, or ``write_analysis_report(..., extra_sections=sections)``). Sections
escape every title, header and cell with ``html.escape`` when rendered, so part names, class
names and reasons from the data cannot inject markup (the Jinja2 template ``section.html`` of
:mod:`protopnet.explain.html`). :func:`interpretability_html` renders them to one HTML fragment.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..explain.html import Section

_LABELS = {
    "consistency": "Part consistency",
    "consistency_fixed_cell": "Part consistency of the best fixed cell (floor)",
    "consistency_fixed_cell_mean": "Part consistency of a fixed cell, averaged over cells",
    "consistency_random_peak": "Part consistency of a random peak (chance)",
    "stability": "Part stability under noise",
    "prototype_localization": "Prototypes on the class-defining part",
    "activation_localization": "Top activations on the class-defining part",
    "deletion_gap": "Deletion gap (evidence vs random masking)",
    "purity": "Nearest-patch class purity",
    "duplicates": "Duplicate prototypes",
}


def _value(value: Any) -> Any:
    return "not measured" if value is None else value


def interpretability_sections(results: Mapping[str, Any], max_prototypes: int | None = None, anchor: str = "interpretability") -> list[Section]:
    """Report sections for ``results`` (the dict :func:`evaluate_interpretability` returns).

    Args:
        max_prototypes: cap on the per-prototype table's rows (None: all).
        anchor: id prefix of the sections.

    Returns:
        The summary table (metric, value, chance where known, what it means), the deletion
        curves, and a per-prototype table — the last two only when measured.
    """
    details = results.get("details", {}) or {}
    definitions = results.get("definitions", {}) or {}
    skipped = results.get("skipped", {}) or {}
    rows = []
    for name, label in _LABELS.items():
        chance = (details.get(name) or {}).get("chance") if not name.startswith("consistency") else None
        if name == "consistency":
            chance = results.get("consistency_random_peak")
        if name == "deletion_gap":
            chance = 0.0
        reason = skipped.get(name)
        meaning = definitions.get(name, "") + (f" — not measured: {reason}" if reason else "")
        rows.append([label, _value(results.get(name)), "" if chance is None else chance, meaning])
    n = results.get("n_images", 0)
    parts = ", ".join(str(p) for p in results.get("parts", [])) or "none"
    sections = [
        Section(
            "Interpretability metrics",
            rows=rows,
            header=["metric", "value", "chance", "what it means"],
            text=f"Measured on {n} images and {results.get('n_prototypes', 0)} prototypes; annotated parts: {parts}.",
            anchor=f"{anchor}-summary",
        )
    ]
    deletion = details.get("deletion")
    if deletion and deletion.get("top") is not None:
        sections.append(
            Section(
                "Deletion curves",
                rows=[[f, t, r] for f, t, r in zip(deletion["fractions"], deletion["top"], deletion["random"])],
                header=["masked fraction", "logit, evidence masked first", "logit, random cells masked"],
                text=(
                    f"Mean logit of the predicted class over {deletion['n']} images as grid cells "
                    f"({deletion['grid'][0]} x {deletion['grid'][1]}) are masked; gap {deletion['gap']:.3f}, "
                    f"positive for {100 * deletion['positive_fraction']:.1f}% of the images."
                ),
                anchor=f"{anchor}-deletion",
            )
        )
    per_rows = _prototype_rows(results)
    if per_rows:
        shown = per_rows if max_prototypes is None else per_rows[: int(max_prototypes)]
        text = None if len(shown) == len(per_rows) else f"The first {len(shown)} of {len(per_rows)} prototypes."
        sections.append(
            Section(
                "Interpretability per prototype",
                rows=shown,
                header=["prototype", "class", "consistent", "most covered part", "its frequency", "stability", "purity", "on the part", "duplicate of"],
                text=text,
                anchor=f"{anchor}-prototypes",
            )
        )
    return sections


def _prototype_rows(results: Mapping[str, Any]) -> list[list[Any]]:
    details = results.get("details", {}) or {}
    names = (results.get("prototypes") or {}).get("class_name") or []
    if not names:
        return []
    consistency = details.get("consistency") or {}
    stability = (details.get("stability") or {}).get("per_prototype")
    purity = (details.get("purity") or {}).get("per_prototype")
    localized = (details.get("prototype_localization") or {}).get("per_prototype")
    duplicate_of = (details.get("duplicates") or {}).get("duplicate_of")

    def pick(values: Any, j: int) -> Any:
        if values is None or j >= len(values) or values[j] is None:
            return ""
        value = values[j]
        return ("yes" if value else "no") if isinstance(value, bool) else value

    rows = []
    for j, name in enumerate(names):
        rows.append([
            j,
            name,
            pick(consistency.get("consistent"), j),
            pick(consistency.get("best_part"), j),
            pick(consistency.get("best_frequency"), j),
            pick(stability, j),
            pick(purity, j),
            pick(localized, j),
            pick(duplicate_of, j),
        ])
    return rows


def interpretability_html(results: Mapping[str, Any], max_prototypes: int | None = None) -> str:
    """The sections of :func:`interpretability_sections`, rendered to one HTML fragment
    (every string from ``results`` escaped with ``html.escape``)."""
    return "\n".join(section.render() for section in interpretability_sections(results, max_prototypes))
