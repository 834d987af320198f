"""The convex last-layer stage (paper Section 2.2).

With the latent space and the prototypes fixed, an image's similarity vector (M,) does not change
during this stage, so it is computed once per image and the last layer is optimised on those
vectors: CE + l1 * sum |w_h(k, j)| over prototypes j not of class k. Each iteration is one pass
over the images in a seeded random order, in batches — exactly the updates that the same number of
full forward passes over the same (unaugmented, eval-mode) images would make, at a fraction of the
cost (see ``benchmarks/bench_engine.py``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Sequence, Unpack

import torch
import torch.nn.functional as F

from ..losses import l1_wrong_class
from ..runtime import RunFields, RunSettings, autocast
from .feature_cache import FrozenFeatureCache, split_backbone
from .loader import BadImageLog, IndexedSubset, gather_by_index, stream_batches

if TYPE_CHECKING:
    from ..model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)


def _similarity_vectors(model: ProtoPNet, z: torch.Tensor) -> torch.Tensor:
    """(B, M) float32 on the CPU: each prototype's similarity at its best cell of the latent maps
    ``z`` (B, D, H, W) — what every collection below computes per batch."""
    return model.similarity(model.distances(z).flatten(2).amin(2)).float().cpu()


@torch.no_grad()
def collect_similarities(
    model: ProtoPNet,
    dataset: Any,
    *,
    indices: Sequence[int] | None = None,
    settings: RunSettings | None = None,
    sampler: Any = None,
    bad_images: BadImageLog | None = None,
    **fields: Unpack[RunFields],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Similarity vectors of every readable image (eval mode, unaugmented).

    Args:
        settings, fields: how the pass runs (:class:`~protopnet.runtime.RunSettings`; default
            batch size 75); a field given as a keyword (``batch_size=...``) replaces that
            of ``settings``.

    Returns:
        similarities (N, M) float32, labels (N,), dataset indices (N,) sorted by index; with a
        sharding ``sampler`` every rank receives the whole set.
    """
    run = RunSettings.merged(settings, 75, **fields).for_model(model)
    device = run.device
    was_training = model.training
    model.eval()
    sims, labels, idx = [], [], []
    batches = stream_batches(dataset, indices=indices, settings=run, sampler=sampler, bad_images=bad_images)
    for images, y, i in batches:
        with autocast(device, run.precision):
            z = model.latent(images)
        sims.append(_similarity_vectors(model, z))
        labels.append(y)
        idx.append(i)
    model.train(was_training)
    s = torch.cat(sims) if sims else torch.zeros(0, model.num_prototypes)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    i = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    return gather_by_index(s, y, i, sharded=sampler is not None)


class KeptLatents:
    """The latent maps (B, D, H, W) of a scan — push's — kept batch by batch, so that the
    last-layer stage after it computes its similarity vectors without a second pass through the
    network. They stay valid while the backbone and add-on layers are unchanged: from a push to
    the last-layer stage of its round (pruning and restarts change only the prototypes).

    Args:
        max_bytes: what the kept maps may take; past it they are dropped (:attr:`complete` turns
            False) and the last-layer stage scans the pictures again.
    """

    def __init__(self, max_bytes: float) -> None:
        self.max_bytes = float(max_bytes)
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (z, labels, indices)
        self.nbytes = 0
        self.complete = True

    def keep(self, z: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Keep one batch's latent maps ``z`` (B, D, H, W; as the scan computed them, on its
        device), its labels (B,) and dataset indices (B,)."""
        if not self.complete:
            return
        size = z.numel() * z.element_size()
        if self.nbytes + size > self.max_bytes:
            logger.info("push's latent maps would take more than %.2f GB: the last-layer stage scans the pictures again",
                        self.max_bytes / 1e9)
            self.batches, self.nbytes, self.complete = [], 0, False
            return
        self.batches.append((z.detach(), labels.cpu(), indices.cpu()))
        self.nbytes += size


@torch.no_grad()
def collect_similarities_from_latents(
    model: ProtoPNet, kept: KeptLatents, *, sharded: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`collect_similarities` from the latent maps a scan kept (``kept.complete`` must
    be True): the same similarity vectors, bit for bit, when the scan ran the same batches on
    the same network, with the model's current prototypes. With ``sharded`` (the scan was
    sharded across a process group) every rank receives the whole set.

    Returns:
        similarities (N, M) float32, labels (N,), dataset indices (N,) sorted by index.
    """
    if not kept.complete:
        raise ValueError("the kept latent maps are incomplete (they exceeded max_bytes): scan the pictures instead")
    sims = [_similarity_vectors(model, z) for z, _, _ in kept.batches]
    s = torch.cat(sims) if sims else torch.zeros(0, model.num_prototypes)
    y = torch.cat([b[1] for b in kept.batches]) if kept.batches else torch.zeros(0, dtype=torch.long)
    i = torch.cat([b[2] for b in kept.batches]) if kept.batches else torch.zeros(0, dtype=torch.long)
    return gather_by_index(s, y, i, sharded=sharded)


