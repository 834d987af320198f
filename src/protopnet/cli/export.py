"""``protopnet export``: write a model as ONNX or TorchScript (outputs: logits, similarities,
distance maps), checked against PyTorch."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from .common import CommandError, add_parser, load_model_or_fail

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "export",
        help="Export a model to ONNX or TorchScript (logits, similarities and distance maps; dynamic batch)",
        example="protopnet export demo-out/model --format onnx --out demo-out/model.onnx",
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="a model directory (a single model or an ensemble)")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format (default onnx)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the file's outputs with PyTorch's")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help=f"allowed distance difference from PyTorch (default {TOLERANCE:g}; similarities and logits get the matching allowance)")
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..export import check_export, export_onnx, export_torchscript

    model = load_model_or_fail(args.model, "cpu")
    if args.format == "onnx":
        path = export_onnx(model, args.out, opset=args.opset)
    else:
        path = export_torchscript(model, args.out)
    summary: dict[str, Any] = {"out": str(path), "format": args.format, "bytes": path.stat().st_size}
    if not args.no_check:
        check = check_export(model, path, args.format, tolerance=args.tolerance)
        summary["check"] = check.to_json()
        if not check.ok:
            raise CommandError(f"{path}: outputs differ from PyTorch more than allowed (tolerance {args.tolerance:g}): max abs diff {check.max_abs_diff}, worst ratio {check.worst_ratio}")
    print(json.dumps(summary))
    return 0
