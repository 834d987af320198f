"""Where prototypes start: class-distinctive latent patches (``model.prototype_init: distinctive``).

The paper starts prototypes at uniform noise; ``patches`` starts each at a random latent patch of a
picture of its class. Most of a picture is background that every class shares, so most random
patches are background, and the cluster cost (which pulls only each picture's nearest own-class
prototype) may never move them: they end as background prototypes that pruning removes, or that
point at places that mean nothing from picture to picture.

``distinctive`` starts each prototype on a patch that only its class has. For a sample of training
pictures it computes every latent patch and, for each patch, its ``neighbours`` nearest patches
among the sampled pictures of *all* classes (patches of the same picture left out). A patch whose
neighbours are mostly of its own class is distinctive of that class — the property the paper's
pruning (Section 2.6) asks of a prototype after training, used here before it. Each class's
prototypes take its most distinctive patches, at most one per picture so they start on different
birds. No annotation is used.

Shapes: N sampled pictures, D latent channels, H x W latent map, h x w prototype, P = H' x W'
patch positions per picture.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.base import ProtoDataset
from ..model.protopnet import ProtoPNet
from ..model.surgery import reset_connection
from ..runtime import RunSettings, autocast
from .loader import BadImageLog, BadItem, stream_batches


def latent_patches(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Every h x w window of a latent map, flattened: (N, D, H, W) -> (N, P, D*h*w)."""
    n, d = z.shape[:2]
    h, w = size
    windows = F.unfold(z, kernel_size=(h, w))  # (N, D*h*w, P)
    return windows.transpose(1, 2).reshape(n, -1, d * h * w)


