from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from support.core import HYP
from support.state import assert_state_equal

from lightning_gradguard.core.policies import (
    AdaptiveGradClip,
    ClipPolicy,
    FixedNormClip,
    NoClip,
    PercentileClip,
    ZScoreClip,
    unitwise_norm,
)

NAN = float("nan")
INF = float("inf")

SPECIAL_SAFE = [NAN, INF, -INF, 0.0, 1e-45, 1e-40, 1e-30, 1e18]
HUGE = [1e20, 1e30, 1e38, 3.4e38]
safe_values = st.one_of(
    st.sampled_from(SPECIAL_SAFE),
    st.floats(min_value=0.0, max_value=1e15, allow_nan=False, allow_infinity=False),
)
all_values = st.one_of(st.sampled_from(SPECIAL_SAFE + HUGE), safe_values)


def _observe_all(policy: ClipPolicy, xs: list[float]) -> list[float]:
    """Feed ``xs`` as a guard does; return the threshold each value was judged by."""
    out = []
    for x in xs:
        thr = policy.threshold()
        out.append(float(thr))
        policy.observe(torch.tensor(x), thr)
    return out


def _noisy(n: int, seed: int, scale: float = 0.05) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (1.0 + scale * torch.randn(n, generator=g, dtype=torch.float64)).tolist()


# ----------------------------------------------------------------------------- simple ones
def test_fixed_and_noclip() -> None:
    f = FixedNormClip(2.5)
    assert float(f.threshold()) == 2.5
    assert f.threshold().dtype == torch.float32
    assert f.threshold().shape == ()
    f.observe(torch.tensor(100.0), f.threshold())
    assert float(f.threshold()) == 2.5
    assert f.state_dict() == {}
    assert not f.unitwise
    n = NoClip()
    assert float(n.threshold()) == INF
    n.observe(torch.tensor(1.0), n.threshold())
    assert float(n.threshold()) == INF
    assert repr(f) == "FixedNormClip(max_norm=2.5)"


def test_base_class_is_abstract() -> None:
    base = ClipPolicy()
    with pytest.raises(NotImplementedError):
        base.threshold()
    with pytest.raises(NotImplementedError):
        base.clip_unitwise_([])


# ----------------------------------------------------------------------------- ZScoreClip
def test_zscore_docstring_value() -> None:
    clip = ZScoreClip(z_threshold=3.0, warmup_steps=2)
    assert float(clip.threshold()) == INF
    _observe_all(clip, [1.0, 1.2, 0.8, 1.0])
    # mean/var of the observations (none were clamped) with the exact running formula
    assert math.isclose(float(clip.threshold()), 1.4242640687, rel_tol=1e-5)


def test_zscore_warmup_floor_then_pure_zscore() -> None:
    clip = ZScoreClip(z_threshold=3.0, warmup_steps=3, warmup_factor=2.0)
    thr = _observe_all(clip, [1.0, 1.0, 1.0])
    assert thr == [INF, 2.0, 2.0]  # during warmup: max(mu + z*sigma, 2*mu) = 2
    # warmed up: mu + 3*sigma, sigma floored at 1% of mu (constant norms cannot freeze it)
    assert float(clip.threshold()) == pytest.approx(1.03)


def test_zscore_warmup_zero_steps_is_pure_zscore() -> None:
    clip = ZScoreClip(z_threshold=2.0, warmup_steps=0, ema_decay=0.5)
    for x in (1.0, 3.0):
        clip.observe(torch.tensor(x), torch.tensor(INF))  # unbounded entries
    # mean 2, population var 1 -> 2 + 2*1
    assert math.isclose(float(clip.threshold()), 4.0, rel_tol=1e-6)


def test_zscore_isolated_spike_left_out_repeated_spike_enters_clamped() -> None:
    xs = _noisy(40, seed=0)
    a = ZScoreClip(warmup_steps=5)
    b = ZScoreClip(warmup_steps=5)
    _observe_all(a, xs)
    _observe_all(b, xs)
    thr = a.threshold()
    a.observe(torch.tensor(1e6), thr)
    # one isolated spike leaves the threshold exactly where it was
    assert torch.equal(a.threshold(), thr)
    # a second spike in a row enters clamped to the threshold it is judged by
    thr2 = a.threshold()
    a.observe(torch.tensor(1e6), thr2)
    b.observe(thr2.clone(), thr2)
    assert torch.equal(a.threshold(), b.threshold())
    assert float(a.threshold()) > float(thr)


