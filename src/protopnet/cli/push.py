"""protopnet push MODEL_DIR --data ... --out DIR"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from .common import DATA_HELP, add_device_arguments, add_parser, dataset_for_model, load_model_or_fail, progress_factory, run_settings

if TYPE_CHECKING:
    from ..model.protopnet import ProtoPNet


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "push",
        "Project every prototype onto its nearest training patch of its own class (paper 2.2) and save the result as a new model.",
        "protopnet push demo-out/model --data synthetic --out demo-out/pushed",
    )
    parser.add_argument("model", help="a model directory")
    parser.add_argument("--data", required=True, help=DATA_HELP + " (its training split is pushed onto)")
    parser.add_argument("--out", required=True, help="where to write the pushed model directory")
    add_device_arguments(parser)
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..save import save_model
    from ..train.push import push_prototypes

    model = load_model_or_fail(args.model, args.device)
    dataset = dataset_for_model(model, args.data, "train")
    make_bar = progress_factory(args.quiet)
    bar = make_bar("push", len(dataset)) if make_bar else None
    provenance = push_prototypes(
        model, dataset, settings=run_settings(args),
        progress=bar.update if bar is not None else None,
    )
    if bar is not None:
        bar.close()
    model.history.append({"event": "push", "data": args.data, "source": args.model})
    save_model(model, args.out, dataset=dataset, run_config=_run_config(model))
    moved = [p["distance"] for p in provenance]
    print(json.dumps({"model": args.out, "prototypes": len(provenance), "mean_distance_moved": sum(moved) / len(moved)}))
    return 0


def _run_config(model: ProtoPNet) -> dict[str, Any] | None:
    """The source directory's config.yaml (the run that trained the model), kept with the pushed
    model so its card still tells how it was trained."""
    from pathlib import Path

    import yaml

    source = Path(model.source_directory or "") / "config.yaml"
    if not model.source_directory or not source.is_file():
        return None
    try:
        config = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None
