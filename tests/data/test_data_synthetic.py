"""SyntheticParts: deterministic, annotated, unambiguous, learnable only through the glyph."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from protopnet.data import SyntheticParts, build_dataset
from protopnet.data.synthetic import (
    CLASS_COLOURS,
    CLASS_SHAPES,
    DISTRACTOR_SHAPES,
    MAX_CLASSES,
    NEUTRAL_COLOURS,
    _layout,
    class_glyph,
)


def pixels(dataset: SyntheticParts, index: int) -> np.ndarray:
    return np.asarray(dataset.load_image(index))


def test_same_seed_same_pixels_different_seed_or_split_different():
    a = SyntheticParts("train", num_classes=5, images_per_class=4, seed=3)
    b = SyntheticParts("train", num_classes=5, images_per_class=4, seed=3, cache=False)
    c = SyntheticParts("train", num_classes=5, images_per_class=4, seed=4)
    t = SyntheticParts("test", num_classes=5, images_per_class=4, seed=3)
    for i in (0, 7, 19):
        assert np.array_equal(pixels(a, i), pixels(b, i))
        assert a.annotation(i) == b.annotation(i)
        assert not np.array_equal(pixels(a, i), pixels(c, i))
        assert not np.array_equal(pixels(a, i), pixels(t, i))


def test_item_is_a_pure_function_of_seed_split_index():
    small = SyntheticParts("train", num_classes=10, images_per_class=3, seed=1)
    large = SyntheticParts("train", num_classes=10, images_per_class=50, seed=1)
    order = [pixels(small, i) for i in reversed(range(len(small)))][::-1]  # access order is irrelevant
    for i in range(len(small)):
        assert np.array_equal(order[i], pixels(large, i))
        assert small.targets[i] == large.targets[i] == i % 10


def test_contract_shapes_labels_paths():
    dataset = SyntheticParts("test", num_classes=4, images_per_class=2, image_size=96, seed=2,
                             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert len(dataset) == 8 and dataset.num_classes == 4
    assert dataset.classes == ["red_circle", "green_square", "blue_triangle", "yellow_cross"]
    assert dataset.path(5) == "synthetic://seed2/test/5"
    image, label = dataset[5]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32 and label == 1
    expected = (torch.from_numpy(pixels(dataset, 5).copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(image, expected)
    with pytest.raises(IndexError):
        dataset.load_image(8)
    assert build_dataset("synthetic", split="test", image_size=96, num_classes=4, images_per_class=2,
                         seed=2).path(5) == dataset.path(5)


def test_glyph_pixels_lie_in_the_recorded_box():
    dataset = SyntheticParts("train", num_classes=10, images_per_class=6, image_size=64, seed=0)
    for i in range(len(dataset)):
        x0, y0, x1, y1 = dataset.annotation(i).part_box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        side = x1 - x0
        assert y1 - y0 == side and 0.13 * 64 <= side <= 0.19 * 64
        with_glyph = dataset.render(i).astype(int)
        without = dataset.render(i, with_class_glyph=False).astype(int)
        assert np.array_equal(with_glyph, pixels(dataset, i))
        changed = np.abs(with_glyph - without).sum(axis=2) > 0  # (S, S)
        ys, xs = np.nonzero(changed)
        assert len(xs) > 0.25 * side * side  # the glyph is really there
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        # and the box is tight around it (star/hexagon do not touch every side)
        assert (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min()) >= 0.5 * side * side


def test_class_glyphs_unique_and_distractors_never_a_class_glyph():
    combos = {class_glyph(k) for k in range(MAX_CLASSES)}
    assert len(combos) == MAX_CLASSES == 60
    with pytest.raises(ValueError):
        SyntheticParts(num_classes=61)
    assert SyntheticParts(num_classes=30, images_per_class=1).classes[29] == "green_hexagon"  # shape 29 % 10, colour (29 + 2) % 6
    neutral = np.array(list(NEUTRAL_COLOURS.values()))
    counts = []
    for index in range(300):
        rng = np.random.default_rng([0, 0, index])
        label = index % 30
        target, distractors = _layout(rng, label, 64)
        shape, colour = class_glyph(label)
        assert target.shape == shape
        assert np.abs(np.array(target.colour) - CLASS_COLOURS[colour]).max() <= 12
        counts.append(len(distractors))
        for glyph in distractors:
            near_neutral = np.abs(neutral - glyph.colour).max(axis=1).min() <= 12
            assert glyph.shape in DISTRACTOR_SHAPES or (glyph.shape in CLASS_SHAPES and near_neutral)
            box, t = glyph.box, target.box
            assert box[2] < t[0] or t[2] < box[0] or box[3] < t[1] or t[3] < box[1]  # no overlap
    assert set(counts) == {1, 2, 3}


def test_background_statistics_do_not_reveal_the_class():
    """Nearest-class-mean on each picture's mean colour and contrast must stay near chance."""
    train = SyntheticParts("train", num_classes=10, images_per_class=30, cache=False)
    test = SyntheticParts("test", num_classes=10, images_per_class=20, cache=False)

    def features(dataset):
        arrays = np.stack([pixels(dataset, i) for i in range(len(dataset))]).astype(np.float32)
        return np.concatenate([arrays.mean(axis=(1, 2)), arrays.std(axis=(1, 2))], axis=1)  # (N, 6)

    f_train, f_test = features(train), features(test)
    y_train, y_test = np.array(train.targets), np.array(test.targets)
    centroids = np.stack([f_train[y_train == k].mean(axis=0) for k in range(10)])
    predicted = np.argmin(((f_test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == y_test).mean() < 0.3  # chance is 0.1


def test_generation_is_fast_and_cache_returns_independent_copies():
    dataset = SyntheticParts("train", num_classes=10, images_per_class=20, image_size=64)
    start = time.perf_counter()
    for i in range(200):
        dataset.load_image(i)
    assert (time.perf_counter() - start) / 200 < 0.004  # ~0.6 ms on one core, loose bound
    first = dataset.load_image(3)
    first.paste((0, 0, 0), (0, 0, 64, 64))
    assert np.asarray(dataset.load_image(3)).max() > 0
    start = time.perf_counter()
    for i in range(200):
        dataset.load_image(i)
    assert (time.perf_counter() - start) / 200 < 0.001  # cached


def test_invalid_arguments():
    for kwargs in ({"split": "val"}, {"num_classes": 0}, {"image_size": 16}, {"images_per_class": 0}, {"seed": -1}):
        with pytest.raises(ValueError):
            SyntheticParts(**kwargs)


def test_dataset_for_model_prepares_data_the_way_the_model_expects(tmp_path):
    """One implementation for the commands and the web app: the model's size, normalisation
    and (for synthetic data) number of classes; a missing directory or another number of
    classes is refused with a one-line DataSpecError."""
    import pytest

    from protopnet.data import DataSpecError, dataset_for_model

    from conftest import tiny_model

    model = tiny_model(num_classes=3)
    dataset = dataset_for_model(model, "synthetic", "train", images_per_class=2)
    assert len(dataset.classes) == 3 and dataset.image_size == model.image_size
    assert tuple(dataset.mean) == tuple(model.mean) and tuple(dataset.std) == tuple(model.std)
    with pytest.raises(DataSpecError, match="no such directory"):
        dataset_for_model(model, str(tmp_path / "missing"), "train")
    from PIL import Image

    for k in range(2):
        (tmp_path / "folder" / f"class{k}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / "folder" / f"class{k}" / "a.png")
    with pytest.raises(DataSpecError, match="has 2 classes but the model has 3"):
        dataset_for_model(model, str(tmp_path / "folder"), "train")
