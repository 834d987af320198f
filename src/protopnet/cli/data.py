"""protopnet data {cub200,cars} SRC --out DIR [--augment N] [--size 224] [--download] [--url URL]"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .common import CommandError, add_parser

logger = logging.getLogger(__name__)

_EXAMPLES = {
    "cub200": "protopnet data cub200 ~/datasets --download --out ~/datasets/cub200_cropped --workers 4",
    "cars": "protopnet data cars ~/datasets/stanford_cars --download --url https://my-mirror.example.org/stanford_cars/ --out ~/datasets/cars_cropped",
}
_WHAT = {
    "cub200": "CUB-200-2011 (official layout: images.txt, bounding_boxes.txt, images/ ...)",
    "cars": "Stanford Cars (devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat)",
}
_URL_HELP = {
    "cub200": "download from this URL instead of CaltechDATA (the archive must be the official "
              "CUB_200_2011.tgz: its MD5 is checked)",
    "cars": "download from this base URL instead of ai.stanford.edu/~jkrause (often unreachable): "
            "BASE/car_devkit.tgz, BASE/cars_train.tgz, BASE/cars_test.tgz and "
            "BASE/cars_test_annos_withlabels.mat, checked against the official MD5s",
}


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "data",
        "Prepare CUB-200-2011 or Stanford Cars as the paper did: crop to the object box, resize, and "
        "write the offline augmentation (rotation, skew, shear, each with a random flip) as "
        "ImageFolder trees OUT/train, OUT/train_augmented and OUT/test.",
        _EXAMPLES["cub200"] + "\n  protopnet train configs/cub200_vgg19.yaml data.root=~/datasets/cub200_cropped",
    )
    datasets = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for name in ("cub200", "cars"):
        sub = datasets.add_parser(
            name,
            help=_WHAT[name],
            description=f"Prepare {_WHAT[name]} for training.",
            epilog=f"example:\n  {_EXAMPLES[name]}\n\nlayout written:\n  OUT/train/<class>/<image>.jpg            "
                   "cropped, resized training images (push set)\n  OUT/train_augmented/<class>/<image>_augNN.jpg  "
                   "3 x N augmented copies per training image\n  OUT/test/<class>/<image>.jpg             "
                   "cropped, resized test images\n  OUT/protopnet-data.json                  what was written, with which settings",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("src", metavar="SRC", help="the dataset directory (or, with --download, where to download it)")
        sub.add_argument("--out", required=True, help="where to write the prepared trees")
        sub.add_argument("--augment", type=int, default=10, metavar="N",
                         help="augmented copies per image per operation (paper: 10, i.e. 30 per image); 0: none")
        sub.add_argument("--size", type=int, default=224, help="side of the square pictures in pixels (paper: 224)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the offline augmentation (default 0)")
        sub.add_argument("--format", choices=("jpg", "png"), default="jpg",
                         help="picture format: jpg (quality 95, default) or png (lossless, ~4x larger)")
        sub.add_argument("--classes", type=int, default=None, metavar="K", help="only the first K classes (quick experiments)")
        sub.add_argument("--workers", type=int, default=0, help="processes writing pictures (default 0: this one)")
        sub.add_argument("--overwrite", action="store_true", help="replace splits OUT already holds with other settings")
        sub.add_argument("--download", action="store_true",
                         help="fetch the official files into SRC first (skipped when SRC is already complete); "
                              "resumes partial downloads and verifies MD5 checksums")
        sub.add_argument("--url", help=_URL_HELP[name])
        sub.add_argument("--delete-archives", action="store_true", help="delete the downloaded archives after extracting them")
    return parser


class _ByteBars:
    """One tqdm byte bar per downloaded file, closed when the file is complete or at the end."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: list[Any] = []

    def __call__(self, remote: Any) -> Any:
        if self.quiet:
            return None
        from tqdm.auto import tqdm

        state: dict[str, Any] = {}

        def update(done: int, total: int | None) -> None:
            bar = state.get("bar")
            if bar is None or (total is not None and bar.total != total):
                if bar is not None:
                    bar.close()
                bar = state["bar"] = tqdm(total=total, initial=done, desc=remote.filename, unit="B", unit_scale=True,
                                          unit_divisor=1024, leave=False, dynamic_ncols=True, file=sys.stderr)
                self.bars.append(bar)
            bar.update(done - bar.n)

        return update

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def _picture_bars(quiet: bool) -> Any:
    if quiet or not sys.stderr:
        return None
    from tqdm.auto import tqdm

    def make(description: str, total: int) -> Any:
        return tqdm(total=total, desc=description, unit="img", leave=False, dynamic_ncols=True, file=sys.stderr)

    return make


def execute(args: argparse.Namespace) -> int:
    from ..data.download import CUB_200_2011, STANFORD_CARS, fetch_dataset, with_base_url
    from ..data.prepare import SourceError, find_source, prepare_dataset

    name = args.dataset
    if args.url and not args.download:
        raise CommandError("--url is only used with --download")
    for option, value, low in (("--augment", args.augment, 0), ("--size", args.size, 1), ("--workers", args.workers, 0)):
        if value < low:
            raise CommandError(f"{option} must be >= {low}, got {value}")
    if args.classes is not None and args.classes < 1:
        raise CommandError(f"--classes must be >= 1, got {args.classes}")
    src = Path(args.src).expanduser()
    if args.download:
        try:
            root = find_source(name, src)
            logger.info("%s is already a complete %s directory: nothing to download", root, name)
        except SourceError:
            files = CUB_200_2011 if name == "cub200" else STANFORD_CARS
            if args.url:
                files = with_base_url(files, args.url)
            bars = _ByteBars(args.quiet)
            try:
                fetch_dataset(files, src, byte_progress_for=bars, keep_archives=not args.delete_archives)
            finally:
                bars.close()
    manifest = prepare_dataset(
        name, src, args.out, image_size=args.size, augment=args.augment, seed=args.seed, image_format=args.format,
        classes=args.classes, workers=args.workers, overwrite=args.overwrite, progress_bars=_picture_bars(args.quiet),
    )
    summary = {
        "out": str(Path(args.out).expanduser()),
        "classes": len(manifest["classes"]),
        **{split: entry["pictures"] for split, entry in manifest["splits"].items()},
    }
    print(json.dumps(summary), file=sys.stdout)
    return 0