def test_zscore_follows_a_new_regime() -> None:
    clip = ZScoreClip(warmup_steps=5)
    _observe_all(clip, _noisy(40, seed=10))
    thrs = _observe_all(clip, [10 * x for x in _noisy(300, seed=11)])
    assert thrs[-1] > 8.0  # adapted to the 10x scale (threshold ~ 10 * (1 + 3 * 0.05))


@pytest.mark.parametrize("factor", [1e6, 1e30])
def test_zscore_single_outlier_moves_threshold_little(factor: float) -> None:
    clip = ZScoreClip()
    xs = _noisy(50, seed=1)
    _observe_all(clip, xs)
    before = float(clip.threshold())
    thr = clip.threshold()
    assert factor * xs[-1] > float(thr)  # it is a spike
    clip.observe(torch.tensor(factor * xs[-1]), thr)
    after = float(clip.threshold())
    rel = abs(after - before) / before
    assert rel < 0.05, rel


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_zscore_nonfinite_does_not_move_threshold(bad: float) -> None:
    clip = ZScoreClip()
    _observe_all(clip, _noisy(30, seed=2))
    before = clip.threshold()
    clip.observe(torch.tensor(bad), before)
    assert torch.equal(clip.threshold(), before)


def test_zscore_stats_property() -> None:
    clip = ZScoreClip(ema_decay=0.5)
    assert clip.stats.ema_decay == 0.5
    _observe_all(clip, [2.0])
    assert float(clip.stats.mean) == 2.0


@HYP
@given(xs=st.lists(safe_values, max_size=60),
       warmup=st.integers(min_value=0, max_value=10))
def test_zscore_property_thresholds_never_nan(xs: list[float], warmup: int) -> None:
    clip = ZScoreClip(warmup_steps=warmup)
    thrs = _observe_all(clip, xs)
    thrs.append(float(clip.threshold()))
    for t in thrs:
        assert not math.isnan(t)
        assert t >= 0.0
    assert type(clip.stats.count) is int
    assert type(clip.prev_spike) is bool
    for name in ("count", "mean", "var"):
        assert math.isfinite(getattr(clip.stats, name))


@HYP
@given(xs=st.lists(all_values, max_size=60))
@example(xs=[1e20, 1.0])
def test_zscore_property_thresholds_never_nan_huge(xs: list[float]) -> None:
    clip = ZScoreClip()
    thrs = _observe_all(clip, xs)
    thrs.append(float(clip.threshold()))
    assert not any(math.isnan(t) for t in thrs)
    assert type(clip.stats.count) is int
    assert type(clip.prev_spike) is bool
    for name in ("count", "mean", "var"):
        assert math.isfinite(getattr(clip.stats, name))


def test_zscore_recovers_after_zero_first_norm() -> None:
    clip = ZScoreClip(warmup_steps=5)
    thrs = _observe_all(clip, [0.0] + [1.0] * 30)
    assert thrs[-1] > 0.0


def test_zscore_adapts_after_constant_warmup() -> None:
    clip = ZScoreClip(warmup_steps=25)
    thrs = _observe_all(clip, [1.0] * 30 + [1.5] * 200)
    assert thrs[-1] > 1.2


# ----------------------------------------------------------------------------- PercentileClip
def test_percentile_docstring_value() -> None:
    clip = PercentileClip(percentile=50, history_size=4, min_history=1)
    _observe_all(clip, [1.0, 2.0, 3.0, NAN, 4.0, 5.0])
    assert float(clip.threshold()) == 3.5


@pytest.mark.parametrize("q", [10.0, 50.0, 90.0, 100.0, 0.5])
def test_percentile_matches_quantile_of_last_window(q: float) -> None:
    g = torch.Generator().manual_seed(3)
    xs = (torch.rand(37, generator=g) * 10).tolist()
    clip = PercentileClip(percentile=q, history_size=16, min_history=1)
    thrs = _observe_all(clip, xs)
    for i in range(1, len(xs) + 1):
        window = torch.tensor(xs[max(0, i - 16):i], dtype=torch.float32)
        ref = float(torch.quantile(window, q / 100))
        got = thrs[i] if i < len(xs) else float(clip.threshold())
        assert math.isclose(got, ref, rel_tol=1e-6), i


