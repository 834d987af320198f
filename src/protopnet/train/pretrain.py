"""The supervised pre-training head of a from-scratch backbone (``schedule.pretrain_epochs``): the
demo's stand-in for ImageNet weights, trained before the prototypes exist."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn


class PretrainOutput(NamedTuple):
    logits: torch.Tensor


class PretrainNet(nn.Module):
    """Backbone + global max pooling + a linear head: (B, 3, S, S) -> logits (B, K).

    Max pooling, like ProtoPNet's own min-distance pooling, keeps the evidence of a small part
    that average pooling would dilute among background cells."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> PretrainOutput:
        return PretrainOutput(self.head(self.features(x).amax(dim=(2, 3))))
