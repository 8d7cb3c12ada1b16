from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.core import HYP

from lightning_gradguard.core.growth import GrowthDetector

NAN = float("nan")
INF = float("inf")


def _fires(d: GrowthDetector, xs: list[float], *, as_tensor: bool = True) -> list[int]:
    """Indices at which ``d`` fired; feeds 0-dim float32 tensors or Python floats."""
    out = []
    for i, x in enumerate(xs):
        fired = d.update(torch.tensor(x) if as_tensor else x)
        assert type(fired) is bool
        if fired:
            out.append(i)
    assert type(d.streak) is int
    assert type(d.prev) is float
    return out


def _same(a: object, b: object) -> bool:
    """Same type and value, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@pytest.mark.parametrize("as_tensor", [False, True])
def test_docstring_sequence(as_tensor: bool) -> None:
    d = GrowthDetector(patience=3, min_rise=0.1)
    assert _fires(d, [1.0, 1.5, 2.3, 3.5, 5.0], as_tensor=as_tensor) == [3]


@pytest.mark.parametrize("patience", [1, 3, 5])
def test_geometric_growth_fires_every_patience_rises(patience: int) -> None:
    d = GrowthDetector(patience=patience, min_rise=0.05)
    xs = [1.1**t for t in range(31)]
    # x_0 has no predecessor; rise k happens at index k; fires at k = patience, 2*patience, ...
    assert _fires(d, xs) == list(range(patience, 31, patience))


def test_rise_below_min_rise_does_not_count() -> None:
    d = GrowthDetector(patience=2, min_rise=0.1)
    assert _fires(d, [1.05**t for t in range(20)]) == []
    d0 = GrowthDetector(patience=2, min_rise=0.0)
    assert _fires(d0, [1.0] * 10) == []  # equal is not a rise
    assert _fires(d0, [1.0, 1.0 + 1e-6, 1.0 + 2e-6]) == [2]


def test_drop_breaks_streak_and_fire_restarts_count() -> None:
    d = GrowthDetector(patience=3, min_rise=0.0)
    assert _fires(d, [1.0, 2.0, 3.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]) == [6, 9]


def test_hold_stays_armed_until_the_streak_breaks() -> None:
    d = GrowthDetector(patience=3, min_rise=0.05)
    assert [d.update(2.0**i) for i in range(4)] == [False, False, False, True]
    d.hold()
    assert d.update(16.0) is True  # the very next rise fires again
    d.hold()
    assert d.update(16.0) is False  # no rise: the streak breaks
    assert [d.update(x) for x in [32.0, 64.0, 128.0]] == [False, False, True]


def test_hold_survives_nonfinite_steps_and_a_state_dict_round_trip() -> None:
    d = GrowthDetector(patience=3, min_rise=0.05)
    assert [d.update(2.0**i) for i in range(4)] == [False, False, False, True]
    d.hold()
    assert d.update(math.nan) is False  # neither fires nor disarms
    assert d.update(math.inf) is False
    resumed = GrowthDetector(patience=3, min_rise=0.05)
    resumed.load_state_dict(d.state_dict())
    assert resumed.update(16.0) is True  # still armed after the round trip
    assert d.update(16.0) is True


def test_nonfinite_neither_extends_nor_breaks_a_streak() -> None:
    d = GrowthDetector(patience=4, min_rise=0.05)
    xs = [1.0, 2.0, NAN, 4.0, INF, -INF, 8.0, NAN, 16.0]
    assert _fires(d, xs) == [8]
    assert d.streak == 0
    # same fire pattern as the finite subsequence
    clean = GrowthDetector(patience=4, min_rise=0.05)
    assert _fires(clean, [1.0, 2.0, 4.0, 8.0, 16.0]) == [4]
    # a non-finite value does not break: streak preserved across it
    d2 = GrowthDetector(patience=5)
    _fires(d2, [1.0, 2.0, 4.0])
    assert d2.streak == 2
    _fires(d2, [NAN, INF])
    assert d2.streak == 2
    assert d2.prev == 4.0  # compared with the last finite value
    _fires(d2, [3.0])
    assert d2.streak == 0


def test_iid_stable_noise_rarely_fires() -> None:
    """1000 lognormal(0, 0.1) samples.

    Theory: a fire needs 5 rises in a row; for i.i.d. continuous data with min_rise=0 the
    probability per window is exactly 1/6! = 1/720, so the expected number of fires is at most
    995/720 ~ 1.4 (distribution-free). With min_rise=0.05 (log-rise > 0.0488 against a
    log-difference sd of 0.141) a Monte-Carlo estimate is ~8e-6 per window, i.e. ~0.008
    expected fires in 1000 samples.
    """
    g = torch.Generator().manual_seed(0)
    xs = torch.exp(0.1 * torch.randn(1000, generator=g, dtype=torch.float64)).tolist()
    assert len(_fires(GrowthDetector(patience=5, min_rise=0.05), xs)) <= 1
    # rho = 0: bounded by the distribution-free expectation (1.4) with a wide margin
    assert len(_fires(GrowthDetector(patience=5, min_rise=0.0), xs)) <= 6
    for seed in range(1, 5):
        g = torch.Generator().manual_seed(seed)
        ys = torch.exp(0.1 * torch.randn(1000, generator=g, dtype=torch.float64)).tolist()
        assert len(_fires(GrowthDetector(patience=5, min_rise=0.05), ys)) <= 1


def test_geometric_growth_with_noise_fires() -> None:
    g = torch.Generator().manual_seed(1)
    noise = torch.exp(0.02 * torch.randn(60, generator=g, dtype=torch.float64))
    xs = [(1.3**t) * float(n) for t, n in enumerate(noise)]
    assert len(_fires(GrowthDetector(patience=5, min_rise=0.05), xs)) >= 10


def test_huge_values_do_not_raise() -> None:
    d = GrowthDetector(patience=2, min_rise=0.05)
    # near the float32 maximum (the state is a float64 host number: 1e38 -> 3.3e38 is a
    # rise, 3.4e38 < 1.05 * 3.3e38 is not); nothing raises
    assert _fires(d, [1e38, 3.3e38, 3.4e38]) == []
    assert math.isfinite(d.prev)
    # near the float64 maximum (1 + rho) * 1.75e308 overflows to inf: a further rise cannot
    # be seen, nothing raises
    d64 = GrowthDetector(patience=2, min_rise=0.05)
    assert _fires(d64, [1e308, 1.75e308, 1.79e308], as_tensor=False) == []
    assert d64.prev == 1.79e308


@HYP
@given(xs=st.lists(st.one_of(
    st.sampled_from([NAN, INF, -INF, 0.0, 1e-45, 1e-40, 1e38, 3.4e38]),
    st.floats(min_value=0.0, max_value=1e30, allow_nan=False)), max_size=60),
    patience=st.integers(1, 6))
def test_property_never_raises_and_state_valid(xs: list[float], patience: int) -> None:
    finite = [x for x in xs if math.isfinite(x)]
    for as_tensor in (True, False):
        d = GrowthDetector(patience=patience, min_rise=0.05)
        _fires(d, xs, as_tensor=as_tensor)
        assert 0 <= d.streak < patience
        if finite:
            # a float32 tensor is read as its float32 value, a Python float kept exactly
            last = float(torch.tensor(finite[-1], dtype=torch.float32)) if as_tensor \
                else finite[-1]
            assert d.prev == last
        else:
            assert math.isnan(d.prev)  # "nothing seen yet" sentinel


@pytest.mark.parametrize("through_disk", [False, True])
def test_state_dict_round_trip(through_disk: bool) -> None:
    xs = [1.0, 1.2, 1.5, NAN, 2.0]
    ys = [2.5, 3.2, 4.0, 1.0, 1.3, 1.7, 2.2, 2.9, 3.8]
    a = GrowthDetector(patience=4)
    _fires(a, xs)
    sd = a.state_dict()
    if through_disk:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    assert set(sd) == {"prev", "streak"}
    assert type(sd["prev"]) is float
    assert type(sd["streak"]) is int
    b = GrowthDetector(patience=4)
    b.load_state_dict(sd)
    assert _same(a.streak, b.streak)
    assert _same(a.prev, b.prev)
    assert _fires(a, ys) == _fires(b, ys)
    assert _same(a.streak, b.streak)
    assert _same(a.prev, b.prev)


def test_reset() -> None:
    d = GrowthDetector(patience=3)
    _fires(d, [1.0, 2.0, 4.0])
    assert d.streak == 2
    d.reset()
    assert _same(d.streak, 0)
    assert type(d.prev) is float
    assert math.isnan(d.prev)
    assert _fires(d, [8.0, 16.0, 32.0, 64.0]) == [3]


# ----------------------------------------------------------------------------- edges
def test_documented_defaults() -> None:
    d = GrowthDetector()
    assert (d.patience, d.min_rise) == (5, 0.05)


def test_hold_leaves_the_detector_one_rise_short_of_firing() -> None:
    d = GrowthDetector(patience=3, min_rise=0.0)
    assert [d.update(x) for x in [1.0, 2.0, 3.0, 4.0]] == [False, False, False, True]
    d.hold()
    assert d.state_dict() == {"prev": 4.0, "streak": 2}
    assert d.fires(5.0)
    assert not d.fires(4.0)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_growth_fires_never_on_a_non_finite_value(bad: float) -> None:
    d = GrowthDetector(patience=1, min_rise=0.0)
    d.update(1.0)
    assert d.fires(bad) is False
    assert d.update(bad) is False
    assert d.state_dict() == {"prev": 1.0, "streak": 0}


def test_growth_fires_not_on_a_fall_even_with_patience_one() -> None:
    d = GrowthDetector(patience=1, min_rise=0.0)
    d.update(1.0)
    assert (d.fires(0.5), d.fires(1.0), d.fires(1.5)) == (False, False, True)


def test_growth_min_rise_boundary() -> None:
    d = GrowthDetector(patience=1, min_rise=0.5)
    d.update(2.0)
    assert (d.fires(3.0), d.fires(3.0000001)) == (False, True)
