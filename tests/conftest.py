"""Everything the test files share (and only here: no test file imports another): tiny models
and tiny in-memory datasets, so engine tests need no files; hand-built colour models; the
torchrun pair of runs; checks of a run's output after an interruption; headless Chromium.

pytest puts ``tests/`` on ``sys.path`` for this file, so ``from conftest import ...`` works from
every folder below it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from PIL import Image
from torch import nn

from protopnet import ProtoPNet, load_model
from protopnet.checkpoint import load_tensors
from protopnet.config import load_config
from protopnet.data.base import Annotation, ProtoDataset
from protopnet.train import train

ROOT = Path(__file__).resolve().parents[1]  # the repository: src/, configs/, benchmarks/, tests/
SHARED = ROOT.parent / "shared"


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def class_identity(classes: list[int], k: int) -> torch.Tensor:
    """(M, K) one-hot prototype classes: prototype ``j`` belongs to class ``classes[j]``."""
    eye = torch.zeros(len(classes), k)
    eye[torch.arange(len(classes)), torch.tensor(classes)] = 1
    return eye


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


# -- hand-built colour squares: the interpretability metrics' cases of known answer ----------

COLOURS = [(230, 40, 40), (40, 200, 40), (40, 80, 230)]
GREY = (128, 128, 128)


def normalised(colour) -> torch.Tensor:
    return (torch.tensor(colour, dtype=torch.float32) / 255 - 0.5) / 0.25


class Squares(ProtoDataset):
    """32-px pictures: near-grey noise and one 8 x 8 square of the class colour, aligned to the
    4-pixel cells (the part; ``part_box``). ``decoy``: a second identical square elsewhere, not
    annotated. ``cub``: CUB-style part points instead of a box — ``head`` at the square's centre
    (always visible) and ``tail`` at the opposite corner of the picture (visible in even items)."""

    def __init__(self, per_class: int = 6, decoy: bool = False, cub: bool = False, seed: int = 0, num_classes: int = 3):
        super().__init__(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        self.classes = [f"square_{k}" for k in range(num_classes)]
        self.targets = [i % num_classes for i in range(num_classes * per_class)]
        self.decoy, self.cub, self.seed = decoy, cub, seed

    def __len__(self) -> int:
        return len(self.targets)

    def squares(self, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
        rng = np.random.default_rng([self.seed, index])
        while True:
            a, b = rng.integers(0, 7, size=2) * 4, rng.integers(0, 7, size=2) * 4
            if not self.decoy or np.abs(a - b).max() >= 16:
                return (int(a[0]), int(a[1])), (int(b[0]), int(b[1]))

    def load_image(self, index: int) -> Image.Image:
        array = np.random.default_rng([self.seed, index, 1]).integers(120, 137, size=(32, 32, 3)).astype(np.uint8)
        (x, y), (dx, dy) = self.squares(index)
        array[y : y + 8, x : x + 8] = COLOURS[self.targets[index]]
        if self.decoy:
            array[dy : dy + 8, dx : dx + 8] = COLOURS[self.targets[index]]
        return Image.fromarray(array)

    def path(self, index: int) -> str:
        return f"squares://{self.seed}/{index}"

    def annotation(self, index: int) -> Annotation:
        (x, y), _ = self.squares(index)
        if self.cub:
            parts = {"head": (x + 4.0, y + 4.0)}
            if index % 2 == 0:
                parts["tail"] = (31.0 - (x + 4.0), 31.0 - (y + 4.0))
            return Annotation(parts=parts)
        return Annotation(part_box=[float(x), float(y), float(x + 8), float(y + 8)])


def colour_model(colours, classes, num_classes: int = 3) -> ProtoPNet:
    """A ProtoPNet whose latent map is the 4 x 4-cell mean colour and whose prototypes are colours."""
    model = ProtoPNet(backbone="tiny_cnn", num_classes=num_classes, prototype_dim=3, pretrained=False, prototype_classes=classes)
    model.features = nn.AvgPool2d(4)
    model.add_on = nn.Identity()
    model.prototypes = nn.Parameter(torch.stack([normalised(c) for c in colours]).view(len(colours), 3, 1, 1))
    model.image_size = 32
    return model.eval()


# -- the same config trained by torchrun (two ranks) and in this process --------------------

# Installed in the torchrun ranks through PYTHONPATH: on ranks other than 0 it records each write
# (open for writing, mkdir, rename, remove) under PROTOPNET_TEST_WATCH into PROTOPNET_TEST_AUDIT.
SITECUSTOMIZE = textwrap.dedent(
    '''
    import atexit, os, sys
    _watch = os.environ.get("PROTOPNET_TEST_WATCH")
    _log = os.environ.get("PROTOPNET_TEST_AUDIT")
    if _watch and _log and os.environ.get("RANK", "0") != "0":
        _watch = os.path.realpath(_watch)
        _seen, _busy = [], [False]
        _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _inside(path):
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            if not isinstance(path, str):
                return False
            return os.path.realpath(path).startswith(_watch)

        def _hook(event, args):
            if _busy[0]:
                return
            if event == "open":
                path, mode, flags = args
                writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & _write_flags)
                if writes and _inside(path):
                    _seen.append(f"open {path} {mode} {flags}")
            elif event == "os.mkdir":
                if _inside(args[0]) and not os.path.exists(args[0]):  # exist_ok=True tries anyway
                    _seen.append(f"{event} {args[0]}")
            elif event in ("os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"):
                if _inside(args[0]):
                    _seen.append(f"{event} {args[0]}")
            elif event == "os.rename":
                if _inside(args[0]) or _inside(args[1]):
                    _seen.append(f"{event} {args[0]} -> {args[1]}")

        def _dump():
            _busy[0] = True
            with open(_log + "." + os.environ["RANK"], "w") as handle:
                handle.write("\\n".join(_seen))

        sys.addaudithook(_hook)
        atexit.register(_dump)
    '''
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def train_both(tmp_path: Path, config_text: str) -> tuple[Path, Path, list[str]]:
    """Train the config with torchrun (2 ranks) and, meanwhile, in this process."""
    path = tmp_path / "config.yaml"
    path.write_text(config_text)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    audit = tmp_path / "audit.log"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(hooks), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PROTOPNET_TEST_WATCH=str(ddp), PROTOPNET_TEST_AUDIT=str(audit), OMP_NUM_THREADS="1",
    )
    command = [*torchrun(), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "protopnet", "-q",
               "train", str(path), "--out", str(ddp)]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as ranks:
        try:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                train(load_config(path), single)
            finally:
                torch.set_num_threads(threads)
            stdout, stderr = ranks.communicate(timeout=300)
        finally:
            if ranks.poll() is None:
                ranks.kill()
    assert ranks.returncode == 0, stdout[-3000:] + stderr[-6000:]
    summary = json.loads(stdout.strip().splitlines()[-1])  # rank 0 prints one summary line
    assert summary["model"] == str(ddp / "model")
    log = Path(f"{audit}.1")
    assert log.exists(), "the audit hook did not run on rank 1"
    writes = [line for line in log.read_text().splitlines() if line]
    return single, ddp, writes


# -- a run's output directory after an interruption ----------------------------------------

def assert_whole(out: Path) -> None:
    """Every checkpoint and the model directory on disk is complete and passes its checksums."""
    for step in sorted((out / "checkpoints").glob("step-*")):
        state = json.loads((step / "state.json").read_text())
        load_tensors(step / "model.safetensors", state["model_sha256"])
        load_tensors(step / "state.safetensors", state["state_sha256"])
        assert state["next_step"] == int(step.name.split("-")[1]) + 1
    if (out / "model").exists():
        load_model(out / "model")  # checks model.safetensors against model.json's sha256
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        [json.loads(line) for line in metrics.read_text().splitlines()]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for d in (out, out / "checkpoints") if d.is_dir() for p in d.iterdir() if p.name.startswith("."))


# -- headless Chromium (the browser tests of the reports and of serve) --------------------

CHROME_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="protopnet-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1280,1000")
    options.binary_location = chromium
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 40, 6000))
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    keep = os.environ.get("PROTOPNET_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(keep) / path.name)
    return path


# -- weight averaging (optim.ema_decay) -------------------------------------------------------

def record_trajectory(model, counted=None):
    """After every optimiser step (of the optimisers in ``counted``, or of any), a copy of every
    parameter of ``model``: the list it returns fills as training runs."""
    snapshots: list[list[torch.Tensor]] = []

    def hook(optimizer, args, kwargs):
        if counted is None or any(optimizer is o for o in counted()):
            snapshots.append([p.detach().clone() for p in model.parameters()])

    handle = register_optimizer_step_post_hook(hook)
    return snapshots, handle


def moving_average(snapshots, decay):
    """The exponential moving average of a weight trajectory, written out."""
    average = [t.clone() for t in snapshots[0]]
    for weights in snapshots[1:]:
        average = [decay * a + (1 - decay) * w for a, w in zip(average, weights)]
    return average
