"""GuardCore state, compared exactly where a bug would show first.

* Right after a skipped non-finite step the statistics equal those of a guard that never saw
  the step (a skipped step must leave no trace in them): compared at once, not 20 steps
  later when two runs could have drifted back within a tolerance.
* Right after ``load_state_dict`` the guard's state equals the saved one, with a growth
  streak that crosses the checkpoint, so that the LR backoff must come at the same step as
  in the uninterrupted run.

Only the public API is used: ``GuardCore.step`` / ``state_dict`` / ``load_state_dict`` and
the :class:`~lightning_gradguard.core.StepReport`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from support.core import batches, loss_fn
from support.modules import make_net
from support.state import assert_state_equal

from lightning_gradguard.core import (
    Action,
    ClipPolicy,
    GuardCore,
    PercentileClip,
    StepReport,
    ZScoreClip,
)

DATA = batches(16)


class Loop:
    """A plain Adam loop with a guard; one :meth:`step` per optimizer step (1-based)."""

    def __init__(self, **settings: Any) -> None:
        self.model = make_net(seed=0)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.guard = GuardCore(self.model, self.opt, **settings)
        self.t = 0
        self.reports: dict[int, StepReport] = {}

    def step(self, *, loss_scale: float = 1.0, nan: bool = False, unseen: bool = False) -> None:
        """One step. ``nan``: a NaN in one gradient; ``unseen``: the step is skipped
        without the guard seeing it (the reference for a skipped fault)."""
        self.t += 1
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.model, DATA[(self.t - 1) % len(DATA)]) * loss_scale
        loss.backward()
        if unseen:
            for p in self.model.parameters():
                p.grad = None
        else:
            if nan:
                g = self.model[0].weight.grad
                assert g is not None
                g.view(-1)[0] = math.nan
            self.reports[self.t] = self.guard.step(loss.detach(), step=self.t)
        self.opt.step()

    def checkpoint(self) -> dict[str, Any]:
        return copy.deepcopy({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                              "guard": self.guard.state_dict(), "t": self.t})

    @classmethod
    def resumed(cls, ckpt: dict[str, Any], **settings: Any) -> Loop:
        loop = cls(**settings)
        loop.model.load_state_dict(ckpt["model"])
        loop.opt.load_state_dict(ckpt["opt"])
        loop.guard.load_state_dict(copy.deepcopy(ckpt["guard"]))
        loop.t = ckpt["t"]
        return loop


POLICIES: dict[str, Callable[[], ClipPolicy]] = {
    "zscore": ZScoreClip,
    "zscore-short-warmup": lambda: ZScoreClip(warmup_steps=5),
    "percentile": lambda: PercentileClip(min_history=5, history_size=16),
}


# ----------------------------------------------------------------- a skipped fault leaves no trace
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("k", [3, 12, 30])
def test_nan_step_leaves_statistics_exactly_as_if_unseen(policy: str, k: int) -> None:
    faulty = Loop(clip=POLICIES[policy]())
    ref = Loop(clip=POLICIES[policy]())
    for _ in range(k - 1):
        faulty.step()
        ref.step()
    faulty.step(nan=True)
    ref.step(unseen=True)
    assert faulty.reports[k].action.value == "skip"
    assert not faulty.reports[k].finite
    # right after the fault: the clip statistics and the growth detector are exactly the
    # reference's (the counters and the LR backoff legitimately differ)
    a, b = faulty.guard.state_dict(), ref.guard.state_dict()
    assert_state_equal(a["policy"], b["policy"], "policy")  # its type and statistics
    assert_state_equal(a["growth"], b["growth"], "growth")
    # and the next step is judged by the same threshold, bit for bit (the skipped step
    # changed no weight, so its gradients are the same too)
    faulty.step()
    ref.step()
    assert faulty.reports[k + 1].grad_norm == ref.reports[k + 1].grad_norm
    assert faulty.reports[k + 1].threshold == ref.reports[k + 1].threshold


# ----------------------------------------------------------------- resume across a growth streak
GROW_FROM, PATIENCE, END = 12, 4, 24
#: a non-finite step at NAN_AT backs the LR off (``nonfinite_window=0``), so that the growth
#: backoffs have evidence (the LR scale is still below 1)
NAN_AT = 2
SETTINGS: dict[str, Any] = {"growth_patience": PATIENCE, "spike_patience": 0,
                            "nonfinite_window": 0}


def _scale(t: int) -> float:
    """The loss multiplies by 1.6 every step from GROW_FROM on: sustained growth."""
    return 1.6 ** max(0, t - GROW_FROM + 1)


def _uninterrupted() -> Loop:
    loop = Loop(**SETTINGS)
    while loop.t < END:
        loop.step(loss_scale=_scale(loop.t + 1), nan=loop.t + 1 == NAN_AT)
    return loop


@pytest.mark.parametrize("split", [12, 13, 21, 22])
def test_resume_mid_growth_streak_backs_off_at_the_same_step(split: int) -> None:
    full = _uninterrupted()
    growth_steps = [t for t, r in full.reports.items() if r.growth]
    # the streak crosses the split: it started before it and fires after it (at 14 and 23)
    assert growth_steps == [14, 23], "the scaled loss must trigger the growth detector"
    assert full.reports[NAN_AT].backoff
    assert all(full.reports[t].backoff for t in growth_steps)

    first = Loop(**SETTINGS)
    while first.t < split:
        first.step(loss_scale=_scale(first.t + 1), nan=first.t + 1 == NAN_AT)
    ckpt = first.checkpoint()
    assert ckpt["guard"]["growth"]["streak"] >= 2  # mid-streak at the checkpoint
    second = Loop.resumed(ckpt, **SETTINGS)
    # right after loading: every part of the guard's state is the saved one
    assert_state_equal(second.guard.state_dict(), ckpt["guard"], "guard")
    while second.t < END:
        second.step(loss_scale=_scale(second.t + 1))
    for t in range(split + 1, END + 1):
        a, b = full.reports[t], second.reports[t]
        assert (b.growth, b.backoff, b.lr_scale, b.action) == (
            a.growth, a.backoff, a.lr_scale, a.action), t
        assert b.grad_norm == a.grad_norm, t
        assert b.threshold == a.threshold, t
    assert_state_equal(second.guard.state_dict(), full.guard.state_dict(), "guard")


# ----------------------------------------------------------------- load_state_dict, field by field
def _sgd_guard(**settings: Any) -> tuple[torch.nn.Sequential, torch.optim.SGD, GuardCore]:
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, GuardCore(model, opt, **settings)


def _drive(model: torch.nn.Module, opt: torch.optim.Optimizer, guard: GuardCore,
           plan: str) -> list[StepReport]:
    """One step per character: ``.`` clean, ``n`` NaN gradient, ``a`` NaN gradient that a
    GradScaler skips (``amp_overflow``; its update is skipped here as the scaler would)."""
    reports = []
    for i, kind in enumerate(plan):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, DATA[i % len(DATA)])
        loss.backward()
        if kind in "na":
            g = model[0].weight.grad
            assert g is not None
            g.view(-1)[0] = math.nan
        reports.append(guard.step(None if kind == "a" else loss.detach(),
                                  amp_overflow=kind == "a"))
        if kind == "a":  # the GradScaler skips the update
            opt.zero_grad(set_to_none=True)
        opt.step()
    return reports


ROLLBACK: dict[str, Any] = {"rollback": True, "snapshot_every": 2}


def test_load_state_dict_restores_every_field() -> None:
    # nonfinite_window=0: the one non-finite step backs the LR off (a scale away from 1)
    model, opt, guard = _sgd_guard(**ROLLBACK, nonfinite_window=0)
    _drive(model, opt, guard, "...n..")
    state = copy.deepcopy(guard.state_dict())
    # every part is away from its default, so a part that is not restored shows
    assert state["explainer"]["first_diagnosis"] is not None
    assert state["update_control"]["weight_norm"] is not None
    assert state["snapshot"]["model"]
    assert state["backoff"]["scale"] < 1.0
    assert state["counters"]["nonfinite_steps"] == 1
    _, _, fresh = _sgd_guard(**ROLLBACK, nonfinite_window=0)
    fresh.load_state_dict(copy.deepcopy(state))
    assert_state_equal(fresh.state_dict(), state, "guard")
    assert fresh.summary() == guard.summary()
    # into a guard without rollback: everything but the snapshot, which it does not keep
    _, _, plain = _sgd_guard()
    plain.load_state_dict(copy.deepcopy(state))
    out = plain.state_dict()
    assert "snapshot" not in out
    assert_state_equal(out, {k: v for k, v in state.items() if k != "snapshot"}, "guard")


def test_load_state_dict_after_a_halt_is_a_fresh_attempt() -> None:
    model, opt, guard = _sgd_guard(halt_after=2)
    reports = _drive(model, opt, guard, ".ann")
    assert [r.halt for r in reports] == [False, False, False, True]
    state = copy.deepcopy(guard.state_dict())
    c, st = state["counters"], state["streaks"]
    assert (c["halted"], st["nonfinite"], st["nonfinite_start"], st["amp"],
            st["amp_start"]) == (True, 2, 3, 1, 2)
    fresh_model, fresh_opt, fresh = _sgd_guard(halt_after=2)
    fresh.load_state_dict(state)
    assert_state_equal(fresh.state_dict()["counters"], dict(c, halted=False), "counters")
    assert_state_equal(fresh.state_dict()["streaks"], {"amp": 0, "amp_start": None,
                                                       "nonfinite": 0, "nonfinite_start": None,
                                                       "last_nonfinite": None, "clipped": ()},
                       "streaks")
    # the attempt starts over: one more NaN step does not halt (halt_after=2), two do
    r = _drive(fresh_model, fresh_opt, fresh, "nn")
    assert [x.halt for x in r] == [False, True]


def test_load_state_dict_with_another_policy_type_warns_and_restores_the_rest() -> None:
    model, opt, guard = _sgd_guard()
    _drive(model, opt, guard, "..n...")
    state = copy.deepcopy(guard.state_dict())
    assert state["policy"]["type"] == "ZScoreClip"
    _, _, other = _sgd_guard(clip=PercentileClip())
    with pytest.warns(UserWarning, match=r"saved with clip policy ZScoreClip but this guard "
                      r"uses PercentileClip: its statistics start fresh; counters, LR "
                      r"backoff and growth state are restored"):
        other.load_state_dict(copy.deepcopy(state))
    out = other.state_dict()
    assert out["policy"]["type"] == "PercentileClip"
    assert_state_equal(out["policy"]["state"], PercentileClip().state_dict(), "policy")
    for part in ("backoff", "growth", "counters", "explainer", "update_control",
                 "streaks", "spike_steps"):
        assert_state_equal(out[part], state[part], part)


def test_the_policy_state_carries_its_type() -> None:
    """One layout, no shims: the policy's state names its type, and a state without it is
    refused (no release ever wrote one)."""
    model, opt, guard = _sgd_guard()
    _drive(model, opt, guard, "....")
    state = copy.deepcopy(guard.state_dict())
    assert state["policy"]["type"] == "ZScoreClip"
    _, _, fresh = _sgd_guard()
    fresh.load_state_dict(copy.deepcopy(state))
    assert_state_equal(fresh.state_dict()["policy"], state["policy"], "policy")
    del state["policy"]["type"]
    with pytest.raises(KeyError, match="type"):
        _sgd_guard()[2].load_state_dict(state)


# ----------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("lr_backoff", [True, False])
def test_nonfinite_weights_skip_and_roll_back(lr_backoff: bool) -> None:
    """Finite gradients and loss but a NaN weight: the step is skipped, the LR backed off
    (when enabled) and the last snapshot restored; twice, so counters must add up."""
    model, opt, guard = _sgd_guard(rollback=True, snapshot_every=1, lr_backoff=lr_backoff)
    for event in range(2):
        _drive(model, opt, guard, ".")
        snap = [p.detach().clone() for p in model.parameters()]  # captured at the next start
        snap_opt = copy.deepcopy(opt.state_dict())
        _drive(model, opt, guard, ".")
        # now a NaN weight: the snapshot of this step would hold it (not taken), the previous
        # step's is restored
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, DATA[2])
        loss.backward()
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad.double()) for p in model.parameters()
             if p.grad is not None])))
        threshold = guard.policy.threshold_value()
        with torch.no_grad():
            model[2].weight[0, 0] = math.nan
        before = guard.state_dict()["counters"]
        report = guard.step(loss.detach())
        assert guard.last_report is report
        assert (report.step, report.finite, report.params_finite, report.action) == (
            3 * event + 3, True, False, Action.SKIP)
        assert report.grad_norm == pytest.approx(norm, rel=1e-6)
        assert report.grad_norm_clipped == report.grad_norm
        assert report.threshold == threshold
        assert report.loss == pytest.approx(float(loss.detach()), rel=1e-6)
        assert report.backoff is lr_backoff
        assert report.lr_scale == guard.state_dict()["backoff"]["scale"]
        assert report.lr_scale < 1.0 if lr_backoff else report.lr_scale == 1.0
        assert report.rollback is True
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters(), strict=True))
        assert_state_equal(opt.state_dict()["state"], snap_opt["state"], "optimizer")
        after = guard.state_dict()["counters"]
        assert after["skipped_steps"] == before["skipped_steps"] + 1 == event + 1
        assert after["rollbacks"] == before["rollbacks"] + 1 == event + 1
        assert after["lr_backoffs"] == before["lr_backoffs"] + int(lr_backoff)
        assert after["lr_backoffs"] == (event + 1 if lr_backoff else 0)
        assert after["nonfinite_steps"] == before["nonfinite_steps"] == 0
        assert opt.param_groups[0]["lr"] == 0.01


# ----------------------------------------------------------------- non-finite step reports
def test_nonfinite_reports_carry_step_norm_threshold_loss_and_diagnosis() -> None:
    model, opt, guard = _sgd_guard(halt_after=3)
    _drive(model, opt, guard, "...")
    threshold = guard.policy.threshold_value()
    amp, *nans = _drive(model, opt, guard, "annn")  # steps 4..7; no update from step 4 on
    # the GradScaler's overflow: left to the scaler, nothing counted against the run
    assert (amp.step, amp.finite, amp.action, amp.halt, amp.backoff, amp.loss,
            amp.diagnosis, amp.lr_scale) == (4, False, Action.AMP_SKIP, False, False, None,
                                             None, 1.0)
    assert math.isnan(amp.grad_norm)
    assert math.isnan(amp.grad_norm_clipped)
    assert amp.threshold == threshold
    for i, r in enumerate(nans):
        # the first one is isolated (one skip); the next ones repeat within nonfinite_window
        assert (r.step, r.finite, r.action, r.backoff) == (5 + i, False, Action.SKIP, i > 0)
        assert math.isnan(r.grad_norm)
        assert math.isnan(r.grad_norm_clipped)
        assert r.threshold == threshold  # a skipped step never enters the statistics
        # the weights did not move since step 5: the loss of each step recomputes exactly
        assert r.loss == float(loss_fn(model, DATA[1 + i]).detach())
        assert r.lr_scale == 0.5 ** i
        assert guard.last_report is nans[-1]
    # diagnosed at the first non-finite step and at the halt, not in between
    assert [r.halt for r in nans] == [False, False, True]
    assert [r.diagnosis is not None for r in nans] == [True, False, True]
    assert nans[0].diagnosis is not None
    assert nans[0].diagnosis.step == 5
    st = guard.state_dict()
    assert (st["streaks"]["nonfinite"], st["streaks"]["nonfinite_start"],
            st["explainer"]["first_nonfinite_step"]) == (3, 5, 5)
    c = st["counters"]
    assert (c["skipped_steps"], c["lr_backoffs"], c["amp_overflow_steps"]) == (3, 2, 1)


def test_halt_after_one_halts_at_the_first_nonfinite_step() -> None:
    model, opt, guard = _sgd_guard(halt_after=1)
    reports = _drive(model, opt, guard, "..nn")
    assert [r.halt for r in reports] == [False, False, True, True]
    assert [r.diagnosis is not None for r in reports] == [False, False, True, True]
    d = reports[3].diagnosis
    assert d is not None
    assert d.step == 4


def test_amp_overflow_streak_halts_with_a_diagnosis() -> None:
    """40 GradScaler overflows in a row are no overflow any more: halt (``halt_after=1``);
    the reports carry the backed-off LR scale (``nonfinite_window=0``: the one non-finite
    step backs off)."""
    model, opt, guard = _sgd_guard(halt_after=1, nonfinite_window=0)
    reports = _drive(model, opt, guard, "..n." + "a" * 40)
    amp = reports[4:]
    assert all(r.action is Action.AMP_SKIP for r in amp)
    assert all(r.lr_scale == amp[0].lr_scale for r in amp)  # frozen: no update, no recovery
    assert 0.5 <= amp[0].lr_scale < 1.0
    assert [r.halt for r in amp] == [False] * 39 + [True]
    d = amp[-1].diagnosis
    assert d is not None
    assert d.step == 44
    assert all(r.diagnosis is None for r in amp[:-1])


def test_nonfinite_steps_without_backoff_with_rollback_and_no_halt() -> None:
    """``lr_backoff=False``: no backoff (``False``, not just falsy); ``rollback_after=2``:
    every second non-finite step in a row restores the snapshot, and the counter adds up;
    ``halt_after=0``: never halts, diagnosed only at the first non-finite step."""
    settings: dict[str, Any] = {"lr_backoff": False, "rollback": True, "snapshot_every": 1,
                                "rollback_after": 2, "halt_after": 0}
    model, opt, guard = _sgd_guard(**settings)
    reports = _drive(model, opt, guard, "..nnnn")
    nans = reports[2:]
    assert [r.backoff for r in nans] == [False] * 4
    assert all(r.backoff is False for r in nans)
    assert [r.rollback for r in nans] == [False, True, False, True]
    assert [r.halt for r in nans] == [False] * 4
    assert [r.diagnosis is not None for r in nans] == [True, False, False, False]
    assert all(r.lr_scale == 1.0 for r in nans)
    c = guard.state_dict()["counters"]
    assert (c["rollbacks"], c["skipped_steps"], c["lr_backoffs"]) == (2, 4, 0)


def test_amp_overflow_with_a_finite_loss_reports_the_loss() -> None:
    model, opt, guard = _sgd_guard()
    _drive(model, opt, guard, "..")
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, DATA[0])
    loss.backward()
    g = model[0].weight.grad
    assert g is not None
    g.view(-1)[0] = math.inf
    r = guard.step(loss.detach(), amp_overflow=True)
    assert (r.action, r.finite, r.halt) == (Action.AMP_SKIP, False, False)
    assert r.loss == float(loss.detach())
    assert r.lr_scale == 1.0
    assert r.diagnosis is None
