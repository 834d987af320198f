"""The one k-nearest-patch search: a running top-k per prototype, fed one batch of distance maps
at a time (paper Figure 5b, Section S8; pruning, Section 2.6, compares its class counts with a
threshold), and what it finds (:class:`NearestPatches`).

It is vectorised over prototypes: one sort per batch merges the batch's candidates with the M x k
kept so far, so memory never grows with the dataset. Whoever streams the dataset (the analysis's
scan in :func:`protopnet.explain.nearest.nearest_patches`, pruning's scan in
:func:`protopnet.prune.find_nearest_patches`) feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..regions import activation_boxes


@dataclass
class NearestPatches:
    """The k nearest patches of a dataset to each of M prototypes, nearest first.

    Attributes:
        distances: (M, k) squared L2 distances (inf where fewer than k images were seen).
        indices: (M, k) dataset index of each patch's image (-1: none).
        labels: (M, k) that image's label (-1: none).
        positions: (M, k, 2) (row, col) latent cell of the patch's top-left corner.
        activations: (M, k, H', W') the prototype's similarity map on each of those images (to
            draw the patch's region), or None when not kept.
        prototype_classes: (M,) each prototype's class.
        image_size: side of the dataset's pictures (the frame of the boxes).
        scanned: how many images were scanned (unreadable ones not counted).
        latent_size: (H, W) of the latent map (turns positions into pixel boxes), or (0, 0)
            when no image was scanned.
    """

    distances: torch.Tensor
    indices: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    activations: torch.Tensor | None
    prototype_classes: torch.Tensor
    image_size: int
    scanned: int = 0
    latent_size: tuple[int, int] = (0, 0)

    @property
    def k(self) -> int:
        return self.distances.shape[1]

    @property
    def found(self) -> torch.Tensor:
        """(M, k) bool: whether each slot holds a patch."""
        return self.indices >= 0

    def purity(self) -> torch.Tensor:
        """(M,) fraction of each prototype's nearest patches whose image belongs to the
        prototype's class (NaN for a prototype with none)."""
        same = (self.labels == self.prototype_classes.view(-1, 1)) & self.found  # (M, k)
        count = self.found.sum(dim=1).float()  # (M,)
        return torch.where(count > 0, same.sum(dim=1).float() / count.clamp(min=1), torch.full_like(count, float("nan")))

    def same_class_count(self) -> torch.Tensor:
        """(M,) how many of the k nearest patches come from the prototype's class (the count the
        paper's pruning compares with its threshold tau)."""
        return ((self.labels == self.prototype_classes.view(-1, 1)) & self.found).sum(dim=1)

    def boxes(self, percentile: float = 95.0) -> np.ndarray:
        """(M, k, 4) box of every patch's region in its picture's pixels (see
        :func:`protopnet.regions.activation_boxes`); zeros where no patch."""
        if self.activations is None:
            raise ValueError("activation maps were not kept (keep_activations=False): cannot draw boxes")
        m, k = self.indices.shape
        out = np.zeros((m, k, 4), dtype=np.int64)
        found = self.found.numpy()
        if found.any():
            maps = self.activations[torch.from_numpy(found)]  # (F, H', W')
            out[found] = activation_boxes(maps, (self.image_size, self.image_size), percentile)
        return out

    def to_json(
        self,
        dataset: Any = None,
        class_names: Sequence[str] | None = None,
        percentile: float = 95.0,
        boxes: np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        """One entry per prototype: ``prototype``, ``class_index``, ``purity`` and ``patches``
        (``dataset_index``, ``path``, ``label``, ``class_name``, ``distance``, ``position``,
        ``box``), nearest first. ``boxes``: (M, k, 4) from :meth:`boxes`, if already computed."""
        if boxes is None and self.activations is not None:
            boxes = self.boxes(percentile)
        purity = self.purity().tolist()
        out = []
        for j in range(self.indices.shape[0]):
            patches = []
            for slot in range(self.k):
                index = int(self.indices[j, slot])
                if index < 0:
                    continue
                label = int(self.labels[j, slot])
                patch: dict[str, Any] = {
                    "dataset_index": index,
                    "path": dataset.path(index) if dataset is not None and hasattr(dataset, "path") else None,
                    "label": label,
                    "class_name": class_names[label] if class_names is not None else None,
                    "distance": float(self.distances[j, slot]),
                    "position": [int(v) for v in self.positions[j, slot]],
                }
                if boxes is not None:
                    patch["box"] = [int(v) for v in boxes[j, slot]]
                patches.append(patch)
            out.append(
                {
                    "prototype": j,
                    "class_index": int(self.prototype_classes[j]),
                    "purity": None if purity[j] != purity[j] else purity[j],
                    "patches": patches,
                }
            )
        return out


class TopK:
    """A running top-k (smallest distance) per prototype, fed one batch at a time.

    The state lives on the device of the distances it is fed (no transfer per batch). Ties are
    broken by the smaller dataset index, then the smaller patch position (row-major), so any
    batch order gives the same answer.

    Args:
        num_prototypes: M.
        k: patches kept per prototype.
        keep_activations: keep each winner's (H', W') distance map, to draw its region.
        per_image: each image is one candidate, its patch nearest to the prototype (the
            reference implementation's choice: the k nearest come from k different images); with
            False every patch of every image is a candidate (several may come from one image;
            no activation maps are kept).
    """

    def __init__(self, num_prototypes: int, k: int, keep_activations: bool = True, *, per_image: bool = True) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.m = int(num_prototypes)
        self.k = int(k)
        self.per_image = per_image
        self.keep_activations = keep_activations and per_image
        self.patch_grid: tuple[int, int] = (0, 0)  # (H', W') of the last batch
        self.distances = torch.full((self.m, k), float("inf"))  # (M, k)
        self.indices = torch.full((self.m, k), -1, dtype=torch.long)  # (M, k)
        self.labels = torch.full((self.m, k), -1, dtype=torch.long)  # (M, k)
        self.positions = torch.zeros(self.m, k, 2, dtype=torch.long)  # (M, k, 2)
        self.maps: torch.Tensor | None = None  # (M, k, H', W') distance maps of the winners

    def _to(self, device: torch.device) -> None:
        if self.distances.device != device:
            self.distances, self.indices = self.distances.to(device), self.indices.to(device)
            self.labels, self.positions = self.labels.to(device), self.positions.to(device)
            self.maps = self.maps.to(device) if self.maps is not None else None

    def update(self, distances: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Fold one batch in.

        Args:
            distances: (B, M, H', W') squared distances of the batch's patches to every prototype.
            labels, indices: (B,) labels and dataset indices of the batch's images.
        """
        b, m, hp, wp = distances.shape
        device = distances.device
        self._to(device)
        self.patch_grid = (hp, wp)
        distances = distances.detach().float()
        indices, labels = indices.to(device), labels.to(device)
        if self.per_image:
            best, where = distances.flatten(2).min(dim=2)  # (B, M): each image's nearest patch (first cell on ties)
            best, where = best.t(), where.t()  # (M, B)
            indices, labels = indices.view(1, b).expand(m, b), labels.view(1, b).expand(m, b)
        else:
            p = hp * wp
            best = distances.flatten(2).permute(1, 0, 2).reshape(m, b * p)  # (M, B*P)
            where = torch.arange(p, device=device).repeat(b).view(1, -1).expand(m, -1)  # (M, B*P)
            indices = indices.repeat_interleave(p).view(1, -1).expand(m, -1)
            labels = labels.repeat_interleave(p).view(1, -1).expand(m, -1)
        cand_d = torch.cat([self.distances, best], dim=1)  # (M, k + C)
        cand_i = torch.cat([self.indices, indices], dim=1)  # (M, k + C)
        cand_p = torch.cat([self.positions, torch.stack([where // wp, where % wp], dim=2)], dim=1)  # (M, k + C, 2)
        # Sort by (distance, index, cell): stable sorts, least significant key first.
        tie = cand_i * (hp * wp) + cand_p[..., 0] * wp + cand_p[..., 1]  # (M, k + C)
        by_index = torch.sort(tie, dim=1, stable=True).indices
        by_distance = torch.sort(torch.gather(cand_d, 1, by_index), dim=1, stable=True).indices
        order = torch.gather(by_index, 1, by_distance)[:, : self.k]  # (M, k) positions among the candidates
        cand_l = torch.cat([self.labels, labels], dim=1)  # (M, k + C)
        self.distances = torch.gather(cand_d, 1, order)
        self.indices = torch.gather(cand_i, 1, order)
        self.labels = torch.gather(cand_l, 1, order)
        self.positions = torch.gather(cand_p, 1, order.unsqueeze(2).expand(m, self.k, 2))
        if self.keep_activations:
            # Gather only the M x k winning maps (no copy of the whole batch's maps).
            rows = torch.arange(m, device=device).view(m, 1)  # (M, 1)
            from_batch = order >= self.k  # (M, k)
            new = distances[(order - self.k).clamp(min=0), rows]  # (M, k, H', W'): image order-k, prototype row
            if self.maps is None:
                self.maps = new
            else:
                kept = self.maps[rows, order.clamp(max=self.k - 1)]  # (M, k, H', W')
                self.maps = torch.where(from_batch.view(m, self.k, 1, 1), new, kept)

    def result(
        self,
        prototype_classes: torch.Tensor,
        image_size: int,
        scanned: int = 0,
        similarity: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prototype_size: Sequence[int] | None = None,
    ) -> NearestPatches:
        """The top-k found so far, on the CPU; ``similarity`` (distance -> similarity) turns the
        kept distance maps into activation maps; ``prototype_size`` (h, w) gives the latent size."""
        activations = None
        if self.maps is not None and similarity is not None:
            activations = similarity(self.maps).float().cpu()
        positions = self.positions.clone()
        positions[self.indices < 0] = -1
        hp, wp = self.patch_grid
        latent = (hp + int(prototype_size[0]) - 1, wp + int(prototype_size[1]) - 1) if hp and prototype_size is not None else (0, 0)
        return NearestPatches(
            distances=self.distances.cpu(),
            indices=self.indices.cpu(),
            labels=self.labels.cpu(),
            positions=positions.cpu(),
            activations=activations,
            prototype_classes=prototype_classes.detach().cpu().long(),
            image_size=int(image_size),
            scanned=int(scanned),
            latent_size=latent,
        )
