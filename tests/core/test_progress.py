"""The loss trend (``core/progress.py``): when a run counts as learning."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradguard.core.progress import LONG_DECAY, RECENT_DECAY, LossTrend

NAN = float("nan")


def fed(losses: list[float]) -> LossTrend:
    t = LossTrend()
    for x in losses:
        t.update(x)
    return t


def test_decays_are_a_recent_and_a_longer_mean() -> None:
    assert 0.0 < RECENT_DECAY < LONG_DECAY < 1.0


def test_nothing_counts_as_improving_before_a_loss() -> None:
    assert not LossTrend().improving
    assert not fed([NAN, math.inf]).improving
    t = LossTrend()
    t.update(None)
    assert not t.improving
    assert math.isnan(t.first)


def test_over_the_first_steps_both_means_are_equal() -> None:
    # exact running means until the recent decay takes over: a falling loss is not yet
    # "improving", so an explosion at the very start is judged as without the trend
    t = fed([10.0 - k for k in range(10)])
    assert t.recent.mean == pytest.approx(t.long.mean)
    assert not t.improving


def test_a_falling_loss_is_improving() -> None:
    t = fed([10.0 - 0.1 * k for k in range(40)])
    assert t.recent.mean < t.long.mean < t.first
    assert t.improving


def test_a_rising_loss_is_not() -> None:
    assert not fed([1.0 + 0.1 * k for k in range(40)]).improving


def test_a_flat_loss_is_not() -> None:
    assert not fed([3.0] * 40).improving


def test_falling_back_after_an_excursion_is_not_improving() -> None:
    # an instability drove the loss from 2 to 50; as it falls back the recent mean is below
    # the inflated longer mean, but still above where the run started
    losses = [2.0] * 20 + [50.0] * 10 + [10.0] * 20
    t = fed(losses)
    assert t.recent.mean < t.long.mean
    assert t.recent.mean > t.first == 2.0
    assert not t.improving


def test_non_finite_losses_are_ignored() -> None:
    losses = [10.0 - 0.1 * k for k in range(40)]
    with_nan = [*losses[:20], NAN, math.inf, -math.inf, *losses[20:]]
    a, b = fed(losses), fed(with_nan)
    assert a.state_dict() == b.state_dict()
    assert b.improving


def test_a_first_non_finite_loss_is_not_the_first_loss() -> None:
    t = fed([NAN, 5.0, 4.0])
    assert t.first == 5.0


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
    for k in range(25, 40):
        src.update(10.0 - 0.1 * k)
        dst.update(10.0 - 0.1 * k)
        assert dst.improving == src.improving
    assert dst.state_dict() == src.state_dict()


def test_reset_forgets_the_run() -> None:
    t = fed([10.0 - 0.1 * k for k in range(40)])
    t.reset()
    assert not t.improving
    assert math.isnan(t.first)
    assert t.recent.count == t.long.count == 0
