"""``protopnet prune``: remove prototypes whose nearest training patches are mostly other classes
(paper Section 2.6), re-fit the last layer, and write the pruned model with a report."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from .common import CommandError, add_device_arguments, add_parser, dataset_for_model, load_model_or_fail, run_settings, DATA_HELP

logger = logging.getLogger(__name__)


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "prune",
        help="Prune prototypes whose k nearest training patches hold fewer than THRESHOLD of their own class",
        example="protopnet prune demo-out/model --data synthetic --k 6 --threshold 3 --out demo-out/pruned",
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="a model directory")
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the pruned model (with pruning.json and pruning.html)")
    parser.add_argument("--k", type=int, default=6, help="nearest training patches per prototype (default 6, as the paper)")
    parser.add_argument("--threshold", type=int, default=3, help="prune when fewer than this many of the k are of the prototype's class (default 3)")
    parser.add_argument("--all-patches", action="store_true", help="rank every patch of every image (default: one nearest patch per image, as the reference)")
    parser.add_argument("--iterations", type=int, default=100, help="last-layer re-fit passes over the cached similarities (default 100; 0 skips the re-fit)")
    parser.add_argument("--lr", type=float, default=1e-4, help="last-layer learning rate (default 1e-4)")
    parser.add_argument("--no-test", action="store_true", help="skip measuring test accuracy before and after")
    parser.add_argument("--dry-run", action="store_true", help="report what would be pruned; write only the report into --out")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..edit import save_pruned
    from ..explain.reports import write_pruning_report
    from ..prune import prune

    if args.k < 1:
        raise CommandError(f"--k must be >= 1, got {args.k}")
    if not 0 <= args.threshold <= args.k:
        raise CommandError(f"--threshold must be between 0 and --k ({args.k}), got {args.threshold}")
    model = load_model_or_fail(args.model, args.device)
    if not hasattr(model, "prototypes"):
        raise CommandError(f"{args.model}: pruning works on a single ProtoPNet, not an ensemble; prune its members, then rebuild the ensemble")
    source = model.source_directory
    train = dataset_for_model(model, args.data, "train")
    test = None if args.no_test else dataset_for_model(model, args.data, "test")
    report = prune(
        model, train, k=args.k, threshold=args.threshold, per_image=not args.all_patches, test_dataset=test,
        refit=args.iterations > 0, iterations=args.iterations, lr=args.lr,
        seed=args.seed, settings=run_settings(args), dry_run=args.dry_run,
    )
    if args.dry_run:
        from pathlib import Path

        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_pruning_report(report, args.out, dataset=train, source_directory=source)
        logger.info("dry run: %d of %d prototypes would be pruned; report in %s", len(report.removed), len(report.prototypes), args.out)
    else:
        save_pruned(model, report, args.out, dataset=train, source_directory=source)
    acc = report.accuracy["test"]
    summary = {
        "pruned": len(report.removed),
        "prototypes_before": len(report.prototypes),
        "prototypes_after": len(report.kept),
        "test_accuracy_before": acc["before"],
        "test_accuracy_after": acc["after"],
        "out": str(args.out),
    }
    print(json.dumps(summary))
    return 0
