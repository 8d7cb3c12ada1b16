"""Builders shared by the decision-table tests (``test_decide.py``, ``test_decide_edges.py``)."""

from __future__ import annotations

import math
from typing import Any

from lightning_gradguard.core.decide import Decision, GuardState, decide
from lightning_gradguard.core.measure import Measurement
from lightning_gradguard.core.settings import GuardSettings

NAN, INF = math.nan, math.inf
#: the step number of a hand-made measurement
STEP = 10


def meas(**kw: Any) -> Measurement:
    """A measurement at :data:`STEP`, norm 1 under threshold 2, unless given."""
    kw.setdefault("step", STEP)
    kw.setdefault("grad_norm", 1.0)
    kw.setdefault("threshold", 2.0)
    kw.setdefault("clipped_norm", kw["grad_norm"])
    return Measurement(**kw)


def run(m: Measurement, state: GuardState | None = None, **settings: Any) -> Decision:
    """:func:`decide` on ``m`` with ``state`` (default: fresh) and settings from keywords."""
    return decide(m, state or GuardState(), GuardSettings(**settings))
