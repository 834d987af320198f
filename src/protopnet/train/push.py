"""Prototype projection ("push", paper Section 2.2) with provenance (Section 2.3).

Every prototype of class k becomes exactly its nearest latent patch among the push images of
class k (the training images without augmentation). The scan streams over batches — latents are
never all held — and is vectorised over prototypes: one distance computation per batch gives,
for every prototype, its best patch in the batch among images of its class.

For each prototype it records where the winning patch comes from: dataset index, image path,
patch position, distance, the activation map on that image (kept from the scan, so no second
pass is needed) and the pixel box of the region >= the 95th percentile of the upsampled map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Unpack

import torch
import torch.distributed as dist

from ..model.protopnet import ProtoPNet
from ..regions import activation_boxes
from ..runtime import Progress, RunFields, RunSettings, autocast
from .loader import BadImageLog, stream_batches

if TYPE_CHECKING:
    from .last_layer import KeptLatents

logger = logging.getLogger(__name__)


@dataclass
class PushState:
    """The best patch found so far for each of M prototypes.

    Attributes:
        distance: (M,) squared distance of the best patch (inf: none seen yet).
        index: (M,) dataset index of its image (-1: none).
        position: (M, 2) (row, col) of the patch's top-left latent cell.
        patch: (M, D, h, w) the latent patch.
        latent: (M, D, H, W) the whole latent map of the winning image, kept so the pushed
            prototype's activation map on its source image can be drawn without a second pass.
    """

    distance: torch.Tensor
    index: torch.Tensor
    position: torch.Tensor
    patch: torch.Tensor
    latent: torch.Tensor | None

    @classmethod
    def empty(cls, prototypes: torch.Tensor, device: torch.device | str = "cpu") -> "PushState":
        """No patch seen yet, on ``device`` (the scan's: the state is folded in where the
        batches are, and moved to the CPU once, by :meth:`cpu`)."""
        m = prototypes.shape[0]
        return cls(
            distance=torch.full((m,), float("inf"), device=device),
            index=torch.full((m,), -1, dtype=torch.long, device=device),
            position=torch.zeros(m, 2, dtype=torch.long, device=device),
            patch=prototypes.detach().float().to(device, copy=True),
            latent=None,
        )

    def cpu(self) -> "PushState":
        return PushState(self.distance.cpu(), self.index.cpu(), self.position.cpu(), self.patch.cpu(),
                         None if self.latent is None else self.latent.cpu())

    def update(
        self,
        z: torch.Tensor,
        distances: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        prototype_classes: torch.Tensor,
        model: ProtoPNet,
    ) -> None:
        """Fold one batch in (on the state's device, which must be the batch's).

        Args:
            z: latent (B, D, H, W). distances: (B, M, H', W'). labels, indices: (B,).
            prototype_classes: (M,).
        """
        b, m, hp, wp = distances.shape
        device = self.distance.device
        same_class = labels.view(b, 1) == prototype_classes.view(1, m)  # (B, M)
        masked = distances.flatten(2).masked_fill(~same_class.unsqueeze(2), float("inf"))  # (B, M, P)
        flat = masked.permute(1, 0, 2).reshape(m, b * hp * wp)  # (M, B*P)
        best, where = flat.min(dim=1)  # (M,)
        # Ties go to the smaller dataset index, so any batch order or sharding gives one answer.
        image_in_batch = where // (hp * wp)
        candidate_index = indices.to(device)[image_in_batch]
        better = (best < self.distance) | ((best == self.distance) & (candidate_index < self.index) & torch.isfinite(best))
        rows = torch.nonzero(better).flatten()  # (R,)
        if rows.numel() == 0:
            return
        cell = where[rows] % (hp * wp)
        r, c = cell // wp, cell % wp
        h, w = model.prototype_size
        img = image_in_batch[rows]
        # every winner's (D, h, w) patch at once: z (B, H, W, D) indexed by (R, 1, 1) images,
        # (R, h, 1) rows and (R, 1, w) columns -> (R, h, w, D)
        ys = r.view(-1, 1, 1) + torch.arange(h, device=device).view(1, h, 1)
        xs = c.view(-1, 1, 1) + torch.arange(w, device=device).view(1, 1, w)
        patches = z.permute(0, 2, 3, 1)[img.view(-1, 1, 1), ys, xs].permute(0, 3, 1, 2)  # (R, D, h, w)
        if self.latent is None:
            self.latent = torch.zeros(m, *z.shape[1:], device=device)
        self.distance[rows] = best[rows]
        self.index[rows] = candidate_index[rows]
        self.position[rows, 0], self.position[rows, 1] = r, c
        self.patch[rows] = patches.float()
        self.latent[rows] = z[img].float()

    def merge_across_ranks(self) -> None:
        """With torch.distributed initialised, make every rank hold the global winners."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.distance, self.index, self.position, self.patch, self.latent))
        for distance, index, position, patch, latent in gathered:
            better = (distance < self.distance) | ((distance == self.distance) & (index < self.index) & (index >= 0))
            if latent is None or not bool(better.any()):
                continue
            if self.latent is None:
                self.latent = torch.zeros_like(latent)
            self.distance[better], self.index[better] = distance[better], index[better]
            self.position[better], self.patch[better] = position[better], patch[better]
            self.latent[better] = latent[better]

    def activation_maps(self, model: ProtoPNet) -> torch.Tensor:
        """(M, H', W') similarity of each (pushed) prototype on its own source image."""
        return model.similarity(model.paired_distances(self.latent, self.patch))


