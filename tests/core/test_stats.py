from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from support.core import HYP

from lightning_gradguard.core.stats import RobustNormStats

NAN = float("nan")
INF = float("inf")

SPECIAL_SAFE = [NAN, INF, -INF, 0.0, 1e-45, 1e-40, 1e-30, 1e18]
#: finite values whose square overflows float32 (> ~1.8e19)
HUGE = [1e20, 1e30, 1e38, 3.4e38]

safe_values = st.one_of(
    st.sampled_from(SPECIAL_SAFE),
    st.floats(min_value=0.0, max_value=1e15, allow_nan=False, allow_infinity=False),
)
all_values = st.one_of(st.sampled_from(SPECIAL_SAFE + HUGE), safe_values)


def _feed(s: RobustNormStats, xs: list[float], bound: float | None = None) -> None:
    for x in xs:
        s.update(torch.tensor(x), None if bound is None else torch.tensor(bound))
    _check_types(s)


def _check_types(s: RobustNormStats) -> None:
    """The state is host numbers: ``count`` an int, ``mean`` / ``var`` / ``std`` floats."""
    assert type(s.count) is int
    assert type(s.mean) is float
    assert type(s.var) is float
    assert type(s.std) is float


def _same(a: object, b: object) -> bool:
    """Same type and value (NaN equal to NaN); recursive over dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def test_initial_state() -> None:
    s = RobustNormStats()
    _check_types(s)
    assert int(s.count) == 0
    assert float(s.mean) == 0.0
    assert float(s.var) == 0.0
    assert float(s.std) == 0.0
    assert s.ema_decay == 0.97


def test_exact_running_mean_and_population_variance_during_warmup() -> None:
    g = torch.Generator().manual_seed(0)
    xs = (torch.rand(10, generator=g, dtype=torch.float64) * 5 + 1).tolist()
    s = RobustNormStats(ema_decay=0.9)  # 1 / (1 - 0.9) = 10 exact observations
    for i, x in enumerate(xs, start=1):
        s.update(torch.tensor(x))
        ref = torch.tensor(xs[:i], dtype=torch.float64)
        assert int(s.count) == i
        assert math.isclose(float(s.mean), float(ref.mean()), rel_tol=1e-6)
        assert math.isclose(float(s.var), float(ref.var(unbiased=False)), rel_tol=1e-4,
                            abs_tol=1e-6)


def test_ema_after_warmup_matches_float64_recurrence() -> None:
    g = torch.Generator().manual_seed(1)
    xs = (torch.rand(60, generator=g, dtype=torch.float64) + 0.5).tolist()
    beta = 0.8
    s = RobustNormStats(ema_decay=beta)
    _feed(s, xs)
    mean, var = 0.0, 0.0
    for n, x in enumerate(xs):
        a = max(1 - beta, 1 / (n + 1))
        d = x - mean
        mean += a * d
        var = (1 - a) * (var + a * d * d)
    assert math.isclose(float(s.mean), mean, rel_tol=1e-5)
    assert math.isclose(float(s.var), var, rel_tol=1e-4)
    # after warmup the oldest observations are forgotten geometrically
    t = RobustNormStats(ema_decay=beta)
    _feed(t, [100.0, *xs[1:]])
    assert abs(float(t.mean) - float(s.mean)) < 100 * beta**54


def test_ema_decay_zero_tracks_last_value() -> None:
    s = RobustNormStats(ema_decay=0.0)
    _feed(s, [1.0, 5.0, 3.0])
    assert float(s.mean) == 3.0
    assert float(s.var) == 0.0


def test_nonfinite_observations_leave_state_bit_identical() -> None:
    xs = [1.0, 2.0, 4.0]
    a = RobustNormStats()
    b = RobustNormStats()
    _feed(a, xs)
    _feed(b, [1.0, NAN, 2.0, INF, -INF, 4.0, NAN])
    for k in ("count", "mean", "var"):
        assert _same(getattr(a, k), getattr(b, k)), k
    assert a.state_dict() == b.state_dict()
    assert _same(a.state_dict(), b.state_dict())


def test_bound_clamps_entry() -> None:
    s = RobustNormStats(ema_decay=0.9)
    _feed(s, [1.0, 3.0])
    s.update(torch.tensor(1e6), bound=torch.tensor(4.0))
    assert math.isclose(float(s.mean), 8.0 / 3.0, rel_tol=1e-6)
    ref = RobustNormStats(ema_decay=0.9)
    _feed(ref, [1.0, 3.0, 4.0])
    assert _same(ref.mean, s.mean)
    assert _same(ref.var, s.var)
    assert _same(ref.count, s.count)


def test_bound_above_value_and_nonfinite_bound_mean_no_bound() -> None:
    ref = RobustNormStats()
    _feed(ref, [1.0, 2.0, 7.0])
    for bound in (100.0, INF, NAN):
        s = RobustNormStats()
        _feed(s, [1.0, 2.0])
        s.update(torch.tensor(7.0), bound=torch.tensor(bound))
        assert _same(s.mean, ref.mean), bound
        assert _same(s.var, ref.var), bound
        assert _same(s.count, ref.count), bound
        # the same with host floats
        h = RobustNormStats()
        for x in (1.0, 2.0):
            h.update(x)
        h.update(7.0, bound=bound)
        assert h.state_dict() == ref.state_dict(), bound


def test_nonfinite_value_with_bound_is_still_ignored() -> None:
    """A NaN/Inf norm must not enter as the bound (it is masked, not clamped)."""
    s = RobustNormStats()
    _feed(s, [1.0, 2.0])
    before = s.state_dict()
    for bad in (NAN, INF):
        s.update(torch.tensor(bad), bound=torch.tensor(3.0))
        s.update(bad, bound=3.0)
    after = s.state_dict()
    assert before == after
    assert _same(before, after)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_input(dtype: torch.dtype) -> None:
    s = RobustNormStats()
    s.update(torch.tensor(2.0, dtype=dtype))
    s.update(torch.tensor(4.0, dtype=dtype))
    assert float(s.mean) == 3.0
    assert float(s.var) == 1.0


def test_state_dict_round_trip_identical_behaviour() -> None:
    g = torch.Generator().manual_seed(2)
    xs = (torch.rand(40, generator=g) * 3).tolist()
    ys = [*(torch.rand(20, generator=g) * 3).tolist(), NAN, 50.0]
    a = RobustNormStats(ema_decay=0.9)
    _feed(a, xs)
    sd = a.state_dict()
    assert set(sd) == {"count", "mean", "var"}
    assert type(sd["count"]) is int
    assert type(sd["mean"]) is float
    assert type(sd["var"]) is float
    b = RobustNormStats(ema_decay=0.9)
    b.load_state_dict(sd)
    _check_types(b)
    assert _same(a.state_dict(), b.state_dict())
    for y in ys:
        a.update(torch.tensor(y), bound=torch.tensor(5.0))
        b.update(torch.tensor(y), bound=torch.tensor(5.0))
        assert _same(a.mean, b.mean)
        assert _same(a.var, b.var)
        assert _same(a.count, b.count)


def test_state_dict_is_a_copy_and_survives_torch_save_weights_only() -> None:
    a = RobustNormStats()
    _feed(a, [1.0, 2.0, 3.0])
    sd = a.state_dict()
    a.update(torch.tensor(100.0))
    assert int(sd["count"]) == 3  # snapshot not affected by later updates
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    b = RobustNormStats()
    b.load_state_dict(loaded)
    assert int(b.count) == 3
    assert math.isclose(float(b.mean), 2.0, rel_tol=1e-6)


def test_load_state_dict_missing_key() -> None:
    with pytest.raises(KeyError, match="var"):
        RobustNormStats().load_state_dict({"count": torch.tensor(1), "mean": torch.tensor(1.0)})


def test_reset_restores_defaults() -> None:
    s = RobustNormStats()
    _feed(s, [1.0, 2.0, 3.0])
    s.reset()
    fresh = RobustNormStats()
    for k in ("count", "mean", "var"):
        assert _same(getattr(s, k), getattr(fresh, k)), k
        assert type(getattr(s, k)) is type(getattr(fresh, k)), k
    assert s.state_dict() == {"count": 0, "mean": 0.0, "var": 0.0}
    # and behaves like a fresh one afterwards
    _feed(s, [4.0, 6.0])
    _feed(fresh, [4.0, 6.0])
    assert _same(s.mean, fresh.mean)
    assert _same(s.var, fresh.var)
    assert _same(s.count, fresh.count)


def _check_finite_state(s: RobustNormStats, xs: list[float]) -> None:
    n_finite = sum(math.isfinite(x) for x in xs)
    _check_types(s)
    assert int(s.count) == n_finite
    assert math.isfinite(float(s.mean))
    assert math.isfinite(float(s.var))
    assert float(s.var) >= 0.0
    assert math.isfinite(float(s.std))


@HYP
@given(xs=st.lists(safe_values, max_size=60), bounded=st.booleans())
def test_property_state_finite_for_any_sequence(xs: list[float], bounded: bool) -> None:
    s = RobustNormStats()
    _feed(s, xs, bound=2.0 if bounded else None)
    _check_finite_state(s, xs)
    if bounded and xs:
        assert float(s.mean) <= 2.0 * (1 + 1e-6)


@HYP
@given(xs=st.lists(all_values, max_size=60))
@example(xs=[1e20])
@example(xs=[1.0, 1e38, 1.0])
def test_property_state_finite_with_huge_values(xs: list[float]) -> None:
    s = RobustNormStats()
    _feed(s, xs)
    _check_finite_state(s, xs)


@pytest.mark.parametrize("x", [1e20, 1e38])
def test_huge_first_observation_keeps_var_finite(x: float) -> None:
    s = RobustNormStats()
    s.update(torch.tensor(x))
    assert float(s.var) == 0.0  # one observation: population variance 0
    s.update(torch.tensor(1.0))
    assert math.isfinite(float(s.var))
