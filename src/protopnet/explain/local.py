"""Local analysis: why did the model classify *this* image this way (paper Sections 2.4, 2.5,
Figure 3, Figure 5a).

One forward pass gives everything: the logits, and for every prototype its distance map over the
input's patches, hence its similarity, its most activated patch and its activation map. For each
top class the :class:`ClassSheet` ("score sheet") lists every prototype that contributes to the
class's logit, with ``points = similarity x weight``; the rows add up to the logit:

* the class's own prototypes (whatever their weight), and
* every other prototype whose last-layer weight to the class is non-zero, marked as *negative
  reasoning* (evidence taken from another class's prototype; with the paper's initialisation of
  -0.5 these subtract points).

The sheet is built from a flat list of :class:`PrototypeMatch` (one per prototype, each carrying a
``member`` field), so an ensemble that sums its members' logits (paper Section 2.5) gets the union
of its members' score sheets with the same code: a model exposing ``members`` (a list of
ProtoPNets whose logits it sums) is explained member by member.

Boxes are computed when first asked for (``match.box``), for many prototypes at once, because
upsampling an activation map to the image size costs more than the forward pass itself for a few
hundred prototypes; :meth:`Explanation.to_json` asks for all of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from ..regions import UPSAMPLING_DESCRIPTION
from ..visualize import draw_box
from .boxes import activation_boxes, scale_box
from .inputs import InputImage, model_input, prepare_input
from .members import member_inputs
from .pictures import activation_overlay, draw_from_provenance, prototype_image_files, read_picture

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..model import ProtoPNet

logger = logging.getLogger(__name__)

FORMAT = "protopnet-explanation"
FORMAT_VERSION = 1


# -- prototypes and their evidence ----------------------------------------------------------------

class _Regions:
    """Activation maps on the input and their boxes, computed when first asked for, in batches.

    Args:
        distances: member id -> (M, H', W') distance maps of that member's prototypes on the input.
        similarity: member id -> the member's distance -> similarity function.
        size: side of the input picture (the frame of the boxes).
    """

    def __init__(self, distances: dict[Any, torch.Tensor], similarity: dict[Any, Any], size: int, percentile: float) -> None:
        self.distances = distances
        self.similarity = similarity
        self.size = int(size)
        self.percentile = float(percentile)
        self.boxes: dict[tuple[Any, int], list[int]] = {}
        self._maps: dict[Any, torch.Tensor] = {}

    def maps(self, member: Any) -> torch.Tensor:
        """(M, H', W') similarity maps of ``member``'s prototypes on the input (CPU, float32)."""
        if member not in self._maps:
            with torch.no_grad():
                self._maps[member] = self.similarity[member](self.distances[member]).float().cpu()
        return self._maps[member]

    def compute(self, keys: Iterable[tuple[Any, int]]) -> None:
        """Compute the boxes of ``keys`` (member, prototype) not yet known, one batch per member."""
        wanted: dict[Any, list[int]] = {}
        for member, j in keys:
            if (member, j) not in self.boxes:
                wanted.setdefault(member, []).append(j)
        for member, indices in wanted.items():
            indices = sorted(set(indices))
            boxes = activation_boxes(self.maps(member)[indices], (self.size, self.size), self.percentile)
            for j, box in zip(indices, boxes.tolist()):
                self.boxes[(member, j)] = [int(v) for v in box]

    def box(self, member: Any, j: int) -> list[int]:
        if (member, j) not in self.boxes:
            self.compute([(member, j)])
        return self.boxes[(member, j)]


