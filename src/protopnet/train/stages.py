"""The training schedule as data (paper Section 2.2, reference schedule).

:func:`plan_schedule` turns a :class:`~protopnet.config.ScheduleConfig` into the list of steps a
run executes — ``warm``, ``joint``, ``push``, ``prune``, ``last_layer`` — and :data:`TRAINABLE` says which
parts of the network each stage trains. A run is resumable at any step boundary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..config import ScheduleConfig

STAGES = ("pretrain", "warm", "joint", "push", "prune", "last_layer")

# Which parts of the network each stage trains.
TRAINABLE: dict[str, tuple[str, ...]] = {
    "pretrain": ("features",),  # with a temporary linear head, see Trainer
    "warm": ("add_on", "prototypes"),
    "joint": ("features", "add_on", "prototypes"),
    "push": (),
    "prune": (),
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
    return schedule.is_push_epoch(epoch)


def plan_schedule(schedule: ScheduleConfig) -> list[Step]:
    """The ordered steps of a run.

    First ``pretrain_epochs`` backbone pre-training epochs (0 by default); then epoch e is ``warm`` when e < warm_epochs, else ``joint``; after a push epoch come ``push``
    and ``last_layer`` (its iterations run inside that one step). With ``schedule.prune`` a
    ``prune`` step comes between the final push and its last-layer stage.
    """
    steps: list[Step] = []

    def add(stage: str, epoch: int) -> None:
        steps.append(Step(len(steps), stage, epoch))

    for epoch in range(schedule.pretrain_epochs):
        add("pretrain", epoch)
    pushes = [e for e in range(schedule.epochs) if is_push_epoch(schedule, e)]
    for epoch in range(schedule.epochs):
        add("warm" if epoch < schedule.warm_epochs else "joint", epoch)
        if epoch in pushes:
            add("push", epoch)
            if schedule.prune and epoch == pushes[-1]:
                add("prune", epoch)
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


def backbone_blocks(features: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in forward order: the children of ``features``, looking through
    wrappers that hold a single child (DenseNet's ReLU wrapper, timm's). MobileNetV2: its 19
    ``features`` blocks; ResNet: conv1, bn1, relu, maxpool, layer1..layer4; VGG: every layer."""
    module = features
    children = list(module.children())
    while len(children) == 1:
        module = children[0]
        children = list(module.children())
    return children or [module]


def backbone_segment(features: nn.Module, start: int, end: int) -> nn.Module:
    """The backbone's blocks ``start..end-1`` (:func:`backbone_blocks` order) as one module
    mapping the output of block ``start - 1`` to that of block ``end - 1``; a backbone whose
    output is not simply its last block's (``MultiScaleFeatures``) cuts itself."""
    if hasattr(features, "segment"):
        return features.segment(start, end)
    return nn.Sequential(*backbone_blocks(features)[start:end])


def set_trainable(model: nn.Module, stage: str, frozen_blocks: int = 0) -> None:
    """Freeze everything but what ``stage`` trains; the first ``frozen_blocks`` blocks of the
    backbone (:func:`backbone_blocks`) stay frozen even in the stages that train it."""
    if stage not in TRAINABLE:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    if frozen_blocks < 0:
        raise ValueError(f"frozen_blocks must be >= 0, got {frozen_blocks}")
    for part, params in parameter_groups(model).items():
        for p in params:
            p.requires_grad_(part in TRAINABLE[stage])
    if frozen_blocks and "features" in TRAINABLE[stage]:
        for block in backbone_blocks(model.features)[:frozen_blocks]:
            for p in block.parameters():
                p.requires_grad_(False)


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every batch-norm layer of ``module`` in eval mode (running statistics, no updates);
    ``schedule.freeze_backbone_batchnorm``."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


@torch.no_grad()
def take_averaged_weights(model: nn.Module, average: AveragedModel) -> None:
    """Copy the parameters of ``average`` (an ``AveragedModel`` of ``model``) into ``model``;
    buffers (batch-norm statistics) stay the model's own."""
    for live, averaged in zip(model.parameters(), average.module.parameters(), strict=True):
        live.copy_(averaged)
