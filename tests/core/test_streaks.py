"""Streaks: every transition of the two-streak state machine, field by field."""

from __future__ import annotations

import dataclasses

import pytest

from lightning_gradguard.core.streaks import Streaks


def test_defaults() -> None:
    assert Streaks() == Streaks(nonfinite=0, nonfinite_start=None, amp=0, amp_start=None)


def test_is_immutable() -> None:
    s = Streaks()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.nonfinite = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("before", "step", "after"),
    [
        (Streaks(), 7, Streaks(1, 7, 0, None)),
        (Streaks(1, 7, 0, None), 8, Streaks(2, 7, 0, None)),
        (Streaks(2, 7, 0, None), 9, Streaks(3, 7, 0, None)),
        # a new streak after a finite step starts at its own step
        (Streaks(0, 7, 0, None), 20, Streaks(1, 20, 0, None)),
        # the AMP streak is left alone
        (Streaks(0, None, 3, 4), 10, Streaks(1, 10, 3, 4)),
        (Streaks(5, 1, 2, 4), 10, Streaks(6, 1, 2, 4)),
    ],
)
def test_on_nonfinite(before: Streaks, step: int, after: Streaks) -> None:
    assert before.on_nonfinite(step) == after


@pytest.mark.parametrize(
    ("before", "step", "after"),
    [
        (Streaks(), 3, Streaks(0, None, 1, 3)),
        (Streaks(0, None, 1, 3), 4, Streaks(0, None, 2, 3)),
        (Streaks(0, None, 0, 3), 11, Streaks(0, None, 1, 11)),
        # the non-finite streak is left alone
        (Streaks(2, 5, 0, None), 6, Streaks(2, 5, 1, 6)),
        (Streaks(2, 5, 4, 1), 6, Streaks(2, 5, 5, 1)),
    ],
)
def test_on_amp_overflow(before: Streaks, step: int, after: Streaks) -> None:
    assert before.on_amp_overflow(step) == after


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (Streaks(), Streaks()),
        (Streaks(3, 7, 0, None), Streaks(0, 7, 0, None)),
        (Streaks(0, None, 2, 4), Streaks(0, None, 0, 4)),
        (Streaks(3, 7, 2, 4), Streaks(0, 7, 0, 4)),
        # streaks already over: the start steps stay for messages
        (Streaks(0, 7, 0, 4), Streaks(0, 7, 0, 4)),
    ],
)
def test_on_finite_ends_both_streaks_and_keeps_their_starts(before: Streaks,
                                                            after: Streaks) -> None:
    assert before.on_finite() == after


def test_on_finite_without_a_streak_returns_the_same_object() -> None:
    s = Streaks(0, 7, 0, 4)
    assert s.on_finite() is s


def test_a_long_sequence() -> None:
    s = Streaks()
    s = s.on_nonfinite(1).on_nonfinite(2).on_amp_overflow(3).on_nonfinite(4)
    assert s == Streaks(3, 1, 1, 3)
    s = s.on_finite().on_amp_overflow(6).on_amp_overflow(7)
    assert s == Streaks(0, 1, 2, 6)
    s = s.on_nonfinite(8)
    assert s == Streaks(1, 8, 2, 6)
