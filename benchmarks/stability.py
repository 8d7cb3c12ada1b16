#!/usr/bin/env python
"""Stability benchmark: does each anti-explosion method keep training alive, and at what cost?

Grid: the three demo models (``DeepMLP``, ``ResidualMLP``, ``AddingProblemRNN`` LSTM) x a
log-spaced range of plain-SGD learning rates, from comfortable to ~100x too high x seeds x
methods (``gradbench.workloads.STABILITY``; methods in ``gradbench/methods.py``). Per run (one
``Trainer.fit`` for a fixed number of optimizer steps): validation loss and ``val_mae`` before
and after, *diverged*, *non-finite steps* and per-step traces (``gradbench/run.py``). Every run
is cached (``benchmarks/.cache/stability/``), so the grid can be built up over several
invocations; the report is always regenerated from everything cached for the requested grid.

Usage::

    python benchmarks/stability.py --quick              # smoke run (< 60 s, temp dirs)
    python benchmarks/stability.py                      # full grid (resumable), then report
    python benchmarks/stability.py --models LSTM --seeds 0 1 2 --methods none gradguard
    python benchmarks/stability.py --methods "gradguard(recovery_steps=100)"   # a variant
    python benchmarks/stability.py --report-only        # regenerate md/png from the cache

Needs ``zclip==1.0.0``, ``autoclip==0.2.1`` and ``matplotlib`` (the ``bench`` extra).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradbench import cli
from gradbench.workloads import STABILITY


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(STABILITY, argv)


if __name__ == "__main__":
    sys.exit(main())
