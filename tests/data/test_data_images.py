"""Robust image loading: every kind of bad file gets the right outcome."""

from __future__ import annotations

import logging
import pickle
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from protopnet.data import (
    BadImageError,
    ImageFolderDataset,
    SkipBadImages,
    check_image_header,
    collate_skip_none,
    open_image,
    scan_images,
)
from protopnet.data.images import to_rgb


def png_header_only(path: Path, width: int, height: int, colour_type: int = 2) -> Path:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb, cheaply)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def noise_picture(size: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def assert_bad(path: Path, *words: str, **kw) -> BadImageError:
    with pytest.raises(BadImageError) as info:
        open_image(path, **kw)
    error = info.value
    message = str(error)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    assert error.path == str(path)
    assert any(word in error.reason for word in words), error.reason
    return error


# -- bad files ----------------------------------------------------------------------------------

def test_truncated_jpeg_and_png_are_refused(tmp_path):
    for suffix in ("jpg", "png"):
        whole = tmp_path / f"whole.{suffix}"
        noise_picture().save(whole)
        data = whole.read_bytes()
        cut = tmp_path / f"cut.{suffix}"
        cut.write_bytes(data[: len(data) // 2])
        assert_bad(cut, "truncated", "corrupt")
        # the header alone still looks fine: only a full decode finds truncation
        assert check_image_header(cut) == (48, 48)


def test_corrupt_png_data_is_refused(tmp_path):
    path = tmp_path / "corrupt.png"
    noise_picture().save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 200] = bytes(200)  # zero the compressed stream
    path.write_bytes(bytes(data))
    assert_bad(path, "corrupt", "truncated")


def test_empty_missing_and_directory(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert_bad(empty, "empty")
    assert_bad(tmp_path / "missing.png", "not found")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    assert_bad(folder, "directory")


def test_content_decides_not_extension(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n" * 10)
    assert_bad(text, "not an image")
    # a PNG named .jpg is a perfectly good image
    picture = noise_picture(seed=3)
    misnamed = tmp_path / "really_png.jpg"
    picture.save(misnamed, format="PNG")
    assert np.array_equal(np.asarray(open_image(misnamed)), np.asarray(picture))


def test_decompression_bomb_is_refused_quickly_without_touching_pil_state(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    start = time.perf_counter()
    assert_bad(bomb, "decompression bomb", "too large")
    assert time.perf_counter() - start < 1.0
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert warnings.filters == filters_before
    with pytest.raises(BadImageError):
        check_image_header(bomb)


def test_pil_warning_range_is_refused_and_no_warning_escapes(tmp_path):
    # 10000 x 10000 = 100 M pixels: between PIL's warning (89 M) and error (179 M) limits
    big = png_header_only(tmp_path / "big.png", 10000, 10000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_bad(big, "decompression bomb", "too large")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_per_call_pixel_limit(tmp_path):
    path = tmp_path / "small.png"
    noise_picture(100).save(path)
    assert open_image(path).size == (100, 100)
    assert_bad(path, "too large", max_pixels=5000)
    assert open_image(path, max_pixels=10000).size == (100, 100)


# -- colour modes -------------------------------------------------------------------------------

def rgb_of(path: Path) -> np.ndarray:
    picture = open_image(path)
    assert picture.mode == "RGB"
    return np.asarray(picture)


def test_greyscale_and_one_bit(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "grey.png")
    array = rgb_of(tmp_path / "grey.png")
    assert array.shape == (4, 5, 3) and (array == 77).all()
    bits = Image.new("1", (3, 3), 1)
    bits.putpixel((0, 0), 0)
    bits.save(tmp_path / "bits.png")
    array = rgb_of(tmp_path / "bits.png")
    assert (array[0, 0] == 0).all() and (array[1, 1] == 255).all()


def test_cmyk_tiff_and_jpeg(tmp_path):
    red = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    red.save(tmp_path / "red.tif")
    assert (rgb_of(tmp_path / "red.tif") == [255, 0, 0]).all()
    red.save(tmp_path / "red.jpg", quality=100)
    assert np.abs(rgb_of(tmp_path / "red.jpg").astype(int) - [255, 0, 0]).max() <= 3


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    rgba.save(tmp_path / "rgba.png")
    array = rgb_of(tmp_path / "rgba.png")
    assert array[0, 0].tolist() == [255, 255, 255]  # transparent red -> white, not red or black
    assert array[0, 1].tolist() == [0, 0, 255]
    assert np.abs(array[0, 2].astype(int) - 127).max() <= 1
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    la.save(tmp_path / "la.png")
    array = rgb_of(tmp_path / "la.png")
    assert array[0, 0].tolist() == [255, 255, 255] and array[0, 1].tolist() == [0, 0, 0]


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png")
    assert rgb_of(tmp_path / "p.png").tolist() == [[[10, 20, 30], [200, 100, 50]]]
    palette.save(tmp_path / "pt.png", transparency=0)
    assert rgb_of(tmp_path / "pt.png").tolist() == [[[255, 255, 255], [200, 100, 50]]]
    palette.save(tmp_path / "p.gif")
    assert rgb_of(tmp_path / "p.gif")[0, 1].tolist() == [200, 100, 50]


def test_sixteen_bit_png(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 128]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    array = rgb_of(tmp_path / "deep.png")
    assert array[0, :, 0].tolist() == [0, 100, 255, 0]
    assert (array[..., 0] == array[..., 2]).all()


def test_wide_modes_in_memory():
    wide = Image.fromarray(np.array([[0, 65535, 257 * 9]], dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(wide))[0, :, 1].tolist() == [0, 255, 9]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_one_pixel_image_is_valid(tmp_path):
    Image.new("RGB", (1, 1), (9, 8, 7)).save(tmp_path / "dot.png")
    assert rgb_of(tmp_path / "dot.png").tolist() == [[[9, 8, 7]]]


def test_error_survives_pickling():
    error = pickle.loads(pickle.dumps(BadImageError("/x/y.jpg", "empty file\n(0 bytes)")))
    assert isinstance(error, BadImageError) and isinstance(error, ValueError)
    assert str(error) == "/x/y.jpg: empty file (0 bytes)"


# -- skipping bad images while training ---------------------------------------------------------

@pytest.fixture()
def folder_with_bad_files(tmp_path):
    root = tmp_path / "tree"
    for label, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (10, 10), (label * 100, k * 50, 0)).save(root / name / f"{k}.png")
    (root / "a" / "1.png").write_bytes(b"")  # bad: empty
    (root / "b" / "2.png").write_text("not an image")  # bad: text
    return root


def test_skip_bad_images_and_collate(folder_with_bad_files, caplog):
    dataset = ImageFolderDataset(folder_with_bad_files, image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    assert len(dataset) == 6
    wrapped = SkipBadImages(dataset)
    assert wrapped.classes == ["a", "b"] and wrapped.targets == dataset.targets  # forwarded
    with caplog.at_level(logging.WARNING, logger="protopnet.data.images"):
        items = [wrapped[i] for i in range(len(wrapped))] + [wrapped[1]]  # index 1 twice
    assert [item is None for item in items] == [False, True, False, False, False, True, True]
    assert [i for i, _, _ in wrapped.bad_items] == [1, 5]
    assert "empty" in wrapped.bad_items[0][2]
    assert sum("skipping unreadable image" in r.getMessage() for r in caplog.records) == 2  # once per file

    loader = DataLoader(wrapped, batch_size=2, collate_fn=collate_skip_none, shuffle=False)
    batches = list(loader)
    sizes = [None if b is None else b[0].shape[0] for b in batches]
    assert sizes == [1, 2, 1]
    images, labels = batches[0]
    assert images.shape == (1, 3, 8, 8) and labels.tolist() == [0]
    assert collate_skip_none([None, None]) is None
    images, labels = collate_skip_none([(torch.zeros(3, 2, 2), 4), None])
    assert images.shape == (1, 3, 2, 2) and labels.tolist() == [4]


def test_skip_bad_images_survives_pickling(folder_with_bad_files):
    wrapped = pickle.loads(pickle.dumps(SkipBadImages(ImageFolderDataset(folder_with_bad_files, image_size=8))))
    assert wrapped[1] is None and wrapped.num_classes == 2


def test_scan_images(folder_with_bad_files):
    dataset = ImageFolderDataset(folder_with_bad_files, image_size=8)
    cut = Path(dataset.path(3))  # b/0.png: truncate it -> only the full scan sees it
    noise_picture().save(cut)
    cut.write_bytes(cut.read_bytes()[:200])
    quick = scan_images(dataset)
    assert [(i, Path(p).name) for i, p, _ in quick] == [(1, "1.png"), (5, "2.png")]
    assert "empty" in quick[0][2] and "not an image" in quick[1][2]
    full = scan_images(dataset, full=True)
    assert [i for i, _, _ in full] == [1, 3, 5]
    assert "truncated" in full[1][2] or "corrupt" in full[1][2]
