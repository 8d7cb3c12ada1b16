#!/usr/bin/env python
"""Rescue-without-harm benchmark (issue 14): realistic workloads, peers at their defaults.

Workloads (``gradbench/rescue.py``): word LSTM LM (SGD lr 20), decoder-only transformer LMs
(AdamW; pre-/post-LN, with/without warmup), a ResNet with BatchNorm (SGD momentum), an IRNN
on the adding problem, a user's healthy MLP (SGD; also 2,000 steps), and healthy MLP runs
(Adam and SGD) with one injected NaN / Inf / x1e6 batch. Each at its tuned LR and x3, x10,
x30 (the fault workloads at the tuned LR), seeds as asked. Methods (``gradbench/methods.py``):
``none``, ``clip1`` (``clip<v>`` any value; ``clip0.25`` is the LSTM recipe's own), ``zclip``,
``autoclip_p10``, ``agc``, ``gradguard`` and ``gradguard(...)`` variants.

Each run is one ``Trainer.fit`` of a fixed number of optimizer steps (``gradbench.run``);
metric: the module's validation loss after training (``diverged``: non-finite or above the
initial one). Runs are cached under ``benchmarks/.cache/rescue/runs/``, keyed by the run's
configuration, the hash of ``gradbench/rescue.py`` and, for methods that run library code,
the hash of the library's sources: a changed library or workload reruns, nothing else does.

The train / validation split is fixed in ``benchmarks/results/rescue_split.md`` (``--set``).

Usage::

    python benchmarks/rescue.py --quick                        # smoke run (seconds)
    python benchmarks/rescue.py --set tuning                   # the tuning set, then report
    python benchmarks/rescue.py --set validation               # once, at the end
    python benchmarks/rescue.py --workloads lstm_lm --seeds 0 --methods none gradguard
    python benchmarks/rescue.py --summary --methods gradguard "gradguard(...)"  # ablation table
    python benchmarks/rescue.py --split                        # the train / validation split
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradbench.rescue_cli import main

if __name__ == "__main__":
    sys.exit(main())
