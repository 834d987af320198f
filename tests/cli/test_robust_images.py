"""Bad image files in a real ImageFolder tree: training skips the unreadable ones with a warning
and a count, lists them in ``bad_images.txt`` and finishes; odd but valid files (greyscale, CMYK,
RGBA, 16-bit, palette, 1x1, a PNG named .jpg) are converted and used. ``protopnet evaluate`` on
the tree finishes and reports the count; ``protopnet explain`` on a bad file says which file and
why, in one line, and exits non-zero."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protopnet.cli import main
from protopnet.data import build_dataset
from protopnet.train.loader import BadItem, IndexedSubset

COLOURS = {"a": (230, 40, 40), "b": (40, 200, 40), "c": (40, 80, 230)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One PyTorch thread: these tiny models train many times faster so on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def picture(colour, size=32, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(60, 140, size=(size, size, 3), dtype=np.uint8)
    x, y = rng.integers(0, size - 12, size=2)
    array[y : y + 12, x : x + 12] = colour
    return Image.fromarray(array)


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header claiming side x side RGB pixels (900 M), with a few bytes of data."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def noisy_jpeg() -> bytes:
    return encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)), "JPEG", quality=90)


def bad_files() -> dict[str, tuple[bytes, str]]:
    """relative path -> (content, a word the reason must contain)"""
    jpeg = noisy_jpeg()
    table = jpeg.index(b"\xff\xc4")  # a Huffman table, its code counts made impossible
    corrupt = jpeg[: table + 5] + b"\xff" * 16 + jpeg[table + 21 :]
    garbage = np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    return {
        "train/a/truncated.jpg": (jpeg[: int(len(jpeg) * 0.7)], "truncated"),
        "train/a/corrupt.jpg": (corrupt, "corrupt"),
        "train/b/empty.png": (b"", "empty"),
        "train/b/notes.jpg": (b"shopping list: eggs, milk\n", "not an image"),  # wrong extension
        "train/c/bomb.png": (bomb_png(), "decompression bomb"),
        "train/c/noise.png": (garbage, "not an image"),
        "test/a/cut.jpg": (jpeg[: len(jpeg) // 2 + 200], "truncated"),
        "test/b/zero.jpg": (b"", "empty"),
    }


def odd_files() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """relative path -> (content, the RGB colour of pixel (0, 0) after conversion)"""
    grey = Image.new("L", (20, 24), 200)
    cmyk = Image.new("CMYK", (24, 24), (255, 0, 0, 0))  # pure cyan
    rgba = Image.new("RGBA", (24, 24), (10, 20, 30, 0))  # fully transparent: composited on white
    deep = Image.fromarray(np.full((24, 24), 65535, dtype=np.uint16))  # 16-bit greyscale, white
    palette = Image.new("P", (24, 24), 1)
    palette.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    return {
        "train/a/grey.png": (encoded(grey, "PNG"), (200, 200, 200)),
        "train/a/cmyk.jpg": (encoded(cmyk, "JPEG", quality=100), (0, 255, 255)),
        "train/b/rgba.png": (encoded(rgba, "PNG"), (255, 255, 255)),
        "train/b/deep.png": (encoded(deep, "PNG"), (255, 255, 255)),
        "train/c/one_pixel.png": (encoded(Image.new("RGB", (1, 1), (7, 8, 9)), "PNG"), (7, 8, 9)),
        "train/c/palette.gif": (encoded(palette, "GIF"), (12, 34, 56)),
        "train/c/actually_a_png.jpg": (encoded(Image.new("RGB", (16, 16), (90, 91, 92)), "PNG"), (90, 91, 92)),
    }


def build_tree(root: Path) -> Path:
    for split, per_class in (("train", 5), ("test", 2)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                picture(colour, seed=zlib.crc32(f"{split}{name}{i}".encode())).save(folder / f"{i}.png")
    for relative, (content, _) in {**bad_files(), **odd_files()}.items():
        (root / relative).write_bytes(content)
    (root / "train" / "a" / "readme.txt").write_text("not listed: no image extension")
    return root


CONFIG = """\
model: {backbone: tiny_cnn, pretrained: false, prototypes_per_class: 1, prototype_dim: 8}
data: {root: ROOT, image_size: 32, augment: false, val_fraction: 0.2, batch_size: 6, test_batch_size: 8,
       push_batch_size: 6, num_workers: 1}
