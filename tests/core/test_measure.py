"""Stage 1, measure: named host values in one transfer, and what :class:`Meter` reads."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from lightning_gradguard.core._host import host_reads, reset_host_reads
from lightning_gradguard.core.measure import Gradients, HostValues, Measurement, Meter, Request
from lightning_gradguard.core.norms import grad_norms
from lightning_gradguard.core.policies import (
    AdaptiveGradClip,
    ClipPolicy,
    FixedNormClip,
    NoClip,
    UnitScale,
)


def _weights(meter: Meter, module: torch.nn.Module | None = None) -> Request:
    """A request for the weights' norm (the meter's, or ``module``'s in the 2-norm)."""
    def request(grads: Gradients, device: torch.device) -> torch.Tensor:
        if module is not None:
            return meter.total([p.detach() for p in module.parameters()], device)
        return meter.total([p.detach() for p in meter.params], device,
                           norm_type=meter.norm_type, groups=meter.groups)
    return request


def test_host_values_are_read_by_name_in_one_transfer() -> None:
    values = HostValues(torch.device("cpu"))
    values.add("b", torch.tensor([2.5], dtype=torch.float64))
    values.add("a", torch.tensor(1.0, dtype=torch.bfloat16))
    reset_host_reads()
    assert values.read() == {"b": 2.5, "a": 1.0}
    assert host_reads() == 1


def test_host_values_refuse_a_name_twice() -> None:
    values = HostValues(torch.device("cpu"))
    values.add("loss", torch.tensor(1.0))
    with pytest.raises(ValueError, match="`name` must be new, got 'loss'"):
        values.add("loss", torch.tensor(2.0))


def _params() -> list[torch.nn.Parameter]:
    a = torch.nn.Parameter(torch.ones(4))   # norm 2
    b = torch.nn.Parameter(torch.ones(9))   # norm 3
    a.grad = torch.full((4,), 3.0 / 2.0)     # norm 3
    b.grad = torch.full((9,), 4.0 / 3.0)     # norm 4
    return [a, b]


def test_meter_reads_every_named_value_once() -> None:
    params = _params()
    module = torch.nn.Module()
    module.register_parameter("a", params[0])
    module.register_parameter("b", params[1])
    meter = Meter(params, 2.0)
    reset_host_reads()
    m, grads = meter.measure(
        4, torch.tensor(0.25), FixedNormClip(1.0),
        {"params_norm": _weights(meter, module), "weight_norm": _weights(meter)},
        names=["a", "b"], amp_overflow=True)
    assert host_reads() == 1
    assert grads is not None
    assert set(grads.host) == {"params_norm", "weight_norm"}
    assert grads.host["weight_norm"] == [pytest.approx(math.sqrt(13.0))]
    assert grads.host["params_norm"] == [pytest.approx(math.sqrt(13.0))]
    # the meter measures: the limit and whether the weights are finite are the guard's
    # reading of these answers (GuardCore.measure)
    assert m == Measurement(step=4, grad_norm=pytest.approx(5.0), threshold=1.0,
                            clipped_norm=pytest.approx(5.0), loss=0.25, amp_overflow=True)
    assert len(grads.grads) == 2
    assert grads.per_tensor is not None
    assert grads.per_tensor.tolist() == pytest.approx([3.0, 4.0])


@pytest.mark.parametrize(("loss", "expected"), [(None, None), (1.5, 1.5)])
def test_a_host_loss_is_not_transferred(loss: float | None, expected: float | None) -> None:
    reset_host_reads()
    m, grads = Meter(_params(), 2.0).measure(1, loss, NoClip(), names=["a", "b"])
    assert host_reads() == 1  # the gradient norm only
    assert grads is not None
    assert grads.host == {}
    assert m.loss == expected
    assert m.params_finite is None
    assert m.finite