def test_percentile_min_history() -> None:
    clip = PercentileClip(percentile=50, history_size=10, min_history=3)
    thrs = _observe_all(clip, [1.0, NAN, 2.0, INF])
    assert thrs == [INF, INF, INF, INF]
    assert float(clip.threshold()) == INF
    clip.observe(torch.tensor(3.0), clip.threshold())
    assert float(clip.threshold()) == 2.0


def test_percentile_history_bounded() -> None:
    clip = PercentileClip(history_size=7)
    _observe_all(clip, _noisy(500, seed=4))
    assert clip.history.shape == (7,)
    assert int(clip.count) == 7
    assert int(clip.cursor) == 500


def test_percentile_outlier_moves_threshold_at_most_one_rank() -> None:
    xs = _noisy(100, seed=5)
    clip = PercentileClip(percentile=10, history_size=100)
    _observe_all(clip, xs)
    before = float(clip.threshold())
    clip.observe(torch.tensor(1e6), clip.threshold())
    after = float(clip.threshold())
    window = sorted(xs[1:])  # the oldest value was overwritten
    assert window[8] <= after <= window[11]
    assert abs(after - before) / before < 0.05


@HYP
@given(xs=st.lists(all_values, max_size=80), size=st.integers(1, 20))
def test_percentile_property(xs: list[float], size: int) -> None:
    clip = PercentileClip(percentile=10, history_size=size, min_history=1)
    thrs = _observe_all(clip, xs)
    thrs.append(float(clip.threshold()))
    finite = [x for x in xs if math.isfinite(x)]
    for t in thrs:
        assert not math.isnan(t)
    assert clip.history.shape == (size,)
    assert int(clip.count) == min(size, len(finite))
    assert int(clip.cursor) == len(finite)
    kept = clip.history[torch.isfinite(clip.history)]
    assert sorted(kept.tolist()) == sorted(
        torch.tensor(finite[-size:] if finite else [], dtype=torch.float32).tolist()
    )


# ----------------------------------------------------------------------------- AGC
def test_unitwise_norm_shapes() -> None:
    assert unitwise_norm(torch.tensor(-3.0)).shape == ()
    assert float(unitwise_norm(torch.tensor([3.0, 4.0]))) == 5.0
    w = torch.arange(24.0).reshape(2, 3, 2, 2)
    n = unitwise_norm(w)
    assert n.shape == (2, 1, 1, 1)
    assert torch.allclose(n.flatten(), torch.linalg.vector_norm(w.reshape(2, -1), dim=1))
    assert unitwise_norm(torch.ones(3, 5, dtype=torch.float16)).dtype == torch.float32


def test_agc_linear_rows() -> None:
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]))
    w.grad = torch.tensor([[30.0, 40.0], [0.0, 0.05], [1.0, 0.0]])
    agc = AdaptiveGradClip(clipping=0.1, eps=1e-3)
    n = agc.clip_unitwise_([w])
    assert int(n) == 2
    # row 0: ||G||=50 > 0.1*5 -> rescaled to norm 0.5; row 1: 0.05 <= 0.1*1 untouched;
    # row 2: zero weights -> floor 0.1*1e-3 = 1e-4
    assert torch.allclose(w.grad[0], torch.tensor([0.3, 0.4]), rtol=1e-6)
    assert torch.equal(w.grad[1], torch.tensor([0.0, 0.05]))
    assert torch.allclose(w.grad[2], torch.tensor([1e-4, 0.0]), rtol=1e-5)
    assert torch.allclose(torch.linalg.vector_norm(w.grad, dim=1),
                          torch.tensor([0.5, 0.05, 1e-4]), rtol=1e-5)


