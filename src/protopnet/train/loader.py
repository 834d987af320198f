"""Batches that know where their images come from, and survive unreadable files.

:class:`IndexedSubset` yields ``(image, label, dataset_index)`` and turns an unreadable image
into a :class:`BadItem`; :func:`collate_indexed` drops those from the tensors and reports them in
:attr:`Batch.bad`, so one bad file never stops an epoch and the main process learns of it even
when the loading ran in worker processes.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..runtime import RunSettings

logger = logging.getLogger(__name__)


class BadItem(NamedTuple):
    """An item that could not be read."""

    index: int
    path: str
    reason: str


class Batch(NamedTuple):
    """A collated batch: images (B, 3, S, S) or None when every item was bad, labels (B,),
    dataset indices (B,), and the unreadable items."""

    images: torch.Tensor | None
    labels: torch.Tensor
    indices: torch.Tensor
    bad: list[BadItem]


class IndexedSubset(Dataset):
    """The items ``indices`` of ``dataset`` as ``(image (3, S, S), label, dataset_index)``.

    Args:
        dataset: a :class:`protopnet.data.base.ProtoDataset` (or any dataset of (image, label)).
        indices: which items, in order (default: all).
        augment: override the dataset's augmentation for this view (None keeps it; pass
            ``False`` for an unaugmented view, as push and evaluation need).
    """

    def __init__(self, dataset: Any, indices: Sequence[int] | None = None, augment: Any = None) -> None:
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
        self.augment_override = augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, int] | BadItem:
        index = self.indices[position]
        try:
            if self.augment_override is False and hasattr(self.dataset, "load_image"):
                picture = self.dataset.load_image(index)
                image = self.dataset.to_tensor(picture)
                label = int(self.dataset.targets[index])
            else:
                image, label = self.dataset[index]
        except (OSError, ValueError, SyntaxError) as error:  # BadImageError is a ValueError
            return BadItem(index, _path(self.dataset, index), str(error))
        return image, int(label), index


def _path(dataset: Any, index: int) -> str:
    return dataset.path(index) if hasattr(dataset, "path") else f"item {index}"


def collate_indexed(batch: list[tuple[torch.Tensor, int, int] | BadItem]) -> Batch:
    """Stack ``(image, label, index)`` items; unreadable ones go to ``Batch.bad``."""
    bad = [item for item in batch if isinstance(item, BadItem)]
    items = [item for item in batch if not isinstance(item, BadItem)]
    images = torch.stack([item[0] for item in items]) if items else None
    labels = torch.tensor([item[1] for item in items], dtype=torch.long)
    indices = torch.tensor([item[2] for item in items], dtype=torch.long)
    return Batch(images, labels, indices, bad)


class BadImageLog:
    """Collects the unreadable images a run met (each logged once)."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    def add(self, bad: list[BadItem]) -> None:
        for item in bad:
            if item.path not in self.items:
                logger.warning("skipping unreadable image %s: %s", item.path, item.reason)
                self.items[item.path] = item.reason

    def __len__(self) -> int:
        return len(self.items)


def make_loader(
    subset: IndexedSubset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    sampler: Any = None,
    batch_sampler: Any = None,
) -> DataLoader:
    """A DataLoader over ``subset`` that skips unreadable images (``batch_sampler``, when given,
    decides the batches and ``batch_size``/``shuffle``/``sampler`` are ignored)."""
    if batch_sampler is not None:
        return DataLoader(
            subset, batch_sampler=batch_sampler, generator=generator, num_workers=num_workers,
            pin_memory=pin_memory, persistent_workers=False, collate_fn=collate_indexed,
        )
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        collate_fn=collate_indexed,
    )


class ShardedBatchSampler:
    """Batches of one global order, each global batch split evenly across ranks.

    Rank ``r`` of ``world`` receives, for every global batch of ``batch_size`` positions, the
    ``r``-th contiguous slice of it. Together the ranks see exactly the batches a single process
    would see with the same order, so DistributedDataParallel (which averages gradients) computes
    the single-process update whenever the loss of each rank is weighted by its share of the
    global batch (see :func:`rank_share`). Slices differ by at most one item; a rank may get an
    empty slice in a tiny last batch.

    Args:
        order: the global order of positions (e.g. ``torch.randperm(n, generator=g)``).
        batch_size: the global batch size.
        rank, world: this process and the number of processes.
    """

    def __init__(self, order: Sequence[int], batch_size: int, rank: int, world: int) -> None:
        self.order = [int(i) for i in order]
        self.batch_size = int(batch_size)
        self.rank, self.world = int(rank), int(world)

    def global_batches(self) -> list[list[int]]:
        return [self.order[i : i + self.batch_size] for i in range(0, len(self.order), self.batch_size)]

    def __iter__(self):
        for batch in self.global_batches():
            bounds = [round(len(batch) * r / self.world) for r in range(self.world + 1)]
            yield batch[bounds[self.rank] : bounds[self.rank + 1]]

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size


def stream_batches(
    dataset: Any,
    *,
    indices: Sequence[int] | None,
    settings: RunSettings,
    sampler: Any = None,
    bad_images: BadImageLog | None = None,
):
    """Yield ``(images (B, 3, S, S) on device, labels (B,), dataset indices (B,))`` of the
    readable items, unaugmented — the scan that evaluation, push and the last-layer stage share.
    ``settings`` gives the batch size, workers, device (a resolved ``torch.device``: see
    :meth:`RunSettings.for_model`) and memory layout. Unreadable items are recorded in ``bad_images``."""
    device = torch.device(settings.device)
    subset = IndexedSubset(dataset, indices, augment=False)
    loader = make_loader(subset, settings.batch_size, num_workers=settings.num_workers, sampler=sampler, pin_memory=device.type == "cuda")
    for batch in loader:
        if bad_images is not None:
            bad_images.add(batch.bad)
        if batch.images is None:
            continue
        yield batch.images.to(device, non_blocking=True).to(memory_format=settings.memory_format), batch.labels, batch.indices


def gather_by_index(values: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, sharded: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of every rank (when ``sharded`` across an initialised process group), sorted by
    dataset index with repeats dropped (a DistributedSampler pads its shards by repeating items).

    Args: values (n, ...), labels (n,), indices (n,) of this rank. Returns the same, for all.
    """
    import torch.distributed as dist

    if sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (values, labels, indices))
        values, labels, indices = (torch.cat([g[n] for g in gathered]) for n in range(3))
    order = torch.argsort(indices, stable=True)
    values, labels, indices = values[order], labels[order], indices[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    return values[keep], labels[keep], indices[keep]
