"""Reference points for part consistency: what a prototype that ignores the picture would score.

Consistency (:mod:`protopnet.interpretability.parts`) rewards a prototype whose region covers the
same annotated part in 80% of its class's images. Objects in cropped datasets sit near the centre,
so a "prototype" that always peaks at one position may already pass; and one that peaks anywhere
at random gives chance. :class:`PositionBaselines` measures both on the same test pictures,
through the same code as the real metric: the same part points and visibility
(:meth:`~protopnet.interpretability.parts.PartCounter.encode`), the same region centre
(:func:`~protopnet.interpretability.parts.peak_locations` of the detector's activation map), the
same coverage test (:func:`~protopnet.interpretability.parts.covered_parts`, same half-size) and
the same rule (:func:`~protopnet.interpretability.parts.consistency_from_counts`, same threshold).

**The detector.** A *fixed-position detector* at cell ``g`` of the activation grid (H', W') — the
positions a prototype's peak can take; the latent grid H x W for 1 x 1 prototypes — has the
activation map that is 1 at ``g`` and 0 elsewhere, on every picture. Its region is centred where
that map's bicubic upsampling peaks, exactly as for a real prototype whose map is that one-hot
(inner cells: their centre, e.g. pixel 47 for cell 1 of 7 at 224 px; border cells: pushed towards
the picture's edge by the bicubic kernel's overshoot, pixel 5 for cell 0).

**consistency_fixed_cell** (the floor to beat). One cell ``g*`` for every prototype of every
class: each cell's score is the fraction of evaluated prototypes (those whose class has test
pictures, the real metric's denominator) whose class is consistent at that cell, and ``g*`` is
the best cell (the first in row-major order on ties). This is a model that knows neither the
picture nor the class — the dataset's position prior alone. It is the fair floor because it is
chosen once among H' x W' candidates on all test pictures, so the choice hardly overfits them.
Letting every class pick its own best cell (reported as ``per_class_best``) selects the maximum of
H' x W' noisy estimates on the few test pictures of each class (about 30 on CUB), which rises
above 0.8 by luck alone; it is an optimistic ceiling for position-only prototypes, not a floor.

**consistency_random_peak** (chance). Each prototype's peak is a cell drawn uniformly at random,
independently for every picture; the figure is the expected consistency score. By linearity it
is the mean over evaluated prototypes of the probability that their class's random detector is
consistent. That probability has no closed form once several correlated parts are annotated (one
cell covers several parts at once), so it is **estimated by seeded sampling**: ``draws``
independent assignments of a random cell to every test picture (reproducible from ``seed``);
``standard_error`` is the Monte Carlo error of the mean. The *expected part frequency* under a
random peak is exact (the mean, over the pictures where a part is visible, of the share of cells
whose region covers it — about region area / picture area for a part well inside the picture);
``expected_best_frequency`` reports its best part per prototype, averaged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .parts import THRESHOLD, consistency_from_counts, covered_parts, peak_locations

#: Monte Carlo draws for the random-peak estimate (standard error at most 0.5 / sqrt(draws)).
DRAWS = 1000


def fixed_peaks(grid: tuple[int, int], size: int) -> torch.Tensor:
    """(G, 2) long ``(row, col)`` region centres of the fixed-position detectors, G = H' x W' in
    row-major order: the upsampled peak of each one-hot (H', W') activation map, found by
    :func:`~protopnet.interpretability.parts.peak_locations` as for any prototype."""
    h, w = int(grid[0]), int(grid[1])
    maps = torch.eye(h * w, dtype=torch.float32).view(h * w, h, w)  # (G, H', W') one-hot
    return peak_locations(maps, int(size))


class PositionBaselines:
    """Which parts each fixed-position detector covers in each test picture, fed batch by batch.

    Only one (G, Q) bool array per picture of a prototype's class is kept (CUB-200 test split,
    7 x 7 cells, 15 parts: about 4 MB), so the random peak can be sampled after the pass.

    Args:
        grid: the activation grid (H', W').
        size: the pictures' side in pixels. half_size: the region's half-side (as the real metric).
        prototype_classes: (M,) long, each prototype's class.
    """

    def __init__(self, grid: tuple[int, int], size: int, half_size: int, prototype_classes: torch.Tensor) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.half_size = int(half_size)
        self.peaks = fixed_peaks(self.grid, size)  # (G, 2)
        self.prototype_classes = prototype_classes.detach().cpu().long()  # (M,)
        self._wanted = set(self.prototype_classes.tolist())
        self._covered: dict[int, list[torch.Tensor]] = {}  # class -> [(G, Q_then) bool]
        self._visible: dict[int, list[torch.Tensor]] = {}  # class -> [(Q_then,) bool]

    @property
    def num_cells(self) -> int:
        return self.peaks.shape[0]

    def add(self, labels: torch.Tensor, points: torch.Tensor, visible: torch.Tensor) -> None:
        """Fold in a batch.

        Args:
            labels: (B,) classes. points: (B, Q, 2) part points ``(x, y)`` and visible: (B, Q)
            bool, as :meth:`~protopnet.interpretability.parts.PartCounter.encode` returns them.
        """
        labels = labels.cpu().tolist()
        rows = [b for b, label in enumerate(labels) if int(label) in self._wanted]
        if not rows:
            return
        g, q = self.num_cells, points.shape[1]
        pts = points[rows].cpu()[:, None].expand(len(rows), g, q, 2).reshape(len(rows) * g, q, 2)
        vis = visible[rows].cpu()[:, None].expand(len(rows), g, q).reshape(len(rows) * g, q)
        peaks = self.peaks.repeat(len(rows), 1)  # (R * G, 2), image-major
        covered = covered_parts(peaks, pts, vis, self.half_size).view(len(rows), g, q)  # (R, G, Q)
        for r, b in enumerate(rows):
            label = int(labels[b])
            self._covered.setdefault(label, []).append(covered[r].cpu())
            self._visible.setdefault(label, []).append(visible[b].cpu().bool())

    def _stacked(self, label: int, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N_c, G, Q) covered and (N_c, Q) visible of one class, padded to ``num_parts`` parts
        (the vocabulary grows as names are met: a part unseen so far was not visible)."""
        covered = [_pad_parts(c, num_parts) for c in self._covered[label]]
        visible = [_pad_parts(v, num_parts) for v in self._visible[label]]
        return torch.stack(covered), torch.stack(visible)

    def result(self, num_parts: int, threshold: float = THRESHOLD, draws: int = DRAWS, seed: int = 0) -> dict[str, Any]:
        """The two reference points (JSON-able).

        Args:
            num_parts: Q, the final part vocabulary's size.
            threshold: the consistency threshold (as the real metric's).
            draws: Monte Carlo draws for the random peak. seed: seeds them (per class).

        Returns:
            ``fixed_cell``: ``score`` (None when no prototype's class had pictures), ``cell``
            ``[row, col]`` of the activation grid, ``peak_pixel`` ``[row, col]``, ``per_cell``
            (H' x W' scores), ``per_class_best`` and ``mean_over_cells`` (a cell chosen without
            looking: the mean of ``per_cell``); ``random_peak``: ``score``,
            ``standard_error``, ``draws``, ``expected_best_frequency``, ``method``; and ``grid``,
            ``evaluated_prototypes``.
        """
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        g = self.num_cells
        classes = sorted(self._covered)
        index = {c: i for i, c in enumerate(classes)}
        consistent = torch.zeros(len(classes), g, dtype=torch.bool)  # (C, G) fixed cell
        random_hits = torch.zeros(len(classes), int(draws), dtype=torch.bool)  # (C, T)
        best_frequency = torch.zeros(len(classes), dtype=torch.float64)  # (C,) exact, random peak
        for c in classes:
            covered, visible = self._stacked(c, num_parts)  # (N, G, Q), (N, Q)
            n = covered.shape[0]
            seen = visible.sum(0).double()  # (Q,)
            # fixed cell: every picture's region at the same cell
            consistent[index[c]] = consistency_from_counts(covered.sum(0), seen.expand(g, -1), threshold)[1]
            # random peak: each picture's region at its own uniformly drawn cell, ``draws`` times
            generator = torch.Generator().manual_seed(_class_seed(seed, c))
            cells = torch.randint(0, g, (int(draws), n), generator=generator)  # (T, N)
            counts = covered[torch.arange(n)[None, :], cells].sum(1)  # (T, Q)
            random_hits[index[c]] = consistency_from_counts(counts, seen.expand(int(draws), -1), threshold)[1]
            expected = covered.double().mean(1).sum(0) / seen.clamp(min=1)  # (Q,) exact E[frequency]
            best_frequency[index[c]] = expected.max() if expected.numel() else 0.0

        rows = torch.tensor([index[c] for c in self.prototype_classes.tolist() if c in index], dtype=torch.long)  # (M_eval,)
        out: dict[str, Any] = {"grid": list(self.grid), "evaluated_prototypes": int(rows.numel()), "threshold": float(threshold)}
        if rows.numel() == 0:
            out["fixed_cell"] = {"score": None, "cell": None, "peak_pixel": None, "per_cell": None, "per_class_best": None, "mean_over_cells": None}
            out["random_peak"] = {"score": None, "standard_error": None, "draws": int(draws), "expected_best_frequency": None, "method": "seeded sampling"}
            return out
        per_cell = consistent[rows].double().mean(0)  # (G,) score of one cell for all prototypes
        best = int(per_cell.argmax())  # first maximum
        per_draw = random_hits[rows].double().mean(0)  # (T,) score of each sampled random-peak model
        error = float(per_draw.std(unbiased=True)) / math.sqrt(draws) if draws > 1 else None
        out["fixed_cell"] = {
            "score": float(per_cell[best]),
            "cell": [best // self.grid[1], best % self.grid[1]],
            "peak_pixel": [int(v) for v in self.peaks[best].tolist()],
            "per_cell": [[round(float(v), 6) for v in row] for row in per_cell.view(self.grid).tolist()],
            "per_class_best": float(consistent[rows].any(dim=1).double().mean()),
            "mean_over_cells": float(per_cell.mean()),
        }
        out["random_peak"] = {
            "score": float(per_draw.mean()),
            "standard_error": None if error is None else round(error, 6),
            "draws": int(draws),
            "expected_best_frequency": round(float(best_frequency[rows].mean()), 6),
            "method": "seeded sampling: each picture's peak cell uniform over the activation grid, independently",
        }
        return out


def _pad_parts(tensor: torch.Tensor, num_parts: int) -> torch.Tensor:
    """Pad the last (part) dimension of a bool tensor with False up to ``num_parts``."""
    grow = int(num_parts) - tensor.shape[-1]
    if grow <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(*tensor.shape[:-1], grow)], dim=-1)


def _class_seed(seed: int, label: int) -> int:
    """A seed that is a pure function of ``(seed, class)``: the estimate does not depend on the
    order in which classes were met."""
    state = np.random.SeedSequence([int(seed), 2, int(label)]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])
