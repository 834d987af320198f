"""Prototype pruning (paper Section 2.6, supplement S8).

A prototype whose nearest training patches come from many classes usually shows background (sky,
water, a branch) and carries no class evidence. Pruning finds, for every prototype, its ``k``
nearest training patches (reference ``k = 6``), and removes the prototypes for which fewer than
``threshold`` (reference 3) of those patches come from images of the prototype's own class. The
last layer is then re-optimised (the convex stage of Section 2.2) on similarities that were cached
during the same pass over the training images — the network runs over the training set once.

    >>> from protopnet.prune import prune
    >>> report = prune(model, train_data, k=6, threshold=3, test_dataset=test_data)
    >>> report.removed, report.accuracy["test"]          # {"before", "after_removal", "after"}
    >>> from protopnet.edit import save_pruned          # the model + pruning.json/.html
    >>> save_pruned(model, report, "runs/cub/pruned", dataset=train_data)

The readable report (``pruning.html``) is drawn by :func:`protopnet.explain.write_pruning_report`;
this module decides and records, it does not draw.

What counts as "the k nearest patches"
    ``per_image=True`` (default): each training image contributes one candidate, its patch
    nearest to the prototype, so the k nearest come from k different images. This is what the
    reference implementation does (``find_k_nearest_patches_to_prototypes`` keeps, per image, the
    closest patch in a heap of size k) and it keeps one image with a large uniform region from
    filling all k places with its neighbouring cells. ``per_image=False`` ranks every patch of
    every image instead (several of the k may come from one image).

Ties in distance go to the smaller dataset index, then the smaller patch position (row-major),
so the result does not depend on batch size or order.

The search streams over batches, is vectorised over prototypes (one distance computation per
batch serves all M) and keeps a running top-k of size (M, k): memory never grows with the dataset
beyond the (N, M) table of per-image minimum distances that the last-layer re-fit needs.

Shapes: B images, M prototypes of h x w cells, H x W latent map, H' x W' patch positions,
K classes, N training images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence, Unpack

import torch

from .checkpoint import now_utc
from .model.surgery import remove_prototypes
from .runtime import Progress, RunFields, RunSettings
from .train.nearest import NearestPatches, TopK
from .train.refit import accuracy_from_similarities, refit_last_layer, scan_similarities

if TYPE_CHECKING:
    from .model import ProtoPNet

logger = logging.getLogger(__name__)

REFERENCE_K = 6
REFERENCE_THRESHOLD = 3


@torch.no_grad()
def find_nearest_patches(
    model: ProtoPNet,
    dataset: Any,
    *,
    k: int = REFERENCE_K,
    per_image: bool = True,
    indices: Sequence[int] | None = None,
    settings: RunSettings | None = None,
    progress: Progress | None = None,
    **fields: Unpack[RunFields],
) -> tuple[NearestPatches, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k nearest training patches of every prototype, in one streamed pass.

    Args:
        dataset: the training images (read unaugmented, as push reads them).
        per_image: one candidate per image (its nearest patch; the reference's choice) or every
            patch (see the module docstring).
        settings, fields: how the pass runs (:class:`~protopnet.runtime.RunSettings`; default
            batch size 75); a field given as a keyword replaces that of ``settings``. Only the
            batch size, workers and device are used: the distances run in float32.

    Returns:
        ``(nearest, min_distances (N, M), labels (N,), dataset indices (N,))`` — the per-image
        minimum distances come from the same pass and feed the last-layer re-fit.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    run = RunSettings.merged(settings, 75, **fields).for_model(model)
    top = TopK(model.num_prototypes, int(k), keep_activations=False, per_image=per_image)
    mins, labels, idx = scan_similarities(
        model, dataset, indices=indices, settings=run, on_batch=top.update, progress=progress
    )
    size = int(getattr(dataset, "image_size", getattr(model, "image_size", 224)))
    nearest = top.result(model.prototype_classes, size, len(idx), prototype_size=tuple(model.prototype_size))
    return nearest, mins, labels, idx


@dataclass
class PruneReport:
    """What pruning found and did.

    Attributes:
        k, threshold, per_image: the rule.
        prototypes: one dict per prototype of the model before pruning: ``prototype``,
            ``class_index``, ``class_name``, ``same_class`` (of its k nearest), ``pruned`` and
            ``nearest`` (list of ``dataset_index``, ``path``, ``class_index``, ``class_name``,
            ``distance``, ``position`` [row, col], ``box`` [x0, y0, x1, y1] — the patch's
            footprint in the image's pixels).
        removed: old indices of the pruned prototypes. kept: old index of each new prototype.
        accuracy: ``{"train"|"test": {"before", "after_removal", "after"}}`` (None: no data).
        classes_without_prototypes: class names pruning left empty.
        last_layer: the re-fit's final terms.
        event: the entry appended to ``model.history``.
    """

    k: int
    threshold: int
    per_image: bool
    prototypes: list[dict[str, Any]]
    removed: list[int]
    kept: list[int]
    accuracy: dict[str, dict[str, float | None]]
    classes_without_prototypes: list[str] = field(default_factory=list)
    last_layer: dict[str, float] = field(default_factory=dict)
    event: dict[str, Any] = field(default_factory=dict)
    when: str = ""

    @property
    def pruned(self) -> list[dict[str, Any]]:
        return [p for p in self.prototypes if p["pruned"]]

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": {
                "k": self.k,
                "threshold": self.threshold,
                "per_image": self.per_image,
                "description": (
                    f"a prototype is pruned when fewer than {self.threshold} of its {self.k} nearest training patches "
                    f"come from its own class; nearest patches counted "
                    + ("one per image (each image's closest patch)" if self.per_image else "over all patches of all images")
                ),
            },
            "when": self.when,
            "prototypes_before": len(self.prototypes),
            "prototypes_after": len(self.kept),
            "removed": self.removed,
            "kept": self.kept,
            "accuracy": self.accuracy,
            "classes_without_prototypes": self.classes_without_prototypes,
            "last_layer": self.last_layer,
            "prototypes": self.prototypes,
        }


@torch.no_grad()
def prune(
    model: ProtoPNet,
    dataset: Any,
    k: int = REFERENCE_K,
    threshold: int = REFERENCE_THRESHOLD,
    *,
    per_image: bool = True,
    indices: Sequence[int] | None = None,
    test_dataset: Any = None,
    refit: bool = True,
    iterations: int = 100,
    lr: float = 1e-4,
    l1: float = 1e-4,
    settings: RunSettings | None = None,
    seed: int = 0,
    dry_run: bool = False,
    progress: Progress | None = None,
    **fields: Unpack[RunFields],
) -> PruneReport:
    """Prune ``model`` in place (paper Section 2.6): remove every prototype whose ``k`` nearest
    training patches hold fewer than ``threshold`` from its own class, then re-fit the last layer.

    Args:
        dataset: the training images (unaugmented; the push set).
        k, threshold: the rule (reference: 6 and 3). ``threshold`` must be in ``[0, k]``.
        per_image: count one nearest patch per image (default, as the reference does) or all
            patches (see the module docstring).
        indices: which items of ``dataset`` to search (default: all).
        test_dataset: measure accuracy on it before pruning, after removal and after the re-fit.
        refit, iterations, lr, l1: the last-layer re-fit on the cached training similarities
            (the reference's pruning script: 100 iterations, Adam, lr 1e-4, L1 1e-4).
        settings, fields: how the passes over the datasets run, as for
            :func:`find_nearest_patches` (default batch size 75).
        dry_run: find what would be pruned and report it, without changing the model.

    Returns:
        a :class:`PruneReport`; unless ``dry_run``, ``model.history`` gains its ``event``.

    Raises:
        ValueError: bad ``k``/``threshold``, or every prototype would be pruned.
    """
    if not 0 <= threshold <= k:
        raise ValueError(f"threshold must be between 0 and k={k}, got {threshold}")
    run = RunSettings.merged(settings, 75, **fields)
    nearest, min_d, train_y, _ = find_nearest_patches(
        model, dataset, k=k, per_image=per_image, indices=indices, settings=run, progress=progress
    )
    if int((nearest.indices >= 0).sum(dim=1).min()) < k:
        logger.warning("fewer than k=%d candidate patches for some prototypes (the dataset is small): missing places count as other classes", k)
    classes = model.prototype_classes.cpu()
    counts = nearest.same_class_count()  # (M,)
    removed = [int(j) for j in torch.nonzero(counts < threshold).flatten()]
    m = model.num_prototypes
    if len(removed) == m and not dry_run:
        raise ValueError(
            f"every one of the {m} prototypes has fewer than {threshold} of its {k} nearest patches from its own class; "
            "nothing would be left — lower the threshold or check the model and data"
        )
    names = list(model.class_names)
    prototypes = _describe(model, nearest, counts, set(removed), dataset)

    test_sims = test_y = None
    if test_dataset is not None:
        d, test_y, _ = scan_similarities(model, test_dataset, settings=run)
        test_sims = model.similarity(d)  # (N_test, M)
    train_sims = model.similarity(min_d)  # (N, M)
    w0 = model.last_layer.weight.detach().clone()  # (K, M)
    kept = [j for j in range(m) if j not in set(removed)]
    keep = torch.tensor(kept, dtype=torch.long)

    def acc(weight: torch.Tensor, sims: torch.Tensor | None, y: torch.Tensor | None) -> float | None:
        if sims is None or y is None or y.numel() == 0:
            return None
        return accuracy_from_similarities(weight, sims, y, names)["accuracy"]

    accuracy = {
        split: {"before": acc(w0, s, y), "after_removal": acc(w0[:, keep], None if s is None else s[:, keep], y), "after": None}
        for split, s, y in (("train", train_sims, train_y), ("test", test_sims, test_y))
    }
    report = PruneReport(k=int(k), threshold=int(threshold), per_image=per_image, prototypes=prototypes, removed=removed, kept=kept, accuracy=accuracy, when=now_utc())
    empty = sorted(set(range(model.num_classes)) - set(classes[keep].tolist()))
    report.classes_without_prototypes = [names[c] for c in empty]
    if dry_run:
        return report

    removed_provenance = [model.provenance[j] for j in removed] if model.provenance else None
    remove_prototypes(model, removed)
    if refit:
        report.last_layer = refit_last_layer(model, train_sims[:, keep], train_y, iterations=iterations, lr=lr, l1=l1, batch_size=80, seed=seed)
    w1 = model.last_layer.weight.detach()
    for split, s, y in (("train", train_sims, train_y), ("test", test_sims, test_y)):
        accuracy[split]["after"] = acc(w1, None if s is None else s[:, keep], y)
    report.event = {
        "event": "prune",
        "when": report.when,
        "what": {"k": int(k), "threshold": int(threshold), "per_image": per_image, "removed": removed, "kept": kept},
        "prototypes_before": m,
        "prototypes_after": len(kept),
        "removed_provenance": removed_provenance,  # where the pruned prototypes came from
        "last_layer_refit": {"iterations": iterations, "lr": lr, "l1": l1} if refit else None,
        "accuracy_before": {split: accuracy[split]["before"] for split in accuracy},
        "accuracy_after": {split: accuracy[split]["after"] for split in accuracy},
    }
    model.history.append(report.event)
    logger.info("pruned %d of %d prototypes (k=%d, threshold=%d); test accuracy %s -> %s", len(removed), m, k, threshold, accuracy["test"]["before"], accuracy["test"]["after"])
    return report


def _describe(model: ProtoPNet, nearest: NearestPatches, counts: torch.Tensor, removed: set[int], dataset: Any) -> list[dict[str, Any]]:
    names = list(model.class_names)
    size = int(getattr(model, "image_size", 224))
    big_h, big_w = nearest.latent_size
    h, w = model.prototype_size
    out = []
    for j in range(model.num_prototypes):
        c = int(model.prototype_classes[j])
        rows = []
        for n in range(nearest.indices.shape[1]):
            index = int(nearest.indices[j, n])
            if index < 0:
                continue
            r, col = int(nearest.positions[j, n, 0]), int(nearest.positions[j, n, 1])
            label = int(nearest.labels[j, n])
            box = [round(col * size / big_w, 2), round(r * size / big_h, 2), round((col + w) * size / big_w, 2), round((r + h) * size / big_h, 2)] if big_h else None
            rows.append(
                {
                    "dataset_index": index,
                    "path": dataset.path(index) if hasattr(dataset, "path") else f"item://{index}",
                    "class_index": label,
                    "class_name": names[label] if 0 <= label < len(names) else str(label),
                    "distance": float(nearest.distances[j, n]),
                    "position": [r, col],
                    "box": box,
                }
            )
        out.append({"prototype": j, "class_index": c, "class_name": names[c], "same_class": int(counts[j]), "pruned": j in removed, "nearest": rows})
    return out
