"""The callbacks' argument validation: a bad GradGuard argument (out of range or of the wrong
type) raises an error that names the argument and shows the value; an unknown or misspelt
argument names GradGuard and the closest argument; good values are accepted.

``tests/reliability/test_bad_input.py`` holds one bad value or more for every argument of
every public constructor (GradGuard included) and checks that its table covers them all; the
table here adds the values it does not try (ints for floats, bools for ints, None, ...).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from lightning_gradguard.callbacks import GradGuard

NAN = float("nan")
INF = float("inf")

# (argument, bad value, exception); more in tests/reliability/test_bad_input.py
BAD: list[tuple[str, Any, type[Exception]]] = [
    ("clip", 3.0, TypeError),
    ("norm_type", 0, ValueError),
    ("norm_type", True, TypeError),
    ("skip_nonfinite", "yes", TypeError),
    ("lr_backoff", None, TypeError),
    ("lr_backoff", 0, TypeError),
    ("backoff_factor", 1.5, ValueError),
    ("backoff_factor", -0.5, ValueError),
    ("backoff_factor", NAN, ValueError),
    ("backoff_factor", "0.5", TypeError),
    ("recovery_steps", -3, ValueError),
    ("recovery_steps", 2.5, TypeError),
    ("recovery_steps", True, TypeError),
    ("min_lr_scale", 1.5, ValueError),
    ("min_lr_scale", INF, ValueError),
    ("min_lr_scale", None, TypeError),
    ("spike_patience", 2.0, TypeError),
    ("spike_window", "50", TypeError),
    ("growth_patience", None, TypeError),
    ("growth_min_rise", NAN, ValueError),
    ("growth_min_rise", "0.05", TypeError),
    ("rollback", 1, TypeError),
    ("snapshot_every", 1.0, TypeError),
    ("rollback_after", None, TypeError),
    ("halt_after", 25.0, TypeError),
    ("diagnose", 1, TypeError),
    ("preflight", "yes", TypeError),
    ("verbose", None, TypeError),
    ("max_update_ratio", -0.1, ValueError),
    ("max_update_ratio", NAN, ValueError),
    ("on_halt", None, ValueError),
    ("on_halt", "STOP", ValueError),
    ("checkpoint_dir", 123, TypeError),
    ("checkpoint_dir", ["a"], TypeError),
    ("name", 5, TypeError),
    ("name", b"a", TypeError),
    ("progress_bar", 1, TypeError),
]


def _value_repr(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value)


@pytest.mark.parametrize(("arg", "value", "exc"), BAD,
                         ids=[f"{a}={v!r}" for a, v, _ in BAD])
def test_bad_argument_raises_naming_argument_and_value(arg: str, value: Any,
                                                       exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        GradGuard(**{arg: value})
    msg = str(info.value)
    assert f"`{arg}`" in msg
    assert _value_repr(value) in msg


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"norm_type": INF, "backoff_factor": 0.1, "recovery_steps": 1, "min_lr_scale": 1.0},
        {"spike_patience": 0, "growth_patience": 0, "halt_after": 0, "growth_min_rise": 0},
        {"on_halt": "raise", "checkpoint_dir": Path("x"), "name": "a", "rollback": True},
        {"checkpoint_dir": "x", "snapshot_every": 1, "rollback_after": 1, "norm_type": 1},
    ],
)
def test_good_arguments_accepted(kwargs: dict[str, Any]) -> None:
    guard = GradGuard(**kwargs)
    assert guard.summary()["steps"] == 0


def test_unknown_argument_names_gradguard_and_the_closest_argument() -> None:
    with pytest.raises(TypeError, match=r"^GradGuard got unexpected keyword argument\(s\) "
                                        r"'clip_val' \(did you mean 'clip'\?\); its arguments "
                                        r"are: clip, norm_type, "):
        GradGuard(clip_val=1.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"'halt_afterr' \(did you mean 'halt_after'\?\)"):
        GradGuard(halt_afterr=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"^GradGuard: too many positional arguments"):
        GradGuard(*range(40))