@dataclass(eq=False)
class PrototypeMatch:
    """One prototype compared with the input image.

    Attributes:
        prototype: index j of the prototype in its model (``member``'s for an ensemble).
        member: index of the ensemble member it belongs to; None for a single model.
        class_index, class_name: the prototype's class.
        similarity: its similarity to its most activated patch of the input.
        distance: the squared L2 distance of that patch.
        position: (row, col) latent cell of that patch's top-left corner.
        weights: (K,) its last-layer weights to every class.
        provenance: its push provenance (source image path, box, ...), or None before push.
        directory: the model directory the prototype's network was loaded from, or None.
    """

    prototype: int
    member: int | None
    class_index: int
    class_name: str
    similarity: float
    distance: float
    position: tuple[int, int]
    weights: np.ndarray = field(repr=False)
    provenance: dict[str, Any] | None = field(repr=False)
    directory: str | None = field(repr=False)
    _regions: _Regions = field(repr=False)
    _original_size: tuple[int, int] | None = field(default=None, repr=False)
    _images: dict[str, Path] | None = field(default=None, repr=False)

    @property
    def images(self) -> dict[str, Path]:
        """kind ("patch", "source", "overlay") -> the prototype's existing picture file in the
        model directory (saved with the model after push); empty when there is none."""
        if self._images is None:
            self._images = prototype_image_files(self.provenance, self.directory)
        return self._images

    @property
    def key(self) -> tuple[int | None, int]:
        return (self.member, self.prototype)

    @property
    def activation(self) -> np.ndarray:
        """(H', W') similarity map of this prototype over the input's patches."""
        return self._regions.maps(self.member)[self.prototype].numpy()

    @property
    def box(self) -> list[int]:
        """``[x0, y0, x1, y1]`` (exclusive ends) in the input picture's pixels (``image_size``
        squared): the smallest box enclosing the pixels >= the 95th percentile of the upsampled
        activation map, as push draws a prototype's region on its source image."""
        return self._regions.box(self.member, self.prototype)

    @property
    def box_original(self) -> list[int] | None:
        """The same region in the original file's (or PIL picture's) pixels, or None."""
        if self._original_size is None:
            return None
        size = self._regions.size
        return scale_box(self.box, (size, size), self._original_size)

    @property
    def label(self) -> str:
        """A short human name: ``prototype 7 (class cardinal)``, with the member for ensembles."""
        who = f"prototype {self.prototype}" if self.member is None else f"model {self.member}, prototype {self.prototype}"
        return f"{who} (class {self.class_name})"

    def to_json(self, with_activation: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"prototype": self.prototype}
        if self.member is not None:
            out["member"] = self.member
        out.update(
            {
                "class_index": self.class_index,
                "class_name": self.class_name,
                "similarity": self.similarity,
                "distance": self.distance,
                "position": list(self.position),
                "box": self.box,
            }
        )
        if self._original_size is not None:
            out["box_original"] = self.box_original
        if with_activation:
            out["activation"] = [[round(float(v), 6) for v in row] for row in self.activation.tolist()]
            out["prototype_images"] = {kind: str(path) for kind, path in self.images.items()}
            if self.provenance:
                out["source"] = {k: self.provenance.get(k) for k in ("path", "dataset_index", "box", "image_size", "position") if k in self.provenance}
        return out


@dataclass(eq=False)
class ScoreRow:
    """One line of a class's score sheet: ``points = similarity x weight``.

    Attributes:
        match: the prototype and where it matched the input.
        weight: its last-layer weight to the sheet's class.
        points: ``similarity x weight`` (computed in float64: exact for float32 inputs).
        own_class: whether the prototype belongs to the sheet's class; rows of other classes'
            prototypes are *negative reasoning*.
    """

    match: PrototypeMatch
    weight: float
    points: float
    own_class: bool

    @property
    def negative_reasoning(self) -> bool:
        return not self.own_class

    @property
    def similarity(self) -> float:
        return self.match.similarity

    @property
    def box(self) -> list[int]:
        return self.match.box

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prototype": self.match.prototype}
        if self.match.member is not None:
            out["member"] = self.match.member
        out.update(
            {
                "prototype_class_index": self.match.class_index,
                "prototype_class_name": self.match.class_name,
                "own_class": self.own_class,
                "negative_reasoning": self.negative_reasoning,
                "similarity": self.match.similarity,
                "weight": self.weight,
                "points": self.points,
                "box": self.match.box,
            }
        )
        if self.match._original_size is not None:
            out["box_original"] = self.match.box_original
        return out


