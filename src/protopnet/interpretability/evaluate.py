"""All the interpretability figures of a model on a dataset, in one streamed pass.

:func:`evaluate_interpretability` measures, on a dataset with part annotations (CUB-200-2011's
15 part locations, or the built-in synthetic dataset's class-glyph boxes):

* ``consistency`` and ``stability`` (Huang et al., ICCV 2023; see
  :mod:`protopnet.interpretability.parts` for the exact definitions adopted), with two reference
  points for consistency on the same pictures (:mod:`protopnet.interpretability.baselines`):
  ``consistency_fixed_cell``, a detector always peaking at the best single cell, and
  ``consistency_random_peak``, one peaking at a random cell in each picture (chance);
* ``prototype_localization`` (:func:`~protopnet.interpretability.prototype_localization`: the
  fraction of pushed prototypes whose box centre lies in their source image's part box) and
  ``activation_localization``: for each test image, the most activated prototype *of the image's
  own class*; the fraction of images where the centre of that prototype's 95th-percentile box
  (the region push draws, :mod:`protopnet.regions`) lies inside the image's part box (data with
  part boxes only);
* ``deletion_gap`` (:mod:`protopnet.interpretability.deletion`): how much more the predicted
  class's logit drops when the prototypes' evidence is masked than when random cells are;
* ``purity``: the mean, over prototypes, of the fraction of its ``k`` nearest training patches
  (one per image, :func:`protopnet.explain.nearest_patches`) that come from its own class;
* ``duplicates``: how many prototypes share their source patch (same image and position) with
  an earlier prototype; measured with consistency or stability, ``consistency_distinct`` and
  ``stability_distinct`` count each group of copies once (its first prototype), so that ten
  copies of one patch do not weigh ten times.

The test images are read once, in batches: each batch gets one forward pass (plus one on the
noisy images for stability, and the masked copies for deletion), and only per-prototype counts
survive it, so memory does not grow with the dataset. Region finding is vectorised over all
(image, prototype) pairs of a batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Sequence, Unpack

import torch

from ..regions import box_center, point_in_box
from ..runtime import Progress, RunFields, RunSettings
from .baselines import DRAWS, PositionBaselines
from .deletion import DeletionCurves
from .localization import prototype_localization
from .parts import NOISE_CLIP, NOISE_STD, THRESHOLD, PartCounter, annotation_points, covered_parts, peak_locations, perturbation, region_half_size

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)

METRICS = ("consistency", "stability", "localization", "deletion", "purity", "duplicates")

#: The scalar figures at the top of the result, in display order.
SCALARS = (
    "consistency",
    "consistency_fixed_cell",
    "consistency_fixed_cell_mean",
    "consistency_random_peak",
    "stability",
    "prototype_localization",
    "activation_localization",
    "deletion_gap",
    "purity",
    "duplicates",
    "consistency_distinct",
    "stability_distinct",
)

DEFINITIONS = {
    "consistency": "fraction of prototypes whose activated region (a square of about a third of the image side around the peak "
    "of the upsampled activation map) covers the same annotated part in at least 80% of their class's test images "
    "(Huang et al., ICCV 2023)",
    "consistency_fixed_cell": "consistency of a detector that ignores the picture and always peaks at one cell of the "
    "activation grid, the best single cell for all prototypes (the position prior of the data: the floor to beat)",
    "consistency_fixed_cell_mean": "consistency of a detector that always peaks at one cell, averaged over the cells of the "
    "activation grid (a fixed position chosen without looking at the data)",
    "consistency_random_peak": "expected consistency of a detector peaking at a cell drawn uniformly at random in each "
    "picture (chance; estimated by seeded sampling)",
    "stability": "mean over prototypes of the fraction of their class's test images whose covered parts stay the same when "
    "Gaussian noise (std 0.2, clipped to 0.25, on the normalised image) is added (Huang et al., ICCV 2023)",
    "prototype_localization": "fraction of pushed prototypes whose box centre lies in the class-defining part of their source image",
    "activation_localization": "fraction of test images whose most activated own-class prototype has its box centre in the "
    "image's class-defining part",
    "deletion_gap": "area between the predicted-class logit curves when masking random cells and when masking the cells the "
    "prototypes point at, over the masked fraction 0..1 (positive: the evidence matters)",
    "purity": "mean fraction of each prototype's k nearest training patches (one per image) that belong to its class",
    "duplicates": "prototypes whose source patch (image and position) is the same as an earlier prototype's",
    "consistency_distinct": "consistency over the distinct prototypes only (each group of duplicates counted once)",
    "stability_distinct": "stability over the distinct prototypes only (each group of duplicates counted once)",
}


def _similarity_groups(model: ProtoPNet | Ensemble, output: Any) -> list[tuple[int, torch.Tensor]]:
    """``(offset, similarity maps (B, M_i, H_i', W_i'))`` per prototype group: one for a
    ProtoPNet, one per member for an :class:`~protopnet.ensemble.Ensemble` (whose members'
    grids may differ)."""
    distances = output.distances
    if isinstance(distances, (list, tuple)):
        groups, offset = [], 0
        for member, d in zip(model.members, distances):
            groups.append((offset, member.similarity(d)))
            offset += d.shape[1]
        return groups
    return [(0, model.similarity(distances))]


def _last_layer_weight(model: ProtoPNet | Ensemble) -> torch.Tensor:
    """(K, M) last-layer weights."""
    if hasattr(model, "last_layer_weight"):
        return model.last_layer_weight.detach()
    return model.last_layer.weight.detach()


def _latent_grid(model: ProtoPNet | Ensemble, sims: torch.Tensor) -> tuple[int, int]:
    """The latent map's (H, W) from a (B, M, H', W') map: H' + h - 1 for h x w prototypes (of
    the first member, for an ensemble). With a stride dividing the picture, its cells are equal."""
    ph, pw = getattr(model, "prototype_size", None) or getattr(model.members[0], "prototype_size", (1, 1))
    return int(sims.shape[-2]) + int(ph) - 1, int(sims.shape[-1]) + int(pw) - 1


def _probe_annotations(dataset: Any, indices: Sequence[int]) -> tuple[bool, bool]:
    """Whether the dataset has part points / part boxes, judged on up to 16 items spread over it."""
    if not hasattr(dataset, "annotation") or not indices:
        return False, False
    step = max(1, len(indices) // 16)
    points = boxes = False
    for i in list(indices)[::step][:16]:
        try:
            annotation = dataset.annotation(int(i))
        except (OSError, ValueError):
            continue
        points = points or bool(annotation_points(annotation))
        boxes = boxes or getattr(annotation, "part_box", None) is not None
    return points, boxes


def _finite(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


@torch.no_grad()
def evaluate_interpretability(
    model: ProtoPNet | Ensemble,
    dataset: Any,
    *,
    train_dataset: Any = None,
    metrics: Sequence[str] = METRICS,
    indices: Sequence[int] | None = None,
    settings: RunSettings | None = None,
    threshold: float = THRESHOLD,
    half_size: int | None = None,
    noise_std: float = NOISE_STD,
    noise_clip: float = NOISE_CLIP,
    deletion_steps: int = 10,
    deletion_grid: int | Sequence[int] | None = None,
    k: int = 5,
    seed: int = 0,
    baseline_draws: int = DRAWS,
    progress: Progress | None = None,
    **fields: Unpack[RunFields],
) -> dict[str, Any]:
    """Measure how interpretable ``model`` is on ``dataset`` (usually the test split).

    Args:
        model: a :class:`~protopnet.ProtoPNet` (or an :class:`~protopnet.ensemble.Ensemble`:
            purity is then skipped), run in eval mode; its training flag is restored.
        dataset: a ProtoDataset read without augmentation. Part metrics need
            ``dataset.annotation(i)`` with ``parts`` or ``part_box``.
        train_dataset: the push / training dataset: purity scans it for nearest patches and
            prototype localisation reads the prototypes' source images from it (default:
            ``dataset``; localisation is skipped when the provenance paths do not match it).
        metrics: any of :data:`METRICS`.
        indices: which items of ``dataset`` to use (default all).
        settings, fields: how the passes run (:class:`~protopnet.runtime.RunSettings`; default
            batch size 64); a field given as a keyword replaces that of ``settings``. Its batch
            size, workers and device are used.
        threshold: consistency threshold (0.8). half_size: region half-side in pixels (default
            :func:`~protopnet.interpretability.parts.region_half_size`). noise_std, noise_clip:
            stability noise. deletion_steps: points per deletion curve minus one. deletion_grid:
            cells per side (or (rows, cols)) for deletion (default: the latent grid H x W, one
            cell per latent position's footprint).
            k: nearest patches for purity. seed: seeds the stability noise, random deletion and
            the random-peak sampling. baseline_draws: Monte Carlo draws for
            ``consistency_random_peak`` (:mod:`~protopnet.interpretability.baselines`).
        progress: called with the number of images of each batch of the test pass.

    Returns:
        A JSON-able dict: the scalars of :data:`SCALARS` (None when skipped), ``n_images``,
        ``n_prototypes``, ``parts`` (part names met), ``prototypes`` (class of each),
        ``details`` (per metric: per-prototype values, curves; ``consistency_baselines``: the
        fixed-cell and random-peak reference points of
        :meth:`~protopnet.interpretability.baselines.PositionBaselines.result`, on the activation
        grid of the first member for an ensemble), ``skipped`` (metric -> why),
        ``settings``, ``definitions`` and ``timings`` (seconds per stage).

    Raises:
        ValueError: an unknown metric name.
    """
    from ..train.loader import BadImageLog, IndexedSubset, make_loader

    wanted = set(metrics)
    unknown = wanted - set(METRICS)
    if unknown:
        raise ValueError(f"unknown interpretability metric(s) {sorted(unknown)}; choose from {list(METRICS)}")
    run = RunSettings.merged(settings, 64, **fields).for_model(model)
    device = run.device
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    size = int(getattr(dataset, "image_size", getattr(model, "image_size", 224)))
    half = int(half_size) if half_size is not None else region_half_size(size)
    m = int(model.num_prototypes)
    classes = model.prototype_classes.detach().to(device)  # (M,)
    weight = _last_layer_weight(model).to(device)  # (K, M)
    timings: dict[str, float] = defaultdict(float)
    skipped: dict[str, str] = {}
    details: dict[str, Any] = {}
    scalars: dict[str, Any] = {name: None for name in SCALARS}

    has_points, has_boxes = _probe_annotations(dataset, indices)
    want_parts = bool(wanted & {"consistency", "stability"})
    if want_parts and not has_points:
        for name in ("consistency", "stability"):
            if name in wanted:
                skipped[name] = "the dataset has no part annotations (parts or part boxes)"
        want_parts = False
    want_stability = want_parts and "stability" in wanted
    want_activation = "localization" in wanted and has_boxes
    if "localization" in wanted and not has_boxes:
        skipped["activation_localization"] = "the dataset has no part boxes (the built-in synthetic dataset has)"
    want_deletion = "deletion" in wanted

    counter = PartCounter(m) if want_parts else None
    baselines: PositionBaselines | None = None  # made on the first batch, once the grid is known
    deletion: DeletionCurves | None = None
    hits = seen_boxes = 0
    chance = 0.0
    per_image_hits: list[bool] = []
    n_images = 0
    was_training = model.training
    model.eval()
    start_all = time.perf_counter()
    try:
        if want_parts or want_activation or want_deletion:
            loader = make_loader(IndexedSubset(dataset, indices, augment=False), run.batch_size, num_workers=run.num_workers, pin_memory=device.type == "cuda")
            bad_images = BadImageLog()
            for batch in loader:
                bad_images.add(batch.bad)
                if batch.images is None:
                    continue
                t0 = time.perf_counter()
                images = batch.images.to(device, non_blocking=True)  # (B, 3, S, S)
                labels = batch.labels.to(device)  # (B,)
                output = model(images)
                groups = _similarity_groups(model, output)  # [(offset, (B, M_i, H', W'))]
                t1 = time.perf_counter()
                timings["forward"] += t1 - t0
                annotations = [dataset.annotation(int(i)) for i in batch.indices] if (want_parts or want_activation) else []
                timings["annotations"] += time.perf_counter() - t1

                if counter is not None:
                    t0 = time.perf_counter()
                    points, visible = counter.encode(annotations)  # (B, Q, 2), (B, Q)
                    if "consistency" in wanted:
                        if baselines is None:  # the activation grid of the (first member's) prototypes
                            baselines = PositionBaselines(tuple(groups[0][1].shape[-2:]), size, half, classes)
                        baselines.add(labels, points, visible)
                    noisy_groups = None
                    if want_stability:
                        noise = torch.stack([perturbation(images.shape[1:], seed, int(i), noise_std, noise_clip) for i in batch.indices]).to(device)
                        noisy_groups = _similarity_groups(model, model(images + noise))
                    for g, (offset, sims) in enumerate(groups):
                        # Every (image, prototype of the image's class) pair of this group.
                        b_idx, j_idx = torch.nonzero(labels[:, None] == classes[None, offset : offset + sims.shape[1]], as_tuple=True)
                        if b_idx.numel() == 0:
                            continue
                        pts, vis = points[b_idx.cpu()], visible[b_idx.cpu()]  # (P, Q, 2), (P, Q)
                        covered = covered_parts(peak_locations(sims[b_idx, j_idx], size), pts, vis, half)  # (P, Q)
                        stable = None
                        if noisy_groups is not None:
                            noisy = covered_parts(peak_locations(noisy_groups[g][1][b_idx, j_idx], size), pts, vis, half)
                            stable = (covered == noisy).all(dim=1)  # (P,)
                        counter.add(j_idx + offset, covered, vis, stable)
                    timings["consistency_stability"] += time.perf_counter() - t0

                if want_activation:
                    t0 = time.perf_counter()
                    h, s, c = _activation_localization(groups, output.similarities, labels, classes, annotations, size)
                    hits += h
                    seen_boxes += s
                    chance += c
                    timings["activation_localization"] += time.perf_counter() - t0

                if want_deletion:
                    t0 = time.perf_counter()
                    if deletion is None:
                        grid = deletion_grid if deletion_grid is not None else _latent_grid(model, groups[0][1])
                        grid = (int(grid), int(grid)) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
                        deletion = DeletionCurves(size, grid, deletion_steps, seed)
                    deletion.add(model, images, output.logits, groups, weight, batch.indices)
                    timings["deletion"] += time.perf_counter() - t0
                n_images += len(batch.indices)
                if progress is not None:
                    progress(len(batch.indices))

        if counter is not None:
            details["consistency"] = counter.consistency(threshold)
            scalars["consistency"] = details["consistency"]["score"] if "consistency" in wanted else None
            if want_stability:
                details["stability"] = counter.stability()
                scalars["stability"] = details["stability"]["score"]
            if scalars["consistency"] is None and "consistency" in wanted:
                skipped["consistency"] = "no test image of any prototype's class"
            if baselines is not None:
                t0 = time.perf_counter()
                details["consistency_baselines"] = baselines.result(counter.num_parts, threshold, baseline_draws, seed)
                scalars["consistency_fixed_cell"] = details["consistency_baselines"]["fixed_cell"]["score"]
                scalars["consistency_fixed_cell_mean"] = details["consistency_baselines"]["fixed_cell"]["mean_over_cells"]
                scalars["consistency_random_peak"] = details["consistency_baselines"]["random_peak"]["score"]
                timings["consistency_baselines"] += time.perf_counter() - t0
        if want_activation:
            details["activation_localization"] = {
                "score": hits / seen_boxes if seen_boxes else None,
                "n": seen_boxes,
                "chance": chance / seen_boxes if seen_boxes else None,
            }
            scalars["activation_localization"] = details["activation_localization"]["score"]
        if deletion is not None:
            details["deletion"] = deletion.result()
            scalars["deletion_gap"] = details["deletion"]["gap"]

        if "localization" in wanted:
            t0 = time.perf_counter()
            push_data = train_dataset if train_dataset is not None else dataset
            result, reason = _prototype_localization(model, push_data)
            if result is None:
                skipped["prototype_localization"] = reason
            else:
                details["prototype_localization"] = result
                scalars["prototype_localization"] = result["localization"]
            timings["prototype_localization"] += time.perf_counter() - t0

        if "purity" in wanted:
            t0 = time.perf_counter()
            if not hasattr(model, "latent"):
                skipped["purity"] = "purity needs a single ProtoPNet (nearest patches live in one latent space)"
            else:
                scan = train_dataset if train_dataset is not None else dataset
                details["purity"] = _purity(model, scan, k, run, "train" if train_dataset is not None else "evaluated")
                scalars["purity"] = details["purity"]["score"]
            timings["purity"] += time.perf_counter() - t0

        if "duplicates" in wanted:
            t0 = time.perf_counter()
            duplicates = _duplicates(model)
            if duplicates is None:
                skipped["duplicates"] = "no push provenance and no prototype vectors to compare"
            else:
                details["duplicates"] = duplicates
                scalars["duplicates"] = duplicates["count"]
                distinct = [j for j, copied in enumerate(duplicates["duplicate_of"]) if copied is None]
                if "consistency" in details and "consistency" in wanted:
                    scalars["consistency_distinct"] = _mean_over(details["consistency"]["consistent"], distinct)
                if "stability" in details:
                    scalars["stability_distinct"] = _mean_over(details["stability"]["per_prototype"], distinct)
            timings["duplicates"] += time.perf_counter() - t0
    finally:
        model.train(was_training)
    timings["total"] = time.perf_counter() - start_all

    names = list(getattr(model, "class_names", [])) or [str(i) for i in range(int(weight.shape[0]))]
    prototype_classes = classes.cpu().tolist()
    result = {
        **{name: _finite(value) for name, value in scalars.items()},
        "n_images": n_images,
        "n_prototypes": m,
        "parts": list(counter.names) if counter is not None else [],
        "prototypes": {"class_index": prototype_classes, "class_name": [names[c] for c in prototype_classes]},
        "details": details,
        "skipped": skipped,
        "settings": {
            "image_size": size,
            "region_half_size": half,
            "threshold": float(threshold),
            "noise_std": float(noise_std),
            "noise_clip": float(noise_clip),
            "deletion_steps": int(deletion_steps),
            "k": int(k),
            "seed": int(seed),
            "baseline_draws": int(baseline_draws),
        },
        "definitions": {name: DEFINITIONS[name] for name in SCALARS},
        "timings": {name: round(value, 4) for name, value in timings.items()},
    }
    for name, reason in skipped.items():
        logger.info("interpretability: %s skipped: %s", name, reason)
    return result


def _activation_localization(
    groups: Sequence[tuple[int, torch.Tensor]],
    similarities: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor,
    annotations: Sequence[Any],
    size: int,
) -> tuple[int, int, float]:
    """(hits, images with a part box and an own-class prototype, summed part-area shares) of one batch.

    ``similarities`` (B, M): each prototype's best similarity on each image.
    """
    from ..explain.boxes import activation_boxes

    own = labels[:, None] == classes[None, :]  # (B, M)
    scores = similarities.float().masked_fill(~own, float("-inf"))
    best = scores.argmax(dim=1).cpu()  # (B,)
    usable = own.any(dim=1).cpu()
    hits = seen = 0
    chance = 0.0
    for offset, sims in groups:
        m = sims.shape[1]
        rows = [b for b in range(len(annotations)) if usable[b] and offset <= int(best[b]) < offset + m and annotations[b].part_box is not None]
        if not rows:
            continue
        maps = sims[torch.tensor(rows, device=sims.device), (best[rows] - offset).to(sims.device)]  # (R, H', W')
        boxes = activation_boxes(maps, (size, size))  # (R, 4)
        for row, box in zip(rows, boxes.tolist()):
            part = annotations[row].part_box
            hits += bool(point_in_box(box_center(box), part))
            seen += 1
            chance += (part[2] - part[0]) * (part[3] - part[1]) / float(size * size)
    return hits, seen, chance


def _prototype_localization(model: ProtoPNet | Ensemble, push_data: Any) -> tuple[dict[str, Any] | None, str]:
    """:func:`prototype_localization` when the provenance refers to ``push_data``'s images."""
    provenance = getattr(model, "provenance", None)
    if not provenance:
        return None, "the model has no push provenance: push it first"
    if any(entry is None for entry in provenance):
        return None, "some prototypes were never pushed"
    for entry in provenance:
        index = int(entry["dataset_index"])
        if not 0 <= index < len(push_data):
            return None, f"prototype {entry.get('prototype')} comes from item {index}, outside the push dataset given ({len(push_data)} items)"
        if hasattr(push_data, "path") and entry.get("path") is not None and push_data.path(index) != entry["path"]:
            return None, f"the push dataset given is not the one the model was pushed on ({push_data.path(index)!r} != {entry['path']!r})"
    if getattr(push_data.annotation(int(provenance[0]["dataset_index"])), "part_box", None) is None:
        return None, "the push dataset has no part boxes (the built-in synthetic dataset has)"
    try:
        result = prototype_localization(model, push_data)
    except ValueError as error:
        return None, str(error)
    return {**result, "per_prototype": [bool(v) for v in result["per_prototype"]]}, ""


def _purity(model: ProtoPNet, scan: Any, k: int, settings: RunSettings, split: str) -> dict[str, Any]:
    """Class purity of each prototype's ``k`` nearest patches in ``scan``."""
    from ..explain.nearest import nearest_patches

    near = nearest_patches(model, scan, k, settings=settings, keep_activations=False)
    purity = near.purity()  # (M,) NaN where no patch
    valid = ~torch.isnan(purity)
    targets = torch.as_tensor(list(getattr(scan, "targets", [])), dtype=torch.long)
    chance = None
    if targets.numel():
        share = torch.bincount(targets, minlength=int(model.num_classes)).double() / targets.numel()  # (K,)
        chance = float(share[near.prototype_classes].mean())
    return {
        "score": float(purity[valid].mean()) if bool(valid.any()) else None,
        "k": int(k),
        "split": split,
        "chance": chance,
        "per_prototype": [None if math.isnan(v) else round(v, 6) for v in purity.tolist()],
        "same_class_count": [int(v) for v in near.same_class_count().tolist()],
    }


def _mean_over(values: Sequence[float | bool | None], indices: Sequence[int]) -> float | None:
    """Mean of ``values`` at ``indices``, leaving out None (prototypes with no image of their
    class); None when nothing is left."""
    kept = [float(values[j]) for j in indices if values[j] is not None]
    return sum(kept) / len(kept) if kept else None


def _duplicates(model: ProtoPNet | Ensemble) -> dict[str, Any] | None:
    """Groups of prototypes with the same source patch: same image (dataset index) and latent
    position from the push provenance (and the same member, for ensembles); without provenance,
    identical prototype vectors."""
    provenance = getattr(model, "provenance", None)
    groups: dict[Any, list[int]] = {}
    if provenance and any(entry is not None for entry in provenance):
        method = "provenance: same source image and patch position"
        for j, entry in enumerate(provenance):
            if entry is None:
                continue
            key = (entry.get("member"), int(entry["dataset_index"]), tuple(int(v) for v in entry["position"]))
            groups.setdefault(key, []).append(j)
    elif isinstance(getattr(model, "prototypes", None), torch.Tensor):
        method = "identical prototype vectors (no push provenance)"
        flat = model.prototypes.detach().flatten(1).cpu()
        _, inverse = torch.unique(flat, dim=0, return_inverse=True)
        for j, key in enumerate(inverse.tolist()):
            groups.setdefault(key, []).append(j)
    else:
        return None
    shared = sorted(g for g in groups.values() if len(g) > 1)
    classes = model.prototype_classes.detach().cpu().tolist()
    duplicate_of: list[int | None] = [None] * int(model.num_prototypes)
    for group in shared:
        for j in group[1:]:
            duplicate_of[j] = group[0]
    return {
        "count": sum(len(g) - 1 for g in shared),
        "groups": shared,
        "cross_class_groups": sum(1 for g in shared if len({classes[j] for j in g}) > 1),
        "duplicate_of": duplicate_of,
        "method": method,
    }
