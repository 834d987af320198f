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

A step's checkpoint is written on a background thread while the next step runs (the step's
tensors and bookkeeping are copied first; ``output.background_checkpoints: false`` writes it
before the next step starts). Killed at any moment (SIGKILL, power loss), a run loses at most its
current step and, in the background mode, the one before when its checkpoint was not yet on
disk: every file and directory is replaced atomically, a checkpoint is renamed into place only
once complete, and ``--resume`` skips a checkpoint that fails its checksums, falling back to the
one before. It first removes what the killed writes left behind (``.step-*.tmp``, ``.model.*.tmp``...).
A write that fails (disk full, read-only) stops the run, at the latest when the next step ends,
with one line saying which step could not be saved and which is safely checkpointed. ``PROTOPNET_KILL_AT`` (see :func:`protopnet.atomic_files.fault_point`) kills a run at
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
from torch.optim.swa_utils import AveragedModel

from ..atomic_files import atomic_write_json, clean_interrupted_writes, atomic_write_text
from ..checkpoint import CheckpointError
from ..config import Config
from ..losses import LossCoefficients
from ..model_card import record_training_results
from ..runtime import ProgressBars, RunSettings, open_bar, resolve_device, resolve_precision
from ..save import save_model
from .distributed import rank as _rank, run_on_main as _run_on_main, world as _world
from .epochs import TrainingEpochs
from .evaluate import accuracy_report, predict_logits
from .feature_cache import FrozenFeatureCache
from .last_layer import KeptLatents
from .loader import BadImageLog
from .pretrain import PretrainNet
from .prototype_steps import PrototypeSteps
from .run_data import RunData, backbone_normalisation, build_model, build_run_data
from .state import STATE_VERSION, ResumeMismatchError, RunState, _BackgroundWrite  # noqa: F401 - the first two were defined here
from .stages import Step, parameter_groups, plan_schedule
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


class Trainer(TrainingEpochs, PrototypeSteps, RunState):
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
        # push's latent maps, kept for the last-layer stage of its round (None otherwise)
        self._push_latents: KeptLatents | None = None
        # the checkpoint being written in the background (RunState._save_checkpoint)
        self._pending_write: _BackgroundWrite | None = None
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

    def _sampler(self, indices: list[int], shuffle: bool, seed: int) -> Any:
        if _world() <= 1:
            return None
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(range(len(indices)), shuffle=shuffle, seed=seed, drop_last=False)

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
        try:
            self._run_steps()
        except BaseException:
            self._complete_checkpoint_write(report=False)  # the last finished step's checkpoint still lands
            raise
        self._complete_checkpoint_write()
        self.tensorboard.close()
        self._adopt_weight_average()  # a schedule that ends with training epochs
        if self.selected_step is None and self.is_main:
            # No pushed model was ever selected (a schedule without push): keep the final one.
            save_model(self.model, self.out_dir / "model", dataset=self.data.clean, run_config=self.config.to_dict())
        if _world() > 1:
            dist.barrier()
        return self._finish(elapsed_before + time.perf_counter() - start)

    def _run_steps(self) -> None:
        """Every planned step from ``next_step`` on, each followed by its checkpoint (written in
        the background while the next step runs: see :meth:`RunState._save_checkpoint`)."""
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
                # the previous step's checkpoint first: the model directory and the checkpoints
                # are written in step order, and its failure names its own step
                self._complete_checkpoint_write()
                try:
                    self._after_step(step, val)
                except OSError as error:
                    raise self._write_failure(error, f"step {step.index} ({step.stage}, epoch {step.epoch})") from None
                overall.update(1)
                logger.info("step %d %s epoch %d: %s", step.index, step.stage, step.epoch, _short(record))

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
        # The selected model is evaluated in float32, whatever precision the run trained in, in the
        # run's memory layout: channels_last only orders the sums differently, and on a CPU its
        # float32 convolutions are the faster ones.
        if cfg.run.channels_last:
            selected = selected.to(memory_format=torch.channels_last)
        common = dict(settings=self.settings.replace(precision="fp32"), bad_images=self.bad_images)
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
