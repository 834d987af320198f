"""Compute the frozen part of the backbone once per training picture (``data.feature_cache``).

In the warm-up epochs the whole backbone is frozen, and with ``schedule.frozen_backbone_blocks``
its first blocks stay frozen in the joint epochs too. When the training pictures are the same
every epoch (fixed augmented views, offline augmentation, or none), what those frozen layers
make of each picture never changes: :class:`FrozenFeatureCache` computes it once, and the
epochs train the rest of the network on the stored tensors — no decoding, no frozen layers.

The frozen layers run in eval mode (batch-norm with its running statistics), so a cached epoch
computes exactly what an uncached one with the frozen blocks in eval mode would.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Unpack

import torch
from torch import nn

from ..runtime import Progress, RunFields, RunSettings, autocast, seeded_gaussian
from .loader import Batch, IndexedSubset, ShardedBatchSampler, make_loader
from .stages import backbone_blocks, backbone_segment

logger = logging.getLogger(__name__)


def split_backbone(features: nn.Module, frozen_blocks: int | None) -> tuple[nn.Module, nn.Module | None]:
    """``(prefix, suffix)``: the first ``frozen_blocks`` blocks and the rest (None when the
    whole backbone is the prefix: ``frozen_blocks`` None)."""
    if frozen_blocks is None:
        return features, None
    end = len(backbone_blocks(features))
    return backbone_segment(features, 0, frozen_blocks), backbone_segment(features, frozen_blocks, end)


class CachedForward(nn.Module):
    """The network after the cached prefix: ``(B, C, H, W)`` cached tensors ->
    :class:`~protopnet.model.protopnet.ProtoPNetOutput` (through ``suffix``, the add-on layers
    and the prototype head). Holds ``model`` as a submodule so DDP sees its parameters."""

    def __init__(self, model: nn.Module, suffix: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.suffix = suffix

    def forward(self, cached: torch.Tensor) -> Any:
        z = cached if self.suffix is None else self.suffix(cached)
        return self.model.head(self.model.add_on(z))


def training_noise(images: torch.Tensor, indices: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """The fixed noise of ``loss.stability`` for dataset items ``indices`` (B,): (B, 3, S, S)
    like ``images``, ``N(0, std^2)`` clipped to ``1.25 std``, a pure function of ``(seed, index)``
    drawn from a stream the interpretability metric's noise never uses."""
    noise = torch.stack([seeded_gaussian(images.shape[1:], seed, 3, int(i), std, 1.25 * std) for i in indices])
    return noise.to(images.device, images.dtype)


