from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from support.core import batches, loss_fn
from support.modules import make_net
from support.state import assert_state_equal, opt_tensors, params_of

from lightning_gradguard.core import _host
from lightning_gradguard.core.clip import skip_step_
from lightning_gradguard.core.guard import Action, GuardCore, GuardSettings, StepReport
from lightning_gradguard.core.norms import grad_norms
from lightning_gradguard.core.policies import (
    AdaptiveGradClip,
    ClipPolicy,
    FixedNormClip,
    NoClip,
    PercentileClip,
    ZScoreClip,
)

NAN = float("nan")
INF = float("inf")
DATA = batches(80)


def _adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)


def nan_in(name: str, value: float = NAN) -> Callable[[torch.nn.Module], None]:
    def fault(model: torch.nn.Module) -> None:
        g = dict(model.named_parameters())[name].grad
        assert g is not None
        g.view(-1)[0] = value

    return fault


def scale_all(factor: float) -> Callable[[torch.nn.Module], None]:
    def fault(model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    return fault


@dataclass
class Run:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    guard: GuardCore
    reports: dict[int, StepReport] = field(default_factory=dict)
    before: dict[int, tuple[list[torch.Tensor], dict[str, Any]]] = field(default_factory=dict)
    after: dict[int, tuple[list[torch.Tensor], dict[str, Any]]] = field(default_factory=dict)
    lr_in_step: dict[int, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


def run(
    steps: int,
    *,
    faults: dict[int, Callable[[torch.nn.Module], None]] | None = None,
    skip_at: tuple[int, ...] = (),
    record: tuple[int, ...] = (),
    make_opt: Callable[[torch.nn.Module], torch.optim.Optimizer] = _adam,
    start: Run | None = None,
    first_step: int = 1,
    pass_loss: bool = True,
    **settings: Any,
) -> Run:
    """Plain training loop; ``faults[t]`` corrupts the gradients of step ``t`` after backward.

    Steps in ``skip_at`` are skipped without calling the guard (the reference runs). Without
    ``pass_loss`` the guard judges by the gradients alone (no loss trend).
    """
    faults = faults or {}
    if start is None:
        model = make_net(seed=0)
        opt = make_opt(model)
        r = Run(model, opt, GuardCore(model, opt, **settings))
    else:
        r = start
    for t in range(first_step, first_step + steps):
        loss = loss_fn(r.model, DATA[(t - 1) % len(DATA)])
        r.losses.append(float(loss.detach()))
        loss.backward()
        if t in faults:
            faults[t](r.model)
        if t in skip_at:
            skip_step_(r.model.parameters())
            r.opt.step()
            continue
        if t in record:
            r.before[t] = (params_of(r.model), opt_tensors(r.opt))
        r.reports[t] = r.guard.step(loss.detach() if pass_loss else None)
        r.lr_in_step[t] = r.opt.param_groups[0]["lr"]
        r.opt.step()
        r.opt.zero_grad(set_to_none=True)
        if t in record:
            r.after[t] = (params_of(r.model), opt_tensors(r.opt))
    return r


_REFERENCE_RUNS: dict[tuple[Any, ...], Run] = {}


def reference_run(steps: int, *, skip_at: tuple[int, ...] = (), **settings: Any) -> Run:
    """A clean run, shared between tests (deterministic; callers only read its reports)."""
    key = (steps, skip_at, tuple(sorted(settings.items())))
    if key not in _REFERENCE_RUNS:
        _REFERENCE_RUNS[key] = run(steps, skip_at=skip_at, **settings)
    return _REFERENCE_RUNS[key]


def _finite_params(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ----------------------------------------------------------------------------- plain loop
def test_plain_loop_trains_and_reports() -> None:
    r = run(60)
    assert len(r.reports) == 60
    assert [rep.step for rep in r.reports.values()] == list(range(1, 61))
    assert all(rep.finite for rep in r.reports.values())
    assert all(rep.action in (Action.NONE, Action.CLIP) for rep in r.reports.values())
    assert r.reports[1].threshold == INF  # nothing seen yet
    assert all(math.isfinite(rep.threshold) for t, rep in r.reports.items() if t > 1)
    assert r.losses[-1] < 0.5 * r.losses[0]
    s = r.guard.summary()
    assert s["steps"] == 60
    assert s["nonfinite_steps"] == 0
    assert s["skipped_steps"] == 0
    assert s["clipped_steps"] == sum(rep.action is Action.CLIP for rep in r.reports.values())
    assert r.guard.first_diagnosis is None
    assert r.guard.halt_message == ""
    for rep in r.reports.values():
        assert rep.loss is not None
        assert math.isfinite(rep.loss)
        assert rep.grad_norm_clipped <= rep.grad_norm * (1 + 1e-6)
        if rep.action is Action.NONE:
            assert rep.grad_norm_clipped == rep.grad_norm


def test_report_grad_norm_matches_torch() -> None:
    model = make_net(seed=0)
    opt = _adam(model)
    guard = GuardCore(model, opt, clip=NoClip())
    loss_fn(model, DATA[0]).backward()
    ref = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    rep = guard.step()
    assert math.isclose(rep.grad_norm, ref, rel_tol=1e-6)
    assert rep.loss is None
    guard_inf = GuardCore(model, None, clip=NoClip(), norm_type=INF)
    ref_inf = max(float(p.grad.abs().max()) for p in model.parameters())  # type: ignore[union-attr]
    assert guard_inf.step(loss=0.5).grad_norm == pytest.approx(ref_inf, rel=1e-6)
    assert guard_inf.last_report is not None
    assert guard_inf.last_report.loss == 0.5


# ----------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("k", [3, 40])
@pytest.mark.parametrize("window", [50, 0])
def test_nonfinite_grad_is_skipped_exactly(k: int, bad: float, window: int) -> None:
    # default window: an isolated non-finite step costs the skip only; 0: it backs off too
    backs_off = window == 0
    r = run(k + 5, faults={k: nan_in("2.weight", bad)}, record=(k,),
            spike_patience=0, growth_patience=0, nonfinite_window=window)
    rep = r.reports[k]
    assert rep.action is Action.SKIP
    assert not rep.finite
    assert not math.isfinite(rep.grad_norm)
    assert rep.backoff is backs_off
    assert rep.lr_scale == (0.5 if backs_off else 1.0)
    # weights and optimizer state are bit-identical to before the step
    assert_state_equal(r.after[k][0], r.before[k][0])
    assert_state_equal(r.after[k][1]["state"], r.before[k][1]["state"])
    c = r.guard.counters
    assert c.nonfinite_steps == 1
    assert c.skipped_steps == 1
    assert c.lr_backoffs == int(backs_off)
    assert r.guard.first_nonfinite_step == k
    assert r.guard.summary()["lr_backoffs"] == int(backs_off)
    d = r.guard.first_diagnosis
    assert d is not None
    assert d is rep.diagnosis
    assert d.step == k
    assert d.nonfinite_params == ("2.weight",)
    assert d.origin == "2.weight"
    assert "2.weight" in d.message()
    assert _finite_params(r.model)
    assert all(rep2.finite for t, rep2 in r.reports.items() if t != k)
    # recovery: clean steps move the scale back up; each update used lr * report.lr_scale
    scales = [r.reports[t].lr_scale for t in range(k + 1, k + 6)]
    if backs_off:
        assert all(0.5 <= x < 1.0 for x in scales)
        assert scales == sorted(scales)
        assert scales[-1] > 0.5
    else:
        assert scales == [1.0] * 5
    for t in range(k + 1, k + 6):
        assert r.lr_in_step[t] == pytest.approx(1e-2 * r.reports[t].lr_scale, rel=1e-12)
    assert r.opt.param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("k", [3, 40])
def test_threshold_after_skipped_fault_equals_reference(k: int, bad: float) -> None:
    """A skipped non-finite step leaves the guard's statistics untouched.

    Reference: the same run where step ``k`` is clean but skipped without the guard (so the
    weights follow the same trajectory). Without LR backoff both runs are identical.
    """
    kw = {"lr_backoff": False}
    a = run(60, faults={k: nan_in("0.weight", bad)}, **kw)
    b = reference_run(60, skip_at=(k,), **kw)
    assert a.reports[k].action is Action.SKIP
    for t in range(k + 1, 61):
        ta, tb = a.reports[t].threshold, b.reports[t].threshold
        assert math.isclose(ta, tb, rel_tol=0.01), t
        assert ta == tb, t  # in fact exactly
        assert a.reports[t].grad_norm == b.reports[t].grad_norm
    assert_state_equal(params_of(a.model), params_of(b.model))
    assert _finite_params(a.model)  # equal and finite: NaN == NaN would not do


@pytest.mark.parametrize("k", [3, 20])
def test_skipped_fault_leaves_no_trace_with_an_active_update_cap(k: int) -> None:
    """Plain SGD at an LR where ``max_update_ratio`` clips most steps: the weight norm it
    is measured against is read on a schedule of finite steps, so a skipped step does not
    shift it and the run continues exactly like the reference that skipped the step unseen."""
    def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=3.0)

    kw: dict[str, Any] = {"lr_backoff": False, "make_opt": sgd}
    a = run(60, faults={k: nan_in("0.weight")}, **kw)
    b = run(60, skip_at=(k,), **kw)
    capped = [t for t in range(k + 1, 61) if a.reports[t].grad_norm_clipped
              < a.reports[t].grad_norm * (1 - 1e-6)]
    assert len(capped) > 20  # the cap really acts in this run
    for t in range(k + 1, 61):
        assert a.reports[t].grad_norm_clipped == b.reports[t].grad_norm_clipped, t
        assert a.reports[t].threshold == b.reports[t].threshold, t
    assert_state_equal(params_of(a.model), params_of(b.model))
    assert _finite_params(a.model)  # equal and finite: NaN == NaN would not do


@pytest.mark.parametrize("k", [3, 40])
def test_threshold_after_skipped_fault_with_backoff(k: int) -> None:
    """With LR backoff (default) the halved LR changes the trajectory a little."""
    a = run(60, faults={k: nan_in("0.weight")})
    b = run(60, skip_at=(k,))
    rel = abs(a.reports[60].threshold - b.reports[60].threshold) / b.reports[60].threshold
    assert rel < 0.05, rel


@pytest.mark.parametrize("k", [3, 40])
def test_spike_is_clipped_to_threshold(k: int) -> None:
    r = run(k + 3, faults={k: scale_all(1e6)}, spike_patience=0, growth_patience=0)
    ref = reference_run(60, spike_patience=0, growth_patience=0)
    rep = r.reports[k]
    assert rep.action is Action.CLIP
    assert rep.spike
    assert rep.finite
    assert math.isfinite(rep.threshold)
    assert math.isclose(rep.grad_norm, 1e6 * ref.reports[k].grad_norm, rel_tol=1e-4)
    assert math.isclose(rep.grad_norm_clipped, rep.threshold, rel_tol=1e-5)
    assert rep.threshold == ref.reports[k].threshold  # judged by the history before it
    assert not rep.backoff
    assert _finite_params(r.model)
    assert r.guard.counters.spikes >= 1
    assert r.guard.counters.clipped_steps >= 1


def test_spike_gradient_actually_rescaled() -> None:
    model = make_net(seed=0)
    opt = _adam(model)
    guard = GuardCore(model, opt, clip=FixedNormClip(0.5))
    loss_fn(model, DATA[0]).backward()
    scale_all(1e6)(model)
    rep = guard.step()
    assert rep.action is Action.CLIP
    actual = float(grad_norms([p.grad for p in model.parameters()]).total)  # type: ignore[misc]
    assert math.isclose(actual, 0.5, rel_tol=1e-5)
    assert math.isclose(rep.grad_norm_clipped, actual, rel_tol=1e-5)


@pytest.mark.parametrize("k", [3, 40])
def test_threshold_after_clipped_spike_equals_skipped_reference(k: int) -> None:
    """A clipped x1e6 spike barely moves the threshold.

    Reference: the same run where step ``k`` is clean but skipped without the guard. The
    isolated spike does not enter the statistics, so the thresholds agree exactly right
    after it; later they differ only by the trajectory (the clipped update is a real one).
    During warmup it is clipped to ``warmup_factor`` (10) x the mean norm, a larger update
    than after warmup, so the trajectories differ more. Measured: 0 at k+1; at most 3.7%
    (k=3) / 0.15% (k=40) by step 60.
    """
    kw = {"spike_patience": 0, "growth_patience": 0}
    a = run(60, faults={k: scale_all(1e6)}, **kw)
    b = reference_run(60, skip_at=(k,), **kw)
    assert a.reports[k].action is Action.CLIP
    assert a.reports[k + 1].threshold == b.reports[k + 1].threshold
    bound = 0.05 if k < 25 else 0.01
    for t in range(k + 1, 61):
        rel = abs(a.reports[t].threshold / b.reports[t].threshold - 1)
        assert rel < bound, (t, rel)


# Against a run without any fault (step k clean and taken), the faulty run lacks step k's
# norm in its statistics. Measured (this model/data): k=40: +0.67% at k+1, +0.40% at
# step 60; k=3 (2 observations so far): +6.3% at k+1, +2.0% at k+10, +3.3% at step 60 (the
# spike was clipped to 10x the mean norm, the warmup bound: a larger update).
@pytest.mark.parametrize(("k", "bound_next", "bound_end"), [(40, 0.01, 0.01), (3, 0.10, 0.05)])
def test_threshold_after_clipped_spike_close_to_clean_run(
    k: int, bound_next: float, bound_end: float
) -> None:
    kw = {"spike_patience": 0, "growth_patience": 0}
    a = run(60, faults={k: scale_all(1e6)}, **kw)
    b = reference_run(60, **kw)
    nxt = abs(a.reports[k + 1].threshold / b.reports[k + 1].threshold - 1)
    end = abs(a.reports[60].threshold / b.reports[60].threshold - 1)
    assert nxt < bound_next, nxt
    assert end < bound_end, end


# ----------------------------------------------------------------------------- halt
def test_halt_after_consecutive_nonfinite() -> None:
    k = 10
    faults = {t: nan_in("2.bias") for t in range(k, k + 5)}
    r = run(k + 2, faults=faults, halt_after=3)
    assert not r.reports[k].halt
    assert not r.reports[k + 1].halt
    rep = r.reports[k + 2]
    assert rep.halt
    assert rep.action is Action.SKIP
    assert rep.diagnosis is not None
    assert rep.diagnosis.step == k + 2
    assert r.guard.counters.halted
    assert r.guard.summary()["halted"] is True
    msg = r.guard.halt_message
    assert msg
    assert f"step {k}" in msg  # the first non-finite step
    assert "2.bias" in msg  # the parameter
    assert str(k + 2) in msg  # the halting step
    assert "3 consecutive non-finite steps" in msg


def test_streak_reset_by_clean_step_and_halt_zero_never_halts() -> None:
    faults = {4: nan_in("0.weight"), 5: nan_in("0.weight"), 7: nan_in("0.weight"),
              8: nan_in("0.weight")}
    r = run(10, faults=faults, halt_after=3)
    assert not any(rep.halt for rep in r.reports.values())
    assert r.guard.halt_message == ""
    never = run(40, faults={t: nan_in("0.weight") for t in range(2, 41)}, halt_after=0)
    assert not any(rep.halt for rep in never.reports.values())
    assert never.guard.counters.nonfinite_steps == 39


# ----------------------------------------------------------------------------- rollback
def test_rollback_restores_snapshot() -> None:
    model = make_net(seed=0)
    opt = _adam(model)
    guard = GuardCore(model, opt, rollback=True, snapshot_every=1, rollback_after=2)
    r = Run(model, opt, guard)
    r = run(4, start=r)
    # step 5: the snapshot is taken inside guard.step (before the update)
    loss = loss_fn(model, DATA[4])
    loss.backward()
    rep5 = guard.step(loss.detach())
    assert guard.snapshot is not None
    assert guard.snapshot.step == 5
    snap_params = params_of(model)
    snap_opt = opt_tensors(opt)
    opt.step()
    opt.zero_grad()
    assert rep5.finite
    with torch.no_grad():
        model[0].weight.view(-1)[3] = NAN  # corrupt the weights
    r = run(2, start=r, first_step=6)
    assert r.reports[6].action is Action.SKIP
    assert not r.reports[6].rollback
    assert r.reports[7].rollback
    assert guard.counters.rollbacks == 1
    assert_state_equal(params_of(model), snap_params)
    assert_state_equal(opt.state_dict()["state"], snap_opt["state"])
    r = run(10, start=r, first_step=8)
    assert all(r.reports[t].finite for t in range(8, 18))
    assert _finite_params(model)


def test_no_snapshot_of_nonfinite_params() -> None:
    model = make_net(seed=0)
    opt = _sgd(model)
    guard = GuardCore(model, opt, rollback=True, snapshot_every=1)
    run(3, start=Run(model, opt, guard))
    assert guard.snapshot is not None
    assert guard.snapshot.step == 3
    with torch.no_grad():
        model[1 - 1].bias.fill_(INF)  # weights non-finite, grads may still be finite
    loss_fn(model, DATA[0]).backward()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # finite grads
    rep = guard.step()
    assert rep.finite
    assert guard.snapshot.step == 3  # not replaced by the corrupt state


# ----------------------------------------------------------------------------- growth
def test_geometric_growth_triggers_backoff() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=1e-3)
    # the detector alone: with the SGD update cap these updates (< 1 % of the weights)
    # would not count yet (tests/core/test_update_cap.py)
    guard = GuardCore([p], opt, clip=NoClip(), growth_patience=5, spike_patience=0,
                      max_update_ratio=None)
    reports = []
    for t in range(12):
        p.grad = torch.full((4,), 1.2**t)
        reports.append(guard.step())
        opt.step()
    fired = [i + 1 for i, rep in enumerate(reports) if rep.growth]
    assert fired == [6, 11]
    # no evidence that the LR is too high (no cap, nothing clipped, LR scale 1): no backoff
    assert not any(rep.backoff for rep in reports)
    assert reports[-1].lr_scale == 1.0
    assert guard.counters.growth_events == 2
    assert guard.counters.lr_backoffs == 0


def test_geometric_growth_backs_off_while_the_lr_is_backed_off() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=1e-3)
    guard = GuardCore([p], opt, clip=NoClip(), growth_patience=5, spike_patience=0,
                      max_update_ratio=None, nonfinite_window=0)
    p.grad = torch.full((4,), NAN)
    assert guard.step().backoff  # nonfinite_window=0: every non-finite step backs off
    reports = []
    for t in range(12):
        p.grad = torch.full((4,), 1.2**t)
        reports.append(guard.step())
        opt.step()
    fired = [i + 1 for i, rep in enumerate(reports) if rep.growth]
    assert fired == [6, 11]
    # evidence (c): the LR is backed off and has not recovered
    assert [i + 1 for i, rep in enumerate(reports) if rep.backoff] == [6, 11]
    assert guard.counters.lr_backoffs == 3
    assert guard.backoff.scale < 0.25  # three halvings, partly recovered


