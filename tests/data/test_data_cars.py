"""Stanford Cars on a tiny devkit written with scipy.io.savemat."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protopnet.data import StanfordCars, build_dataset, is_cars_root

scipy_io = pytest.importorskip("scipy.io", reason="Stanford Cars needs scipy (protopnet[scipy])")

FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Volvo 240 Sedan 1993"]


def save_annotations(path: Path, rows: list[tuple], fields: tuple[str, ...] = FIELDS) -> None:
    annotations = np.zeros((1, len(rows)), dtype=[(name, "O") for name in fields])
    for i, row in enumerate(rows):
        annotations[0, i] = tuple(np.uint16(v) if isinstance(v, int) else v for v in row)
    scipy_io.savemat(str(path), {"annotations": annotations})


def red_in_box(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """A blue picture with the 1-based inclusive box ``x1, y1, x2, y2`` painted red."""
    x1, y1, x2, y2 = box
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:] = (0, 0, 255)
    array[y1 - 1 : y2, x1 - 1 : x2] = (255, 0, 0)
    Image.fromarray(array).save(path, format="PNG")


@pytest.fixture()
def cars(tmp_path):
    root = tmp_path / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    (root / "cars_train").mkdir()
    (root / "cars_test").mkdir()
    scipy_io.savemat(str(root / "devkit" / "cars_meta.mat"), {"class_names": np.array([CLASSES], dtype=object)})
    train = [(11, 6, 30, 25, 2, "00001.jpg"), (1, 1, 10, 10, 1, "00002.jpg"), (3, 3, 8, 8, 3, "00003.jpg")]
    test = [(2, 2, 9, 9, 3, "00001.jpg"), (1, 1, 4, 4, 1, "00002.jpg")]
    save_annotations(root / "devkit" / "cars_train_annos.mat", train)
    save_annotations(root / "cars_test_annos_withlabels.mat", test)
    for folder, rows in (("cars_train", train), ("cars_test", test)):
        for row in rows:
            red_in_box(root / folder / row[5], (50, 40), row[:4])
    return root


def test_reads_devkit(cars):
    assert is_cars_root(cars) and not is_cars_root(cars / "devkit")
    train = StanfordCars(cars, "train", image_size=32)
    assert train.classes == CLASSES
    assert train.targets == [1, 0, 2]  # 1-based classes -> labels
    assert [Path(train.path(i)).name for i in range(3)] == ["00001.jpg", "00002.jpg", "00003.jpg"]
    assert Path(train.path(0)).parent.name == "cars_train"
    test = StanfordCars(cars, "test", image_size=32)
    assert test.targets == [2, 0] and Path(test.path(0)).parent.name == "cars_test"
    assert len(StanfordCars(cars, "all", image_size=32)) == 5
    assert build_dataset(cars, split="test", image_size=32).targets == [2, 0]
    assert build_dataset(cars.parent, split="test", image_size=32).targets == [2, 0]  # finds stanford_cars/
    subset = StanfordCars(cars, "train", image_size=32, classes=["Volvo 240 Sedan 1993", "Acura RL Sedan 2012"])
    assert subset.classes == CLASSES[1:] and subset.targets == [0, 1]


def test_bbox_crop_and_box_coordinates(cars):
    cropped = StanfordCars(cars, "train", image_size=32)
    picture = np.asarray(cropped.load_image(0)).astype(int)
    assert picture.shape == (32, 32, 3)
    assert ((picture[..., 0] > 200) & (picture[..., 2] < 60)).all()  # exactly the red box
    assert cropped.annotation(0).object_box == pytest.approx([0, 0, 32, 32])
    full = StanfordCars(cars, "train", crop="full", image_size=100)
    # 1-based inclusive x 11..30, y 6..25 -> continuous (10, 5, 30, 25); scale 100/50, 100/40
    assert full.annotation(0).object_box == pytest.approx([20.0, 12.5, 60.0, 62.5])
    red = np.asarray(full.load_image(0))[..., 0] > 200
    ys, xs = np.nonzero(red)
    assert abs(xs.min() - 20) <= 1 and abs(xs.max() + 1 - 60) <= 1
    assert abs(ys.min() - 12.5) <= 1.5 and abs(ys.max() + 1 - 62.5) <= 1.5


def test_nested_image_folder_and_devkit_test_file(cars):
    (cars / "cars_test_annos_withlabels.mat").rename(cars / "devkit" / "cars_test_annos_withlabels.mat")
    nested = cars / "cars_test" / "cars_test"
    nested.mkdir()
    for name in ("00001.jpg", "00002.jpg"):
        (cars / "cars_test" / name).rename(nested / name)
    test = StanfordCars(cars, "test", image_size=16)
    assert Path(test.path(1)) == nested / "00002.jpg"
    assert test.load_image(1).size == (16, 16)


def test_unlabelled_test_annotations_are_refused_clearly(cars):
    save_annotations(cars / "cars_test_annos_withlabels.mat", [(1, 1, 4, 4, "00001.jpg")],
                     fields=("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname"))
    with pytest.raises(ValueError, match=r"cars_test_annos_withlabels.mat: annotations lack the field\(s\) class"):
        StanfordCars(cars, "test")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ((1, 1, 4, 4, 9, "00001.jpg"), r"annotation 0: class must be an integer in 1..3, got 9"),
        ((5, 1, 4, 4, 1, "00001.jpg"), r"annotation 0: empty box"),
        ((1, 1, 4, 4, 1, "../x.jpg"), r"annotation 0: bad file name"),
    ],
)
def test_bad_annotations(cars, row, expected):
    save_annotations(cars / "devkit" / "cars_train_annos.mat", [row])
    with pytest.raises(ValueError, match=expected):
        StanfordCars(cars, "train")


def test_not_a_mat_file(cars):
    (cars / "devkit" / "cars_train_annos.mat").write_text("garbage")
    with pytest.raises(ValueError, match=r"cars_train_annos.mat: cannot read MATLAB file"):
        StanfordCars(cars, "train")


def test_missing_scipy_names_the_extra(cars, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match=r"protopnet\[scipy\]"):
        StanfordCars(cars, "train")