def test_agc_linear_module_layout_is_out_in() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    g = torch.randn(3, 5)
    g[1] *= 1e-4  # row 1 small enough to stay untouched
    lin.weight.grad = g.clone()
    agc = AdaptiveGradClip(clipping=0.05)
    agc.clip_unitwise_([lin.weight])
    wn = torch.linalg.vector_norm(lin.weight.detach(), dim=1)
    for i in range(3):
        limit = 0.05 * max(float(wn[i]), 1e-3)
        if float(torch.linalg.vector_norm(g[i])) > limit:
            assert math.isclose(float(torch.linalg.vector_norm(lin.weight.grad[i])), limit,
                                rel_tol=1e-5)
            # direction kept
            assert torch.allclose(lin.weight.grad[i] / lin.weight.grad[i].norm(),
                                  g[i] / g[i].norm(), atol=1e-6)
        else:
            assert torch.equal(lin.weight.grad[i], g[i])
    assert torch.equal(lin.weight.grad[1], g[1])


def test_agc_conv_per_output_channel() -> None:
    w = torch.nn.Parameter(torch.zeros(2, 1, 2, 2))
    w.data[0] = 1.0  # ||W_0|| = 2
    w.data[1] = 0.5  # ||W_1|| = 1
    w.grad = torch.zeros(2, 1, 2, 2)
    w.grad[0] = 10.0  # ||G_0|| = 20 > 0.1*2
    w.grad[1] = 0.01  # ||G_1|| = 0.02 <= 0.1*1
    g1 = w.grad[1].clone()
    assert int(AdaptiveGradClip(clipping=0.1).clip_unitwise_([w])) == 1
    assert math.isclose(float(w.grad[0].norm()), 0.2, rel_tol=1e-5)
    assert torch.allclose(w.grad[0], torch.full((1, 2, 2), 0.1), rtol=1e-5)
    assert torch.equal(w.grad[1], g1)


def test_agc_bias_whole_vector() -> None:
    b = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||b|| = 5
    b.grad = torch.tensor([6.0, 8.0])  # 10 > 0.5*5
    assert int(AdaptiveGradClip(clipping=0.5).clip_unitwise_([b])) == 1
    assert torch.allclose(b.grad, torch.tensor([1.5, 2.0]), rtol=1e-6)
    b.grad = torch.tensor([0.6, 0.8])  # 1 <= 2.5: untouched
    assert int(AdaptiveGradClip(clipping=0.5).clip_unitwise_([b])) == 0
    assert torch.equal(b.grad, torch.tensor([0.6, 0.8]))


def test_agc_eps_floor_for_zero_weights() -> None:
    w = torch.nn.Parameter(torch.zeros(2, 3))
    w.grad = torch.ones(2, 3)
    AdaptiveGradClip(clipping=0.1, eps=1e-2).clip_unitwise_([w])
    assert torch.allclose(torch.linalg.vector_norm(w.grad, dim=1), torch.full((2,), 1e-3),
                          rtol=1e-5)


def test_agc_exclude_globs_and_none_grads() -> None:
    body = torch.nn.Parameter(torch.ones(2, 2))
    head = torch.nn.Parameter(torch.ones(2, 2))
    head_b = torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(2))  # grad None
    for p in (body, head, head_b):
        p.grad = torch.full_like(p, 100.0)
    agc = AdaptiveGradClip(clipping=0.01, exclude=["head.*"])
    names = ["body.weight", "head.weight", "head.bias", "frozen"]
    n = agc.clip_unitwise_([body, head, head_b, frozen], names)
    assert int(n) == 2  # two rows of body
    assert torch.equal(head.grad, torch.full((2, 2), 100.0))
    assert torch.equal(head_b.grad, torch.full((2,), 100.0))
    assert float(body.grad.abs().max()) < 1.0
    assert frozen.grad is None
    # without names the patterns cannot apply: everything is clipped
    head.grad = torch.full((2, 2), 100.0)
    assert int(agc.clip_unitwise_([head])) == 2
    # glob semantics are case-sensitive fnmatch
    agc2 = AdaptiveGradClip(clipping=0.01, exclude=["*.bias", "Body?weight"])
    assert agc2._excluded("x.bias")
    assert agc2._excluded("Body.weight")
    assert not agc2._excluded("body.weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_agc_other_dtypes(dtype: torch.dtype) -> None:
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=dtype))
    w.grad = torch.tensor([[30.0, 40.0]], dtype=dtype)
    assert int(AdaptiveGradClip(clipping=0.1).clip_unitwise_([w])) == 1
    assert w.grad.dtype == dtype
    assert torch.allclose(w.grad.double(), torch.tensor([[0.3, 0.4]], dtype=torch.float64),
                          rtol=1e-2)


