"""The ``gradguard`` command line (also ``python -m lightning_gradguard``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Stop exploding gradients from wrecking Lightning training runs.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_subparsers(dest="command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from lightning_gradguard import __version__

        print(__version__)
        return 0
    parser.print_help()
    return 0
