"""``GuardCounters.record``: what each decision adds to the public counts (issue 27)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from lightning_gradguard.core.decide import Action, Decision, Reason
from lightning_gradguard.core.report import GuardCounters
from lightning_gradguard.core.streaks import Streaks


def _decision(**kw: Any) -> Decision:
    base: dict[str, Any] = {"path": "finite", "action": Action.NONE, "streaks": Streaks(),
                            "spike_steps": (), "threshold": 1.0, "clipped_norm": 1.0}
    return Decision(**{**base, **kw})


def test_reasons_are_counted_per_value() -> None:
    c = GuardCounters()
    c.record(_decision(backoff=True, reason=Reason.UPDATE_CAPPED))
    assert c.reasons == {"update_capped": 1}
    c.record(_decision(backoff=True, reason=Reason.UPDATE_CAPPED))
    c.record(_decision(backoff=True, reason=Reason.GROWTH))
    c.record(_decision(backoff=True, reason=Reason.UPDATE_CAPPED))
    c.record(_decision())  # no reason: nothing counted
    assert c.reasons == {"update_capped": 3, "growth": 1}
    assert c.lr_backoffs == 4


def test_each_flag_counts_once_and_nothing_else() -> None:
    c = GuardCounters()
    c.record(_decision(path="nonfinite", action=Action.SKIP, skip=True, halt=True,
                       reason=Reason.NONFINITE_REPEAT))
    c.record(_decision(path="amp_overflow", action=Action.AMP_SKIP))
    c.record(_decision(action=Action.CLIP, spike=True, growth=True))
    assert asdict(c) == {
        "steps": 0, "nonfinite_steps": 1, "skipped_steps": 1, "spikes": 1, "clipped_steps": 1,
        "lr_backoffs": 0, "growth_events": 1, "rollbacks": 0, "amp_overflow_steps": 1,
        "halted": True, "reasons": {"nonfinite_repeat": 1}}
