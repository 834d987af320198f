"""Faithfulness by deletion: does hiding what the prototypes point at change the decision?

The deletion protocol (Petsiuk et al., "RISE", BMVC 2018) applied to a ProtoPNet's own
evidence, cell by cell:

* **Evidence map.** For an image predicted as class ``c``, the evidence at patch position ``p`` is
  the most points any prototype connected to ``c`` would earn there,
  ``max_j w[c, j] * sim_j(p)`` over the prototypes with a positive last-layer weight ``w[c, j]``
  (the score sheet's points, paper Figure 3, before the global max-pooling). It is upsampled to
  the picture (bicubic, as :mod:`protopnet.regions`) and averaged over the cells of a
  ``grid`` (by default the model's latent grid H x W, i.e. one cell per latent position's
  stride x stride footprint, so all cells have the same area).
* **Deletion.** Cells are masked in order of decreasing evidence (ties: lower cell index first);
  masked pixels are set to 0 in normalised space, i.e. the dataset's mean colour. The *random*
  baseline masks the same number of cells in a random order (a pure function of the seed and
  the image's dataset index). Both orders are nested, so each curve deletes progressively.
* **Curves.** The predicted class's logit (the class predicted on the intact image), averaged
  over images, at masked fractions ``t / cells`` for ``steps + 1`` evenly spaced counts ``t``.
  A faithful model loses its logit faster when its evidence is masked than when random cells of
  the same area are: the **gap** — the area between the curves,
  ``integral over f of (random(f) - top(f))`` (trapezoid rule) — is positive. Both curves start
  at the intact logit and end at the fully masked one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..runtime import seeded_generator
from .parts import upsample_maps

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..model.protopnet import ProtoPNet

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz


def evidence_maps(groups: Sequence[tuple[int, torch.Tensor]], weight: torch.Tensor, predicted: torch.Tensor, size: int) -> torch.Tensor:
    """The evidence for each image's predicted class, upsampled to the picture.

    Args:
        groups: ``(offset, similarity maps (B, M_i, H_i', W_i'))`` per prototype group (one for a
            ProtoPNet; one per member for an ensemble); prototype j of a group is global index
            ``offset + j``.
        weight: (K, M) last-layer weights (M: all prototypes).
        predicted: (B,) the class whose evidence to map.
        size: the picture side S.

    Returns:
        (B, S, S) float32: ``max_j w[c, j] * sim_j`` over prototypes with ``w[c, j] > 0``, upsampled;
        the max over groups. Zeros for an image whose class has no positive weight.
    """
    out = None
    for offset, sims in groups:
        m = sims.shape[1]
        w = weight[predicted.to(weight.device)][:, offset : offset + m].to(sims.device, torch.float32)  # (B, M_i)
        points = torch.where((w > 0)[:, :, None, None], w[:, :, None, None] * sims.float(), torch.tensor(float("-inf"), device=sims.device))
        best = points.amax(dim=1)  # (B, H', W')
        best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
        up = upsample_maps(best, size)  # (B, S, S)
        out = up if out is None else torch.maximum(out, up)
    assert out is not None
    return out


def cell_ids(size: int, grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(S, S) long: the grid cell of every pixel, ``(y * gh // S) * gw + x * gw // S``."""
    gh, gw = int(grid[0]), int(grid[1])
    coords = torch.arange(int(size), device=device)
    rows = coords * gh // int(size)  # (S,)
    cols = coords * gw // int(size)
    return rows[:, None] * gw + cols[None, :]


def cell_scores(maps: torch.Tensor, ids: torch.Tensor, cells: int) -> torch.Tensor:
    """(B, S, S) maps -> (B, cells) mean value over each cell's pixels."""
    flat_ids = ids.flatten()  # (S*S,)
    sums = torch.zeros(maps.shape[0], cells, device=maps.device).index_add_(1, flat_ids, maps.flatten(1).float())
    counts = torch.bincount(flat_ids, minlength=cells).clamp(min=1).to(sums)
    return sums / counts


def rank_of_cells(order: torch.Tensor) -> torch.Tensor:
    """(B, cells) deletion orders (permutations) -> (B, cells) position of each cell in its order."""
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return ranks