def test_growth_with_default_policy_backs_off() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=1e-3)
    guard = GuardCore([p], opt)
    for t in range(40):
        p.grad = torch.full((4,), 1.15**t)
        guard.step()
        opt.step()
    assert guard.backoff.scale < 1.0
    assert guard.counters.lr_backoffs >= 1


def test_growth_patience_zero_disables() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    guard = GuardCore([p], torch.optim.SGD([p], lr=1e-3), clip=NoClip(), growth_patience=0,
                      max_update_ratio=None)
    for t in range(20):
        p.grad = torch.full((4,), 1.5**t)
        assert not guard.step().growth
    assert guard.backoff.scale == 1.0


# ----------------------------------------------------------------------------- backoff / LR
def test_clipping_as_the_rule_does_not_back_off_an_adaptive_optimizer() -> None:
    # the same run as test_spike_patience_backoff under Adam: every step is clipped, the
    # count reaches spike_patience at steps 3, 6, 9, but Adam's updates do not grow with the
    # gradient: no evidence, each time the count restarts and the LR stays
    r = run(9, clip=FixedNormClip(1e-4), growth_patience=0, spike_patience=3)
    assert r.guard.update_control.limit(1.0).normalised
    assert not any(rep.backoff for rep in r.reports.values())
    assert all(rep.action is Action.CLIP and rep.reason is None for rep in r.reports.values())
    assert r.guard.spike_steps == ()  # restarted at step 9
    assert r.guard.backoff.scale == 1.0
    assert r.guard.counters.lr_backoffs == 0
    assert r.guard.counters.spikes == 9


