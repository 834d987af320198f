"""Global analysis: the nearest patches of a dataset to every prototype (paper Figure 5b,
Section S8) and their class purity.

The scan streams over batches like push (latents are never all held) and is vectorised over
prototypes: one distance computation per batch, then a running top-k per prototype merged with the
batch's candidates in one sort. As in the reference implementation, each image contributes at most
one patch per prototype — its closest — so the k nearest patches come from k different images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..runtime import autocast, memory_format, resolve_device

logger = logging.getLogger(__name__)


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
    """

    distances: torch.Tensor
    indices: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    activations: torch.Tensor | None
    prototype_classes: torch.Tensor
    image_size: int
    scanned: int = 0

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
        :func:`protopnet.explain.boxes.activation_boxes`); zeros where no patch."""
        from .boxes import activation_boxes

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
    broken by the smaller dataset index, so any batch order gives the same answer.

    Args:
        num_prototypes: M.
        k: patches kept per prototype.
        keep_activations: keep each winner's (H', W') distance map, to draw its region.
    """

    def __init__(self, num_prototypes: int, k: int, keep_activations: bool = True) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.m = int(num_prototypes)
        self.k = int(k)
        self.keep_activations = keep_activations
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
        distances = distances.detach().float()
        best, where = distances.flatten(2).min(dim=2)  # (B, M)
        best, where = best.t(), where.t()  # (M, B)
        indices, labels = indices.to(device).view(1, b).expand(m, b), labels.to(device).view(1, b).expand(m, b)
        cand_d = torch.cat([self.distances, best], dim=1)  # (M, k + B)
        cand_i = torch.cat([self.indices, indices], dim=1)  # (M, k + B)
        # Sort by (distance, index): a stable sort by index, then a stable sort by distance.
        by_index = torch.sort(cand_i, dim=1, stable=True).indices
        by_distance = torch.sort(torch.gather(cand_d, 1, by_index), dim=1, stable=True).indices
        order = torch.gather(by_index, 1, by_distance)[:, : self.k]  # (M, k) positions among the candidates
        cand_l = torch.cat([self.labels, labels], dim=1)  # (M, k + B)
        cand_p = torch.cat([self.positions, torch.stack([where // wp, where % wp], dim=2)], dim=1)  # (M, k + B, 2)
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

    def result(self, prototype_classes: torch.Tensor, image_size: int, scanned: int = 0, similarity: Callable[[torch.Tensor], torch.Tensor] | None = None) -> NearestPatches:
        """The top-k found so far, on the CPU; ``similarity`` (distance -> similarity) turns the
        kept distance maps into activation maps."""
        activations = None
        if self.maps is not None and similarity is not None:
            activations = similarity(self.maps).float().cpu()
        return NearestPatches(
            distances=self.distances.cpu(),
            indices=self.indices.cpu(),
            labels=self.labels.cpu(),
            positions=self.positions.cpu(),
            activations=activations,
            prototype_classes=prototype_classes.detach().cpu().long(),
            image_size=int(image_size),
            scanned=int(scanned),
        )


@torch.no_grad()
def nearest_patches(
    model: Any,
    dataset: Any,
    k: int = 5,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    precision: str = "fp32",
    channels_last: bool = False,
    keep_activations: bool = True,
    progress: Callable[[int], None] | None = None,
    bad_images: Any = None,
) -> NearestPatches:
    """The ``k`` nearest patches (from ``k`` different images) of ``dataset`` to every prototype.

    Args:
        model: a :class:`protopnet.ProtoPNet` (run in eval mode; its training flag is restored).
        dataset: a ProtoDataset, read without augmentation; unreadable images are skipped (and
            logged once each).
        k: patches per prototype (the paper's pruning uses 6).
        indices: which items to scan (default: all).
        keep_activations: keep each winner's activation map, (M, k, H', W'), to draw its box.
        progress: called with the number of images of each batch processed.

    Returns:
        :class:`NearestPatches`.
    """
    from ..train.loader import BadImageLog, IndexedSubset, make_loader

    device = resolve_device(device if device is not None else next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        subset = IndexedSubset(dataset, indices, augment=False)
        loader = make_loader(subset, batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
        top = TopK(model.num_prototypes, k, keep_activations)
        fmt = memory_format(channels_last)
        bad_images = bad_images if bad_images is not None else BadImageLog()
        seen = 0
        for batch in loader:
            bad_images.add(batch.bad)
            if batch.images is None:
                continue
            images = batch.images.to(device, non_blocking=True).to(memory_format=fmt)
            with autocast(device, precision):
                z = model.latent(images)  # (B, D, H, W)
            distances = model.distances(z)  # (B, M, H', W') float32
            top.update(distances, batch.labels, batch.indices)
            seen += len(batch.indices)
            if progress is not None:
                progress(len(batch.indices))
    finally:
        model.train(was_training)
    logger.info("scanned %d images for the %d nearest patches of %d prototypes", seen, k, model.num_prototypes)
    size = int(getattr(dataset, "image_size", getattr(model, "image_size", 224)))
    return top.result(model.prototype_classes, size, seen, model.similarity)