def test_non_finite_weights_are_measured_on_request() -> None:
    module = torch.nn.Linear(2, 1)
    with torch.no_grad():
        module.weight[0, 0] = math.inf
    params = list(module.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    meter = Meter(params, 2.0)
    m, grads = meter.measure(1, None, NoClip(), {"params_norm": _weights(meter, module)},
                             names=["w", "b"])
    assert grads is not None
    assert grads.host["params_norm"] == [math.inf]
    assert m.finite  # the gradients are


def test_unitwise_policy_measures_its_clip_without_writing_the_gradients() -> None:
    w = torch.nn.Parameter(torch.ones(1, 4))  # unit norm 2
    w.grad = torch.full((1, 4), 10.0)  # unit norm 20
    before = w.grad.clone()
    meter = Meter([w], 2.0)
    m, grads = meter.measure(1, None, AdaptiveGradClip(clipping=0.1), names=["w"])
    assert m.unitwise
    assert m.grad_norm == pytest.approx(20.0)
    assert m.clipped_norm == pytest.approx(0.2, rel=1e-3)
    assert torch.equal(w.grad, before)  # measure measures: the apply stage clips
    assert grads is not None
    meter.clip_units_(grads)
    assert torch.linalg.vector_norm(w.grad).item() == pytest.approx(m.clipped_norm, rel=1e-5)


def _agc_params(sparse: bool) -> tuple[list[torch.nn.Parameter], list[str]]:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=sparse)
    lin = torch.nn.Linear(3, 5)
    head = torch.nn.Linear(5, 2)
    head(lin(emb(torch.tensor([1, 4, 4, 7])))).pow(2).sum().mul(1e3).backward()
    assert lin.bias.grad is not None
    lin.bias.grad.zero_()  # a unit under its limit: factor 1
    return ([*emb.parameters(), *lin.parameters(), *head.parameters()],
            ["emb.weight", "lin.weight", "lin.bias", "head.weight", "head.bias"])


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_unitwise_clipped_total_matches_clipping_in_place(norm_type: float, sparse: bool) -> None:
    """The measured clipped total is the norm the in-place clip gives, to the last bits."""
    params, names = _agc_params(sparse)
    agc = AdaptiveGradClip(clipping=0.01, exclude=["head.*"])
    grads_before = [p.grad.clone() for p in params if p.grad is not None]
    meter = Meter(params, norm_type)
    m, grads = meter.measure(1, None, agc, names=names)
    assert grads is not None
    assert grads.unit_scales
    for p, g in zip(params, grads_before, strict=True):
        assert p.grad is not None
        assert torch.equal(p.grad.to_dense(), g.to_dense())
    assert m.clipped_norm <= m.grad_norm  # (inf-norm: the largest element may be excluded)
    n = agc.clip_unitwise_(params, names)  # the direct, in-place clip
    assert int(n) > 0
    expected = grad_norms([p.grad for p in params if p.grad is not None], norm_type).total
    assert m.clipped_norm == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_clip_units_equals_clip_unitwise(sparse: bool) -> None:
    params, names = _agc_params(sparse)
    agc = AdaptiveGradClip(clipping=0.01, exclude=["head.*"])
    meter = Meter(params, 2.0)
    _, grads = meter.measure(1, None, agc, names=names)
    assert grads is not None
    meter.clip_units_(grads)
    staged = [p.grad.to_dense().clone() for p in params if p.grad is not None]
    params2, _ = _agc_params(sparse)
    agc.clip_unitwise_(params2, names)
    direct = [p.grad.to_dense() for p in params2 if p.grad is not None]
    for a, b in zip(staged, direct, strict=True):
        assert torch.equal(a, b)


def test_unitwise_clipping_nothing_reports_the_total_to_the_bit() -> None:
    params, names = _agc_params(False)
    m, _ = Meter(params, 2.0).measure(1, None, AdaptiveGradClip(clipping=1e6), names=names)
    assert m.clipped_norm == m.grad_norm


def test_no_gradients_no_host_read() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    meter = Meter([w], 2.0)
    reset_host_reads()
    m, grads = meter.measure(3, torch.tensor(1.0), NoClip(), {"weight_norm": _weights(meter)},
                             names=["w"])
    assert host_reads() == 0
    assert grads is None
    assert m == Measurement(step=3, grad_norm=0.0, threshold=math.inf, clipped_norm=0.0,
                            empty=True)


