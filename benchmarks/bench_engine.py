"""Engine costs as ratios (the machine is shared: ratios are steadier than seconds).

1. the prototype layer (distances + min pooling + similarities + last layer) vs the backbone's forward;
2. push over a dataset vs one plain forward pass (backbone + add-on) over the same images (target <= 1.25);
3. the last-layer stage on cached similarities (one forward pass to cache, then the iterations)
   vs the same iterations with full forward passes (target >= 10x faster at 20 iterations).

    python benchmarks/bench_engine.py [--backbone resnet18] [--image-size 224] [--images 200]

Random images at the given size, ImageNet-shaped backbone without pretrained weights (speed does
not depend on the weights). Each figure is the median of --repeats interleaved runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from protopnet import ProtoPNet
from protopnet.data.base import ProtoDataset
from protopnet.train.last_layer import collect_similarities, optimise_last_layer, optimise_last_layer_full_forward
from protopnet.train.loader import IndexedSubset, make_loader
from protopnet.train.push import push_prototypes


class RandomImages(ProtoDataset):
    def __init__(self, n: int, classes: int, size: int) -> None:
        super().__init__(image_size=size)
        self.classes = [f"c{k}" for k in range(classes)]
        self.targets = [i % classes for i in range(n)]
        rng = np.random.default_rng(0)
        self.pictures = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        return self.pictures[index]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--prototypes-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ProtoPNet(backbone=args.backbone, num_classes=args.classes, prototypes_per_class=args.prototypes_per_class, pretrained=False).eval()
    data = RandomImages(args.images, args.classes, args.image_size)
    subset = IndexedSubset(data, augment=False)
    batches = [b.images for b in make_loader(subset, args.batch_size)]

    @torch.no_grad()
    def forward_backbone_addon() -> None:
        # streamed through the same loader as push, so both pay the same data loading
        for batch in make_loader(subset, args.batch_size):
            model.latent(batch.images)

    @torch.no_grad()
    def backbone_only() -> torch.Tensor:
        return [model.features(x) for x in batches]

    latents = [model.latent(x).detach() for x in batches]

    @torch.no_grad()
    def prototype_layer() -> None:
        for z in latents:
            model.head(z)

    def push() -> None:
        push_prototypes(model, data, batch_size=args.batch_size)

    sims, labels, _ = collect_similarities(model, data, batch_size=args.batch_size)

    def last_cached() -> None:
        opt = torch.optim.Adam(model.last_layer.parameters(), lr=1e-4)
        s, y, _ = collect_similarities(model, data, batch_size=args.batch_size)
        optimise_last_layer(model, s, y, opt, iterations=args.iterations, batch_size=args.batch_size, generator=torch.Generator().manual_seed(0))

    def last_full() -> None:
        opt = torch.optim.Adam(model.last_layer.parameters(), lr=1e-4)
        optimise_last_layer_full_forward(model, data, opt, iterations=args.iterations, batch_size=args.batch_size, generator=torch.Generator().manual_seed(0))

    model.last_layer.weight.requires_grad_(True)
    results: dict[str, list[float]] = {k: [] for k in ("backbone", "latent", "head", "push", "last_cached", "last_full")}
    for _ in range(args.repeats):
        results["backbone"].append(timed(backbone_only))
        results["latent"].append(timed(forward_backbone_addon))
        results["head"].append(timed(prototype_layer))
        results["push"].append(timed(push))
        results["last_cached"].append(timed(last_cached))
        results["last_full"].append(timed(last_full) if _ == 0 else results["last_full"][0])
    med = {k: statistics.median(v) for k, v in results.items()}
    n = args.images
    print(f"# engine benchmark: {args.backbone} @ {args.image_size}px, {n} images, M={model.num_prototypes}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| measure | seconds | ratio |")
    print("|---|---|---|")
    print(f"| backbone forward | {med['backbone']:.3f} | 1.00 |")
    print(f"| prototype layer (distances, pooling, similarity, last layer) | {med['head']:.3f} | {med['head'] / med['backbone']:.3f} of backbone |")
    print(f"| plain forward pass (backbone + add-on) | {med['latent']:.3f} | 1.00 |")
    print(f"| push (incl. provenance and boxes) | {med['push']:.3f} | {med['push'] / med['latent']:.2f}x plain forward (target <= 1.25) |")
    print(f"| last layer, {args.iterations} iterations, cached similarities | {med['last_cached']:.3f} | 1.00 |")
    print(f"| last layer, {args.iterations} iterations, full forward passes | {med['last_full']:.3f} | {med['last_full'] / med['last_cached']:.1f}x slower (target >= 10) |")


if __name__ == "__main__":
    main()
