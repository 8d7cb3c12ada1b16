"""The layout of :meth:`GuardCore.state_dict <lightning_gradguard.core.guard.GuardCore.state_dict>`.

One layout, marked ``"version"`` (:data:`STATE_VERSION`); another is refused on load with a
message that says what to do. Every other key is declared state
(:class:`~lightning_gradguard.core._stateful.Stateful`): ``backoff``, ``growth``,
``update_control``, ``loss_trend``, ``policy`` (:class:`PolicyState`), ``counters``,
``streaks``, ``spike_steps``, ``explainer`` and, with ``rollback``,
``snapshot``. A state saved with another clip policy type restores
everything but the policy's statistics (with a warning); a state saved at a halt resumes as
a fresh attempt.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core.policies import ClipPolicy
from lightning_gradguard.core.report import GuardCounters
from lightning_gradguard.core.streaks import Streaks

__all__ = ["STATE_VERSION", "PolicyState", "check_version", "counters_from_state",
           "fresh_attempt", "streaks_from_state"]

#: the layout of :meth:`GuardCore.state_dict` (``"version"``; another is refused on load)
STATE_VERSION = 1


def check_version(state_dict: Mapping[str, Any]) -> None:
    """Refuse a state of another layout.

    Raises:
        ValueError: Its ``"version"`` is not :data:`STATE_VERSION`.
    """
    version = state_dict.get("version")
    if version != STATE_VERSION:
        raise ValueError(
            f"GuardCore state has version {version!r}, this lightning_gradguard reads "
            f"version {STATE_VERSION}: it was saved by another release; resume without "
            "the guard's state (drop it from the checkpoint) to start its statistics afresh")


class PolicyState(Stateful):
    """The clip policy's state, saved with its type: ``{"type": "ZScoreClip", "state": {...}}``.

    A state saved with another policy type loads with a warning, the statistics fresh (the
    rest of the guard's state is restored).

    Example:
        >>> from lightning_gradguard.core.policies import FixedNormClip
        >>> PolicyState(FixedNormClip(1.0)).state_dict()
        {'type': 'FixedNormClip', 'state': {}}
    """

    def __init__(self, policy: ClipPolicy) -> None:
        super().__init__()
        self.policy = policy
        self._add_child("state", policy)

    def state_dict(self) -> dict[str, Any]:
        """``{"type": the policy's class name, "state": its declared state}``."""
        return {"type": type(self.policy).__name__, **super().state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the statistics saved by the same policy type; another: warn, start fresh."""
        saved_type = state_dict["type"]
        if saved_type == type(self.policy).__name__:
            super().load_state_dict(state_dict)
            return
        self.policy.reset()
        warnings.warn(
            f"GradGuard state was saved with clip policy {saved_type} but this guard uses "
            f"{type(self.policy).__name__}: its statistics start fresh; counters, LR "
            "backoff and growth state are restored",
            stacklevel=4,  # the caller of GuardCore.load_state_dict
        )


def counters_from_state(state: Mapping[str, Any]) -> GuardCounters:
    """The :class:`GuardCounters` saved as ``asdict`` (the ``counters`` of the layout)."""
    return GuardCounters(**dict(state, reasons=dict(state["reasons"])))


def streaks_from_state(state: Mapping[str, Any]) -> Streaks:
    """The :class:`Streaks` saved as ``asdict`` (the ``streaks`` of the layout)."""
    return Streaks(**dict(state, clipped=tuple(state["clipped"])))


def fresh_attempt(counters: GuardCounters, streaks: Streaks) -> tuple[GuardCounters, Streaks]:
    """A state saved at a halt resumes as a fresh attempt: ``halted`` and the streaks cleared."""
    if not counters.halted:
        return counters, streaks
    return replace(counters, halted=False), Streaks()
