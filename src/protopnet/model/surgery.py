"""Model surgery: remove prototypes, move a prototype to another class, check prototype indices.

These change a :class:`protopnet.ProtoPNet` in place (its prototype vectors, classes, last-layer
columns and provenance) and know nothing of datasets or training, so pruning (a training stage)
and editing (a person in the loop) share them. :mod:`protopnet.edit` re-exports them.

    >>> from protopnet.model.surgery import relabel_prototype, remove_prototypes
    >>> kept = remove_prototypes(model, [3, 17])   # kept[new] = old index
    >>> relabel_prototype(model, 5, 2)             # returns the old class
"""

from __future__ import annotations

import logging
import numbers
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from .protopnet import ProtoPNet

logger = logging.getLogger(__name__)


class PrototypeIndexError(ValueError):
    """A prototype index that the model does not have; the message names it and the valid range."""


# -- index checks --------------------------------------------------------------------------

def check_prototype_indices(model: ProtoPNet, indices: Sequence[int], what: str = "prototype") -> list[int]:
    """Validate prototype indices against ``model.num_prototypes``.

    Returns the indices as a sorted list without duplicates.

    Raises:
        PrototypeIndexError: an index is not an integer in ``[0, M)``; the message names the index
            and the allowed range.
    """
    m = int(model.num_prototypes)
    checked = set()
    for raw in indices:
        if isinstance(raw, bool) or not isinstance(raw, numbers.Integral) and not (isinstance(raw, torch.Tensor) and raw.numel() == 1 and not raw.is_floating_point()):
            raise PrototypeIndexError(f"{what} index {raw!r} is not an integer")
        j = int(raw)
        if not 0 <= j < m:
            raise PrototypeIndexError(
                f"{what} index {j} is out of range: this model has {m} prototypes (valid indices 0..{m - 1})"
            )
        checked.add(j)
    return sorted(checked)


def check_class(model: ProtoPNet, k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"class index {k!r} is not an integer")
    if not 0 <= k < model.num_classes:
        raise ValueError(f"class index {k} is out of range: this model has {model.num_classes} classes (valid 0..{model.num_classes - 1})")
    return int(k)


# -- edits (in place) ----------------------------------------------------------------

@torch.no_grad()
def remove_prototypes(model: ProtoPNet, indices: Sequence[int]) -> list[int]:
    """Remove prototypes from ``model`` in place: their vectors, classes, last-layer columns and
    provenance entries go; the remaining prototypes are renumbered ``0..M'-1`` in their old order
    (provenance ``prototype`` fields follow).

    Returns:
        ``kept``: for each new index, the old index (length M').

    Raises:
        PrototypeIndexError: an index outside ``[0, M)``.
        ValueError: every prototype would go.
    """
    drop = set(check_prototype_indices(model, indices, "remove"))
    m = model.num_prototypes
    kept = [j for j in range(m) if j not in drop]
    if not kept:
        raise ValueError(f"refusing to remove all {m} prototypes: a ProtoPNet needs at least one")
    if not drop:
        return kept
    keep = torch.tensor(kept, dtype=torch.long, device=model.prototypes.device)
    model.set_prototypes(
        model.prototypes.detach()[keep],  # (M', D, h, w)
        model.prototype_classes[keep],  # (M',)
        model.last_layer.weight.detach()[:, keep],  # (K, M')
    )
    if model.provenance is not None:
        entries = [dict(model.provenance[j]) if model.provenance[j] is not None else None for j in kept]
        for new, entry in enumerate(entries):
            if entry is not None:
                entry["prototype"] = new
        model.provenance = entries
    empty = sorted(set(range(model.num_classes)) - set(model.prototype_classes.tolist()))
    if empty:
        logger.warning("classes left without prototypes: %s", ", ".join(model.class_names[k] for k in empty))
    logger.info("removed %d prototypes (%d left)", len(drop), len(kept))
    return kept


@torch.no_grad()
def reset_connection(model: ProtoPNet, index: int, *, incorrect_class_connection: float = -0.5) -> None:
    """Prototype ``index``'s last-layer column back to the paper's initialisation, in place: +1 to
    its class, ``incorrect_class_connection`` to every other."""
    weight = model.last_layer.weight
    column = torch.full((model.num_classes,), float(incorrect_class_connection), device=weight.device, dtype=weight.dtype)
    column[int(model.prototype_classes[index])] = 1.0
    weight[:, index] = column


@torch.no_grad()
def relabel_prototype(model: ProtoPNet, index: int, new_class: int, *, incorrect_class_connection: float = -0.5) -> int:
    """Move prototype ``index`` to class ``new_class`` in place.

    Its last-layer column is reset to the paper's initialisation for its new class (+1 to the
    new class, ``incorrect_class_connection`` to every other), since the old weights encoded the
    old class; re-fit the last layer afterwards. Relabelling to the class it already has changes
    nothing. Returns the old class.
    """
    (j,) = check_prototype_indices(model, [index], "relabel")
    k = check_class(model, new_class)
    old = int(model.prototype_classes[j])
    if old == k:
        logger.info("prototype %d already belongs to class %d: not relabelled", j, k)
        return old
    model.prototype_classes[j] = k
    reset_connection(model, j, incorrect_class_connection=incorrect_class_connection)
    if model.provenance is not None and model.provenance[j] is not None:
        entry = dict(model.provenance[j])
        entry["class_index"], entry["class_name"] = k, model.class_names[k]
        entry.setdefault("relabelled_from", old)
        model.provenance[j] = entry
    return old