def test_agc_empty_and_threshold() -> None:
    agc = AdaptiveGradClip()
    assert int(agc.clip_unitwise_([])) == 0
    assert float(agc.threshold()) == INF
    assert agc.unitwise
    assert agc.exclude == ()


# ----------------------------------------------------------------------------- state
POLICIES: dict[str, Callable[[], ClipPolicy]] = {
    "zscore": lambda: ZScoreClip(warmup_steps=5),
    "zscore_long_warmup": lambda: ZScoreClip(warmup_steps=100, ema_decay=0.9),
    "percentile": lambda: PercentileClip(percentile=25, history_size=16, min_history=3),
    "fixed": lambda: FixedNormClip(1.0),
    "noclip": NoClip,
    "agc": lambda: AdaptiveGradClip(),
}


def _roundtrip_weights_only(sd: object) -> object:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("through_disk", [False, True])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_state_dict_round_trip(name: str, through_disk: bool) -> None:
    xs = [*_noisy(30, seed=6), NAN, 50.0, INF]
    ys = [*_noisy(25, seed=7, scale=0.3), 1e6, NAN, 0.0]
    a = POLICIES[name]()
    _observe_all(a, xs)
    sd = a.state_dict()
    if through_disk:
        sd = _roundtrip_weights_only(sd)
    b = POLICIES[name]()
    b.load_state_dict(sd)  # type: ignore[arg-type]
    assert_state_equal(a.state_dict(), b.state_dict())
    assert a.threshold_value() == b.threshold_value()
    assert torch.equal(a.threshold(), b.threshold())
    ta = _observe_all(a, ys)
    tb = _observe_all(b, ys)
    assert ta == tb
    assert a.threshold_value() == b.threshold_value()
    assert torch.equal(a.threshold(), b.threshold())
    assert_state_equal(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_reset_restores_defaults(name: str) -> None:
    a = POLICIES[name]()
    fresh = POLICIES[name]()
    _observe_all(a, _noisy(20, seed=8))
    a.reset()
    assert torch.equal(a.threshold(), fresh.threshold())
    xs = _noisy(10, seed=9)
    assert _observe_all(a, xs) == _observe_all(fresh, xs)
    a.reset()
    fresh.reset()
    assert_state_equal(a.state_dict(), fresh.state_dict())


# ------------------------------------------------------------ defaults, dtype, device, repr
def test_policy_documented_defaults() -> None:
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


# ----------------------------------------------------------------------------- AGC edges
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


# ----------------------------------------------------------------------------- ZScoreClip rules
@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, 2.0])
def test_zscore_ema_decay_range(bad: float) -> None:
    with pytest.raises(ValueError, match=r"`ema_decay` must be a finite number >= 0 and < 1"):
        ZScoreClip(ema_decay=bad)


def test_zscore_ema_decay_limits_allowed() -> None:
    assert ZScoreClip(ema_decay=0.0).ema_decay == 0.0
    assert ZScoreClip(ema_decay=0.999).stats.ema_decay == 0.999


def test_zscore_fresh_state() -> None:
    assert ZScoreClip().state_dict() == {
        "prev_spike": False, "prev_norm": 0.0,
        "stats": {"count": 0, "mean": 0.0, "var": 0.0}}


def test_zscore_first_spike_ever_is_left_out() -> None:
    # a caller-given finite threshold at the very first observation: an isolated spike
    z = ZScoreClip()
    z.observe_value(5.0, 1.0)
    assert z.stats.count == 0
    assert z.state_dict()["prev_spike"] is True


@pytest.mark.parametrize("norm", [0.0, INF, -INF, NAN])
def test_zscore_zero_and_non_finite_norms_change_nothing(norm: float) -> None:
    z = ZScoreClip(warmup_steps=0)
    for x in [1.0, 2.0, 9.0]:  # ends on a spike: prev_spike True
        z.observe_value(x, z.threshold_value())
    before = z.state_dict()
    z.observe_value(norm, z.threshold_value())
    assert z.state_dict() == before