def test_non_finite_measurement() -> None:
    params = _params()
    assert params[1].grad is not None
    params[1].grad[0] = math.nan
    m, _ = Meter(params, 2.0).measure(1, None, NoClip(), names=["a", "b"])
    assert math.isnan(m.grad_norm)
    assert not m.finite
    assert not Measurement(step=1, grad_norm=1.0, threshold=1.0, clipped_norm=1.0,
                           loss=math.inf).finite


def test_measurement_is_immutable() -> None:
    m = Measurement(step=1, grad_norm=1.0, threshold=2.0, clipped_norm=1.0)
    with pytest.raises(AttributeError):
        m.grad_norm = 5.0  # type: ignore[misc]
    assert m._replace(grad_norm=5.0).grad_norm == 5.0
    assert m.grad_norm == 1.0


def test_host_values_two_vectors_in_one_transfer_each_from_its_offset() -> None:
    values = HostValues(torch.device("cpu"))
    values.add("a", torch.tensor(1.0))
    values.add("b", torch.tensor(2.0, dtype=torch.float64))
    values.add_vector("u", torch.tensor([10.0, 11.0, 12.0]))
    values.add_vector("v", torch.tensor([[20.0, 21.0], [22.0, 23.0]], dtype=torch.float16))
    values.add_vector("w", torch.tensor([30.0]))
    reset_host_reads()
    assert values.read() == {"a": 1.0, "b": 2.0}
    assert host_reads() == 1
    assert values.vectors == {"u": [10.0, 11.0, 12.0], "v": [20.0, 21.0, 22.0, 23.0],
                              "w": [30.0]}
    with pytest.raises(ValueError, match="`name` must be new, got 'u'"):
        values.add_vector("u", torch.tensor([1.0]))


# --- exact values of each measured quantity ---------------------------------------------------


