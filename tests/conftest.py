"""Shared fixtures: tiny models and tiny in-memory datasets, so engine tests need no files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protopnet.data.base import Annotation, ProtoDataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class ColourDataset(ProtoDataset):
    """Noise pictures with one bright square whose colour is the class: learnable in seconds."""

    COLOURS = [(230, 40, 40), (40, 200, 40), (40, 80, 230), (230, 200, 30), (200, 40, 200), (40, 210, 210)]

    def __init__(self, num_classes: int = 3, per_class: int = 6, image_size: int = 32, seed: int = 0, **kwargs):
        super().__init__(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **kwargs)
        self.classes = [f"colour_{k}" for k in range(num_classes)]
        self.targets = [k for k in range(num_classes) for _ in range(per_class)]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.targets)

    def _square(self, index: int) -> tuple[int, int, int]:
        rng = np.random.default_rng([self.seed, index, 1])
        side = max(4, self.image_size // 4)
        x, y = rng.integers(0, self.image_size - side, size=2)
        return int(x), int(y), side

    def load_image(self, index: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        array = rng.integers(60, 140, size=(s, s, 3), dtype=np.uint8)
        x, y, side = self._square(index)
        array[y : y + side, x : x + side] = self.COLOURS[self.targets[index] % len(self.COLOURS)]
        return Image.fromarray(array)

    def path(self, index: int) -> str:
        return f"colour://{self.seed}/{index}"

    def annotation(self, index: int) -> Annotation:
        x, y, side = self._square(index)
        return Annotation(part_box=[x, y, x + side, y + side])


class MarkedNoiseDataset(ProtoDataset):
    """Noise pictures (the full 0-255 range) with an 8-pixel mark whose colour and column are the
    class: rows ``mark_row`` to ``mark_row + 8``, columns ``4 + 6k`` to ``12 + 6k`` for class k."""

    COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (200, 200, 30)]

    def __init__(self, n: int = 12, num_classes: int = 3, size: int = 32, seed: int = 0, mark_row: int = 8) -> None:
        super().__init__(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        self.classes = [f"c{k}" for k in range(num_classes)]
        self.targets = [i % num_classes for i in range(n)]
        self.seed, self.mark_row = seed, mark_row

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, index])
        array = rng.integers(0, 255, size=(self.image_size, self.image_size, 3), dtype=np.uint8)
        k = self.targets[index]
        array[self.mark_row : self.mark_row + 8, 4 + 6 * k : 12 + 6 * k] = self.COLOURS[k % len(self.COLOURS)]
        return Image.fromarray(array)

    def path(self, index: int) -> str:
        return f"noise://{self.seed}/{index}"


@pytest.fixture
def colour_data():
    return ColourDataset()


def write_folder(root: Path, data: ProtoDataset, split: str) -> None:
    """Save ``data``'s pictures as an ImageFolder split: ``root/split/<class>/NNN.png``."""
    for i in range(len(data)):
        folder = root / split / data.classes[data.targets[i]]
        folder.mkdir(parents=True, exist_ok=True)
        data.load_image(i).save(folder / f"{i:03d}.png")


def tiny_model(num_classes: int = 3, prototypes_per_class: int = 2, prototype_dim: int = 8, prototype_size=(1, 1), seed: int = 0, **kwargs):
    from protopnet import ProtoPNet

    torch.manual_seed(seed)
    model = ProtoPNet(
        backbone="tiny_cnn", num_classes=num_classes, prototypes_per_class=prototypes_per_class,
        prototype_dim=prototype_dim, prototype_size=prototype_size, pretrained=False, **kwargs,
    )
    model.image_size = 32
    return model


@pytest.fixture
def torch_home(tmp_path_factory):
    """A TORCH_HOME holding the shared MobileNetV2 checkpoint, or skip."""
    weights = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
    if not weights.is_file():
        pytest.skip(f"{weights} is absent (the shared pretrained weights are only on development machines)")
    home = tmp_path_factory.mktemp("torch_home")
    target = home / "hub" / "checkpoints"
    target.mkdir(parents=True)
    (target / weights.name).symlink_to(weights)
    return home


@pytest.fixture(scope="module")
def one_thread():
    """One PyTorch thread for a module: tiny models train many times faster so on a shared
    machine; the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
