"""SyntheticParts: the built-in demo dataset, generated on the fly (no download).

Every picture has a muted, textured background (noise, stripes, gradients, blobs; different in
every picture and independent of the class), exactly one *class glyph* and 1-3 *distractor
glyphs*:

* the class glyph is a small saturated shape (about 14-18 % of the picture's side) whose
  **shape and colour combination** is unique to its class (e.g. ``red_circle``), placed uniformly
  at random; :meth:`SyntheticParts.annotation` gives its box;
* distractors come from a pool shared by all classes that never matches a class glyph: class
  shapes in neutral colours (white, black), and non-class shapes (line, chevron, L, dots, zigzag)
  in any colour, class colours included.

So a picture's class is unambiguous, but neither the colours present nor the shapes present alone
decide it: a model has to find the one shape-and-colour conjunction, i.e. the part — which is what
a ProtoPNet prototype should learn. Pictures are a pure function of ``(seed, split, index)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from protopnet.data.base import IMAGENET_MEAN, IMAGENET_STD, Annotation, ProtoDataset

#: Class glyph shapes. Ordered so that the classes sharing a colour (k and k + 6 when there are
#: <= 10 classes) have clearly different shapes.
CLASS_SHAPES = (
    "circle", "square", "triangle", "cross", "star", "diamond", "bars", "ring", "frame", "hexagon",
)
#: Saturated class colours (name -> RGB).
CLASS_COLOURS = {
    "red": (225, 30, 30),
    "green": (30, 190, 45),
    "blue": (35, 75, 235),
    "yellow": (240, 215, 20),
    "magenta": (215, 35, 215),
    "cyan": (20, 205, 225),
}
#: Colours only distractors use.
NEUTRAL_COLOURS = {"white": (245, 245, 245), "black": (15, 15, 15)}
#: Shapes only distractors use.
DISTRACTOR_SHAPES = ("line", "chevron", "ell", "dots", "zigzag")

MAX_CLASSES = len(CLASS_SHAPES) * len(CLASS_COLOURS)  # 60 unique shape x colour combinations
_SPLITS = {"train": 0, "test": 1}
_DEFAULT_PER_CLASS = {"train": 100, "test": 30}
_COLOUR_NAMES = tuple(CLASS_COLOURS)


def class_glyph(label: int) -> tuple[str, str]:
    """``(shape, colour)`` of class ``label``: shape ``label % 10``, colour
    ``(label + label // 10) % 6`` — unique for every label below 60."""
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"SyntheticParts supports labels 0..{MAX_CLASSES - 1}, got {label}")
    shape = CLASS_SHAPES[label % len(CLASS_SHAPES)]
    colour = _COLOUR_NAMES[(label + label // len(CLASS_SHAPES)) % len(_COLOUR_NAMES)]
    return shape, colour


# -- glyph drawing ----------------------------------------------------------------------------
# Each function draws inside the inclusive pixel box (x0, y0, x1, y1); class shapes never paint a
# pixel outside it (only rectangles, ellipses and polygons with vertices inside the box).

def _poly(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour) -> None:
    draw.polygon(points, fill=colour)


def _regular(cx: float, cy: float, radius: float, count: int, phase: float) -> list[tuple[float, float]]:
    return [
        (cx + radius * math.cos(phase + 2 * math.pi * k / count),
         cy + radius * math.sin(phase + 2 * math.pi * k / count))
        for k in range(count)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    side = x1 - x0 + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    stroke = max(2, round(side * 0.28))
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        _poly(draw, [(x0, y1), (cx, y0), (x1, y1)], colour)
    elif shape == "cross":
        half = stroke / 2
        draw.rectangle((x0, round(cy - half), x1, round(cy - half) + stroke - 1), fill=colour)
        draw.rectangle((round(cx - half), y0, round(cx - half) + stroke - 1, y1), fill=colour)
    elif shape == "star":
        outer, inner = (side - 1) / 2, (side - 1) * 0.22
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + math.pi * k / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        _poly(draw, points, colour)
    elif shape == "diamond":
        _poly(draw, [(cx, y0), (x1, cy), (cx, y1), (x0, cy)], colour)
    elif shape == "bars":
        draw.rectangle((x0, y0, x0 + stroke - 1, y1), fill=colour)
        draw.rectangle((x1 - stroke + 1, y0, x1, y1), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=stroke)
    elif shape == "frame":
        draw.rectangle(box, outline=colour, width=stroke)
    elif shape == "hexagon":
        _poly(draw, _regular(cx, cy, (side - 1) / 2, 6, 0.0), colour)
    elif shape == "line":
        draw.line((x0 + 1, y1 - 1, x1 - 1, y0 + 1), fill=colour, width=stroke)
    elif shape == "chevron":
        draw.line((x0 + 1, y0 + 1, cx, y1 - 1, x1 - 1, y0 + 1), fill=colour, width=stroke, joint="curve")
    elif shape == "ell":
        draw.rectangle((x0, y0, x0 + stroke - 1, y1), fill=colour)
        draw.rectangle((x0, y1 - stroke + 1, x1, y1), fill=colour)
    elif shape == "dots":
        dot = max(2, round(side / 3))
        for k in range(3):
            ox = x0 + round(k * (side - dot) / 2)
            oy = y1 - dot + 1 - round(k * (side - dot) / 2)
            draw.ellipse((ox, oy, ox + dot - 1, oy + dot - 1), fill=colour)
    elif shape == "zigzag":
        step = (x1 - x0 - 2) / 4
        points = [(x0 + 1 + k * step, y1 - 1 if k % 2 == 0 else y0 + 1) for k in range(5)]
        draw.line(points, fill=colour, width=max(2, stroke - 1))
    else:  # pragma: no cover - internal tables only
        raise ValueError(f"unknown shape {shape!r}")


# -- layout -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Glyph:
    shape: str
    colour: tuple[int, int, int]
    box: tuple[int, int, int, int]  # inclusive pixel box x0, y0, x1, y1


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1] or b[3] + margin < a[1])


def _jitter(colour: Sequence[int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    shift = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(colour) + shift, 0, 255))  # type: ignore[return-value]


def _glyph_side(rng: np.random.Generator, image_size: int) -> int:
    return max(5, int(round(rng.uniform(0.14, 0.18) * image_size)))


def _layout(rng: np.random.Generator, label: int, image_size: int) -> tuple[_Glyph, list[_Glyph]]:
    """Draw the class glyph and the distractors (consumes a fixed prefix of ``rng``)."""
    shape, colour_name = class_glyph(label)
    side = _glyph_side(rng, image_size)
    x0, y0 = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
    target = _Glyph(shape, _jitter(CLASS_COLOURS[colour_name], rng, 12), (x0, y0, x0 + side - 1, y0 + side - 1))

    distractors = []
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:  # a class shape in a neutral colour
            d_shape = CLASS_SHAPES[int(rng.integers(len(CLASS_SHAPES)))]
            palette = list(NEUTRAL_COLOURS.values())
        else:  # a non-class shape in any colour
            d_shape = DISTRACTOR_SHAPES[int(rng.integers(len(DISTRACTOR_SHAPES)))]
            palette = list(CLASS_COLOURS.values()) + list(NEUTRAL_COLOURS.values())
        d_colour = _jitter(palette[int(rng.integers(len(palette)))], rng, 12)
        d_side = _glyph_side(rng, image_size)
        for _attempt in range(20):
            dx, dy = (int(v) for v in rng.integers(0, image_size - d_side + 1, size=2))
            box = (dx, dy, dx + d_side - 1, dy + d_side - 1)
            if not _overlaps(box, target.box, margin=2):
                distractors.append(_Glyph(d_shape, d_colour, box))
                break
    return target, distractors


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(size, dtype=np.float32)
    return coords[None, :], coords[:, None]  # (1, S) x, (S, 1) y


def _muted_shift(rng: np.random.Generator, amount: float) -> np.ndarray:
    """A colour offset (3,) that is mostly brightness, with a small tint (keeps colours muted)."""
    return rng.uniform(-amount, amount) + rng.uniform(-10, 10, size=3)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted textured background, float32 (S, S, 3) in 0..255."""
    xs, ys = _grid(size)
    base = rng.uniform(85, 170) + rng.uniform(-22, 22, size=3)  # (3,) low-saturation colour
    kind = int(rng.integers(4))
    if kind == 0:  # stripes at a random angle and period
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(5, 18)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) * (2 * math.pi / period)
        second = base + _muted_shift(rng, 40)
        mix = (0.5 + 0.5 * np.sin(phase))[..., None]  # (S, S, 1)
        picture = base * (1 - mix) + second * mix
    elif kind == 1:  # linear gradient
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / size  # (S, S) roughly -1..1
        picture = base + ramp[..., None] * _muted_shift(rng, 45)
    elif kind == 2:  # checker / grid texture
        cell = int(rng.integers(4, 12))
        checker = (((xs // cell) + (ys // cell)) % 2)[..., None]  # (S, S, 1)
        picture = base + (checker - 0.5) * _muted_shift(rng, 35)
    else:  # flat colour, the blobs and noise below make the texture
        picture = np.broadcast_to(base, (size, size, 3))
    return np.asarray(picture, dtype=np.float32)


def _blobs(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, base: np.ndarray) -> None:
    for _ in range(int(rng.integers(0, 6))):
        w, h = rng.uniform(0.1, 0.45, size=2) * size
        cx, cy = rng.uniform(0, size, size=2)
        grey = float(base.mean()) + rng.uniform(-45, 45)
        colour = tuple(int(v) for v in np.clip(grey + rng.uniform(-18, 18, size=3), 0, 255))
        draw.ellipse((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=colour)


class SyntheticParts(ProtoDataset):
    """Synthetic part-based classification: find the class glyph among distractors.

    Args:
        split: ``"train"`` or ``"test"`` (different pictures: the split is part of each item's seed).
        num_classes: 1..60; class ``k`` is the glyph :func:`class_glyph` ``(k)``, named e.g.
            ``"red_circle"``.
        images_per_class: items per class; default 100 for train, 30 for test.
        image_size: side ``S`` of the square pictures (64-96 recommended; >= 32).
        seed: dataset seed; item ``i`` is rendered from ``numpy.random.default_rng([seed, split, i])``.
        augment, mean, std: see :class:`ProtoDataset`.
        cache: keep rendered pictures in memory (``S*S*3`` bytes each) so later epochs only copy.

    Items are interleaved by class: ``targets[i] == i % num_classes``.
    ``annotation(i).part_box`` is the class glyph's ``[x0, y0, x1, y1]`` (pixels, end exclusive).
    """

    def __init__(
        self,
        split: str = "train",
        num_classes: int = 10,
        images_per_class: int | None = None,
        image_size: int = 64,
        seed: int = 0,
        augment: Callable[[Image.Image], Image.Image] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        cache: bool = True,
    ) -> None:
        super().__init__(image_size=image_size, mean=mean, std=std, augment=augment)
        if split not in _SPLITS:
            raise ValueError(f"SyntheticParts split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not 1 <= int(num_classes) <= MAX_CLASSES:
            raise ValueError(f"SyntheticParts num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
        if self.image_size < 32:
            raise ValueError(f"SyntheticParts image_size must be >= 32, got {image_size}")
        if images_per_class is None:
            images_per_class = _DEFAULT_PER_CLASS[split]
        if int(images_per_class) < 1:
            raise ValueError(f"SyntheticParts images_per_class must be >= 1, got {images_per_class}")
        if int(seed) < 0:
            raise ValueError(f"SyntheticParts seed must be >= 0, got {seed}")
        self.split = split
        self.seed = int(seed)
        self.images_per_class = int(images_per_class)
        self.classes = ["_".join(reversed(class_glyph(k))) for k in range(int(num_classes))]
        self.targets = [i % len(self.classes) for i in range(len(self.classes) * self.images_per_class)]
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.targets)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"SyntheticParts index {index} out of range 0..{len(self) - 1}")
        return index

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLITS[self.split], index])

    def path(self, index: int) -> str:
        return f"synthetic://seed{self.seed}/{self.split}/{self._check_index(index)}"

    @property
    def cache_token(self) -> str:
        """What besides ``path(i)`` decides the pictures (for :class:`DecodedCache`)."""
        return f"SyntheticParts(classes={self.num_classes},per_class={self.images_per_class},size={self.image_size})"

    def annotation(self, index: int) -> Annotation:
        index = self._check_index(index)
        target, _ = _layout(self._rng(index), self.targets[index], self.image_size)
        x0, y0, x1, y1 = target.box
        return Annotation(part_box=[float(x0), float(y0), float(x1 + 1), float(y1 + 1)])

    def render(self, index: int, with_class_glyph: bool = True) -> np.ndarray:
        """Render item ``index`` (uncached) as uint8 ``(S, S, 3)``; ``with_class_glyph=False`` leaves
        the class glyph out and changes nothing else (for checking the annotation)."""
        index = self._check_index(index)
        size = self.image_size
        rng = self._rng(index)
        target, distractors = _layout(rng, self.targets[index], size)  # layout first: annotation() replays it
        picture = _background(rng, size)  # (S, S, 3) float
        base = picture.mean(axis=(0, 1))
        image = Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        _blobs(draw, rng, size, base)
        for glyph in distractors:
            _draw_shape(draw, glyph.shape, glyph.box, glyph.colour)
        if with_class_glyph:
            _draw_shape(draw, target.shape, target.box, target.colour)
        noise_level = rng.uniform(3, 14)
        noise = rng.standard_normal((size, size, 3), dtype=np.float32) * noise_level  # (S, S, 3)
        array = np.asarray(image, dtype=np.float32) + noise
        return np.clip(array, 0, 255).astype(np.uint8)

    def load_image(self, index: int) -> Image.Image:
        """The RGB ``(S, S)`` picture of item ``index`` (from the in-memory cache when enabled)."""
        index = self._check_index(index)
        if self._cache is None:
            return Image.fromarray(self.render(index))
        array = self._cache.get(index)
        if array is None:
            array = self.render(index)
            self._cache[index] = array
        return Image.fromarray(array)