@torch.no_grad()
def push_prototypes(
    model: ProtoPNet,
    dataset: Any,
    *,
    indices: Sequence[int] | None = None,
    settings: RunSettings | None = None,
    percentile: float = 95.0,
    sampler: Any = None,
    progress: Progress | None = None,
    bad_images: BadImageLog | None = None,
    keep_latents: KeptLatents | None = None,
    **fields: Unpack[RunFields],
) -> list[dict[str, Any]]:
    """Project every prototype onto its nearest latent training patch of its own class.

    Args:
        model: the ProtoPNet; its prototypes are replaced in place.
        dataset: a ProtoDataset; its images are read without augmentation.
        indices: the push images (default: every item).
        sampler: a sampler over positions in ``indices`` (a DistributedSampler shards the scan
            across ranks; the winners are then merged so every rank ends with the same result).
        settings, fields: how the pass runs (:class:`~protopnet.runtime.RunSettings`; default
            batch size 75); a field given as a keyword (``batch_size=...``) replaces that
            of ``settings``.
        progress: called with the number of images of each batch processed.
        keep_latents: where to keep the scan's latent maps for the last-layer stage that follows
            (:func:`~protopnet.train.last_layer.collect_similarities_from_latents`).

    Returns:
        provenance: one dict per prototype with ``prototype``, ``class_index``, ``class_name``,
        ``dataset_index``, ``path``, ``position`` [row, col], ``distance`` (how far the prototype
        moved, squared), ``box`` [x0, y0, x1, y1] (pixels, exclusive ends), ``image_size``
        [width, height] and ``activation`` (the (H', W') similarity map as nested lists).

    Raises:
        ValueError: a class has prototypes but no readable push image.
    """
    run = RunSettings.merged(settings, 75, **fields).for_model(model)
    device = run.device
    was_training = model.training
    model.eval()
    state = PushState.empty(model.prototypes, device)
    prototype_classes = model.prototype_classes.to(device)
    batches = stream_batches(dataset, indices=indices, settings=run, sampler=sampler,
                             bad_images=bad_images if bad_images is not None else BadImageLog())
    for images, labels, batch_indices in batches:
        with autocast(device, run.precision):
            z = model.latent(images)  # (B, D, H, W)
        distances = model.distances(z)  # (B, M, H', W') float32
        state.update(z, distances, labels.to(device), batch_indices, prototype_classes, model)
        if keep_latents is not None:
            keep_latents.keep(z, labels, batch_indices)
        if progress is not None:
            progress(len(batch_indices))
    state = state.cpu()
    state.merge_across_ranks()

    missing = torch.nonzero(state.index < 0).flatten().tolist()
    if missing:
        classes = sorted({int(model.prototype_classes[j]) for j in missing})
        names = [model.class_names[k] for k in classes]
        raise ValueError(f"push found no readable image of class(es) {names} for prototypes {missing[:10]}: every class with prototypes needs push images")

    model.prototypes.data.copy_(state.patch.to(model.prototypes.device, model.prototypes.dtype))
    activations = state.activation_maps(model)  # (M, H', W')
    size = int(getattr(dataset, "image_size", 224))
    boxes = activation_boxes(activations, (size, size), percentile).tolist()  # (M, 4), all maps at once
    provenance = []
    for j in range(model.num_prototypes):
        index = int(state.index[j])
        activation = activations[j]
        box = boxes[j]
        k = int(model.prototype_classes[j])
        provenance.append(
            {
                "prototype": j,
                "class_index": k,
                "class_name": model.class_names[k],
                "dataset_index": index,
                "path": dataset.path(index) if hasattr(dataset, "path") else f"item://{index}",
                "position": [int(state.position[j, 0]), int(state.position[j, 1])],
                "distance": float(state.distance[j]),
                "box": box,
                "image_size": [size, size],
                "activation": [[round(float(v), 6) for v in row] for row in activation.tolist()],
            }
        )
    model.provenance = provenance
    model.train(was_training)
    logger.info("pushed %d prototypes (mean distance moved %.4f)", model.num_prototypes, float(state.distance.mean()))
    return provenance
