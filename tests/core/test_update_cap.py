"""``max_update_ratio``: the plain-SGD update cap of :class:`GuardCore`.

One weight vector of 100 ones (norm 10), SGD with lr 1 and the default ratio 0.1: the cap on
the gradient norm is ``0.1 * 10 / 1 = 1``. Gradients are set by hand (all entries equal, so
the norm is exact) and the weights are put back after every update, so the cap stays known.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lightning_gradguard.core.guard import Action, GuardCore, StepReport
from lightning_gradguard.core.policies import FixedNormClip, NoClip, ZScoreClip

N = 100


class CapRun:
    def __init__(self, lr: float = 1.0, **settings: Any) -> None:
        settings.setdefault("clip", NoClip())
        self.w = torch.nn.Parameter(torch.ones(N))
        self.w0 = torch.ones(N)
        self.opt = torch.optim.SGD([self.w], lr=lr)
        self.guard = GuardCore([self.w], self.opt, **settings)
        self.updates: list[float] = []

    def step(self, grad_norm: float) -> StepReport:
        self.w.grad = torch.full((N,), grad_norm / math.sqrt(N))
        report = self.guard.step()
        self.opt.step()
        with torch.no_grad():
            self.updates.append(float(torch.linalg.vector_norm(self.w - self.w0)))
            self.w.copy_(self.w0)
        return report


def test_update_over_the_cap_is_clipped_to_exactly_the_ratio() -> None:
    run = CapRun()
    first = run.step(0.5)
    assert first.action is Action.NONE
    assert run.updates[-1] == pytest.approx(0.5)
    r = run.step(3.0)
    assert r.action is Action.CLIP
    assert r.grad_norm == pytest.approx(3.0)
    assert r.grad_norm_clipped == pytest.approx(1.0)
    assert r.threshold == pytest.approx(1.0)
    # the update changed the weights by exactly max_update_ratio of their norm
    assert run.updates[-1] == pytest.approx(0.1 * math.sqrt(N), rel=1e-6)
    assert run.guard.counters.clipped_steps == 1


def test_cap_hits_count_toward_a_backoff_like_spikes() -> None:
    run = CapRun(spike_patience=3)
    run.step(0.5)
    reports = [run.step(1.5) for _ in range(3)]  # 1.5x over the cap, three times
    assert [r.backoff for r in reports] == [False, False, True]
    assert run.guard.backoff.scale == 0.5
    assert run.guard.counters.lr_backoffs == 1
    assert run.opt.param_groups[0]["lr"] == 1.0  # the schedule's LR is back after the update
    # the backed-off update is scaled: lr 0.5, and the cap in gradient norm doubles
    r = run.step(1.5)
    assert r.action is Action.NONE
    assert r.lr_scale < 0.51
    assert run.updates[-1] == pytest.approx(1.5 * r.lr_scale, rel=1e-6)


def test_cap_hits_do_not_back_off_without_spike_patience() -> None:
    run = CapRun(spike_patience=0)
    run.step(0.5)
    reports = [run.step(1.5) for _ in range(5)]
    assert all(r.action is Action.CLIP and not r.backoff for r in reports)
    assert run.guard.backoff.scale == 1.0


def test_no_cap_for_other_optimizers_or_when_disabled() -> None:
    w = torch.nn.Parameter(torch.ones(N))
    adam = GuardCore([w], torch.optim.Adam([w], lr=1.0), clip=NoClip())
    w.grad = torch.full((N,), 0.5)
    adam.step()
    w.grad = torch.full((N,), 30.0)
    assert adam.step().action is Action.NONE
    run = CapRun(max_update_ratio=None)
    run.step(0.5)
    assert run.step(30.0).action is Action.NONE


def _spikes_after_history(run: CapRun, base: float, spike: float) -> list[StepReport]:
    for i in range(30):
        run.step(base * (0.9 if i % 2 else 1.1))
    return [run.step(spike) for _ in range(3)]


def _counted(run: CapRun, base: float, spike: float) -> tuple[list[StepReport], list[int]]:
    """The three spikes' reports and the length of the spike count after each."""
    for i in range(30):
        run.step(base * (0.9 if i % 2 else 1.1))
    reports, counts = [], []
    for _ in range(3):
        reports.append(run.step(spike))
        counts.append(len(run.guard.spike_steps))
    return reports, counts


