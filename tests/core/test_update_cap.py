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
    run.step(0.25)
    reports = [run.step(1.5) for _ in range(3)]  # grown x6 (arms the cap), 1.5x over it
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
    run.step(0.25)
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
    run.step(0.5)
    first = run.step(3.0)  # over the threshold (2) and the cap (1), grown x6: armed
    assert first.spike
    assert first.action is Action.CLIP
    assert not first.backoff
    assert run.guard.spike_steps == (2,)
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
    for g in (1.0, 100.0):  # grown x100 over the cap: armed
        w1.grad = torch.full((N,), g)
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


def test_slow_growth_over_an_unarmed_cap_is_no_backoff() -> None:
    """lr 1: norms 0.6 .. 1.49 rise by 1.2x a step, the last ones over r * ||w||: slow
    growth is no sign of an LR above the stability limit, so the cap is not armed, nothing
    is clipped and the growth event finds no evidence: no backoff."""
    run = CapRun(lr=1.0)
    reports = _rising(run, 0.6)
    assert [r.growth for r in reports] == [False] * 5 + [True]
    assert all(r.action is Action.NONE for r in reports)
    assert not any(r.backoff for r in reports)
    assert run.guard.update_control.armed is False
    assert run.updates[-1] == pytest.approx(0.6 * 1.2**5, rel=1e-5)  # the whole update


def test_growth_at_an_update_over_the_cap_backs_off() -> None:
    """lr 1: cap 1, armed by a x6 jump first; then norms 0.6 .. 1.49: the 5th rise is over
    the cap (evidence (a)): it is clipped to the cap and backs off in the same step (no
    spike count here: ``spike_patience=0``, so only the growth detector can trigger)."""
    run = CapRun(lr=1.0, spike_patience=0)
    run.step(0.25)
    assert run.step(1.5).action is Action.CLIP  # x6 over the cap: armed, clipped
    assert run.guard.update_control.armed is True
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


# --------------------------------------------------------------------------- healthy runs
def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Any, lr: float,
           epochs: int, guard: bool, seed: int = 0, adamw: bool = False,
           batch: int = 32, momentum: float = 0.0) -> tuple[float, GuardCore | None]:
    """Plain SGD (with ``momentum``; or AdamW, weight decay 0.1), shuffled batches of the
    first 80 % of (x, y) for ``epochs`` epochs; returns the loss on the last 20 % (held out)."""
    n = len(x) * 4 // 5
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1) if adamw
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum))
    core = GuardCore(model, opt) if guard else None
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            if core is not None:
                core.step(loss)
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        return float(loss_fn(model(x[n:]), y[n:])), core


def _large_target_mlp(seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A user's regression MLP: targets ``x @ w`` with ``w ~ N(0, 1)``, first losses ~20."""
    torch.manual_seed(seed)
    x = torch.randn(2000, 20)
    w = torch.randn(20, 1)
    x = torch.cat([x, torch.randn(500, 20)])  # 2000 to train on, 500 held out
    y = x @ w
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 1))
    return model, x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_large_target_sgd_mlp_at_a_healthy_lr_is_left_alone(seed: int) -> None:
    """lr 0.05, 5 epochs: the first updates move the weights by up to 25 % (large targets, a
    transient rise of the gradient by up to 2x a step) — a stable run: the cap is not armed,
    no LR backoff, and the run ends no worse than 1.005x the unguarded one (it took 2-3
    backoffs and ended 1.1-1.7x worse when every update over 10 % of the weights was
    capped)."""
    mse = torch.nn.functional.mse_loss
    model, x, y = _large_target_mlp(seed)
    bare, _ = _train(model, x, y, mse, 0.05, 5, guard=False, seed=seed)
    model, x, y = _large_target_mlp(seed)
    guarded, core = _train(model, x, y, mse, 0.05, 5, guard=True, seed=seed)
    assert core is not None
    assert core.update_control.armed is False  # type: ignore[attr-defined]
    assert core.counters.lr_backoffs == 0
    assert core.lr_scale == 1.0
    assert guarded <= 1.005 * bare


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_adamw_mlp_whose_gradient_norm_rises_as_it_fits_is_not_backed_off(seed: int) -> None:
    """AdamW at its default lr 1e-3, targets x2, batch 16, one epoch: the gradient norm rises
    while the loss falls, the z-score threshold lags it and clipping becomes the rule. AdamW's
    updates do not grow with the gradient (normalised), so that is no evidence: no backoff,
    and the run ends no worse than 1.005x the unguarded one (when clipping as the rule counted
    for every optimizer, seeds 1 and 2 took 3 and 4 backoffs and ended 16x worse)."""
    mse = torch.nn.functional.mse_loss
    model, x, y = _large_target_mlp(seed)
    bare, _ = _train(model, x, 2 * y, mse, 1e-3, 1, guard=False, seed=seed, adamw=True,
                     batch=16)
    model, x, y = _large_target_mlp(seed)
    guarded, core = _train(model, x, 2 * y, mse, 1e-3, 1, guard=True, seed=seed, adamw=True,
                           batch=16)
    assert core is not None
    assert core.update_control.limit(1.0).normalised
    assert core.counters.spikes >= 5  # clipping was the rule at some point
    assert core.counters.lr_backoffs == 0
    assert core.lr_scale == 1.0
    assert guarded <= 1.005 * bare


