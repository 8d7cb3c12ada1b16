from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_gradguard.core._validation import (
    check_bool,
    check_choice,
    check_int,
    check_number,
)
from lightning_gradguard.core.backoff import LRBackoff
from lightning_gradguard.core.growth import GrowthDetector
from lightning_gradguard.core.guard import GuardCore, GuardSettings
from lightning_gradguard.core.norms import grad_norms
from lightning_gradguard.core.policies import (
    AdaptiveGradClip,
    FixedNormClip,
    PercentileClip,
    ZScoreClip,
)
from lightning_gradguard.core.stats import RobustNormStats

NAN = float("nan")
INF = float("inf")
T, V = TypeError, ValueError

# (constructor, argument, bad value, exception)
NUMBER_BAD = [("x", T), (True, T), (None, T), (NAN, V), (INF, V), (-INF, V)]
INT_BAD = [("x", T), (True, T), (1.5, T), (2.0, T), (None, T)]
BOOL_BAD = [(1, T), ("yes", T), (None, T), (0.0, T)]

CASES: list[tuple[str, Callable[..., Any], str, Any, type[Exception]]] = []


def _add(owner: str, ctor: Callable[..., Any], name: str, bads: list[tuple[Any, type]]) -> None:
    for bad, exc in bads:
        CASES.append((owner, ctor, name, bad, exc))


# GuardSettings: every field
_add("GuardSettings", GuardSettings, "clip", [("x", T), (ZScoreClip, T), (1.0, T)])
_add("GuardSettings", GuardSettings, "norm_type",
     [("x", T), (True, T), (NAN, V), (0, V), (-1.0, V), (-INF, V)])
_add("GuardSettings", GuardSettings, "skip_nonfinite", BOOL_BAD)
_add("GuardSettings", GuardSettings, "lr_backoff", BOOL_BAD)
_add("GuardSettings", GuardSettings, "rollback", BOOL_BAD)
_add("GuardSettings", GuardSettings, "backoff_factor",
     [*NUMBER_BAD, (0, V), (1, V), (1.5, V), (-0.5, V)])
_add("GuardSettings", GuardSettings, "recovery_steps", [*INT_BAD, (0, V), (-3, V)])
_add("GuardSettings", GuardSettings, "min_lr_scale",
     [*NUMBER_BAD, (0, V), (1.5, V), (-1e-3, V)])
_add("GuardSettings", GuardSettings, "spike_patience", [*INT_BAD, (-1, V)])
_add("GuardSettings", GuardSettings, "spike_window", [*INT_BAD, (0, V)])
_add("GuardSettings", GuardSettings, "growth_patience", [*INT_BAD, (-1, V)])
_add("GuardSettings", GuardSettings, "growth_min_rise", [*NUMBER_BAD, (-0.1, V)])
_add("GuardSettings", GuardSettings, "snapshot_every", [*INT_BAD, (0, V)])
_add("GuardSettings", GuardSettings, "rollback_after", [*INT_BAD, (0, V)])
_add("GuardSettings", GuardSettings, "halt_after", [*INT_BAD, (-1, V)])
_add("GuardSettings", GuardSettings, "max_update_ratio", [(0.0, V), (-1.0, V), ("0.1", T)])
# policies
_add("ZScoreClip", ZScoreClip, "z_threshold", [*NUMBER_BAD, (0, V), (-1.0, V)])
_add("ZScoreClip", ZScoreClip, "ema_decay", [*NUMBER_BAD, (1.0, V), (-0.1, V), (2, V)])
_add("ZScoreClip", ZScoreClip, "warmup_steps", [*INT_BAD, (-1, V)])
_add("ZScoreClip", ZScoreClip, "warmup_factor", [*NUMBER_BAD, (0.5, V), (0, V)])
_add("PercentileClip", PercentileClip, "percentile", [*NUMBER_BAD, (0, V), (100.5, V), (-5, V)])
_add("PercentileClip", PercentileClip, "history_size", [*INT_BAD, (0, V), (-1, V)])
_add("PercentileClip", PercentileClip, "min_history", [*INT_BAD, (0, V), (1001, V)])
_add("FixedNormClip", FixedNormClip, "max_norm", [*NUMBER_BAD, (0, V), (-1.0, V)])
_add("AdaptiveGradClip", AdaptiveGradClip, "clipping", [*NUMBER_BAD, (0, V), (-0.01, V)])
_add("AdaptiveGradClip", AdaptiveGradClip, "eps", [*NUMBER_BAD, (0, V), (-1e-3, V)])
_add("AdaptiveGradClip", AdaptiveGradClip, "exclude", [("head.*", T), ([1], T), (["a", None], T)])
# statistics, growth, backoff
_add("RobustNormStats", RobustNormStats, "ema_decay", [*NUMBER_BAD, (1.0, V), (-0.5, V)])
_add("GrowthDetector", GrowthDetector, "patience", [*INT_BAD, (0, V), (-2, V)])
_add("GrowthDetector", GrowthDetector, "min_rise", [*NUMBER_BAD, (-0.01, V)])
_add("LRBackoff", LRBackoff, "factor", [*NUMBER_BAD, (0, V), (1, V), (1.01, V)])
_add("LRBackoff", LRBackoff, "recovery_steps", [*INT_BAD, (0, V)])
_add("LRBackoff", LRBackoff, "min_scale", [*NUMBER_BAD, (0, V), (1.01, V), (-1, V)])


