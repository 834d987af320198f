#!/usr/bin/env python
"""Could prototypes on these features follow parts at all? An oracle for the consistency metric.

For every (class, annotated part) with at least ``--min-visible`` training pictures showing the
part, the *oracle prototype* is the mean of the feature vectors at the latent cell holding the part's
point in those pictures: the best a prototype of that part could be, made with the part annotations
no training run sees. Each oracle prototype is then scored exactly as a trained prototype is
(:mod:`protopnet.interpretability.parts`, Huang et al., ICCV 2023): on the test pictures of its
class its similarity map is upsampled, the 72-pixel square around the peak is the region, and the
prototype is *consistent* when one part is inside that region in >= 80 % of the pictures showing
it. The printed figure is the share of consistent oracle prototypes, for the squared L2 distance
(the paper's) and the cosine distance (``model.distance: cosine``).

A feature space where even oracle prototypes are rarely consistent cannot give trained prototypes
that are: this separates "the prototypes were fitted badly" from "the latent space does not keep
parts apart", in a few minutes instead of a training run.

Two sources of features::

    # frozen ImageNet features after blocks 13, 17 and 18 of MobileNetV2 (a Sequential backbone)
    python benchmarks/part_oracle.py --data ../shared/data/CUB_200_2011 --backbone mobilenet_v2 --blocks 13 17 18
    # the latent space (add-on output) of a trained model
    python benchmarks/part_oracle.py --data ../shared/data/CUB_200_2011 --model runs/cub_mnv2/model
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from protopnet.interpretability.parts import (
    THRESHOLD,
    annotation_points,
    consistency_from_counts,
    covered_parts,
    peak_locations,
    region_half_size,
)
from protopnet.model.distances import DISTANCES, distance_maps, similarity

logger = logging.getLogger("part_oracle")


def encode_parts(dataset, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, Q, 2) part points ``(x, y)`` in picture pixels and (N, Q) visibility, in ``names`` order."""
    points = torch.zeros(len(dataset), len(names), 2)
    visible = torch.zeros(len(dataset), len(names), dtype=torch.bool)
    column = {name: q for q, name in enumerate(names)}
    for i in range(len(dataset)):
        for name, (x, y) in annotation_points(dataset.annotation(i)).items():
            if name in column:
                points[i, column[name]] = torch.tensor([x, y])
                visible[i, column[name]] = True
    return points, visible


def oracle_consistency(
    train_features: torch.Tensor,
    train_points: torch.Tensor,
    train_visible: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_points: torch.Tensor,
    test_visible: torch.Tensor,
    test_labels: torch.Tensor,
    image_size: int,
    distance: str = "l2",
    min_visible: int = 5,
    threshold: float = THRESHOLD,
) -> dict[str, float]:
    """Consistency of the oracle part prototypes.

    Args:
        train_features, test_features: (N, C, H, W) feature maps of the training / test pictures.
        train_points, test_points: (N, Q, 2) part points ``(x, y)`` in pixels of the
            ``image_size`` pictures; train_visible, test_visible: (N, Q) bool.
        train_labels, test_labels: (N,) classes.
        distance: one of :data:`protopnet.model.distances.DISTANCES`; the similarity is the
            paper's log activation (epsilon 1e-4) of it.
        min_visible: a (class, part) needs this many training pictures showing the part.

    Returns:
        ``consistency`` (share of consistent oracle prototypes), ``own_part_frequency`` (mean
        share of a class's test pictures in whose region the prototype's own part lies) and
        ``prototypes`` (how many were made).
    """
    rows, cols = train_features.shape[-2:]
    half = region_half_size(image_size)
    consistent, own = [], []
    for label in torch.unique(train_labels).tolist():
        train_idx = (train_labels == label).nonzero()[:, 0]
        test_idx = (test_labels == label).nonzero()[:, 0]
        if test_idx.numel() == 0:
            continue
        for q in range(train_points.shape[1]):
            shown = train_idx[train_visible[train_idx, q]]
            if shown.numel() < min_visible:
                continue
            r = (train_points[shown, q, 1] * rows / image_size).long().clamp(0, rows - 1)
            c = (train_points[shown, q, 0] * cols / image_size).long().clamp(0, cols - 1)
            prototype = train_features[shown, :, r, c].mean(0)  # (C,)
            maps = similarity(distance_maps(test_features[test_idx], prototype[None, :, None, None], distance))[:, 0]  # (n, H, W)
            covered = covered_parts(peak_locations(maps, image_size), test_points[test_idx], test_visible[test_idx], half)
            frequency, ok = consistency_from_counts(covered.sum(0, keepdim=True), test_visible[test_idx].sum(0, keepdim=True), threshold)
            consistent.append(bool(ok[0]))
            own.append(float(frequency[0, q]))
    if not consistent:
        raise ValueError(f"no (class, part) has {min_visible} training pictures showing it")
    return {"consistency": sum(consistent) / len(consistent), "own_part_frequency": sum(own) / len(own), "prototypes": len(consistent)}


