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


# -- a tiny run: config and data (test_train, test_model_card) -------------------------------------

def tiny_config(tmp_path, optim=None, **schedule):
    """A four-epoch run of a tiny_cnn on 32-px pictures (warm-up, joint, push, last layer)."""
    from protopnet.config import Config

    config = Config.from_dict(
        {
            "model": {"backbone": "tiny_cnn", "pretrained": False, "prototypes_per_class": 2, "prototype_dim": 8},
            "data": {"image_size": 32, "batch_size": 6, "test_batch_size": 8, "push_batch_size": 5, "augment": False},
            "schedule": {"epochs": 4, "warm_epochs": 1, "push_start": 1, "push_every": 2, "last_layer_iterations": 3, **schedule},
            "optim": {"warm_add_on_lr": 1e-2, "warm_prototypes_lr": 1e-2, "add_on_lr": 1e-2, "prototypes_lr": 1e-2, "backbone_lr": 1e-3, "last_layer_lr": 1e-2, **(optim or {})},
            "run": {"seed": 3, "device": "cpu"},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    return config


def tiny_data():
    """The RunData of :func:`tiny_config`: 24 coloured training pictures (3 for validation), 12 test."""
    from protopnet.train import RunData

    train = ColourDataset(num_classes=3, per_class=8, seed=0)
    test = ColourDataset(num_classes=3, per_class=4, seed=1)
    val = [0, 8, 16]
    return RunData(train, train, test, [i for i in range(len(train)) if i not in val], val)


# -- tiny CUB-200-2011 trees on disk --------------------------------------------------------------

CUB_CLASSES = {9: "009.Brewer_Blackbird", 2: "002.Laysan_Albatross", 5: "005.Crested_Auklet"}  # listed out of order


def make_cub(root: Path, per_class_train: int = 2, per_class_test: int = 1, size: tuple[int, int] = (48, 40)) -> Path:
    """A CUB-200-2011 tree: every picture is blue noise with a red-noise box (the bird's box)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = {name: [] for name in ("images", "labels", "split", "boxes")}
    image_id = 10
    for class_id, name in CUB_CLASSES.items():
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class_train + per_class_test):
            image_id += 3  # ids neither from 1 nor contiguous
            w, h = size
            x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
            bw, bh = int(rng.integers(w // 3, w - x0)), int(rng.integers(h // 3, h - y0))
            array = np.zeros((h, w, 3), np.uint8)
            array[..., 2] = rng.integers(180, 256, size=(h, w))
            array[..., :2] = rng.integers(0, 60, size=(h, w, 2))
            box = array[y0 : y0 + bh, x0 : x0 + bw]
            box[..., 0] = rng.integers(180, 256, size=box.shape[:2])
            box[..., 1:] = rng.integers(0, 60, size=box.shape[:2] + (2,))
            rel = f"{name}/{name.split('.')[1]}_{image_id:04d}.png"
            Image.fromarray(array).save(root / "images" / rel)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {class_id}")
            lines["split"].append(f"{image_id} {int(k < per_class_train)}")
            lines["boxes"].append(f"{image_id} {x0}.0 {y0}.0 {bw}.0 {bh}.0")
    (root / "classes.txt").write_text("".join(f"{cid} {name}\n" for cid, name in CUB_CLASSES.items()))
    for name, file in (("images", "images.txt"), ("labels", "image_class_labels.txt"),
                       ("split", "train_test_split.txt"), ("boxes", "bounding_boxes.txt")):
        (root / file).write_text("\n".join(lines[name]) + "\n")
    return root


BLUE, RED, GREEN = (0, 0, 255), (255, 0, 0), (0, 255, 0)

# A tiny CUB tree: class ids 3, 7, 12 (listed out of order), image ids 7, 20, 33, 105.
FILES = {
    "classes.txt": "7 007.Parakeet_Auklet\n3 003.Sooty_Albatross\n12 012.Yellow_headed_Blackbird\n",
    "images.txt": (
        "105 012.Yellow_headed_Blackbird/c.png\n20 003.Sooty_Albatross/b.png\n"
        "33 007.Parakeet_Auklet/d.png\n7 003.Sooty_Albatross/a.png\n"
    ),
    "image_class_labels.txt": "20 3\n105 12\n33 7\n7 3\n999 7\n",  # 999: not in images.txt, ignored
    "train_test_split.txt": "7 1\n20 1\n33 0\n105 1\n",
    "bounding_boxes.txt": "7 -5.0 10.0 50.0 100.0\n20 10.0 20.0 40.0 30.0\n33 0 0 30 30\n105 1.5 1.25 7.0 7.5\n",
    "parts/parts.txt": "1 back\n2 left eye\n3 tail\n",
    "parts/part_locs.txt": (
        "20 1 30.0 35.0 1\n20 2 12.0 21.0 1\n20 3 80.0 70.0 1\n"  # part 3 lies outside the box
        "7 1 9.0 25.0 1\n7 2 0.0 0.0 0\n7 3 0.0 0.0 0\n"
        "33 1 5 5 1\n33 2 0 0 0\n33 3 0 0 0\n105 1 0 0 0\n105 2 0 0 0\n105 3 0 0 0\n"
    ),
}


def write_tree(root: Path, files: dict[str, str | bytes] = FILES, images: bool = True) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    (root / "images").mkdir(exist_ok=True)
    if images:
        for folder in ("003.Sooty_Albatross", "007.Parakeet_Auklet", "012.Yellow_headed_Blackbird"):
            (root / "images" / folder).mkdir(exist_ok=True)
        # b.png (id 20): 100 x 80, blue, red exactly inside its box, a green 3x3 mark around part 1 (30, 35)
        b = np.zeros((80, 100, 3), np.uint8)
        b[:] = BLUE
        b[20:50, 10:50] = RED
        b[34:37, 29:32] = GREEN
        Image.fromarray(b).save(root / "images/003.Sooty_Albatross/b.png")
        Image.new("RGB", (60, 40), RED).save(root / "images/003.Sooty_Albatross/a.png")
        Image.new("RGB", (40, 40), BLUE).save(root / "images/007.Parakeet_Auklet/d.png")
        Image.new("RGB", (10, 10), GREEN).save(root / "images/012.Yellow_headed_Blackbird/c.png")
    return root
