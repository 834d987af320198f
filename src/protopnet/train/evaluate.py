"""Accuracy of a model on a dataset (top-1, top-5, per class), streamed in batches."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence, Unpack

import torch

from ..runtime import Progress, RunFields, RunSettings, autocast
from .loader import BadImageLog, gather_by_index, stream_batches

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict_logits(
    model: ProtoPNet | Ensemble,
    dataset: Any,
    *,
    indices: Sequence[int] | None = None,
    settings: RunSettings | None = None,
    sampler: Any = None,
    progress: Progress | None = None,
    bad_images: BadImageLog | None = None,
    **fields: Unpack[RunFields],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of every readable item, unaugmented, in eval mode.

    Args:
        settings, fields: how the pass runs (:class:`~protopnet.runtime.RunSettings`; default
            batch size 100); a field given as a keyword (``batch_size=...``) replaces that
            of ``settings``.
        progress: called with the number of images of each batch processed.

    Returns:
        logits (N, K), labels (N,), dataset indices (N,) — gathered from every rank when
        ``sampler`` shards the data across a process group.
    """
    run = RunSettings.merged(settings, 100, **fields).for_model(model)
    device = run.device
    was_training = model.training
    model.eval()
    all_logits, all_labels, all_indices = [], [], []
    batches = stream_batches(dataset, indices=indices, settings=run, sampler=sampler, bad_images=bad_images)
    for images, labels, idx in batches:
        with autocast(device, run.precision):
            logits = model(images).logits
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
        all_indices.append(idx)
        if progress is not None:
            progress(len(idx))
    model.train(was_training)
    k = getattr(model, "num_classes", 0)
    logits = torch.cat(all_logits) if all_logits else torch.zeros(0, k)
    labels = torch.cat(all_labels) if all_labels else torch.zeros(0, dtype=torch.long)
    idx = torch.cat(all_indices) if all_indices else torch.zeros(0, dtype=torch.long)
    return gather_by_index(logits, labels, idx, sharded=sampler is not None)


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy from logits (N, K) and labels (N,)."""
    n = int(labels.numel())
    if n == 0:
        return {"n": 0, "accuracy": float("nan"), "top5": float("nan"), "per_class": {}}
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
    top1 = top[:, 0] == labels
    top5 = (top == labels[:, None]).any(dim=1)
    per_class = {}
    for k, name in enumerate(class_names):
        mask = labels == k
        if bool(mask.any()):
            per_class[name] = float(top1[mask].float().mean())
    return {"n": n, "accuracy": float(top1.float().mean()), "top5": float(top5.float().mean()), "per_class": per_class}


def evaluate(model: ProtoPNet | Ensemble, dataset: Any, **kwargs: Any) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy of ``model`` on ``dataset`` (unaugmented).

    Keyword arguments are those of :func:`predict_logits`.
    """
    logits, labels, _ = predict_logits(model, dataset, **kwargs)
    names = getattr(model, "class_names", None) or getattr(dataset, "classes", [])
    return accuracy_report(logits, labels, names)