def test_small_sgd_spikes_are_clipped_without_a_backoff() -> None:
    """lr 0.01: cap 100, so a spike of norm 5 would move the weights by 0.5 % (< 1 %)."""
    run = CapRun(lr=0.01, clip=ZScoreClip())
    reports = _spikes_after_history(run, 0.5, 5.0)
    assert all(r.spike and r.action is Action.CLIP for r in reports)
    assert all(r.grad_norm_clipped < 1.0 for r in reports)  # clipped to the threshold
    assert not any(r.backoff for r in reports)
    assert run.guard.backoff.scale == 1.0
    assert run.guard.counters.spikes == 3


def test_large_sgd_spikes_count() -> None:
    """lr 0.1: cap 10, so the same spikes would move the weights by 5 % (> 1 %): they count,
    and the third reaches ``spike_patience``; but no update was over the cap, 3 of the last
    10 steps were clipped and the LR scale is 1: no evidence, the count restarts."""
    run = CapRun(lr=0.1, clip=ZScoreClip())
    reports, counts = _counted(run, 0.5, 5.0)
    assert all(r.spike and r.action is Action.CLIP for r in reports)
    assert counts == [1, 2, 0]
    assert not any(r.backoff for r in reports)
    assert run.guard.backoff.scale == 1.0


def test_spikes_always_count_without_a_cap() -> None:
    """Adam (no update cap): the same three spikes count (and, without evidence, restart)."""
    w = torch.nn.Parameter(torch.ones(N))
    guard = GuardCore([w], torch.optim.Adam([w], lr=0.01))
    out, counts = [], []
    for i in range(33):
        norm = 5.0 if i >= 30 else 0.5 * (0.9 if i % 2 else 1.1)
        w.grad = torch.full((N,), norm / math.sqrt(N))
        out.append(guard.step())
        counts.append(len(guard.spike_steps))
    assert counts[30:] == [1, 2, 0]
    assert not any(r.backoff for r in out)


def test_a_spike_over_the_cap_counts_once() -> None:
    """A spike that the cap clips too is one entry toward ``spike_patience``, not two."""
    run = CapRun(clip=FixedNormClip(2.0), spike_patience=2)
    first = run.step(3.0)  # over the threshold (2) and the cap (1)
    assert first.spike
    assert first.action is Action.CLIP
    assert not first.backoff
    assert run.guard.spike_steps == (1,)
    assert run.updates[-1] == pytest.approx(1.0)  # the smaller bound wins
    assert run.step(3.0).backoff


def test_spikes_never_count_at_lr_zero() -> None:
    """An LR of 0 (e.g. the start of a warmup schedule) moves nothing: no backoff."""
    run = CapRun(lr=0.0, clip=FixedNormClip(2.0), spike_patience=1)
    reports = [run.step(3.0) for _ in range(3)]
    assert all(r.spike and r.action is Action.CLIP for r in reports)
    assert not any(r.backoff for r in reports)


def test_sgd_spikes_always_count_without_max_update_ratio() -> None:
    run = CapRun(lr=0.01, clip=ZScoreClip(), max_update_ratio=None)
    reports, counts = _counted(run, 0.5, 5.0)
    assert counts == [1, 2, 0]
    assert not any(r.backoff for r in reports)


