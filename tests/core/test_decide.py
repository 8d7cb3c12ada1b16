"""The decision as a table: :func:`decide` on hand-made measurements, no model, no tensor.

Each case names the row of the decision table (``core/decide.py``) it exercises and the
exact decision expected.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from lightning_gradguard.core.clip import clip_coef
from lightning_gradguard.core.decide import Action, GuardState, Reason, decide
from lightning_gradguard.core.measure import Measurement
from lightning_gradguard.core.settings import GuardSettings
from lightning_gradguard.core.streaks import Streaks
from lightning_gradguard.core.update_cap import UpdateLimit

from ._decide_cases import INF, NAN, STEP, meas, run

# (id, measurement, state, settings, expected fields of the decision)
CASES: list[tuple[str, Measurement, GuardState, dict[str, Any], dict[str, Any]]] = [
    ("empty: nothing", meas(grad_norm=0.0, threshold=INF, empty=True),
     GuardState(streaks=Streaks(nonfinite=2)), {},
     dict(path="empty", action=Action.NONE, observe=False, recover=False, skip=False,
          streaks=Streaks(nonfinite=2))),
    ("clean step: observe, recover, streaks end", meas(),
     GuardState(streaks=Streaks(nonfinite=2, nonfinite_start=3, amp=4, amp_start=1)), {},
     dict(path="finite", action=Action.NONE, observe=True, recover=True, backoff=False,
          spike=False, scales=(), streaks=Streaks(0, 3, 0, 1), clipped_norm=1.0)),
    ("isolated non-finite gradient: skip, no backoff, diagnose the first",
     meas(grad_norm=NAN), GuardState(), {},
     dict(path="nonfinite", action=Action.SKIP, skip=True, backoff=False, rollback=False,
          halt=False, diagnose=True, observe=False, recover=False,
          streaks=Streaks(nonfinite=1, nonfinite_start=STEP, last_nonfinite=STEP))),
    ("isolated non-finite loss, finite gradient: the same", meas(loss=INF), GuardState(), {},
     dict(path="nonfinite", action=Action.SKIP, skip=True, backoff=False)),
    ("second non-finite step in a row: back off", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(nonfinite=1, nonfinite_start=STEP - 1,
                                last_nonfinite=STEP - 1), diagnosed=True), {},
     dict(path="nonfinite", skip=True, backoff=True,
          streaks=Streaks(nonfinite=2, nonfinite_start=STEP - 1, last_nonfinite=STEP))),
    ("another non-finite step within nonfinite_window: back off", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(nonfinite_start=STEP - 49, last_nonfinite=STEP - 49),
                diagnosed=True), {},
     dict(backoff=True, streaks=Streaks(nonfinite=1, nonfinite_start=STEP,
                                        last_nonfinite=STEP))),
    ("the last non-finite step nonfinite_window steps ago: isolated", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(nonfinite_start=STEP - 50, last_nonfinite=STEP - 50),
                diagnosed=True), {}, dict(backoff=False)),
    ("nonfinite_window=3: a step 2 steps later backs off", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(last_nonfinite=STEP - 2), diagnosed=True),
     {"nonfinite_window": 3}, dict(backoff=True)),
    ("nonfinite_window=3: a step 3 steps later does not", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(last_nonfinite=STEP - 3), diagnosed=True),
     {"nonfinite_window": 3}, dict(backoff=False)),
    ("nonfinite_window=0: every non-finite step backs off", meas(grad_norm=NAN),
     GuardState(), {"nonfinite_window": 0}, dict(path="nonfinite", backoff=True)),
    ("non-finite, skip_nonfinite=False: gradients kept", meas(grad_norm=INF), GuardState(),
     {"skip_nonfinite": False},
     dict(path="nonfinite", action=Action.NONE, skip=False, backoff=False)),
    ("non-finite, lr_backoff=False: no backoff, even repeated", meas(grad_norm=INF),
     GuardState(streaks=Streaks(nonfinite=1, last_nonfinite=STEP - 1)),
     {"lr_backoff": False}, dict(path="nonfinite", backoff=False)),
    ("GradScaler overflow does not count as an earlier non-finite step",
     meas(grad_norm=NAN), GuardState(streaks=Streaks(amp=3, amp_start=STEP - 3)), {},
     dict(path="nonfinite", backoff=False)),
    ("non-finite, not the first: no diagnosis", meas(grad_norm=NAN),
     GuardState(diagnosed=True), {}, dict(diagnose=False)),
    ("rollback_after-th non-finite in a row: roll back", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(nonfinite=2, nonfinite_start=8, last_nonfinite=9),
                diagnosed=True), {},
     dict(rollback=True, halt=False, backoff=True,
          streaks=Streaks(nonfinite=3, nonfinite_start=8, last_nonfinite=STEP))),
    ("halt_after-th non-finite in a row: halt and diagnose", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(nonfinite=4), diagnosed=True), {"halt_after": 5},
     dict(halt=True, diagnose=True, rollback=False)),
    ("halt_after=0: never halt", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(nonfinite=99), diagnosed=True), {"halt_after": 0},
     dict(halt=False, diagnose=False)),
    ("GradScaler overflow: left to the scaler", meas(grad_norm=INF, amp_overflow=True),
     GuardState(streaks=Streaks(nonfinite=2)), {},
     dict(path="amp_overflow", action=Action.AMP_SKIP, skip=False, backoff=False,
          halt=False, diagnose=False, streaks=Streaks(nonfinite=2, amp=1, amp_start=STEP))),
    ("GradScaler overflow with a non-finite loss: a real non-finite step",
     meas(grad_norm=INF, loss=NAN, amp_overflow=True), GuardState(), {},
     dict(path="nonfinite", action=Action.SKIP)),
    ("amp_halt_after-th overflow in a row: halt", meas(grad_norm=INF, amp_overflow=True),
     GuardState(streaks=Streaks(amp=6, amp_start=1)), {"amp_halt_after": 7},
     dict(path="amp_overflow", halt=True, diagnose=True)),
    ("overflow streak with halt_after=0: no halt", meas(grad_norm=INF, amp_overflow=True),
     GuardState(streaks=Streaks(amp=60)), {"halt_after": 0}, dict(halt=False)),
    ("non-finite weights: skip, back off, restore", meas(params_finite=False),
     GuardState(streaks=Streaks(nonfinite=1)), {},
     dict(path="nonfinite_weights", action=Action.SKIP, skip=True, backoff=True,
          rollback=True, observe=False, snapshot=False, streaks=Streaks(nonfinite=0))),
    ("finite weights measured: snapshot", meas(params_finite=True), GuardState(), {},
     dict(path="finite", snapshot=True)),
    ("spike: clip to the threshold, counted", meas(grad_norm=8.0), GuardState(), {},
     dict(action=Action.CLIP, spike=True, scales=(clip_coef(8.0, 2.0),),
          clipped_norm=8.0 * clip_coef(8.0, 2.0), threshold=2.0, spike_steps=(STEP,),
          recover=False, backoff=False)),
    ("small SGD spike: clipped, not counted",
     meas(grad_norm=8.0, limit=UpdateLimit(cap=100.0, far=10.0)), GuardState(), {},
     dict(action=Action.CLIP, spike=True, spike_steps=())),
    ("LR 0: a spike never counts", meas(grad_norm=8.0, limit=UpdateLimit(cap=INF, far=10.0)),
     GuardState(), {}, dict(spike=True, spike_steps=())),
    ("update over the cap: clip to the cap, counted like a spike",
     meas(grad_norm=3.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(), {},
     dict(action=Action.CLIP, spike=False, scales=(clip_coef(3.0, 1.0),), threshold=1.0,
          clipped_norm=3.0 * clip_coef(3.0, 1.0), spike_steps=(STEP,), recover=True)),
    ("spike and cap: two clips, counted once",
     meas(grad_norm=8.0, threshold=4.0, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(), {},
     dict(scales=(clip_coef(8.0, 4.0), clip_coef(8.0 * clip_coef(8.0, 4.0), 1.0)),
          threshold=1.0, spike_steps=(STEP,))),
    ("spike_patience-th spike, no evidence: clipped, no backoff, count restarts",
     meas(grad_norm=8.0), GuardState(spike_steps=(5, 9)), {"spike_patience": 3},
     dict(action=Action.CLIP, backoff=False, spike_steps=(), recover=False,
          streaks=Streaks(clipped=(STEP,)))),
    ("spike_patience-th spike, 4 of the last 10 clipped (step 0 left): no evidence yet",
     meas(grad_norm=8.0), GuardState(streaks=Streaks(clipped=(0, 5, 7, 9)),
                                     spike_steps=(5, 9)), {"spike_patience": 3},
     dict(backoff=False, spike_steps=(), streaks=Streaks(clipped=(5, 7, 9, STEP)))),
    ("(b) spike_patience-th spike, 5 of the last 10 clipped: back off",
     meas(grad_norm=8.0), GuardState(streaks=Streaks(clipped=(0, 2, 5, 7, 9)),
                                     spike_steps=(5, 9)), {"spike_patience": 3},
     dict(backoff=True, spike_steps=(), recover=False,
          streaks=Streaks(clipped=(2, 5, 7, 9, STEP)))),
    ("(c) spike_patience-th spike while the LR is backed off: back off",
     meas(grad_norm=8.0), GuardState(spike_steps=(5, 9), lr_scale=0.99),
     {"spike_patience": 3}, dict(backoff=True, spike_steps=())),
    ("(a) spike_patience-th counted step capped by the update cap: back off",
     meas(grad_norm=3.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(spike_steps=(5, 9)), {"spike_patience": 3},
     dict(action=Action.CLIP, backoff=True, spike_steps=(), recover=False)),
    ("(a) spike and cap on the spike_patience-th: back off in the same step",
     meas(grad_norm=8.0, threshold=4.0, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(spike_steps=(5, 9)), {"spike_patience": 3},
     dict(backoff=True, spike_steps=(), recover=False)),
    ("capped but below spike_patience: clipped, no backoff",
     meas(grad_norm=3.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(spike_steps=(9,)), {"spike_patience": 3},
     dict(backoff=False, spike_steps=(9, STEP))),
    ("loss improving at the full LR: (b) evidence, spike_patience-th spike: clipped, "
     "no backoff, count restarts",
     meas(grad_norm=8.0), GuardState(streaks=Streaks(clipped=(0, 2, 5, 7, 9)),
                                     spike_steps=(5, 9), loss_improving=True),
     {"spike_patience": 3},
     dict(action=Action.CLIP, backoff=False, spike_steps=(), recover=False)),
    ("loss improving at the full LR: (a) a capped update still backs off",
     meas(grad_norm=3.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(spike_steps=(5, 9), loss_improving=True), {"spike_patience": 3},
     dict(action=Action.CLIP, backoff=True, spike_steps=())),
    ("loss improving while the LR is backed off: (c) backs off", meas(grad_norm=8.0),
     GuardState(spike_steps=(5, 9), lr_scale=0.99, loss_improving=True),
     {"spike_patience": 3}, dict(backoff=True, spike_steps=())),
    ("loss improving at the full LR: sustained growth, 5 of 10 clipped: no backoff", meas(),
     GuardState(growth_fires=True, streaks=Streaks(clipped=(2, 4, 6, 8, 9)),
                loss_improving=True), {},
     dict(growth=True, backoff=False)),
    ("loss improving: a second non-finite step in a row still backs off",
     meas(grad_norm=NAN),
     GuardState(streaks=Streaks(nonfinite=1, nonfinite_start=STEP - 1,
                                last_nonfinite=STEP - 1), diagnosed=True,
                loss_improving=True), {},
     dict(path="nonfinite", skip=True, backoff=True)),
    ("evidence alone is no trigger: 9 of 10 clipped, LR backed off, one spike",
     meas(grad_norm=8.0), GuardState(streaks=Streaks(clipped=tuple(range(1, 10))),
                                     lr_scale=0.5), {},
     dict(backoff=False, spike_steps=(STEP,))),
    ("spikes out of the window do not count", meas(grad_norm=8.0),
     GuardState(spike_steps=(STEP - 50, 9)), {"spike_patience": 3, "spike_window": 50},
     dict(backoff=False, spike_steps=(9, STEP))),
    ("spike_patience=0: never back off on spikes", meas(grad_norm=8.0),
     GuardState(spike_steps=(8, 9)), {"spike_patience": 0}, dict(backoff=False)),
    ("lr_backoff=False: no backoff", meas(grad_norm=8.0), GuardState(spike_steps=(8, 9)),
     {"lr_backoff": False}, dict(backoff=False, spike_steps=(8, 9, STEP))),
    ("sustained growth, no evidence: counted, no backoff", meas(),
     GuardState(growth_fires=True), {},
     dict(growth=True, hold_growth=False, backoff=False, recover=True)),
    ("(c) sustained growth while the LR is backed off: back off", meas(),
     GuardState(growth_fires=True, lr_scale=0.5), {},
     dict(growth=True, backoff=True, recover=False)),
    ("(b) sustained growth, 5 of the last 10 clipped: back off", meas(),
     GuardState(growth_fires=True, streaks=Streaks(clipped=(2, 4, 6, 8, 9))), {},
     dict(growth=True, backoff=True)),
    ("(a) sustained growth at a capped update: back off",
     meas(grad_norm=3.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(growth_fires=True), {}, dict(growth=True, backoff=True)),
    ("growth with small SGD updates: held, no backoff",
     meas(limit=UpdateLimit(cap=100.0, far=10.0)), GuardState(growth_fires=True), {},
     dict(growth=False, hold_growth=True, backoff=False, recover=True)),
    ("growth_patience=0: growth ignored", meas(), GuardState(growth_fires=True),
     {"growth_patience": 0}, dict(growth=False, hold_growth=False, backoff=False)),
    ("unit-wise policy clipped during the measurement: a clip without scales",
     meas(grad_norm=4.0, threshold=INF, clipped_norm=2.0, unitwise=True), GuardState(), {},
     dict(action=Action.CLIP, scales=(), clipped_norm=2.0, spike=False)),
]


@pytest.mark.parametrize(("m", "state", "settings", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision_table(m: Measurement, state: GuardState, settings: dict[str, Any],
                        expected: dict[str, Any]) -> None:
    d = run(m, state, **settings)
    got = {k: getattr(d, k) for k in expected}
    assert got == expected


def test_every_path_of_the_table_is_covered() -> None:
    paths = {run(c[1], c[2], **c[3]).path for c in CASES}
    assert paths == {"empty", "finite", "nonfinite", "amp_overflow", "nonfinite_weights"}


def test_decide_is_pure() -> None:
    m, state, s = meas(grad_norm=8.0), GuardState(spike_steps=(9,)), GuardSettings()
    before = (m._asdict(), dataclasses.asdict(state), repr(s), s.policy.state_dict())
    assert decide(m, state, s) == decide(m, state, s)
    assert (m._asdict(), dataclasses.asdict(state), repr(s),
            s.policy.state_dict()) == before


def test_streaks_state_machine() -> None:
    s = Streaks()
    s = s.on_nonfinite(3).on_nonfinite(4).on_amp_overflow(5)
    assert s == Streaks(nonfinite=2, nonfinite_start=3, amp=1, amp_start=5, last_nonfinite=4)
    s = s.on_finite()
    assert s == Streaks(nonfinite=0, nonfinite_start=3, amp=0, amp_start=5, last_nonfinite=4)
    assert s.on_nonfinite(9).nonfinite_start == 9
    assert s.on_nonfinite(9).last_nonfinite == 9


def test_clip_history_keeps_the_last_ten_steps() -> None:
    s = Streaks()
    assert s.on_finite(1) is s  # the usual step allocates nothing
    for t in (1, 2, 5, 11):
        s = s.on_finite(t, clipped=True)
    assert s.clipped == (2, 5, 11)  # step 1 is 10 steps before 11
    assert s.on_finite(14).clipped == (5, 11)
    assert s.on_finite(21).clipped == ()
    assert s.on_nonfinite(12).clipped == (2, 5, 11)  # a skipped step leaves it alone


# (id, measurement, state, settings, the decision's reason)
REASONS: list[tuple[str, Measurement, GuardState, dict[str, Any], Reason | None]] = [
    ("clean step: none", meas(), GuardState(), {}, None),
    ("isolated non-finite step: a skip, no reason", meas(grad_norm=NAN), GuardState(), {},
     None),
    ("second non-finite step in the window", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(last_nonfinite=STEP - 1), diagnosed=True), {},
     Reason.NONFINITE_REPEAT),
    ("nonfinite_window=0: every non-finite step", meas(grad_norm=NAN), GuardState(),
     {"nonfinite_window": 0}, Reason.NONFINITE_REPEAT),
    ("the halt outranks the backoff it comes with", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(nonfinite=2, last_nonfinite=STEP - 1), diagnosed=True),
     {"halt_after": 3}, Reason.HALT),
    ("lr_backoff=False: a repeat is no backoff, no reason", meas(grad_norm=NAN),
     GuardState(streaks=Streaks(last_nonfinite=STEP - 1), diagnosed=True),
     {"lr_backoff": False}, None),
    ("GradScaler streak at amp_halt_after", meas(grad_norm=INF, amp_overflow=True, loss=1.0),
     GuardState(streaks=Streaks(amp=2)), {"amp_halt_after": 3}, Reason.AMP_HALT),
    ("non-finite weights", meas(params_finite=False), GuardState(), {},
     Reason.NONFINITE_WEIGHTS),
    ("non-finite weights, lr_backoff=False: no backoff, no reason",
     meas(params_finite=False), GuardState(), {"lr_backoff": False}, None),
    ("(a) third counted step, this update capped: update capped",
     meas(grad_norm=3.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(spike_steps=(8, 9)), {}, Reason.UPDATE_CAPPED),
    ("(a) beats (b) and (c)",
     meas(grad_norm=3.0, threshold=INF, limit=UpdateLimit(cap=1.0, far=10.0)),
     GuardState(spike_steps=(8, 9), lr_scale=0.5, streaks=Streaks(clipped=(5, 6, 7, 8, 9))),
     {}, Reason.UPDATE_CAPPED),
    ("(b) third spike, clipping is the rule: clipping the rule", meas(grad_norm=8.0),
     GuardState(spike_steps=(8, 9), streaks=Streaks(clipped=(5, 6, 7, 8))), {},
     Reason.CLIPPING_RULE),
    ("(c) third spike while backed off: already backed off", meas(grad_norm=8.0),
     GuardState(spike_steps=(8, 9), lr_scale=0.5), {}, Reason.ALREADY_BACKED_OFF),
    ("third spike without evidence: no backoff, no reason", meas(grad_norm=8.0),
     GuardState(spike_steps=(8, 9)), {}, None),
    ("growth with evidence: growth", meas(), GuardState(growth_fires=True, lr_scale=0.5), {},
     Reason.GROWTH),
    ("learning at the full LR, clipping the rule: no backoff, no reason", meas(grad_norm=8.0),
     GuardState(spike_steps=(8, 9), streaks=Streaks(clipped=(5, 6, 7, 8)),
                loss_improving=True), {}, None),
]


@pytest.mark.parametrize(("m", "state", "settings", "reason"), [c[1:] for c in REASONS],
                         ids=[c[0] for c in REASONS])
def test_every_backoff_and_halt_carries_its_reason(m: Measurement, state: GuardState,
                                                   settings: dict[str, Any],
                                                   reason: Reason | None) -> None:
    d = run(m, state, **settings)
    assert d.reason is reason
    # a reason exactly when the step halts or backs off
    assert (d.reason is not None) == (d.halt or d.backoff)


def test_every_reason_is_reached_by_the_table() -> None:
    assert {c[4] for c in REASONS} - {None} == set(Reason)


def test_windows_count_in_the_clock_not_the_callers_step() -> None:
    """With two optimizers the caller's step advances twice per step of each: the windows
    of one optimizer's guard count its own steps (the clock)."""
    # the last non-finite step 30 clock ticks ago, 60 of the caller's steps ago
    state = GuardState(streaks=Streaks(last_nonfinite=70), diagnosed=True, clock=100)
    d = run(meas(step=200, grad_norm=NAN), state)
    assert d.backoff is True
    assert d.streaks.last_nonfinite == 100
    assert d.streaks.nonfinite_start == 200
    # a spike is counted at its clock, and the window forgets by the clock
    d = run(meas(step=200, grad_norm=8.0), GuardState(spike_steps=(40, 80), clock=100))
    assert d.spike_steps == (80, 100)
    d = run(meas(step=200, grad_norm=8.0, threshold=2.0),
            GuardState(streaks=Streaks(clipped=(95,)), clock=100))
    assert d.streaks.clipped == (95, 100)


def test_a_nonfinite_step_at_the_clock_of_the_last_one_is_a_repeat() -> None:
    """The lower edge of ``nonfinite_window``: a last non-finite step 0 ticks before this
    one (the same clock) is within the window and backs off; one ahead of the clock (a clock
    restarted) is no repeat."""
    state = GuardState(streaks=Streaks(nonfinite=1, last_nonfinite=100), diagnosed=True,
                       clock=100)
    d = run(meas(step=201, grad_norm=NAN), state)
    assert d.backoff is True
    assert d.reason is Reason.NONFINITE_REPEAT
    ahead = GuardState(streaks=Streaks(last_nonfinite=101), diagnosed=True, clock=100)
    d = run(meas(step=201, grad_norm=NAN), ahead)
    assert d.backoff is False
    assert d.reason is None


def test_a_gradscaler_overflow_short_of_the_halt_has_no_reason() -> None:
    d = run(meas(grad_norm=INF, amp_overflow=True, loss=1.0),
            GuardState(streaks=Streaks(amp=1)), amp_halt_after=3)
    assert d.path == "amp_overflow"
    assert d.halt is False
    assert d.reason is None
