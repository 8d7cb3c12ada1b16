"""GuardCore's state: counters, streaks and the backoff window; the saved layout; listeners."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lightning_gradguard.core import FixedNormClip, GuardCore, Streaks
from lightning_gradguard.core.decide import Decision
from lightning_gradguard.core.guard import StepReport
from lightning_gradguard.core.measure import Measurement


def _sgd_guard(**settings: Any) -> tuple[torch.nn.Linear, GuardCore]:
    model = torch.nn.Linear(3, 1)
    return model, GuardCore(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)


def _grads(model: torch.nn.Module, value: float) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, value)


def _saved_state(halted: bool) -> dict[str, Any]:
    """A state of this release's layout with a non-finite streak, a window and a halt flag."""
    _, guard = _sgd_guard()
    state = guard.state_dict()
    state["counters"].update(steps=9, nonfinite_steps=3, skipped_steps=3, spikes=2,
                             clipped_steps=2, lr_backoffs=3, amp_overflow_steps=1,
                             halted=halted, reasons={"nonfinite_repeat": 3})
    state["streaks"] = {"nonfinite": 2, "nonfinite_start": 8, "amp": 1, "amp_start": 4,
                        "last_nonfinite": 9, "clipped": [6, 7]}
    state["spike_steps"] = [6, 7]
    state["explainer"]["first_nonfinite_step"] = 5
    return state


def test_a_saved_state_loads_every_field() -> None:
    _, guard = _sgd_guard()
    guard.load_state_dict(_saved_state(halted=False))
    assert guard.summary() == {
        "steps": 9, "nonfinite_steps": 3, "skipped_steps": 3, "spikes": 2,
        "clipped_steps": 2, "lr_backoffs": 3, "growth_events": 0, "rollbacks": 0,
        "amp_overflow_steps": 1, "halted": False, "lr_scale": 1.0, "diagnosis": [],
        "reasons": {"nonfinite_repeat": 3}}
    assert guard.streaks == Streaks(nonfinite=2, nonfinite_start=8, amp=1, amp_start=4,
                                    last_nonfinite=9, clipped=(6, 7))
    assert guard.spike_steps == (6, 7)
    assert guard.first_nonfinite_step == 5
    assert guard.resumed is True


def test_a_halted_state_resumes_as_a_fresh_attempt() -> None:
    _, guard = _sgd_guard()
    guard.load_state_dict(_saved_state(halted=True))
    assert guard.counters.halted is False
    assert guard.streaks == Streaks()
    assert guard.counters.steps == 9
    assert guard.counters.reasons == {"nonfinite_repeat": 3}


@pytest.mark.parametrize("version", [None, 0, 2])
def test_a_state_of_another_layout_is_refused_and_nothing_loaded(version: Any) -> None:
    state = _saved_state(halted=False)
    if version is None:
        del state["version"]
    else:
        state["version"] = version
    _, guard = _sgd_guard()
    with pytest.raises(ValueError, match=rf"GuardCore state has version {version!r}, this "
                       r"lightning_gradguard reads version 1: it was saved by another release"):
        guard.load_state_dict(state)
    assert guard.counters.steps == 0
    assert guard.resumed is False


def test_a_state_missing_a_declared_key_is_refused() -> None:
    state = _saved_state(halted=False)
    del state["loss_trend"]
    _, guard = _sgd_guard()
    with pytest.raises(KeyError, match=r"GuardCore\.load_state_dict: missing keys "
                       r"\['loss_trend'\]"):
        guard.load_state_dict(state)


def test_the_layout_is_the_version_and_the_declared_state() -> None:
    """One layout: ``version`` and every declared part, each once (the snapshot with rollback,
    the diagnostician's findings with a diagnostician)."""
    _, guard = _sgd_guard()
    state = guard.state_dict()
    assert list(state) == ["version", "counters", "streaks", "spike_steps", "policy", "backoff",
                           "growth", "update_control", "loss_trend", "explainer"]
    assert state["version"] == 1
    assert list(state["policy"]) == ["type", "state"]
    assert state["policy"]["type"] == "ZScoreClip"
    assert list(state["explainer"]) == ["first_nonfinite_step", "first_diagnosis",
                                        "preflight_done", "diagnosed_events", "causes",
                                        "diagnostician"]
    assert _sgd_guard(diagnose=False)[1].state_dict()["explainer"] == {
        "first_nonfinite_step": None, "first_diagnosis": None}
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    full = GuardCore(net, torch.optim.SGD(net.parameters(), lr=0.1), rollback=True).state_dict()
    assert list(full)[-2:] == ["snapshot", "explainer"]
    assert full["snapshot"] == {"step": None, "model": None, "optim": []}


def test_a_state_saved_without_rollback_or_diagnosis_loads_those_fresh() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = GuardCore(net, opt, rollback=True, snapshot_every=1)
    net(torch.ones(2, 3)).sum().backward()
    guard.step()
    assert guard.snapshot is not None
    assert guard.snapshot.available
    assert guard.preflight_done
    plain = _saved_state(halted=False)  # no snapshot, no diagnostician
    guard.load_state_dict(plain)
    assert not guard.snapshot.available
    assert not guard.preflight_done
    assert guard.counters.steps == 9


