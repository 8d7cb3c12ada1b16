"""The ``gradguard`` command line (also ``python -m lightning_gradguard``).

* ``gradguard demo [--model mlp] [--steps 300] [--logdir gradguard_runs] [--no-progress]`` —
  a model that explodes, trained without and with ``GradGuard()`` into a new
  ``LOGDIR/<model>/version_N`` folder; prints a side-by-side table and the ``tensorboard`` /
  ``gradguard report`` commands to look at it.
* ``gradguard report LOGDIR [-o PNG]`` — a picture of what happened, from the event files
  (one panel per run folder under ``LOGDIR``).
* ``gradguard --version`` — the distribution name and version, e.g. ``lightning-gradguard 0.1.0``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main", "positive_int"]

#: The distribution name (``pip install lightning-gradguard``), printed by ``--version``.
DISTRIBUTION = "lightning-gradguard"


def positive_int(text: str) -> int:
    """``argparse`` type: an integer ``>= 1`` (anything else is a usage error, no traceback).

    Example:
        >>> positive_int("3")
        3
        >>> positive_int("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be an integer >= 1, got '0'
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its sub-commands.

    Example:
        >>> build_parser().parse_args(["demo", "--steps", "5"]).steps
        5
    """
    from lightning_gradguard.demo import DEFAULT_MODEL, DEFAULT_STEPS, DEMO_MODELS

    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Stop exploding gradients from wrecking Lightning training runs.",
    )
    parser.add_argument("--version", action="store_true",
                        help=f"print '{DISTRIBUTION} VERSION' and exit")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser(
        "demo", help="train a model that explodes, without and with GradGuard",
        description="Train a model in a configuration that explodes, first without a guard "
        "(with GradientMonitor, to see its gradients), then with GradGuard(); print a table "
        "of both runs. Each call logs into a new LOGDIR/<model>/version_N folder.")
    demo.add_argument("--model", choices=DEMO_MODELS, default=DEFAULT_MODEL,
                      help="demo model: mlp = 8-layer MLP, SGD lr 0.1 (learns with the "
                      "guard); lstm/rnn = the adding problem, SGD lr 1 (kept finite, ends at "
                      "the trivial predictor); residual = residual MLP, SGD lr 0.01 "
                      f"(default: {DEFAULT_MODEL})")
    demo.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                      help=f"optimizer steps per run (default: {DEFAULT_STEPS})")
    demo.add_argument("--logdir", default="gradguard_runs",
                      help="TensorBoard log directory (default: gradguard_runs)")
    demo.add_argument("--no-progress", action="store_true",
                      help="hide the progress bar (use it without a terminal: the bar "
                      "otherwise prints hundreds of lines)")
    report = sub.add_parser(
        "report", help="render a PNG of what happened from TensorBoard logs",
        description="Draw one panel per run (each folder with event files under LOGDIR; "
        "the newest run per folder) and print each run's counters.")
    report.add_argument("logdir", help="directory with TensorBoard event files (searched "
                        "recursively; one panel per run folder)")
    report.add_argument("-o", "--output", default=None,
                        help="PNG path (default: LOGDIR/gradguard_report.png)")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from lightning_gradguard.demo import format_diagnosis, format_table, run_demo

    print(f"gradguard demo: training '{args.model}' in its exploding configuration, "
          "first without a guard, then with GradGuard() ...", flush=True)
    results = run_demo(args.model, args.steps, args.logdir, progress=not args.no_progress)
    version_dir = Path(results[0].log_dir).parent
    print()
    print(format_table(results))
    print()
    why = format_diagnosis(results[-1])
    if why:
        print(why)
        print()
    print(f"Logs: {version_dir}")
    print("Look at it:")
    print(f"  tensorboard --logdir {args.logdir}")
    print(f"  gradguard report {version_dir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lightning_gradguard.report import (
        ReportError,
        render_report,
        scan_logdir,
        scan_notes,
        summarize,
    )

    try:
        scan = scan_logdir(args.logdir)
        notes = scan_notes(scan)
        if not scan.runs:
            raise ReportError(
                f"found event files under {scan.root} but no run has gradguard tags "
                f"({'; '.join(notes)}); train with GradGuard() or GradientMonitor() and a "
                "TensorBoardLogger")
        output = args.output or str(Path(args.logdir) / "gradguard_report.png")
        path = render_report(scan.runs, output, notes)
    except ReportError as err:
        print(f"gradguard report: error: {err}", file=sys.stderr)
        return 2
    for run in scan.runs:
        print(summarize(run))
    for note in notes:
        print(note)
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from lightning_gradguard import __version__

        print(f"{DISTRIBUTION} {__version__}")
        return 0
    if args.command == "demo":
        return _demo(args)
    if args.command == "report":
        return _report(args)
    parser.print_help()
    return 0
