"""Which annotated object parts a prototype's activated region covers (Huang et al., ICCV 2023).

Definitions, after Huang et al., "Evaluation and Improvement of Interpretability for
Self-Explainable Part-Prototype Networks" (ICCV 2023) and the authors' evaluation code
(github.com/hqhQAQ/EvalProtoPNet, ``util/eval_interpretability.py``):

* **Activated region.** The prototype's activation (similarity) map on an image, (H', W'), is
  upsampled to the picture's size with bicubic interpolation (the reference uses OpenCV's cubic
  resize; here :data:`protopnet.regions.UPSAMPLING`, as everywhere in protopnet). The region is
  the square of half-side ``half_size`` centred on the pixel of the upsampled map's maximum
  (the first maximum in row-major order), clipped to the picture. The reference uses
  ``half_size = 36`` at 224 x 224 (a 72-pixel square, about a third of the side); at other sizes
  :func:`region_half_size` scales it, ``round(36 * S / 224)``.
* **Covered parts.** Part ``q`` is covered when it is *visible* in the image and its annotated
  point, truncated to whole pixels as the reference does, lies in the region, borders included:
  ``|y - row| <= half_size`` and ``|x - col| <= half_size``. The result is a binary part vector
  per (prototype, image). Points are CUB's 15 part locations (``Annotation.parts``). For data
  annotated with a box for the class-defining part (the built-in synthetic dataset, whose only
  part is the class glyph, ``Annotation.part_box``), the box's *centre* is that part's point,
  named :data:`BOX_PART`: a region covers the glyph when it contains the glyph's centre.
* **Consistency.** Only the images of a prototype's own class count. For each part, the fraction
  of those images where it is visible in which the region covers it; the prototype is
  *consistent* when some part reaches ``threshold`` (0.8). The consistency score is the fraction
  of consistent prototypes (the paper reports it x 100).
* **Stability.** Gaussian noise ``N(0, 0.2^2)``, clipped to ``[-0.25, 0.25]``, is added to the
  *normalised* input (as the reference does); a prototype's stability is the fraction of its
  class's images whose part vector is unchanged by the noise (two empty vectors are unchanged),
  and the stability score is the mean over prototypes. The noise of an image is a pure function
  of ``(seed, dataset index)``, so results do not depend on batching.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..regions import UPSAMPLING, box_center
from ..runtime import seeded_gaussian

REFERENCE_SIZE = 224
REFERENCE_HALF_SIZE = 36
THRESHOLD = 0.8
NOISE_STD = 0.2
NOISE_CLIP = 0.25
#: The name of the part a ``part_box`` annotation stands for (the synthetic class glyph).
BOX_PART = "class part"

#: Upsampled pixels held at once (chunk x height x width float32 values).
_CHUNK_PIXELS = 16_000_000


def region_half_size(image_size: int) -> int:
    """Half-side of the activated region for ``image_size`` pictures: the reference's 36 pixels
    at 224, scaled (``round(36 * S / 224)``, at least 1)."""
    return max(1, int(round(REFERENCE_HALF_SIZE * int(image_size) / REFERENCE_SIZE)))


def annotation_points(annotation: Any) -> dict[str, tuple[float, float]]:
    """The visible part points ``{name: (x, y)}`` of an :class:`~protopnet.data.base.Annotation`:
    its ``parts``, plus the centre of its ``part_box`` (named :data:`BOX_PART`) when it has one."""
    points = {str(name): (float(xy[0]), float(xy[1])) for name, xy in (getattr(annotation, "parts", None) or {}).items()}
    box = getattr(annotation, "part_box", None)
    if box is not None:
        points[BOX_PART] = box_center(list(box))
    return points


def upsample_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(P, H', W') activation maps -> (P, size, size) float32 on the maps' device: the same
    interpolation as :func:`protopnet.regions.upsample_activation` (bicubic,
    ``align_corners=False``), batched and without leaving the device."""
    if maps.dim() != 3:
        raise ValueError(f"expected activation maps (P, H', W'), got shape {tuple(maps.shape)}")
    if maps.shape[0] == 0:
        return maps.new_zeros(0, size, size, dtype=torch.float32)
    return F.interpolate(maps.float()[:, None], size=(int(size), int(size)), mode=UPSAMPLING, align_corners=False)[:, 0]