def test_round_trip_keeps_streaks_window_and_update_control() -> None:
    model, guard = _sgd_guard(spike_patience=5)
    for v in (0.1, 0.1, 0.1, math.nan, math.nan, 50.0, 0.1, math.nan):
        _grads(model, v)
        guard.step()
    state = guard.state_dict()
    _, fresh = _sgd_guard(spike_patience=5)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.streaks == guard.streaks == Streaks(nonfinite=1, nonfinite_start=8,
                                                     last_nonfinite=8, clipped=(6,))
    assert fresh.summary() == guard.summary()


def test_summary_is_the_counters_and_the_lr_scale() -> None:
    model, guard = _sgd_guard()
    _grads(model, math.inf)
    guard.step()
    summary = guard.summary()
    assert summary == {
        "steps": 1, "nonfinite_steps": 1, "skipped_steps": 1, "spikes": 0,
        "clipped_steps": 0, "lr_backoffs": 0, "growth_events": 0, "rollbacks": 0,
        "amp_overflow_steps": 0, "halted": False, "lr_scale": 1.0,
        "diagnosis": [], "reasons": {}}  # isolated: one skip


def test_listeners_see_every_step_once() -> None:
    model, guard = _sgd_guard()
    seen: list[tuple[Measurement, Decision, StepReport]] = []
    guard.listeners.append(lambda m, d, r: seen.append((m, d, r)))
    for v in (0.1, math.nan):
        _grads(model, v)
        report = guard.step()
        assert seen[-1][2] is report
    assert [(d.path, r.step) for _, d, r in seen] == [("finite", 1), ("nonfinite", 2)]


def test_reset_starts_over() -> None:
    model, guard = _sgd_guard()
    _grads(model, math.nan)
    guard.step()
    guard.reset()
    _, fresh = _sgd_guard()
    assert guard.state_dict() == fresh.state_dict()


def test_round_trip_keeps_the_loss_trend() -> None:
    model, guard = _sgd_guard()
    for k in range(30):
        _grads(model, 0.1)
        guard.step(torch.tensor(10.0 - 0.2 * k))
    assert guard.loss_trend.improving
    state = guard.state_dict()
    assert state["loss_trend"]["first"] == 10.0
    _, fresh = _sgd_guard()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.loss_trend.improving


def _growing(losses: list[float] | None, steps: int = 40) -> list[int]:
    """Steps backed off for a gradient that is flat for 15 steps, then grows 20 % a step,
    every step clipped (evidence (b)); the loss as given."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=1e-3)
    guard = GuardCore([p], opt, clip=FixedNormClip(1e-3), growth_patience=5,
                      spike_patience=0, max_update_ratio=None)
    backoffs = []
    for t in range(steps):
        p.grad = torch.full((4,), 1.2 ** max(t - 15, 0))
        loss = None if losses is None else torch.tensor(losses[t])
        if guard.step(loss).backoff:
            backoffs.append(t)
        opt.step()
    return backoffs


def test_a_falling_loss_rules_out_growth_backoffs_at_the_full_lr() -> None:
    # the same growing gradient, every step clipped: with a loss that keeps falling no growth
    # backoff (the trend shows from the 11th loss on, before the growth starts)
    falling = _growing([20.0 - 0.4 * t for t in range(40)])
    rising = _growing([1.0 + 0.4 * t for t in range(40)])
    assert rising == _growing(None) == [20, 25, 30, 35]
    assert falling == []


def test_once_backed_off_a_falling_loss_does_not_stop_a_backoff() -> None:
    # the LR backed off by a repeated non-finite step: spikes that return while it recovers
    # are answered (evidence (c)), however the loss goes
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=1e-3)
    guard = GuardCore([p], opt, growth_patience=0, spike_patience=3, max_update_ratio=None,
                      nonfinite_window=0)
    backoffs = []
    for t in range(40):
        p.grad = torch.full((4,), math.nan if t == 12 else 1e4 if t in (30, 32, 34) else 1.0)
        if guard.step(torch.tensor(20.0 - 0.4 * t)).backoff:
            backoffs.append(t)
        opt.step()
    assert guard.loss_trend.improving
    assert backoffs == [12, 34]


# ----------------------------------------------------------------- issue 27: the layout's helpers
def test_another_version_is_refused_with_the_exact_message() -> None:
    import re

    from lightning_gradguard.core.guard_state import check_version

    _, guard = _sgd_guard()
    state = guard.state_dict()
    state["version"] = 0
    with pytest.raises(ValueError, match="^" + re.escape(
            "GuardCore state has version 0, this lightning_gradguard reads version 1: it was "
            "saved by another release; resume without the guard's state (drop it from the "
            "checkpoint) to start its statistics afresh") + "$"):
        guard.load_state_dict(state)
    with pytest.raises(ValueError, match=re.escape("has version None, ")):
        check_version({})
    check_version({"version": 1})  # this layout: accepted


def test_loaded_counters_do_not_share_the_states_reasons() -> None:
    from lightning_gradguard.core.guard_state import counters_from_state

    state = _saved_state(halted=False)["counters"]
    counters = counters_from_state(state)
    assert counters.reasons == {"nonfinite_repeat": 3}
    counters.reasons["update_capped"] = 1
    counters.reasons["nonfinite_repeat"] += 1
    assert state["reasons"] == {"nonfinite_repeat": 3}

