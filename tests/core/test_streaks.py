"""Streaks: every transition of the two-streak state machine, field by field.

Only the two streaks and their start steps are compared (``four``): fields added to
:class:`Streaks` later have their own tests.
"""

from __future__ import annotations

import dataclasses

import pytest

from lightning_gradguard.core.streaks import Streaks

Four = tuple[int, "int | None", int, "int | None"]


def four(s: Streaks) -> tuple[int, int | None, int, int | None]:
    return (s.nonfinite, s.nonfinite_start, s.amp, s.amp_start)


def make(nonfinite: int, nonfinite_start: int | None, amp: int,
         amp_start: int | None) -> Streaks:
    return Streaks(nonfinite=nonfinite, nonfinite_start=nonfinite_start, amp=amp,
                   amp_start=amp_start)


def test_defaults() -> None:
    assert four(Streaks()) == (0, None, 0, None)


def test_is_immutable() -> None:
    s = Streaks()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.nonfinite = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("before", "step", "after"),
    [
        ((0, None, 0, None), 7, (1, 7, 0, None)),
        ((1, 7, 0, None), 8, (2, 7, 0, None)),
        ((2, 7, 0, None), 9, (3, 7, 0, None)),
        # a new streak after a finite step starts at its own step
        ((0, 7, 0, None), 20, (1, 20, 0, None)),
        # the GradScaler streak is left alone
        ((0, None, 3, 4), 10, (1, 10, 3, 4)),
        ((5, 1, 2, 4), 10, (6, 1, 2, 4)),
    ],
)
def test_on_nonfinite(before: Four, step: int, after: Four) -> None:
    assert four(make(*before).on_nonfinite(step)) == after


@pytest.mark.parametrize(
    ("before", "step", "after"),
    [
        ((0, None, 0, None), 3, (0, None, 1, 3)),
        ((0, None, 1, 3), 4, (0, None, 2, 3)),
        ((0, None, 0, 3), 11, (0, None, 1, 11)),
        # the non-finite streak is left alone
        ((2, 5, 0, None), 6, (2, 5, 1, 6)),
        ((2, 5, 4, 1), 6, (2, 5, 5, 1)),
    ],
)
def test_on_amp_overflow(before: Four, step: int, after: Four) -> None:
    assert four(make(*before).on_amp_overflow(step)) == after


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((0, None, 0, None), (0, None, 0, None)),
        ((3, 7, 0, None), (0, 7, 0, None)),
        ((0, None, 2, 4), (0, None, 0, 4)),
        ((3, 7, 2, 4), (0, 7, 0, 4)),
        # streaks already over: the start steps stay for messages
        ((0, 7, 0, 4), (0, 7, 0, 4)),
    ],
)
def test_on_finite_ends_both_streaks_and_keeps_their_starts(before: Four, after: Four) -> None:
    assert four(make(*before).on_finite()) == after


def test_on_finite_without_a_streak_returns_the_same_object() -> None:
    s = make(0, 7, 0, 4)
    assert s.on_finite() is s


def test_transitions_leave_the_old_state_alone() -> None:
    s = make(2, 5, 1, 6)
    s.on_nonfinite(7)
    s.on_amp_overflow(7)
    s.on_finite()
    assert four(s) == (2, 5, 1, 6)


def test_a_long_sequence() -> None:
    s = Streaks().on_nonfinite(1).on_nonfinite(2).on_amp_overflow(3).on_nonfinite(4)
    assert four(s) == (3, 1, 1, 3)
    s = s.on_finite().on_amp_overflow(6).on_amp_overflow(7)
    assert four(s) == (0, 1, 2, 6)
    assert four(s.on_nonfinite(8)) == (1, 8, 2, 6)
