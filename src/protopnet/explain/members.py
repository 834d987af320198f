"""The networks behind a model: a ProtoPNet is one; an ensemble (anything exposing ``members``,
ProtoPNets whose logits it sums, paper Section 2.5) is explained member by member."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..model import ProtoPNet


def model_members(model: ProtoPNet | Ensemble) -> list[tuple[int | None, ProtoPNet]]:
    """``[(None, model)]`` for a ProtoPNet; ``[(i, member_i), ...]`` for an ensemble exposing
    ``members`` (ProtoPNets whose logits it sums)."""
    members = getattr(model, "members", None)
    if members is not None and not hasattr(model, "prototypes"):
        return [(i, member) for i, member in enumerate(members)]
    return [(None, model)]


def member_inputs(model: ProtoPNet | Ensemble, x: torch.Tensor) -> list[tuple[int | None, ProtoPNet, torch.Tensor]]:
    """``(member id, network, its input)`` for every network whose logits make ``model``'s:
    the model itself for a ProtoPNet; for an ensemble, each member with the ensemble's input
    converted as the ensemble's own forward converts it (``model.member_input``), so the score
    sheet adds up to the ensemble's logits."""
    members = model_members(model)
    if members[0][0] is None:
        return [(None, model, x)]
    convert = getattr(model, "member_input", None)
    return [(i, net, convert(x, i) if convert is not None else x) for i, net in members]