schedule: {epochs: 2, warm_epochs: 1, push_start: 1, push_every: 1, last_layer_iterations: 1}
run: {seed: 0, device: cpu}
output: {save_prototype_images: false}
"""


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("badimages")
    root = build_tree(base / "tree")
    config = base / "config.yaml"
    config.write_text(CONFIG.replace("ROOT", str(root)))
    out = base / "run"
    collect = Collect()
    logging.getLogger("protopnet").addHandler(collect)
    try:
        rc = main(["-q", "train", str(config), "--out", str(out)])
    finally:
        logging.getLogger("protopnet").removeHandler(collect)
    assert rc == 0
    return root, out, collect.messages


def test_training_skips_lists_and_counts_the_unreadable_images(trained):
    root, out, warnings = trained
    expected = {str(root / relative): word for relative, (_, word) in bad_files().items()}
    listed = dict(line.split("\t", 1) for line in (out / "bad_images.txt").read_text().splitlines())
    assert set(listed) == set(expected)  # every bad file, and no good or odd-but-valid one
    for path, reason in listed.items():
        assert expected[path] in reason, (path, reason)
        assert "\n" not in reason and reason.strip()
    assert json.loads((out / "results.json").read_text())["bad_images"] == len(expected)
    for path in expected:  # a warning for each, once (workers hand them to the main process)
        assert sum(f"skipping unreadable image {path}:" in m for m in warnings) == 1, path
    assert any(f"{len(expected)} unreadable images were skipped" in m for m in warnings)
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["warm", "joint", "push", "last_layer"]  # every epoch finished


def test_odd_but_valid_images_are_converted_and_used(trained):
    root, out, _ = trained
    dataset = build_dataset(root, split="train", image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    subset = IndexedSubset(dataset, augment=False)
    positions = {dataset.path(i): i for i in range(len(dataset))}
    for relative, (_, colour) in odd_files().items():
        item = subset[positions[str(root / relative)]]
        assert not isinstance(item, BadItem), item
        image, label, _ = item
        assert image.shape == (3, 32, 32) and torch.isfinite(image).all()
        assert label == dataset.classes.index(relative.split("/")[1])
        assert torch.allclose(image[:, 0, 0] * 255, torch.tensor(colour, dtype=torch.float32), atol=3), (relative, image[:, 0, 0] * 255)
    bad = sum(isinstance(subset[i], BadItem) for i in range(len(subset)))
    assert bad == sum(r.startswith("train/") for r in bad_files())
    assert str(root / "train/a/readme.txt") not in positions


def test_evaluate_on_a_tree_with_bad_files_finishes_and_counts_them(trained, tmp_path, capsys):
    root, out, _ = trained
    report = tmp_path / "eval.json"
    assert main(["-q", "evaluate", str(out / "model"), "--data", str(root), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "(6 images)" in printed and "skipped 2 unreadable images (first: " in printed
    figures = json.loads(report.read_text())
    assert figures["n"] == 6 and figures["bad_images"] == 2
    assert set(figures["bad_image_files"]) == {str(root / "test/a/cut.jpg"), str(root / "test/b/zero.jpg")}


@pytest.mark.parametrize("relative", sorted(bad_files()))
def test_explain_names_the_bad_file_and_the_reason(trained, relative, tmp_path, capsys):
    root, out, _ = trained
    path = root / relative
    assert main(["-q", "explain", str(out / "model"), str(root / "train/a/0.png"), str(path), "--out", str(tmp_path / "x")]) != 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"protopnet explain: error: {path}: "), captured.err
    assert bad_files()[relative][1] in lines[0]
    assert not (tmp_path / "x").exists()  # every image is read before anything is written


def test_explain_in_a_real_process_on_a_decompression_bomb(trained, tmp_path):
    root, out, _ = trained
    script = Path(sys.executable).with_name("protopnet")
    prefix = [str(script)] if script.is_file() else [sys.executable, "-m", "protopnet.cli"]
    bomb = root / "train/c/bomb.png"
    done = subprocess.run([*prefix, "-q", "explain", str(out / "model"), str(bomb), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(f"protopnet explain: error: {bomb}: image too large"), done.stderr
    assert "Traceback" not in done.stderr
