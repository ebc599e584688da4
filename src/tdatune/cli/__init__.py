"""The ``tdatune`` command line. Each sub-command lives in its own module with
``add_parser(subparsers)`` that registers it and sets ``func`` to the handler."""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order `tdatune --help` lists them.
COMMAND_MODULES = (
    "tdatune.cli.demo",
    "tdatune.cli.settings_cmd",
    "tdatune.cli.groundtruth_cmd",
    "tdatune.cli.sweep",
    "tdatune.cli.explain_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="tdatune",
        description="Training-data attribution with retraining-free hyperparameter selection.",
    )
    from tdatune import __version__

    parser.add_argument("--version", action="version", version=f"tdatune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tdatune`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"tdatune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is saved and the next run resumes from it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