def test_adaptive_optimizer_backed_off_by_nonfinite_steps_backs_off_on_returning_spikes() -> None:
    # (c) still holds under Adam: two NaN steps back the LR off (0.5), then three clipped
    # spikes while it is backed off are that instability returning: a second halving
    r = run(5, faults={1: nan_in("0.weight"), 2: nan_in("0.weight")},
            clip=FixedNormClip(1e-4), growth_patience=0, spike_patience=3)
    assert r.reports[2].backoff
    assert r.reports[2].lr_scale == 0.5
    assert r.reports[5].backoff
    assert r.reports[5].reason == "already_backed_off"
    assert r.guard.counters.lr_backoffs == 2


def test_spike_patience_backoff() -> None:
    r = run(9, clip=FixedNormClip(1e-4), growth_patience=0, spike_patience=3, make_opt=_sgd,
            max_update_ratio=None)
    backoffs = [t for t, rep in r.reports.items() if rep.backoff]
    # step 3: the count is reached but only 3 steps were clipped: no evidence, count restarts;
    # step 6: 6 of the last 6 steps clipped (clipping is the rule); step 9: LR backed off
    assert backoffs == [6, 9]
    assert all(rep.action is Action.CLIP for rep in r.reports.values())
    assert r.reports[9].lr_scale == 0.25
    assert r.guard.counters.lr_backoffs == 2
    assert r.guard.counters.spikes == 9


