"""What a checkpoint written beside a training step costs the step, at the writer's priorities.

    python benchmarks/bench_checkpoint_overlap.py [--backbone resnet18] [--image-size 224]
        [--batch-size 16] [--batches 6] [--checkpoint-mb 136] [--writes 3] [--threads 2]
        [--precision auto] [--repeats 4]

A run writes each step's checkpoint on a background thread while the next step trains
(``output.background_checkpoints``). This times ``--batches`` training batches (forward and
backward of ``--backbone``, channels_last, at ``--precision``) three ways, interleaved, median of
``--repeats``: alone; beside ``--writes`` checkpoints of ``--checkpoint-mb`` MiB written as a run
writes them (serialised, hashed, written and fsynced) by a thread at the normal priority; and the
same at the lowest priority, as the trainer's writer runs on Linux. A multithreaded kernel waits
for its slowest thread, so a writer that takes a core from one of them stalls them all.

Prints a markdown table: seconds, and the slowdown over the batches alone. Speed does not depend
on the weights: the backbone is built without pretrained weights.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable

import torch

from protopnet.checkpoint import save_tensors
from protopnet.model.backbones import build_backbone
from protopnet.runtime import autocast, resolve_device, resolve_precision

MODES = ("batches alone", "beside a writer at normal priority", "beside a writer at the lowest priority")


def writer(directory: str, tensors: dict[str, torch.Tensor], writes: int, lowest: bool) -> Callable[[], None]:
    def run() -> None:
        if lowest:
            importlib.import_module("protopnet.train.state")._yield_to_training()
        for k in range(writes):
            save_tensors(os.path.join(directory, f"checkpoint-{k}.safetensors"), tensors)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--checkpoint-mb", type=float, default=136.0, help="MiB per checkpoint (136: resnet18 with its Adam moments)")
    parser.add_argument("--writes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if sys.platform != "linux":
        print("note: only Linux gives a thread a priority of its own; the third row runs at the normal priority here")

    device = resolve_device("cpu")
    precision = resolve_precision(device, args.precision)
    backbone = build_backbone(args.backbone, pretrained=False).module.to(memory_format=torch.channels_last).train()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(memory_format=torch.channels_last)
    floats = max(1, int(args.checkpoint_mb * 2**20 / 4))
    chunks = [min(1 << 20, floats - start) for start in range(0, floats, 1 << 20)]  # 4 MiB tensors, as a model's are many
    tensors = {f"t{i}": torch.randn(n) for i, n in enumerate(chunks)}

    def batches() -> float:
        t0 = time.perf_counter()
        for _ in range(args.batches):
            with autocast(device, precision):
                out = backbone(images)
            out.float().mean().backward()
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="bench_overlap_") as directory:
        batches()  # warm-up: kernels chosen, memory allocated
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for index, mode in enumerate(MODES):  # interleaved: a shared machine's load hits every mode alike
                thread = None
                if index:
                    thread = threading.Thread(target=writer(directory, tensors, args.writes, lowest=index == 2))
                    thread.start()
                times[mode].append(batches())
                if thread is not None:
                    thread.join()

    median = {mode: statistics.median(v) for mode, v in times.items()}
    size = sum(t.numel() for t in tensors.values()) * 4 / 2**20
    print(f"# {args.batches} batches of {args.batch_size} x {args.image_size} px through {args.backbone} (forward + backward, "
          f"{precision}, channels_last, {args.threads} threads) beside {args.writes} checkpoints of {size:.0f} MiB; "
          f"median of {args.repeats}\n")
    print("| batches | s | x alone |")
    print("|---|---:|---:|")
    for mode in MODES:
        print(f"| {mode} | {median[mode]:.2f} | {median[mode] / median[MODES[0]]:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
