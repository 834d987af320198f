"""Do prototypes land on the parts that define a class?

On data whose images record the box of their class-defining part (the built-in synthetic
dataset), a prototype is *localised* when the centre of its pushed box — the region at or above
the 95th percentile of its upsampled activation map on its source image — lies inside that
image's part box. A prototype placed at random scores about the part's share of the image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..regions import box_center, point_in_box

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..model.protopnet import ProtoPNet


def prototype_localization(model: ProtoPNet | Ensemble, dataset: Any, *, before_pruning: bool = False) -> dict[str, Any]:
    """Fraction of pushed prototypes whose box centre is inside their source image's part box.

    Args:
        model: a pushed ProtoPNet (``model.provenance`` set), trained on ``dataset``.
        dataset: the push dataset; ``dataset.annotation(i).part_box`` must be set.
        before_pruning: also count the prototypes pruning removed (their provenance is kept in
            the ``prune`` events of ``model.history``): the figure of the model before pruning.

    Returns:
        ``{"localization": fraction in [0, 1], "n": prototypes counted, "per_prototype": [bool],
        "chance": mean share of the image covered by the part boxes}``.

    Raises:
        ValueError: the model was never pushed or the dataset has no part boxes.
    """
    if not model.provenance:
        raise ValueError("the model has no push provenance: push it first")
    entries = [e for e in model.provenance if e is not None]
    if before_pruning:
        for event in model.history:
            if event.get("event") == "prune":
                entries += [e for e in event.get("removed_provenance") or [] if e is not None]
    hits, chance = [], []
    for entry in entries:
        annotation = dataset.annotation(int(entry["dataset_index"]))
        part = annotation.part_box
        if part is None:
            raise ValueError(f"{entry['path']}: no part box; localisation needs data with part boxes (e.g. --data synthetic)")
        hits.append(point_in_box(box_center(entry["box"]), part))
        width, height = entry.get("image_size", [dataset.image_size, dataset.image_size])
        chance.append((part[2] - part[0]) * (part[3] - part[1]) / float(width * height))
    return {
        "localization": sum(hits) / len(hits),
        "n": len(hits),
        "per_prototype": hits,
        "chance": sum(chance) / len(chance),
    }