def test_spike_window() -> None:
    # a spike every 3 steps, window 5: never 3 spikes within 5 steps
    # (a non-finite step at 20 backs the LR off first, so that a spike count has evidence;
    # no loss given: this loss keeps falling, which would rule every spike backoff out)
    faults = {t: scale_all(1e6) for t in (30, 33, 36, 39, 42)}
    faults[20] = nan_in("0.weight")
    kw: dict[str, Any] = {"spike_patience": 3, "growth_patience": 0, "nonfinite_window": 0,
                          "pass_loss": False}
    r = run(45, faults=faults, spike_window=5, **kw)
    assert not any(r.reports[t].backoff for t in faults if t != 20)
    r2 = run(45, faults=faults, spike_window=7, **kw)
    assert r2.reports[36].backoff


def test_recovery_to_exactly_one_and_scaled_update() -> None:
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GuardCore(model, opt, clip=NoClip(), recovery_steps=4, growth_patience=0,
                      spike_patience=0, nonfinite_window=0)
    r = run(2, start=Run(model, opt, guard), faults={2: nan_in("0.bias")})
    assert guard.backoff.scale == 0.5
    # next clean step: the update uses lr * reported scale, lr restored after the step
    loss = loss_fn(model, DATA[2])
    loss.backward()
    rep = guard.step()
    assert 0.5 <= rep.lr_scale <= 0.5 * 2**0.25 * (1 + 1e-12)
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    before = params_of(model)
    assert opt.param_groups[0]["lr"] == 0.1 * rep.lr_scale
    opt.step()
    opt.zero_grad()
    assert opt.param_groups[0]["lr"] == 0.1
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        assert torch.allclose(p.detach(), b - 0.1 * rep.lr_scale * g, rtol=0, atol=1e-7)
    # one backoff is undone by `recovery_steps` clean steps, landing on exactly 1.0
    r = run(5, start=r, first_step=4)
    scales = [rep.lr_scale] + [r.reports[t].lr_scale for t in range(4, 9)]
    assert scales == sorted(scales)
    assert scales[-1] == 1.0
    assert scales.index(1.0) in (3, 4)  # after 4 recoveries (applied now or from the next step)
    assert guard.backoff.scale == 1.0


