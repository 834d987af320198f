"""How much does explaining cost compared with classifying?

Prints, for one model configuration:

* forward: median time of ``model(x)`` on one image (no grad, eval mode);
* explain: median time of ``protopnet.explain(model, x)`` (the same single forward pass, the score
  sheets of the top classes and the top prototypes; boxes are computed when first asked for),
  and its ratio to the forward pass (the target is <= 1.5);
* boxes: the extra time to compute the boxes of every listed prototype (what ``to_json`` needs);
* render: writing the HTML report with its pictures and the JSON;
* analyze: images per second of the nearest-patch scan (``nearest_patches``) over an in-memory
  dataset, next to a plain forward-only pass over the same loader.

    python benchmarks/bench_explain.py                                  # ResNet-34, 224 px, 200 x 10 prototypes
    python benchmarks/bench_explain.py --backbone tiny_cnn --image-size 64 --classes 10 --per-class 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import protopnet
from protopnet.data.base import ProtoDataset
from protopnet.explain import nearest_patches, write_explanation_report
from protopnet.train.loader import IndexedSubset, make_loader


class Pictures(ProtoDataset):
    """``n`` noise pictures (a pool of 16, reused) with labels ``i % classes``."""

    def __init__(self, n: int, classes: int, size: int) -> None:
        super().__init__(image_size=size)
        rng = np.random.default_rng(0)
        self.pool = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(16)]
        self.classes = [f"class_{k}" for k in range(classes)]
        self.targets = [i % classes for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        return self.pool[index % len(self.pool)]


CLOCK = time.perf_counter


def interleaved(fns: dict, repeats: int) -> dict:
    """Median time of each function, the functions run in turn (A B C A B C ...) so that a
    change in machine load affects them alike (the CPUs here may be shared)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=128, help="images scanned by the analyze benchmark")
    parser.add_argument("--scan-repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-time", action="store_true", help="time with this process's CPU time instead of wall time (steadier on a shared machine; use with --threads 1)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = protopnet.ProtoPNet(backbone=args.backbone, pretrained=False, num_classes=args.classes, prototypes_per_class=args.per_class, prototype_dim=args.dim)
    model.image_size = args.image_size
    model = model.to(device).eval()
    data = Pictures(args.images, args.classes, args.image_size)
    picture = data.load_image(0)
    x = data.to_tensor(picture).to(device)  # (3, S, S)

    def forward():
        with torch.no_grad():
            model(x[None])
        sync(device)

    def explain_tensor():
        protopnet.explain(model, x)
        sync(device)

    def explain_picture():
        protopnet.explain(model, picture)
        sync(device)

    t = interleaved({"forward": forward, "explain": explain_tensor, "explain_pil": explain_picture}, args.repeats)
    t_forward, t_explain, t_explain_pil = t["forward"], t["explain"], t["explain_pil"]
    e = protopnet.explain(model, x)
    listed = e.listed_matches()
    start = CLOCK()
    e.compute_boxes(listed)
    t_boxes = CLOCK() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = CLOCK()
        write_explanation_report([e], tmp)
        t_render = CLOCK() - start

    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device} ({torch.get_num_threads()} threads, load average {load:.1f}, {'CPU' if args.cpu_time else 'wall'} time), {args.backbone} at {args.image_size} px, "
          f"{model.num_prototypes} prototypes ({args.classes} classes x {args.per_class}), latent {tuple(model.latent(x[None]).shape[2:])}")
    print(f"forward             {1000 * t_forward:8.1f} ms")
    print(f"explain (tensor)    {1000 * t_explain:8.1f} ms   ratio explain/forward = {t_explain / t_forward:.2f}")
    print(f"explain (PIL)       {1000 * t_explain_pil:8.1f} ms   ratio explain/forward = {t_explain_pil / t_forward:.2f} (includes resizing + normalising)")
    print(f"boxes, {len(listed):5d} listed {1000 * t_boxes:8.1f} ms   (computed on demand, e.g. by to_json)")
    print(f"render HTML + JSON  {1000 * t_render:8.1f} ms")

    def forward_only():
        loader = make_loader(IndexedSubset(data, augment=False), args.batch_size)
        with torch.no_grad():
            for batch in loader:
                model.distances(model.latent(batch.images.to(device)))
        sync(device)

    def scan():
        nearest_patches(model, data, 5, batch_size=args.batch_size, device=device)
        sync(device)

    t = interleaved({"plain": forward_only, "scan": scan}, args.scan_repeats)
    t_plain, t_scan = t["plain"], t["scan"]
    print(f"analyze scan        {len(data) / t_scan:8.1f} images/s   (forward + distances only: {len(data) / t_plain:.1f} images/s; "
          f"ratio {t_scan / t_plain:.2f})")


if __name__ == "__main__":
    main()