@torch.no_grad()
def collect_similarities_from_cache(
    model: ProtoPNet,
    cache: FrozenFeatureCache,
    items: Sequence[int],
    *,
    settings: RunSettings | None = None,
    rank: int = 0,
    world: int = 1,
    **fields: Unpack[RunFields],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`collect_similarities` over the training items whose frozen backbone blocks'
    output ``cache`` holds (``cache.tensors[p]`` is item ``items[p]``): only the later blocks
    run. Valid while the cached blocks are unchanged (frozen), as they are after the joint
    epochs that trained on the cache. With ``world`` > 1 each rank computes every ``world``-th
    item and every rank receives the whole set. ``settings`` gives the batch size, precision and
    layout (a field given as a keyword replaces that of ``settings``; default batch size 75).

    Returns:
        similarities (N, M) float32, labels (N,), dataset indices (N,) sorted by index.
    """
    if len(items) != len(cache):
        raise ValueError(f"the cache holds {len(cache)} items, not the {len(items)} given")
    suffix = split_backbone(model.features, cache.frozen_blocks)[1]
    device = cache.tensors.device
    run = RunSettings.merged(settings, 75, **fields)
    fmt = run.memory_format
    was_training = model.training
    model.eval()
    positions = torch.arange(rank, len(cache), world)
    positions = positions[cache.ok.cpu()[positions]]
    sims = []
    for chunk in positions.split(run.batch_size):
        cached = cache.tensors[chunk.to(device)].to(memory_format=fmt)
        with autocast(device, run.precision):
            z = model.add_on(cached if suffix is None else suffix(cached))
        sims.append(_similarity_vectors(model, z))
    model.train(was_training)
    s = torch.cat(sims) if sims else torch.zeros(0, model.num_prototypes)
    labels = cache.labels.cpu()[positions]
    indices = torch.as_tensor(list(items), dtype=torch.long)[positions]
    return gather_by_index(s, labels, indices, sharded=world > 1)


def optimise_last_layer(
    model: ProtoPNet,
    similarities: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    iterations: int,
    batch_size: int,
    l1: float = 1e-4,
    ce: float = 1.0,
    generator: torch.Generator | None = None,
    on_iteration: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Optimise ``model.last_layer`` on fixed similarity vectors.

    Args:
        similarities: (N, M); labels: (N,).
        optimizer: over ``model.last_layer`` parameters (the run's persistent one).
        iterations: passes over the N vectors, each in the order ``randperm(N, generator)``.

    Returns the last iteration's mean terms: ``ce``, ``l1``, ``loss``, ``train_accuracy``.
    """
    device = model.last_layer.weight.device
    similarities, labels = similarities.to(device), labels.to(device)
    identity = model.class_identity
    n = similarities.shape[0]
    terms: dict[str, float] = {}
    for iteration in range(iterations):
        order = torch.randperm(n, generator=generator)
        sums = torch.zeros(4, device=device)
        for chunk in order.split(batch_size):
            chunk = chunk.to(device)
            logits = model.last_layer(similarities[chunk])  # (b, K)
            ce_term = F.cross_entropy(logits, labels[chunk])
            l1_term = l1_wrong_class(model.last_layer.weight, identity)
            loss = ce * ce_term + l1 * l1_term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            b = len(chunk)
            sums += torch.stack([ce_term.detach() * b, l1_term.detach() * b, loss.detach() * b, (logits.argmax(1) == labels[chunk]).sum().float()])
        ce_v, l1_v, loss_v, correct = (sums / max(n, 1)).tolist()
        terms = {"ce": ce_v, "l1": l1_v, "loss": loss_v, "train_accuracy": correct}
        if on_iteration is not None:
            on_iteration(iteration, terms)
    return terms


def optimise_last_layer_full_forward(
    model: ProtoPNet,
    dataset: Any,
    optimizer: torch.optim.Optimizer,
    *,
    iterations: int,
    batch_size: int,
    indices: Sequence[int] | None = None,
    l1: float = 1e-4,
    ce: float = 1.0,
    generator: torch.Generator | None = None,
) -> None:
    """The same stage done the slow way — a full forward pass per batch, in the same order as
    :func:`optimise_last_layer` — kept for tests and benchmarks that check the two agree."""
    device = model.last_layer.weight.device
    subset = IndexedSubset(dataset, indices, augment=False)
    model.eval()
    identity = model.class_identity
    for _ in range(iterations):
        order = torch.randperm(len(subset), generator=generator)
        for chunk in order.split(batch_size):
            items = [subset[int(p)] for p in chunk]
            images = torch.stack([it[0] for it in items]).to(device)
            target = torch.tensor([it[1] for it in items], device=device)
            with torch.no_grad():
                z = model.latent(images)
                sims = model.similarity(model.distances(z).flatten(2).amin(2))
            logits = model.last_layer(sims)
            loss = ce * F.cross_entropy(logits, target) + l1 * l1_wrong_class(model.last_layer.weight, identity)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
