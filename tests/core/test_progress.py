"""The loss trend (``core/progress.py``): when a run counts as learning."""

from __future__ import annotations

import math

import torch

from lightning_gradguard.core.progress import LONG, RECENT, LossTrend

NAN = float("nan")


def fed(losses: list[float]) -> LossTrend:
    t = LossTrend()
    for x in losses:
        t.update(x)
    return t


def test_windows() -> None:
    assert (RECENT, LONG) == (10, 50)  # about the last 10 steps; the default spike_window


def test_nothing_counts_as_improving_before_a_loss() -> None:
    assert not LossTrend().improving
    assert not fed([NAN, math.inf]).improving
    t = LossTrend()
    t.update(None)
    assert not t.improving
    assert math.isnan(t.first)
    assert math.isnan(t.recent)
    assert math.isnan(t.long)


def test_over_the_first_steps_both_windows_are_the_same() -> None:
    # a falling loss is not yet "improving" while both windows hold the same losses, so an
    # explosion at the very start is judged as without the trend
    t = fed([10.0 - k for k in range(RECENT)])
    assert t.recent == t.long == 5.5
    assert not t.improving
    t.update(0.0)
    assert t.improving  # the 11th loss: the windows differ


def test_a_falling_loss_is_improving() -> None:
    t = fed([10.0 - 0.1 * k for k in range(40)])
    assert t.recent < t.long < t.first
    assert t.improving


def test_a_rising_loss_is_not() -> None:
    assert not fed([1.0 + 0.1 * k for k in range(40)]).improving


def test_a_flat_loss_is_not() -> None:
    assert not fed([3.0] * 40).improving


def test_the_windows_hold_the_latest_losses() -> None:
    t = fed([float(k) for k in range(100)])
    assert t.losses == [float(k) for k in range(50, 100)]
    assert t.recent == 94.5
    assert t.long == 74.5
    assert t.first == 0.0


def test_one_outlier_batch_is_not_a_trend() -> None:
    # a loss x1e6 on one corrupt batch: both medians barely move and the run still learns
    losses = [10.0 - 0.1 * k for k in range(40)]
    spiked = [*losses[:30], 1e7, *losses[30:]]
    t = fed(spiked)
    assert t.improving
    for k in range(1, RECENT):  # at every step after it
        assert fed(spiked[:31 + k]).improving


def test_a_rising_loss_ends_improving_once_most_recent_losses_are_above() -> None:
    # improving for 30 steps, then the loss climbs by 1 a step: no longer improving as soon
    # as more than half of the recent window lies above the longer median (here 7 steps)
    losses = [10.0 - 0.1 * k for k in range(30)]
    rising = [losses[-1] + 1.0 * (k + 1) for k in range(RECENT)]
    states = []
    for k in range(RECENT + 1):
        t = fed(losses + rising[:k])
        above = sum(v > t.long for v in t.losses[-RECENT:])
        states.append(t.improving)
        if above > RECENT // 2:
            assert not t.improving, k
    assert states == [True] * 7 + [False] * 4


def test_falling_back_after_an_excursion_is_not_improving() -> None:
    # an instability drove the loss from 2 to 50; as it falls back the recent median is below
    # the inflated longer median, but still above where the run started
    t = fed([2.0] * 10 + [50.0] * 30 + [10.0] * 10)
    assert t.recent < t.long
    assert t.recent > t.first == 2.0
    assert not t.improving


def test_non_finite_losses_are_ignored() -> None:
    losses = [10.0 - 0.1 * k for k in range(40)]
    with_nan = [*losses[:20], NAN, math.inf, -math.inf, *losses[20:]]
    a, b = fed(losses), fed(with_nan)
    assert a.state_dict() == b.state_dict()
    assert b.improving


def test_a_first_non_finite_loss_is_not_the_first_loss() -> None:
    assert fed([NAN, 5.0, 4.0]).first == 5.0


def test_tensor_losses() -> None:
    t = LossTrend()
    for k in range(40):
        t.update(torch.tensor(10.0 - 0.1 * k))
    assert t.improving


def test_state_dict_round_trip() -> None:
    src = fed([10.0 - 0.1 * k for k in range(25)])
    dst = LossTrend()
    dst.load_state_dict(src.state_dict())
    assert dst.state_dict() == src.state_dict()
    assert dst.first == 10.0
    for k in range(25, 80):
        src.update(10.0 - 0.1 * k)
        dst.update(10.0 - 0.1 * k)
        assert dst.improving == src.improving
    assert dst.state_dict() == src.state_dict()
    src.update(1.0)
    assert dst.losses != src.losses  # the loaded state is a copy


def test_reset_forgets_the_run() -> None:
    t = fed([10.0 - 0.1 * k for k in range(40)])
    t.reset()
    assert not t.improving
    assert math.isnan(t.first)
    assert t.losses == []
