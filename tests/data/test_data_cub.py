"""CUB-200-2011: parsing (ids not from 1, not contiguous), crop + resize of pictures and
annotations, clear errors for malformed files (fuzzed), and the real 30-class slice."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from protopnet.data import CUB200, BadImageError, build_dataset, is_cub_root, pretty_class_name, read_cub_metadata

from conftest import FILES, SHARED, write_tree  # noqa: F401 (FILES: the tree's files, for the tests that alter them)

REAL_CUB = SHARED / "data" / "CUB_200_2011"

@pytest.fixture()
def tree(tmp_path):
    return write_tree(tmp_path / "cub")


def test_ids_labels_and_splits(tree):
    assert is_cub_root(tree) and not is_cub_root(tree / "images")
    train = CUB200(tree, "train", image_size=64)
    test = CUB200(tree, "test", image_size=64)
    everything = CUB200(tree, "all", image_size=64)
    names = ["003.Sooty_Albatross", "007.Parakeet_Auklet", "012.Yellow_headed_Blackbird"]
    assert train.classes == test.classes == names  # sorted by class id, not file order
    assert train.class_ids == [3, 7, 12]
    assert train.image_ids == [7, 20, 105] and train.targets == [0, 0, 2]
    assert test.image_ids == [33] and test.targets == [1]
    assert everything.image_ids == [7, 20, 33, 105]
    assert Path(train.path(1)) == tree / "images/003.Sooty_Albatross/b.png"
    assert train.part_names == ["back", "left eye", "tail"]
    assert train.pretty_classes[2] == "Yellow headed Blackbird" == pretty_class_name(names[2])
    assert build_dataset(tree, split="test", image_size=64).image_ids == [33]
    assert build_dataset(tree.parent / "cub", split="train", image_size=64).image_ids == [7, 20, 105]


def test_class_subset(tree):
    subset = CUB200(tree, "all", image_size=32, classes=["012.Yellow_headed_Blackbird", 3])
    assert subset.classes == ["003.Sooty_Albatross", "012.Yellow_headed_Blackbird"]
    assert subset.image_ids == [7, 20, 105] and subset.targets == [0, 0, 1]
    with pytest.raises(ValueError, match="no class 'nope'"):
        CUB200(tree, classes=["nope"])
    with pytest.raises(ValueError, match="no images in split 'test'"):
        CUB200(tree, "test", classes=[3])


def test_bbox_crop_pixels_and_annotation(tree):
    dataset = CUB200(tree, "train", image_size=64)
    picture = np.asarray(dataset.load_image(1)).astype(int)  # image 20, box (10, 20)-(50, 50)
    assert picture.shape == (64, 64, 3)
    red = (picture[..., 0] > 200) & (picture[..., 2] < 60)
    assert red.mean() > 0.9  # the crop is the red box, no blue around it
    annotation = dataset.annotation(1)
    assert annotation.object_box == pytest.approx([0, 0, 64, 64])
    # hand computed: x' = (x - 10) * 64 / 40, y' = (y - 20) * 64 / 30
    assert set(annotation.parts) == {"back", "left eye"}  # tail is outside the crop
    assert annotation.parts["back"] == pytest.approx((32.0, 32.0))
    assert annotation.parts["left eye"] == pytest.approx((3.2, 64 / 30))
    green = (picture[..., 1] > 150) & (picture[..., 0] < 150)
    ys, xs = np.nonzero(green)
    assert abs(xs.mean() - 32.0) < 1.5 and abs(ys.mean() - 32.0) < 1.5  # the pixels agree


def test_box_is_clamped_to_the_picture(tree):
    dataset = CUB200(tree, "train", image_size=64)
    # image 7: 60 x 40, box x -5..45, y 10..110 -> region x 0..45, y 10..40
    annotation = dataset.annotation(0)
    assert annotation.object_box == pytest.approx([0, 0, 64, 64])
    assert annotation.parts == {"back": pytest.approx((9 * 64 / 45, 15 * 64 / 30))}
    assert dataset.load_image(0).size == (64, 64)
    assert dataset.region(0, (60, 40)) == (0, 10, 45, 40)
    # image 105 (10 x 10): a fractional box x 1.5..8.5, y 1.25..8.75 widens to whole pixels 1..9
    assert dataset.region(2, (10, 10)) == (1, 1, 9, 9)
    assert dataset.load_image(2).size == (64, 64)


def test_full_picture_annotation(tree):
    dataset = CUB200(tree, "train", crop="full", image_size=64)
    picture = np.asarray(dataset.load_image(1)).astype(int)  # 100 x 80 -> 64 x 64
    annotation = dataset.annotation(1)
    # x' = x * 0.64, y' = y * 0.8
    assert annotation.object_box == pytest.approx([6.4, 16.0, 32.0, 40.0])
    assert annotation.parts == {
        "back": pytest.approx((19.2, 28.0)), "left eye": pytest.approx((7.68, 16.8)), "tail": pytest.approx((51.2, 56.0)),
    }
    red = (picture[..., 0] > 200) & (picture[..., 2] < 60)
    ys, xs = np.nonzero(red)
    assert abs(xs.min() - 6.4) <= 1.5 and abs(xs.max() + 1 - 32) <= 1.5
    assert abs(ys.min() - 16) <= 1.5 and abs(ys.max() + 1 - 40) <= 1.5


def test_boxes_optional_for_full_crop(tmp_path):
    files = {k: v for k, v in FILES.items() if k != "bounding_boxes.txt"}
    root = write_tree(tmp_path / "nobox", files)
    assert len(CUB200(root, "train", crop="full", image_size=16)) == 3
    assert CUB200(root, "train", crop="full", image_size=16).annotation(0).object_box is None
    with pytest.raises(ValueError, match="bounding_boxes.txt is missing"):
        CUB200(root, "train", crop="bbox")


def test_box_outside_the_picture_is_a_bad_image(tmp_path):
    files = dict(FILES, **{"bounding_boxes.txt": "7 500 500 10 10\n20 10 20 40 30\n33 0 0 30 30\n105 1 1 8 8\n"})
    dataset = CUB200(write_tree(tmp_path / "out", files), "train", image_size=16)
    with pytest.raises(BadImageError, match="object box"):
        dataset.load_image(0)
    assert dataset.load_image(1).size == (16, 16)


def test_missing_image_file_is_a_bad_image(tmp_path):
    dataset = CUB200(write_tree(tmp_path / "noimg", images=False), "train", image_size=16)
    with pytest.raises(BadImageError, match="not found"):
        dataset.load_image(0)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("images.txt", "7 a.png\n7 b.png\n", r"images.txt, line 2: duplicate image id 7"),
        ("images.txt", "7 a.png\nx b.png\n", r"images.txt, line 2: image id must be an integer"),
        ("images.txt", "7\n", r"images.txt, line 1: expected 2 fields, found 1"),
        ("images.txt", "7 ../../etc/passwd\n", r"images.txt, line 1: image path must stay inside"),
        ("images.txt", "7 /abs/a.png\n", r"images.txt, line 1: image path must be relative"),
        ("images.txt", "", r"images.txt: no images"),
        ("classes.txt", "3 a\n3 b\n", r"classes.txt, line 2: duplicate class id 3"),
        ("classes.txt", "3 a\n4 a\n", r"classes.txt, line 2: duplicate class name 'a'"),
        ("image_class_labels.txt", "7 3\n20 3\n33 8\n105 12\n", r"image_class_labels.txt, line 3: class id 8 is not in classes.txt"),
        ("image_class_labels.txt", "7 3\n20 3\n33 7\n", r"image_class_labels.txt: no line for image id 105 \(images.txt, line 1\)"),
        ("train_test_split.txt", "7 1\n20 2\n33 0\n105 1\n", r"train_test_split.txt, line 2: train flag must be 0 or 1"),
        ("bounding_boxes.txt", "7 0 0 nan 5\n", r"bounding_boxes.txt, line 1: width must be finite"),
        ("bounding_boxes.txt", "7 0 0 1e999 5\n", r"bounding_boxes.txt, line 1: width must be finite"),
        ("bounding_boxes.txt", "7 0 0 abc 5\n", r"bounding_boxes.txt, line 1: width must be a number"),
        ("bounding_boxes.txt", "7 0 0 4 0\n", r"bounding_boxes.txt, line 1: box width and height must be > 0"),
        ("bounding_boxes.txt", "7 0 0 4\n", r"bounding_boxes.txt, line 1: expected 5 fields, found 4"),
        ("parts/part_locs.txt", "7 9 1 1 1\n", r"part_locs.txt, line 1: part id 9 is not in parts.txt"),
        ("parts/part_locs.txt", "7 1 1 1 1\n7 1 2 2 1\n", r"part_locs.txt, line 2: duplicate location of part 1 in image 7"),
        ("parts/part_locs.txt", "7 1 1 1 yes\n", r"part_locs.txt, line 1: visible flag must be 0 or 1"),
        ("parts/parts.txt", "1 back\n1 beak\n", r"parts.txt, line 2: duplicate part id 1"),
        ("classes.txt", b"3 \xff\xfeabc\n", r"classes.txt: not UTF-8 text"),
        ("classes.txt", "3 a\x00b\n", r"classes.txt, line 1: contains a NUL byte"),
    ],
)
def test_malformed_files_raise_clear_value_errors(tmp_path, name, content, expected):
    root = write_tree(tmp_path / "bad", dict(FILES, **{name: content}), images=False)
    with pytest.raises(ValueError, match=expected) as info:
        CUB200(root, "all")
    assert str(root / name) in str(info.value)


def test_missing_required_file(tree):
    (tree / "train_test_split.txt").unlink()
    assert not is_cub_root(tree)
    with pytest.raises(ValueError, match="train_test_split.txt is missing"):
        read_cub_metadata(tree)


# -- fuzzing: whatever the files say, the only possible error is a ValueError ----------------------

_TOKENS = st.one_of(
    st.sampled_from(["1", "3", "7", "12", "20", "33", "105", "0", "-1", "2", "1.5", "-4.0", "nan", "inf",
                     "1e999", "0x10", "a.png", "x/b.png", "../x.png", "/abs.png", "C:x", ".", "1_0", "٣"]),
    st.integers(-5, 200).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)
_LINES = st.lists(_TOKENS, max_size=6).map(" ".join)
_TEXT = st.lists(_LINES, max_size=6).map("\n".join)
_CONTENT = st.one_of(_TEXT.map(str.encode), _TEXT.map(lambda t: t.encode("utf-16")), st.binary(max_size=40))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fuzzed=st.dictionaries(st.sampled_from(sorted(FILES)), st.one_of(_CONTENT, st.none()), min_size=1),
    split=st.sampled_from(["train", "test", "all"]),
    crop=st.sampled_from(["bbox", "full"]),
)
def test_fuzzed_annotation_files_only_raise_value_error(fuzzed, split, crop):
    files: dict[str, str | bytes] = dict(FILES)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for name, content in fuzzed.items():
            if content is None:
                files.pop(name)  # the file is absent
            else:
                files[name] = content
        write_tree(root, files, images=False)
        try:
            dataset = CUB200(root, split=split, crop=crop, image_size=8)
        except ValueError as error:
            assert str(error).startswith(str(root)), error
            assert "\n" not in str(error)
            return
        for index in range(len(dataset)):  # no image files: every item is a (ValueError) BadImageError
            with pytest.raises(BadImageError):
                dataset.annotation(index)


# -- the real 30-class slice ---------------------------------------------------------------------

@pytest.mark.shared
@pytest.mark.skipif(not REAL_CUB.is_dir(), reason=f"needs the CUB-200-2011 slice at {REAL_CUB} (../shared)")
def test_real_cub_slice():
    train = CUB200(REAL_CUB, "train", image_size=224)
    test = CUB200(REAL_CUB, "test", image_size=224)
    assert len(train) == 900 and len(test) == 801
    assert train.num_classes == test.num_classes == 30
    assert train.classes[0] == "001.Black_footed_Albatross" and train.classes[-1].startswith("030.")
    assert sorted(set(train.targets)) == list(range(30)) and sorted(set(test.targets)) == list(range(30))
    assert len(train.part_names) == 15
    assert not set(train.image_ids) & set(test.image_ids)
    total_parts = 0
    for dataset in (train, test):
        for index in range(0, len(dataset), 7):
            annotation = dataset.annotation(index)
            total_parts += len(annotation.parts)
            for x, y in annotation.parts.values():
                assert 0 <= x <= 224 and 0 <= y <= 224
            assert annotation.object_box == pytest.approx([0, 0, 224, 224], abs=1e-6)
    assert total_parts > 2000  # parts are really carried: ~11 visible per bird
    for index in (0, 450, 899):
        picture = train.load_image(index)
        assert picture.size == (224, 224) and picture.mode == "RGB"
    full = CUB200(REAL_CUB, "test", crop="full", image_size=224)
    box = full.annotation(5).object_box
    assert 0 <= box[0] < box[2] <= 224 and 0 <= box[1] < box[3] <= 224
    assert set(full.annotation(5).parts) == set(test.annotation(5).parts)
