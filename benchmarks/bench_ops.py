"""Where bf16 pays on this machine: a backbone's convolutions, forward and backward, by kind.

    python benchmarks/bench_ops.py [--backbones mobilenet_v2,resnet18] [--size 224] [--batch 32]
        [--threads 2] [--repeats 3]

For each backbone (random weights: speed does not depend on them), one forward and backward pass
of a (batch, 3, size, size) batch runs under ``torch.profiler`` in each arithmetic — fp32, fp32
channels_last, bf16 channels_last (autocast, as ``run.precision: bf16`` trains) — and the
profiler's own time of the convolutions is summed by kind: depthwise (one input channel per
group), pointwise (1 x 1) and spatial (k x k, k > 1). The backward column is
``aten::convolution_backward`` (the gradients of input and weight); the whole pass is wall time.
Medians of ``--repeats`` passes after one untimed pass. A kind whose bf16 backward is no faster
than its fp32 backward bounds what bf16 training can gain on this CPU, whatever the framework
around it does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from protopnet.model.backbones import build_backbone

ARITHMETIC = {  # name -> (channels_last, autocast bf16)
    "fp32": (False, False),
    "fp32 CL": (True, False),
    "bf16 CL": (True, True),
}
KINDS = ("depthwise", "pointwise", "spatial")


def kind_of(weight_shape: list[int]) -> str:
    """depthwise / pointwise / spatial from a convolution weight's shape (O, I / groups, kh, kw)."""
    _, per_group, kh, kw = weight_shape
    if kh == kw == 1:
        return "pointwise"
    if per_group == 1:
        return "depthwise"
    return "spatial"


def one_pass(features: torch.nn.Module, images: torch.Tensor, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = features(images)
    out.float().mean().backward()
    for p in features.parameters():
        p.grad = None


def measure(features: torch.nn.Module, images: torch.Tensor, channels_last: bool, bf16: bool, repeats: int) -> dict[str, Any]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    features = features.to(memory_format=fmt).train()
    images = images.to(memory_format=fmt)
    one_pass(features, images, bf16)  # untimed: kernels picked, memory allocated
    walls, sums = [], {f"{k} {d}": [] for k in KINDS for d in ("forward", "backward")}
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            one_pass(features, images, bf16)
            walls.append(time.perf_counter() - t0)
        totals = {key: 0.0 for key in sums}
        for event in prof.events():
            if event.name not in ("aten::convolution", "aten::convolution_backward"):
                continue
            shapes = event.input_shapes
            weight = shapes[2] if event.name == "aten::convolution_backward" else shapes[1]
            if len(weight) != 4:
                continue
            direction = "backward" if event.name == "aten::convolution_backward" else "forward"
            # convolution's total includes its backend kernel; convolution_backward is the kernel
            seconds = (event.cpu_time_total if direction == "forward" else event.self_cpu_time_total) / 1e6
            totals[f"{kind_of(weight)} {direction}"] += seconds
        for key, value in totals.items():
            sums[key].append(value)
    return {"pass": statistics.median(walls), **{k: statistics.median(v) for k, v in sums.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="mobilenet_v2,resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size)
    print(f"# Convolutions by kind, forward and backward — batch {args.batch} x {args.size} px, {args.threads} threads, "
          f"median of {args.repeats}; ms, and in brackets the speed-up over fp32\n")
    print("| backbone | kind | " + " | ".join(f"{a} fwd | {a} bwd" for a in ARITHMETIC) + " |")
    print("|---|---|" + "---:|" * (2 * len(ARITHMETIC)))
    for name in args.backbones.split(","):
        features = build_backbone(name.strip(), pretrained=False).module
        results = {a: measure(features, images, cl, bf16, args.repeats) for a, (cl, bf16) in ARITHMETIC.items()}
        base = results["fp32"]
        for row in (*KINDS, "whole pass"):
            cells = []
            for a in ARITHMETIC:
                for direction in ("forward", "backward"):
                    if row == "whole pass":
                        if direction == "backward":
                            cells.append("")
                            continue
                        value, ref = results[a]["pass"], base["pass"]
                    else:
                        value, ref = results[a][f"{row} {direction}"], base[f"{row} {direction}"]
                    cells.append(f"{value * 1e3:.0f} ({ref / value:.2f}x)" if value > 0 else "-")
            label = "whole forward + backward (wall)" if row == "whole pass" else row
            if any(c not in ("", "-") for c in cells):
                print(f"| {name} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
