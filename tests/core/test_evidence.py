"""The diagnosis evidence functions by exact value: every branch of ``loss_trend``,
``schedule_position``'s sentences, the growth fit, the update ratio, and what
``batch_nonfinite`` reads (each container kind, its path, its limits)."""

from __future__ import annotations

import dataclasses
import math
from collections import namedtuple

import pytest
import torch
from torch import nn

from lightning_gradguard.core.evidence import (
    LossTrend,
    MicroBatches,
    batch_nonfinite,
    fit_growth,
    loss_trend,
    schedule_position,
    update_ratio,
)

NAN = math.nan
INF = math.inf


# --- fit_growth ------------------------------------------------------------------------------


def test_fit_growth_exact_factor() -> None:
    assert fit_growth([1.0, 2.0, 4.0]) == pytest.approx(2.0, rel=1e-12)
    assert fit_growth([1.0, 2.0, 4.0, 8.0, 16.0]) == pytest.approx(2.0, rel=1e-12)
    assert fit_growth([8.0, 4.0, 2.0, 1.0]) == pytest.approx(0.5, rel=1e-12)
    assert fit_growth([5.0, 5.0, 5.0]) == pytest.approx(1.0, rel=1e-12)


def test_fit_growth_least_squares_value() -> None:
    # log values 0, log 2, log 2 at x = 0, 1, 2: slope log(2) / 2
    assert fit_growth([1.0, 2.0, 2.0]) == pytest.approx(math.sqrt(2.0), rel=1e-12)
    # log values 0, 0, log 8, 0 at x = 0..3: mean x 1.5, sxx 5, sxy (0.5) * log 8
    assert fit_growth([1.0, 1.0, 8.0, 1.0]) == pytest.approx(math.exp(0.5 * math.log(8) / 5),
                                                             rel=1e-12)


def test_fit_growth_skips_unusable_values_but_keeps_positions() -> None:
    # positions 0, 2, 4 remain: a factor of 2 per position, not per usable value
    assert fit_growth([1.0, 0.0, 4.0, INF, 16.0]) == pytest.approx(2.0, rel=1e-12)
    assert fit_growth([1.0, -3.0, 4.0, NAN, 16.0]) == pytest.approx(2.0, rel=1e-12)
    assert fit_growth([1.0, 0.0, 4.0]) is None  # two usable values
    assert fit_growth([1.0, 2.0]) is None
    assert fit_growth([]) is None


# --- update_ratio ----------------------------------------------------------------------------


def test_update_ratio_sgd_and_adaptive() -> None:
    assert update_ratio(0.1, 5.0, 2.0) == 0.25
    assert update_ratio(0.5, 99.0, 2.0, adaptive=True) == 0.25  # numel defaults to 1
    assert update_ratio(0.5, 99.0, 2.0, adaptive=True, numel=16) == 1.0
    assert update_ratio(0.5, 3.0, 2.0, adaptive=False, numel=16) == 0.75


@pytest.mark.parametrize("w", [0.0, -1.0, INF, NAN])
def test_update_ratio_without_a_weight_norm_is_nan(w: float) -> None:
    assert math.isnan(update_ratio(0.1, 5.0, w))
    assert math.isnan(update_ratio(0.1, 5.0, w, adaptive=True, numel=4))


# --- loss_trend ------------------------------------------------------------------------------


def _same(a: LossTrend, b: LossTrend) -> bool:
    def eq(x: float, y: float) -> bool:
        return (math.isnan(x) and math.isnan(y)) or x == y

    return a.kind == b.kind and eq(a.factor, b.factor) and a.steps == b.steps and eq(
        a.before, b.before)