def test_zscore_sigma_floor_is_one_percent_of_the_mean() -> None:
    z = ZScoreClip(z_threshold=2.5, warmup_steps=0)
    for _ in range(5):
        z.observe_value(10.0, z.threshold_value())
    assert z.stats.std == 0.0
    assert z.threshold_value() == pytest.approx(10.0 + 2.5 * 0.1, rel=1e-12)


def test_zscore_loaded_state_with_zero_mean_has_no_threshold() -> None:
    z = ZScoreClip(warmup_steps=0)
    z.load_state_dict({"prev_spike": False, "prev_norm": 0.0,
                       "stats": {"count": 3, "mean": 0.0, "var": 0.0}})
    assert z.threshold_value() == INF


def test_zscore_steady_level_rule_ends_with_the_warmup() -> None:
    # count == warmup_steps: the warmup is over, a repeated spike enters clamped
    z = ZScoreClip(z_threshold=2.5, warmup_steps=2)
    z.observe_value(1.0, z.threshold_value())
    z.observe_value(1.0, z.threshold_value())
    thr = z.threshold_value()
    assert thr == pytest.approx(1.025)
    z.observe_value(5.0, thr)  # isolated: left out
    assert z.stats.count == 2
    z.observe_value(5.0, thr)  # repeated, no higher, but after the warmup: clamped
    assert z.stats.count == 3
    assert z.stats.mean == pytest.approx((1.0 + 1.0 + thr) / 3, rel=1e-12)


def test_zscore_steady_level_rule_at_exactly_the_allowed_rise() -> None:
    z = ZScoreClip(z_threshold=2.5, warmup_steps=10, warmup_factor=10.0)
    z.observe_value(1.0, z.threshold_value())
    thr = z.threshold_value()
    assert thr == 10.0
    z.observe_value(16.0, thr)  # isolated spike: left out
    nxt = 16.0 * 1.05  # a second spike exactly at the allowed rise: a steady level
    z.observe_value(nxt, z.threshold_value())
    assert z.stats.count == 2
    assert z.stats.mean == pytest.approx((1.0 + nxt) / 2, rel=1e-12)


def test_zscore_steady_level_rule_above_the_allowed_rise_is_clamped() -> None:
    z = ZScoreClip(z_threshold=2.5, warmup_steps=10, warmup_factor=10.0)
    z.observe_value(1.0, z.threshold_value())
    z.observe_value(16.0, 10.0)
    z.observe_value(16.0 * 1.06, 10.0)
    assert z.stats.mean == pytest.approx((1.0 + 10.0) / 2, rel=1e-12)


# ----------------------------------------------------------------------------- AGC: factors
def test_agc_unit_scales_do_not_write_the_gradients_and_apply_as_clip_unitwise() -> None:
    from lightning_gradguard.core.policies import apply_unit_scales_

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(3))
    w.grad, b.grad = torch.randn(3, 4) * 10, torch.randn(3) * 1e-4
    grads = [w.grad.clone(), b.grad.clone()]
    agc = AdaptiveGradClip(clipping=0.1)
    scales = agc.unit_scales([w, b])
    assert torch.equal(w.grad, grads[0])
    assert torch.equal(b.grad, grads[1])
    assert [s.param for s in scales] == [0, 1]
    assert int(scales[0].clipped) == 3
    assert int(scales[1].clipped) == 0
    # the 2-norm of the clipped gradient, from the unit norms
    clipped_w = torch.linalg.vector_norm(scales[0].unit_norms * scales[0].unit_scale)
    apply_unit_scales_([w, b], scales)
    assert torch.equal(b.grad, grads[1])
    assert torch.linalg.vector_norm(w.grad).item() == pytest.approx(clipped_w.item(), rel=1e-6)
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    w2.grad, b2.grad = grads[0].clone(), grads[1].clone()
    assert int(agc.clip_unitwise_([w2, b2])) == 3
    assert torch.equal(w2.grad, w.grad)
    assert torch.equal(b2.grad, b.grad)


