"""Decoded-picture caches: epoch time with and without them on a JPEG ImageFolder.

    python benchmarks/bench_cache.py [--images 300] [--width 500] [--height 375] [--image-size 224]
        [--backbone resnet18] [--batch-size 16] [--workers 0] [--threads 2] [--repeats 2]

Writes photo-like random JPEGs (smooth colour fields plus grain, ``--width`` x ``--height``, 10
classes) to a temporary ImageFolder tree, then measures three ways of reading them (after one
untimed epoch of each, interleaved, median of ``--repeats``): decoded every epoch
(``data.memory_cache_max_gb: 0``), kept in memory after the first epoch (the default with
``num_workers: 0``) and from the memory-mapped file (``data.cache: true``):

* the file cache's build: every picture decoded and resized once into the memmap (one-off);
* a data epoch: every training image through the DataLoader (read, decode, resize, augment,
  normalise) — the part the cache shrinks;
* a training epoch: a joint epoch of a ProtoPNet on ``--backbone`` (``none`` skips it),
  the data epoch plus the model's forward and backward.

Prints a markdown table and the ratios (decoded every epoch / cached). Speed does not depend on the weights:
the backbone is built without pretrained weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from protopnet.config import Config
from protopnet.data import DecodedCache, ImageFolderDataset
from protopnet.train import Trainer
from protopnet.train.loader import IndexedSubset, make_loader
from protopnet.train.stages import Step


def write_jpegs(root: Path, images: int, classes: int, width: int, height: int, seed: int = 0) -> None:
    """``images`` photo-like JPEGs under ``root/train/class_k/`` (quality 90)."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 255, size=(height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


MODES = {  # name -> (data.cache, data.memory_cache_max_gb)
    "decoded every epoch": (False, 0.0),
    "kept in memory": (False, 2.0),
    "memory-mapped file": (True, 0.0),
}


def make_config(root: Path, work: Path, args: argparse.Namespace, cache: bool, memory_gb: float) -> Config:
    return Config.from_dict(
        {
            "model": {"backbone": args.backbone if args.backbone != "none" else "tiny_cnn", "pretrained": False,
                      "prototypes_per_class": 10, "prototype_dim": 128},
            "data": {"root": str(root), "image_size": args.image_size, "augment": True, "val_fraction": 0.0,
                     "batch_size": args.batch_size, "num_workers": args.workers, "cache": cache,
                     "cache_dir": str(work / "cache"), "memory_cache_max_gb": memory_gb},
            "schedule": {"epochs": 1, "warm_epochs": 0, "push_start": 5, "push_at_end": False},
            "run": {"seed": 0, "device": "cpu"},
            "output": {"dir": str(work / "run")},
        }
    )


def data_epoch(trainer: Trainer, batch_size: int, workers: int) -> float:
    subset = IndexedSubset(trainer.data.train, trainer.data.training_items)
    loader = make_loader(subset, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0), num_workers=workers)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def train_epoch(trainer: Trainer) -> float:
    t0 = time.perf_counter()
    trainer._train_epoch(Step(0, "joint", 0))
    return time.perf_counter() - t0


def warm_up(trainer: Trainer, args: argparse.Namespace) -> None:
    """One untimed epoch of each kind: kernels chosen for every batch shape, memory allocated,
    files in the page cache (the timed epochs measure decoding, not the disk)."""
    data_epoch(trainer, args.batch_size, args.workers)
    if args.backbone != "none":
        train_epoch(trainer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbone", default="resnet18", help="a backbone name, or none for the data epoch only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        work = Path(tmp)
        root = work / "images"
        t0 = time.perf_counter()
        write_jpegs(root, args.images, args.classes, args.width, args.height)
        written = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in root.rglob("*.jpg")) / 2**20

        t0 = time.perf_counter()
        DecodedCache(ImageFolderDataset(root / "train", image_size=args.image_size), work / "cache" / "train")
        build = time.perf_counter() - t0

        trainers = {name: Trainer(make_config(root, work, args, cache, memory_gb), work / f"run-{index}")
                    for index, (name, (cache, memory_gb)) in enumerate(MODES.items())}
        for trainer in trainers.values():  # warm-up: kernels picked for these shapes, memory allocated, pictures kept
            warm_up(trainer, args)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for name, trainer in trainers.items():  # interleaved: a shared machine's load hits every mode alike
                times.setdefault((name, "data"), []).append(data_epoch(trainer, args.batch_size, args.workers))
                if args.backbone != "none":
                    times.setdefault((name, "train"), []).append(train_epoch(trainer))

    median = {k: statistics.median(v) for k, v in times.items()}
    n = args.images
    print(f"# Decoded-picture caches: {n} JPEGs of {args.width}x{args.height} ({size_mb:.1f} MiB, written in {written:.1f} s) "
          f"-> {args.image_size} px, batch {args.batch_size}, {args.workers} workers, {args.threads} threads, "
          f"backbone {args.backbone}, median of {args.repeats}\n")
    columns = ["data epoch"] + (["training epoch"] if args.backbone != "none" else [])
    print("| pictures | " + " | ".join(f"{c} (s) | {c} (img/s)" for c in columns) + " |")
    print("|---|" + "---|---|" * len(columns))
    for name in MODES:
        cells = []
        for kind in ("data", "train")[: len(columns)]:
            cells += [f"{median[(name, kind)]:.2f}", f"{n / median[(name, kind)]:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nfile cache build (one-off, decode + resize every picture): {build:.2f} s")
    if args.workers:
        print("(with workers the memory cache is off: each worker would keep its own copy)")
    for kind, label in (("data", "data epoch"), ("train", "training epoch"))[: len(columns)]:
        for name in list(MODES)[1:]:
            print(f"{label}: decoded every epoch / {name} = {median[('decoded every epoch', kind)] / median[(name, kind)]:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