TRENDS = [
    ([], LossTrend("flat", 1.0, 0, NAN)),
    # a jump: exactly the default factor 10 over the previous loss, and just under it
    ([1.0, 1.0, 10.0], LossTrend("jump", 10.0, 1, 1.0)),
    ([1.0, 1.0, 9.5], LossTrend("flat", 9.5, 1, 1.0)),
    ([0.5, 0.4, 0.45, 6.0], LossTrend("jump", 6.0 / 0.45, 1, 0.45)),
    # a rise: 3 steps up and exactly the default factor 2, and just under it
    ([1.0, 1.25, 1.5, 2.0], LossTrend("rise", 2.0, 3, 1.0)),
    ([1.0, 1.25, 1.5, 1.75], LossTrend("flat", 1.75, 3, 1.0)),
    ([3.0, 1.0, 1.25, 1.5, 2.0], LossTrend("rise", 2.0, 3, 1.0)),
    # two steps up are no rise however large
    ([1.0, 3.0, 9.0], LossTrend("flat", 9.0, 2, 1.0)),
    # a rise that outgrows the jump factor in its last step is a rise
    ([1.0, 1.5, 2.0, 40.0], LossTrend("rise", 40.0, 3, 1.0)),
    # non-finite at the end: after 2 rising steps that doubled, a rise (steps + 1)
    ([1.0, 1.5, 2.0, NAN], LossTrend("rise", INF, 3, 1.0)),
    ([0.5, 1.0, 1.5, 2.0, INF], LossTrend("rise", INF, 4, 0.5)),
    ([1.0, 1.5, 1.9, NAN], LossTrend("jump", INF, 1, 1.9)),
    ([1.0, 5.0, NAN], LossTrend("jump", INF, 1, 5.0)),
    ([NAN], LossTrend("jump", INF, 1, NAN)),
    ([0.2, 0.1, INF], LossTrend("jump", INF, 1, 0.1)),
    # the run-up stops at a non-finite loss (also -inf, which every value exceeds)
    ([1.0, NAN, 2.0, 3.0, 4.0, 8.0], LossTrend("rise", 4.0, 3, 2.0)),
    ([1.0, -INF, 2.0, 3.0, 4.0, 8.0], LossTrend("rise", 4.0, 3, 2.0)),
    # a start at or below zero gives no growth factor
    ([-1.0, 0.5, 1.0, 2.0], LossTrend("flat", 1.0, 3, -1.0)),
    ([0.0, 1.0, 2.0, 3.0], LossTrend("flat", 1.0, 3, 0.0)),
    # no jump from a previous loss at or below zero, or non-finite
    ([1.0, 0.0, 5.0], LossTrend("flat", 1.0, 1, 0.0)),
    ([1.0, NAN, 50.0], LossTrend("flat", 1.0, 0, 50.0)),
    # flat: falling, or rising once
    ([2.0, 1.0], LossTrend("flat", 1.0, 0, 1.0)),
    ([1.0, 1.2], LossTrend("flat", 1.2, 1, 1.0)),
    ([1.0, 0.8, 0.7], LossTrend("flat", 1.0, 0, 0.7)),
    ([5.0], LossTrend("flat", 1.0, 0, 5.0)),
]


@pytest.mark.parametrize(("losses", "expected"), TRENDS)
def test_loss_trend_exact(losses: list[float], expected: LossTrend) -> None:
    got = loss_trend(losses)
    assert _same(got, expected), got


def test_loss_trend_thresholds_are_arguments() -> None:
    assert _same(loss_trend([1.0, 1.0, 3.0], jump=3.0), LossTrend("jump", 3.0, 1, 1.0))
    assert _same(loss_trend([1.0, 1.0, 2.9], jump=3.0), LossTrend("flat", 2.9, 1, 1.0))
    assert _same(loss_trend([1.0, 2.0, 3.0, 4.0], rise=4.0), LossTrend("rise", 4.0, 3, 1.0))
    assert _same(loss_trend([1.0, 2.0, 3.0, 4.0], rise=4.5), LossTrend("flat", 4.0, 3, 1.0))
    assert _same(loss_trend([1.0, 1.1, 1.2, NAN], rise=1.2), LossTrend("rise", INF, 3, 1.0))
    assert _same(loss_trend([1.0, 1.1, 1.2, NAN], rise=1.3), LossTrend("jump", INF, 1, 1.2))


def test_loss_trend_does_not_change_its_input() -> None:
    losses = [1.0, 2.0, 3.0, 9.0, NAN]
    loss_trend(losses)
    assert losses[:4] == [1.0, 2.0, 3.0, 9.0]
    assert math.isnan(losses[4])


# --- schedule_position ----------------------------------------------------------------------


WARMUP = "the LR reached its peak {} {} step(s) ago, at the end of a warmup from {}"


