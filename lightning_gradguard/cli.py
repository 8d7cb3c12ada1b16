"""The ``gradguard`` command line (also ``python -m lightning_gradguard``).

* ``gradguard demo [--model lstm] [--steps N] [--logdir gradguard_runs]`` — a model that
  explodes, trained without and with ``GradGuard()``; prints a side-by-side table and the
  ``tensorboard`` / ``gradguard report`` commands to look at it.
* ``gradguard report LOGDIR [-o PNG]`` — a picture of what happened, from the event files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its sub-commands.

    Example:
        >>> build_parser().parse_args(["demo", "--steps", "5"]).steps
        5
    """
    from lightning_gradguard.demo import DEMO_MODELS

    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Stop exploding gradients from wrecking Lightning training runs.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="train a model that explodes, without and with GradGuard")
    demo.add_argument("--model", choices=DEMO_MODELS, default="lstm",
                      help="demo model (default: lstm, the adding problem)")
    demo.add_argument("--steps", type=int, default=None,
                      help="optimizer steps per run (default: the scenario's own)")
    demo.add_argument("--logdir", default="gradguard_runs", help="TensorBoard log directory")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    report = sub.add_parser("report", help="render a PNG of what happened from TensorBoard logs")
    report.add_argument("logdir", help="directory with TensorBoard event files (searched "
                        "recursively; one panel per run)")
    report.add_argument("-o", "--output", default=None,
                        help="PNG path (default: LOGDIR/gradguard_report.png)")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from lightning_gradguard.demo import format_table, run_demo

    print(f"gradguard demo: training '{args.model}' in its exploding configuration, "
          "first without a guard, then with GradGuard() ...", flush=True)
    results = run_demo(args.model, args.steps, args.logdir, progress=not args.no_progress)
    print()
    print(format_table(results))
    print()
    print("Look at it:")
    print(f"  tensorboard --logdir {args.logdir}")
    print(f"  gradguard report {args.logdir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lightning_gradguard.report import ReportError, load_runs, render_report, summarize

    try:
        runs = load_runs(args.logdir)
        output = args.output or str(Path(args.logdir) / "gradguard_report.png")
        path = render_report(runs, output)
    except ReportError as err:
        print(f"gradguard report: error: {err}", file=sys.stderr)
        return 2
    for run in runs:
        print(summarize(run))
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from lightning_gradguard import __version__

        print(__version__)
        return 0
    if args.command == "demo":
        return _demo(args)
    if args.command == "report":
        return _report(args)
    parser.print_help()
    return 0