@torch.no_grad()
def distinctive_patches(
    z: torch.Tensor,
    labels: torch.Tensor,
    prototype_classes: torch.Tensor,
    size: tuple[int, int],
    *,
    neighbours: int = 10,
    chunk: int = 2048,
    distance: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose a starting patch for every prototype: its class's most distinctive patches.

    Args:
        z: (N, D, H, W) latent maps of the sampled training pictures.
        labels: (N,) their classes.
        prototype_classes: (M,) the class of each prototype.
        size: (h, w) of a prototype.
        neighbours: how many nearest patches (of other pictures) decide a patch's distinctiveness.
        distance: the model's distance (``l2`` or ``cosine``), which decides "nearest": with
            ``cosine`` the neighbours are searched among the patches scaled to unit length.

    Returns:
        ``(prototypes (M, D, h, w), picture (M,) index into z, position (M,) patch index in
        0..P-1)``. A class with fewer sampled pictures than prototypes reuses pictures (their next
        most distinctive patches).

    Raises:
        ValueError: a prototype's class has no sampled picture.
    """
    n, d, _, _ = z.shape
    h, w = size
    patches = latent_patches(z.float(), size)  # (N, P, F)
    p = patches.shape[1]
    flat = patches.reshape(n * p, -1)  # (N*P, F)
    owner = torch.arange(n).repeat_interleave(p)  # (N*P,) picture of each patch
    patch_labels = labels.cpu().repeat_interleave(p)  # (N*P,)
    if distance not in ("l2", "cosine"):
        raise ValueError(f"unknown distance {distance!r}; choose one of ('l2', 'cosine')")
    search = F.normalize(flat, dim=1) if distance == "cosine" else flat  # (N*P, F): what "nearest" measures
    norms = (search * search).sum(1)  # (N*P,)
    k = min(neighbours, n * p - p)
    purity = torch.zeros(n * p)
    margin = torch.zeros(n * p)  # tie-break: how much nearer own-class neighbours are
    for start in range(0, n * p, chunk):
        rows = search[start : start + chunk]  # (C, F)
        dist = norms[start : start + chunk, None] - 2 * rows @ search.t() + norms[None, :]  # (C, N*P)
        dist.masked_fill_(owner[start : start + chunk, None] == owner[None, :], float("inf"))
        nearest_d, nearest = dist.topk(k, dim=1, largest=False)  # (C, k)
        same = patch_labels[nearest] == patch_labels[start : start + chunk, None]  # (C, k)
        purity[start : start + chunk] = same.float().mean(1)
        margin[start : start + chunk] = -(nearest_d * same).sum(1) / same.sum(1).clamp(min=1)
    # Rank by purity, then by closeness of the own-class neighbours; lexicographic via stable sorts.
    order = torch.argsort(margin, descending=True, stable=True)
    order = order[torch.argsort(purity[order], descending=True, stable=True)]

    m = prototype_classes.numel()
    chosen = torch.full((m,), -1, dtype=torch.long)
    for k_class in prototype_classes.unique().tolist():
        slots = torch.nonzero(prototype_classes.cpu() == k_class).flatten().tolist()
        candidates = [int(i) for i in order[patch_labels[order] == k_class]]
        if not candidates:
            raise ValueError(f"class {k_class} has no sampled training picture to start its prototypes from")
        used_pictures: set[int] = set()
        picks: list[int] = []
        # one patch per picture first; once every picture has one, the next best patches
        for pass_ in (0, 1):
            for i in candidates:
                if len(picks) == len(slots):
                    break
                picture = int(owner[i])
                if (pass_ == 0 and picture in used_pictures) or i in picks:
                    continue
                picks.append(i)
                used_pictures.add(picture)
        while len(picks) < len(slots):  # fewer patches than prototypes: repeat
            picks.append(picks[len(picks) % len(candidates)])
        chosen[slots] = torch.tensor(picks)
    prototypes = flat[chosen].reshape(m, d, h, w)
    return prototypes, owner[chosen], chosen % p


def _pictures_by_class(dataset: ProtoDataset, indices: Sequence[int]) -> dict[int, list[int]]:
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(int(dataset.targets[i]), []).append(i)
    return by_class


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 7919 + 5)


@torch.no_grad()
def start_on_patches(
    model: ProtoPNet,
    dataset: ProtoDataset,
    indices: Sequence[int],
    *,
    seed: int,
    settings: RunSettings,
    bad_images: BadImageLog | None = None,
) -> None:
    """``model.prototype_init: patches``: prototype j of class k becomes the latent patch at a
    random place of a random training picture of class k (add-on layers as initialised, eval
    mode), in place. ``dataset`` is read without augmentation; ``indices`` are its training items;
    ``settings`` gives the batch size, device, precision and layout; the choice is a function of
    ``seed`` alone. Unreadable pictures are skipped (and recorded in
    ``bad_images``).

    Raises:
        ValueError: a class has no readable training picture.
    """
    generator = _generator(seed)
    by_class = _pictures_by_class(dataset, indices)
    classes = model.prototype_classes.tolist()

    def picture_of(k: int) -> torch.Tensor:
        pool = by_class.get(k, [])
        for p in torch.randperm(len(pool), generator=generator).tolist():
            try:
                return dataset.to_tensor(dataset.load_image(pool[p]))
            except (OSError, ValueError, SyntaxError) as error:  # unreadable: try another
                if bad_images is not None:
                    bad_images.add([BadItem(pool[p], str(dataset.path(pool[p])), str(error))])
        raise ValueError(f"model.prototype_init: patches: class {model.class_names[k]!r} has no readable training picture")

    settings = settings.for_model(model)
    h, w = model.prototype_size
    was_training = model.training
    model.eval()
    new = model.prototypes.detach().clone()
    for start in range(0, len(classes), settings.batch_size):
        picked = classes[start : start + settings.batch_size]
        images = torch.stack([picture_of(k) for k in picked]).to(settings.device).to(memory_format=settings.memory_format)
        with autocast(settings.device, settings.precision):
            z = model.latent(images).float()  # (B, D, H, W)
        for b in range(len(picked)):
            r = int(torch.randint(z.shape[2] - h + 1, (1,), generator=generator))
            c = int(torch.randint(z.shape[3] - w + 1, (1,), generator=generator))
            new[start + b] = z[b, :, r : r + h, c : c + w]
    model.prototypes.copy_(new)
    model.train(was_training)


def _sampled_latents(
    model: ProtoPNet,
    dataset: ProtoDataset,
    indices: Sequence[int],
    *,
    seed: int,
    settings: RunSettings,
    bad_images: BadImageLog | None,
    patch_budget: int,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A seeded sample of training pictures per class (as many as keep the patch count near
    ``patch_budget``, at least two prototypes' worth) and their latent maps, eval mode:
    ``(z (N, D, H, W) float32 on the CPU, labels (N,), dataset index of each row)``."""
    generator = _generator(seed)
    by_class = _pictures_by_class(dataset, indices)
    grid = int(dataset.image_size) // max(int(getattr(model, "stride", 0) or 1), 1)
    per_picture = max(grid * grid, 1)
    prototypes_per_class = max(1, model.num_prototypes // max(model.num_classes, 1))
    per_class = max(2 * prototypes_per_class, patch_budget // (per_picture * max(len(by_class), 1)))
    sample: list[int] = []
    for k in sorted(by_class):
        pool = by_class[k]
        sample += [pool[p] for p in torch.randperm(len(pool), generator=generator)[:per_class].tolist()]
    settings = settings.for_model(model)
    was_training = model.training
    model.eval()
    latents, labels, items = [], [], []
    for images, batch_labels, batch_items in stream_batches(dataset, indices=sample, settings=settings, bad_images=bad_images):
        with autocast(settings.device, settings.precision):
            latents.append(model.latent(images).float().cpu())
        labels.append(batch_labels.cpu())
        items += [int(i) for i in batch_items]
    model.train(was_training)
    return torch.cat(latents), torch.cat(labels), items


@torch.no_grad()
def start_on_distinctive_patches(
    model: ProtoPNet,
    dataset: ProtoDataset,
    indices: Sequence[int],
    *,
    seed: int,
    settings: RunSettings,
    bad_images: BadImageLog | None = None,
    patch_budget: int = 16384,
) -> None:
    """``model.prototype_init: distinctive``, in place: a seeded sample of training pictures per
    class (as many as keep the patch count near ``patch_budget``, at least two prototypes' worth),
    their latent patches with the add-on layers as initialised, and each prototype on one of its
    class's most distinctive patches (:func:`distinctive_patches`, with the model's distance)."""
    z, labels, _ = _sampled_latents(
        model, dataset, indices, seed=seed, settings=settings, bad_images=bad_images, patch_budget=patch_budget
    )
    prototypes, _, _ = distinctive_patches(z, labels, model.prototype_classes.cpu(), tuple(model.prototype_size), distance=model.distance)
    model.prototypes.copy_(prototypes.to(model.prototypes))


@torch.no_grad()
def restart_on_distinctive_patches(
    model: ProtoPNet,
    dataset: ProtoDataset,
    indices: Sequence[int],
    which: Sequence[int],
    *,
    seed: int,
    settings: RunSettings,
    bad_images: BadImageLog | None = None,
    patch_budget: int = 16384,
) -> list[tuple[int, int]]:
    """``schedule.restart``: prototypes ``which`` start again, in place, on their class's most
    distinctive patches under the current network (as :func:`start_on_distinctive_patches`
    chooses them), skipping the patches the class's other prototypes hold (``model.provenance``,
    as push left it). Their last-layer columns go back to the paper's initialisation (+1 to their
    class, -0.5 to the others).

    Returns:
        for each prototype of ``which``, in order, ``(dataset index, patch index)`` of the patch
        it now is (patch index ``row * W' + col``).
    """
    which = [int(j) for j in which]
    if not which:
        return []
    z, labels, items = _sampled_latents(
        model, dataset, indices, seed=seed, settings=settings, bad_images=bad_images, patch_budget=patch_budget
    )
    classes = model.prototype_classes.cpu()
    candidates, picture, position = distinctive_patches(z, labels, classes, tuple(model.prototype_size), distance=model.distance)
    width = z.shape[3] - int(model.prototype_size[1]) + 1
    held: set[tuple[int, int]] = set()
    for j, entry in enumerate(model.provenance or []):
        if entry is not None and j not in which:
            row, col = entry["position"]
            held.add((int(entry["dataset_index"]), int(row) * width + int(col)))
    chosen: dict[int, tuple[int, int]] = {}  # prototype -> (dataset index, patch index)
    new = model.prototypes.detach().clone()
    for k in sorted({int(classes[j]) for j in which}):
        own = torch.nonzero(classes == k).flatten().tolist()  # the class's candidates, best first, one per picture
        free = [i for i in own if (items[int(picture[i])], int(position[i])) not in held] or own[:1]
        for n, j in enumerate(j for j in which if int(classes[j]) == k):
            i = free[n % len(free)]
            new[j] = candidates[i].to(new)
            chosen[j] = (items[int(picture[i])], int(position[i]))
    model.prototypes.copy_(new)
    for j in which:
        reset_connection(model, j)
    return [chosen[j] for j in which]