@torch.no_grad()
def extract(dataset, taps, batch_size: int) -> dict[str, torch.Tensor]:
    """Run ``taps(images) -> {name: (B, C, H, W)}`` over the dataset (no augmentation)."""
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(len(dataset), start + batch_size))])
        for name, value in taps(images).items():
            out.setdefault(name, []).append(value.float())
    return {name: torch.cat(values) for name, values in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Two sources of features::")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a dataset with part annotations (CUB-200-2011 root or slice; 'synthetic')")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--backbone", help="a backbone name (frozen, with its ImageNet weights)")
    source.add_argument("--model", help="a trained model directory: its latent space (add-on output)")
    parser.add_argument("--blocks", type=int, nargs="+", help="with --backbone: indices of a Sequential backbone's blocks whose outputs to test (default: the output)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--crop", default="bbox", choices=["bbox", "full"])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-visible", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from protopnet import load_model
    from protopnet.data import build_dataset
    from protopnet.model.backbones import build_backbone

    if args.model:
        model = load_model(args.model).eval()
        size = int(model.image_size)
        mean, std = model.mean, model.std
        taps = lambda images: {"latent": model.latent(images)}  # noqa: E731
    else:
        built = build_backbone(args.backbone, pretrained=True)
        net = built.module.eval()
        size, mean, std = args.image_size, built.mean, built.std
        if args.blocks:
            if not isinstance(net, torch.nn.Sequential):
                parser.error(f"--blocks needs a Sequential backbone; {args.backbone} is a {type(net).__name__}")
            wanted = sorted(set(args.blocks))
            if wanted[0] < 0 or wanted[-1] >= len(net):
                parser.error(f"--blocks must be in 0..{len(net) - 1} for {args.backbone}, got {args.blocks}")

            def taps(images):
                out, x = {}, images
                for index, block in enumerate(net[: wanted[-1] + 1]):
                    x = block(x)
                    if index in wanted:
                        out[f"block {index}"] = x
                return out
        else:
            taps = lambda images: {"output": net(images)}  # noqa: E731
    kw = {} if args.data == "synthetic" else {"crop": args.crop}
    train = build_dataset(args.data, "train", size, mean=mean, std=std, **kw)
    test = build_dataset(args.data, "test", size, mean=mean, std=std, **kw)
    names = sorted({name for ds in (train, test) for i in range(len(ds)) for name in annotation_points(ds.annotation(i))})
    if not names:
        parser.error(f"{args.data}: no part annotations")
    start = time.perf_counter()
    train_features, test_features = extract(train, taps, args.batch_size), extract(test, taps, args.batch_size)
    logger.info("features of %d + %d pictures in %.0f s", len(train), len(test), time.perf_counter() - start)
    train_points, train_visible = encode_parts(train, names)
    test_points, test_visible = encode_parts(test, names)
    train_labels, test_labels = torch.tensor(train.targets), torch.tensor(test.targets)
    print(f"| features | grid | channels | {' | '.join(f'consistency ({d})' for d in DISTANCES)} | oracle prototypes |")
    print("|---|---|---:|" + "---:|" * len(DISTANCES) + "---:|")
    for name in train_features:
        a, b = train_features[name], test_features[name]
        results = [
            oracle_consistency(a, train_points, train_visible, train_labels, b, test_points, test_visible, test_labels, size, d, args.min_visible)
            for d in DISTANCES
        ]
        scores = " | ".join(f"{r['consistency']:.3f} (own part {r['own_part_frequency']:.2f})" for r in results)
        print(f"| {args.model or args.backbone} {name} | {a.shape[-2]} x {a.shape[-1]} | {a.shape[1]} | {scores} | {results[0]['prototypes']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
