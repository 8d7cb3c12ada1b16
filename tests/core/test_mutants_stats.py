"""Rules of the z-score statistics, growth detector and LR backoff the mutation run found
unpinned: argument ranges, saved state, boundaries of the warmup rules."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradguard.core.backoff import LRBackoff, LRScaler
from lightning_gradguard.core.growth import GrowthDetector
from lightning_gradguard.core.policies import ZScoreClip

INF, NAN = math.inf, math.nan


# --- ZScoreClip -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, 2.0])
def test_zscore_ema_decay_range(bad: float) -> None:
    with pytest.raises(ValueError, match=r"`ema_decay` must be a finite number >= 0 and < 1"):
        ZScoreClip(ema_decay=bad)


def test_zscore_ema_decay_limits_allowed() -> None:
    assert ZScoreClip(ema_decay=0.0).ema_decay == 0.0
    assert ZScoreClip(ema_decay=0.999).stats.ema_decay == 0.999


def test_zscore_fresh_state() -> None:
    assert ZScoreClip().state_dict() == {
        "prev_spike": False, "prev_norm": 0.0,
        "stats": {"count": 0, "mean": 0.0, "var": 0.0}}


def test_zscore_first_spike_ever_is_left_out() -> None:
    # a caller-given finite threshold at the very first observation: an isolated spike
    z = ZScoreClip()
    z.observe_value(5.0, 1.0)
    assert z.stats.count == 0
    assert z.state_dict()["prev_spike"] is True


@pytest.mark.parametrize("norm", [0.0, INF, -INF, NAN])
def test_zscore_zero_and_non_finite_norms_change_nothing(norm: float) -> None:
    z = ZScoreClip(warmup_steps=0)
    for x in [1.0, 2.0, 9.0]:  # ends on a spike: prev_spike True
        z.observe_value(x, z.threshold_value())
    before = z.state_dict()
    z.observe_value(norm, z.threshold_value())
    assert z.state_dict() == before


def test_zscore_sigma_floor_is_one_percent_of_the_mean() -> None:
    z = ZScoreClip(z_threshold=2.5, warmup_steps=0)
    for _ in range(5):
        z.observe_value(10.0, z.threshold_value())
    assert z.stats.std == 0.0
    assert z.threshold_value() == pytest.approx(10.0 + 2.5 * 0.1, rel=1e-12)


def test_zscore_loaded_state_with_zero_mean_has_no_threshold() -> None:
    z = ZScoreClip(warmup_steps=0)
    z.load_state_dict({"prev_spike": False, "prev_norm": 0.0,
                       "stats": {"count": 3, "mean": 0.0, "var": 0.0}})
    assert z.threshold_value() == INF


def test_zscore_steady_level_rule_ends_with_the_warmup() -> None:
    # count == warmup_steps: the warmup is over, a repeated spike enters clamped
    z = ZScoreClip(z_threshold=2.5, warmup_steps=2)
    z.observe_value(1.0, z.threshold_value())
    z.observe_value(1.0, z.threshold_value())
    thr = z.threshold_value()
    assert thr == pytest.approx(1.025)
    z.observe_value(5.0, thr)  # isolated: left out
    assert z.stats.count == 2
    z.observe_value(5.0, thr)  # repeated, no higher, but after the warmup: clamped
    assert z.stats.count == 3
    assert z.stats.mean == pytest.approx((1.0 + 1.0 + thr) / 3, rel=1e-12)


def test_zscore_steady_level_rule_at_exactly_the_allowed_rise() -> None:
    z = ZScoreClip(z_threshold=2.5, warmup_steps=10, warmup_factor=10.0)
    z.observe_value(1.0, z.threshold_value())
    thr = z.threshold_value()
    assert thr == 10.0
    z.observe_value(16.0, thr)  # isolated spike: left out
    nxt = 16.0 * 1.05  # a second spike exactly at the allowed rise: a steady level
    z.observe_value(nxt, z.threshold_value())
    assert z.stats.count == 2
    assert z.stats.mean == pytest.approx((1.0 + nxt) / 2, rel=1e-12)


def test_zscore_steady_level_rule_above_the_allowed_rise_is_clamped() -> None:
    z = ZScoreClip(z_threshold=2.5, warmup_steps=10, warmup_factor=10.0)
    z.observe_value(1.0, z.threshold_value())
    z.observe_value(16.0, 10.0)
    z.observe_value(16.0 * 1.06, 10.0)
    assert z.stats.mean == pytest.approx((1.0 + 10.0) / 2, rel=1e-12)


# --- GrowthDetector -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_growth_fires_never_on_a_non_finite_value(bad: float) -> None:
    d = GrowthDetector(patience=1, min_rise=0.0)
    d.update(1.0)
    assert d.fires(bad) is False
    assert d.update(bad) is False
    assert d.state_dict() == {"prev": 1.0, "streak": 0}


def test_growth_fires_not_on_a_fall_even_with_patience_one() -> None:
    d = GrowthDetector(patience=1, min_rise=0.0)
    d.update(1.0)
    assert (d.fires(0.5), d.fires(1.0), d.fires(1.5)) == (False, False, True)


def test_growth_min_rise_boundary() -> None:
    d = GrowthDetector(patience=1, min_rise=0.5)
    d.update(2.0)
    assert (d.fires(3.0), d.fires(3.0000001)) == (False, True)


# --- LRBackoff / LRScaler -------------------------------------------------------------------


def test_backoff_defaults() -> None:
    b = LRBackoff()
    assert (b.factor, b.recovery_steps, b.min_scale) == (0.5, 200, 1e-3)


def test_scale_one_leaves_a_later_lr_change_alone() -> None:
    # apply(1.0) is a no-op: it saves nothing the step post-hook could put back
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.1)
    LRScaler(opt).apply(1.0)
    opt.param_groups[0]["lr"] = 0.2  # e.g. the user's own LR change
    p.grad = torch.ones(1)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.2
    assert p.item() == pytest.approx(0.8)
