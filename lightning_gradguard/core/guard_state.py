"""The layout of :meth:`GuardCore.state_dict <lightning_gradguard.core.guard.GuardCore.state_dict>`.

One layout, marked ``"version"`` (:data:`STATE_VERSION`); another is refused on load with a
message that says what to do. A state saved with another clip policy type restores
everything but the policy's statistics (with a warning); a state saved at a halt resumes as
a fresh attempt.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from lightning_gradguard.core.policies import ClipPolicy
from lightning_gradguard.core.report import GuardCounters
from lightning_gradguard.core.streaks import Streaks

__all__ = ["STATE_VERSION", "check_version", "load_counts", "load_policy"]

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


def load_policy(policy: ClipPolicy, state_dict: Mapping[str, Any]) -> None:
    """The policy's statistics, when saved by the same policy type (else a warning)."""
    saved_type = state_dict.get("policy_type", type(policy).__name__)
    if saved_type == type(policy).__name__:
        policy.load_state_dict(state_dict["policy"])
        return
    warnings.warn(
        f"GradGuard state was saved with clip policy {saved_type} but this guard uses "
        f"{type(policy).__name__}: its statistics start fresh; counters, LR "
        "backoff and growth state are restored",
        stacklevel=3,
    )


def load_counts(state_dict: Mapping[str, Any]) -> tuple[GuardCounters, Streaks]:
    """The counters and streaks saved; a state saved at a halt resumes as a fresh attempt."""
    counters = dict(state_dict["counters"])
    streaks = dict(state_dict["streaks"], clipped=tuple(state_dict["streaks"]["clipped"]))
    fresh = Streaks() if counters["halted"] else Streaks(**streaks)
    counters["halted"] = False
    counters["reasons"] = dict(counters["reasons"])
    return GuardCounters(**counters), fresh
