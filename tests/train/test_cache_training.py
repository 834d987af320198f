"""Training through the decoded-image caches (``data.cache: true``, on disk; the memory cache,
the default with ``num_workers: 0``) trains exactly the model that decoding the JPEG files every
time trains, and a cached picture is not decoded again."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from protopnet.config import Config
from protopnet.data.folder import ImageFolderDataset
from protopnet.train import Trainer


def _jpeg_tree(root, classes: int = 3, per_class: int = 5, seed: int = 0) -> None:
    """Photos-like JPEGs (smooth colour fields, a class-coloured blob), not square, not 32 px."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", 2)):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                low = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
                picture = Image.fromarray(low).resize((80, 60), Image.Resampling.BICUBIC)
                array = np.asarray(picture).copy()
                y, x = rng.integers(0, 40), rng.integers(0, 60)
                array[y : y + 20, x : x + 20] = [(220, 30, 30), (30, 200, 30), (30, 60, 220)][k]
                Image.fromarray(array).save(folder / f"{i}.jpg", quality=85)


def _config(tmp_path, root, cache: bool, memory_gb: float = 0.0) -> Config:
    return Config.from_dict(
        {
            "model": {"backbone": "tiny_cnn", "pretrained": False, "prototypes_per_class": 2, "prototype_dim": 8},
            "data": {"root": str(root), "image_size": 32, "augment": True, "val_fraction": 0.2, "batch_size": 4,
                     "test_batch_size": 8, "push_batch_size": 5, "cache": cache, "cache_dir": str(tmp_path / "cache"),
                     "memory_cache_max_gb": memory_gb},
            "schedule": {"epochs": 2, "warm_epochs": 1, "push_start": 1, "push_every": 1, "last_layer_iterations": 2},
            "run": {"seed": 4, "device": "cpu"},
            "output": {"dir": str(tmp_path / "unused")},
        }
    )


def test_training_with_the_cache_gives_the_same_weights_and_decodes_no_file(tmp_path, monkeypatch):
    root = tmp_path / "images"
    _jpeg_tree(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = Trainer(_config(tmp_path, root, cache=False), tmp_path / "plain")
        plain_result = plain.fit()

        cached = Trainer(_config(tmp_path, root, cache=True), tmp_path / "cached")  # builds the cache
        assert [p.suffix for p in (tmp_path / "cache").rglob("*")].count(".u8") == 2  # train, test

        def decoded(self, index):
            raise AssertionError(f"decoded {self.files[index]} although it is in the cache")

        monkeypatch.setattr(ImageFolderDataset, "load_image", decoded)
        cached_result = cached.fit()
    finally:
        torch.set_num_threads(threads)

    a, b = plain.model.state_dict(), cached.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit: the same pixels, the same augmentation draws
    assert [p["dataset_index"] for p in plain.model.provenance] == [p["dataset_index"] for p in cached.model.provenance]
    assert plain_result.test == cached_result.test
    assert [r.get("loss") for r in plain_result.metrics] == [r.get("loss") for r in cached_result.metrics]


def test_the_memory_cache_trains_the_same_weights_decoding_each_picture_once(tmp_path, monkeypatch):
    from collections import Counter

    from protopnet.data import MemoryCache

    root = tmp_path / "images"
    _jpeg_tree(root)
    decoded: Counter[str] = Counter()
    real_load = ImageFolderDataset.load_image

    def counting(self, index):
        decoded[self.files[index]] += 1
        return real_load(self, index)

    monkeypatch.setattr(ImageFolderDataset, "load_image", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = Trainer(_config(tmp_path, root, cache=False, memory_gb=0.0), tmp_path / "plain")
        assert not isinstance(plain.data.clean, MemoryCache)
        plain_result = plain.fit()
        plain_decoded, decoded = dict(decoded), Counter()
        monkeypatch.setattr(ImageFolderDataset, "load_image", counting)  # the same function, a fresh counter
        kept = Trainer(_config(tmp_path, root, cache=False, memory_gb=2.0), tmp_path / "kept")
        assert isinstance(kept.data.clean, MemoryCache) and isinstance(kept.data.train, MemoryCache)
        assert kept.data.clean.memory is kept.data.train.memory  # one copy of each picture
        assert not isinstance(kept.data.test, MemoryCache)  # read once, at the end
        kept_result = kept.fit()
    finally:
        torch.set_num_threads(threads)

    a, b = plain.model.state_dict(), kept.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit: the same pixels, the same augmentation draws
    assert plain_result.test == kept_result.test
    assert [r.get("loss") for r in plain_result.metrics] == [r.get("loss") for r in kept_result.metrics]
    train_files = [f for f in plain_decoded if "/train/" in f]
    assert len(train_files) == 15 and min(plain_decoded[f] for f in train_files) >= 3  # every epoch, push, validation
    assert {f: decoded[f] for f in train_files} == {f: 1 for f in train_files}
    assert {f: n for f, n in decoded.items() if "/test/" in f} == {f: n for f, n in plain_decoded.items() if "/test/" in f}