@pytest.mark.parametrize(("lrs", "expected"), [
    ([0.01, 0.02, 0.03, 0.04, 0.04], WARMUP.format("0.04", 1, "0.01")),
    ([0.01, 0.02], WARMUP.format("0.02", 0, "0.01")),
    ([0.01, 0.1, 0.09, 0.08], WARMUP.format("0.1", 2, "0.01")),
    # exactly `recent` (5) steps since the peak was reached, then 6
    ([0.01] + [0.1] * 6, WARMUP.format("0.1", 5, "0.01")),
    ([0.01] + [0.1] * 7, "the LR is at its peak 0.1"),
    ([0.01, 0.1, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04], None),
    # at the peak without a warmup before it (first value is the peak)
    ([0.1, 0.05, 0.1], "the LR is at its peak 0.1"),
    ([0.1, 0.05], None),
    ([0.1, 0.05, 0.02], None),
    # constant, or fewer than two finite values
    ([0.1, 0.1, 0.1], None),
    ([0.1], None),
    ([0.1, NAN, INF], None),
    ([], None),
    # non-finite entries are left out; 3 significant digits
    ([NAN, 0.0123456, INF, 0.123456], WARMUP.format("0.123", 0, "0.0123")),
])
def test_schedule_position_sentences(lrs: list[float], expected: str | None) -> None:
    assert schedule_position(lrs) == expected


def test_schedule_position_recent_is_an_argument() -> None:
    lrs = [0.01, 0.1, 0.1, 0.1, 0.1]
    assert schedule_position(lrs, recent=3) == WARMUP.format("0.1", 3, "0.01")
    assert schedule_position(lrs, recent=2) == "the LR is at its peak 0.1"
    assert schedule_position([0.01, 0.1, 0.05], recent=0) is None


# --- batch_nonfinite -------------------------------------------------------------------------


def _nan(n: int = 3, bad: int = 1) -> torch.Tensor:
    t = torch.ones(n)
    t[:bad] = NAN
    return t


Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    label: torch.Tensor
    meta: object = None


class Holder:
    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


class Slotted:
    __slots__ = ("x",)

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


def test_paths_of_every_container_kind() -> None:
    batch = {
        "a": [torch.ones(2), (_nan(4, 2),)],
        7: Pair(x=torch.ones(1), y=_nan(2)),
        "s": Sample(image=_nan(5, 5), label=torch.tensor([1, 2]), meta={"m": _nan(1)}),
        "o": Holder(inputs={"x": _nan(6)}, _private=_nan(2)),
    }
    assert batch_nonfinite(batch) == [
        ("batch['a'][1][0]", 2, 4),
        ("batch[7].y", 1, 2),
        ("batch['s'].image", 5, 5),
        ("batch['s'].meta['m']", 1, 1),
        ("batch['o'].inputs['x']", 1, 6),
        ("batch['o']._private", 1, 2),
    ]


def test_top_level_tensor_and_clean_batches() -> None:
    assert batch_nonfinite(_nan(3, 2)) == [("batch", 2, 3)]
    assert batch_nonfinite(torch.ones(3)) == []
    assert batch_nonfinite((torch.ones(2), {"x": torch.zeros(3)})) == []
    assert batch_nonfinite(None) == []
    assert batch_nonfinite("text") == []
    assert batch_nonfinite(b"bytes") == []
    assert batch_nonfinite(3.5) == []


def test_what_is_not_read() -> None:
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.fill_(NAN)
    dunder = Holder()
    dunder.__dict__["__hidden"] = _nan()
    batch = {
        "model": lin,  # a model is not data
        "ints": torch.tensor([1, 2, 3]),  # no NaN in an integer tensor
        "meta": torch.empty(3, device="meta"),  # nothing to read
        "dunder": dunder,
        "slots": Slotted(_nan()),  # no __dict__
        "cls": Sample,  # a dataclass type, not an instance
    }
    assert batch_nonfinite(batch) == []


def test_complex_tensors_are_read() -> None:
    z = torch.tensor([complex(1, 0), complex(NAN, 0), complex(0, INF)])
    assert batch_nonfinite([z]) == [("batch[0]", 2, 3)]


def test_a_container_seen_twice_is_read_once_and_cycles_end() -> None:
    shared = {"x": _nan()}
    assert batch_nonfinite((shared, shared)) == [("batch[0]['x']", 1, 3)]
    loop: list[object] = [_nan()]
    loop.append(loop)
    assert batch_nonfinite(loop) == [("batch[0]", 1, 3)]
    # the same tensor twice is two entries of the batch
    t = _nan()
    assert batch_nonfinite([t, t]) == [("batch[0]", 1, 3), ("batch[1]", 1, 3)]


