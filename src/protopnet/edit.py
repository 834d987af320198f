"""Editing a trained ProtoPNet with a person in the loop.

A ProtoPNet's reasoning is a list of prototypes and a last layer, so a person who reads its
explanations can change it directly:

* **remove** prototypes (a background patch, a duplicate, a prototype that latched onto a
  watermark);
* **replace** a prototype by a patch the person points at — an image plus a box in that image's
  pixels, or an image plus a latent position ``(row, col)``;
* **relabel** a prototype (move it to another class);

then **re-fit the last layer** on fixed similarities (the convex stage of paper Section 2.2) and
see how accuracy changed. Every edit is appended to ``model.history`` (what, when in UTC ISO 8601,
accuracy before and after), and the provenance of replaced prototypes is rewritten (source path,
position, box, activation map) so explanations drawn from the edited model stay truthful.

Indices always refer to the model as it was *before* the edit: replacements and relabels are
applied first and removals last, so ``remove=[3], relabel={5: 2}`` relabels the prototype that was
number 5 even though it becomes number 4.

Shapes: B images, D latent channels, H x W latent map, M prototypes of h x w cells,
H' x W' = (H - h + 1) x (W - w + 1) patch positions, K classes, N images of a dataset.

    >>> from protopnet.edit import Replacement, edit_model, save_edited_model
    >>> model = protopnet.load_model("runs/cub/model")
    >>> report = edit_model(model, train_data, test_dataset=test_data, remove=[3, 17], relabel={5: 2},
    ...                     replace=[Replacement(4, image="bird.jpg", box=[40, 52, 88, 96])])
    >>> report.accuracy_before["test"], report.accuracy_after["test"]
    >>> save_edited_model(model, "runs/cub/edited", pictures=report.pictures)

The helpers here (:func:`scan_similarities`, :func:`refit_last_layer`, :func:`save_edited_model`)
are shared with :mod:`protopnet.prune`; the in-place edits (:func:`remove_prototypes`,
:func:`relabel_prototype`) live in :mod:`protopnet.model.surgery` and are re-exported here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Unpack

import torch

# The shared helpers below moved to the layers they belong to; they are re-exported here so
# ``from protopnet.edit import remove_prototypes`` (and the like) keeps working.
from .checkpoint import now_utc, save_edited_model
from .data.transforms import normalise
from .model.surgery import (
    PrototypeIndexError,
    check_class as _check_class,
    check_prototype_indices,
    relabel_prototype,
    remove_prototypes,
)
from .regions import activation_box
from .runtime import RunFields, RunSettings
from .train.refit import BatchHook, accuracy_from_similarities, refit_last_layer, scan_similarities
from .visualize import prototype_pictures

if TYPE_CHECKING:
    from .model import ProtoPNet
    from .prune import PruneReport

logger = logging.getLogger(__name__)


def patch_for_box(
    box: Sequence[float],
    image_size: int,
    latent_size: tuple[int, int],
    prototype_size: tuple[int, int],
) -> tuple[int, int]:
    """The h x w latent patch a pixel box points at.

    Latent cell ``(i, j)`` of an H x W map covers the pixels ``[j S/W, (j+1) S/W) x
    [i S/H, (i+1) S/H)`` of the S x S input (the grid mapping the reference uses for prototype
    boxes). The chosen patch is the one whose footprint overlaps the box most; ties go to the
    patch whose centre is nearest the box centre, then to the smaller (row, col). For 1 x 1
    prototypes and a box inside one cell this is the cell under the box centre.

    Args:
        box: ``[x0, y0, x1, y1]`` in the S x S picture's pixels (ends exclusive).
        latent_size: (H, W); prototype_size: (h, w).

    Returns:
        (row, col) of the patch's top-left cell.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box {list(box)} is empty: expected x0 < x1 and y0 < y1")
    s = float(image_size)
    if x1 <= 0 or y1 <= 0 or x0 >= s or y0 >= s:
        raise ValueError(f"box {list(box)} lies outside the {image_size}x{image_size} picture")
    big_h, big_w = latent_size
    h, w = prototype_size
    sy, sx = s / big_h, s / big_w
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    best: tuple[float, float, int, int] | None = None
    for r in range(big_h - h + 1):
        for c in range(big_w - w + 1):
            px0, py0, px1, py1 = c * sx, r * sy, (c + w) * sx, (r + h) * sy
            overlap = max(0.0, min(x1, px1) - max(x0, px0)) * max(0.0, min(y1, py1) - max(y0, py0))
            centre = ((px0 + px1) / 2 - cx) ** 2 + ((py0 + py1) / 2 - cy) ** 2
            key = (-overlap, centre, r, c)
            if best is None or key < best:
                best = key
    assert best is not None
    return best[2], best[3]