def peak_locations(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(P, H', W') activation maps -> (P, 2) long ``(row, col)`` of each upsampled map's maximum
    (the first one in row-major order), computed in chunks so memory stays bounded."""
    out = torch.zeros(maps.shape[0], 2, dtype=torch.long, device=maps.device)
    chunk = max(1, _CHUNK_PIXELS // (int(size) * int(size)))
    for start in range(0, maps.shape[0], chunk):
        up = upsample_maps(maps[start : start + chunk], size)  # (p, S, S)
        flat = up.flatten(1).argmax(dim=1)  # (p,) first maximum
        out[start : start + up.shape[0], 0] = flat // size
        out[start : start + up.shape[0], 1] = flat % size
    return out


def covered_parts(peaks: torch.Tensor, points: torch.Tensor, visible: torch.Tensor, half_size: int) -> torch.Tensor:
    """Which parts each region covers.

    Args:
        peaks: (P, 2) ``(row, col)`` region centres.
        points: (P, Q) x 2 part points ``(x, y)`` in pixels (float; truncated to whole pixels).
        visible: (P, Q) bool, whether each part is annotated (visible) in that image.
        half_size: the region's half-side.

    Returns:
        (P, Q) bool: visible and inside the square ``[row - h, row + h] x [col - h, col + h]``
        (borders included, as the reference's test is).
    """
    px = torch.floor(points[..., 0]).to(peaks.device)  # (P, Q)
    py = torch.floor(points[..., 1]).to(peaks.device)
    row, col = peaks[:, 0:1].float(), peaks[:, 1:2].float()  # (P, 1)
    inside = ((py - row).abs() <= half_size) & ((px - col).abs() <= half_size)
    return inside & visible.to(peaks.device)


def consistency_from_counts(covered: torch.Tensor, visible: torch.Tensor, threshold: float = THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prototype part frequencies and the consistency rule.

    Args:
        covered: (M, Q) how many of the prototype's class images have part q covered.
        visible: (M, Q) how many of them have part q visible.
        threshold: the fraction a part must reach (Huang et al.: 0.8).

    Returns:
        frequency (M, Q) float64 = covered / visible (0 where the part is never visible) and
        consistent (M,) bool = some part's frequency >= threshold.
    """
    frequency = covered.double() / visible.double().clamp(min=1)
    if frequency.shape[1] == 0:
        return frequency, torch.zeros(frequency.shape[0], dtype=torch.bool)
    return frequency, (frequency >= threshold).any(dim=1)


def perturbation(shape: Sequence[int], seed: int, index: int, std: float = NOISE_STD, clip: float = NOISE_CLIP) -> torch.Tensor:
    """The stability noise of image ``index``: ``N(0, std^2)`` clipped to ``[-clip, clip]``,
    shape ``shape`` (3, S, S), float32 on the CPU (random stream 1 of :func:`seeded_generator`)."""
    return seeded_gaussian(shape, seed, 1, index, std, clip)


class PartCounter:
    """Running per-prototype part counts, fed batch by batch (never all maps at once).

    The part vocabulary grows as names are met (CUB: 15 names; synthetic: :data:`BOX_PART`).

    Attributes:
        names: part names, column order.
        covered: (M, Q) images of the prototype's class in which part q was covered.
        visible: (M, Q) images of the prototype's class in which part q was visible.
        images: (M,) images of the prototype's class seen.
        stable: (M,) of those, images whose part vector the noise left unchanged.
        stability_images: (M,) images that were checked for stability.
    """

    def __init__(self, num_prototypes: int) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        m = int(num_prototypes)
        self.covered = torch.zeros(m, 0, dtype=torch.float64)
        self.visible = torch.zeros(m, 0, dtype=torch.float64)
        self.images = torch.zeros(m, dtype=torch.float64)
        self.stable = torch.zeros(m, dtype=torch.float64)
        self.stability_images = torch.zeros(m, dtype=torch.float64)

    @property
    def num_parts(self) -> int:
        return len(self.names)

    def encode(self, annotations: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Annotations of B images -> points (B, Q, 2) float32 ``(x, y)`` and visible (B, Q) bool,
        over the vocabulary after registering any new names."""
        per_image = [annotation_points(a) for a in annotations]
        for points in per_image:
            for name in points:
                if name not in self._index:
                    self._index[name] = len(self.names)
                    self.names.append(name)
        grow = len(self.names) - self.covered.shape[1]
        if grow:
            pad = torch.zeros(self.covered.shape[0], grow, dtype=torch.float64)
            self.covered = torch.cat([self.covered, pad], dim=1)
            self.visible = torch.cat([self.visible, pad.clone()], dim=1)
        q = len(self.names)
        points = torch.zeros(len(per_image), q, 2)
        visible = torch.zeros(len(per_image), q, dtype=torch.bool)
        for b, image_points in enumerate(per_image):
            for name, (x, y) in image_points.items():
                points[b, self._index[name]] = torch.tensor([x, y])
                visible[b, self._index[name]] = True
        return points, visible

    def add(self, prototypes: torch.Tensor, covered: torch.Tensor, visible: torch.Tensor, stable: torch.Tensor | None = None) -> None:
        """Fold in P (prototype, image) pairs.

        Args:
            prototypes: (P,) long prototype index of each pair.
            covered: (P, Q) bool, parts covered. visible: (P, Q) bool, parts visible.
            stable: (P,) bool, part vector unchanged by noise (None: stability not measured).
        """
        j = prototypes.cpu()
        self.covered.index_add_(0, j, covered.cpu().double())
        self.visible.index_add_(0, j, visible.cpu().double())
        self.images.index_add_(0, j, torch.ones(j.shape[0], dtype=torch.float64))
        if stable is not None:
            self.stable.index_add_(0, j, stable.cpu().double())
            self.stability_images.index_add_(0, j, torch.ones(j.shape[0], dtype=torch.float64))

    def consistency(self, threshold: float = THRESHOLD) -> dict[str, Any]:
        """The consistency figures (JSON-able): ``score`` (fraction of consistent prototypes among
        those whose class had images; None when none had), and per prototype ``consistent``
        (None: no image of its class), ``best_part``, ``best_frequency`` and ``frequencies``."""
        frequency, consistent = consistency_from_counts(self.covered, self.visible, threshold)
        seen = self.images > 0
        m = self.images.shape[0]
        if frequency.shape[1]:
            best_frequency, best = frequency.max(dim=1)
        else:
            best_frequency, best = torch.zeros(m, dtype=torch.float64), torch.full((m,), -1)
        evaluated = int(seen.sum())
        return {
            "score": float(consistent[seen].double().mean()) if evaluated else None,
            "threshold": float(threshold),
            "evaluated_prototypes": evaluated,
            "consistent": [bool(c) if s else None for c, s in zip(consistent.tolist(), seen.tolist())],
            "best_part": [self.names[int(b)] if s and int(b) >= 0 else None for b, s in zip(best.tolist(), seen.tolist())],
            "best_frequency": [_round(f) if s else None for f, s in zip(best_frequency.tolist(), seen.tolist())],
            "frequencies": [[_round(f) for f in row] if s else None for row, s in zip(frequency.tolist(), seen.tolist())],
            "images_per_prototype": [int(n) for n in self.images.tolist()],
        }

    def stability(self) -> dict[str, Any]:
        """The stability figures: ``score`` (mean over prototypes whose class had images) and
        ``per_prototype`` (None where none)."""
        seen = self.stability_images > 0
        per = torch.where(seen, self.stable / self.stability_images.clamp(min=1), torch.full_like(self.stable, float("nan")))
        return {
            "score": float(per[seen].mean()) if bool(seen.any()) else None,
            "per_prototype": [_round(v) if s else None for v, s in zip(per.tolist(), seen.tolist())],
        }


def _round(value: float, digits: int = 6) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, digits)