def test_lr_backoff_false() -> None:
    r = run(10, faults={5: nan_in("0.weight")}, lr_backoff=False)
    assert r.reports[5].action is Action.SKIP
    assert not r.reports[5].backoff
    assert all(rep.lr_scale == 1.0 for rep in r.reports.values())
    assert all(lr == 1e-2 for lr in r.lr_in_step.values())
    assert r.guard.counters.lr_backoffs == 0


def test_skip_nonfinite_false_keeps_grads() -> None:
    model = make_net(seed=0)
    opt = _adam(model)
    guard = GuardCore(model, opt, skip_nonfinite=False)
    loss_fn(model, DATA[0]).backward()
    nan_in("0.weight")(model)
    rep = guard.step()
    assert rep.action is Action.NONE
    assert not rep.finite
    assert all(p.grad is not None for p in model.parameters())
    assert guard.counters.nonfinite_steps == 1
    assert guard.counters.skipped_steps == 0


def test_nonfinite_loss_with_finite_grads_is_skipped() -> None:
    model = make_net(seed=0)
    opt = _adam(model)
    guard = GuardCore(model, opt)
    loss_fn(model, DATA[0]).backward()
    rep = guard.step(torch.tensor(NAN))
    assert rep.action is Action.SKIP
    assert not rep.finite
    assert math.isfinite(rep.grad_norm)
    assert rep.loss is not None
    assert math.isnan(rep.loss)
    assert rep.diagnosis is not None
    assert rep.diagnosis.likely_cause.startswith("the loss itself is non-finite")
    assert all(p.grad is None for p in model.parameters())
    loss_fn(model, DATA[1]).backward()
    rep2 = guard.step(float("inf"))
    assert rep2.action is Action.SKIP
    assert rep2.loss == INF


