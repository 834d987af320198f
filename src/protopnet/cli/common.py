"""What the subcommands share: argument helpers, datasets for a model, progress bars."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import DATA_SPEC_HELP, DataSpecError
from ..data import dataset_for_model as _dataset_for_model
from ..runtime import ProgressBars, RunSettings

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..model.protopnet import ProtoPNet

DATA_HELP = DATA_SPEC_HELP


class CommandError(Exception):
    """A failure to report as one line and a non-zero exit code."""


def add_parser(subparsers: Any, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A subcommand parser whose --help ends with a real example."""
    return subparsers.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example (after `protopnet demo --out demo-out`):\n  {example}" if "demo-out/" in example else f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")


def run_settings(args: argparse.Namespace) -> RunSettings:
    """The :class:`~protopnet.runtime.RunSettings` of ``--batch-size`` and ``--workers`` (see
    :func:`add_device_arguments`); the device is the loaded model's (``--device`` placed it)."""
    return RunSettings(batch_size=args.batch_size, num_workers=args.workers)


def add_interpretability_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--interpretability [METRICS]``: bare, every metric; or a comma-separated list of names
    from :data:`protopnet.interpretability.METRICS`. Read it with :func:`interpretability_metrics`."""
    from ..interpretability import METRICS

    parser.add_argument(
        "--interpretability", nargs="?", const="all", default=None, metavar="METRICS",
        help=f"{help}; bare: all metrics, or a comma-separated list of {', '.join(METRICS)}",
    )


def interpretability_metrics(value: str | None) -> tuple[str, ...] | None:
    """The metrics ``--interpretability`` asks for: None when it was not given, all of
    :data:`~protopnet.interpretability.METRICS` when bare (or ``all``), else the names listed
    (order kept, repeats dropped).

    Raises:
        CommandError: a name that is not a metric, or a list naming none (one line, listing the allowed names).
    """
    from ..interpretability import METRICS

    if value is None:
        return None
    if value.strip() == "all":
        return tuple(METRICS)
    names = list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    allowed = ", ".join(METRICS)
    if not names:
        raise CommandError(f"--interpretability {value!r} names no metric; choose from {allowed} (or give none for all)")
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        hint = " (a path? put --interpretability after the model directory)" if any("/" in n or Path(n).exists() for n in unknown) else ""
        raise CommandError(f"--interpretability: unknown metric {', '.join(map(repr, unknown))}{hint}; choose from {allowed}")
    return tuple(names)


def progress_factory(quiet: bool = False) -> ProgressBars | None:
    """The ``progress_bars`` of the commands (:data:`protopnet.runtime.ProgressBars`): tqdm bars
    on stderr, or None when quiet."""
    if quiet or not sys.stderr:
        return None
    from tqdm.auto import tqdm

    def make(description: str, total: int) -> Any:
        return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)

    return make


def load_model_or_fail(path: str, device: str = "cpu") -> Any:
    from ..checkpoint import CheckpointError, load_model
    from ..runtime import resolve_device

    try:
        return load_model(path, device=resolve_device(device))
    except CheckpointError as error:
        raise CommandError(str(error)) from None


def dataset_for_model(model: ProtoPNet | Ensemble, spec: str, split: str, **kwargs: Any) -> Any:
    """:func:`protopnet.data.dataset_for_model` for ``--data spec``: its refusals become one-line
    :class:`CommandError` messages naming ``--data``."""
    try:
        return _dataset_for_model(model, spec, split, **kwargs)
    except DataSpecError as error:
        raise CommandError(f"--data {error}") from None
