#!/usr/bin/env python
"""Overhead of GradGuard: guard work per step, end-to-end step time, memory, host syncs.

Sections ``micro``, ``e2e``, ``memory`` and ``syncs`` (see ``gradbench/overhead/__init__.py``
and ``benchmarks/README.md``); every baseline is measured in the same run, interleaved with
the method under test, after a warm-up, over at least 5 repeats; tables report medians and
ratios.

Usage::

    python benchmarks/overhead.py            # full run (< 10 min on 2 cores), writes
                                             # benchmarks/results/overhead.md
    python benchmarks/overhead.py --quick    # smoke run, prints the report only
    python benchmarks/overhead.py --sections e2e --e2e-models lstm --out /tmp/lstm.md

Needs ``zclip==1.0.0`` for the ZClip baselines (skipped with a note when missing).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradbench.overhead.cli import main

if __name__ == "__main__":
    sys.exit(main())