class FrozenFeatureCache:
    """The prefix's output for every training item: ``tensors`` (N, C, H, W) on the training
    device, in the dtype the prefix produced (bf16 under bf16 autocast), ``labels`` (N,) and
    ``ok`` (N,) (False for unreadable pictures); with ``noise_std`` (``loss.stability``) also
    ``noisy`` (N, C, H, W), the prefix's output for each picture plus its fixed noise
    (:func:`training_noise`), else None.

    Args:
        frozen_blocks: how many backbone blocks the prefix holds; None: the whole backbone.
    """

    def __init__(self, frozen_blocks: int | None, tensors: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor,
                 noisy: torch.Tensor | None = None) -> None:
        self.frozen_blocks = frozen_blocks
        self.tensors, self.labels, self.ok, self.noisy = tensors, labels, ok, noisy

    @property
    def nbytes(self) -> int:
        noisy = 0 if self.noisy is None else self.noisy.numel() * self.noisy.element_size()
        return self.tensors.numel() * self.tensors.element_size() + noisy

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        frozen_blocks: int | None,
        dataset: Any,
        items: list[int],
        *,
        settings: RunSettings | None = None,
        max_bytes: float,
        bad_images: Any = None,
        progress: Progress | None = None,
        noise_std: float = 0.0,
        noise_seed: int = 0,
        **fields: Unpack[RunFields],
    ) -> "FrozenFeatureCache | None":
        """Run the prefix over ``dataset`` items ``items`` (every process runs all of them); with
        ``noise_std`` > 0 also over each picture plus its noise (:func:`training_noise` with
        ``noise_seed``), into ``noisy``.

        Returns None — the caller trains without the cache — when the tensors would take more
        than ``max_bytes`` or when running the blocks one after the other does not reproduce the
        backbone's forward (a backbone whose ``forward`` is not its blocks in sequence).

        ``settings`` (:class:`~protopnet.runtime.RunSettings`) gives the batch size, workers,
        device (default: the model's), precision and layout; a field given as a keyword
        (``fields``) replaces that of ``settings``.
        """
        run = RunSettings.merged(settings, **fields).for_model(model)
        device, precision = run.device, run.precision
        prefix, suffix = split_backbone(model.features, frozen_blocks)
        was_training = model.training
        model.eval()
        try:
            fmt = run.memory_format
            loader = make_loader(IndexedSubset(dataset, items), run.batch_size, shuffle=False, num_workers=run.num_workers)
            tensors = labels = ok = noisy = None
            checked = suffix is None
            for batch in loader:
                if bad_images is not None:
                    bad_images.add(batch.bad)
                if progress is not None:
                    progress(len(batch.indices) + len(batch.bad))
                if batch.images is None:
                    continue
                images = batch.images.to(device, non_blocking=True).to(memory_format=fmt)
                with autocast(device, precision):
                    out = prefix(images)
                if not checked:
                    with autocast(device, precision):
                        whole = model.features(images[:2])
                        split = suffix(out[:2])
                    if whole.shape != split.shape or not torch.allclose(whole.float(), split.float(), rtol=1e-2, atol=1e-2):
                        logger.warning("data.feature_cache: %s's blocks in sequence do not reproduce its forward; training without the cache", type(model.features).__name__)
                        return None
                    checked = True
                if tensors is None:
                    per_item = out[0].numel() * out.element_size()
                    need = per_item * len(items) * (2 if noise_std > 0 else 1)
                    if need > max_bytes:
                        logger.warning(
                            "data.feature_cache: %d items x %s would take %.1f GB, more than data.feature_cache_max_gb (%.1f): training without the cache",
                            len(items), tuple(out.shape[1:]), need / 1e9, max_bytes / 1e9,
                        )
                        return None
                    tensors = torch.zeros((len(items), *out.shape[1:]), dtype=out.dtype, device=device)
                    labels = torch.zeros(len(items), dtype=torch.long, device=device)
                    ok = torch.zeros(len(items), dtype=torch.bool, device=device)
                    noisy = torch.zeros_like(tensors) if noise_std > 0 else None
                    position = {index: p for p, index in enumerate(items)}
                where = torch.tensor([position[int(i)] for i in batch.indices], device=device)
                tensors[where] = out.to(memory_format=torch.contiguous_format)
                if noisy is not None:
                    with autocast(device, precision):
                        noisy_out = prefix(images + training_noise(images, batch.indices, noise_std, noise_seed))
                    noisy[where] = noisy_out.to(memory_format=torch.contiguous_format)
                labels[where] = batch.labels.to(device)
                ok[where] = True
            if tensors is None:
                return None
            cache = cls(frozen_blocks, tensors, labels, ok, noisy)
            logger.info("feature cache: %d items x %s (%s)%s, %.2f GB", len(items), tuple(tensors.shape[1:]), tensors.dtype,
                        " with a noisy copy of each" if noisy is not None else "", cache.nbytes / 1e9)
            return cache
        finally:
            model.train(was_training)

    @torch.no_grad()
    def extended(
        self, model: nn.Module, frozen_blocks: int | None, *, settings: RunSettings | None = None,
        max_bytes: float = float("inf"), **fields: Unpack[RunFields],
    ) -> "FrozenFeatureCache | None":
        """The cache of a longer prefix — the first ``frozen_blocks`` blocks (None: the whole
        backbone) — computed from this one: only the blocks in between run, on the stored
        tensors (no picture decoded, the shared blocks not run again). Eval mode, as in
        :meth:`build`; None when it would take more than ``max_bytes``.

        ``settings`` gives the batch size, precision and layout (its device and workers are not
        used: the tensors stay where they are); a field given as a keyword replaces that of
        ``settings``.

        Shapes: ``tensors`` (N, C, H, W) -> the returned cache's (N, C', H', W'); ``noisy`` likewise
        when this cache has it."""
        run = RunSettings.merged(settings, **fields)
        if self.frozen_blocks is None:
            raise ValueError("the cache already holds the whole backbone's output")
        blocks = backbone_blocks(model.features)
        end = len(blocks) if frozen_blocks is None else frozen_blocks
        if end < self.frozen_blocks:
            raise ValueError(f"frozen_blocks={frozen_blocks} is shorter than this cache's prefix ({self.frozen_blocks} blocks)")
        between = backbone_segment(model.features, self.frozen_blocks, end)
        was_training = model.training
        model.eval()
        try:
            device = self.tensors.device
            sources = [self.tensors] if self.noisy is None else [self.tensors, self.noisy]
            outputs: list[torch.Tensor] = []
            for source in sources:
                tensors: torch.Tensor | None = None
                for start in range(0, len(self), run.batch_size):
                    chunk = source[start:start + run.batch_size].to(memory_format=run.memory_format)
                    with autocast(device, run.precision):
                        out = between(chunk)
                    if tensors is None:
                        need = out[0].numel() * out.element_size() * len(self) * len(sources)
                        if need > max_bytes:
                            logger.warning("data.feature_cache: %d items x %s would take %.1f GB, more than data.feature_cache_max_gb (%.1f): training without the cache",
                                           len(self), tuple(out.shape[1:]), need / 1e9, max_bytes / 1e9)
                            return None
                        tensors = torch.zeros((len(self), *out.shape[1:]), dtype=out.dtype, device=device)
                    tensors[start:start + len(out)] = out.to(memory_format=torch.contiguous_format)
                assert tensors is not None, "an empty cache has nothing to extend"
                tensors[~self.ok] = 0  # unreadable items stay zeros, as build leaves them
                outputs.append(tensors)
        finally:
            model.train(was_training)
        cache = type(self)(frozen_blocks, outputs[0], self.labels, self.ok, outputs[1] if len(outputs) > 1 else None)
        logger.info("feature cache: %d items x %s (%s)%s, %.2f GB, from the first %d blocks' cache", len(self), tuple(cache.tensors.shape[1:]),
                    cache.tensors.dtype, " with a noisy copy of each" if cache.noisy is not None else "", cache.nbytes / 1e9, self.frozen_blocks)
        return cache

    def batches(self, order: list[int], batch_size: int, rank: int, world: int) -> Iterator[Batch]:
        """Batches in the order of positions ``order`` (this rank's slice of each global batch,
        as :class:`~protopnet.train.loader.ShardedBatchSampler` cuts it); unreadable items left
        out."""
        for positions in ShardedBatchSampler(order, batch_size, rank, world):
            where = torch.tensor(positions, dtype=torch.long, device=self.tensors.device)
            where = where[self.ok[where]] if len(positions) else where
            if where.numel() == 0:
                yield Batch(None, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), [])
                continue
            yield Batch(self.tensors[where], self.labels[where], where.cpu(), [])

    def __len__(self) -> int:
        return self.tensors.shape[0]
