"""Export figures: time to export, file size, agreement with PyTorch and inference latency of
PyTorch eager vs. onnxruntime vs. TorchScript, on random weights (accuracy does not matter here).

    python benchmarks/bench_export.py                          # tiny_cnn at 64 px
    python benchmarks/bench_export.py --backbone resnet34 --size 224 --classes 200 --per-class 10

Prints one line per format; never asserts timings.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from protopnet import ProtoPNet
from protopnet.export import check_export, export_onnx, export_torchscript


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny_cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ProtoPNet(backbone=args.backbone, pretrained=False, num_classes=args.classes, prototypes_per_class=args.per_class, prototype_dim=args.dim)
    model.image_size = args.size
    model.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    print(f"{args.backbone} @ {args.size}px, M={model.num_prototypes}, K={args.classes}, batch {args.batch}, {args.threads} threads")
    with torch.no_grad():
        eager = timed(lambda: model(x), args.repeat)
    print(f"pytorch eager      : {1000 * eager:8.1f} ms/batch")
    with tempfile.TemporaryDirectory() as tmp:
        for name, export in (("onnx", export_onnx), ("torchscript", export_torchscript)):
            path = Path(tmp) / f"model.{name}"
            start = time.perf_counter()
            export(model, path)
            seconds = time.perf_counter() - start
            check = check_export(model, path, name, batch_sizes=(1, args.batch))
            worst = check.max_abs_diff
            if name == "onnx":
                import onnxruntime as ort

                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                feed = {"images": x.numpy()}
                latency = timed(lambda: session.run(None, feed), args.repeat)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    module = torch.jit.load(str(path))
                with torch.no_grad():
                    latency = timed(lambda: module(x), args.repeat)
            print(
                f"{name:<19}: {1000 * latency:8.1f} ms/batch; export {seconds:.2f} s; {path.stat().st_size / 1e6:.2f} MB; "
                f"max |diff| logits {worst['logits']:.1e}, similarities {worst['similarities']:.1e}, distances {worst['distances']:.1e}; within tolerance: {check.ok}"
            )


if __name__ == "__main__":
    main()
