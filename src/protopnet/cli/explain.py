"""``protopnet explain``: why the model classified these images as it did (paper Figure 3).

Output layout (``--out DIR``):

* one image: ``DIR/explanation.json``, ``DIR/index.html`` (self-contained report) and its
  pictures in ``DIR/images/``;
* several images: one such folder per image, ``DIR/NN-<file stem>/``, in the order given, plus
  ``DIR/index.html`` listing them and ``DIR/explanations.json`` (``{"explanations": [{"directory",
  "input", "class_name", "probability"}, ...]}``).

Every image is read before anything is written: an unreadable one stops the command with one
line naming the file and the reason.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from .common import CommandError, add_parser, load_model_or_fail

logger = logging.getLogger(__name__)


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "explain",
        help="Explain the classification of images: score sheets (this part looks like that prototype), as an HTML report and JSON",
        example="protopnet explain demo-out/model demo-out/samples/red_circle.png demo-out/samples/green_square.png --out demo-out/explained --top-classes 3",
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="a model (or ensemble) directory")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files to explain")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write explanation.json and index.html")
    parser.add_argument("--top-classes", type=int, default=3, help="classes with a score sheet (default 3)")
    parser.add_argument("--top-prototypes", type=int, default=10, help="most activated prototypes to list (default 10)")
    parser.add_argument("--picture-rows", type=int, default=10, help="score-sheet rows drawn with pictures per class; the rest are listed as text (default 10)")
    parser.add_argument("--figure", action="store_true", help="also save a Figure-3-style figure.png per image")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..explain.inputs import prepare_input
    from ..explain.local import explain
    from ..explain.reports import write_explanation_report

    if args.top_classes < 1:
        raise CommandError(f"--top-classes must be >= 1, got {args.top_classes}")
    if args.top_prototypes < 0 or args.picture_rows < 0:
        raise CommandError("--top-prototypes and --picture-rows must be >= 0")
    model = load_model_or_fail(args.model, args.device)
    size = int(getattr(model, "image_size", 224))
    inputs = []
    for path in args.images:
        try:
            inputs.append(prepare_input(path, size, model.mean, model.std))
        except ValueError as error:  # BadImageError: "<path>: <reason>"
            raise CommandError(str(error)) from None
    explanations = []
    for inp in inputs:
        explanation = explain(model, inp, top_classes=min(args.top_classes, len(model.class_names)), top_prototypes=args.top_prototypes)
        explanations.append(explanation)
        print(f"{inp.path}: {explanation.predicted_name} ({100 * float(explanation.probabilities[explanation.predicted]):.1f}%)")
    index = write_explanation_report(explanations, args.out, picture_rows=args.picture_rows, figure=args.figure)
    print(f"report: {index}")
    return 0
