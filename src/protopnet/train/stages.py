"""The training schedule as data (paper Section 2.2, reference schedule).

:func:`plan_schedule` turns a :class:`~protopnet.config.ScheduleConfig` into the list of steps a
run executes — ``warm``, ``joint``, ``push``, ``last_layer`` — and :data:`TRAINABLE` says which
parts of the network each stage trains. A run is resumable at any step boundary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..config import ScheduleConfig

STAGES = ("warm", "joint", "push", "last_layer")

# Which parts of the network each stage trains.
TRAINABLE: dict[str, tuple[str, ...]] = {
    "warm": ("add_on", "prototypes"),
    "joint": ("features", "add_on", "prototypes"),
    "push": (),
    "last_layer": ("last_layer",),
}


@dataclass(frozen=True)
class Step:
    """One unit of a run: a stage at an epoch. ``index`` is its position in the plan."""

    index: int
    stage: str
    epoch: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def is_push_epoch(schedule: ScheduleConfig, epoch: int) -> bool:
    regular = epoch >= schedule.push_start and (epoch - schedule.push_start) % schedule.push_every == 0
    final = schedule.push_at_end and epoch == schedule.epochs - 1
    return regular or final


def plan_schedule(schedule: ScheduleConfig) -> list[Step]:
    """The ordered steps of a run.

    Epoch e is ``warm`` when e < warm_epochs, else ``joint``; after a push epoch come ``push``
    and ``last_layer`` (its iterations run inside that one step).
    """
    steps: list[Step] = []

    def add(stage: str, epoch: int) -> None:
        steps.append(Step(len(steps), stage, epoch))

    for epoch in range(schedule.epochs):
        add("warm" if epoch < schedule.warm_epochs else "joint", epoch)
        if is_push_epoch(schedule, epoch):
            add("push", epoch)
            if schedule.last_layer_iterations > 0:
                add("last_layer", epoch)
    return steps


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's parameters by part: features, add_on, prototypes, last_layer."""
    return {
        "features": list(model.features.parameters()),
        "add_on": list(model.add_on.parameters()),
        "prototypes": [model.prototypes],
        "last_layer": list(model.last_layer.parameters()),
    }


def set_trainable(model: nn.Module, stage: str) -> None:
    """Freeze everything but what ``stage`` trains."""
    if stage not in TRAINABLE:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    for part, params in parameter_groups(model).items():
        for p in params:
            p.requires_grad_(part in TRAINABLE[stage])
