"""gradbench: the benchmarks of ``lightning_gradguard`` as a small package.

Layout (one concept per module; the scripts in ``benchmarks/`` are thin entry points):

=====================  =====================================================================
module                 what
=====================  =====================================================================
``workloads``          models, data and learning-rate grids (:class:`Workload`), and the
                       benchmark suites built from them (:class:`Suite`)
``methods``            the registry of anti-explosion methods (:class:`Method` objects, no
                       strings-as-code): ``none``, ``clip1``, ``zclip``, ``gradguard``, ...
``run``                one training run (:func:`run_one`), its monitor, and the run cache
                       (keyed by configuration and, for library-dependent methods, the
                       ``lightning_gradguard`` source hash)
``analysis``           ranks, per-cell statistics, summaries (pure functions of run records)
``targets``            every target of every benchmark, with its threshold, in one place
``render``             the stability report (markdown + PNG)
``cli``                the stability command line shared by ``stability.py`` and
                       ``stability_momentum.py``
``overhead``           the overhead benchmark: ``timing``, ``micro``, ``e2e``, ``memory``,
                       ``syncs`` measurements, ``render`` and ``cli``
=====================  =====================================================================

Adding a workload: a :class:`~gradbench.workloads.Workload` (or anything with its ``build``,
``model_kwargs`` and fields) in a :class:`~gradbench.workloads.Suite`. Adding a method:
:func:`~gradbench.methods.register` a :class:`~gradbench.methods.Method`.

``GG_STABILITY_LIB=<dir>`` imports ``lightning_gradguard`` from ``<dir>`` (e.g. a ``git
archive`` of a commit) instead of the working tree, so that concurrent edits cannot change a
long run; it must be set before this package is imported.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("GG_STABILITY_LIB"):
    sys.path.insert(0, os.environ["GG_STABILITY_LIB"])

__all__: list[str] = []