def test_a_zero_initialised_model_with_plain_sgd_is_left_alone() -> None:
    """Logistic regression from zero weights, SGD lr 0.1: against ||w|| = 0 every early
    update is "infinitely" large. No cap clip, no backoff, no infinite ratio in what the
    guard reports, and the same run as without the guard."""
    torch.manual_seed(0)
    x = torch.randn(3000, 10)
    y = (x @ torch.randn(10, 1) > 0).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def model() -> torch.nn.Module:
        m = torch.nn.Linear(10, 1)
        torch.nn.init.zeros_(m.weight)
        torch.nn.init.zeros_(m.bias)
        return m

    bare, _ = _train(model(), x, y, bce, 0.1, 3, guard=False)
    guarded, core = _train(model(), x, y, bce, 0.1, 3, guard=True)
    assert core is not None
    assert core.update_control.armed is False  # type: ignore[attr-defined]
    summary = core.summary()
    assert summary["lr_backoffs"] == 0
    assert summary["clipped_steps"] == summary["spikes"]  # only z-score spikes, no cap clip
    assert guarded <= 1.005 * bare
    assert "inf" not in str(summary["diagnosis"]).lower()


def test_a_far_too_high_sgd_lr_arms_the_cap_and_is_rescued() -> None:
    """The same MLP at lr 1.5 (30x): the gradient grows ~x100 in one step, the update is far
    over the cap: armed at once; without a guard the run ends non-finite."""
    mse = torch.nn.functional.mse_loss
    model, x, y = _large_target_mlp(0)
    bare, _ = _train(model, x, y, mse, 1.5, 2, guard=False)
    assert not math.isfinite(bare)
    model, x, y = _large_target_mlp(0)
    with torch.no_grad():
        initial = float(mse(model(x[2000:]), y[2000:]))
    guarded, core = _train(model, x, y, mse, 1.5, 2, guard=True)
    assert core is not None
    assert core.update_control.armed is True  # type: ignore[attr-defined]
    assert math.isfinite(guarded)
    assert guarded < initial


@pytest.mark.parametrize("seed", [0, 1])
def test_a_momentum_sgd_divergence_that_builds_over_several_steps_arms_the_cap(seed: int) -> None:
    """The same MLP with momentum 0.9 at lr 0.05, 5x the LR it trains well at: the gradient
    norm grows a few-fold a step, compounding, so the cap is armed by the run of rises (the
    one-step x5 rule armed it too late: the runs ended at 15.6 and 15.6, from 15.6 and 22.5 at
    the start; now 2.8 and 0.09). Without a guard they end above 0.9x their start or
    non-finite."""
    mse = torch.nn.functional.mse_loss
    model, x, y = _large_target_mlp(seed)
    with torch.no_grad():
        initial = float(mse(model(x[2000:]), y[2000:]))
    bare, _ = _train(model, x, y, mse, 0.05, 2, guard=False, seed=seed, momentum=0.9)
    assert not bare < 0.9 * initial  # diverged (non-finite) or no progress
    model, x, y = _large_target_mlp(seed)
    guarded, core = _train(model, x, y, mse, 0.05, 2, guard=True, seed=seed, momentum=0.9)
    assert core is not None
    assert core.update_control.armed is True  # type: ignore[attr-defined]
    assert guarded < 0.2 * initial


def test_momentum_sgd_at_a_healthy_lr_leaves_the_cap_unarmed() -> None:
    """Momentum 0.9 at lr 0.01: the gradient norm rises up to ~3x a step early on (large
    targets) and falls back; the cap stays unarmed and the run is the unguarded one."""
    mse = torch.nn.functional.mse_loss
    model, x, y = _large_target_mlp(0)
    bare, _ = _train(model, x, y, mse, 0.01, 2, guard=False, momentum=0.9)
    model, x, y = _large_target_mlp(0)
    guarded, core = _train(model, x, y, mse, 0.01, 2, guard=True, momentum=0.9)
    assert core is not None
    assert core.update_control.armed is False  # type: ignore[attr-defined]
    assert core.counters.lr_backoffs == 0
    assert guarded == bare


# ----------------------------------------------------------------- SGDUpdateCap: arming edges


