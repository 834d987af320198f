"""TensorBoard for a training run (``run.tensorboard: true``; ``pip install 'protopnet[tensorboard]'``).

Writes into ``<run dir>/tensorboard/``, on rank 0 only, with the step index of the schedule as
TensorBoard's step:

    <stage>/<key>            every number of each step's ``metrics.jsonl`` record (loss terms,
                             accuracies, push distances, pruning counts, seconds...)
    lr/<optimizer>/<group>   the learning rate of every parameter group of the optimiser the
                             step trains with, as the step used it
    push/prototype_patches   after each push, the prototypes' source patches, one row per class

``metrics.jsonl`` stays the record of the run: this is a view of it. A resumed run purges the
events of the steps it runs again, so no step appears twice.

    tensorboard --logdir RUN_DIR/tensorboard
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)

INSTALL_HINT = "run.tensorboard: needs the optional extra: pip install 'protopnet[tensorboard]'"

# The parameter groups of the Trainer's optimisers, in their order (see Trainer._make_optimizers).
GROUPS = {
    "pretrain": ("backbone", "head"),
    "warm": ("add_on", "prototypes"),
    "joint": ("backbone", "add_on", "prototypes"),
    "last_layer": ("last_layer",),
}
PATCH_PIXELS = 48
MAX_PATCHES = 400


class NoTensorBoard:
    """What the Trainer calls when TensorBoard is off (or on ranks other than 0): nothing."""

    def before_step(self, step: Any, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        return None

    def after_step(self, record: dict[str, Any], model: ProtoPNet | None = None, dataset: Any = None) -> None:
        return None

    def close(self) -> None:
        return None


class TensorBoardLog(NoTensorBoard):
    """The writer behind ``run.tensorboard`` (see the module docstring). The event file is opened
    at the first step this process runs, purging events from that step on (a resumed run)."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(INSTALL_HINT) from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def _open(self, first_step: int) -> Any:
        if self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=first_step or None)
            logger.info("TensorBoard: writing to %s (tensorboard --logdir %s)", self.log_dir, self.log_dir)
        return self.writer

    def before_step(self, step: Any, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """The learning rates the step is about to train with."""
        writer = self._open(step.index)
        optimizer = optimizers.get(step.stage)
        if optimizer is None:  # push, prune: no optimiser
            return
        names = GROUPS.get(step.stage, ())
        for i, group in enumerate(optimizer.param_groups):
            name = names[i] if len(names) == len(optimizer.param_groups) else str(i)
            writer.add_scalar(f"lr/{step.stage}/{name}", float(group["lr"]), step.index)

    def after_step(self, record: dict[str, Any], model: ProtoPNet | None = None, dataset: Any = None) -> None:
        """Every number of the step's record; after a push, the grid of source patches."""
        writer = self._open(int(record["step"]))
        index, stage = int(record["step"]), str(record["stage"])
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # stage names, and None (no validation split)
            if math.isfinite(float(value)):
                writer.add_scalar(f"{stage}/{key}", float(value), index)
        if stage == "push" and model is not None and dataset is not None and model.provenance:
            grid = prototype_patch_grid(model, dataset)
            if grid is not None:
                writer.add_image("push/prototype_patches", grid, index)
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def open_tensorboard(enabled: bool, run_dir: str | Path, is_main: bool) -> NoTensorBoard:
    """The Trainer's TensorBoard hook: a writer into ``run_dir/tensorboard`` on rank 0 when
    ``enabled``, otherwise one that does nothing."""
    if not enabled or not is_main:
        return NoTensorBoard()
    return TensorBoardLog(Path(run_dir) / "tensorboard")


def prototype_patch_grid(model: ProtoPNet, dataset: Any) -> torch.Tensor | None:
    """(3, H, W) uint8: each prototype's source patch (from its provenance), resized to
    ``PATCH_PIXELS`` square, one row per class in class order; at most ``MAX_PATCHES`` patches.
    An unreadable source picture leaves a black square."""
    from torchvision.transforms.functional import pil_to_tensor
    from torchvision.utils import make_grid

    from ..visualize import crop_box

    provenance = sorted(model.provenance, key=lambda e: (int(e["class_index"]), int(e["prototype"])))[:MAX_PATCHES]
    if not provenance:
        return None
    per_class: dict[int, int] = {}
    for entry in provenance:
        per_class[int(entry["class_index"])] = per_class.get(int(entry["class_index"]), 0) + 1
    width = max(per_class.values())
    cells: list[torch.Tensor] = []
    blank = torch.zeros(3, PATCH_PIXELS, PATCH_PIXELS, dtype=torch.uint8)
    pictures: dict[int, Any] = {}
    for k in sorted(per_class):
        row = [e for e in provenance if int(e["class_index"]) == k]
        for entry in row:
            index = int(entry["dataset_index"])
            try:
                if index not in pictures:
                    pictures[index] = dataset.load_image(index)
                patch = crop_box(pictures[index], entry["box"]).convert("RGB").resize((PATCH_PIXELS, PATCH_PIXELS))
                cells.append(pil_to_tensor(patch))
            except (OSError, ValueError) as error:
                logger.warning("TensorBoard: no patch for prototype %s (%s)", entry.get("prototype"), error)
                cells.append(blank)
        cells.extend([blank] * (width - len(row)))
    return make_grid(torch.stack(cells), nrow=width, padding=2)
