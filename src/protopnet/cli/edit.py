"""``protopnet edit``: a person changes the prototypes — remove, relabel, replace by a patch they
point at — then the last layer is re-fitted and the accuracy change reported."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from .common import DATA_HELP, CommandError, add_device_arguments, add_parser, dataset_for_model, load_model_or_fail, run_settings

logger = logging.getLogger(__name__)


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "edit",
        help="Remove, relabel or replace prototypes, re-fit the last layer and report the accuracy change",
        example="protopnet edit demo-out/model --remove 3,17 --relabel 5:2 --data synthetic --out demo-out/edited",
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="a model directory")
    parser.add_argument("--remove", action="append", default=[], metavar="J[,J...]", help="prototype indices to remove (repeatable)")
    parser.add_argument("--relabel", action="append", default=[], metavar="J:CLASS", help="move prototype J to CLASS (an index or a class name; repeatable)")
    parser.add_argument(
        "--replace", action="append", default=[], metavar="J:IMAGE:BOX",
        help="replace prototype J by the patch of IMAGE under BOX=x0,y0,x1,y1 (the image's own pixels), "
        "or at the latent position BOX=row,col; IMAGE is a file or @N for item N of the training data (repeatable)",
    )
    parser.add_argument("--data", help=f"training data for the last-layer re-fit and test accuracy ({DATA_HELP})")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the edited model")
    parser.add_argument("--iterations", type=int, default=20, help="last-layer re-fit passes (default 20, as after each push; 0: no re-fit)")
    parser.add_argument("--lr", type=float, default=1e-4, help="last-layer learning rate (default 1e-4)")
    parser.add_argument("--no-test", action="store_true", help="skip measuring test accuracy before and after")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    return parser


def _int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise CommandError(f"{what}: {text!r} is not an integer") from None


def parse_remove(values: list[str]) -> list[int]:
    return [_int(part, "--remove") for value in values for part in value.split(",") if part.strip()]


def parse_relabel(values: list[str], class_names: list[str]) -> dict[int, int]:
    out: dict[int, int] = {}
    for value in values:
        for item in value.split(","):
            if not item.strip():
                continue
            if ":" not in item:
                raise CommandError(f"--relabel {item!r}: expected J:CLASS, e.g. 5:2")
            j, cls = item.split(":", 1)
            cls = cls.strip()
            if cls in class_names:
                k = class_names.index(cls)
            else:
                k = _int(cls, f"--relabel {item!r} (class: an index or one of the class names)")
            out[_int(j, "--relabel")] = k
    return out


def parse_replace(values: list[str]) -> list[Any]:
    from ..edit import Replacement

    out = []
    for value in values:
        head, sep, rest = value.partition(":")
        image, sep2, numbers = rest.rpartition(":")
        if not sep or not sep2 or not image:
            raise CommandError(f"--replace {value!r}: expected J:IMAGE:x0,y0,x1,y1 or J:IMAGE:row,col")
        j = _int(head, "--replace")
        try:
            coords = [float(v) for v in numbers.split(",")]
        except ValueError:
            raise CommandError(f"--replace {value!r}: {numbers!r} is not a list of numbers") from None
        kwargs: dict[str, Any] = {}
        if image.startswith("@"):
            kwargs["dataset_index"] = _int(image[1:], f"--replace {value!r} (@N: a training item)")
        else:
            kwargs["image"] = image
        if len(coords) == 4:
            kwargs["box"] = coords
        elif len(coords) == 2 and all(c.is_integer() for c in coords):
            kwargs["position"] = (int(coords[0]), int(coords[1]))
        else:
            raise CommandError(f"--replace {value!r}: give a box x0,y0,x1,y1 (4 numbers) or a latent position row,col (2 integers)")
        out.append(Replacement(index=j, **kwargs))
    return out


def execute(args: argparse.Namespace) -> int:
    from ..edit import edit_model, save_edited_model

    model = load_model_or_fail(args.model, args.device)
    if not hasattr(model, "prototypes"):
        raise CommandError(f"{args.model}: editing works on a single ProtoPNet, not an ensemble; edit a member, then rebuild the ensemble")
    remove = parse_remove(args.remove)
    relabel = parse_relabel(args.relabel, list(model.class_names))
    replace = parse_replace(args.replace)
    if not (remove or relabel or replace):
        raise CommandError("nothing to edit: give --remove, --relabel and/or --replace")
    refit = args.iterations > 0
    if args.data is None and (refit or any(r.dataset_index is not None for r in replace)):
        raise CommandError("--data is needed to re-fit the last layer (or pass --iterations 0) and to read @N images")
    train = dataset_for_model(model, args.data, "train") if args.data else None
    test = dataset_for_model(model, args.data, "test") if args.data and not args.no_test else None
    report = edit_model(
        model, train, remove=remove, relabel=relabel, replace=replace, test_dataset=test, refit=refit,
        iterations=args.iterations, lr=args.lr, seed=args.seed, settings=run_settings(args),
    )
    path = save_edited_model(model, args.out, pictures=report.pictures)
    print(json.dumps({"out": str(path), "prototypes": model.num_prototypes, "accuracy_before": report.accuracy_before, "accuracy_after": report.accuracy_after}))
    return 0
