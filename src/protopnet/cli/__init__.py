"""The ``protopnet`` command: one subcommand per job, each a thin layer over the Python API.

Each subcommand lives in its own module exposing ``create_parser(subparsers)`` and
``execute(args) -> int``; :data:`COMMANDS` lists them in the order ``--help`` shows.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from .common import CommandError

COMMANDS = ("train", "evaluate", "push", "demo", "explain", "analyze", "prune", "ensemble", "edit", "export", "data", "push-to-hub", "serve")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="protopnet",
        description="Interpretable image classification with prototypical parts (ProtoPNet, 'This Looks Like That').",
        epilog="Run 'protopnet COMMAND --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"protopnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only, no progress bars")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
        except ModuleNotFoundError as error:
            if error.name == f"{__name__}.{name.replace('-', '_')}":
                continue  # a command not built into this installation
            raise
        sub = module.create_parser(subparsers)
        sub.set_defaults(execute=module.execute)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may come after options (argparse stops a positional list there).
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("PIL").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        return int(args.execute(args) or 0)
    except CommandError as error:
        print(f"protopnet {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"protopnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        logging.getLogger(__name__).debug("failure", exc_info=True)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"protopnet {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