def test_depth_limit() -> None:
    def nest(levels: int) -> object:
        out: object = _nan()
        for _ in range(levels):
            out = [out]
        return out

    assert batch_nonfinite(nest(6)) == [("batch" + "[0]" * 6, 1, 3)]
    assert batch_nonfinite(nest(7)) == []


def test_tensor_limit() -> None:
    batch = [_nan(1) for _ in range(1030)]
    found = batch_nonfinite(batch)
    assert len(found) == 1024
    assert found[-1] == ("batch[1023]", 1, 1)


def test_container_limit() -> None:
    # the list itself plus 9999 dicts: 10000 containers seen, the tensor is still read
    batch: list[object] = [{} for _ in range(9999)] + [_nan()]
    assert batch_nonfinite(batch) == [("batch[9999]", 1, 3)]
    batch = [{} for _ in range(10000)] + [_nan()]
    assert batch_nonfinite(batch) == []


def test_micro_batches_named_one_by_one() -> None:
    micro = MicroBatches([(torch.ones(2), _nan(2)), {"x": _nan(4, 3)}, torch.ones(1)])
    assert batch_nonfinite(micro) == [
        ("micro-batch 1/3: batch[1]", 1, 2),
        ("micro-batch 2/3: batch['x']", 3, 4),
    ]
    # a plain tuple is one batch
    assert batch_nonfinite(((torch.ones(2), _nan(2)),)) == [("batch[0][1]", 1, 2)]


def test_sparse_and_nested_tensors_read_their_stored_values() -> None:
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 3, 5]]), torch.tensor([1.0, NAN, INF]),
                                  (100,))
    dense = torch.zeros(4, 5)
    dense[0, 1], dense[2, 3], dense[3, 0] = 1.0, NAN, 2.0
    csr = dense.to_sparse_csr()
    csc = dense.to_sparse_csc()
    bsr = torch.zeros(4, 4)
    bsr[0, 0] = NAN
    bsr_t = bsr.to_sparse_bsr((2, 2))
    nested = torch.nested.nested_tensor([_nan(2), _nan(3, 2)])
    assert batch_nonfinite({"coo": coo, "csr": csr, "csc": csc, "bsr": bsr_t,
                            "nested": nested}) == [
        ("batch['coo']", 2, 3),
        ("batch['csr']", 1, 3),
        ("batch['csc']", 1, 3),
        ("batch['bsr']", 1, 4),
        ("batch['nested']", 3, 5),
    ]


def test_requires_grad_tensor_is_read() -> None:
    t = _nan().requires_grad_()
    assert batch_nonfinite({"x": t}) == [("batch['x']", 1, 3)]


@dataclasses.dataclass(slots=True)
class SlottedSample:
    x: torch.Tensor
    y: torch.Tensor


@dataclasses.dataclass
class Lazy:
    x: torch.Tensor
    cache: torch.Tensor = dataclasses.field(init=False)


def test_dataclass_fields_read_without_a_dict_and_unset_fields_skipped() -> None:
    # a slotted dataclass has no __dict__: only its fields say where the tensors are
    assert batch_nonfinite(SlottedSample(torch.ones(2), _nan(4, 2))) == [("batch.y", 2, 4)]
    lazy = Lazy(_nan())  # `cache` never set: no attribute, nothing to read
    assert batch_nonfinite({"l": lazy}) == [("batch['l'].x", 1, 3)]
    lazy.cache = _nan(2, 2)
    assert batch_nonfinite(lazy) == [("batch.x", 1, 3), ("batch.cache", 2, 2)]


def test_micro_batches_have_the_full_depth() -> None:
    deep: object = _nan()
    for _ in range(6):
        deep = [deep]
    assert batch_nonfinite(MicroBatches([deep])) == [("micro-batch 1/1: batch" + "[0]" * 6, 1, 3)]
    assert batch_nonfinite(MicroBatches([[deep]])) == []


class _Key:
    def __repr__(self) -> str:
        return "k"


def test_tensors_under_the_same_path_are_counted_together() -> None:
    # two keys that print alike give one path: its counts and sizes add up
    batch = {_Key(): _nan(3, 1), _Key(): _nan(2, 2), "clean": torch.ones(4)}
    assert batch_nonfinite(batch) == [("batch[k]", 3, 5)]
