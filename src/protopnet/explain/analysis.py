"""Global analysis of a model over datasets: every prototype's nearest patches in each split and
their class purity (paper Section 3, Figure 5b)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from ..regions import UPSAMPLING_DESCRIPTION
from .nearest import NearestPatches, nearest_patches

if TYPE_CHECKING:
    from ..model import ProtoPNet
    from ..runtime import ProgressBars

logger = logging.getLogger(__name__)

FORMAT = "protopnet-analysis"
FORMAT_VERSION = 1


@dataclass(eq=False)
class Analysis:
    """Nearest patches of every prototype in several dataset splits.

    Attributes:
        model: the analysed ProtoPNet.
        splits: split name ("train", "test") -> :class:`NearestPatches`.
        datasets: split name -> the dataset scanned (to draw the patches).
        k: patches per prototype.
    """

    model: ProtoPNet
    splits: dict[str, NearestPatches]
    datasets: dict[str, Any]
    k: int
    percentile: float = 95.0
    _boxes: dict[str, Any] = field(default_factory=dict, repr=False)

    def purity(self, split: str) -> list[float]:
        """(M,) class purity of each prototype's nearest patches in ``split`` (NaN: none)."""
        return self.splits[split].purity().tolist()

    def mean_purity(self, split: str) -> float:
        values = [p for p in self.purity(split) if not math.isnan(p)]
        return sum(values) / len(values) if values else float("nan")

    def boxes(self, split: str) -> Any:
        """(M, k, 4) boxes of the nearest patches of ``split`` (computed once)."""
        if split not in self._boxes:
            self._boxes[split] = self.splits[split].boxes(self.percentile)
        return self._boxes[split]

    def to_json(self) -> dict[str, Any]:
        """JSON-able: per split, per prototype, its purity and nearest patches (nearest first,
        boxes in the dataset pictures' pixels, exclusive ends)."""
        names = list(self.model.class_names)
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "k": self.k,
            "class_names": names,
            "prototype_classes": self.model.prototype_classes.tolist(),
            "upsampling": UPSAMPLING_DESCRIPTION,
            "box_percentile": self.percentile,
            "splits": {
                split: {
                    "mean_purity": _none_if_nan(self.mean_purity(split)),
                    "images_scanned": nearest.scanned,
                    "image_size": nearest.image_size,
                    "prototypes": nearest.to_json(self.datasets.get(split), names, self.percentile, self.boxes(split) if nearest.activations is not None else None),
                }
                for split, nearest in self.splits.items()
            },
        }


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def analyze(
    model: ProtoPNet,
    datasets: Mapping[str, Any],
    k: int = 5,
    *,
    limit: int | None = None,
    progress_bars: ProgressBars | None = None,
    **scan: Any,
) -> Analysis:
    """Scan each dataset (e.g. ``{"train": ..., "test": ...}``) for the ``k`` nearest patches of
    every prototype.

    Args:
        limit: scan only the first ``limit`` images of each dataset (a quick look).
        progress_bars: ``(description, total) -> bar`` (:data:`protopnet.runtime.ProgressBars`),
            one bar per split, or None.
        scan: passed on to :func:`protopnet.explain.nearest.nearest_patches` (``settings``, a
            :class:`~protopnet.runtime.RunSettings`, or its fields ``batch_size``, ``device``, ...).
    """
    splits = {}
    for split, dataset in datasets.items():
        indices = None if limit is None else range(min(int(limit), len(dataset)))
        total = len(dataset) if indices is None else len(indices)
        if progress_bars is not None:
            with progress_bars(f"analyze {split}", total) as bar:
                splits[split] = nearest_patches(model, dataset, k, indices=indices, progress=bar.update, **scan)
        else:
            splits[split] = nearest_patches(model, dataset, k, indices=indices, **scan)
        logger.info("%s: mean purity of the %d nearest patches %.3f", split, k, _mean(splits[split]))
    return Analysis(model, splits, dict(datasets), k)


def _mean(nearest: NearestPatches) -> float:
    values = [p for p in nearest.purity().tolist() if not math.isnan(p)]
    return sum(values) / len(values) if values else float("nan")
