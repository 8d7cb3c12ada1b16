"""Step-to-step bookkeeping: the streaks, and the recent steps the decision looks back on.

The non-finite and GradScaler-overflow streaks, the last non-finite step and the recently
clipped steps. A small immutable state machine: every transition returns a new
:class:`Streaks`, so the decision (:func:`~lightning_gradguard.core.decide.decide`) can
compute the next state without changing the current one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lightning_gradguard.core._friendly import friendly_kwargs

__all__ = ["CLIP_HISTORY", "Streaks"]

#: how many recent steps the clip history covers (the step itself included)
CLIP_HISTORY = 10


@friendly_kwargs
@dataclass(frozen=True, slots=True)
class Streaks:
    """Two streaks, the steps they started at, and recent events.

    Attributes:
        nonfinite: Consecutive non-finite (skipped) steps.
        nonfinite_start: Step of the current (or last) non-finite streak's first step.
        amp: Consecutive steps a GradScaler skipped (finite loss, non-finite gradients).
        amp_start: Step of the current (or last) GradScaler streak's first step.
        last_nonfinite: Clock of the last non-finite step the guard answered (``None``: none
            yet); kept after the streak ends. The clock is the optimizer's own step count
            (see :attr:`~lightning_gradguard.core.decide.GuardState.clock`); the start steps
            above are the caller's steps, for messages.
        clipped: Clocks of the steps among the last :data:`CLIP_HISTORY` finite steps whose
            gradients were clipped (oldest first).

    Example:
        >>> s = Streaks().on_nonfinite(7).on_nonfinite(8)
        >>> s.nonfinite, s.nonfinite_start, s.last_nonfinite
        (2, 7, 8)
        >>> s.on_finite().nonfinite
        0
        >>> s.on_finite(9, clipped=True).on_finite(19).clipped  # step 9 left the history
        ()
    """

    nonfinite: int = 0
    nonfinite_start: int | None = None
    amp: int = 0
    amp_start: int | None = None
    last_nonfinite: int | None = None
    clipped: tuple[int, ...] = ()

    def on_finite(self, step: int | None = None, *, clipped: bool = False) -> Streaks:
        """A finite step ends both streaks (their start steps are kept for messages).

        With ``step`` (the clock, see :attr:`last_nonfinite`), the clip history takes the
        step (if it was ``clipped``) and forgets steps that are :data:`CLIP_HISTORY` or more
        steps old.
        """
        history = self.clipped
        if step is not None:
            if history and history[0] <= step - CLIP_HISTORY:
                history = tuple([t for t in history if t > step - CLIP_HISTORY])
            if clipped:
                history = (*history, step)
        if self.nonfinite == 0 and self.amp == 0 and history is self.clipped:
            return self  # the usual case: nothing to change
        return replace(self, nonfinite=0, amp=0, clipped=history)

    def on_nonfinite(self, step: int, clock: int | None = None) -> Streaks:
        """A non-finite step the guard answers (the GradScaler streak is not touched).

        Args:
            step: The caller's step (kept as the streak's start, for messages).
            clock: The optimizer's own step count (kept as ``last_nonfinite``, for
                ``nonfinite_window``); default: ``step``.
        """
        n = self.nonfinite + 1
        return replace(self, nonfinite=n, nonfinite_start=step if n == 1 else self.nonfinite_start,
                       last_nonfinite=step if clock is None else clock)

    def on_amp_overflow(self, step: int) -> Streaks:
        """A step left to the GradScaler (the non-finite streak is not touched)."""
        n = self.amp + 1
        return replace(self, amp=n, amp_start=step if n == 1 else self.amp_start)