def test_nonfinite_loss_with_finite_grads_leaves_no_trace_in_statistics() -> None:
    """Its gradient norm is finite, but the step is skipped: the clip statistics and the
    growth detector are exactly those of a guard that never saw it."""
    norms = [1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 0.9, 1.2]  # rising (a growth streak), then not
    bad = 4

    def feed(skip_unseen: bool) -> GuardCore:
        w = torch.nn.Parameter(torch.ones(4))
        guard = GuardCore([w], torch.optim.Adam([w], lr=1e-3), lr_backoff=False)
        for i, x in enumerate(norms):
            w.grad = torch.full((4,), x / 2.0)  # norm x
            if i == bad:
                if skip_unseen:
                    continue
                assert guard.step(loss=NAN).action is Action.SKIP
            else:
                guard.step(loss=1.0)
        return guard

    seen, unseen = feed(False), feed(True)
    assert seen.policy.state_dict() == unseen.policy.state_dict()
    assert seen.growth.state_dict() == unseen.growth.state_dict()
    assert seen.policy.threshold_value() == unseen.policy.threshold_value()


# ----------------------------------------------------------------------------- AMP
@pytest.mark.parametrize("bad", [INF, NAN])
def test_amp_overflow_leaves_grads_to_the_scaler(bad: float) -> None:
    r = run(5)
    guard, model = r.guard, r.model
    loss_fn(model, DATA[5]).backward()
    nan_in("2.weight", bad)(model)
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    lr = r.opt.param_groups[0]["lr"]
    rep = guard.step(amp_overflow=True)
    assert rep.action is Action.AMP_SKIP
    assert not rep.finite
    assert not rep.backoff
    assert rep.lr_scale == 1.0
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is not None
        assert torch.equal(p.grad.nan_to_num(7.0), g.nan_to_num(7.0))
        assert torch.equal(torch.isnan(p.grad), torch.isnan(g))
    c = guard.counters
    assert c.amp_overflow_steps == 1
    assert c.nonfinite_steps == 0
    assert c.skipped_steps == 0
    assert c.lr_backoffs == 0
    assert guard.backoff.scale == 1.0
    assert guard.first_diagnosis is None
    assert r.opt.param_groups[0]["lr"] == lr
    # a finite step under amp_overflow=True is an ordinary step
    r.opt.zero_grad()
    loss_fn(model, DATA[6]).backward()
    assert guard.step(amp_overflow=True).action in (Action.NONE, Action.CLIP)


@pytest.mark.parametrize("halt_after", [25, 0])
def test_forty_scaler_skips_in_a_row_halt(halt_after: int) -> None:
    """Finite loss and NaN gradients 40 times in a row under a GradScaler: not calibration."""
    model = make_net(seed=0)
    guard = GuardCore(model, _adam(model), halt_after=halt_after)
    reports = []
    for i in range(41):
        model.zero_grad()
        loss = loss_fn(model, DATA[i])
        loss.backward()
        nan_in("2.weight")(model)
        reports.append(guard.step(loss, amp_overflow=True))
    assert all(r.action is Action.AMP_SKIP for r in reports)
    assert guard.counters.amp_overflow_steps == 41
    assert guard.counters.skipped_steps == 0  # the scaler skips them, not the guard
    if halt_after == 0:
        assert not any(r.halt for r in reports)
        assert guard.halt_message == ""
        return
    assert next(i for i, r in enumerate(reports) if r.halt) == 39  # the 40th
    assert guard.counters.halted
    assert reports[39].diagnosis is not None
    assert reports[39].diagnosis.nonfinite_params == ("2.weight",)
    msg = guard.halt_message
    assert "41 consecutive steps with finite loss and non-finite gradients" in msg
    assert "(steps 1..41)" in msg
    assert "not fp16 overflows" in msg
    assert "2.weight" in msg