@dataclass
class Replacement:
    """A patch a person points at, to become prototype ``index``.

    Attributes:
        index: the prototype to replace (index before the edit).
        image: a file path, a PIL picture, or None to take ``dataset_index`` from the dataset.
        box: ``[x0, y0, x1, y1]`` in the pixels of ``image`` as given (a file: its own pixels;
            it is resized to the model's square input and the box scaled with it).
        position: ``(row, col)`` of the patch's top-left latent cell, instead of a box.
        dataset_index: the dataset item the picture is (recorded in the provenance; used to
            read the picture when ``image`` is None).
        new_class: also move the prototype to this class (default: keep its class).
    """

    index: int
    image: Any = None
    box: Sequence[float] | None = None
    position: tuple[int, int] | None = None
    dataset_index: int | None = None
    new_class: int | None = None


@dataclass
class _Prepared:
    """A replacement turned into a latent patch."""

    request: Replacement
    vector: torch.Tensor  # (D, h, w)
    position: tuple[int, int]
    activation: torch.Tensor  # (H', W') similarity of the new prototype on its own picture
    picture: Any  # PIL picture at the model's input size
    path: str
    dataset_index: int | None
    selected_box: list[float] | None  # the person's box in the model-size picture's pixels


def _picture_for(model: ProtoPNet, request: Replacement, dataset: Any) -> tuple[Any, str, int | None, float]:
    """(model-size PIL picture, path, dataset index, scale from the given pixels to model pixels)."""
    from PIL import Image

    from .data.images import fit_square, open_image

    size = int(model.image_size)
    image, index = request.image, request.dataset_index
    if image is None:
        if index is None or dataset is None:
            raise ValueError(f"replacement of prototype {request.index}: give an image, or a dataset index and a dataset")
        picture = dataset.load_image(int(index)).convert("RGB")
        path = dataset.path(int(index)) if hasattr(dataset, "path") else f"item://{index}"
    elif isinstance(image, Image.Image):
        picture, path = image.convert("RGB"), getattr(image, "filename", "") or "<picture>"
    else:
        path = os.fspath(image)
        picture = open_image(path)
    width, height = picture.size
    if width != height and request.box is not None:
        logger.info("%s is %dx%d: it is resized to %dx%d (aspect not kept) and the box with it", path, width, height, size, size)
    scale = (size / width, size / height)
    return fit_square(picture, size), path, index, scale  # type: ignore[return-value]