def test_agc_unit_scales_of_a_row_sparse_gradient() -> None:
    emb = torch.nn.Embedding(6, 2, sparse=True)
    with torch.no_grad():
        emb.weight.fill_(1.0)  # row norm sqrt(2)
    emb(torch.tensor([1, 1, 3])).sum().mul(100.0).backward()
    g = emb.weight.grad
    assert g is not None
    assert g.is_sparse
    dense_before = g.to_dense().clone()
    weight = emb.weight
    assert isinstance(weight, torch.nn.Parameter)
    (s,) = AdaptiveGradClip(clipping=0.1).unit_scales([weight])
    assert torch.equal(g.to_dense(), dense_before)  # not written
    assert s.scale.shape == (6,)  # one factor per row of the weights
    assert s.scale[0].item() == 1.0
    assert s.scale[1].item() < 1.0
    assert s.scale[3].item() < 1.0
    assert int(s.clipped) == 2


def test_base_class_has_no_unit_scales() -> None:
    with pytest.raises(NotImplementedError):
        ClipPolicy().unit_scales([])


# ------------------------------------------------------ AGC unit scales: dtypes, sparse, order


def test_agc_scales_a_bfloat16_gradient_in_its_own_dtype() -> None:
    # the float32 factors are cast to the gradient's dtype before the multiplication (the
    # product rounds once, in bfloat16), dense and row-sparse alike
    from lightning_gradguard.core.policies import apply_unit_scales_

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 16, dtype=torch.bfloat16))
    w.grad = (torch.randn(8, 16) * 10).to(torch.bfloat16)
    emb = torch.nn.Embedding(6, 16, sparse=True).to(torch.bfloat16)
    (emb(torch.tensor([1, 3, 3, 5])).float().sum() * 100).backward()
    assert emb.weight.grad is not None
    emb.weight.grad = emb.weight.grad.coalesce()
    params = [w, emb.weight]
    scales = AdaptiveGradClip(clipping=0.01).unit_scales(params)
    dense0, values0 = w.grad.clone(), emb.weight.grad._values().clone()
    rows = emb.weight.grad._indices()[0]
    apply_unit_scales_(params, scales)
    assert torch.equal(w.grad, dense0 * scales[0].scale.to(torch.bfloat16))
    assert torch.equal(emb.weight.grad._values(),
                       values0 * scales[1].scale[rows].to(torch.bfloat16).reshape(-1, 1))


def test_apply_unit_scales_passes_over_a_gradient_cleared_since() -> None:
    from lightning_gradguard.core.policies import apply_unit_scales_

    a = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    a.grad = torch.tensor([[30.0, 40.0]])
    b.grad = torch.tensor([[30.0, 40.0]])
    scales = AdaptiveGradClip(clipping=0.1).unit_scales([a, b])
    a.grad = None
    apply_unit_scales_([a, b], scales)
    assert a.grad is None
    assert torch.allclose(b.grad, torch.tensor([[0.3, 0.4]]))


def test_agc_unit_scales_of_a_sparse_then_a_dense_gradient() -> None:
    emb = torch.nn.Embedding(6, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    dense = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    dense.grad = torch.tensor([[30.0, 40.0]])
    scales = AdaptiveGradClip(clipping=0.1).unit_scales([emb.weight, dense])
    assert [s.param for s in scales] == [0, 1]
    assert torch.allclose(scales[1].scale, torch.tensor([[0.01]]))


def test_agc_refuses_a_sparse_gradient_that_is_not_row_sparse() -> None:
    p = torch.nn.Parameter(torch.ones(3, 3))
    p.grad = torch.eye(3).to_sparse()  # sparse_dim() == 2
    with pytest.raises(TypeError) as err:
        AdaptiveGradClip().unit_scales([p])
    assert str(err.value) == (
        "AdaptiveGradClip supports sparse gradients only when they are row-sparse "
        "(sparse_dim()=1) over a matrix, got sparse_dim()=2 for a 2-D parameter; exclude it "
        "with `exclude=` or use ZScoreClip")


def test_agc_sparse_factors_under_a_float64_default_dtype() -> None:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        emb = torch.nn.Embedding(6, 2, sparse=True)
        with torch.no_grad():
            emb.weight.fill_(1.0)
        emb(torch.tensor([1])).sum().mul(100.0).backward()
        (s,) = AdaptiveGradClip(clipping=0.1).unit_scales([emb.weight])
    finally:
        torch.set_default_dtype(default)
    assert s.scale.dtype == torch.float32
    assert s.scale[0].item() == 1.0
    assert s.scale[1].item() == pytest.approx(0.1 * math.sqrt(2) / (100 * math.sqrt(2)))
