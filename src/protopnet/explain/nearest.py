"""Global analysis: the nearest patches of a dataset to every prototype (paper Figure 5b,
Section S8) and their class purity.

The scan streams over batches like push (latents are never all held); the search itself is
:class:`protopnet.train.nearest.TopK`, the one pruning uses too. As in the reference
implementation, each image contributes at most one patch per prototype — its closest — so the k
nearest patches come from k different images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Unpack

import numpy as np
import torch

from ..runtime import Progress, RunFields, RunSettings, autocast
from ..train.nearest import NearestPatches, TopK

if TYPE_CHECKING:
    from ..model import ProtoPNet

logger = logging.getLogger(__name__)


@torch.no_grad()
def nearest_patches(
    model: ProtoPNet,
    dataset: Any,
    k: int = 5,
    *,
    indices: Sequence[int] | None = None,
    settings: RunSettings | None = None,
    keep_activations: bool = True,
    progress: Progress | None = None,
    bad_images: Any = None,
    **fields: Unpack[RunFields],
) -> NearestPatches:
    """The ``k`` nearest patches (from ``k`` different images) of ``dataset`` to every prototype.

    Args:
        model: a :class:`protopnet.ProtoPNet` (run in eval mode; its training flag is restored).
        dataset: a ProtoDataset, read without augmentation; unreadable images are skipped (and
            logged once each).
        k: patches per prototype (the paper's pruning uses 6).
        indices: which items to scan (default: all).
        settings, fields: how the pass runs (:class:`~protopnet.runtime.RunSettings`; default
            batch size 64); a field given as a keyword (``batch_size=...``) replaces that
            of ``settings``.
        keep_activations: keep each winner's activation map, (M, k, H', W'), to draw its box.
        progress: called with the number of images of each batch processed.

    Returns:
        :class:`NearestPatches`.
    """
    from ..train.loader import BadImageLog, IndexedSubset, make_loader

    run = RunSettings.merged(settings, 64, **fields).for_model(model)
    device = run.device
    was_training = model.training
    model.eval()
    try:
        subset = IndexedSubset(dataset, indices, augment=False)
        loader = make_loader(subset, run.batch_size, num_workers=run.num_workers, pin_memory=device.type == "cuda")
        top = TopK(model.num_prototypes, k, keep_activations)
        bad_images = bad_images if bad_images is not None else BadImageLog()
        seen = 0
        for batch in loader:
            bad_images.add(batch.bad)
            if batch.images is None:
                continue
            images = batch.images.to(device, non_blocking=True).to(memory_format=run.memory_format)
            with autocast(device, run.precision):
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
    return top.result(model.prototype_classes, size, seen, model.similarity, tuple(model.prototype_size))
