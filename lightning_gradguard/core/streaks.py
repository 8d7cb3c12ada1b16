"""Consecutive-step bookkeeping: the non-finite streak and the GradScaler-overflow streak.

A small immutable state machine: every transition returns a new :class:`Streaks`, so the
decision (:func:`~lightning_gradguard.core.decide.decide`) can compute the next state without
changing the current one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Streaks"]


@dataclass(frozen=True, slots=True)
class Streaks:
    """Two streaks and the steps they started at.

    Attributes:
        nonfinite: Consecutive non-finite (skipped) steps.
        nonfinite_start: Step of the current (or last) non-finite streak's first step.
        amp: Consecutive steps a GradScaler skipped (finite loss, non-finite gradients).
        amp_start: Step of the current (or last) GradScaler streak's first step.

    Example:
        >>> s = Streaks().on_nonfinite(7).on_nonfinite(8)
        >>> s.nonfinite, s.nonfinite_start
        (2, 7)
        >>> s.on_finite().nonfinite
        0
    """

    nonfinite: int = 0
    nonfinite_start: int | None = None
    amp: int = 0
    amp_start: int | None = None

    def on_finite(self) -> Streaks:
        """A finite step ends both streaks (their start steps are kept for messages)."""
        if self.nonfinite == 0 and self.amp == 0:
            return self  # the usual case: nothing to change
        return replace(self, nonfinite=0, amp=0)

    def on_nonfinite(self, step: int) -> Streaks:
        """A non-finite step the guard answers (the GradScaler streak is not touched)."""
        n = self.nonfinite + 1
        return replace(self, nonfinite=n, nonfinite_start=step if n == 1 else self.nonfinite_start)

    def on_amp_overflow(self, step: int) -> Streaks:
        """A step left to the GradScaler (the non-finite streak is not touched)."""
        n = self.amp + 1
        return replace(self, amp=n, amp_start=step if n == 1 else self.amp_start)
