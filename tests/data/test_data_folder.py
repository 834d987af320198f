"""ImageFolder trees, build_dataset's dispatch, and the stratified train/val split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protopnet.data import CUB200, ImageFolderDataset, SyntheticParts, build_dataset, train_val_split


def picture(path: Path, colour=(10, 20, 30), size=(12, 8), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt or "PNG")


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "flowers"
    picture(root / "b_cls" / "one.PNG", (200, 0, 0))
    picture(root / "a_cls" / "x.JpG", (0, 200, 0), fmt="JPEG")
    picture(root / "a_cls" / "deeper" / "y.jpeg", (0, 0, 200), fmt="JPEG")
    picture(root / "a_cls" / ".hidden.png")  # hidden file
    picture(root / "a_cls" / ".cache" / "q.png")  # inside a hidden folder
    picture(root / ".thumbnails" / "z.png")  # hidden class folder
    (root / "a_cls" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_lists_classes_and_images(tree):
    dataset = ImageFolderDataset(tree, image_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    assert dataset.classes == ["a_cls", "b_cls"]
    assert [Path(dataset.path(i)).relative_to(tree).as_posix() for i in range(len(dataset))] == [
        "a_cls/deeper/y.jpeg", "a_cls/x.JpG", "b_cls/one.PNG",
    ]
    assert dataset.targets == [0, 0, 1]
    image, label = dataset[2]
    assert image.shape == (3, 16, 16) and label == 1
    assert np.asarray(dataset.load_image(2))[5, 5].tolist() == [200, 0, 0]


def test_explicit_class_list_keeps_labels(tree, caplog):
    dataset = ImageFolderDataset(tree, image_size=8, classes=["b_cls", "missing", "a_cls"])
    assert dataset.targets == [0, 2, 2]
    only_b = ImageFolderDataset(tree, image_size=8, classes=["b_cls"])
    assert len(only_b) == 1 and "ignoring folders" in caplog.text


def test_empty_tree_is_an_error(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        ImageFolderDataset(tmp_path / "empty")


def test_build_dataset_dispatch(tree, tmp_path):
    assert isinstance(build_dataset("synthetic", split="test", image_size=64, num_classes=3, crop="bbox"), SyntheticParts)
    folder = build_dataset(tree, split="train", image_size=16, crop="bbox")  # crop is ignored for folders
    assert isinstance(folder, ImageFolderDataset) and len(folder) == 3
    for bad in (tmp_path / "nowhere", tmp_path / "file.txt", tmp_path / "empty_dir"):
        if bad.name == "file.txt":
            bad.write_text("x")
        if bad.name == "empty_dir":
            bad.mkdir()
        with pytest.raises(ValueError, match=r"not a dataset: expected 'synthetic', a CUB-200-2011 root") as info:
            build_dataset(bad)
        assert str(bad) in str(info.value)


def test_build_dataset_uses_split_folders_with_shared_classes(tmp_path):
    root = tmp_path / "split"
    picture(root / "train" / "cat" / "1.png")
    picture(root / "train" / "dog" / "1.png")
    picture(root / "test" / "dog" / "1.png")
    picture(root / "test" / "eel" / "1.png")
    train = build_dataset(root, split="train", image_size=8)
    test = build_dataset(root, split="test", image_size=8)
    assert train.classes == test.classes == ["cat", "dog", "eel"]
    assert train.targets == [0, 1] and test.targets == [1, 2]
    assert all("/train/" in train.path(i) for i in range(len(train)))
    with pytest.raises(ValueError, match="none for split 'val'"):
        build_dataset(root, split="val")


def test_train_val_split_is_stratified_and_deterministic():
    targets = [0] * 50 + [1] * 20 + [2] * 7 + [3]
    train, val = train_val_split(targets, 0.2, seed=1)
    assert sorted(train + val) == list(range(len(targets))) and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    assert Counter(targets[i] for i in val) == {0: 10, 1: 4, 2: 1}  # the single item of class 3 stays in train
    assert train_val_split(targets, 0.2, seed=1) == (train, val)
    assert train_val_split(targets, 0.2, seed=2) != (train, val)
    assert train_val_split(targets, 0.0, seed=1) == (list(range(len(targets))), [])
    dataset = SyntheticParts("train", num_classes=4, images_per_class=10)
    _, val = train_val_split(dataset, 0.3, seed=0)
    assert Counter(dataset.targets[i] for i in val) == {0: 3, 1: 3, 2: 3, 3: 3}
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            train_val_split(targets, bad)


def test_build_dataset_finds_cub_inside_a_parent(tmp_path):
    root = tmp_path / "data" / "CUB_200_2011"
    (root / "images" / "001.A").mkdir(parents=True)
    (root / "classes.txt").write_text("1 001.A\n")
    (root / "images.txt").write_text("4 001.A/x.png\n")
    (root / "image_class_labels.txt").write_text("4 1\n")
    (root / "train_test_split.txt").write_text("4 1\n")
    (root / "bounding_boxes.txt").write_text("4 0 0 5 5\n")
    picture(root / "images" / "001.A" / "x.png")
    assert isinstance(build_dataset(tmp_path / "data", image_size=8), CUB200)