# ----------------------------------------------------------------------------- host syncs
POLICY_FACTORIES: dict[str, Callable[[], ClipPolicy]] = {
    "zscore": ZScoreClip,
    "percentile": lambda: PercentileClip(history_size=32),
    "fixed_always_clips": lambda: FixedNormClip(1e-4),
    "noclip": NoClip,
    "agc": lambda: AdaptiveGradClip(clipping=0.01),
}


@pytest.mark.parametrize("loss_kind", ["tensor", "float", "none"])
@pytest.mark.parametrize("policy", sorted(POLICY_FACTORIES))
def test_exactly_one_host_read_per_clean_step(policy: str, loss_kind: str) -> None:
    model = make_net(seed=0)
    opt = _adam(model)
    guard = GuardCore(model, opt, clip=POLICY_FACTORIES[policy](), rollback=True,
                      snapshot_every=2)
    for t in range(8):
        loss = loss_fn(model, DATA[t])
        loss.backward()
        arg = {"tensor": loss.detach(), "float": float(loss.detach()), "none": None}[loss_kind]
        _host.reset_host_reads()
        rep = guard.step(arg)
        assert _host.host_reads() == 1, (t, rep)
        assert rep.finite
        opt.step()
        opt.zero_grad()


def test_agc_policy_in_guard_clips_unitwise() -> None:
    r = run(5, clip=AdaptiveGradClip(clipping=1e-3))
    for rep in r.reports.values():
        assert rep.threshold == INF
        assert rep.action is Action.CLIP
        assert rep.grad_norm_clipped < rep.grad_norm
    assert r.guard.counters.clipped_steps == 5


# ----------------------------------------------------------------------------- state
SUMMARY_KEYS = {"steps", "nonfinite_steps", "skipped_steps", "spikes", "clipped_steps",
                "lr_backoffs", "growth_events", "rollbacks", "amp_overflow_steps", "halted",
                "lr_scale", "diagnosis", "reasons"}


def test_summary_keys() -> None:
    r = run(3, faults={2: nan_in("0.weight")})
    s = r.guard.summary()
    assert set(s) == SUMMARY_KEYS
    assert s["steps"] == 3
    assert s["nonfinite_steps"] == 1
    assert s["lr_backoffs"] == 0  # an isolated non-finite step costs one skip
    assert s["lr_scale"] == r.guard.backoff.scale == 1.0
    assert s["halted"] is False


@pytest.mark.parametrize("through_disk", [False, True])
def test_state_dict_round_trip_identical_reports(through_disk: bool) -> None:
    kw: dict[str, Any] = {"rollback": True, "snapshot_every": 5, "halt_after": 4}
    faults = {12: nan_in("0.weight"), 20: scale_all(1e6)}
    a = run(30, faults=faults, **kw)
    sd = a.guard.state_dict()
    assert {"policy", "backoff", "growth", "counters", "snapshot"} <= set(sd)
    if through_disk:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    model_b = make_net(seed=123)
    model_b.load_state_dict(a.model.state_dict())
    opt_b = _adam(model_b)
    opt_b.load_state_dict(opt_tensors(a.opt))
    guard_b = GuardCore(model_b, opt_b, **kw)
    guard_b.load_state_dict(sd)
    assert guard_b.summary() == a.guard.summary()
    b = Run(model_b, opt_b, guard_b)
    more = {33: nan_in("2.weight"), 34: nan_in("2.weight"), 40: scale_all(1e5),
            45: nan_in("0.bias")}
    a = run(25, start=a, first_step=31, faults=more)
    b = run(25, start=b, first_step=31, faults=more)
    for t in range(31, 56):
        assert repr(a.reports[t]) == repr(b.reports[t]), t  # exact, NaN == NaN
    assert a.guard.summary() == b.guard.summary()
    assert_state_equal(params_of(a.model), params_of(b.model))
    assert _finite_params(a.model)  # equal and finite: NaN == NaN would not do


def test_user_policy_not_mutated_and_settings_object() -> None:
    policy = ZScoreClip()
    settings = GuardSettings(clip=policy)
    model = make_net(seed=0)
    opt = _adam(model)
    guard = GuardCore(model, opt, settings)
    run(5, start=Run(model, opt, guard))
    assert int(policy.stats.count) == 0
    assert guard.policy is not policy
    with pytest.raises(TypeError, match="either"):
        GuardCore(model, opt, settings, halt_after=3)


def test_close_restores_lr() -> None:
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GuardCore(model, opt, clip=NoClip(), growth_patience=0, spike_patience=0,
                      nonfinite_window=0)
    run(2, start=Run(model, opt, guard), faults={1: nan_in("0.weight")})
    loss_fn(model, DATA[3]).backward()
    guard.step()
    assert opt.param_groups[0]["lr"] < 0.1
    guard.close()
    assert opt.param_groups[0]["lr"] == 0.1
    guard.close()  # idempotent