@dataclass(eq=False)
class ClassSheet:
    """The score sheet of one class (paper Figure 3).

    Attributes:
        class_index, class_name: the class.
        logit: the exact sum of the rows' points (equal to the model's logit up to float32
            rounding: see ``model_logit``).
        model_logit: the logit the model computed (float32).
        probability: softmax probability of the class.
        rows: every contributing prototype, most points first.
    """

    class_index: int
    class_name: str
    logit: float
    model_logit: float
    probability: float
    rows: list[ScoreRow]

    def to_json(self) -> dict[str, Any]:
        return {
            "class_index": self.class_index,
            "class_name": self.class_name,
            "logit": self.logit,
            "model_logit": self.model_logit,
            "probability": self.probability,
            "prototypes": [row.to_json() for row in self.rows],
        }


def build_sheet(class_index: int, class_name: str, matches: Sequence[PrototypeMatch], model_logit: float, probability: float) -> ClassSheet:
    """The score sheet of ``class_index`` from a flat list of prototype matches (one model's or
    several ensemble members'): the class's own prototypes, plus every other prototype whose
    weight to the class is non-zero (negative reasoning). Rows sorted by points, highest first;
    ``logit`` is their exact (``math.fsum``) sum."""
    rows = []
    for match in matches:
        weight = float(match.weights[class_index])
        own = match.class_index == class_index
        if own or weight != 0.0:
            rows.append(ScoreRow(match, weight, match.similarity * weight, own))
    rows.sort(key=lambda r: (-r.points, r.match.member if r.match.member is not None else -1, r.match.prototype))
    return ClassSheet(class_index, class_name, math.fsum(r.points for r in rows), model_logit, probability, rows)


# -- the explanation -----------------------------------------------------------------------------

