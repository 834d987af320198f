"""Fixed similarities: one streamed scan of a dataset, accuracy and a last-layer refit on them.

After prototypes change (pruning removes some, a person edits them), the similarities of every
image to every prototype are computed once (:func:`scan_similarities`) and the last layer is
re-fitted on them (:func:`refit_last_layer`, the convex stage of paper Section 2.2) with accuracy
read off the same vectors (:func:`accuracy_from_similarities`), without re-running the network.
Shared by :mod:`protopnet.prune` and :mod:`protopnet.edit` (which re-exports them).

Shapes: B images, D latent channels, M prototypes, H' x W' patch positions, K classes, N images.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Sequence, Unpack

import torch

from ..runtime import Progress, RunFields, RunSettings
from .evaluate import accuracy_report
from .last_layer import optimise_last_layer
from .loader import BadImageLog, IndexedSubset, make_loader

if TYPE_CHECKING:
    from ..model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)


# -- one pass over a dataset -------------------------------------------------------------------

BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def scan_similarities(
    model: ProtoPNet,
    dataset: Any,
    prototypes: torch.Tensor | None = None,
    *,
    indices: Sequence[int] | None = None,
    settings: RunSettings | None = None,
    on_batch: BatchHook | None = None,
    progress: Progress | None = None,
    **fields: Unpack[RunFields],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smallest distance from each of ``prototypes`` to each image, in one streamed pass.

    The dataset is read unaugmented and the model runs in eval mode (its mode is restored).

    Args:
        prototypes: (P, D, h, w) the vectors to measure (default: ``model.prototypes``). Passing
            the current prototypes concatenated with candidate replacements lets one pass serve
            the model before and after an edit.
        settings, fields: how the pass runs (:class:`~protopnet.runtime.RunSettings`; default
            batch size 75); a field given as a keyword replaces that of ``settings``. Only the
            batch size, workers and device are used: the distances run in float32.
        on_batch: called with ``(distances (B, P, H', W'), labels (B,), dataset indices (B,))``
            for every batch (the k-nearest-patch search of :mod:`protopnet.prune` uses it).
        progress: called with the number of images of each batch.

    Returns:
        min_distances (N, P) float32 on the CPU, labels (N,), dataset indices (N,), sorted by
        dataset index. Unreadable images are skipped (and logged).
    """
    run = RunSettings.merged(settings, 75, **fields).for_model(model)
    device = run.device
    protos = (model.prototypes if prototypes is None else prototypes).detach().to(device)
    was_training = model.training
    model.eval()
    loader = make_loader(IndexedSubset(dataset, indices, augment=False), run.batch_size, num_workers=run.num_workers, pin_memory=device.type == "cuda")
    bad = BadImageLog()
    mins, labels, idx = [], [], []
    try:
        for batch in loader:
            bad.add(batch.bad)
            if batch.images is None:
                continue
            z = model.latent(batch.images.to(device, non_blocking=True))  # (B, D, H, W)
            distances = model.distances(z, protos)  # (B, P, H', W')
            mins.append(distances.flatten(2).amin(dim=2).cpu())  # (B, P)
            labels.append(batch.labels)
            idx.append(batch.indices)
            if on_batch is not None:
                on_batch(distances, batch.labels.to(device), batch.indices.to(device))
            if progress is not None:
                progress(len(batch.indices))
    finally:
        model.train(was_training)
    d = torch.cat(mins) if mins else torch.zeros(0, protos.shape[0])
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    i = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(i, stable=True)
    return d[order], y[order], i[order]


def accuracy_from_similarities(weight: torch.Tensor, similarities: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy of a last layer ``weight`` (K, M) on fixed similarities (N, M) with labels (N,).

    Exactly what a forward pass gives (logits = similarities @ weight.T), without re-running the
    network. Returns :func:`protopnet.train.evaluate.accuracy_report`'s dict.
    """
    logits = similarities.float() @ weight.detach().float().cpu().t()  # (N, K)
    return accuracy_report(logits, labels, class_names)


def refit_last_layer(
    model: ProtoPNet,
    similarities: torch.Tensor,
    labels: torch.Tensor,
    *,
    iterations: int = 20,
    lr: float = 1e-4,
    l1: float = 1e-4,
    batch_size: int = 80,
    seed: int = 0,
) -> dict[str, float]:
    """Re-optimise ``model.last_layer`` on fixed similarities (paper Section 2.2, last-layer stage).

    Starts from the current weights; Adam with the paper's last-layer learning rate (1e-4) and
    L1 penalty on wrong-class connections (1e-4) by default; ``iterations`` passes over the N
    vectors in a seeded order.

    Args:
        similarities: (N, M) for the model's current M prototypes; labels: (N,).

    Returns the last iteration's mean ``ce``, ``l1``, ``loss`` and ``train_accuracy``.
    """
    if similarities.shape[1] != model.num_prototypes:
        raise ValueError(f"similarities have {similarities.shape[1]} columns but the model has {model.num_prototypes} prototypes")
    if iterations <= 0 or similarities.shape[0] == 0:
        return {}
    optimizer = torch.optim.Adam(model.last_layer.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(int(seed))
    with torch.enable_grad():
        terms = optimise_last_layer(
            model, similarities, labels, optimizer, iterations=iterations, batch_size=batch_size, l1=l1, generator=generator
        )
    logger.info("last layer re-fitted: %d iterations, train accuracy %.4f", iterations, terms.get("train_accuracy", float("nan")))
    return terms