@torch.no_grad()
def prepare_replacement(model: ProtoPNet, request: Replacement, dataset: Any = None) -> _Prepared:
    """Run the model on the pointed-at picture and cut out the latent patch (no change to the model)."""
    (j,) = check_prototype_indices(model, [request.index], "replace")
    if (request.box is None) == (request.position is None):
        raise ValueError(f"replacement of prototype {j}: give exactly one of a box (pixels) or a latent position (row, col)")
    picture, path, index, (sx, sy) = _picture_for(model, request, dataset)
    if index is None and dataset is not None and hasattr(dataset, "path"):
        index = _dataset_index_of(dataset, path)
    x = normalise(picture, model.mean, model.std).to(model.prototypes.device).unsqueeze(0)  # (1, 3, S, S)
    was_training = model.training
    model.eval()
    try:
        z = model.latent(x)  # (1, D, H, W)
    finally:
        model.train(was_training)
    big_h, big_w = z.shape[2], z.shape[3]
    h, w = model.prototype_size
    selected_box = None
    if request.box is not None:
        x0, y0, x1, y1 = (float(v) for v in request.box)
        selected_box = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
        r, c = patch_for_box(selected_box, int(model.image_size), (big_h, big_w), (h, w))
    else:
        r, c = (int(v) for v in request.position)  # type: ignore[union-attr]
        if not (0 <= r <= big_h - h and 0 <= c <= big_w - w):
            raise ValueError(
                f"replacement of prototype {j}: latent position ({r}, {c}) is outside the valid range "
                f"rows 0..{big_h - h}, cols 0..{big_w - w} of this model's {big_h}x{big_w} latent map"
            )
    vector = z[0, :, r : r + h, c : c + w].detach().clone()  # (D, h, w)
    activation = model.similarity(model.distances(z, vector.unsqueeze(0))[0, 0]).cpu()  # (H', W')
    return _Prepared(request, vector, (r, c), activation, picture, path, index, selected_box)


def _dataset_index_of(dataset: Any, path: str) -> int | None:
    """The item of ``dataset`` whose path is ``path`` (resolved file paths compared), if any."""
    try:
        wanted = os.path.realpath(path)
        for i in range(len(dataset)):
            if os.path.realpath(dataset.path(i)) == wanted:
                return i
    except Exception:  # noqa: BLE001 - a dataset without usable paths: nothing to record
        return None
    return None


# -- the whole edit ------------------------------------------------------------------------------

@dataclass
class EditReport:
    """What an edit did.

    Attributes:
        removed: old indices removed. relabelled: old index -> (old class, new class).
        replaced: one dict per replaced prototype (old index, source path, position, box).
        kept: for each new index, its old index.
        accuracy_before / accuracy_after: ``{"train": ..., "test": ...}`` (None where no data).
        last_layer: the re-fit's final terms (empty when not re-fitted).
        event: the entry appended to ``model.history``.
    """

    removed: list[int] = field(default_factory=list)
    relabelled: dict[int, tuple[int, int]] = field(default_factory=dict)
    replaced: list[dict[str, Any]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    accuracy_before: dict[str, float | None] = field(default_factory=dict)
    accuracy_after: dict[str, float | None] = field(default_factory=dict)
    last_layer: dict[str, float] = field(default_factory=dict)
    event: dict[str, Any] = field(default_factory=dict)
    pictures: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)  # new index -> PIL pictures

    def to_json(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "relabelled": {str(k): list(v) for k, v in self.relabelled.items()},
            "replaced": self.replaced,
            "kept": self.kept,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "last_layer": self.last_layer,
        }


def _accuracy(weight: torch.Tensor, sims: torch.Tensor | None, labels: torch.Tensor | None, names: Sequence[str]) -> float | None:
    if sims is None or labels is None or labels.numel() == 0:
        return None
    return accuracy_from_similarities(weight, sims, labels, names)["accuracy"]


