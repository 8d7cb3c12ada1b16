"""The decision at its edges: every boundary of the table, with the whole decision checked.

``tests/core/test_decide.py`` names one row of the table per case and checks the fields
that row is about. Here each case sits on a boundary (a norm equal to the threshold, an
update equal to the cap, the last step of a window, the step before a halt...) and every
flag of the :class:`Decision` not listed must be ``False``: a flag set by mistake fails too.
The streaks are compared on their two counts and start steps.
"""

from __future__ import annotations

from typing import Any

import pytest

from lightning_gradguard.core.clip import clip_coef
from lightning_gradguard.core.decide import Action, Decision, GuardState
from lightning_gradguard.core.measure import Measurement
from lightning_gradguard.core.streaks import Streaks
from lightning_gradguard.core.update_cap import UpdateLimit

from ._decide_cases import INF, NAN, STEP, meas, run

FLAGS = ("observe", "spike", "growth", "hold_growth", "skip", "backoff", "recover",
         "rollback", "snapshot", "halt", "diagnose")


def streaks(nonfinite: int = 0, nonfinite_start: int | None = None, amp: int = 0,
            amp_start: int | None = None) -> Streaks:
    return Streaks(nonfinite=nonfinite, nonfinite_start=nonfinite_start, amp=amp,
                   amp_start=amp_start)


def four(s: Streaks) -> tuple[int, int | None, int, int | None]:
    return (s.nonfinite, s.nonfinite_start, s.amp, s.amp_start)


def check(d: Decision, expected: dict[str, Any]) -> None:
    got = {k: four(d.streaks) if k == "streaks" else getattr(d, k) for k in expected}
    assert got == expected
    raised = [f for f in FLAGS if f not in expected and getattr(d, f)]
    assert raised == [], f"flags set but not expected: {raised}"


CLEAN = dict(path="finite", action=Action.NONE, observe=True, recover=True, scales=())

