"""``protopnet analyze``: the global analysis of a model (paper Figure 5b) — every prototype's
k nearest patches in the train and test splits, their class purity, and a prototype gallery.

Writes ``DIR/index.html`` (self-contained: CSS inline, pictures in ``DIR/images/``) and
``DIR/analysis.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import logging
from typing import Any

from .common import (
    CommandError,
    DATA_HELP,
    add_device_arguments,
    add_interpretability_argument,
    add_parser,
    dataset_for_model,
    interpretability_metrics,
    load_model_or_fail,
    progress_factory,
    run_settings,
)

logger = logging.getLogger(__name__)


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "analyze",
        help="Prototype gallery: each prototype's nearest patches in the train and test data and their class purity (HTML report)",
        example="protopnet analyze demo-out/model --data synthetic --out demo-out/analysis --k 5",
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="a model directory")
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write index.html and analysis.json")
    parser.add_argument("--k", type=int, default=5, help="nearest patches per prototype and split (default 5)")
    parser.add_argument("--splits", default="train,test", help="comma-separated splits to scan (default train,test)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="scan only the first N images of each split (a quick look)")
    add_interpretability_argument(parser, "also measure interpretability on the test split and add it to the report")
    add_device_arguments(parser)
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..explain.analysis import analyze
    from ..explain.reports import write_analysis_report

    if args.k < 1:
        raise CommandError(f"--k must be >= 1, got {args.k}")
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit must be >= 1, got {args.limit}")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits:
        raise CommandError("--splits names no split (e.g. --splits train,test)")
    metrics = interpretability_metrics(args.interpretability)  # refuse a bad name before loading anything
    model = load_model_or_fail(args.model, args.device)
    if not hasattr(model, "prototypes"):
        raise CommandError(f"{args.model}: analyze works on a single ProtoPNet, not an ensemble; analyze each member directory (members/0, ...)")
    datasets = {split: dataset_for_model(model, args.data, split) for split in splits}
    bars = progress_factory(getattr(args, "quiet", False))
    analysis = analyze(model, datasets, args.k, limit=args.limit, progress_bars=bars, settings=run_settings(args))
    extra = []
    if metrics is not None:
        from ..interpretability import evaluate_interpretability
        from ..interpretability.report import interpretability_sections

        test = datasets.get("test") or dataset_for_model(model, args.data, "test")
        train = datasets.get("train") or dataset_for_model(model, args.data, "train")
        results = evaluate_interpretability(model, test, train_dataset=train, metrics=metrics, settings=run_settings(args))
        extra = interpretability_sections(results)
        from ..atomic_files import atomic_write_json

        atomic_write_json(Path(args.out) / "interpretability.json", results)
    index = write_analysis_report(analysis, args.out, extra_sections=extra)
    for split in splits:
        print(f"{split}: mean purity of the {args.k} nearest patches {100 * analysis.mean_purity(split):.1f}%")
    print(f"report: {index}")
    return 0
