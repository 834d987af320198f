"""The steps of a run that work on the prototype set and the last layer: where the prototypes
start, push (and ``schedule.restart`` after it), pruning, and the convex last-layer stage.
:class:`PrototypeSteps` holds them as methods the :class:`~protopnet.train.loop.Trainer`
inherits; they read and set the Trainer's model, data, optimisers and progress bars. With several
processes, every decision that changes the prototype set (restart, pruning) is taken on rank 0
and broadcast, so the ranks' models keep the same shape.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from ..atomic_files import fault_point
from .distributed import all_agree, rank as _rank, run_on_main as _run_on_main, world as _world
from .last_layer import (
    KeptLatents,
    collect_similarities,
    collect_similarities_from_cache,
    collect_similarities_from_latents,
    optimise_last_layer,
)
from .prototype_init import restart_on_distinctive_patches, start_on_distinctive_patches, start_on_patches
from .push import push_prototypes
from .stages import Step, set_trainable

logger = logging.getLogger(__name__)


class PrototypeSteps:
    """Push, restart, prototype initialisation, pruning and the last-layer stage of a
    :class:`~protopnet.train.loop.Trainer` (a mixin: the methods use the Trainer's attributes)."""

    def _push(self, step: Step) -> dict[str, Any]:
        cfg = self.config
        self._adopt_weight_average()
        self.model.eval()
        # The last-layer stage of this round fits the same clean pictures in the same batches
        # (unless it fits fixed augmented views): push keeps its latent maps for it.
        kept = None
        if self._round_ends_with_last_layer(step) and not self._last_layer_fits_views():
            kept = KeptLatents(max_bytes=cfg.data.feature_cache_max_gb * 1e9)
        with self._bar(f"epoch {step.epoch + 1}/{cfg.schedule.epochs} push", len(self.data.train_indices)) as bar:
            provenance = push_prototypes(
                self.model, self.data.clean, indices=self.data.train_indices,
                settings=self.settings.replace(batch_size=cfg.data.push_batch_size),
                sampler=self._sampler(self.data.train_indices, False, 0),
                progress=lambda n: (bar.update(n), fault_point("push")), bad_images=self.bad_images,
                keep_latents=kept,
            )
        self._push_latents = kept
        moved = [p["distance"] for p in provenance]
        self.model.history.append({"event": "push", "step": step.index, "epoch": step.epoch, "time": _now()})
        record = {"push_mean_distance": sum(moved) / len(moved), "push_max_distance": max(moved)}
        if cfg.schedule.restart and any(s.stage == "push" and s.index > step.index for s in self.plan):
            record["restarted"] = self._restart(step)
        return record

    def _restart(self, step: Step) -> int:
        """``schedule.restart`` after a push that is not the last: the prototypes pruning's rule
        would remove (fewer than ``prune_threshold`` of their ``prune_k`` nearest training
        patches from their own class: background, shared distractors) start again on their
        class's most distinctive patches (:func:`restart_on_distinctive_patches`), and push runs
        once more so their provenance is recorded. Rank 0 decides; every rank takes its model.
        Returns how many restarted."""
        from ..prune import find_nearest_patches

        cfg = self.config
        settings = self.settings.replace(batch_size=cfg.data.push_batch_size)

        def decide() -> list[int]:
            with self._bar(f"epoch {step.epoch + 1}/{cfg.schedule.epochs} restart", len(self.data.train_indices)) as bar:
                nearest, _, _, _ = find_nearest_patches(
                    self.model, self.data.clean, k=cfg.schedule.prune_k, indices=self.data.train_indices,
                    settings=settings, progress=bar.update,
                )
            which = torch.nonzero(nearest.same_class_count() < cfg.schedule.prune_threshold).flatten().tolist()
            if which:
                restart_on_distinctive_patches(
                    self.model, self.data.clean, self.data.train_indices, which,
                    seed=cfg.run.seed * 1009 + step.epoch + 1, settings=self.settings, bad_images=self.bad_images,
                )
            return [int(j) for j in which]

        decision = [_run_on_main(decide)]
        if _world() > 1:
            dist.broadcast_object_list(decision, src=0)
            self._share_model_from_main()
        which = decision[0]
        if which:
            push_prototypes(
                self.model, self.data.clean, indices=self.data.train_indices, settings=settings,
                sampler=self._sampler(self.data.train_indices, False, 0), bad_images=self.bad_images,
            )
            logger.info("restarted %d prototypes on distinctive patches: %s", len(which), which)
        self.model.history.append({"event": "restart", "step": step.index, "epoch": step.epoch, "prototypes": which, "time": _now()})
        return len(which)

    def _round_ends_with_last_layer(self, step: Step) -> bool:
        """Whether the steps after ``step`` are (pruning, then) a last-layer stage."""
        for later in self.plan[step.index + 1:]:
            if later.stage != "prune":
                return later.stage == "last_layer"
        return False

    def _last_layer_fits_views(self) -> bool:
        """Whether the last-layer stage fits fixed augmented copies of the training pictures
        (``data.augment_views`` or the paper's offline augmentation) rather than the clean ones."""
        return bool(self.config.data.augment_views or self.config.data.offline_augmentation)

    def _first_prototype_step(self) -> int | None:
        return next((s.index for s in self.plan if s.stage in ("warm", "joint")), None)

    def _initialise_prototypes(self) -> None:
        """Where the prototypes start (``model.prototype_init``): uniform noise as built, or
        :func:`~protopnet.train.prototype_init.start_on_patches` /
        :func:`~protopnet.train.prototype_init.start_on_distinctive_patches` on the training
        pictures, seeded by run.seed alone so every process makes the same choice."""
        how = self.config.model.prototype_init
        if how == "uniform":
            return
        start = start_on_patches if how == "patches" else start_on_distinctive_patches
        start(
            self.model, self.data.clean, self.data.train_indices, seed=self.config.run.seed,
            settings=self.settings, bad_images=self.bad_images,
        )

    def _prune(self, step: Step) -> dict[str, Any]:
        """Paper Section 2.6 on the pushed model: drop the prototypes whose nearest training
        patches are mostly of other classes. With several processes rank 0 decides, on the whole
        push set (one forward pass), and the other ranks apply its decision. The last-layer stage
        that follows re-fits the remaining connections."""
        from ..prune import prune

        from ..model.surgery import remove_prototypes

        cfg = self.config
        self.model.eval()

        def decide() -> tuple[list[int], dict[str, Any], dict[str, Any]]:
            with self._bar(f"epoch {step.epoch + 1}/{cfg.schedule.epochs} prune", len(self.data.train_indices)) as bar:
                report = prune(
                    self.model, self.data.clean, k=cfg.schedule.prune_k, threshold=cfg.schedule.prune_threshold,
                    indices=self.data.train_indices, refit=False,
                    settings=self.settings.replace(batch_size=cfg.data.push_batch_size), progress=bar.update,
                )
            record = {
                "prototypes_before": len(report.prototypes), "prototypes_after": len(report.kept),
                "train_accuracy_before": report.accuracy["train"]["before"],
                "train_accuracy_after_removal": report.accuracy["train"]["after_removal"],
            }
            return report.removed, report.event, record

        # Rank 0 decides which prototypes go, once, and every other rank applies that decision: a
        # rank deciding on its own could remove another set (a count on the threshold is a
        # near-tie) and the ranks' models would no longer have the same shape.
        decision = [_run_on_main(decide)]
        if _world() > 1:
            dist.broadcast_object_list(decision, src=0)
            removed, event, record = decision[0]
            if not self.is_main:
                remove_prototypes(self.model, removed)
                self.model.history.append(event)
            self._share_model_from_main()
        else:
            record = decision[0][2]
        self._rebuild_optimizers()
        return record

    def _rebuild_optimizers(self) -> None:
        """Fresh optimisers over the model's current parameters (pruning replaces the prototype
        and last-layer tensors); the joint learning-rate schedule keeps its position."""
        position = self.scheduler.state_dict()
        self.optimizers = self._make_optimizers()
        self.scheduler = self._make_scheduler()
        self.scheduler.load_state_dict(position)

    def _last_layer(self, step: Step) -> dict[str, Any]:
        cfg = self.config
        set_trainable(self.model, "last_layer")
        # The convex stage fits the training pictures: with fixed augmented copies (the paper's
        # offline augmentation, or data.augment_views) all of them, as the reference does;
        # with on-the-fly augmentation the clean pictures.
        fixed = self._last_layer_fits_views()
        dataset, items = (self.data.train, self.data.training_items) if fixed else (self.data.clean, self.data.train_indices)
        prefix = self._feature_caches.get("prefix") if fixed else None
        kept, self._push_latents = self._push_latents, None  # used once, then freed
        if not fixed and all_agree(kept is not None and kept.complete):
            # push's latent maps of the same pictures, with the network unchanged since
            sims, labels, _ = collect_similarities_from_latents(self.model, kept, sharded=_world() > 1)
        elif prefix is not None:  # the frozen blocks' outputs are cached: only the later blocks run
            sims, labels, _ = collect_similarities_from_cache(
                self.model, prefix, items, settings=self.settings.replace(batch_size=cfg.data.push_batch_size),
                rank=_rank(), world=_world(),
            )
        else:
            sims, labels, _ = collect_similarities(
                self.model, dataset, indices=items, settings=self.settings.replace(batch_size=cfg.data.push_batch_size),
                sampler=self._sampler(items, False, 0),
                bad_images=self.bad_images,
            )
        generator = torch.Generator().manual_seed(self._step_seed(step))
        with self._bar(f"epoch {step.epoch + 1}/{cfg.schedule.epochs} last layer", cfg.schedule.last_layer_iterations) as bar:
            terms = optimise_last_layer(
                self.model, sims, labels, self.optimizers["last_layer"], iterations=cfg.schedule.last_layer_iterations,
                batch_size=cfg.data.batch_size, l1=cfg.loss.l1, ce=cfg.loss.ce, generator=generator,
                on_iteration=lambda i, t: (bar.update(1), bar.set_postfix(loss=f"{t['loss']:.3f}", acc=f"{t['train_accuracy']:.3f}")),
            )
        return terms


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
