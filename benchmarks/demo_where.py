"""Where a demo run's prototypes sit: on their class glyph, beside it, on a distractor, on background.

    python benchmarks/demo_where.py RUN_DIR [RUN_DIR ...]     # RUN_DIR: a `protopnet demo --out` folder

For every prototype the demo made (the kept ones and, from the model's ``prune`` events, the ones
pruning removed), the centre of its pushed activation box (the point ``demo.json``'s
``localization`` tests) against the synthetic picture's class glyph box and its distractors'
boxes (replayed from the dataset's layout): ``glyph`` (a hit), ``beside`` (a miss within 6 px of
the glyph box), ``distractor`` or ``background``. Also how many pushed latent cells have their own
centre on the glyph. Assumes the demo's dataset settings (64 px, 10 classes, 100 per class, seed 0).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from protopnet.data.synthetic import SyntheticParts, _layout
from protopnet.regions import box_center, point_in_box


def _gap(box: list[float], point: tuple[float, float]) -> float:
    dx = max(box[0] - point[0], 0.0, point[0] - box[2])
    dy = max(box[1] - point[1], 0.0, point[1] - box[3])
    return (dx * dx + dy * dy) ** 0.5


def where(run: Path, size: int = 64) -> tuple[Counter, int, int]:
    record = json.loads((run / "model" / "model.json").read_text())
    entries = [(e, "kept") for e in record["provenance"] if e]
    for event in record["history"]:
        if event.get("event") == "prune":
            entries += [(e, "pruned") for e in event.get("removed_provenance") or [] if e]
    data = SyntheticParts("train", num_classes=10, images_per_class=100, image_size=size, seed=0)
    counts: Counter = Counter()
    cells_on = 0
    for entry, fate in entries:
        index = int(entry["dataset_index"])
        glyph, distractors = _layout(data._rng(index), data.targets[index], size)
        part = [glyph.box[0], glyph.box[1], glyph.box[2] + 1, glyph.box[3] + 1]
        stride = size // len(entry["activation"])
        row, col = entry["position"]
        cells_on += point_in_box((stride * col + stride / 2 - 0.5, stride * row + stride / 2 - 0.5), part)
        centre = box_center(entry["box"])
        if point_in_box(centre, part):
            kind = "glyph"
        elif any(point_in_box(centre, [d.box[0], d.box[1], d.box[2] + 1, d.box[3] + 1]) for d in distractors):
            kind = "distractor"
        elif _gap(part, centre) <= 6:
            kind = "beside"
        else:
            kind = "background"
        counts[(fate, kind)] += 1
    return counts, cells_on, len(entries)


def main(argv: list[str]) -> None:
    for run in argv:
        counts, cells_on, total = where(Path(run))
        shown = ", ".join(f"{fate} {kind}: {n}" for (fate, kind), n in sorted(counts.items()))
        print(f"{run}: {shown}; pushed cell centre on the glyph: {cells_on} of {total}")


if __name__ == "__main__":
    main(sys.argv[1:])
