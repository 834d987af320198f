"""The paper's Figure 3 as a matplotlib figure: for each class, rows of

    input with box | prototype | training image with box | activation map | similarity | weight | points

and the class's total. Built on :class:`matplotlib.figure.Figure` directly (no pyplot, so no
global backend or figure state is touched); save it with ``fig.savefig(path)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

COLUMNS = ("Input, box", "Prototype", "Training image", "Activation map", "Similarity", "Weight", "Points")


def _show(ax: Any, picture: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if picture is None:
        ax.text(0.5, 0.5, "no picture", ha="center", va="center", fontsize=8, color="0.4", transform=ax.transAxes)
        for spine in ax.spines.values():
            spine.set_color("0.8")
    else:
        ax.imshow(picture)


def _text(ax: Any, text: str, **kwargs: Any) -> None:
    """Plain text (``parse_math=False``: a class name with ``$`` is not TeX)."""
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, parse_math=False, **kwargs)


def explanation_figure(explanation: Any, classes: Sequence[int] | None = None, max_rows: int = 5) -> Any:
    """Draw ``explanation``'s score sheets.

    Args:
        classes: class indices to draw (default: the explanation's top classes).
        max_rows: rows drawn per class (highest points first); the rest are summed in one line.

    Returns:
        a :class:`matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure

    sheets = [explanation.sheet(k) for k in classes] if classes is not None else list(explanation.classes)
    plan: list[tuple[str, Any, Any]] = []  # (kind, sheet, row)
    for sheet in sheets:
        plan.append(("title", sheet, None))
        plan.append(("columns", sheet, None))
        for row in sheet.rows[:max_rows]:
            plan.append(("row", sheet, row))
        if len(sheet.rows) > max_rows:
            plan.append(("rest", sheet, None))
        plan.append(("total", sheet, None))
    heights = [{"title": 0.45, "row": 1.0, "columns": 0.25}.get(kind, 0.35) for kind, _, _ in plan]
    fig = Figure(figsize=(11.5, 1.35 * sum(heights) + 0.3), layout="constrained")
    grid = fig.add_gridspec(len(plan), len(COLUMNS), height_ratios=heights, width_ratios=[1, 1, 1, 1, 0.7, 0.7, 0.7])
    for r, (kind, sheet, row) in enumerate(plan):
        if kind == "title":
            ax = fig.add_subplot(grid[r, :])
            _text(
                ax,
                f"Evidence for \u201c{sheet.class_name}\u201d: {sheet.logit:.3f} points, probability {100 * sheet.probability:.1f}%",
                fontsize=12,
                fontweight="bold",
            )
            continue
        if kind == "columns":
            for c, title in enumerate(COLUMNS):
                _text(fig.add_subplot(grid[r, c]), title, fontsize=9, color="0.25")
            continue
        if kind == "rest":
            rest = sheet.rows[max_rows:]
            _text(fig.add_subplot(grid[r, :6]), f"... {len(rest)} more prototypes", fontsize=9, color="0.35")
            _text(fig.add_subplot(grid[r, 6]), f"{math.fsum(x.points for x in rest):.3f}", fontsize=9, color="0.35")
            continue
        if kind == "total":
            _text(fig.add_subplot(grid[r, :6]), f"Total points for \u201c{sheet.class_name}\u201d (the class's logit)", fontsize=10)
            _text(fig.add_subplot(grid[r, 6]), f"{sheet.logit:.3f}", fontsize=11, fontweight="bold")
            continue
        match = row.match
        pictures = (
            explanation.input_with_box(match),
            explanation.prototype_picture(match, "patch"),
            explanation.prototype_picture(match, "source"),
            explanation.activation_overlay(match),
        )
        axes = [fig.add_subplot(grid[r, c]) for c in range(len(COLUMNS))]
        for ax, picture in zip(axes[:4], pictures):
            _show(ax, picture)
        colour = "#1a7f37" if row.points >= 0 else "#c9372c"
        _text(axes[4], f"{row.similarity:.3f}", fontsize=10)
        _text(axes[5], f"\u00d7 {row.weight:.3f}", fontsize=10)
        _text(axes[6], f"= {row.points:.3f}", fontsize=10, color=colour, fontweight="bold")
        label = match.label if row.own_class else f"{match.label}\n(negative reasoning)"
        axes[0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center", parse_math=False)
    return fig
