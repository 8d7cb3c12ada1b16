"""Behaviour the mutation run found unpinned: Stateful copies, policy defaults, AGC edges.

Each test names the rule it pins; docs/mutation.md lists the mutants they kill.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core.growth import GrowthDetector
from lightning_gradguard.core.policies import (
    AdaptiveGradClip,
    FixedNormClip,
    NoClip,
    PercentileClip,
    ZScoreClip,
    unitwise_norm,
)


class _Nested(Stateful):
    rows: list[list[float]]
    n: int

    def __init__(self) -> None:
        super().__init__()
        self._add_state("rows", [[0.0, 0.0], [0.0]])
        self._add_state("n", 0)


class _Parent(Stateful):
    k: int

    def __init__(self) -> None:
        super().__init__()
        self.child = _Nested()
        self._add_child("child", self.child)
        self._add_state("k", 1)


# --- Stateful -------------------------------------------------------------------------------


def test_reset_restores_nested_defaults_even_after_in_place_changes() -> None:
    s = _Nested()
    s.rows[0][0] = 5.0
    s.reset()
    s.rows[0][1] = 6.0
    s.reset()
    assert s.rows == [[0.0, 0.0], [0.0]]
    assert _Nested().rows == [[0.0, 0.0], [0.0]]


def test_state_dict_is_a_deep_copy() -> None:
    s = _Nested()
    sd = s.state_dict()
    s.rows[1][0] = 3.0
    assert sd == {"rows": [[0.0, 0.0], [0.0]], "n": 0}
    sd["rows"][0][0] = 9.0
    assert s.rows == [[0.0, 0.0], [3.0]]


def test_load_state_dict_takes_a_deep_copy() -> None:
    sd: dict[str, Any] = {"rows": [[1.0, 2.0], [3.0]], "n": 4}
    s = _Nested()
    s.load_state_dict(sd)
    sd["rows"][0][0] = 99.0
    assert (s.rows, s.n) == ([[1.0, 2.0], [3.0]], 4)


def test_load_state_dict_missing_keys_names_class_and_keys() -> None:
    p = _Parent()
    with pytest.raises(KeyError, match=r"_Parent\.load_state_dict: missing keys \['child'\]"):
        p.load_state_dict({"k": 2})
    assert p.k == 1  # nothing loaded
    with pytest.raises(KeyError, match=r"_Nested\.load_state_dict: missing keys \['n'\]"):
        p.load_state_dict({"k": 2, "child": {"rows": []}})


def test_parent_round_trip_and_reset() -> None:
    a = _Parent()
    a.k = 7
    a.child.n = 2
    b = _Parent()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"k": 7, "child": {"rows": [[0.0, 0.0], [0.0]], "n": 2}}
    b.reset()
    assert b.state_dict() == _Parent().state_dict()


# --- policy defaults and conveniences ---------------------------------------------------------


def test_documented_defaults() -> None:
    assert FixedNormClip().max_norm == 1.0
    p = PercentileClip()
    assert (p.percentile, p.history_size, p.min_history) == (10.0, 1000, 1)
    agc = AdaptiveGradClip()
    assert (agc.clipping, agc.eps, agc.exclude) == (0.01, 1e-3, ())
    z = ZScoreClip()
    assert (z.z_threshold, z.ema_decay, z.warmup_steps, z.warmup_factor) == (2.5, 0.97, 25,
                                                                             10.0)


def test_percentile_default_clips_from_the_first_norm() -> None:
    p = PercentileClip()
    assert p.threshold_value() == math.inf
    p.observe_value(3.0, math.inf)
    assert p.threshold_value() == 3.0



@pytest.fixture
def float64_default() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.usefixtures("float64_default")
def test_threshold_tensor_is_float32_whatever_the_default_dtype() -> None:
    t = FixedNormClip(0.1).threshold()
    assert t.dtype == torch.float32
    assert t.item() == torch.tensor(0.1, dtype=torch.float32).item()


def test_threshold_tensor_on_the_requested_device() -> None:
    t = NoClip().threshold(torch.device("meta"))
    assert t.device.type == "meta"
    assert t.dtype == torch.float32
    assert t.ndim == 0


def test_repr_lists_every_argument() -> None:
    assert repr(PercentileClip(20.0, 50, 5)) == (
        "PercentileClip(percentile=20.0, history_size=50, min_history=5)")
    assert repr(AdaptiveGradClip(0.5, exclude=["head.*"])) == (
        "AdaptiveGradClip(clipping=0.5, eps=0.001, exclude=('head.*',))")


# --- AGC edges ------------------------------------------------------------------------------


def test_unitwise_norm_of_a_vector_is_a_scalar() -> None:
    n = unitwise_norm(torch.tensor([3.0, 4.0]))
    assert n.shape == ()
    assert n.item() == 5.0
    assert unitwise_norm(torch.tensor(-2.0)).shape == ()
    assert unitwise_norm(torch.ones(2, 3, 4)).shape == (2, 1, 1)


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _param(w: list[list[float]], g: list[list[float]]) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.tensor(w))
    p.grad = torch.tensor(g)
    return p


def test_agc_unit_exactly_at_its_bound_is_not_clipped() -> None:
    # ||W|| = 5, clipping 0.5 -> bound 2.5 = ||G|| exactly (all values exact in float32)
    p = _param([[3.0, 4.0]], [[1.5, 2.0]])
    assert AdaptiveGradClip(clipping=0.5).clip_unitwise_([p]).item() == 0
    assert _grad(p).tolist() == [[1.5, 2.0]]


def test_agc_small_gradients_are_scaled_to_the_bound_exactly() -> None:
    # ||W|| = 5, clipping 0.1 -> bound 0.5; ||G|| = 0.8 (below 1: no floor may interfere)
    p = _param([[3.0, 4.0]], [[0.48, 0.64]])
    assert AdaptiveGradClip(clipping=0.1).clip_unitwise_([p]).item() == 1
    assert torch.linalg.vector_norm(_grad(p)).item() == pytest.approx(0.5, rel=1e-6)
    assert _grad(p)[0].tolist() == pytest.approx([0.3, 0.4], rel=1e-6)


def test_agc_an_excluded_parameter_does_not_stop_the_others() -> None:
    head = _param([[1.0]], [[100.0]])
    body = _param([[3.0, 4.0]], [[30.0, 40.0]])
    none = torch.nn.Parameter(torch.ones(1, 1))  # no gradient
    tail = _param([[3.0, 4.0]], [[30.0, 40.0]])
    agc = AdaptiveGradClip(clipping=0.1, exclude=["head"])
    n = agc.clip_unitwise_([head, none, body, tail], ["head", "none", "body", "tail"])
    assert n.item() == 2
    assert _grad(head).tolist() == [[100.0]]
    assert _grad(body)[0].tolist() == pytest.approx([0.3, 0.4])
    assert _grad(tail)[0].tolist() == pytest.approx([0.3, 0.4])


# --- growth ---------------------------------------------------------------------------------


def test_hold_leaves_the_detector_one_rise_short_of_firing() -> None:
    d = GrowthDetector(patience=3, min_rise=0.0)
    assert [d.update(x) for x in [1.0, 2.0, 3.0, 4.0]] == [False, False, False, True]
    d.hold()
    assert d.state_dict() == {"prev": 4.0, "streak": 2}
    assert d.fires(5.0)
    assert not d.fires(4.0)