@dataclass(eq=False)
class Explanation:
    """Why the model classified an image as it did.

    Attributes:
        input: the image as the model saw it (:class:`InputImage`).
        class_names: K names.
        logits: (K,) float64 the model's logits (for an ensemble, the sum of its members').
        probabilities: (K,) softmax of ``logits``.
        predicted: the predicted class index.
        classes: the score sheets of the top classes, most probable first.
        matches: every prototype of the model (of every member), in model order.
        top_prototypes: the most activated prototypes over all classes, most similar first
            (the paper's nearest prototypes to an image, Figure 5a).
        percentile: the box threshold percentile.
    """

    input: InputImage
    class_names: list[str]
    logits: np.ndarray
    probabilities: np.ndarray
    predicted: int
    classes: list[ClassSheet]
    matches: list[PrototypeMatch]
    top_prototypes: list[PrototypeMatch]
    percentile: float = 95.0
    _regions: _Regions | None = field(default=None, repr=False)
    _pictures: dict[tuple[Any, int], dict[str, Image.Image]] = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> int:
        return self.input.size

    @property
    def predicted_name(self) -> str:
        return self.class_names[self.predicted]

    def sheet(self, class_index: int) -> ClassSheet:
        """The score sheet of ``class_index`` (built on demand for a class outside the top)."""
        for sheet in self.classes:
            if sheet.class_index == class_index:
                return sheet
        return build_sheet(class_index, self.class_names[class_index], self.matches, float(self.logits[class_index]), float(self.probabilities[class_index]))

    def compute_boxes(self, matches: Iterable[PrototypeMatch] | None = None) -> None:
        """Compute the boxes of ``matches`` (default: every prototype) in one batch."""
        if self._regions is not None:
            self._regions.compute(m.key for m in (self.matches if matches is None else matches))

    def listed_matches(self) -> list[PrototypeMatch]:
        """The prototypes appearing in a score sheet or among the top prototypes, once each."""
        seen: dict[tuple[Any, int], PrototypeMatch] = {}
        for sheet in self.classes:
            for row in sheet.rows:
                seen.setdefault(row.match.key, row.match)
        for match in self.top_prototypes:
            seen.setdefault(match.key, match)
        return list(seen.values())

    # -- pictures ----------------------------------------------------------------------------
    def prototype_picture(self, match: PrototypeMatch, kind: str) -> Image.Image | None:
        """The prototype's own picture: ``patch`` (its region of its source image), ``source``
        (the source image with the box) or ``overlay`` (its activation on its source image).

        Read from the model directory's ``prototypes/`` pictures when they exist; otherwise
        drawn from the provenance's source file when that file can still be read; else None.
        """
        path = match.images.get(kind)
        if path is not None:
            picture = read_picture(path)
            if picture is not None:
                return picture
        if match.key not in self._pictures:
            self._pictures[match.key] = draw_from_provenance(match.provenance)
        return self._pictures[match.key].get(kind)

    def input_with_box(self, match: PrototypeMatch) -> Image.Image:
        """The input picture with ``match``'s most activated region boxed."""
        return draw_box(self.input.picture, match.box)

    def activation_overlay(self, match: PrototypeMatch) -> Image.Image:
        """``match``'s activation map on the input, upsampled and blended over it, with its box."""
        return activation_overlay(self.input.picture, match.activation, match.box)

    # -- serialisation -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: ``predicted``, ``classes`` (score sheets), ``top_prototypes``,
        ``prototypes`` (every prototype once, with its activation map on the input) and the
        input's facts. Boxes are ``[x0, y0, x1, y1]`` with exclusive ends, in the pixels of the
        input picture as the model saw it (``input.image_size`` squared); ``box_original`` gives
        the same region in the original file's pixels when the input was a file or a picture."""
        self.compute_boxes()
        predicted = {
            "class_index": self.predicted,
            "class_name": self.predicted_name,
            "probability": float(self.probabilities[self.predicted]),
        }
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "input": {
                "path": self.input.path,
                "image_size": [self.image_size, self.image_size],
                "original_size": list(self.input.original_size) if self.input.original_size else None,
            },
            "predicted": predicted,
            "classes": [sheet.to_json() for sheet in self.classes],
            "top_prototypes": [m.to_json() for m in self.top_prototypes],
            "prototypes": [m.to_json(with_activation=True) for m in self.matches],
            "logits": [float(v) for v in self.logits],
            "class_names": list(self.class_names),
            "upsampling": UPSAMPLING_DESCRIPTION,
            "box_percentile": self.percentile,
        }

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        return path

    def to_figure(self, classes: Sequence[int] | None = None, max_rows: int = 5) -> Any:
        """A matplotlib Figure laid out like the paper's Figure 3: for each class, rows of
        input with box | prototype | source with box | activation map | similarity | weight |
        points, and the total. See :func:`protopnet.explain.figure.explanation_figure`."""
        from .figure import explanation_figure

        return explanation_figure(self, classes=classes, max_rows=max_rows)

    def save_html(self, path: str | os.PathLike[str], picture_rows: int = 10) -> Path:
        """Write a self-contained HTML page (pictures embedded as data URIs, CSS inline)."""
        from .reports import write_explanation_html

        return write_explanation_html(self, path, picture_rows=picture_rows)


