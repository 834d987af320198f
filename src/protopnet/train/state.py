"""A run's state on disk: checkpoints written after every step, and resuming from the newest
usable one. :class:`RunState` holds the Trainer's checkpoint methods (the Trainer inherits them);
they read and set the Trainer's model, optimisers, scheduler, scaler, weight average and run
bookkeeping, so a resumed run ends with the weights an uninterrupted one ends with.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import atomic_write_json, fault_point, write_directory_atomically
from ..checkpoint import CheckpointError, flatten_state, load_tensors, save_tensors, unflatten_state
from .stages import Step

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class ResumeMismatchError(ValueError):
    """The run directory holds a run of another config."""


class RunState:
    """The checkpoint/resume half of :class:`protopnet.train.loop.Trainer` (a mixin: it uses the
    Trainer's attributes)."""

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        # Only the optimisers a later step uses: a finished stage's Adam moments (for the joint
        # stage twice the backbone's size) would be written after every step for nothing.
        remaining = {s.stage for s in self.plan[self.next_step:]}
        needed = {k: o.state_dict() for k, o in self.optimizers.items() if k in remaining}
        opt_skeleton, opt_tensors = flatten_state(needed, "optim")
        opt_tensors.update({f"pretrain_head.{k}": v for k, v in self.pretrain_net.head.state_dict().items()})
        if self.weight_average is not None:
            opt_tensors.update({f"weight_average.{k}": v for k, v in self.weight_average.state_dict().items()})
        state = {
            "version": STATE_VERSION,
            "next_step": self.next_step,
            "plan": [s.to_json() for s in self.plan],
            "config": self.config.to_dict(),
            "metrics": self.metrics,
            "best_val": self.best_val,
            "selected_step": self.selected_step,
            "optimizers": opt_skeleton,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            # Every step reseeds from (run.seed, step index) inside fork_rng, so the random state
            # at a step boundary is a function of these two numbers.
            "rng": {"seed": self.config.run.seed, "scheme": "seed * 1000003 + step * 7919 + 17, per step"},
            "provenance": self.model.provenance,
            "history": self.model.history,
            "bad_images": self.bad_images.items,
        }
        return state, opt_tensors

    def _save_checkpoint(self, step: Step) -> None:
        state, extra_tensors = self._state()

        def fill(tmp: Path) -> None:
            state["model_sha256"] = save_tensors(tmp / "model.safetensors", self.model.state_dict())
            fault_point("checkpoint-write")
            state["state_sha256"] = save_tensors(tmp / "state.safetensors", extra_tensors)
            atomic_write_json(tmp / "state.json", state)

        root = self.out_dir / "checkpoints"
        write_directory_atomically(root / f"step-{step.index:05d}", fill)
        for old in self._checkpoint_dirs()[: -self.config.output.keep_checkpoints]:
            # renamed first, so a kill halfway through the deletion leaves no half checkpoint
            doomed = root / f".{old.name}.del-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _resume(self) -> None:
        root = self.out_dir / "checkpoints"
        candidates = self._checkpoint_dirs()[::-1]
        for path in candidates:
            try:
                self._load_checkpoint(path)
                logger.info("resuming from %s (next step %d of %d)", path, self.next_step, len(self.plan))
                return
            except ResumeMismatchError:
                raise
            except (CheckpointError, OSError, ValueError, KeyError) as error:
                logger.warning("checkpoint %s is unusable (%s); trying the one before", path, error)
        if candidates:
            raise CheckpointError(f"{root}: no usable checkpoint to resume from")
        logger.info("no checkpoint in %s: starting from the beginning", self.out_dir)

    def _load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{path}: unknown checkpoint version {state.get('version')}")
        if state["config"]["model"] != self.config.to_dict()["model"] or state["config"]["schedule"] != self.config.to_dict()["schedule"] or state["config"]["data"] != self.config.to_dict()["data"]:
            raise ResumeMismatchError(f"{path}: this run was started with a different model, data or schedule config; resume with the same config or choose another --out")
        model_tensors = load_tensors(path / "model.safetensors", state["model_sha256"])
        other = load_tensors(path / "state.safetensors", state["state_sha256"])
        self._match_prototype_count(model_tensors)
        self.model.load_state_dict(model_tensors)
        self.pretrain_net.head.load_state_dict({k[len("pretrain_head."):]: v for k, v in other.items() if k.startswith("pretrain_head.")})
        average = {k[len("weight_average."):]: v for k, v in other.items() if k.startswith("weight_average.")}
        self.weight_average = None
        if average:
            self._weight_average()
            if self.weight_average is None:
                raise CheckpointError(f"{path}: the checkpoint holds averaged weights but optim.ema_decay is 0")
            self.weight_average.load_state_dict(average)
        optim_states = unflatten_state(state["optimizers"], other)
        self.optimizers = self._make_optimizers()
        for k, o in self.optimizers.items():
            if k in optim_states:  # absent: no step after the checkpoint uses it
                o.load_state_dict(optim_states[k])
        self.scheduler = self._make_scheduler()
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.metrics = list(state["metrics"])
        self.best_val = float(state["best_val"])
        self.selected_step = state["selected_step"]
        self.model.provenance = state.get("provenance")
        self.model.history = list(state.get("history") or [])
        self.bad_images.items = dict(state.get("bad_images") or {})
        self.next_step = int(state["next_step"])

    def _match_prototype_count(self, tensors: dict[str, torch.Tensor]) -> None:
        """A checkpoint written after the prune step holds fewer prototypes than the configured
        model: take its prototype set (the optimisers are rebuilt over it afterwards)."""
        saved, current = tensors["prototypes"].shape, self.model.prototypes.shape
        if saved[1:] != current[1:] or (saved[0] != current[0] and not self.config.schedule.prune):
            raise CheckpointError("checkpoint prototypes do not match the configured model")
        if saved[0] != current[0]:
            self.model.set_prototypes(tensors["prototypes"], tensors["prototype_classes"], tensors["last_layer.weight"])

    def _checkpoint_dirs(self) -> list[Path]:
        root = self.out_dir / "checkpoints"
        return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")) if root.is_dir() else []
