"""Hypothesis fuzzing of GuardCore end to end: a tiny Linear whose gradients are set by hand
to ``value * ones`` for arbitrary float sequences (NaN, +-Inf, 0, -0.0, subnormals, 1e38,
float32 max), with every clip policy, with/without a loss, a GradScaler and rollback.

Invariants: no exception; thresholds are finite or +inf, never NaN or negative; the LR
scale stays in [min_lr_scale, 1] and the scheduled LR is back after every update; state has
constant size (policy tensors, spike window); counters add up; a non-finite step is a true
skip (grads cleared) unless a GradScaler owns it; a clipped step's norm is at most the
threshold; the state survives a state_dict round trip.

(The per-policy fuzz of threshold/observe sequences lives in tests/core/test_policies.py.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.state import assert_state_close

from lightning_gradguard import (
    AdaptiveGradClip,
    FixedNormClip,
    GuardCore,
    NoClip,
    PercentileClip,
    ZScoreClip,
)
from lightning_gradguard.core.guard import Action

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

F32_MAX = float(torch.finfo(torch.float32).max)
SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1.4e-45, 1e-40, 1.2e-38, 1e-20, 1.0, 3.0,
           1e6, 1e38, -1e38, F32_MAX, -F32_MAX]
VALUES = st.one_of(st.sampled_from(SPECIAL),
                   st.floats(width=32, allow_nan=True, allow_infinity=True))

POLICIES: dict[str, Any] = {
    "noclip": NoClip,
    "fixed": lambda: FixedNormClip(1.0),
    "zscore": lambda: ZScoreClip(warmup_steps=3),
    "zscore_default": ZScoreClip,
    "percentile": lambda: PercentileClip(percentile=50, history_size=5, min_history=2),
    "agc": lambda: AdaptiveGradClip(clipping=0.01),
}
LR, SPIKE_WINDOW, MIN_LR_SCALE = 0.1, 5, 0.01


def _shapes(state: Any, path: str = "") -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    if isinstance(state, torch.Tensor):
        out[path] = tuple(state.shape)
    elif isinstance(state, dict):
        for k, v in state.items():
            out.update(_shapes(v, f"{path}/{k}"))
    return out


def _make(policy: str, rollback: bool, optim: str) -> tuple[torch.nn.Linear, Any, GuardCore]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt: torch.optim.Optimizer
    if optim == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=LR)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    core = GuardCore(model, opt, clip=POLICIES[policy](), rollback=rollback, snapshot_every=3,
                     rollback_after=2, halt_after=4, spike_patience=2,
                     spike_window=SPIKE_WINDOW, recovery_steps=3, min_lr_scale=MIN_LR_SCALE)
    return model, opt, core


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


@FUZZ
@given(values=st.lists(VALUES, min_size=1, max_size=30),
       policy=st.sampled_from(sorted(POLICIES)),
       with_loss=st.booleans(), amp=st.booleans(), rollback=st.booleans(),
       optim=st.sampled_from(["sgdm", "adam"]))
# explicit streaks around halt_after=4: halt at the 4th non-finite step in a row, not before,
# not after; a finite step breaks the streak; the scaler's overflows do not
@example(values=[1.0, math.nan, math.inf, -math.inf, math.nan, math.nan, 1.0, math.nan, 1.0],
         policy="zscore", with_loss=False, amp=False, rollback=False, optim="adam")
@example(values=[1.0, math.nan, math.nan, math.nan, 2.0, math.nan, math.nan, math.nan, math.nan],
         policy="fixed", with_loss=True, amp=True, rollback=True, optim="sgdm")
@example(values=[math.nan] * 6, policy="percentile", with_loss=True, amp=False,
         rollback=False, optim="sgdm")
def test_guard_core_end_to_end_fuzz(values: list[float], policy: str, with_loss: bool,
                                    amp: bool, rollback: bool, optim: str) -> None:
    model, opt, core = _make(policy, rollback, optim)
    shapes = _shapes(core.policy.state_dict())
    nonfinite_reports = 0
    weight_skips = 0  # finite grads, non-finite weights (a rollback check found them)
    streak = 0  # consecutive non-finite steps counted as such (halt_after=4)
    halts = 0
    for v in values:
        for p in model.parameters():
            p.grad = torch.full_like(p, v)  # value * ones
        loss = torch.tensor(v) if with_loss else None
        report = core.step(loss, amp_overflow=amp)

        for t in (report.threshold, float(core.policy.threshold())):
            assert not math.isnan(t)
            assert t >= 0.0
            assert math.isfinite(t) or t == math.inf
        assert MIN_LR_SCALE - 1e-12 <= report.lr_scale <= 1.0
        assert MIN_LR_SCALE - 1e-12 <= core.backoff.scale <= 1.0
        if not report.params_finite:
            assert rollback
            assert report.finite
            assert report.action is Action.SKIP
            assert all(p.grad is None for p in model.parameters())
            weight_skips += 1
        elif not math.isfinite(v):
            assert not report.finite
        if report.finite:
            assert not math.isnan(report.grad_norm)
            if report.action is Action.CLIP and policy != "agc":
                assert _grad_norm(model) <= report.threshold * (1 + 1e-3) + 1e-30
        else:
            nonfinite_reports += 1
            if report.action is Action.SKIP:
                assert all(p.grad is None for p in model.parameters())
            else:  # left to the GradScaler: only with amp and a finite (or no) loss
                assert amp
                assert report.action is Action.AMP_SKIP
                assert report.loss is None or math.isfinite(report.loss)
        # the halt, from an independent count: after 4 non-finite steps in a row (the
        # scaler's overflows neither extend nor break that streak; a finite step breaks it)
        if report.finite:
            streak = 0
            assert not report.halt
        elif report.action is not Action.AMP_SKIP:
            streak += 1
            assert report.halt == (streak >= 4), (streak, report)
        halts += report.halt

        opt.step()
        opt.zero_grad(set_to_none=True)
        assert opt.param_groups[0]["lr"] == LR  # the scheduled LR is back after the update
        assert _shapes(core.policy.state_dict()) == shapes  # bounded state
        assert len(core.spike_steps) <= SPIKE_WINDOW

    c = core.counters
    assert c.steps == len(values)
    assert c.skipped_steps == c.nonfinite_steps + weight_skips
    assert c.nonfinite_steps + c.amp_overflow_steps == nonfinite_reports
    assert c.rollbacks <= c.nonfinite_steps // 2 + weight_skips
    if policy != "agc" and optim == "adam":  # with SGD, max_update_ratio clips too
        assert c.clipped_steps <= c.spikes
    assert c.halted == (halts > 0)
    assert core.streaks.nonfinite == streak

    # the state, whatever went into it, survives a round trip
    _, _, fresh = _make(policy, rollback, optim)
    fresh.load_state_dict(core.state_dict())
    assert_state_close(fresh.policy.state_dict(), core.policy.state_dict())
    assert fresh.counters.steps == c.steps


# ----------------------------------------------------------------------------- found by fuzzing
def _clipped_after_first(first_scale: float | None, steps: int = 50) -> int:
    """Clipped steps among ``steps`` ordinary SGD steps, after an optional first step whose
    gradients are the ordinary ones times ``first_scale``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    core = GuardCore(model, opt)
    g = torch.Generator().manual_seed(1)
    clipped = 0
    for i in range(steps + 1):
        x = torch.randn(16, 4, generator=g)
        y = torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))
        torch.nn.functional.mse_loss(model(x), y).backward()
        if i == 0:
            if first_scale is None:
                opt.zero_grad()
                continue
            for p in model.parameters():
                assert p.grad is not None
                p.grad.mul_(first_scale)
        report = core.step()
        clipped += i > 0 and report.action is Action.CLIP
        opt.step()
        opt.zero_grad()
    return clipped


def test_tiny_first_gradient_does_not_freeze_the_threshold() -> None:
    baseline = _clipped_after_first(None)
    assert _clipped_after_first(1e-6) <= baseline + 3