def _cap(**kw: Any) -> Any:
    from lightning_gradguard.core.update_cap import SGDUpdateCap

    w = torch.nn.Parameter(torch.ones(N))  # norm 10
    cap = SGDUpdateCap(torch.optim.SGD([w], lr=1.0), max_ratio=0.1, **kw)
    cap.observe_weight_norm(10.0)  # the cap on the gradient norm: 0.1 * 10 / 1 = 1
    return cap


def test_default_arm_growth_is_five_inclusive() -> None:
    cap = _cap()
    cap.observe_grad_norm(0.5, lr_scale=1.0)  # the first step, under the cap
    assert not cap.armed
    cap.observe_grad_norm(2.5, lr_scale=1.0)  # exactly x5 and over the cap: armed
    assert cap.armed
    slower = _cap()
    slower.observe_grad_norm(0.5, lr_scale=1.0)
    slower.observe_grad_norm(2.4, lr_scale=1.0)  # x4.8: not the signature
    assert not slower.armed


def test_arm_growth_just_above_one_accepted() -> None:
    cap = _cap(arm_growth=1.5)
    assert cap.arm_growth == 1.5
    cap.observe_grad_norm(0.9, lr_scale=1.0)
    cap.observe_grad_norm(1.35, lr_scale=1.0)  # x1.5, over the cap
    assert cap.armed


def test_first_step_under_one_but_over_the_cap_arms() -> None:
    # gradient norms below 1 are ordinary: 0.5 at lr 1 against weights of norm 1 is 50 %
    from lightning_gradguard.core.update_cap import SGDUpdateCap, UpdateLimit

    w = torch.nn.Parameter(torch.ones(1))
    cap = SGDUpdateCap(torch.optim.SGD([w], lr=1.0), max_ratio=0.1)
    cap.observe_weight_norm(1.0)
    cap.observe_grad_norm(0.5, lr_scale=1.0)
    assert cap.armed
    assert cap.limit(lr_scale=1.0) == UpdateLimit(cap=0.1, far=10.0, scale=None)


def test_an_update_exactly_at_the_cap_does_not_arm() -> None:
    cap = _cap()
    cap.observe_grad_norm(1.0, lr_scale=1.0)  # lr * g == 0.1 * ||w|| exactly
    assert not cap.armed
    cap2 = _cap()
    cap2.observe_grad_norm(1.0 + 1e-9, lr_scale=1.0)
    assert cap2.armed


def test_non_finite_and_zero_norms_are_not_history() -> None:
    # a skipped step (inf) or an all-zero gradient leaves the previous finite norm as the
    # reference of the growth test
    for gap in (math.inf, 0.0):
        cap = _cap()
        cap.observe_grad_norm(0.5, lr_scale=1.0)
        cap.observe_grad_norm(gap, lr_scale=1.0)
        assert cap.last_grad_norm == 0.5
        cap.observe_grad_norm(2.0, lr_scale=1.0)  # x4 of 0.5: over the cap, not armed
        assert not cap.armed
        cap.observe_grad_norm(10.0, lr_scale=1.0)  # x5 of 2.0: armed
        assert cap.armed


def test_preview_of_an_infinite_norm_arms_nothing() -> None:
    from lightning_gradguard.core.update_cap import UpdateLimit

    cap = _cap()
    assert cap.preview(10.0, math.inf, lr_scale=1.0) == UpdateLimit(cap=math.inf, far=10.0,
                                                                    scale=1.0)
    assert cap.preview(10.0, 3.0, lr_scale=1.0) == UpdateLimit(cap=1.0, far=10.0, scale=None)
    assert not cap.armed


def test_preview_without_a_new_weight_norm_uses_the_last_one() -> None:
    from lightning_gradguard.core.update_cap import UpdateLimit

    cap = _cap()
    assert cap.preview(None, 0.5, lr_scale=1.0) == UpdateLimit(cap=math.inf, far=10.0,
                                                               scale=1.0)
    assert cap.preview(None, 3.0, lr_scale=0.5) == UpdateLimit(cap=2.0, far=10.0, scale=None)


def test_a_run_of_rises_to_five_times_the_steps_before_it_arms() -> None:
    cap = _cap()
    for g in (0.8, 0.3, 1.2, 2.4, 3.9):  # over the cap from 1.2; x4, x2, x1.6 a step
        cap.observe_grad_norm(g, lr_scale=1.0)
    assert (cap.armed, cap.rises, cap.recent) == (False, 3, (0.8, 0.3, 1.2, 2.4, 3.9))
    cap.observe_grad_norm(4.0, lr_scale=1.0)  # x5 the 0.8 before the rise began: armed
    assert cap.armed
    assert cap.limit(lr_scale=1.0).cap == 1.0