def test_the_largest_group_lr_sets_the_cap() -> None:
    """Momentum is not counted: the cap uses the largest group LR."""
    w1, w2 = torch.nn.Parameter(torch.ones(N)), torch.nn.Parameter(torch.ones(N))
    opt = torch.optim.SGD([{"params": [w1], "lr": 0.1},
                           {"params": [w2], "lr": 0.5, "momentum": 0.9}], lr=1.0)
    guard = GuardCore([w1, w2], opt, clip=NoClip())
    for _ in range(2):
        w1.grad = torch.full((N,), 100.0)
        w2.grad = torch.zeros(N)
        r = guard.step()
    assert r.grad_norm_clipped == pytest.approx(0.1 * math.sqrt(200.0) / 0.5)


def _rising(run: CapRun, start: float, steps: int = 6, rise: float = 1.2) -> list[StepReport]:
    """``steps`` norms rising by ``rise`` each step (the default growth detector fires on
    the 5th consecutive rise of > 5 %); no clip policy, so only growth can back off."""
    return [run.step(start * rise**i) for i in range(steps)]


def test_slow_growth_with_small_sgd_updates_is_no_backoff() -> None:
    """lr 0.01: cap 100; norms 0.5 .. 1.24 move the weights by at most 0.12 % (< 1 %):
    a healthy run's norm rising for a few steps (leaving a plateau) is left alone."""
    run = CapRun(lr=0.01)
    reports = _rising(run, 0.5)
    assert not any(r.growth or r.backoff for r in reports)
    assert all(r.action is Action.NONE for r in reports)
    assert run.guard.backoff.scale == 1.0
    assert run.guard.counters.growth_events == 0


def test_growth_with_large_sgd_updates_counts() -> None:
    """lr 1: cap 1; norms 0.15 .. 0.37 move the weights by 1.5-3.7 % (> 1 %): the 5th
    rise counts; no update over the cap, nothing clipped, LR scale 1: no backoff."""
    run = CapRun(lr=1.0)
    reports = _rising(run, 0.15)
    assert [r.growth for r in reports] == [False] * 5 + [True]
    assert not any(r.backoff for r in reports)
    assert run.guard.backoff.scale == 1.0
    assert run.guard.counters.growth_events == 1


def test_growth_at_an_update_over_the_cap_backs_off() -> None:
    """lr 1: cap 1; norms 0.6 .. 1.49: the 5th rise is over the cap (evidence (a)): it is
    clipped to the cap and backs off in the same step."""
    run = CapRun(lr=1.0)
    reports = _rising(run, 0.6)
    assert [r.growth for r in reports] == [False] * 5 + [True]
    assert [r.backoff for r in reports] == [False] * 5 + [True]
    assert reports[-1].lr_scale == 0.5  # the backed-off update of that very step
    assert run.guard.backoff.scale == 0.5


def test_growth_always_counts_without_a_cap() -> None:
    """The slow rise of the first test backs off with Adam, and with SGD when
    ``max_update_ratio=None``."""
    run = CapRun(lr=0.01, max_update_ratio=None)
    assert [r.growth for r in _rising(run, 0.5)] == [False] * 5 + [True]
    w = torch.nn.Parameter(torch.ones(N))
    guard = GuardCore([w], torch.optim.Adam([w], lr=0.01), clip=NoClip())
    out = []
    for i in range(6):
        w.grad = torch.full((N,), 0.5 * 1.2**i / math.sqrt(N))
        out.append(guard.step())
    assert [r.growth for r in out] == [False] * 5 + [True]
    assert not any(r.backoff for r in out)  # no evidence that the LR is too high
    assert guard.backoff.scale == 1.0


def test_growth_counts_at_its_first_large_update() -> None:
    """lr 0.01: cap 100, the 1 % line at norm 10. Norms 4 * 1.2**i: the detector fires at
    the 6th step (9.95, 0.995 %: held, not counted) and, staying armed, fires again at the
    next rise (11.9, 1.19 %), which counts: the backoff comes there, not 5 rises later."""
    run = CapRun(lr=0.01)
    reports = _rising(run, 4.0, steps=8)
    assert [r.growth for r in reports] == [False] * 6 + [True, False]
    assert run.guard.counters.growth_events == 1
    assert not any(r.backoff for r in reports)  # counted, but no evidence
