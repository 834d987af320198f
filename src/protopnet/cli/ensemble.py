"""``protopnet ensemble``: combine trained models into one (their logits summed, paper Section 2.5)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import CommandError, add_parser, load_model_or_fail


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "ensemble",
        help="Combine several trained models into one ensemble model directory (logits summed)",
        example="protopnet ensemble demo-out/model demo-out/edited --out demo-out/ensemble",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL_DIR", help="model directories sharing the same classes")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the ensemble (members are copied into DIR/members/<i>/)")
    parser.add_argument("--image-size", type=int, default=None, help="the ensemble's input size (default: the largest member's)")
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..ensemble import Ensemble, save_ensemble
    from ..checkpoint import now_utc

    members = [load_model_or_fail(path) for path in args.models]
    try:
        ensemble = Ensemble(members, image_size=args.image_size)
    except ValueError as error:
        raise CommandError(str(error)) from None
    ensemble.history.append({"event": "ensemble", "when": now_utc(), "what": {"members": [str(p) for p in args.models]}})
    path = save_ensemble(ensemble, args.out)
    print(json.dumps({"out": str(path), "members": ensemble.num_members, "prototypes": ensemble.num_prototypes, "image_size": ensemble.image_size}))
    return 0
