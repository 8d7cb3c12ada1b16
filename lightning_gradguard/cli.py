"""The ``gradguard`` command line (also ``python -m lightning_gradguard``).

* ``gradguard demo [--model mlp] [--steps 300] [--logdir gradguard_runs]
  [--progress | --no-progress]`` — a model that explodes, trained without and with
  ``GradGuard()`` into a new ``LOGDIR/<model>/version_N`` folder; prints a side-by-side table
  and the ``tensorboard`` / ``gradguard report`` commands to look at it. The progress bar is
  shown only when stdout is a terminal, unless ``--progress`` / ``--no-progress`` says so.
* ``gradguard report LOGDIR [-o PNG]`` — a picture of what happened, from the event files
  (one panel per run folder under ``LOGDIR``).
* ``gradguard --version`` — the distribution name and version, e.g. ``lightning-gradguard 0.1.0``.

A problem with a path (a log directory that is a file, an output folder that cannot be
created or written, an image format matplotlib cannot write, ...) is one line on stderr,
``gradguard <command>: error: ...``, and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_gradguard._paths import writable_dir_problem

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


def _error(command: str, message: str) -> int:
    """Print ``message`` as one line on stderr; the exit status of a usage/path error."""
    text = " ".join(str(message).split())
    print(f"gradguard {command}: error: {text}", file=sys.stderr)
    return 2


def _os_error(err: OSError) -> str:
    """An ``OSError`` in words: the reason and the path, without the errno number."""
    reason = err.strerror or str(err)
    where = err.filename if err.filename is not None else ""
    return f"{reason}: {where}" if where != "" else reason


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
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="show Lightning's progress bar (default: only when stdout is a "
                      "terminal; without one the bar would print hundreds of lines)")
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
    from lightning_gradguard.demo import GUARDED_NAME, format_diagnosis, format_table, run_demo

    problem = writable_dir_problem(args.logdir)
    if problem is not None:
        return _error("demo", f"cannot write the logs to --logdir {args.logdir}: {problem}")
    print(f"gradguard demo: training '{args.model}' in its exploding configuration, "
          "first without a guard, then with GradGuard() ...", flush=True)
    try:
        results = run_demo(args.model, args.steps, args.logdir, progress=args.progress)
    except OSError as err:
        return _error("demo", f"cannot write the logs to --logdir {args.logdir}: "
                      f"{_os_error(err)}")
    version_dir = Path(results[0].log_dir).parent
    print()
    print(format_table(results))
    print()
    guarded = [r for r in results if r.name == GUARDED_NAME]
    why = format_diagnosis(guarded[-1]) if guarded else ""
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
        check_logdir,
        check_output,
        render_report,
        scan_logdir,
        scan_notes,
        summarize,
    )

    output = args.output or str(Path(args.logdir) / "gradguard_report.png")
    try:
        check_logdir(args.logdir)  # before the output: a wrong LOGDIR is the first problem
        check_output(output)
        scan = scan_logdir(args.logdir)
        notes = scan_notes(scan)
        if not scan.runs:
            raise ReportError(
                f"found event files under {scan.root} but no run has gradguard tags "
                f"({'; '.join(notes)}); train with GradGuard() or GradientMonitor() and a "
                "TensorBoardLogger")
        path = render_report(scan.runs, output, notes)
    except ReportError as err:
        return _error("report", str(err))
    except OSError as err:
        return _error("report", _os_error(err))
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
