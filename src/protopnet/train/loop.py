"""The training run: executes the planned steps, evaluates, selects, checkpoints and resumes.

A run directory holds:

    config.yaml        the resolved config
    metrics.jsonl      one JSON object per step (stage, epoch, loss terms, accuracies, seconds)
    checkpoints/       step-NNNNN/ after every step (tensors in safetensors, state in JSON)
    model/             the selected model (best validation accuracy among pushed models)
    results.json       the selected model's validation and test accuracy, wall time
    bad_images.txt     images that could not be read (when there were any)

Every step starts from a seed derived from ``run.seed`` and its index, inside
``torch.random.fork_rng`` (the caller's random state is untouched), so a run resumed from the
checkpoint after any step ends with the same weights as an uninterrupted run.

Killed at any moment (SIGKILL, power loss), a run loses at most its current step: every file and
directory is replaced atomically, a checkpoint is renamed into place only once complete, and
``--resume`` skips a checkpoint that fails its checksums, falling back to the one before. It first
removes what the killed writes left behind (``.step-*.tmp``, ``.model.*.tmp``...). A write that
fails (disk full, read-only) stops the run with one line saying which step is safely
checkpointed. ``PROTOPNET_KILL_AT`` (see :func:`protopnet.atomic_files.fault_point`) kills a run at
a chosen point, for tests.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..atomic_files import atomic_write_json, clean_interrupted_writes, fault_point, atomic_write_text
from ..checkpoint import CheckpointError
from ..config import Config
from ..losses import LossCoefficients, alignment_cost, diversity_cost, focal_cost, protopnet_loss, stability_cost
from ..model_card import record_training_results
from ..runtime import ProgressBars, RunSettings, autocast, memory_format, open_bar, resolve_device, resolve_precision
from ..save import save_model
from .alignment import AlignmentTaps, resolve_alignment_block
from .distributed import rank as _rank, run_on_main as _run_on_main, world as _world
from .evaluate import accuracy_report, predict_logits
from .feature_cache import CachedForward, FrozenFeatureCache, split_backbone, training_noise
from .loader import BadImageLog, IndexedSubset, ShardedBatchSampler, make_loader
from .pretrain import PretrainNet
from .prototype_steps import PrototypeSteps
from .run_data import RunData, backbone_normalisation, build_model, build_run_data
from .state import STATE_VERSION, ResumeMismatchError, RunState  # noqa: F401 - the first two were defined here
from .stages import Step, freeze_batchnorm, parameter_groups, plan_schedule, set_trainable, take_averaged_weights
from .tensorboard import open_tensorboard

logger = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    out_dir: Path
    model_dir: Path
    validation: dict[str, Any]
    test: dict[str, Any] | None
    seconds: float
    metrics: list[dict[str, Any]] = field(default_factory=list)


class Trainer(PrototypeSteps, RunState):
    """Runs a config's schedule into ``out_dir``.

    Args:
        config: the validated run config.
        out_dir: the run directory (default ``config.output.dir``).
        progress_bars: ``(description, total) -> bar`` making a progress bar per stage
            (:data:`protopnet.runtime.ProgressBars`; the CLI passes tqdm); None for silence.
        data: prebuilt :class:`RunData` (tests); default: built from ``config.data``.
    """

    def __init__(
        self,
        config: Config,
        out_dir: str | Path | None = None,
        *,
        progress_bars: ProgressBars | None = None,
        data: RunData | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir or config.output.dir)
        self.progress_bars = progress_bars
        self.device = resolve_device(config.run.device)
        self.precision = resolve_precision(self.device, config.run.precision)  # bf16 -> fp16 on old GPUs
        # the passes over a dataset (push, last layer, validation): the test batch size; push
        # and the last layer take settings.replace(batch_size=config.data.push_batch_size)
        self.settings = RunSettings(
            batch_size=config.data.test_batch_size, num_workers=config.data.num_workers, device=self.device,
            precision=self.precision, channels_last=config.run.channels_last,
        )
        self.is_main = _rank() == 0
        self.plan = plan_schedule(config.schedule)
        if config.schedule.restart and sum(s.stage == "push" for s in self.plan) < 2:
            logger.warning("schedule.restart has no effect: it acts after every push but the last, and this schedule pushes at most once")
        mean, std = backbone_normalisation(config)
        if data is None and config.data.cache and _world() > 1:
            # Rank 0 decodes the images into the cache; the other ranks then read it.
            data = _run_on_main(lambda: build_run_data(config, mean, std))
        self.data = data or build_run_data(config, mean, std)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.run.seed)
            self.model = build_model(config, self.data.class_names)
        self.model.to(self.device)
        if config.run.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # Backbone pre-training (schedule.pretrain_epochs) trains the features with a temporary
        # linear head on globally max-pooled features; the head is dropped afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.run.seed + 1)
            self.pretrain_net = PretrainNet(self.model.features, self.model.feature_channels, len(self.data.class_names)).to(self.device)
        self.optimizers = self._make_optimizers()
        self.scheduler = self._make_scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.coefficients = LossCoefficients(**{k: getattr(config.loss, k) for k in ("ce", "cluster", "separation", "l1")})
        self.metrics: list[dict[str, Any]] = []
        self.best_val = -1.0
        self.selected_step: int | None = None
        self.bad_images = BadImageLog()
        self.next_step = 0
        self._ddp: dict[str, nn.Module] | None = None
        self._compiled: dict[str, nn.Module] = {}  # run.compile: one torch.compile wrapper per stage
        self.alignment_block: int | None = None  # loss.alignment's shallow block, resolved when first needed
        # data.feature_cache: "warm" (the whole backbone's output) and "prefix" (the frozen
        # blocks' output); a key present with None means the cache could not be built
        self._feature_caches: dict[str, FrozenFeatureCache | None] = {}
        # optim.ema_decay: the moving average of the weights since the last push (None when off,
        # and between a push and the next training epoch)
        self.weight_average: AveragedModel | None = None
        self.tensorboard = open_tensorboard(config.run.tensorboard, self.out_dir, self.is_main)  # run.tensorboard

    # -- setup ------------------------------------------------------------------------------
    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        o = self.config.optim
        groups = parameter_groups(self.model)
        # The fused kernel updates every parameter in one pass: on a CPU PyTorch's default Adam
        # loops over tensors (a step over ResNet-18's parameters costs ~25x more), a large share
        # of a joint epoch at small image sizes.
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}

        def adam(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return torch.optim.Adam(param_groups, **fused)

        return {
            "warm": adam(
                [
                    {"params": groups["add_on"], "lr": o.warm_add_on_lr, "weight_decay": o.weight_decay},
                    {"params": groups["prototypes"], "lr": o.warm_prototypes_lr},
                ]
            ),
            "joint": adam(
                [
                    {"params": groups["features"], "lr": o.backbone_lr, "weight_decay": o.weight_decay},
                    {"params": groups["add_on"], "lr": o.add_on_lr, "weight_decay": o.weight_decay},
                    {"params": groups["prototypes"], "lr": o.prototypes_lr},
                ]
            ),
            "last_layer": adam([{"params": groups["last_layer"], "lr": o.last_layer_lr}]),
            "pretrain": adam(
                [
                    {"params": groups["features"], "lr": o.pretrain_lr, "weight_decay": o.weight_decay},
                    {"params": list(self.pretrain_net.head.parameters()), "lr": o.pretrain_lr},
                ]
            ),
        }

    def _make_scheduler(self) -> torch.optim.lr_scheduler.StepLR:
        s = self.config.schedule
        return torch.optim.lr_scheduler.StepLR(self.optimizers["joint"], step_size=s.joint_lr_step, gamma=s.joint_lr_gamma)

    def _step_seed(self, step: Step) -> int:
        return (self.config.run.seed * 1_000_003 + step.index * 7919 + 17) % (2**63 - 1)

    def _bar(self, description: str, total: int) -> Any:
        return open_bar(self.progress_bars if self.is_main else None, description, total)

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

    def _sampler(self, indices: list[int], shuffle: bool, seed: int) -> Any:
        if _world() <= 1:
            return None
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(range(len(indices)), shuffle=shuffle, seed=seed, drop_last=False)

    # -- stages -----------------------------------------------------------------------------
    def _train_epoch(self, step: Step) -> dict[str, Any]:
        """One warm or joint epoch. The global batch order comes from the step's seed; with
        several processes each global batch is split across ranks and every rank's loss is
        weighted by its share, so DDP's gradient average equals the single-process gradient."""
        cfg = self.config
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

    def _check_ranks_agree(self, step: Step) -> None:
        """With several processes, check that every rank holds the same model after a step that
        decides the prototypes (push, pruning, the last layer): the same prototype count, the same
        bits of every tensor and the same provenance. A difference is a bug, reported at once
        rather than as a shape error or a silently different model later."""
        if _world() == 1:
            return
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        sources = [(p["dataset_index"], tuple(p["position"])) for p in (self.model.provenance or []) if p is not None]
        mine = (self.model.num_prototypes, digest.hexdigest(), sources)
        gathered: list[Any] = [None] * _world()
        dist.all_gather_object(gathered, mine)
        for rank, theirs in enumerate(gathered):
            if theirs != gathered[0]:
                raise RuntimeError(
                    f"after step {step.index} ({step.stage}) rank {rank} holds another model than rank 0 "
                    f"({theirs[0]} vs {gathered[0][0]} prototypes); this is a bug in protopnet's distributed training"
                )

    def _share_model_from_main(self) -> None:
        """With several processes, give every rank rank 0's weights and buffers.

        DDP keeps the parameters equal, but each rank's last forward pass of an epoch updates its
        own batch-norm running statistics from its own slice of the batch, so after an epoch the
        ranks' models differ. Push, pruning, the last-layer stage and evaluation then decide from
        the model's numbers: they must all see one model, rank 0's.
        """
        if _world() == 1:
            return
        with torch.no_grad():
            for tensor in self.model.state_dict().values():
                if tensor.is_contiguous():
                    dist.broadcast(tensor, src=0)
                else:  # a channels_last weight: broadcast a contiguous copy, then copy it back
                    buffer = tensor.contiguous()
                    dist.broadcast(buffer, src=0)
                    tensor.copy_(buffer)

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

    def _validate(self) -> float | None:
        if not self.data.val_indices:
            return None
        logits, labels, _ = predict_logits(
            self.model, self.data.clean, indices=self.data.val_indices, settings=self.settings,
            sampler=self._sampler(self.data.val_indices, False, 0),
            bad_images=self.bad_images,
        )
        return accuracy_report(logits, labels, self.data.class_names)["accuracy"]

    # -- the run ----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Run every planned step (from the last checkpoint when ``resume``), then evaluate the
        selected model on the test split."""
        start = time.perf_counter()

        def prepare() -> None:  # rank 0 only: the other ranks never write
            _check_writable(self.out_dir)
            if not resume and self._checkpoint_dirs():
                raise FileExistsError(f"{self.out_dir} already holds a run; pass --resume to continue it or choose another --out")
            # what a killed run left half-written
            clean_interrupted_writes(self.out_dir / "checkpoints")
            clean_interrupted_writes(self.out_dir)

        _run_on_main(prepare)
        if resume:
            self._resume()
        if self.is_main:
            atomic_write_text(self.out_dir / "config.yaml", self.config.to_yaml())
        elapsed_before = sum(r.get("seconds", 0.0) for r in self.metrics)
        with self._bar("training", len(self.plan)) as overall:
            overall.update(self.next_step)
            for step in self.plan[self.next_step:]:
                t0 = time.perf_counter()
                self.tensorboard.before_step(step, self.optimizers)
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    torch.manual_seed(self._step_seed(step))
                    if step.stage in ("warm", "joint") and step.index == self._first_prototype_step():
                        self._initialise_prototypes()
                        self._share_model_from_main()
                    if step.stage in ("pretrain", "warm", "joint"):
                        record = self._train_epoch(step)
                    elif step.stage == "push":
                        record = self._push(step)
                    elif step.stage == "prune":
                        record = self._prune(step)
                    else:
                        record = self._last_layer(step)
                    if step.stage in ("push", "prune", "last_layer"):
                        self._check_ranks_agree(step)
                    val = self._validate() if step.stage != "pretrain" else None
                record = {"step": step.index, "stage": step.stage, "epoch": step.epoch, **record, "val_accuracy": val,
                          "seconds": round(time.perf_counter() - t0, 3)}
                self._merge_bad_images()
                self.metrics.append(record)
                self.tensorboard.after_step(record, self.model, self.data.clean)  # before the checkpoint: a resume purges it
                try:
                    self._after_step(step, val)
                except OSError as error:
                    raise self._write_failure(error, f"step {step.index} ({step.stage}, epoch {step.epoch})") from None
                overall.update(1)
                logger.info("step %d %s epoch %d: %s", step.index, step.stage, step.epoch, _short(record))
        self.tensorboard.close()
        self._adopt_weight_average()  # a schedule that ends with training epochs
        if self.selected_step is None and self.is_main:
            # No pushed model was ever selected (a schedule without push): keep the final one.
            save_model(self.model, self.out_dir / "model", dataset=self.data.clean, run_config=self.config.to_dict())
        if _world() > 1:
            dist.barrier()
        return self._finish(elapsed_before + time.perf_counter() - start)

    def _after_step(self, step: Step, val: float | None) -> None:
        if self._is_candidate(step):
            score = val if val is not None else float(step.index)
            if score > self.best_val:
                self.best_val = score
                self.selected_step = step.index
                if self.is_main:
                    save_model(
                        self.model, self.out_dir / "model", dataset=self.data.clean if self.config.output.save_prototype_images else None,
                        run_config=self.config.to_dict(), extra={"selected_step": step.index, "val_accuracy": val},
                    )
        self.next_step = step.index + 1
        if self.is_main:
            self._save_checkpoint(step)
            self._write_metrics()

    def _is_candidate(self, step: Step) -> bool:
        """Whether the model after ``step`` is a finished, pushed model that model selection
        may keep: the end of a push round (push, then prune and last layer where planned). With
        ``schedule.prune`` only the pruned model is: pruning is what the run was asked for."""
        if step.stage not in ("push", "prune", "last_layer"):
            return False
        later = self.plan[step.index + 1] if step.index + 1 < len(self.plan) else None
        if later is not None and later.epoch == step.epoch and later.stage in ("prune", "last_layer"):
            return False  # the round goes on
        if self.config.schedule.prune:
            return any(s.stage == "prune" and s.index <= step.index for s in self.plan)
        return True

    def _write_failure(self, error: OSError, what: str) -> OSError:
        """One line for a failed write (disk full, read-only): what was lost and what is safe."""
        done = self._checkpoint_dirs()
        safe = f"the checkpoint {done[-1].name} is intact" if done else "no step was checkpointed yet"
        reason = error.strerror or str(error)
        failure = OSError(
            f"could not save {what} in {self.out_dir}: {reason}; {safe}: free some space (or make the directory writable) "
            "and run the same command with --resume"
        )
        failure.errno = error.errno
        return failure

    def _merge_bad_images(self) -> None:
        """With several processes, every rank learns the unreadable images the others met."""
        if _world() > 1:
            gathered: list[Any] = [None] * _world()
            dist.all_gather_object(gathered, self.bad_images.items)
            for items in gathered:
                for path, reason in items.items():
                    self.bad_images.items.setdefault(path, reason)

    def _selected_model(self, model_dir: Path) -> nn.Module:
        """The saved model, loaded by rank 0 (the other ranks receive its tensors: they need no
        access to the file)."""
        from ..checkpoint import load_model

        selected = _run_on_main(lambda: load_model(model_dir, device=self.device))
        if _world() == 1:
            return selected
        if not self.is_main:
            selected = copy.deepcopy(self.model).to(memory_format=torch.contiguous_format)
        tensors = selected.state_dict()
        layout = [sorted((k, tuple(v.shape)) for k, v in tensors.items())]
        dist.broadcast_object_list(layout, src=0)
        if layout[0] != sorted((k, tuple(v.shape)) for k, v in tensors.items()):
            raise CheckpointError(f"{model_dir}: the saved model does not match the trained architecture")
        for key, _ in layout[0]:
            buffer = tensors[key].contiguous()
            dist.broadcast(buffer, src=0)
            tensors[key].copy_(buffer)
        return selected.eval()

    def _finish(self, seconds: float) -> TrainResult:
        """Evaluate the selected model on validation and test (sharded across ranks) and write
        ``results.json`` (rank 0)."""
        model_dir = self.out_dir / "model"
        selected = self._selected_model(model_dir)
        cfg = self.config
        # the selected model is evaluated in float32 on the contiguous layout, whatever the run trained in
        common = dict(settings=self.settings.replace(precision="fp32", channels_last=False), bad_images=self.bad_images)
        val = None
        if self.data.val_indices:
            logits, labels, _ = predict_logits(selected, self.data.clean, indices=self.data.val_indices,
                                               sampler=self._sampler(self.data.val_indices, False, 0), **common)
            val = accuracy_report(logits, labels, self.data.class_names)
        test = None
        if self.data.test is not None:
            every = range(len(self.data.test))
            logits, labels, _ = predict_logits(selected, self.data.test, sampler=self._sampler(every, False, 0), **common)
            test = accuracy_report(logits, labels, self.data.class_names)
        self._merge_bad_images()
        if self.is_main:
            results = {
                "selected_step": self.selected_step,
                "validation": val,
                "test": test,
                "seconds": round(seconds, 2),
                "precision": self.precision,  # what run.precision resolved to here ('auto' -> bf16 or fp32)
                "bad_images": len(self.bad_images),
            }
            try:
                atomic_write_json(self.out_dir / "results.json", results)
                record_training_results(model_dir, results, cfg.data.root)  # the model card shows them
                if len(self.bad_images):
                    atomic_write_text(self.out_dir / "bad_images.txt", "".join(f"{p}\t{r}\n" for p, r in sorted(self.bad_images.items.items())))
            except OSError as error:
                raise self._write_failure(error, "the results") from None
            if len(self.bad_images):
                logger.warning("%d unreadable images were skipped; they are listed in %s", len(self.bad_images), self.out_dir / "bad_images.txt")
        return TrainResult(self.out_dir, model_dir, val or {}, test, seconds, self.metrics)

    def _write_metrics(self) -> None:
        atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.metrics))


def _check_writable(directory: Path) -> None:
    """Create the output directory; fail before any training work if that is impossible, if it is
    read-only or if the disk is full."""
    probe = directory / ".write-test"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 1024 * 1024)
        probe.unlink()
    except OSError as error:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise OSError(f"cannot write to {directory}: {error.strerror or error} (is it read-only or is the disk full?)") from None
    usage = shutil.disk_usage(directory)
    if usage.free < 50 * 1024 * 1024:
        raise OSError(f"only {usage.free // (1024 * 1024)} MiB free under {directory}; training needs room for checkpoints")


def _short(record: dict[str, Any]) -> str:
    keys = ("loss", "ce", "cluster", "separation", "train_accuracy", "val_accuracy")
    return ", ".join(f"{k}={record[k]:.4f}" for k in keys if isinstance(record.get(k), float))


def train(config: Config, out_dir: str | Path | None = None, *, resume: bool = False, progress_bars: ProgressBars | None = None) -> TrainResult:
    """Train a ProtoPNet as ``config`` says; returns where the model and results are.
    ``progress_bars``: see :class:`Trainer`."""
    return Trainer(config, out_dir, progress_bars=progress_bars).fit(resume=resume)
