"""Online and offline augmentation."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from protopnet.data import SyntheticParts, augment_dataset_to_folder, build_dataset, offline_augment, online_augmentation
from protopnet.data.augment import rotate_and_crop, shear_and_crop


def asymmetric(size: int = 32) -> Image.Image:
    array = np.zeros((size, size, 3), np.uint8)
    array[:, : size // 4] = (255, 0, 0)  # a red band on the left
    array[: size // 4, :, 1] = 255  # a green band on top
    return Image.fromarray(array)


def arr(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture).astype(int)


def test_online_augmentation_flip_only_is_identity_or_mirror():
    augment = online_augmentation(32, rotation=0, shear=0, skew=0)
    source = asymmetric()
    torch.manual_seed(0)
    outcomes = set()
    for _ in range(20):
        out = augment(source)
        assert out.size == (32, 32) and out.mode == "RGB"
        if np.array_equal(arr(out), arr(source)):
            outcomes.add("same")
        else:
            assert np.array_equal(arr(out), arr(source)[:, ::-1])
            outcomes.add("mirror")
    assert outcomes == {"same", "mirror"}


def test_online_augmentation_default_changes_pictures_reproducibly_and_pickles():
    augment = online_augmentation(48)
    assert not any(isinstance(t, v2.ColorJitter) for t in augment.transform.transforms)  # off by default
    assert any(isinstance(t, v2.ColorJitter) for t in online_augmentation(48, colour_jitter=0.2).transform.transforms)
    source = SyntheticParts(num_classes=2, images_per_class=1, image_size=48).load_image(0)
    torch.manual_seed(5)
    first = [arr(augment(source)) for _ in range(6)]
    torch.manual_seed(5)
    again = [arr(pickle.loads(pickle.dumps(augment))(source)) for _ in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert sum(not np.array_equal(a, arr(source)) for a in first) >= 5
    assert all(a.shape == (48, 48, 3) for a in first)


def test_rotate_and_crop_geometry():
    source = asymmetric()
    assert np.array_equal(arr(rotate_and_crop(source, 0.0)), arr(source))
    assert np.array_equal(arr(rotate_and_crop(source, 90.0)), np.rot90(arr(source), 1))  # counter-clockwise
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    for angle in (-15.0, 7.0, 15.0):  # the crop removes every uncovered corner
        out = arr(rotate_and_crop(red, angle))
        assert np.abs(out - [255, 0, 0]).max() <= 2
    for axis in ("x", "y"):
        out = arr(shear_and_crop(red, 10.0, axis))
        assert out.shape == (40, 40, 3) and np.abs(out - [255, 0, 0]).max() <= 2


def test_offline_augment_is_deterministic_and_complete():
    source = SyntheticParts(num_classes=2, images_per_class=1, image_size=48).load_image(1)
    first = offline_augment(source, np.random.default_rng(7))
    assert len(first) == 30 and all(p.size == (48, 48) and p.mode == "RGB" for p in first)
    assert all(np.array_equal(arr(a), arr(b)) for a, b in zip(first, offline_augment(source, 7)))
    other = offline_augment(source, 8)
    assert not all(np.array_equal(arr(a), arr(b)) for a, b in zip(first, other))
    assert len({arr(p).tobytes() for p in first}) == 30  # all different
    flipped = offline_augment(asymmetric(), 0, copies_per_operation=2, rotation=0.0, flip_probability=1.0)
    assert len(flipped) == 6
    assert np.array_equal(arr(flipped[0]), arr(asymmetric())[:, ::-1])
    kept = offline_augment(asymmetric(), 0, copies_per_operation=2, rotation=0.0, flip_probability=0.0)
    assert np.array_equal(arr(kept[1]), arr(asymmetric()))


def test_augment_dataset_to_folder_roundtrip(tmp_path):
    dataset = SyntheticParts(num_classes=3, images_per_class=2, image_size=32)
    written = augment_dataset_to_folder(dataset, tmp_path / "aug", seed=1, copies_per_operation=1)
    assert written == 6 * 4
    folder = build_dataset(tmp_path / "aug", split="train", image_size=32)
    # class names do not sort in label order, so folders carry the label first
    assert folder.classes == ["0.red_circle", "1.green_square", "2.blue_triangle"]
    assert Counter(folder.targets) == {0: 8, 1: 8, 2: 8}
    originals = [i for i in range(len(folder)) if folder.path(i).endswith("_00.png")]
    assert np.array_equal(arr(folder.load_image(originals[0])), arr(dataset.load_image(0)))
    again = tmp_path / "again"
    augment_dataset_to_folder(dataset, again, seed=1, copies_per_operation=1)
    for path in sorted((tmp_path / "aug").rglob("*.png")):
        twin = again / path.relative_to(tmp_path / "aug")
        assert np.array_equal(arr(Image.open(path)), arr(Image.open(twin)))


def test_disabled_online_augmentation_is_identity():
    source = asymmetric()
    off = online_augmentation(32, flip=False, rotation=0, shear=0, skew=0)
    assert np.array_equal(arr(off(source)), arr(source))
    assert off(asymmetric(20)).size == (32, 32)  # the output is always image_size


def test_augmented_views_are_fixed_and_view_zero_is_the_picture():
    from protopnet.data import AugmentedViews, online_augmentation

    from conftest import ColourDataset

    base = ColourDataset(num_classes=2, per_class=3, image_size=32)
    views = AugmentedViews(base, online_augmentation(32), views=3, seed=5)
    assert len(views) == 18 and views.targets == [t for t in base.targets for _ in range(3)]
    assert views.items_of([1, 4]) == [3, 4, 5, 12, 13, 14]
    assert views.source(13) == (4, 1) and views.path(12) == base.path(4) and views.path(13).endswith("#view1")
    as_array = lambda picture: np.asarray(picture, dtype=np.int16)
    for i in range(len(base)):
        picture = as_array(base.load_image(i))
        assert np.array_equal(as_array(views.load_image(3 * i)), picture)
        for v in (1, 2):
            first = as_array(views.load_image(3 * i + v))
            assert np.array_equal(first, as_array(views.load_image(3 * i + v)))  # the same every time
            assert not np.array_equal(first, picture)  # and augmented
    assert not np.array_equal(as_array(views.load_image(1)), as_array(views.load_image(2)))
    other_seed = AugmentedViews(base, online_augmentation(32), views=3, seed=6)
    assert not np.array_equal(as_array(views.load_image(1)), as_array(other_seed.load_image(1)))
    image, label = views[4]
    assert image.shape == (3, 32, 32) and label == base.targets[1]
