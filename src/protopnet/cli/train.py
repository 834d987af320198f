"""protopnet train CONFIG.yaml [--out DIR] [--resume] [key=value ...]"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from .common import CommandError, add_parser, progress_factory

logger = logging.getLogger(__name__)


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "train",
        "Train a ProtoPNet: warm-up, joint, push and last-layer stages as the config schedules them.",
        "protopnet train configs/demo.yaml --out runs/demo schedule.epochs=12",
    )
    parser.add_argument("config", help="a YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config values, e.g. schedule.epochs=3 data.root=/data/CUB_200_2011")
    parser.add_argument("--out", help="run directory (default: output.dir of the config)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from ..train import train

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        raise CommandError(str(error)) from None
    if args.out:
        config.output.dir = args.out
    apply_threads(config.run.threads)
    try:
        result = train(config, config.output.dir, resume=args.resume, progress=progress_factory(args.quiet))
    except FileExistsError as error:
        raise CommandError(str(error)) from None
    summary = {
        "model": str(result.model_dir),
        "validation_accuracy": result.validation.get("accuracy"),
        "test_accuracy": result.test["accuracy"] if result.test else None,
        "seconds": round(result.seconds, 1),
    }
    print(json.dumps(summary), file=sys.stdout)
    return 0


def apply_threads(threads: int) -> None:
    """The CLI owns the process: set PyTorch's thread count when the config asks."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
