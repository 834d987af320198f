"""The training epochs of a run — warm-up, joint and the optional pre-training — and what they
train on: the caches of frozen-layer outputs (``data.feature_cache``), the DDP and
``torch.compile`` wrappers of the forward pass, the noisy copies of stability training, the
alignment cost's hooks and the moving average of the weights (``optim.ema_decay``).
:class:`TrainingEpochs` holds them as methods the :class:`~protopnet.train.loop.Trainer`
inherits; they read and set the Trainer's model, data, optimisers, scaler and progress bars.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..atomic_files import fault_point
from ..losses import alignment_cost, diversity_cost, focal_cost, protopnet_loss, stability_cost
from ..runtime import autocast, memory_format
from .alignment import AlignmentTaps, resolve_alignment_block
from .distributed import rank as _rank, world as _world
from .feature_cache import CachedForward, FrozenFeatureCache, split_backbone, training_noise
from .loader import IndexedSubset, ShardedBatchSampler, make_loader
from .stages import Step, freeze_batchnorm, set_trainable, take_averaged_weights

logger = logging.getLogger(__name__)


class TrainingEpochs:
    """The warm-up, joint and pre-training epochs of a :class:`~protopnet.train.loop.Trainer`
    (a mixin: the methods use the Trainer's attributes)."""

    def _feature_cache_for(self, step: Step) -> FrozenFeatureCache | None:
        """The cache of frozen-layer outputs this step trains on (``data.feature_cache``), built
        on first use: the whole backbone's output for ``warm``, the first
        ``frozen_backbone_blocks`` blocks' for ``joint``; None when the step reads pictures.

        When joint epochs with frozen blocks follow the warm-up, the frozen blocks' cache is
        built first and kept, and the warm-up cache is computed from it (only the later blocks
        run): the pictures are decoded and the early blocks run once for the whole schedule,
        and the last-layer stage reads the same cache."""
        cfg = self.config
        if not cfg.data.feature_cache or step.stage not in ("warm", "joint"):
            return None
        frozen = cfg.schedule.frozen_backbone_blocks
        if step.stage == "joint":
            self._feature_caches.pop("warm", None)  # free the warm-up cache
            return self._prefix_cache() if frozen > 0 else None
        if "warm" not in self._feature_caches:
            joint_ahead = any(s.stage == "joint" for s in self.plan[step.index + 1:])
            prefix = self._prefix_cache() if frozen > 0 and joint_ahead else None
            if prefix is not None:
                with self._bar("caching the frozen backbone", 1) as bar:
                    self._feature_caches["warm"] = prefix.extended(
                        self.model, None, settings=self.settings, max_bytes=cfg.data.feature_cache_max_gb * 1e9,
                    )
                    bar.update(1)
            else:
                self._feature_caches["warm"] = self._build_feature_cache(None)
        return self._feature_caches["warm"]

    def _prefix_cache(self) -> FrozenFeatureCache | None:
        """The cache of the ``frozen_backbone_blocks`` first blocks (built once, then kept)."""
        if "prefix" not in self._feature_caches:
            self._feature_caches["prefix"] = self._build_feature_cache(self.config.schedule.frozen_backbone_blocks)
        return self._feature_caches["prefix"]

    def _build_feature_cache(self, blocks: int | None) -> FrozenFeatureCache | None:
        cfg = self.config
        items = self.data.training_items
        what = "backbone" if blocks is None else f"first {blocks} backbone blocks"
        with self._bar(f"caching the frozen {what}", len(items)) as bar:
            return FrozenFeatureCache.build(
                self.model, blocks, self.data.train, items, settings=self.settings, max_bytes=cfg.data.feature_cache_max_gb * 1e9, bad_images=self.bad_images, progress=bar.update,
                noise_std=cfg.loss.stability_noise if cfg.loss.stability > 0 else 0.0, noise_seed=cfg.run.seed,
            )

    def _forward_model(self, stage: str = "joint", cache: FrozenFeatureCache | None = None) -> nn.Module:
        """The module to call in training (the pre-training net in ``pretrain``; the network
        after the cached layers when training on a feature ``cache``): the DDP wrapper when
        distributed, compiled with :func:`torch.compile` when ``run.compile`` is set (DDP first, so
        its bucketed all-reduces are compiled around).

        One wrapper per stage: DDP synchronises only the parameters that require gradients when
        it is built, and each stage trains a different set (a wrapper built in ``warm`` would
        leave the backbone's gradients of ``joint`` unsynchronised). Every trainable parameter of
        a stage takes part in its loss, so no search for unused parameters is needed.
        """
        module: nn.Module = self.pretrain_net if stage == "pretrain" else self.model
        key = stage
        if cache is not None:
            module = CachedForward(self.model, split_backbone(self.model.features, cache.frozen_blocks)[1])
            key = f"{stage}:cached"
        if _world() > 1:
            self._ddp = self._ddp or {}
            if key not in self._ddp:
                self._ddp[key] = nn.parallel.DistributedDataParallel(
                    module, device_ids=[self.device.index] if self.device.type == "cuda" else None, find_unused_parameters=False
                )
            module = self._ddp[key]
        if self.config.run.compile:
            if key not in self._compiled:
                logger.info("run.compile: compiling the %s forward pass with torch.compile (the first batches wait for it)", key)
                self._compiled[key] = torch.compile(module)
            module = self._compiled[key]
        return module

    def _train_epoch(self, step: Step) -> dict[str, Any]:
        """One warm or joint epoch. The global batch order comes from the step's seed; with
        several processes each global batch is split across ranks and every rank's loss is
        weighted by its share, so DDP's gradient average equals the single-process gradient."""
        cfg = self.config
        self._push_latents = None  # training changes the latent space they were computed in
        set_trainable(self.model, step.stage, cfg.schedule.frozen_backbone_blocks)
        optimizer = self.optimizers[step.stage]
        cache = self._feature_cache_for(step)
        forward = self._forward_model(step.stage, cache)
        forward.train()
        if cfg.schedule.freeze_backbone_batchnorm and step.stage != "pretrain":
            freeze_batchnorm(self.model.features)
        subset = IndexedSubset(self.data.train, self.data.training_items)
        seed = self._step_seed(step)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(subset), generator=generator).tolist()
        world, rank = _world(), _rank()
        sampler = ShardedBatchSampler(order, cfg.data.batch_size, rank, world)
        if cache is not None:
            # the same batches in the same order, read from the cached frozen-layer outputs
            loader: Any = cache.batches(order, cfg.data.batch_size, rank, world)
            item_shape = tuple(cache.tensors.shape[1:])
        else:
            loader = make_loader(
                subset, cfg.data.batch_size, generator=generator, num_workers=cfg.data.num_workers,
                pin_memory=self.device.type == "cuda", batch_sampler=sampler,
            )
            item_shape = (3, cfg.data.image_size, cfg.data.image_size)
        fmt = memory_format(cfg.run.channels_last)
        identity = self.model.class_identity
        average = self._weight_average() if step.stage != "pretrain" else None
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=self.device)
        seen = torch.zeros((), device=self.device)
        total = cfg.schedule.pretrain_epochs if step.stage == "pretrain" else cfg.schedule.epochs
        taps = self._alignment_taps(step, cache)
        stability = cfg.loss.stability > 0 and step.stage in ("warm", "joint")
        with taps or contextlib.nullcontext(), self._bar(f"epoch {step.epoch + 1}/{total} {step.stage}", len(sampler)) as bar:
            for batch in loader:
                self.bad_images.add(batch.bad)
                if batch.images is None and world == 1:
                    bar.update(1)
                    continue
                readable = len(batch.labels)
                if world > 1:
                    # The share of this rank's slice in the global batch's readable images (one
                    # scalar all-reduce), so DDP's average is the single-process gradient even
                    # when some rank met unreadable images.
                    count = torch.tensor([float(readable)], device=self.device)
                    dist.all_reduce(count)
                    share = readable * world / count.clamp(min=1.0)
                if batch.images is None and float(count) == 0:
                    bar.update(1)  # no rank has a readable image: skipped, as a single process does
                    continue
                if batch.images is None:
                    # An empty slice (unreadable images, or a last global batch smaller than the
                    # world): every rank must take part in the gradient all-reduce, so it runs a
                    # zero-weight stand-in.
                    batch = batch._replace(images=torch.zeros(1, *item_shape), labels=torch.zeros(1, dtype=torch.long))
                    share = torch.zeros(1, device=self.device)
                images = batch.images.to(self.device, non_blocking=True).to(memory_format=fmt)
                labels = batch.labels.to(self.device, non_blocking=True)
                noisy = self._noisy_inputs(cache, batch, images) if stability else None
                with autocast(self.device, self.precision):
                    # stability training: the noisy copies ride in the same pass (one forward, one
                    # backward: what DDP and torch.compile expect), then the outputs are split
                    out = forward(images if noisy is None else torch.cat([images, noisy]))
                if noisy is not None:
                    both, out = out, type(out)(*(t[:len(images)] for t in out))
                    noisy_distances = both.distances[len(images):]
                if step.stage == "pretrain":
                    loss = torch.nn.functional.cross_entropy(out.logits.float(), labels)
                    terms = {"ce": loss.detach(), "loss": loss.detach()}
                else:
                    loss, terms = protopnet_loss(out.logits, out.min_distances, labels, identity, self.model.last_layer.weight, self.coefficients, cluster_over=cfg.loss.cluster_over)
                    if cfg.loss.focal > 0:
                        focal = focal_cost(out.distances, labels, identity)
                        loss = loss + cfg.loss.focal * focal
                        terms.update(focal=focal.detach(), loss=loss.detach())
                    if cfg.loss.diversity > 0:
                        apart = diversity_cost(self.model.prototypes, identity, cfg.loss.diversity_margin)
                        loss = loss + cfg.loss.diversity * apart
                        terms.update(diversity=apart.detach(), loss=loss.detach())
                    if noisy is not None:
                        steady = stability_cost(out.distances, noisy_distances, labels, identity)
                        loss = loss + cfg.loss.stability * steady
                        terms.update(stability=steady.detach(), loss=loss.detach())
                    if taps is not None:
                        shallow, deep = taps.features(images)
                        shallow, deep = shallow[:len(images)], deep[:len(images)]
                        aligned = alignment_cost(out.distances, labels, identity, shallow, deep, cfg.loss.alignment_threshold)
                        loss = loss + cfg.loss.alignment * aligned
                        terms.update(alignment=aligned.detach(), loss=loss.detach())
                optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss * share.squeeze(0) if world > 1 else loss).backward()
                self.scaler.step(optimizer)
                self.scaler.update()
                if average is not None:
                    average.update_parameters(self.model)
                b = float(readable)
                for k, v in terms.items():
                    sums[k] = sums.get(k, torch.zeros((), device=self.device)) + v * b
                correct += (out.logits.argmax(1) == labels).sum() if b else 0
                seen += b
                bar.update(1)
                if self.progress_bars is not None and self.is_main:  # float() waits for the GPU
                    bar.set_postfix(loss=f"{float(terms['loss']):.3f}", acc=f"{float(correct) / max(float(seen), 1):.3f}")
                fault_point("batch")
        keys = sorted(sums)
        totals = torch.stack([*(sums[k] for k in keys), correct.float(), seen.float()]) if keys else None
        if totals is not None and world > 1:
            dist.all_reduce(totals)
        record: dict[str, Any] = {}
        if totals is not None:
            n = max(float(totals[-1]), 1.0)
            for i, k in enumerate(keys):
                record[k] = float(totals[i]) / n
            record["train_accuracy"] = float(totals[-2]) / n
        if step.stage == "joint":
            record["lr_backbone"] = self.optimizers["joint"].param_groups[0]["lr"]
            self.scheduler.step()
        self._share_model_from_main()
        return record

    def _noisy_inputs(self, cache: FrozenFeatureCache | None, batch: Any, images: torch.Tensor) -> torch.Tensor:
        """``loss.stability``'s noisy copies of a batch's inputs (B, ...) like ``images``: the
        cached prefix outputs of the noisy pictures, or the pictures plus their fixed noise
        (:func:`~protopnet.train.feature_cache.training_noise`). A distributed zero-weight
        stand-in (no items) gets its own inputs back."""
        if len(batch.indices) != len(images):
            return images
        if cache is not None:
            if cache.noisy is None:
                raise RuntimeError("loss.stability: the feature cache holds no noisy copies")
            noisy = cache.noisy[batch.indices.to(cache.noisy.device)]
            return noisy.to(self.device, non_blocking=True).to(memory_format=memory_format(self.config.run.channels_last))
        return images + training_noise(images, batch.indices, self.config.loss.stability_noise, self.config.run.seed)

    def _alignment_taps(self, step: Step, cache: FrozenFeatureCache | None) -> AlignmentTaps | None:
        """The hooks that feed ``loss.alignment`` in the joint epochs (None when it is off or in
        another stage: in the warm-up the backbone, which the cost trains, is frozen)."""
        if step.stage != "joint" or not self.config.loss.alignment > 0:
            return None
        if self.alignment_block is None:
            self.alignment_block = resolve_alignment_block(self.model.features, self.config.data.image_size, self.config.loss.alignment_block)
            logger.info("alignment cost: shallow features from backbone block %d", self.alignment_block)
        return AlignmentTaps(self.model, self.alignment_block, cache.frozen_blocks if cache is not None else None, self.config.loss.alignment_deep)

    def _weight_average(self) -> AveragedModel | None:
        """The moving average of the weights (``optim.ema_decay``), started from the current
        weights at the first training epoch after a push; None when averaging is off."""
        decay = self.config.optim.ema_decay
        if decay and self.weight_average is None:
            self.weight_average = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        return self.weight_average

    def _adopt_weight_average(self) -> None:
        """The model takes the averaged weights (before push, or at the end of the schedule);
        the next training epoch starts a new average. Buffers (batch-norm statistics) stay the
        model's own."""
        if self.weight_average is None:
            return
        take_averaged_weights(self.model, self.weight_average)
        logger.info("the model takes the moving average of its weights (%d training steps, optim.ema_decay %g)",
                    int(self.weight_average.n_averaged), self.config.optim.ema_decay)
        self.weight_average = None
