"""GuardSettings validation: every field's limit, and the exact message at each side of it.

Pins what ``GuardSettings.__post_init__`` passes to the shared checks (the argument name, the
bound and whether it is inclusive): a value exactly at each bound is accepted, the first value
past it is refused with the message that names the field, the limit and the value.
"""

from __future__ import annotations

import re

import pytest

from lightning_gradguard.core.policies import FixedNormClip, ZScoreClip
from lightning_gradguard.core.settings import GuardSettings

INF = float("inf")

# (field, value exactly at its limit: accepted)
ACCEPTED = [
    ("norm_type", 0.5),
    ("norm_type", 1e-9),
    ("norm_type", INF),
    ("backoff_factor", 1e-9),
    ("backoff_factor", 0.999),
    ("recovery_steps", 1),
    ("min_lr_scale", 1.0),
    ("min_lr_scale", 1e-12),
    ("spike_patience", 0),
    ("spike_window", 1),
    ("growth_patience", 0),
    ("growth_min_rise", 0.0),
    ("snapshot_every", 1),
    ("rollback_after", 1),
    ("halt_after", 0),
    ("amp_halt_after", 1),
    ("nonfinite_window", 0),
    ("max_update_ratio", None),
    ("max_update_ratio", 1e-9),
    ("skip_nonfinite", False),
    ("lr_backoff", False),
    ("rollback", True),
    ("diagnose", False),
    ("preflight", False),
    ("verbose", False),
]


@pytest.mark.parametrize(("field", "value"), ACCEPTED)
def test_value_at_the_limit_is_accepted_and_kept(field: str, value: object) -> None:
    s = GuardSettings(**{field: value})
    assert getattr(s, field) == value


# (field, first refused value, exact message)
REFUSED = [
    ("norm_type", 0.0, "`norm_type` must be a number > 0, got 0.0"),
    ("norm_type", -INF, "`norm_type` must be a number > 0, got -inf"),
    ("backoff_factor", 0.0, "`backoff_factor` must be a finite number > 0 and < 1, got 0.0"),
    ("backoff_factor", 1.0, "`backoff_factor` must be a finite number > 0 and < 1, got 1.0"),
    ("recovery_steps", 0, "`recovery_steps` must be an int >= 1, got 0"),
    ("min_lr_scale", 0.0, "`min_lr_scale` must be a finite number > 0 and <= 1, got 0.0"),
    ("min_lr_scale", 1.5, "`min_lr_scale` must be a finite number > 0 and <= 1, got 1.5"),
    ("spike_patience", -1, "`spike_patience` must be an int >= 0, got -1"),
    ("spike_window", 0, "`spike_window` must be an int >= 1, got 0"),
    ("growth_patience", -1, "`growth_patience` must be an int >= 0, got -1"),
    ("growth_min_rise", -0.01, "`growth_min_rise` must be a finite number >= 0, got -0.01"),
    ("snapshot_every", 0, "`snapshot_every` must be an int >= 1, got 0"),
    ("rollback_after", 0, "`rollback_after` must be an int >= 1, got 0"),
    ("halt_after", -1, "`halt_after` must be an int >= 0, got -1"),
    ("amp_halt_after", 0, "`amp_halt_after` must be an int >= 1, got 0"),
    ("amp_halt_after", -5, "`amp_halt_after` must be an int >= 1, got -5"),
    ("nonfinite_window", -1, "`nonfinite_window` must be an int >= 0, got -1"),
    ("max_update_ratio", 0.0, "`max_update_ratio` must be a finite number > 0, got 0.0"),
    ("max_update_ratio", INF, "`max_update_ratio` must be a finite number > 0, got inf"),
]


@pytest.mark.parametrize(("field", "value", "message"), REFUSED)
def test_value_past_the_limit_is_refused_with_the_exact_message(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GuardSettings(**{field: value})


# Wrong types: the message names the field and the type received.
TYPE_REFUSED = [
    ("norm_type", "2", "`norm_type` must be a real number, got '2' (str)"),
    ("recovery_steps", 1.0, "`recovery_steps` must be an int, got 1.0 (float)"),
    ("amp_halt_after", 4.0, "`amp_halt_after` must be an int, got 4.0 (float)"),
    ("amp_halt_after", True, "`amp_halt_after` must be an int, got True (bool)"),
    ("nonfinite_window", 2.0, "`nonfinite_window` must be an int, got 2.0 (float)"),
    ("nonfinite_window", None, "`nonfinite_window` must be an int, got None (NoneType)"),
    ("skip_nonfinite", 1, "`skip_nonfinite` must be a bool, got 1 (int)"),
    ("lr_backoff", 0, "`lr_backoff` must be a bool, got 0 (int)"),
    ("rollback", "yes", "`rollback` must be a bool, got 'yes' (str)"),
    ("diagnose", 1, "`diagnose` must be a bool, got 1 (int)"),
    ("preflight", None, "`preflight` must be a bool, got None (NoneType)"),
    ("verbose", 0, "`verbose` must be a bool, got 0 (int)"),
    ("max_update_ratio", "0.1", "`max_update_ratio` must be a real number, got '0.1' (str)"),
]


@pytest.mark.parametrize(("field", "value", "message"), TYPE_REFUSED)
def test_wrong_type_is_refused_with_the_exact_message(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        GuardSettings(**{field: value})


def test_clip_that_is_not_a_policy_is_refused_with_the_exact_message() -> None:
    message = (
        "`clip` must be a ClipPolicy (NoClip, FixedNormClip, ZScoreClip, "
        "PercentileClip, AdaptiveGradClip) or None, got 'zscore'"
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        GuardSettings(clip="zscore")  # type: ignore[arg-type]


def test_clip_default_and_given_policy() -> None:
    default = GuardSettings()
    assert type(default.clip) is ZScoreClip
    assert default.policy is default.clip
    given = FixedNormClip(max_norm=3.0)
    s = GuardSettings(clip=given)
    assert s.clip is given
    assert s.policy is given
