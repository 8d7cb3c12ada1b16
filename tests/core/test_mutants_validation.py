"""Exact messages of the argument checks, and constructor details the mutation run found."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lightning_gradguard.core._validation import check_number
from lightning_gradguard.core.backoff import LRScaler
from lightning_gradguard.core.growth import GrowthDetector


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({}, math.nan, "`x` must be a finite number, got nan"),
        ({"low": 0, "high": 1}, 2.0, "`x` must be a finite number >= 0 and <= 1, got 2.0"),
        ({"low": 0, "high": 1, "low_inclusive": False, "high_inclusive": False}, 1.0,
         "`x` must be a finite number > 0 and < 1, got 1.0"),
        ({"high": 1, "allow_inf": True}, math.inf, "`x` must be a number <= 1, got inf"),
        ({}, 10**400, f"`x` must be a finite number, got {10**400!r}"),
    ],
)
def test_check_number_messages(kwargs: dict[str, float], value: float, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_number("x", value, **kwargs)  # type: ignore[arg-type]


def test_growth_defaults() -> None:
    d = GrowthDetector()
    assert (d.patience, d.min_rise) == (5, 0.05)


def test_lr_scaler_keeps_its_optimizer() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    assert LRScaler(opt).optimizer is opt