def _id(case: tuple[str, Callable[..., Any], str, Any, type]) -> str:
    owner, _, name, bad, _ = case
    return f"{owner}.{name}={bad!r}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_argument_named_with_value(
    case: tuple[str, Callable[..., Any], str, Any, type[Exception]],
) -> None:
    _, ctor, name, bad, exc = case
    pattern = f"(?s)`{re.escape(name)}`.*{re.escape(repr(bad))}"
    with pytest.raises(exc, match=pattern) as info:
        ctor(**{name: bad})
    assert type(info.value) is exc  # exactly the builtin, not a subclass surprise


def test_percentile_min_history_bound_follows_history_size() -> None:
    msg = "`min_history` must be an int in [1, 4], got 5"
    with pytest.raises(ValueError, match=re.escape(msg)):
        PercentileClip(history_size=4, min_history=5)
    assert PercentileClip(history_size=4, min_history=4).min_history == 4


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"halt_after": -1}, "halt_after"), ({"norm_type": "2"}, "norm_type"),
     ({"clip": "zscore"}, "clip")],
)
def test_guardcore_kwargs_are_validated(kwargs: dict[str, Any], name: str) -> None:
    p = torch.nn.Parameter(torch.ones(1))
    with pytest.raises((TypeError, ValueError), match=re.escape(f"`{name}`")):
        GuardCore([p], **kwargs)


def test_guardcore_unknown_kwarg() -> None:
    with pytest.raises(TypeError, match="halt_afterr"):
        GuardCore([torch.nn.Parameter(torch.ones(1))], halt_afterr=3)


def test_valid_edge_values_accepted() -> None:
    GuardSettings(norm_type=INF, min_lr_scale=1.0, spike_patience=0, growth_patience=0,
                  halt_after=0, growth_min_rise=0.0, backoff_factor=1e-9)
    ZScoreClip(ema_decay=0.0, warmup_steps=0, warmup_factor=1.0, z_threshold=1e-9)
    PercentileClip(percentile=100, history_size=1, min_history=1)
    AdaptiveGradClip(exclude=("a", "b"))
    AdaptiveGradClip(exclude=[])
    LRBackoff(min_scale=1.0, recovery_steps=1)
    GrowthDetector(patience=1, min_rise=0)
    RobustNormStats(ema_decay=0)
    # ints are accepted for floats and returned as float
    assert FixedNormClip(2).max_norm == 2.0
    assert isinstance(FixedNormClip(2).max_norm, float)


def test_grad_norms_norm_type() -> None:
    with pytest.raises(ValueError, match=re.escape("`norm_type` must be a number > 0, got -2")):
        grad_norms([torch.ones(1)], -2)


# ----------------------------------------------------------------------------- checkers
def test_check_number_messages() -> None:
    assert check_number("a", 3) == 3.0
    assert check_number("a", INF, allow_inf=True) == INF
    with pytest.raises(ValueError, match=re.escape("`z` must be a finite number > 0, got -1.0")):
        check_number("z", -1.0, low=0, low_inclusive=False)
    with pytest.raises(ValueError, match=re.escape("`q` must be a finite number >= 0 and < 1, "
                                                   "got 1")):
        check_number("q", 1, low=0, high=1, high_inclusive=False)
    with pytest.raises(TypeError, match=re.escape("`a` must be a real number, got '1' (str)")):
        check_number("a", "1")
    with pytest.raises(ValueError, match="got nan"):
        check_number("a", NAN, allow_inf=True)


def test_check_int_bool_choice() -> None:
    assert check_int("n", 3, low=0, high=3) == 3
    with pytest.raises(ValueError, match=re.escape("`n` must be an int <= 2, got 3")):
        check_int("n", 3, high=2)
    with pytest.raises(TypeError, match=re.escape("`n` must be an int, got False (bool)")):
        check_int("n", False)
    assert check_bool("b", False) is False
    with pytest.raises(TypeError, match=re.escape("`b` must be a bool, got 0 (int)")):
        check_bool("b", 0)
    assert check_choice("c", "stop", ("stop", "raise")) == "stop"
    with pytest.raises(ValueError, match=re.escape("`c` must be one of ('stop', 'raise'), "
                                                   "got 'halt'")):
        check_choice("c", "halt", ("stop", "raise"))


def test_huge_int_gives_value_error() -> None:
    with pytest.raises(ValueError, match="`max_norm`"):
        FixedNormClip(10**400)


# ----------------------------------------------------------------------------- exact messages
@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({}, NAN, "`x` must be a finite number, got nan"),
        ({"low": 0, "high": 1}, 2.0, "`x` must be a finite number >= 0 and <= 1, got 2.0"),
        ({"low": 0, "high": 1, "low_inclusive": False, "high_inclusive": False}, 1.0,
         "`x` must be a finite number > 0 and < 1, got 1.0"),
        ({"high": 1, "allow_inf": True}, INF, "`x` must be a number <= 1, got inf"),
        ({}, 10**400, f"`x` must be a finite number, got {10**400!r}"),
    ],
)
def test_check_number_exact_message_per_bound(kwargs: dict[str, float], value: float,
                                               message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_number("x", value, **kwargs)  # type: ignore[arg-type]
