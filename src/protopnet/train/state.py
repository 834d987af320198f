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
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..atomic_files import atomic_write_json, fault_point, write_directory_atomically
from ..checkpoint import CheckpointError, flatten_state, load_tensors, save_tensors, unflatten_state
from .stages import Step

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class ResumeMismatchError(ValueError):
    """The run directory holds a run of another config."""


def _checkpoint_dirs(root: Path) -> list[Path]:
    """The finished checkpoints under ``root``, oldest first."""
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")) if root.is_dir() else []


def _snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of every tensor (never a view of the original: the run goes on
    changing the originals in place while the copies are written)."""
    copies = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        copies[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu").copy_(tensor)
    return copies


def _yield_to_training() -> None:
    """Give the calling thread the lowest CPU priority, on Linux (where a thread has a nice value
    of its own). A checkpoint written beside a training step then takes the cores only when the
    step leaves them idle (while it loads a batch, say), instead of stalling the step's
    multithreaded kernels, which all wait for their slowest thread."""
    if sys.platform != "linux":  # elsewhere setpriority(PRIO_PROCESS, id) names a whole process
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:  # not allowed here: the write runs at the normal priority
        pass


class _BackgroundWrite:
    """``work()`` running on a thread of its own; ``error`` is what it raised, if anything. The
    thread is not a daemon: an interpreter that exits lets it finish its files first."""

    def __init__(self, what: str, work: Callable[[], None]) -> None:
        self.what = what
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), name="protopnet-checkpoint")
        self.thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        _yield_to_training()
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - handed to the training thread
            self.error = error


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
        """Checkpoint the run as it is after ``step``: a copy of its tensors and bookkeeping is
        taken now, and written (serialised, hashed, fsynced, renamed into place; the oldest
        checkpoints beyond ``output.keep_checkpoints`` removed) on a background thread while the
        next step runs (``output.background_checkpoints``; else here, before returning). One
        write is in flight at a time; :meth:`_complete_checkpoint_write` waits for it and
        reports its failure."""
        self._complete_checkpoint_write()
        state, extra_tensors = self._state()
        text = json.dumps(state, allow_nan=True)  # the bookkeeping as it is now: its lists grow with the next step
        model_tensors = _snapshot(self.model.state_dict())  # training goes on updating the tensors in place
        extra_tensors = _snapshot(extra_tensors)
        root, keep = self.out_dir / "checkpoints", self.config.output.keep_checkpoints

        def fill(tmp: Path) -> None:
            written = json.loads(text)
            written["model_sha256"] = save_tensors(tmp / "model.safetensors", model_tensors)
            fault_point("checkpoint-write")
            written["state_sha256"] = save_tensors(tmp / "state.safetensors", extra_tensors)
            atomic_write_json(tmp / "state.json", written)

        def write() -> None:
            write_directory_atomically(root / f"step-{step.index:05d}", fill)
            for old in _checkpoint_dirs(root)[:-keep]:
                # renamed first, so a kill halfway through the deletion leaves no half checkpoint
                doomed = root / f".{old.name}.del-{os.getpid()}-{time.monotonic_ns()}"
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

        if self.config.output.background_checkpoints:
            self._pending_write = _BackgroundWrite(f"step {step.index} ({step.stage}, epoch {step.epoch})", write)
        else:
            write()

    def _complete_checkpoint_write(self, report: bool = True) -> None:
        """Wait for the checkpoint being written, if any. Its failure is raised as
        :meth:`_write_failure` describes it (an ``OSError`` naming its step), unless ``report``
        is False (the run is already stopping with another error)."""
        pending, self._pending_write = self._pending_write, None
        if pending is None:
            return
        pending.thread.join()
        if pending.error is None or not report:
            return
        if isinstance(pending.error, OSError):
            raise self._write_failure(pending.error, pending.what) from None
        raise pending.error

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
        return _checkpoint_dirs(self.out_dir / "checkpoints")