# (id, measurement, state, settings, expected: the listed fields; other flags False)
CASES: list[tuple[str, Measurement, GuardState, dict[str, Any], dict[str, Any]]] = [
    # ---- finite steps: threshold, cap and unit-wise boundaries
    ("norm equal to the threshold: no spike", meas(grad_norm=2.0), GuardState(), {},
     dict(CLEAN, clipped_norm=2.0, threshold=2.0, spike_steps=())),
    ("norm just above the threshold: a spike",
     meas(grad_norm=2.0 * (1 + 1e-9)), GuardState(), {},
     dict(path="finite", action=Action.CLIP, observe=True, spike=True,
          scales=(clip_coef(2.0 * (1 + 1e-9), 2.0),), spike_steps=(STEP,))),
    ("update equal to the cap: not capped",
     meas(grad_norm=1.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)), GuardState(),
     {}, dict(CLEAN, clipped_norm=1.0, threshold=INF, spike_steps=())),
    ("unit-wise clip within rounding: no clip",
     meas(grad_norm=4.0, clipped_norm=4.0 * (1 - 1e-7), threshold=INF, unitwise=True),
     GuardState(), {}, dict(CLEAN, clipped_norm=4.0 * (1 - 1e-7))),
    ("unit-wise clip at exactly the rounding tolerance: no clip",
     meas(grad_norm=4.0, clipped_norm=4.0 * (1 - 1e-6), threshold=INF, unitwise=True),
     GuardState(), {}, dict(CLEAN, clipped_norm=4.0 * (1 - 1e-6))),
    ("unit-wise clip beyond rounding: a clip",
     meas(grad_norm=4.0, clipped_norm=4.0 * (1 - 1e-5), threshold=INF, unitwise=True),
     GuardState(), {},
     dict(path="finite", action=Action.CLIP, observe=True, recover=True, scales=())),
    ("unit-wise clip and the cap: capped after the unit-wise clip",
     meas(grad_norm=4.0, clipped_norm=2.0, threshold=INF, unitwise=True,
          limit=UpdateLimit(cap=1.0, far=10.0)), GuardState(), {},
     dict(path="finite", action=Action.CLIP, observe=True, recover=True,
          scales=(clip_coef(2.0, 1.0),), clipped_norm=2.0 * clip_coef(2.0, 1.0),
          threshold=1.0, spike_steps=(STEP,))),
    ("cap above the clipped spike: one clip, no cap",
     meas(grad_norm=8.0, threshold=2.0, limit=UpdateLimit(cap=3.0, far=10.0)), GuardState(),
     {}, dict(path="finite", action=Action.CLIP, observe=True, spike=True,
              scales=(clip_coef(8.0, 2.0),), threshold=2.0, spike_steps=(STEP,))),
    ("spike clipped to exactly the cap: one clip, the cap not applied",
     meas(grad_norm=8.0, threshold=2.0,
          limit=UpdateLimit(cap=8.0 * clip_coef(8.0, 2.0), far=10.0)), GuardState(), {},
     dict(path="finite", action=Action.CLIP, observe=True, spike=True,
          scales=(clip_coef(8.0, 2.0),), threshold=2.0, spike_steps=(STEP,))),
    ("small spike (far) but capped: counted once, by the cap",
     meas(grad_norm=8.0, threshold=4.0, limit=UpdateLimit(cap=1.0, far=0.1)), GuardState(),
     {}, dict(action=Action.CLIP, observe=True, spike=True, threshold=1.0,
              spike_steps=(STEP,))),
    ("params not measured: no snapshot", meas(params_finite=None), GuardState(), {},
     dict(CLEAN, path="finite")),
    ("GradScaler step that is finite: an ordinary step", meas(amp_overflow=True),
     GuardState(), {}, dict(CLEAN, streaks=(0, None, 0, None))),
    # ---- the spike window and the count
    ("a spike one step inside the window still counts", meas(grad_norm=8.0),
     GuardState(spike_steps=(STEP - 49,)), {"spike_window": 50},
     dict(observe=True, spike=True, spike_steps=(STEP - 49, STEP))),
    ("steps leave the window on clean steps too", meas(),
     GuardState(spike_steps=(STEP - 50, STEP - 49)), {"spike_window": 50},
     dict(CLEAN, spike_steps=(STEP - 49,))),
    ("one spike short of spike_patience: no backoff", meas(grad_norm=8.0),
     GuardState(spike_steps=(9,)), {"spike_patience": 3},
     dict(observe=True, spike=True, spike_steps=(9, STEP))),
    ("cap hits reach spike_patience: back off, window cleared",
     meas(grad_norm=3.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(spike_steps=(9,)), {"spike_patience": 2},
     dict(observe=True, backoff=True, spike_steps=(), action=Action.CLIP)),
    ("spike_patience=1: the first counted spike backs off",
     meas(grad_norm=3.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)), GuardState(),
     {"spike_patience": 1}, dict(observe=True, backoff=True, spike_steps=())),
    ("lr_backoff=False: counted cap hits pile up",
     meas(grad_norm=3.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(spike_steps=(8, 9)), {"lr_backoff": False, "spike_patience": 2},
     dict(observe=True, recover=True, backoff=False, spike_steps=(8, 9, STEP))),
    # ---- growth
    ("growth with lr_backoff=False: reported, no backoff", meas(),
     GuardState(growth_fires=True), {"lr_backoff": False},
     dict(CLEAN, growth=True, hold_growth=False)),
    # growth counts, but a backoff needs evidence that the LR is too high (here: the LR is
    # already backed off); without it the growth is reported and nothing else happens
    ("growth_patience=1: growth counts", meas(), GuardState(growth_fires=True, lr_scale=0.5),
     {"growth_patience": 1}, dict(observe=True, growth=True, backoff=True)),
    ("growth_patience=1 without evidence: reported, no backoff", meas(),
     GuardState(growth_fires=True), {"growth_patience": 1}, dict(CLEAN, growth=True)),
    ("growth_patience=0 with small updates: nothing held", meas(limit=UpdateLimit(cap=100.0,
                                                                                  far=10.0)),
     GuardState(growth_fires=True), {"growth_patience": 0}, dict(CLEAN)),
    # ---- non-finite gradient or loss (lr_backoff=False: the backoff rule has its own cases)
    ("non-finite: the report keeps threshold, window and the norm",
     meas(grad_norm=INF, threshold=3.0), GuardState(spike_steps=(4,), diagnosed=True),
     {"lr_backoff": False},
     dict(path="nonfinite", action=Action.SKIP, skip=True, threshold=3.0, clipped_norm=INF,
          spike_steps=(4,), scales=(), streaks=(1, STEP, 0, None))),
    ("non-finite loss, finite gradient: its finite norm reported",
     meas(grad_norm=1.5, loss=NAN), GuardState(diagnosed=True), {"lr_backoff": False},
     dict(path="nonfinite", skip=True, clipped_norm=1.5)),
    ("non-finite before non-finite weights", meas(grad_norm=INF, params_finite=False),
     GuardState(diagnosed=True), {"lr_backoff": False}, dict(path="nonfinite", skip=True)),
    ("rollback every rollback_after in a row (6th of 3)", meas(grad_norm=INF),
     GuardState(streaks=streaks(5, 1), diagnosed=True), {"lr_backoff": False},
     dict(skip=True, rollback=True, streaks=(6, 1, 0, None))),
    ("no rollback between (4th of 3)", meas(grad_norm=INF),
     GuardState(streaks=streaks(3, 1), diagnosed=True), {"lr_backoff": False},
     dict(skip=True, rollback=False)),
    ("rollback_after=1: every one", meas(grad_norm=INF), GuardState(diagnosed=True),
     {"lr_backoff": False, "rollback_after": 1}, dict(skip=True, rollback=True)),
    ("one short of halt_after: no halt, no diagnosis", meas(grad_norm=INF),
     GuardState(streaks=streaks(3, 1), diagnosed=True), {"lr_backoff": False,
                                                          "halt_after": 5},
     dict(skip=True, halt=False, diagnose=False)),
    ("past halt_after: halt and diagnose again", meas(grad_norm=INF),
     GuardState(streaks=streaks(7, 1), diagnosed=True), {"lr_backoff": False,
                                                          "halt_after": 5, "rollback_after": 9},
     dict(skip=True, halt=True, diagnose=True)),
    ("halt_after=1: the first one halts", meas(grad_norm=INF), GuardState(),
     {"lr_backoff": False, "halt_after": 1},
     dict(skip=True, halt=True, diagnose=True)),
    ("skip_nonfinite=False: nothing cleared, no action", meas(grad_norm=INF),
     GuardState(diagnosed=True), {"lr_backoff": False, "skip_nonfinite": False},
     dict(path="nonfinite", action=Action.NONE, skip=False)),
    # ---- GradScaler overflow
    ("overflow with a finite loss: left to the scaler",
     meas(grad_norm=INF, amp_overflow=True, loss=0.5, threshold=3.0),
     GuardState(streaks=streaks(2, 7), spike_steps=(4,)), {},
     dict(path="amp_overflow", action=Action.AMP_SKIP, threshold=3.0, clipped_norm=INF,
          spike_steps=(4,), scales=(), streaks=(2, 7, 1, STEP))),
    ("one overflow short of amp_halt_after: no halt",
     meas(grad_norm=INF, amp_overflow=True), GuardState(streaks=streaks(0, None, 5, 1)),
     {"amp_halt_after": 7}, dict(path="amp_overflow", streaks=(0, None, 6, 1))),
    ("amp_halt_after=1: the first overflow halts", meas(grad_norm=INF, amp_overflow=True),
     GuardState(), {"amp_halt_after": 1},
     dict(path="amp_overflow", halt=True, diagnose=True)),
    # ---- non-finite weights
    ("non-finite weights, lr_backoff=False: skip and restore only",
     meas(grad_norm=2.5, threshold=3.0, params_finite=False),
     GuardState(streaks=streaks(0, 2, 1, 3), spike_steps=(4,)), {"lr_backoff": False},
     dict(path="nonfinite_weights", action=Action.SKIP, skip=True, rollback=True,
          threshold=3.0, clipped_norm=2.5, spike_steps=(4,), scales=(),
          streaks=(0, 2, 0, 3))),
    # ---- nothing measured
    ("empty: streaks, window and reports left as they are",
     meas(grad_norm=0.0, threshold=5.0, clipped_norm=0.0, empty=True),
     GuardState(streaks=streaks(2, 3, 1, 4), spike_steps=(7,), growth_fires=True), {},
     dict(path="empty", action=Action.NONE, threshold=5.0, clipped_norm=0.0,
          spike_steps=(7,), scales=(), streaks=(2, 3, 1, 4))),
    ("empty comes first, even with a NaN norm",
     meas(grad_norm=NAN, threshold=INF, empty=True), GuardState(), {},
     dict(path="empty", action=Action.NONE)),
]


@pytest.mark.parametrize(("m", "state", "settings", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision_edges(m: Measurement, state: GuardState, settings: dict[str, Any],
                        expected: dict[str, Any]) -> None:
    check(run(m, state, **settings), expected)