def test_name_twice_messages_exact() -> None:
    values = HostValues(torch.device("cpu"))
    values.add("loss", torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^`name` must be new, got 'loss' a second time$"):
        values.add("loss", torch.tensor(2.0))
    values.add_vector("u", torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"^`name` must be new, got 'u' a second time$"):
        values.add_vector("u", torch.tensor([1.0]))


def test_host_values_convert_shape_dtype_and_autograd() -> None:
    values = HostValues(torch.device("cpu"))
    x = torch.tensor([1.5], requires_grad=True)
    values.add("x2", (x * 2).reshape(1, 1))  # a one-element tensor with autograd
    values.add("half", torch.tensor(0.25, dtype=torch.float16))
    values.add("int", torch.tensor(7))
    assert all(v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad
               for v in values._values)
    assert values.read() == {"x2": 3.0, "half": 0.25, "int": 7.0}
    assert values.vectors == {}


def _measure(params: list[torch.nn.Parameter], norm_type: float = 2.0,  # type: ignore[no-untyped-def]
             *, weight_norm: bool = False, read_per_tensor: bool = False,
             extra: dict[str, torch.Tensor] | None = None, **kw: object):
    meter = Meter(params, norm_type)
    requests: dict[str, Request] = {}
    if weight_norm:
        requests["weight_norm"] = _weights(meter)
    if read_per_tensor:
        requests["per_tensor"] = lambda grads, device: grads.per_tensor
    requests.update(extra or {})
    args: dict[str, object] = dict(loss=None, policy=NoClip(), names=["a", "b"])
    args.update(kw)
    m, grads = meter.measure(1, requests=requests, **args)  # type: ignore[arg-type]
    return m, grads, {k: v[0] for k, v in (grads.host if grads else {}).items() if len(v) == 1}


@pytest.mark.parametrize(("loss", "expected"), [
    (torch.tensor([1.0, 3.0]), 2.0),  # a per-sample loss: its mean
    (torch.tensor([[0.5]]), 0.5),
    (torch.tensor(0.75, dtype=torch.float16), 0.75),
    (torch.tensor([1.0, 2.0], dtype=torch.float16), 1.5),
    (2, 2.0),
])
def test_loss_summary(loss: object, expected: float) -> None:
    m, _, _ = _measure(_params(), loss=loss)
    assert m.loss == expected
    assert type(m.loss) is float


def test_weight_norm_in_the_meters_norm_type_and_per_tensor_read() -> None:
    m, grads, seen = _measure(_params(), 1.0, weight_norm=True, read_per_tensor=True,
                              extra={"e": torch.tensor([[5.0, 6.0]])})
    # L1 norms: weights 4 + 9, gradients 6 + 12
    assert seen["weight_norm"] == 13.0
    assert m.grad_norm == pytest.approx(18.0)
    assert m.clipped_norm == m.grad_norm
    assert grads is not None
    assert list(grads.host) == ["weight_norm", "per_tensor", "e"]
    assert grads.host["per_tensor"] == pytest.approx([6.0, 12.0])
    assert grads.host["e"] == [5.0, 6.0]
    _, grads2, seen2 = _measure(_params(), 1.0)
    assert seen2 == {}
    assert grads2 is not None
    assert grads2.host == {}


def test_threshold_is_the_policys_before_the_step() -> None:
    m, _, _ = _measure(_params(), policy=FixedNormClip(2.5))
    assert (m.threshold, m.grad_norm, m.unitwise) == (2.5, pytest.approx(5.0), False)


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_a_norm_overflowing_float32_is_measured_in_float64(norm_type: float) -> None:
    a = torch.nn.Parameter(torch.ones(2))
    a.grad = torch.tensor([3e38, 3e38])  # finite elements, a norm above float32's range
    m, _, _ = _measure([a], norm_type, names=["a"])
    expected = 6e38 if norm_type == 1.0 else math.sqrt(2) * 3e38
    assert m.grad_norm == pytest.approx(expected, rel=1e-6)
    assert m.finite


def test_an_inf_norm_is_not_re_measured() -> None:
    a = torch.nn.Parameter(torch.ones(2))
    a.grad = torch.tensor([math.inf, 1.0])
    m, _, _ = _measure([a], math.inf, names=["a"])
    assert m.grad_norm == math.inf
    m2, _, _ = _measure([a], 2.0, names=["a"])
    assert m2.grad_norm == math.inf  # a real inf stays inf in float64


def test_meter_grouping_only_for_plain_parameters() -> None:
    params = _params()
    assert Meter(params, 2.0).groups == {(torch.device("cpu"), torch.float32): [0, 1]}

    class MyParam(torch.nn.Parameter):
        pass

    odd = MyParam(torch.ones(2))
    assert Meter([params[0], odd], 2.0).groups is None


def test_gradients_reuse_the_grouping_only_when_every_parameter_has_one() -> None:
    params = _params()
    meter = Meter(params, 2.0)
    found = meter.gradients()
    assert found is not None
    assert found[0].groups == {(torch.device("cpu"), torch.float32): [0, 1]}
    assert found[1].item() == pytest.approx(5.0)
    params[0].grad = None
    found = meter.gradients()
    assert found is not None
    assert found[0].groups is None
    assert found[1].item() == pytest.approx(4.0)
    assert meter.groups is not None  # still known for the next step


def test_a_sparse_gradient_switches_to_the_general_path_for_good() -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    w = torch.nn.Parameter(torch.ones(3))
    emb(torch.tensor([1, 3])).sum().backward()
    w.grad = torch.full((3,), 2.0)
    meter = Meter([emb.weight, w], 2.0)
    assert meter.groups is not None
    found = meter.gradients()
    assert found is not None
    assert found[0].groups is None
    assert meter.groups is None
    # 4 ones in the sparse gradient, 3 twos
    assert found[1].item() == pytest.approx(math.sqrt(4 + 12))
    assert found[0].per_tensor is not None
    assert found[0].per_tensor.tolist() == pytest.approx([2.0, math.sqrt(12)])


def test_a_complex_norm_overflowing_float32_keeps_the_moduli_in_float64() -> None:
    a = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    # |z|^2 = 8e76 each: the total 4e38 overflows float32, not float64 (nor the real parts')
    a.grad = torch.tensor([complex(2e38, 2e38), complex(2e38, 2e38)], dtype=torch.complex64)
    m, _, _ = _measure([a], names=["a"])
    assert m.grad_norm == pytest.approx(4e38, rel=1e-6)


@pytest.mark.parametrize(("norm_type", "expected"), [(2.0, math.sqrt(13.0)), (1.0, 13.0),
                                                     (math.inf, 1.0)])
def test_weights_norm_in_the_norm_of_detection(norm_type: float, expected: float) -> None:
    params = _params()  # weights: 4 and 9 ones
    meter = Meter(params, norm_type)
    found = meter.gradients()
    assert found is not None
    out = meter.weights_norm(found[0], torch.device("cpu"))
    assert out.shape == ()
    assert not out.requires_grad
    assert out.item() == pytest.approx(expected, rel=1e-6)
    # asked as a request, it is answered by the step's single host read
    _m, grads = meter.measure(1, None, NoClip(), {"w": meter.weights_norm}, names=["a", "b"])
    assert grads is not None
    assert grads.host["w"] == [pytest.approx(expected, rel=1e-6)]


# --- issue 27: HostValues on another device, dtypes of vectors, a failed add -------------------
# ``meta`` stands in for an accelerator: its tensors have a device and a dtype but no values.


def test_host_values_move_every_value_and_vector_to_their_device() -> None:
    values = HostValues(torch.device("meta"))
    assert values.device == torch.device("meta")
    values.add("f32", torch.tensor(1.0))  # float32 already: moved for its device alone
    values.add("f16", torch.tensor(2.0, dtype=torch.float16))
    values.add_vector("v", torch.tensor([1.0, 2.0]))
    assert [(v.device.type, v.dtype) for v in values._values] == [("meta", torch.float32)] * 2
    assert [(v.device.type, v.dtype) for v in values._vectors] == [("meta", torch.float32)]


def test_host_values_read_a_float64_vector_as_float32() -> None:
    values = HostValues(torch.device("cpu"))
    values.add("a", torch.tensor(0.5))
    values.add_vector("v", torch.tensor([0.1, 1.0], dtype=torch.float64))
    assert values.read() == {"a": 0.5}
    # every value travels as float32: 0.1 comes back as float32's nearest value
    assert values.vectors == {"v": [float(torch.tensor(0.1, dtype=torch.float32)), 1.0]}
    assert values.vectors["v"][0] != 0.1


def test_a_failed_add_makes_the_read_fail_rather_than_misname_the_values() -> None:
    values = HostValues(torch.device("cpu"))
    values.add("a", torch.tensor(1.0))
    with pytest.raises(RuntimeError):
        values.add("b", torch.ones(2))  # not one element: the name is queued, the value not
    values.add("c", torch.tensor(3.0))
    with pytest.raises(ValueError, match="zip"):
        values.read()  # "b" would otherwise be paired with c's value
    values.add_vector("v", torch.tensor([5.0]))
    with pytest.raises(ValueError, match="zip"):
        values.read()


def test_a_failed_add_vector_makes_the_read_fail_rather_than_misname_the_vectors() -> None:
    values = HostValues(torch.device("cpu"))
    values.add("a", torch.tensor(1.0))
    with pytest.raises(NotImplementedError):
        values.add_vector("u", torch.empty(2, device="meta"))  # no values to copy to the CPU
    values.add_vector("w", torch.tensor([7.0]))
    with pytest.raises(ValueError, match="zip"):
        values.read()  # "u" would otherwise receive w's values


# --- issue 27: Meter.measure's defaults, requests, reducer ------------------------------------


class _Doubling:
    """A reducer standing in for four ranks with equal shards: a sum partial times 4."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, partial: torch.Tensor, op: str) -> torch.Tensor:
        self.calls.append(op)
        return partial * 4.0


def test_measure_defaults_to_no_amp_overflow() -> None:
    m, _ = Meter(_params(), 2.0).measure(1, None, NoClip(), names=["a", "b"])
    assert m.amp_overflow is False


def test_a_request_is_called_with_the_gradients_and_their_device() -> None:
    seen: list[tuple[int, torch.device]] = []

    def request(grads: Gradients, device: torch.device) -> torch.Tensor:
        seen.append((len(grads.grads), device))
        return torch.tensor([1.0])

    Meter(_params(), 2.0).measure(1, None, NoClip(), {"r": request}, names=["a", "b"])
    assert seen == [(2, torch.device("cpu"))]


def test_the_reducer_reduces_total_and_weights_norm() -> None:
    params = _params()  # weights: 4 and 9 ones; gradients: norms 3 and 4
    red = _Doubling()
    meter = Meter(params, 2.0, red)
    found = meter.gradients()
    assert found is not None
    assert found[1].item() == pytest.approx(10.0)  # sqrt(4 * 25)
    assert meter.total([p.detach() for p in params], torch.device("cpu")).item() == \
        pytest.approx(2.0 * math.sqrt(13.0))
    assert meter.weights_norm(found[0], torch.device("cpu")).item() == \
        pytest.approx(2.0 * math.sqrt(13.0))
    assert red.calls == ["sum"] * 3


def test_the_reducer_reduces_the_sparse_fallback_too() -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    w = torch.nn.Parameter(torch.ones(3))
    emb(torch.tensor([1, 3])).sum().backward()
    w.grad = torch.full((3,), 2.0)
    red = _Doubling()
    meter = Meter([emb.weight, w], 2.0, red)
    m, _ = meter.measure(1, None, NoClip(), names=["e", "w"])
    assert meter.groups is None  # the general path
    assert m.grad_norm == pytest.approx(2.0 * math.sqrt(4 + 12))
    assert red.calls == ["sum"]


def test_total_passes_the_grouping_the_caller_vouches_for() -> None:
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([3.0, 4.0]), (4,),
                                     check_invariants=True)
    meter = Meter(_params(), 2.0)
    cpu = torch.device("cpu")
    assert meter.total([sparse], cpu).item() == pytest.approx(5.0)
    # a grouping vouches for dense tensors: torch refuses the sparse one it hides
    with pytest.raises(NotImplementedError):
        meter.total([sparse], cpu, groups={(cpu, torch.float32): [0]})


# --- issue 27: the unit-wise clipped total (Meter.clipped_total, Meter._scaled_norm) ----------


class _Halve(ClipPolicy):
    """A unit-wise stand-in: every gradient is one unit, halved (one clipped unit each)."""

    unitwise = True

    def threshold_value(self) -> float:
        return math.inf

    def unit_scales(self, params: Sequence[torch.nn.Parameter],
                    names: Sequence[str] | None = None) -> list[UnitScale]:
        return [UnitScale(i, torch.tensor(0.5), torch.tensor(1),
                          torch.linalg.vector_norm(p.grad).reshape(1), torch.tensor([0.5]))
                for i, p in enumerate(params) if p.grad is not None]


class _Shard(torch.Tensor):
    """A stand-in DTensor gradient: its local shard is its first row."""

    def to_local(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)[:1]


class _Subclass(torch.Tensor):
    """A tensor subclass that is no DTensor (no ``to_local``)."""


def test_a_unitwise_policy_with_no_units_reports_the_total() -> None:
    params = _params()
    m, grads = Meter(params, 2.0).measure(1, None, AdaptiveGradClip(exclude=["*"]),
                                          names=["a", "b"])
    assert grads is not None
    assert grads.unit_scales == []
    assert (m.unitwise, m.grad_norm, m.clipped_norm) == (True, pytest.approx(5.0), m.grad_norm)


@pytest.mark.parametrize(("norm_type", "expected"), [(1.0, 7.5), (3.0, (2.5**3 + 5**3) ** (1 / 3)),
                                                     (math.inf, 5.0)])
def test_unitwise_clipped_total_of_complex_gradients_by_their_moduli(
        norm_type: float, expected: float) -> None:
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    w.grad = torch.tensor([3 + 4j, 6 + 8j], dtype=torch.complex64)  # moduli 5 and 10
    m, _ = Meter([w], norm_type).measure(1, None, _Halve(), names=["w"])
    assert m.grad_norm == pytest.approx(2 * expected, rel=1e-6)
    assert m.clipped_norm == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("cls", "norm_type", "expected"), [
    (_Shard, 2.0, 2.5),  # the local shard [1.5, 2] once halved
    (_Shard, 1.0, 3.5),
    (_Subclass, 2.0, math.sqrt(125) / 2),  # no shard: the whole gradient
    (_Subclass, 1.0, 10.5),
])
def test_unitwise_clipped_norm_of_a_tensor_subclass_from_its_scaled_gradient(
        cls: type, norm_type: float, expected: float) -> None:
    w = torch.nn.Parameter(torch.ones(2, 2))
    w.grad = torch.tensor([[3.0, 4.0], [6.0, 8.0]]).as_subclass(cls)
    m, _ = Meter([w], norm_type).measure(1, None, _Halve(), names=["w"])
    assert m.grad_norm == pytest.approx(math.sqrt(125) if norm_type == 2.0 else 21.0)
    assert m.clipped_norm == pytest.approx(expected, rel=1e-6)


def _agc_case(case: str) -> tuple[list[torch.nn.Parameter], AdaptiveGradClip]:
    """One parameter with a gradient AGC clips in some units, in the dtype/layout ``case``."""
    if case == "sparse-f16":
        w = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.float16))
        w.grad = torch.sparse_coo_tensor(
            torch.tensor([[0, 2]]),
            torch.tensor([[30.0, 40.0, 1.0], [0.001, 0.002, 0.003]], dtype=torch.float16),
            (4, 3), check_invariants=True)
        return [w], AdaptiveGradClip(clipping=0.1)
    if case == "bf16":
        w = torch.nn.Parameter(torch.ones(2, 300, dtype=torch.bfloat16))
        w.grad = torch.full((2, 300), 3.0, dtype=torch.bfloat16)
        w.grad[1] = 0.01
        return [w], AdaptiveGradClip(clipping=0.3)
    dtype = torch.float64 if case == "f64" else torch.float32
    torch.manual_seed(int(case[-1]) if case.startswith("seed") else 0)
    w = torch.nn.Parameter(torch.ones(4, 50, dtype=dtype))
    w.grad = torch.randn(4, 50, dtype=dtype) * 10
    w.grad[1] *= 1e-3  # a unit under its limit
    return [w], AdaptiveGradClip(clipping=0.1)


@pytest.mark.parametrize(("case", "norm_type"), [
    ("seed0", 1.0), ("seed1", 1.0), ("seed2", 1.0), ("seed0", 3.0), ("seed0", math.inf),
    ("bf16", 1.0), ("sparse-f16", 1.0), ("f64", 1.0), ("f64", 3.0),
])
def test_unitwise_clipped_total_is_the_in_place_clips_to_the_bit(case: str,
                                                                 norm_type: float) -> None:
    """Another norm than the 2-norm: from the scaled gradient, as the apply stage scales it."""
    params, agc = _agc_case(case)
    m, _ = Meter(params, norm_type).measure(1, None, agc, names=["w"])
    agc.clip_unitwise_(params, ["w"])
    grad = params[0].grad
    assert grad is not None
    # (read as float32, as every measured value: HostValues)
    assert m.clipped_norm == grad_norms([grad], norm_type).total.float().item()
    assert m.clipped_norm < m.grad_norm


@pytest.mark.parametrize("seed", range(5))
def test_unitwise_clipped_2_norm_comes_from_the_unit_norms(seed: int) -> None:
    params, agc = _agc_case(f"seed{seed}")
    (s,) = agc.unit_scales(params, ["w"])
    m, _ = Meter(params, 2.0).measure(1, None, agc, names=["w"])
    assert m.clipped_norm == torch.linalg.vector_norm(s.unit_norms * s.unit_scale).item()
    agc.clip_unitwise_(params, ["w"])
    assert params[0].grad is not None
    assert m.clipped_norm == pytest.approx(grad_norms([params[0].grad]).total.item(), rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_unitwise_clipping_no_unit_keeps_the_per_tensor_norms_to_the_bit(seed: int) -> None:
    params, _ = _agc_case(f"seed{seed}")
    m, grads = Meter(params, 2.0).measure(1, None, AdaptiveGradClip(clipping=1e6), names=["w"])
    assert grads is not None
    assert [int(s.clipped) for s in grads.unit_scales] == [0]
    assert m.clipped_norm == m.grad_norm


def test_clipped_total_lands_where_the_per_tensor_norms_are() -> None:
    """CPU gradients (an offloaded table) whose norms were gathered on an accelerator (meta)."""
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.tensor([3.0, 4.0])
    meter = Meter([w], 2.0)
    per = torch.tensor([5.0], device="meta")
    grads = Gradients([w.grad], None, per, unit_scales=_Halve().unit_scales([w]))
    out = meter.clipped_total(grads, per.sum())
    assert (out.device.type, out.shape, out.dtype) == ("meta", torch.Size([]), torch.float32)


class _FakeShard:
    """A stand-in DTensor: ``local`` is its shard, over the process group "g0"."""

    def __init__(self, local: torch.Tensor) -> None:
        from torch.distributed.tensor import Shard

        self._local_tensor, self.placements, self.device_mesh = local, (Shard(0),), self

    def get_group(self, dim: int) -> str:
        return "g0"


def test_clipped_total_reduces_sharded_gradients_over_their_process_groups(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from lightning_gradguard.core import norms

    calls: list[object] = []

    def all_reduce(t: torch.Tensor, op: object, group: object) -> None:
        calls.append((group, op == dist.ReduceOp.SUM, t.tolist()))
        t.add_(11.0)  # the other ranks' partial statistic

    monkeypatch.setattr(norms, "_dtensor_type", lambda: _FakeShard)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.tensor([3.0, 4.0])  # the local shard
    meter = Meter([w], 2.0)
    grads = Gradients([_FakeShard(w.grad)], None, torch.tensor([5.0]),  # type: ignore[list-item]
                      unit_scales=_Halve().unit_scales([w]))
    out = meter.clipped_total(grads, torch.tensor(6.0))
    # the local shard halved: norm 2.5, partial statistic 6.25, plus the other ranks' 11
    assert calls == [("g0", True, [6.25])]
    assert out.item() == pytest.approx(math.sqrt(6.25 + 11.0))


def test_unitwise_clipped_total_is_reduced() -> None:
    params = _params()  # gradient norms 3 and 4, halved: 1.5 and 2
    red = _Doubling()
    m, _ = Meter(params, 2.0, red).measure(1, None, _Halve(), names=["a", "b"])
    assert red.calls == ["sum", "sum"]
    assert m.grad_norm == pytest.approx(10.0)
    assert m.clipped_norm == pytest.approx(5.0)  # sqrt(4 * 6.25)


def test_weights_norm_of_no_weights_is_a_zero_on_the_device_asked() -> None:
    meter = Meter([], 2.0)
    out = meter.weights_norm(Gradients([], None, None), torch.device("meta"))
    assert (out.device.type, out.shape) == ("meta", torch.Size([]))
    assert meter.weights_norm(Gradients([], None, None), torch.device("cpu")).item() == 0.0


class _HalveInFloat64(_Halve):
    """:class:`_Halve` with its factors in float64 (a policy's choice of dtype)."""

    def unit_scales(self, params: Sequence[torch.nn.Parameter],
                    names: Sequence[str] | None = None) -> list[UnitScale]:
        return [s._replace(scale=s.scale.double(), unit_scale=s.unit_scale.double())
                for s in super().unit_scales(params, names)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_clipped_total_in_the_per_tensor_norms_dtype(norm_type: float) -> None:
    params = _params()  # gradient norms 3 and 4 (L1: 6 and 12), float32
    meter = Meter(params, norm_type)
    found = meter.gradients()
    assert found is not None
    grads, total = found
    grads.unit_scales = _HalveInFloat64().unit_scales(params)
    out = meter.clipped_total(grads, total)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(2.5 if norm_type == 2.0 else 9.0)
