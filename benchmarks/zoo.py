"""The zoo benchmark: GradGuard on recipes drawn from real model definitions.

    python benchmarks/zoo.py --set tuning             # the tuning draws (defaults chosen here)
    python benchmarks/zoo.py --set validation         # the validation draws (reported once)
    python benchmarks/zoo.py --quick                  # smoke run (2 recipes, 30 steps)
    python benchmarks/zoo.py --set tuning --gradguard "gradguard(max_update_ratio=None)"

Per recipe (``gradbench/zoo.py`` draws them; the split is by generator seed):

* **healthy**: the recipe's LR (its optimizer family's documented default; for the SGD
  family the best of a sweep without a guard); no guard vs ``GradGuard()``;
* **too high**: the LR x10 and x30; every peer (``none``, ``clip1``, ``zclip``,
  ``autoclip_p10``, ``agc``) and ``GradGuard()``;
* **faults**: the healthy LR with one NaN loss, one Inf gradient or one x1e6 loss at the
  middle step; ``GradGuard()``.

Runs are cached (``benchmarks/.cache/zoo``, one JSON per run; GradGuard runs are redone when
the library's sources change). The report (``benchmarks/results/zoo_<set>.md``) states every
target with its result and lists every miss.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradbench.zoo_cli import main

if __name__ == "__main__":
    sys.exit(main())
