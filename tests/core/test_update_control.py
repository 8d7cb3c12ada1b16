"""Update control (``core/update_cap.py``) on its own: schedule, weight norm, LR and limit.

The guard-level behaviour of the cap is in ``test_update_cap.py``; these tests pin each rule
of :class:`SGDUpdateCap` and :class:`UpdateLimit` with exact values (no model, no guard).
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradguard.core.update_cap import (
    NO_LIMIT,
    NORMALISED,
    NormalisedUpdates,
    NoUpdateControl,
    SGDUpdateCap,
    UpdateLimit,
    make_update_control,
)

INF = math.inf
NAN = math.nan


def _cap(*lrs: float, **kwargs: float) -> SGDUpdateCap:
    groups = [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr} for lr in lrs]
    return SGDUpdateCap(torch.optim.SGD(groups, lr=1.0), **kwargs)  # type: ignore[arg-type]


def test_measurement_schedule_every_step_then_every_kth() -> None:
    cap = _cap(1.0, max_ratio=0.1, every_step_until=5, every=4)
    wanted = [s for s in range(1, 30) if cap.wants_weight_norm(s)]
    assert wanted == [1, 2, 3, 4, 5, 8, 12, 16, 20, 24, 28]


def test_measurement_schedule_defaults() -> None:
    cap = _cap(1.0, max_ratio=0.1)
    assert (cap.every_step_until, cap.every, cap.far) == (16, 8, 10.0)
    wanted = [s for s in range(1, 50) if cap.wants_weight_norm(s)]
    assert wanted == [*range(1, 17), 24, 32, 40, 48]


def test_measurement_schedule_without_a_start_phase() -> None:
    cap = _cap(1.0, max_ratio=0.1, every_step_until=0, every=3)
    assert [s for s in range(1, 11) if cap.wants_weight_norm(s)] == [3, 6, 9]
    every_step = _cap(1.0, max_ratio=1e-9, every_step_until=0, every=1)
    assert all(every_step.wants_weight_norm(s) for s in range(1, 11))


@pytest.mark.parametrize(
    ("value", "kept"),
    [(10.0, 10.0), (0.5, 0.5), (1e-30, 1e-30), (0.0, None), (-1.0, None), (INF, None),
     (NAN, None)],
)
def test_observe_weight_norm_keeps_only_finite_positive_values(value: float,
                                                               kept: float | None) -> None:
    cap = _cap(1.0, max_ratio=0.1)
    cap.observe_weight_norm(3.0)
    cap.observe_weight_norm(value)
    assert cap.weight_norm == kept
    if kept is None:  # no usable weight norm: no cap, every spike counts
        assert cap.lr(1.0) is None
        assert cap.limit(1.0) is NO_LIMIT


def test_lr_is_the_largest_group_lr_times_the_scale() -> None:
    cap = _cap(0.1, 0.4, 0.2, max_ratio=0.1)
    assert cap.lr(1.0) is None  # no weight norm yet
    cap.observe_weight_norm(2.0)
    assert cap.lr(1.0) == 0.4
    assert cap.lr(0.25) == 0.1
    assert cap.limit(0.5) == UpdateLimit(cap=INF, far=10.0, scale=0.1 * 2.0 / 0.2)
    cap.armed = True
    assert cap.limit(0.5) == UpdateLimit(cap=0.1 * 2.0 / 0.2, far=10.0)


def test_a_group_without_lr_counts_as_lr_zero() -> None:
    cap = _cap(0.1, 0.3, max_ratio=0.1)
    del cap.optimizer.param_groups[1]["lr"]
    cap.observe_weight_norm(2.0)
    assert cap.lr(1.0) == 0.1
    del cap.optimizer.param_groups[0]["lr"]
    assert cap.lr(1.0) == 0.0
    assert cap.limit(1.0) == UpdateLimit(cap=INF, far=10.0)  # LR 0: no cap, never counts


def test_a_cpu_tensor_lr_is_read() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    cap = SGDUpdateCap(torch.optim.SGD([w], lr=torch.tensor(0.5)), max_ratio=0.1)
    cap.observe_weight_norm(4.0)
    assert cap.lr(1.0) == 0.5
    cap.armed = True
    limit = cap.limit(1.0)
    assert limit.cap == pytest.approx(0.8)
    assert limit.far == 10.0


def test_a_tensor_lr_off_the_cpu_disables_the_cap_without_reading_it() -> None:
    cap = _cap(0.1, max_ratio=0.1)
    cap.observe_weight_norm(4.0)
    cap.optimizer.param_groups[0]["lr"] = torch.tensor(0.5, device="meta")  # float() raises
    assert cap.lr(1.0) is None
    assert cap.limit(1.0) is NO_LIMIT


@pytest.mark.parametrize(("lr", "scale"), [(0.1, -1.0), (0.1, INF), (0.1, NAN), (INF, 1.0)])
def test_a_negative_or_non_finite_lr_disables_the_cap(lr: float, scale: float) -> None:
    cap = _cap(0.1, max_ratio=0.1)
    cap.optimizer.param_groups[0]["lr"] = lr
    cap.observe_weight_norm(4.0)
    assert cap.lr(scale) is None
    assert cap.limit(scale) is NO_LIMIT


def test_limit_formula_and_counting() -> None:
    cap = _cap(2.0, max_ratio=0.25, far=4.0)
    cap.observe_weight_norm(8.0)
    unarmed = cap.limit(1.0)
    assert unarmed == UpdateLimit(cap=INF, far=4.0, scale=1.0)  # 0.25 * 8 / 2
    assert [unarmed.counts(x) for x in (0.2, 0.25, 0.26, 5.0)] == [False, False, True, True]
    cap.armed = True
    limit = cap.limit(1.0)
    assert limit == UpdateLimit(cap=1.0, far=4.0)
    # counts only when far * norm > cap
    assert [limit.counts(x) for x in (0.2, 0.25, 0.26, 5.0)] == [False, False, True, True]
    assert cap.limit(0.5) == UpdateLimit(cap=2.0, far=4.0)


def test_update_limit_defaults_and_no_limit() -> None:
    assert UpdateLimit() == UpdateLimit(cap=INF, far=None)
    assert UpdateLimit() == NO_LIMIT
    assert NO_LIMIT.counts(0.0)
    assert NO_LIMIT.counts(1e-30)
    assert NoUpdateControl().limit(0.5) is NO_LIMIT
    nc = NoUpdateControl()
    assert [nc.wants_weight_norm(s) for s in (1, 8, 16)] == [False, False, False]
    nc.observe_weight_norm(3.0)  # ignored
    assert nc.state_dict() == {}


def test_state_round_trip() -> None:
    a = _cap(1.0, max_ratio=0.1)
    a.observe_weight_norm(7.0)
    b = _cap(1.0, max_ratio=0.1)
    a.observe_grad_norm(0.5, 1.0)
    a.observe_grad_norm(20.0, 1.0)  # x40 and over the cap 0.7: armed
    assert a.armed
    b.load_state_dict(a.state_dict())
    assert (b.weight_norm, b.armed, b.last_grad_norm) == (7.0, True, 20.0)
    b.reset()
    assert (b.weight_norm, b.armed, b.last_grad_norm) == (None, False, None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_ratio": 0.0}, "max_ratio"),
        ({"max_ratio": 0.1, "every": 0}, "every"),
        ({"max_ratio": 0.1, "every_step_until": -1}, "every_step_until"),
        ({"max_ratio": 0.1, "far": 0.0}, "far"),
        ({"max_ratio": 0.1, "arm_growth": 1.0}, "arm_growth"),
    ],
)
def test_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=f"`{match}`"):
        _cap(1.0, **kwargs)


def test_far_below_one_is_allowed() -> None:
    cap = _cap(1.0, max_ratio=0.1, far=0.5)
    cap.observe_weight_norm(10.0)
    cap.armed = True
    assert cap.limit(1.0) == UpdateLimit(cap=1.0, far=0.5)


def test_make_update_control_picks_by_optimizer() -> None:
    w = torch.nn.Parameter(torch.ones(1))
    sgd = torch.optim.SGD([w], lr=0.1)
    made = make_update_control(sgd, 0.3)
    assert isinstance(made, SGDUpdateCap)
    assert made.optimizer is sgd
    assert made.max_ratio == 0.3
    assert type(make_update_control(sgd, None)) is NoUpdateControl
    assert type(make_update_control(sgd, 0.3, has_params=False)) is NoUpdateControl
    assert type(make_update_control(None, 0.3)) is NoUpdateControl
    adaptive = (torch.optim.Adam([w]), torch.optim.AdamW([w]), torch.optim.RMSprop([w]),
                torch.optim.Adagrad([w]), torch.optim.Adamax([w]))
    for opt in adaptive:  # with or without the SGD cap's ratio: normalised updates
        for ratio in (0.3, None):
            made = make_update_control(opt, ratio)
            assert type(made) is NormalisedUpdates, (type(opt).__name__, ratio)
            assert made.limit(1.0) == UpdateLimit(normalised=True)
            assert made.preview(None, 1e9, 1.0) is NORMALISED
    momentum = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
    assert type(make_update_control(momentum, None)) is NoUpdateControl
    assert not make_update_control(momentum, None).limit(1.0).normalised
