"""protopnet demo [--out DIR]"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import add_parser, progress_factory


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "demo",
        "Train, push, evaluate and explain a ProtoPNet on the built-in synthetic dataset (offline, CPU, about 2 minutes).",
        "protopnet demo --out demo-out",
    )
    parser.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override the demo config, e.g. schedule.epochs=10")
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    from .train import apply_threads

    apply_threads(0)
    try:
        figures = run_demo(args.out, overrides=args.overrides, progress_bars=progress_factory(args.quiet), resume=args.resume)
    except FileExistsError as error:
        from .common import CommandError

        raise CommandError(f"{error}") from None
    print(f"test accuracy   {figures['test_accuracy']:.3f}  (top-5 {figures['top5']:.3f})")
    print(f"localisation    {figures['localization']:.3f}  of the {figures['prototypes']} prototypes sit on their class part "
          f"(chance {figures['localization_chance']:.3f}; {figures['localization_before_pruning']:.3f} of all "
          f"{figures['prototypes_before_pruning']} before pruning)")
    print(f"time            {figures['seconds']:.1f} s")
    print(f"model           {figures['model']}")
    if "report" in figures:
        print(f"report          {figures['report']}")
    print(f"figures         {args.out}/demo.json")
    print(json.dumps({k: figures[k] for k in ("test_accuracy", "localization", "seconds")}))
    return 0