@torch.no_grad()
def edit_model(
    model: ProtoPNet,
    train_dataset: Any = None,
    *,
    remove: Sequence[int] = (),
    relabel: Mapping[int, int] | None = None,
    replace: Sequence[Replacement] = (),
    test_dataset: Any = None,
    train_indices: Sequence[int] | None = None,
    refit: bool = True,
    iterations: int = 20,
    lr: float = 1e-4,
    l1: float = 1e-4,
    settings: RunSettings | None = None,
    seed: int = 0,
    percentile: float = 95.0,
    **fields: Unpack[RunFields],
) -> EditReport:
    """Apply a person's edits to ``model`` in place, re-fit the last layer and measure.

    Replacements and relabels are applied first, removals last; all indices are the model's
    before the edit (see the module docstring). The last layer is re-fitted on the similarities
    of ``train_dataset`` (unaugmented), computed in the same single pass that measures the
    accuracy before the edit: the pass measures the old prototypes and the replacement patches
    together, so before and after come from one scan of each dataset.

    Args:
        train_dataset: the images to re-fit the last layer on (needed when ``refit``; also used
            to read replacement pictures given by ``dataset_index``).
        remove: old indices to delete. relabel: old index -> new class.
        replace: :class:`Replacement` requests.
        test_dataset: where to measure accuracy before and after (optional).
        iterations, lr, l1: the last-layer re-fit (paper: Adam, lr 1e-4, L1 1e-4).
        settings, fields: how the scans of the datasets run (:class:`~protopnet.runtime.RunSettings`;
            default batch size 75); a field given as a keyword replaces that of ``settings``.
            Only the batch size, workers and device are used: the distances run in float32.
        percentile: for the replaced prototypes' boxes (paper Section 2.3: 95).

    Returns:
        an :class:`EditReport`; ``model.history`` gains its ``event``.

    Raises:
        PrototypeIndexError: an index outside ``[0, M)``, naming it and the range.
        ValueError: contradictory edits (the same prototype removed and replaced/relabelled,
            replaced twice), a bad class, or ``refit`` without a training dataset.
    """
    relabel = dict(relabel or {})
    removed = check_prototype_indices(model, remove, "remove")
    relabel_idx = check_prototype_indices(model, list(relabel), "relabel")
    replace_idx = [check_prototype_indices(model, [r.index], "replace")[0] for r in replace]
    if len(set(replace_idx)) != len(replace_idx):
        raise ValueError(f"prototype(s) {sorted({j for j in replace_idx if replace_idx.count(j) > 1})} replaced more than once")
    clash = sorted(set(removed) & (set(relabel_idx) | set(replace_idx)))
    if clash:
        raise ValueError(f"prototype(s) {clash} are both removed and relabelled/replaced; choose one")
    for j, k in relabel.items():
        _check_class(model, k)
    if not (removed or relabel or replace):
        raise ValueError("nothing to edit: give prototypes to remove, relabel or replace")
    if refit and train_dataset is None:
        raise ValueError("re-fitting the last layer needs the training images (train_dataset), or pass refit=False")

    prepared = [prepare_replacement(model, r, train_dataset) for r in replace]
    names = list(model.class_names)
    m = model.num_prototypes
    bank = model.prototypes.detach()
    if prepared:
        bank = torch.cat([bank, torch.stack([p.vector for p in prepared]).to(bank)])  # (M + R, D, h, w)

    run = RunSettings.merged(settings, 75, **fields)

    def scan(dataset: Any, indices: Sequence[int] | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if dataset is None:
            return None, None
        d, y, _ = scan_similarities(model, dataset, bank, indices=indices, settings=run)
        return model.similarity(d), y  # (N, M + R)

    train_sims, train_y = scan(train_dataset, train_indices) if refit else (None, None)
    test_sims, test_y = scan(test_dataset, None)
    weight_before = model.last_layer.weight.detach().clone()
    before = {
        "train": _accuracy(weight_before, None if train_sims is None else train_sims[:, :m], train_y, names),
        "test": _accuracy(weight_before, None if test_sims is None else test_sims[:, :m], test_y, names),
    }

    # Apply: replacements (vector, provenance, optional class), relabels, then removals.
    report = EditReport()
    columns = list(range(m))  # which similarity column serves each prototype
    for r, p in enumerate(prepared):
        j = p.request.index
        old_vector = model.prototypes.data[j].clone()
        model.prototypes.data[j] = p.vector.to(model.prototypes)
        columns[j] = m + r
        if p.request.new_class is not None and p.request.new_class != int(model.prototype_classes[j]):
            relabel[j] = int(p.request.new_class)
        moved = float(((old_vector - p.vector.to(old_vector)) ** 2).sum())
        entry = _replacement_provenance(model, j, p, moved, percentile)
        report.replaced.append({k: entry[k] for k in ("prototype", "path", "dataset_index", "position", "box", "selected_box")})
        report.pictures[j] = prototype_pictures(p.picture, p.activation.numpy(), entry["box"])
        if model.provenance is not None:
            model.provenance[j] = entry
        else:
            logger.warning("prototype %d replaced, but the model has no provenance (it was never pushed): nothing to update", j)
    for j, k in relabel.items():
        old = relabel_prototype(model, j, k)
        report.relabelled[j] = (old, int(k))
    kept = remove_prototypes(model, removed) if removed else list(range(m))
    report.removed, report.kept = removed, kept
    report.pictures = {kept.index(j): pics for j, pics in report.pictures.items()}
    for item in report.replaced:
        item["prototype_after"] = kept.index(item["prototype"])

    cols = torch.tensor([columns[j] for j in kept], dtype=torch.long)
    new_train = None if train_sims is None else train_sims[:, cols]  # (N, M')
    new_test = None if test_sims is None else test_sims[:, cols]
    if refit and new_train is not None:
        report.last_layer = refit_last_layer(model, new_train, train_y, iterations=iterations, lr=lr, l1=l1, seed=seed)
    weight_after = model.last_layer.weight.detach()
    after = {"train": _accuracy(weight_after, new_train, train_y, names), "test": _accuracy(weight_after, new_test, test_y, names)}
    report.accuracy_before, report.accuracy_after = before, after
    report.event = {
        "event": "edit",
        "when": now_utc(),
        "what": {
            "removed": removed,
            "relabelled": {str(j): {"from": o, "to": n} for j, (o, n) in report.relabelled.items()},
            "replaced": report.replaced,
            "kept": kept,
        },
        "prototypes_before": m,
        "prototypes_after": len(kept),
        "last_layer_refit": {"iterations": iterations, "lr": lr, "l1": l1} if refit else None,
        "accuracy_before": before,
        "accuracy_after": after,
    }
    model.history.append(report.event)
    logger.info("edit: removed %d, relabelled %d, replaced %d; test accuracy %s -> %s", len(removed), len(report.relabelled), len(prepared), before["test"], after["test"])
    return report


def _replacement_provenance(model: ProtoPNet, j: int, p: _Prepared, moved: float, percentile: float) -> dict[str, Any]:
    size = int(model.image_size)
    box, _ = activation_box(p.activation, (size, size), percentile)
    k = int(model.prototype_classes[j])
    return {
        "prototype": j,
        "class_index": k,
        "class_name": model.class_names[k],
        "dataset_index": p.dataset_index,
        "path": p.path,
        "position": [int(p.position[0]), int(p.position[1])],
        "distance": moved,
        "box": box,
        "image_size": [size, size],
        "activation": [[round(float(v), 6) for v in row] for row in p.activation.tolist()],
        "source": "edit",
        "selected_box": [round(v, 3) for v in p.selected_box] if p.selected_box is not None else None,
        "edited": now_utc(),
    }


def save_pruned(model: ProtoPNet, report: PruneReport, out: str | os.PathLike[str], *, dataset: Any = None,
                source_directory: str | os.PathLike[str] | None = None) -> Path:
    """Save a model pruned by :func:`protopnet.prune.prune` to ``out`` with ``pruning.json``
    and ``pruning.html`` beside it.

    Args:
        dataset: the training images; when given, the HTML shows each pruned prototype's nearest
            patches as pictures (embedded, so the page is one self-contained file).
        source_directory: the model directory before pruning; the pruned prototypes' own
            pictures are taken from it when present.
    """
    from .explain.reports import write_pruning_report

    summary = {
        "pruning": {
            "k": report.k,
            "threshold": report.threshold,
            "per_image": report.per_image,
            "removed": report.removed,
            "accuracy": report.accuracy,
        }
    }
    path = save_edited_model(model, out, extra=summary)
    write_pruning_report(report, path, dataset=dataset, source_directory=source_directory)
    return path