# ----------------------------------------------------------------------------- parameters
def test_watches_only_optimizer_params() -> None:
    model = make_net(seed=0)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    guard = GuardCore(model, opt)
    assert guard.names == ["2.weight", "2.bias"]
    loss_fn(model, DATA[0]).backward()
    nan_in("0.weight")(model)  # not updated by this optimizer: not watched
    rep = guard.step()
    assert rep.finite
    assert model[0].weight.grad is not None


def test_param_iterables_and_names() -> None:
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    g1 = GuardCore([a, b])
    assert g1.names == ["param_0", "param_1"]
    g2 = GuardCore([("x", a), ("y", b)])
    assert g2.names == ["x", "y"]
    a.grad = torch.ones(2)
    b.grad = torch.tensor([1.0, NAN])
    rep = g2.step()
    assert rep.action is Action.SKIP
    assert rep.diagnosis is not None
    assert rep.diagnosis.nonfinite_params == ("y",)
    empty = GuardCore([])
    rep0 = empty.step()
    assert rep0.finite
    assert rep0.grad_norm == 0.0


def test_reducer_is_used() -> None:
    model = make_net(seed=0)
    calls: list[str] = []

    def reducer(t: torch.Tensor, op: str) -> torch.Tensor:
        calls.append(op)
        return t * 2

    g_local = GuardCore(model, clip=NoClip())
    g_red = GuardCore(model, clip=NoClip(), reducer=reducer)
    loss_fn(model, DATA[0]).backward()
    local = g_local.step().grad_norm
    reduced = g_red.step().grad_norm
    assert calls == ["sum"]
    assert math.isclose(reduced, math.sqrt(2) * local, rel_tol=1e-6)


# ------------------------------------- edge cases: None grads, zero first step, resume, AMP, sparse
def test_diagnosis_names_right_param_when_some_grads_are_none() -> None:
    p0, p1, p2 = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    opt = torch.optim.SGD([p0, p1, p2], lr=0.1)
    guard = GuardCore([("unused", p0), ("w1", p1), ("w2", p2)], opt)
    p1.grad = torch.ones(2)
    p2.grad = torch.tensor([NAN, 1.0])
    guard.step()
    assert guard.first_diagnosis is not None
    assert guard.first_diagnosis.nonfinite_params == ("w2",)


def test_zero_gradient_first_step_does_not_freeze_training() -> None:
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def zero(m: torch.nn.Module) -> None:
        for p in m.parameters():
            p.grad.zero_()  # type: ignore[union-attr]

    r = run(30, start=Run(model, opt, GuardCore(model, opt)), faults={1: zero})
    assert r.reports[30].threshold > 0.0
    assert r.reports[30].grad_norm_clipped > 0.0


def test_halt_message_survives_resume() -> None:
    a = run(10, faults={5: nan_in("0.weight")}, halt_after=2)
    sd = a.guard.state_dict()
    model_b = make_net(seed=0)
    model_b.load_state_dict(a.model.state_dict())
    opt_b = _adam(model_b)
    opt_b.load_state_dict(opt_tensors(a.opt))
    guard_b = GuardCore(model_b, opt_b, halt_after=2)
    guard_b.load_state_dict(sd)
    b = Run(model_b, opt_b, guard_b)
    faults = {11: nan_in("2.weight"), 12: nan_in("2.weight")}
    a = run(2, start=a, first_step=11, faults=faults)
    b = run(2, start=b, first_step=11, faults=faults)
    assert a.reports[12].halt
    assert b.reports[12].halt
    assert "step 5" in a.guard.halt_message
    assert b.guard.halt_message == a.guard.halt_message


def test_amp_overflow_with_nonfinite_loss_is_a_real_nonfinite_step() -> None:
    model = make_net(seed=0)
    opt = _adam(model)
    guard = GuardCore(model, opt)
    loss_fn(model, DATA[0]).backward()
    nan_in("0.weight")(model)
    rep = guard.step(torch.tensor(NAN), amp_overflow=True)
    assert rep.action is Action.SKIP
    assert guard.counters.nonfinite_steps == 1
    assert guard.counters.amp_overflow_steps == 0


def test_sparse_gradient_falls_back_from_the_parameter_grouping() -> None:
    """The fast path reuses the parameters' (device, dtype) grouping; a sparse gradient
    (``Embedding(sparse=True)``) switches the guard to the general path, same numbers."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    lin = torch.nn.Linear(4, 1)
    model = torch.nn.Sequential(emb, lin)
    guard = GuardCore(model, None, clip=FixedNormClip(1e-3))
    lin(emb(torch.tensor([1, 2, 2]))).sum().backward()
    assert emb.weight.grad is not None
    assert emb.weight.grad.is_sparse
    expected = float(grad_norms([p.grad for p in model.parameters()]).total)
    report = guard.step()
    assert report.grad_norm == pytest.approx(expected, rel=1e-6)
    assert report.action is Action.CLIP  # the clip pass works on the sparse gradient too
    after = float(grad_norms([p.grad for p in model.parameters()]).total)
    assert after == pytest.approx(1e-3, rel=1e-4)
    assert guard.meter.groups is None  # general path from now on