def deletion_mask(ranks: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    """(B, S, S) bool: the pixels of the first ``count`` cells of each image's order."""
    return ranks[:, ids] < int(count)  # (B, S, S)


def deletion_counts(cells: int, steps: int) -> list[int]:
    """The masked cell counts: ``steps + 1`` evenly spaced counts from 0 to ``cells`` (rounded,
    duplicates dropped)."""
    return sorted({int(round(cells * i / max(1, int(steps)))) for i in range(int(steps) + 1)})


class DeletionCurves:
    """Running sums of the deletion curves, fed batch by batch.

    Args:
        size: the picture side S.
        grid: (gh, gw) cells.
        steps: the curves have ``steps + 1`` points (fewer when the grid has fewer cells).
        seed: the random baseline's seed.
    """

    def __init__(self, size: int, grid: tuple[int, int], steps: int = 10, seed: int = 0) -> None:
        self.size = int(size)
        self.grid = (int(grid[0]), int(grid[1]))
        self.cells = self.grid[0] * self.grid[1]
        self.counts = deletion_counts(self.cells, steps)
        self.fractions = np.asarray([c / self.cells for c in self.counts], dtype=np.float64)
        self.seed = int(seed)
        self.top = np.zeros(len(self.counts))
        self.random = np.zeros(len(self.counts))
        self.n = 0
        self.positive = 0
        self._ids: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, model: ProtoPNet | Ensemble, images: torch.Tensor, logits: torch.Tensor, groups: Sequence[tuple[int, torch.Tensor]], weight: torch.Tensor, indices: torch.Tensor) -> None:
        """Fold in a batch.

        Args:
            model: the model (called on masked copies of ``images``).
            images: (B, 3, S, S) normalised images. logits: (B, K) their logits.
            groups, weight: see :func:`evidence_maps`.
            indices: (B,) dataset indices (seed the random orders).
        """
        b = images.shape[0]
        device = images.device
        if self._ids is None or self._ids.device != device:
            self._ids = cell_ids(self.size, self.grid, device)
        ids = self._ids
        predicted = logits.argmax(dim=1)  # (B,)
        evidence = evidence_maps(groups, weight, predicted, self.size)  # (B, S, S)
        scores = cell_scores(evidence, ids, self.cells)  # (B, cells)
        top_order = torch.sort(-scores, dim=1, stable=True).indices  # (B, cells) most evidence first
        random_order = torch.stack([torch.randperm(self.cells, generator=seeded_generator(self.seed, 2, int(i))) for i in indices.tolist()]).to(device)
        ranks = torch.cat([rank_of_cells(top_order), rank_of_cells(random_order)])  # (2B, cells)
        doubled = torch.cat([images, images])  # (2B, 3, S, S)
        rows = torch.arange(b, device=device)
        top = np.zeros((len(self.counts), b))
        rnd = np.zeros((len(self.counts), b))
        full = None
        for step, count in enumerate(self.counts):
            if count == 0:
                value = logits[rows, predicted].float().cpu().numpy()
                top[step], rnd[step] = value, value
                continue
            if count == self.cells:  # everything masked: one pass serves both curves
                if full is None:
                    full = model(torch.zeros_like(images)).logits[rows, predicted].float().cpu().numpy()
                top[step], rnd[step] = full, full
                continue
            mask = deletion_mask(ranks, ids, count)  # (2B, S, S)
            out = model(doubled.masked_fill(mask[:, None], 0.0)).logits  # (2B, K)
            value = out[torch.arange(2 * b, device=device), torch.cat([predicted, predicted])].float().cpu().numpy()  # (2B,)
            top[step], rnd[step] = value[:b], value[b:]
        self.top += top.sum(axis=1)
        self.random += rnd.sum(axis=1)
        gaps = _trapezoid(rnd - top, self.fractions, axis=0)  # (B,) each image's own gap
        self.positive += int((gaps > 0).sum())
        self.n += b

    def result(self) -> dict[str, Any]:
        """JSON-able: ``fractions``, ``top`` and ``random`` (mean logits), ``gap`` (area between
        the curves; positive: masking the evidence hurts more), ``positive_fraction`` (images
        whose own gap is positive), ``grid``, ``n``."""
        if self.n == 0:
            return {"fractions": self.fractions.tolist(), "top": None, "random": None, "gap": None, "positive_fraction": None, "grid": list(self.grid), "n": 0}
        top, rnd = self.top / self.n, self.random / self.n
        return {
            "fractions": [round(float(f), 6) for f in self.fractions],
            "top": [round(float(v), 6) for v in top],
            "random": [round(float(v), 6) for v in rnd],
            "gap": float(_trapezoid(rnd - top, self.fractions)),
            "positive_fraction": self.positive / self.n,
            "grid": list(self.grid),
            "n": self.n,
            "fill": "0 in normalised space (the dataset's mean colour)",
        }
