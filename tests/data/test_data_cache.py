"""DecodedCache: same pixels as the wrapped dataset, atomic files, rebuilt when stale."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protopnet.data import BadImageError, DecodedCache, ImageFolderDataset, SkipBadImages, SyntheticParts


def pixels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture)


class CountingSynthetic(SyntheticParts):
    """Counts how often pictures are rendered, to see whether the cache was rebuilt."""

    calls = 0

    def load_image(self, index):
        type(self).calls += 1
        return super().load_image(index)


def test_round_trip_equals_uncached(tmp_path):
    plain = SyntheticParts("test", num_classes=4, images_per_class=5, image_size=40, seed=9)
    cached = DecodedCache(SyntheticParts("test", num_classes=4, images_per_class=5, image_size=40, seed=9), tmp_path)
    assert len(cached) == 20
    for i in range(20):
        assert np.array_equal(pixels(cached.load_image(i)), pixels(plain.load_image(i)))
        image, label = cached[i]
        reference, reference_label = plain[i]
        assert torch.equal(image, reference) and label == reference_label
    assert cached.classes == plain.classes and cached.targets == plain.targets
    assert cached.path(3) == plain.path(3) and cached.annotation(3) == plain.annotation(3)
    assert cached.image_size == 40 and cached.mean == plain.mean and cached.num_classes == 4
    assert cached.split == "test"  # other attributes are forwarded too
    meta = json.loads(cached.meta_path.read_text())
    assert meta["n"] == 20 and meta["size"] == 40 and meta["ok"] == [True] * 20
    assert cached.data_path.stat().st_size == 20 * 40 * 40 * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cached.data_path.name, cached.meta_path.name])


def test_reused_when_valid_rebuilt_when_invalid(tmp_path):
    def make(**kw):
        return DecodedCache(CountingSynthetic("train", num_classes=2, images_per_class=3, image_size=32), tmp_path, **kw)

    CountingSynthetic.calls = 0
    first = make()
    assert CountingSynthetic.calls == 6
    reference = [pixels(first.load_image(i)) for i in range(6)]
    make()
    assert CountingSynthetic.calls == 6  # valid: nothing decoded again
    make(rebuild=True)
    assert CountingSynthetic.calls == 12
    with open(first.data_path, "r+b") as handle:  # truncated data file
        handle.truncate(100)
    again = make()
    assert CountingSynthetic.calls == 18
    assert all(np.array_equal(pixels(again.load_image(i)), reference[i]) for i in range(6))
    first.meta_path.write_text("{not json")
    make()
    assert CountingSynthetic.calls == 24
    other_seed = DecodedCache(CountingSynthetic("train", num_classes=2, images_per_class=3, image_size=32, seed=1), tmp_path)
    assert other_seed.data_path != first.data_path  # different paths -> its own cache file
    assert not np.array_equal(pixels(other_seed.load_image(0)), reference[0])


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "tree"
    for label, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (20, 10), (label * 200, k * 100, 50)).save(root / name / f"{k}.png")
    (root / "b" / "1.png").write_bytes(b"")
    return root


def test_stale_files_rebuild_and_bad_images_are_remembered(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    cached = DecodedCache(ImageFolderDataset(folder, image_size=8), cache_dir)
    assert [(i, Path(p).name) for i, p, _ in cached.bad_items] == [(3, "1.png")]
    assert "empty" in cached.bad_items[0][2]
    with pytest.raises(BadImageError, match="empty"):
        cached.load_image(3)
    assert pixels(cached.load_image(2))[0, 0].tolist() == [200, 0, 50]
    skipping = SkipBadImages(cached)
    assert skipping[3] is None and skipping[0] is not None

    reopened = DecodedCache(ImageFolderDataset(folder, image_size=8), cache_dir)
    assert reopened.bad_items == cached.bad_items  # remembered from the sidecar
    # change a file: the fingerprint (size, mtime) changes and the cache is rebuilt
    Image.new("RGB", (20, 10), (1, 2, 3)).save(folder / "b" / "0.png")
    os.utime(folder / "b" / "0.png", ns=(1, 1))
    rebuilt = DecodedCache(ImageFolderDataset(folder, image_size=8), cache_dir)
    assert rebuilt.data_path == cached.data_path
    assert pixels(rebuilt.load_image(2))[0, 0].tolist() == [1, 2, 3]


def test_forwards_augment_and_pickles_for_workers(tmp_path):
    inner = SyntheticParts("train", num_classes=2, images_per_class=2, image_size=32)
    cached = DecodedCache(inner, tmp_path)
    cached.load_image(0)  # opens the memory map
    cached.augment = lambda picture: picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert inner.augment is cached.augment
    flipped, _ = cached[1]
    cached.augment = None
    plain, _ = cached[1]
    assert torch.equal(flipped, plain.flip(-1))
    clone = pickle.loads(pickle.dumps(cached))
    assert clone._array is None  # the map is reopened in the worker, not pickled
    assert np.array_equal(pixels(clone.load_image(1)), pixels(inner.load_image(1)))
    with pytest.raises(IndexError):
        cached.load_image(4)


def test_dataloader_workers_read_the_map_and_skip_bad_items(folder, tmp_path):
    from torch.utils.data import DataLoader

    from protopnet.data import collate_skip_none

    cached = DecodedCache(ImageFolderDataset(folder, image_size=8, mean=(0, 0, 0), std=(1, 1, 1)), tmp_path / "c")
    loader = DataLoader(SkipBadImages(cached), batch_size=2, num_workers=2, collate_fn=collate_skip_none)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [2, 1]  # item 3 (empty file) dropped
    images = torch.cat([b[0] for b in batches])
    assert torch.allclose(images[2, :, 0, 0], torch.tensor([200, 0, 50]) / 255)


# -- MemoryCache: pictures kept in memory for a run ---------------------------------------------

def test_memory_cache_serves_the_same_pixels_and_decodes_each_picture_once():
    from protopnet.data import MemoryCache, PictureMemory

    plain = SyntheticParts("train", num_classes=3, images_per_class=4, image_size=32, seed=5)
    CountingSynthetic.calls = 0
    memory = PictureMemory(10**9)
    kept = MemoryCache(CountingSynthetic("train", num_classes=3, images_per_class=4, image_size=32, seed=5), memory)
    for _ in range(3):  # three epochs
        for i in range(12):
            assert np.array_equal(pixels(kept.load_image(i)), pixels(plain.load_image(i)))
            image, label = kept[i]
            reference, reference_label = plain[i]
            assert torch.equal(image, reference) and label == reference_label
    assert CountingSynthetic.calls == 12 and len(memory) == 12 and memory.used_bytes == 12 * 32 * 32 * 3
    assert kept.classes == plain.classes and kept.targets == plain.targets and kept.split == "train"
    assert kept.path(2) == plain.path(2) and kept.annotation(2) == plain.annotation(2)
    # a reader that draws on the picture it got changes nothing for the next one, whether the
    # picture was decoded for it (the first read) or came from memory
    fresh = MemoryCache(SyntheticParts("train", num_classes=3, images_per_class=4, image_size=32, seed=5), PictureMemory(10**9))
    for _ in range(2):
        picture = fresh.load_image(0)
        picture.paste((255, 0, 0), (0, 0, 32, 32))
        assert np.array_equal(pixels(fresh.load_image(0)), pixels(plain.load_image(0)))


def test_memory_cache_keeps_pictures_within_its_budget_and_decodes_the_rest_every_time():
    from protopnet.data import MemoryCache, PictureMemory

    size = 32 * 32 * 3
    CountingSynthetic.calls = 0
    memory = PictureMemory(5 * size + size // 2)  # room for 5 pictures, not 6
    kept = MemoryCache(CountingSynthetic("train", num_classes=2, images_per_class=4, image_size=32), memory)
    plain = SyntheticParts("train", num_classes=2, images_per_class=4, image_size=32)
    for epoch in range(2):
        for i in range(8):
            assert np.array_equal(pixels(kept.load_image(i)), pixels(plain.load_image(i)))
    assert len(memory) == 5 and memory.used_bytes == 5 * size
    assert CountingSynthetic.calls == 8 + 3  # the 3 pictures past the budget are decoded again
    assert len(PictureMemory(0)) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        PictureMemory(-1)


def test_memory_cache_is_shared_by_the_wrappers_of_one_split_and_applies_their_augmentation():
    from protopnet.data import MemoryCache, PictureMemory

    CountingSynthetic.calls = 0
    memory = PictureMemory(10**9)
    clean = MemoryCache(CountingSynthetic("train", num_classes=2, images_per_class=3, image_size=32), memory)
    flip = lambda picture: picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # noqa: E731
    augmented = MemoryCache(CountingSynthetic("train", num_classes=2, images_per_class=3, image_size=32, augment=flip), memory)
    assert augmented.augment is flip and clean.augment is None
    for i in range(6):
        plain, _ = clean[i]
        flipped, _ = augmented[i]
        assert torch.equal(flipped, plain.flip(-1))
    assert CountingSynthetic.calls == 6  # the augmented set found every picture already kept


def test_memory_cache_does_not_keep_unreadable_pictures(folder):
    from protopnet.data import MemoryCache, PictureMemory

    memory = PictureMemory(10**9)
    kept = MemoryCache(ImageFolderDataset(folder, image_size=8), memory)
    for _ in range(2):  # the empty file fails every time it is read, with the dataset's own error
        with pytest.raises(BadImageError, match="empty"):
            kept.load_image(3)
    assert pixels(kept.load_image(2))[0, 0].tolist() == [200, 0, 50]
    assert len(memory) == 1
    skipping = SkipBadImages(kept)
    assert skipping[3] is None and skipping[0] is not None


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "lots"])
def test_the_memory_cache_budget_must_be_a_finite_number_of_gib(value):
    from protopnet.config import Config, ConfigError

    with pytest.raises(ConfigError, match=r"^data.memory_cache_max_gb: expected"):
        Config.from_dict({"data": {"memory_cache_max_gb": value}})
    assert Config.from_dict({"data": {"memory_cache_max_gb": 0}}).data.memory_cache_max_gb == 0


def test_a_pickled_memory_cache_starts_empty_and_keeps_its_own_pictures():
    """What a spawned DataLoader worker receives: a working cache, without the parent's pictures
    or lock."""
    import copy

    from protopnet.data import MemoryCache, PictureMemory

    kept = MemoryCache(SyntheticParts("train", num_classes=2, images_per_class=2, image_size=32), PictureMemory(10**6))
    kept.load_image(0)
    for clone in (pickle.loads(pickle.dumps(kept)), copy.deepcopy(kept)):
        assert len(clone.memory) == 0 and clone.memory.max_bytes == 10**6
        assert np.array_equal(pixels(clone.load_image(1)), pixels(kept.load_image(1)))
        assert len(clone.memory) == 1 and len(kept.memory) == 2
        kept = MemoryCache(kept.dataset, PictureMemory(10**6))
        kept.load_image(0)
