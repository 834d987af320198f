"""The networks behind a model: a ProtoPNet is one; an ensemble (anything exposing ``members``,
ProtoPNets whose logits it sums, paper Section 2.5) is explained member by member."""

from __future__ import annotations

from typing import Any

import torch


def model_members(model: Any) -> list[tuple[int | None, Any]]:
    """``[(None, model)]`` for a ProtoPNet; ``[(i, member_i), ...]`` for an ensemble exposing
    ``members`` (ProtoPNets whose logits it sums)."""
    members = getattr(model, "members", None)
    if members is not None and not hasattr(model, "prototypes"):
        return [(i, member) for i, member in enumerate(members)]
    return [(None, model)]


def member_inputs(model: Any, x: torch.Tensor) -> list[tuple[int | None, Any, torch.Tensor]]:
    """``(member id, network, its input)`` for every network whose logits make ``model``'s:
    the model itself for a ProtoPNet; for an ensemble, each member with the ensemble's input
    converted as the ensemble's own forward converts it (``model.member_input``), so the score
    sheet adds up to the ensemble's logits."""
    members = model_members(model)
    if members[0][0] is None:
        return [(None, model, x)]
    convert = getattr(model, "member_input", None)
    return [(i, net, convert(x, i) if convert is not None else x) for i, net in members]
