from __future__ import annotations

import dataclasses

import pytest

from lightning_gradguard.core.diagnosis import Diagnosis, diagnose

NAN = float("nan")
INF = float("inf")
NAMES = ["embed.weight", "l1.weight", "l1.bias", "head.weight"]


def test_origin_is_last_nonfinite_in_model_order() -> None:
    d = diagnose(5, NAMES, [NAN, INF, 1.0, 2.0])
    assert d.step == 5
    assert d.nonfinite_params == ("embed.weight", "l1.weight")
    assert d.origin == "l1.weight"
    d2 = diagnose(5, NAMES, [NAN, 1.0, 1.0, -INF])
    assert d2.origin == "head.weight"


def test_cause_priority() -> None:
    loss_nan = diagnose(1, NAMES, [NAN, 1, 1, 1], loss=NAN, growth_before=True)
    assert loss_nan.likely_cause.startswith("the loss itself is non-finite (nan)")
    loss_inf = diagnose(1, NAMES, [NAN, 1, 1, 1], loss=INF)
    assert "(inf)" in loss_inf.likely_cause
    growth = diagnose(1, NAMES, [NAN, 1, 1, 1], loss=0.5, growth_before=True)
    assert "growing step over step" in growth.likely_cause
    assert "learning rate" in growth.likely_cause
    overflow = diagnose(1, NAMES, [1.0, 2.0, 3.0, 4.0])
    assert overflow.nonfinite_params == ()
    assert overflow.origin is None
    assert "overflowed" in overflow.likely_cause
    plain = diagnose(1, NAMES, [NAN, 1, 1, 1])
    assert plain.likely_cause.startswith("one of the usual ones")


def test_the_finding_is_data_and_the_ranked_message_states_only_the_fact() -> None:
    loss_nan = diagnose(1, NAMES, [NAN, 1, 1, 1], loss=NAN, growth_before=True, lr_scale=0.5)
    assert (loss_nan.finding, loss_nan.fact) == ("loss_nonfinite",
                                                 "the loss itself is non-finite (nan)")
    assert loss_nan.message(ranked=True).endswith(
        "(closest to the output). Likely cause: the loss itself is non-finite (nan)")
    overflow = diagnose(1, NAMES, [1.0, 2.0, 3.0, 4.0])
    assert (overflow.finding, overflow.fact) == (
        "norm_overflow", "the total norm overflowed although every gradient is finite")
    growth = diagnose(1, NAMES, [NAN, 1, 1, 1], loss=0.5, growth_before=True)
    assert (growth.finding, growth.fact) == ("growth", "")
    plain = diagnose(1, NAMES, [NAN, 1, 1, 1])
    assert (plain.finding, plain.fact) == ("", "")
    # ranked causes follow: no generic list, no empty "Likely cause:"
    assert plain.message(ranked=True).endswith("most likely origin: embed.weight (closest to "
                                               "the output)")
    assert plain.message().endswith("Likely cause: " + plain.likely_cause)


def test_lr_scale_note() -> None:
    d = diagnose(1, NAMES, [NAN, 1, 1, 1], lr_scale=0.25)
    assert d.likely_cause.endswith("(the guard had already reduced the LR to 0.25x)")
    assert "reduced the LR" not in diagnose(1, NAMES, [NAN, 1, 1, 1]).likely_cause


def test_message_contents_and_limit() -> None:
    names = [f"layer{i}.weight" for i in range(12)]
    d = diagnose(42, names, [NAN] * 12)
    msg = d.message(limit=3)
    assert msg.startswith("step 42: non-finite gradients in 12 parameter(s): ")
    assert "layer0.weight, layer1.weight, layer2.weight, ... (+9 more)" in msg
    assert "layer3.weight," not in msg
    assert "most likely origin: layer11.weight (closest to the output)" in msg
    full = d.message(limit=100)
    assert all(n in full for n in names)
    assert "more)" not in full


def test_message_without_origin() -> None:
    d = Diagnosis(3, (), None, "overflow")
    assert d.message() == "step 3: non-finite gradients in 0 parameter(s): . Likely cause: overflow"


def test_frozen() -> None:
    d = diagnose(1, NAMES, [NAN, 1, 1, 1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.step = 2  # type: ignore[misc]