def test_an_oscillation_is_measured_against_its_recent_peak_not_its_trough() -> None:
    cap = _cap()
    for g in (0.9, 0.1, 0.3, 0.6, 1.2, 2.4, 4.4):  # x44 the trough, x4.9 the 0.9 before it
        cap.observe_grad_norm(g, lr_scale=1.0)
    assert not cap.armed
    cap.observe_grad_norm(0.2, lr_scale=1.0)  # a fall ends the run: history 0.9 .. 4.4
    cap.observe_grad_norm(0.9, lr_scale=1.0)  # x4.5 the last one, under x5 the 4.4 peak
    assert (cap.armed, cap.rises) == (False, 1)


def test_a_run_of_rises_older_than_the_history_does_not_arm_by_the_run() -> None:
    from lightning_gradguard.core.update_cap import ARM_HISTORY

    cap = _cap()
    g = 0.5
    cap.observe_grad_norm(g, lr_scale=1.0)
    for _ in range(ARM_HISTORY + 2):  # x1.15 a step: x5.35 after 12 steps, over the cap
        g *= 1.15
        cap.observe_grad_norm(g, lr_scale=1.0)
    assert g > 5 * 0.5
    assert not cap.armed
    assert (cap.rises, len(cap.recent)) == (ARM_HISTORY, ARM_HISTORY)


def test_the_history_of_rises_survives_a_state_round_trip_and_an_older_state_loads() -> None:
    cap = _cap()
    for g in (0.8, 0.3, 1.2):
        cap.observe_grad_norm(g, lr_scale=1.0)
    state = cap.state_dict()
    assert (state["recent"], state["rises"]) == ([0.8, 0.3, 1.2], 1)
    loaded = _cap()
    loaded.load_state_dict(state)
    assert (loaded.recent, loaded.rises) == ((0.8, 0.3, 1.2), 1)
    loaded.observe_grad_norm(4.0, lr_scale=1.0)  # x5 the 0.8 before the rise, as if unbroken
    assert loaded.armed
    older = {k: v for k, v in state.items() if k not in ("recent", "rises")}
    fresh = _cap()
    fresh.load_state_dict(older)  # a state saved before the history existed
    assert (fresh.recent, fresh.rises, fresh.last_grad_norm) == ((), 0, 1.2)


def test_a_fall_or_a_flat_step_never_arms_by_the_run() -> None:
    from lightning_gradguard.core.update_cap import SGDUpdateCap

    w = torch.nn.Parameter(torch.ones(N))
    for last in (4.6, 4.5):  # a flat step, then a fall
        cap = SGDUpdateCap(torch.optim.SGD([w], lr=1.0), max_ratio=0.1)
        cap.observe_weight_norm(100.0)  # a cap of 10 on the gradient norm
        for g in (0.9, 0.4, 1.6, 2.4, 4.6):  # x5.1 the 0.9 before the run, but under the cap
            cap.observe_grad_norm(g, lr_scale=1.0)
        assert not cap.armed
        cap.observe_weight_norm(10.0)  # now a cap of 1
        cap.observe_grad_norm(last, lr_scale=1.0)  # over the cap, not a rise: not armed
        assert (cap.armed, cap.rises) == (False, 0)


def test_a_flat_step_ends_a_run_of_rises() -> None:
    cap = _cap()
    for g in (0.9, 0.4, 1.2, 1.2, 2.4):  # the run starts again at the second 1.2
        cap.observe_grad_norm(g, lr_scale=1.0)
    assert cap.rises == 1
    cap.observe_grad_norm(4.6, lr_scale=1.0)  # x5.1 the 0.9, but x3.8 the 1.2 before the run
    assert not cap.armed


def test_a_run_as_long_as_the_history_has_nothing_before_it() -> None:
    from lightning_gradguard.core.update_cap import ARM_HISTORY

    cap = _cap()
    g = 0.5
    cap.observe_grad_norm(g, lr_scale=1.0)
    for _ in range(ARM_HISTORY):  # ten slow rises: the 0.5 leaves the history
        g *= 1.01
        cap.observe_grad_norm(g, lr_scale=1.0)
    assert (cap.rises, cap.recent[0]) == (ARM_HISTORY, 0.505)
    cap.observe_grad_norm(g * 4.9, lr_scale=1.0)  # x5.2 the oldest of the run, x4.9 the last
    assert not cap.armed


def test_a_state_that_went_through_json_loads_and_arms() -> None:
    import json

    cap = _cap()
    for g in (0.8, 0.3, 1.2):
        cap.observe_grad_norm(g, lr_scale=1.0)
    state = json.loads(json.dumps(cap.state_dict()))
    state["rises"] = float(state["rises"])  # as a float, like any number read back as one
    loaded = _cap()
    loaded.load_state_dict(state)
    assert type(loaded.rises) is int
    assert loaded.rises == 1
    loaded.observe_grad_norm(4.0, lr_scale=1.0)
    assert loaded.armed
