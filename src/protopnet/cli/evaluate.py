"""protopnet evaluate MODEL_DIR --data ... [--json FILE] [--interpretability [METRICS]]"""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any, Sequence

from .common import (
    CommandError,
    DATA_HELP,
    add_device_arguments,
    add_interpretability_argument,
    add_parser,
    dataset_for_model,
    interpretability_metrics,
    load_model_or_fail,
    run_settings,
)

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "evaluate",
        "Top-1, top-5 and per-class accuracy of a trained model on a dataset's test split.",
        "protopnet evaluate demo-out/model --data synthetic --json demo-out/eval.json",
    )
    parser.add_argument("model", help="a model directory (written by train, push, prune, edit or ensemble)")
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--split", default="test", help="which split to evaluate: test (default), train or all")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    add_interpretability_argument(parser, "also measure interpretability (consistency and stability need part annotations)")
    parser.add_argument("--record", action="store_true",
                        help="keep the figures in the model directory (model.json) and regenerate its model card (README.md)")
    add_device_arguments(parser)
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..atomic_files import atomic_write_json
    from ..train.evaluate import evaluate
    from ..train.loader import BadImageLog

    metrics = interpretability_metrics(args.interpretability)  # refuse a bad name before loading anything
    model = load_model_or_fail(args.model, args.device)
    try:
        dataset = dataset_for_model(model, args.data, args.split)
    except FileNotFoundError as error:
        raise CommandError(f"{error}; pass --split all to evaluate on the whole tree") from None
    bad = BadImageLog()  # unreadable files are skipped (each logged once), counted and listed
    report: dict[str, Any] = evaluate(model, dataset, settings=run_settings(args), bad_images=bad)
    report = {"model": args.model, "data": args.data, "split": args.split, **report,
              "bad_images": len(bad), "bad_image_files": dict(sorted(bad.items.items()))}
    if metrics is not None:
        report["interpretability"] = interpretability_report(model, dataset, args, metrics)
    print(f"top-1 accuracy {report['accuracy']:.4f}  top-5 {report['top5']:.4f}  ({report['n']} images)")
    if len(bad):
        first, reason = next(iter(report["bad_image_files"].items()))
        print(f"skipped {len(bad)} unreadable images (first: {first}: {reason})")
    worst = sorted(report["per_class"].items(), key=lambda kv: kv[1])[:5]
    if worst:
        print("lowest per-class accuracy: " + ", ".join(f"{name} {acc:.2f}" for name, acc in worst))
    if "interpretability" in report:
        for key, value in report["interpretability"].items():
            if isinstance(value, (int, float)):
                print(f"{key}: {value:.4f}")
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    if args.record:
        record(model, args, report)
    return 0


def record(model: ProtoPNet | Ensemble, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """``--record``: the figures go into the model directory, with the tensors' checksum."""
    from ..model_card import record_evaluation

    directory = getattr(model, "source_directory", None)
    if not directory or str(args.model).startswith("hf://"):
        raise CommandError(f"--record: {args.model} is not a model directory on this machine; evaluate a local copy")
    figures = {args.split: {key: report[key] for key in ("split", "data", "n", "accuracy", "top5", "per_class") if key in report}}
    if "interpretability" in report:
        figures["interpretability"] = report["interpretability"]
    record_evaluation(directory, figures)
    print(f"recorded in {directory}/model.json and {directory}/README.md")


def interpretability_report(model: ProtoPNet | Ensemble, dataset: Any, args: argparse.Namespace, metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """The interpretability figures ``--interpretability`` adds (see protopnet.interpretability):
    ``metrics`` (default all of :data:`~protopnet.interpretability.METRICS`).

    The nearest-patch purity and the prototype localisation read the training split (the push
    images) when the data has one; otherwise the evaluated split. Metrics the data cannot support
    (no part annotations, say) are listed with the reason under ``skipped``.
    """
    from .. import interpretability

    if not hasattr(interpretability, "evaluate_interpretability"):
        return {"prototype_localization": interpretability.prototype_localization(model, dataset)["localization"]}
    metrics = tuple(interpretability.METRICS) if metrics is None else tuple(metrics)
    train = dataset if args.split == "train" else None
    if train is None and {"purity", "localization"} & set(metrics):
        try:
            train = dataset_for_model(model, args.data, "train")
        except (CommandError, FileNotFoundError, ValueError) as error:
            logger.info("no training split for purity and prototype localisation (%s); using the %s split", error, args.split)
    figures = interpretability.evaluate_interpretability(
        model, dataset, train_dataset=train, metrics=metrics, settings=run_settings(args)
    )
    for name, reason in figures.get("skipped", {}).items():
        print(f"{name}: not measured ({reason})")
    return figures
