#!/usr/bin/env python
"""The stability grid with SGD + momentum 0.9: how the methods fare for momentum users.

The same models, seeds, methods, run protocol and report as ``stability.py``, with
``optimizer="sgd_momentum"`` and every learning rate 10x lower (``gradbench.workloads.
STABILITY_MOMENTUM``: momentum multiplies the steady-state step by 1 / (1 - 0.9) = 10, so the
grid again spans comfortable to far too high). Runs are cached in
``benchmarks/.cache/stability_momentum/``; the report goes to
``benchmarks/results/stability_momentum.{md,png}``.

Usage::

    python benchmarks/stability_momentum.py            # full grid, resumable
    python benchmarks/stability_momentum.py --quick    # smoke run

Any other option of ``stability.py`` works the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradbench import cli
from gradbench.workloads import STABILITY_MOMENTUM


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(STABILITY_MOMENTUM, argv)


if __name__ == "__main__":
    sys.exit(main())