@torch.no_grad()
def explain(
    model: ProtoPNet | Ensemble,
    image: Any,
    top_classes: int = 3,
    top_prototypes: int = 10,
    *,
    percentile: float = 95.0,
) -> Explanation:
    """Explain the classification of one image (paper Figure 3 and Figure 5a).

    Args:
        model: a :class:`protopnet.ProtoPNet` (or an ensemble exposing ``members``, whose logits
            are the sum of its members').
        image: a file path, a PIL picture (resized to ``model.image_size`` squared) or a tensor
            (3, S, S) / (1, 3, S, S) normalised with ``model.mean`` / ``model.std``. It runs on
            the model's device.
        top_classes: how many of the most probable classes get a score sheet.
        top_prototypes: how many of the most activated prototypes (over all classes) to list.
        percentile: the threshold of the boxes (push uses 95).

    Returns:
        an :class:`Explanation`. The model is run once (per ensemble member) in eval mode; the
        training flag of each of its modules is restored afterwards.

    Raises:
        protopnet.data.BadImageError: ``image`` is an unreadable file.
    """
    if top_classes < 1 or top_prototypes < 0:
        raise ValueError(f"top_classes must be >= 1 and top_prototypes >= 0, got {top_classes} and {top_prototypes}")
    class_names = list(model.class_names)
    num_classes = len(class_names)
    inp = prepare_input(image, int(getattr(model, "image_size", 224)), model.mean, model.std)
    x = model_input(model, inp, next(model.parameters()).device)  # (1, 3, S, S), on the model's device

    logits = np.zeros(num_classes, dtype=np.float64)
    maps: dict[Any, torch.Tensor] = {}  # member -> (M, H', W') distances
    similarity: dict[Any, Any] = {}
    raw: list[tuple[Any, Any, list[float], list[float], list[int], np.ndarray]] = []
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        outputs = [(member, net, net(xi)) for member, net, xi in member_inputs(model, x)]
    finally:
        for module, training in modes.items():  # every sub-module exactly as it was
            module.training = training
    for member, net, out in outputs:
        if out.logits.shape[1] != num_classes:
            raise ValueError(f"model {member} has {out.logits.shape[1]} classes, expected {num_classes}")
        logits += out.logits[0].double().cpu().numpy()
        distances = out.distances[0].float()  # (M, H', W')
        maps[member] = distances
        similarity[member] = net.similarity
        where = distances.flatten(1).argmin(dim=1).cpu()  # (M,)
        sims = out.similarities[0].float().cpu().tolist()  # M floats
        dmins = out.min_distances[0].float().cpu().tolist()  # M floats
        weight = net.last_layer.weight.detach().float().cpu().numpy()  # (K, M)
        raw.append((member, net, sims, dmins, where.tolist(), weight))

    regions = _Regions(maps, similarity, inp.size, percentile)
    matches: list[PrototypeMatch] = []
    for member, net, sims, dmins, where, weight in raw:
        width = maps[member].shape[-1]
        classes = net.prototype_classes.tolist()
        provenance = getattr(net, "provenance", None) or []
        directory = getattr(net, "source_directory", None)
        for j, k in enumerate(classes):
            matches.append(
                PrototypeMatch(
                    prototype=j,
                    member=member,
                    class_index=int(k),
                    class_name=class_names[int(k)],
                    similarity=sims[j],
                    distance=dmins[j],
                    position=(where[j] // width, where[j] % width),
                    weights=weight[:, j],
                    provenance=provenance[j] if j < len(provenance) else None,
                    directory=directory,
                    _regions=regions,
                    _original_size=inp.original_size,
                )
            )

    shifted = logits - logits.max()
    probabilities = np.exp(shifted) / np.exp(shifted).sum()
    order = sorted(range(num_classes), key=lambda k: (-probabilities[k], k))
    sheets = [build_sheet(k, class_names[k], matches, float(logits[k]), float(probabilities[k])) for k in order[:top_classes]]
    for sheet in sheets:
        if not math.isclose(sheet.logit, sheet.model_logit, rel_tol=1e-4, abs_tol=1e-4 * max(1.0, len(sheet.rows))):
            logger.warning(
                "class %s: the score sheet adds up to %.6f but the model's logit is %.6f (a bias or other non-prototype term?)",
                sheet.class_name, sheet.logit, sheet.model_logit,
            )
    top = sorted(matches, key=lambda m: (-m.similarity, m.member if m.member is not None else -1, m.prototype))[:top_prototypes]
    return Explanation(
        input=inp,
        class_names=class_names,
        logits=logits,
        probabilities=probabilities,
        predicted=order[0],
        classes=sheets,
        matches=matches,
        top_prototypes=top,
        percentile=percentile,
        _regions=regions,
    )


def nearest_prototypes(model: ProtoPNet | Ensemble, image: Any, k: int = 3, **kwargs: Any) -> list[PrototypeMatch]:
    """The ``k`` prototypes most similar to any patch of ``image`` (paper Figure 5a), each with
    its box on the image."""
    return explain(model, image, top_classes=1, top_prototypes=k, **kwargs).top_prototypes
