from __future__ import annotations

import math
import re

import pytest
import torch
from torch.nn.utils import get_total_norm

from lightning_gradguard.core.norms import (
    GradNorms,
    collect_grads,
    grad_norms,
    group_by_device_and_dtype,
)

INF = float("inf")
NAN = float("nan")


def total_norm_ref(grads: list[torch.Tensor], p: float) -> float:
    """Float64 reference of the total p-norm of the given gradients (as stored)."""
    if not grads:
        return 0.0
    norms = []
    for g in grads:
        v = g.coalesce().values() if g.is_sparse else g
        norms.append(torch.linalg.vector_norm(v.detach().double(), p))
    return float(torch.linalg.vector_norm(torch.stack(norms), p))

# relative tolerance of a norm of values stored in `dtype` (accumulated in fp32/fp64)
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _grads(dtypes: list[torch.dtype], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (2, 3, 4), (1,), (11, 2), (4, 4)]
    return [
        torch.randn(shapes[i % len(shapes)], generator=g, dtype=torch.float64).mul(3).to(dt)
        for i, dt in enumerate(dtypes)
    ]


@pytest.mark.parametrize("p", [2.0, INF, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_get_total_norm_single_dtype(p: float, dtype: torch.dtype) -> None:
    grads = _grads([dtype] * 5)
    out = grad_norms(grads, p)
    ref = get_total_norm(grads, p)
    ref64 = total_norm_ref(grads, p)
    assert out.norm_type == p
    assert out.total.shape == ()
    assert out.total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert math.isclose(float(out.total), ref64, rel_tol=RTOL[dtype])
    # torch's own function accumulates low precision in its own dtype: loose tolerance there
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert math.isclose(float(out.total), float(ref), rel_tol=tol)
    assert bool(out.finite)


@pytest.mark.parametrize("p", [2.0, INF, 1.0])
def test_per_tensor_in_input_order_with_interleaved_dtypes(p: float) -> None:
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16,
              torch.float16]
    grads = _grads(dtypes, seed=3)
    out = grad_norms(grads, p)
    assert out.per_tensor is not None
    assert out.per_tensor.shape == (len(grads),)
    assert out.per_tensor.dtype == torch.float32
    for i, g in enumerate(grads):
        ref = float(torch.linalg.vector_norm(g.double(), p))
        assert math.isclose(float(out.per_tensor[i]), ref, rel_tol=1e-5), i
    assert math.isclose(float(out.total), total_norm_ref(grads, p), rel_tol=1e-5)
    # the total is consistent with the per-tensor norms
    assert math.isclose(float(out.total), float(torch.linalg.vector_norm(out.per_tensor, p)),
                        rel_tol=1e-6)


def test_mixed_with_fp64_promotes_result_to_fp64() -> None:
    grads = _grads([torch.float16, torch.float64, torch.float32, torch.bfloat16], seed=5)
    out = grad_norms(grads)
    assert out.total.dtype == torch.float64
    assert out.per_tensor is not None
    assert out.per_tensor.dtype == torch.float64
    assert math.isclose(float(out.total), total_norm_ref(grads, 2.0), rel_tol=1e-6)
    assert math.isclose(float(out.per_tensor[1]),
                        float(torch.linalg.vector_norm(grads[1])), rel_tol=1e-12)


def test_low_precision_accumulated_in_fp32_does_not_overflow() -> None:
    g = torch.full((1000,), 60000.0, dtype=torch.float16)  # fp16 norm would overflow (6.5e4 max)
    assert not torch.isfinite(torch.linalg.vector_norm(g))
    out = grad_norms([g])
    assert bool(out.finite)
    assert math.isclose(float(out.total), 60000.0 * math.sqrt(1000), rel_tol=1e-6)


def test_collect_grads_skips_none_and_frozen() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2),
                                torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    y = model[1](model[0](torch.ones(2, 3)))  # model[2] unused -> no grads
    y.sum().backward()
    grads = collect_grads(model.parameters())
    assert len(grads) == 3  # 0.bias, 1.weight, 1.bias
    assert all(g is not None for g in grads)
    assert grads[0] is model[0].bias.grad
    out = grad_norms(grads)
    assert math.isclose(float(out.total), float(get_total_norm(grads)), rel_tol=1e-6)


def test_no_params_and_empty() -> None:
    assert collect_grads([]) == []
    out = grad_norms([])
    assert float(out.total) == 0.0
    assert out.total.device == torch.device("cpu")
    assert out.per_tensor is not None
    assert out.per_tensor.shape == (0,)
    assert bool(out.finite)
    assert grad_norms([], per_tensor=False).per_tensor is None
    assert grad_norms([], INF).norm_type == INF
    assert grad_norms([], device=torch.device("cpu")).total.device.type == "cpu"


def test_per_tensor_false() -> None:
    out = grad_norms([torch.ones(4)], per_tensor=False)
    assert out.per_tensor is None
    assert float(out.total) == 2.0


def test_empty_tensor_grad() -> None:
    out = grad_norms([torch.zeros(0), torch.tensor([3.0, 4.0])])
    assert float(out.total) == 5.0
    assert out.per_tensor is not None
    assert out.per_tensor.tolist() == [0.0, 5.0]


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("p", [2.0, INF, 1.0])
def test_sparse_coo_uses_coalesced_values(p: float) -> None:
    # duplicate index 1: coalescing sums 3 + 4 = 7
    idx = torch.tensor([[0, 1, 1, 4]])
    vals = torch.tensor([1.0, 3.0, 4.0, -2.0])
    sp = torch.sparse_coo_tensor(idx, vals, (6,))
    assert not sp.is_coalesced()
    dense = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    out = grad_norms([dense, sp], p)
    expected_sparse = float(torch.linalg.vector_norm(sp.to_dense(), p))
    assert expected_sparse == float(torch.linalg.vector_norm(torch.tensor([1.0, 7.0, -2.0]), p))
    assert out.per_tensor is not None
    assert math.isclose(float(out.per_tensor[1]), expected_sparse, rel_tol=1e-6)
    ref = total_norm_ref([dense, sp.to_dense()], p)
    assert math.isclose(float(out.total), ref, rel_tol=1e-6)
    assert not sp.is_coalesced()  # input untouched


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")
def test_unsupported_layout_raises() -> None:
    csr = torch.eye(3).to_sparse_csr()
    with pytest.raises(TypeError, match="layout"):
        grad_norms([csr])


@pytest.mark.parametrize("p", [2.0, INF, 1.0])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_detected(p: float, bad: float, dtype: torch.dtype) -> None:
    grads = [torch.ones(3, dtype=dtype), torch.ones(4, dtype=dtype), torch.ones(2)]
    grads[1][2] = bad
    out = grad_norms(grads, p)
    assert not bool(out.finite)
    assert out.finite.dtype == torch.bool
    assert out.finite.shape == ()
    assert out.per_tensor is not None
    fin = torch.isfinite(out.per_tensor).tolist()
    assert fin == [True, False, True]
    if math.isnan(bad):
        assert math.isnan(float(out.per_tensor[1]))


@pytest.mark.parametrize("p", [2.0, INF, 1.0])
def test_subnormal_and_zero_grads_are_finite(p: float) -> None:
    grads = [torch.full((2,), 1e-40), torch.zeros(3)]  # subnormal and zeros
    out = grad_norms(grads, p)
    assert bool(out.finite)
    # same as torch (for p=2 the squares of subnormals underflow to 0 in torch too)
    assert float(out.total) == float(get_total_norm(grads, p))
    if p != 2.0:
        assert float(out.total) > 0.0


class _Reducer:
    def __init__(self, fn):  # type: ignore[no-untyped-def]
        self.fn = fn
        self.calls: list[tuple[float, str, torch.Size]] = []

    def __call__(self, partial: torch.Tensor, op: str) -> torch.Tensor:
        self.calls.append((float(partial), op, partial.shape))
        return self.fn(partial, op)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_reducer_sum_doubling(p: float) -> None:
    grads = _grads([torch.float32, torch.bfloat16, torch.float32], seed=7)
    local = float(grad_norms(grads, p).total)
    red = _Reducer(lambda t, op: t * 2)
    out = grad_norms(grads, p, reducer=red)
    assert len(red.calls) == 1
    partial, op, shape = red.calls[0]
    assert op == "sum"
    assert shape == ()
    assert math.isclose(partial, local**p, rel_tol=1e-5)  # sum of |g_i|_p^p
    assert math.isclose(float(out.total), 2 ** (1 / p) * local, rel_tol=1e-5)
    if p == 2.0:
        assert math.isclose(float(out.total), math.sqrt(2) * local, rel_tol=1e-5)
    # per-tensor norms stay local
    assert out.per_tensor is not None
    assert torch.allclose(out.per_tensor, grad_norms(grads, p).per_tensor)  # type: ignore[arg-type]


def test_reducer_max_for_inf() -> None:
    grads = [torch.tensor([1.0, -5.0]), torch.tensor([2.0]).half()]
    red = _Reducer(lambda t, op: torch.maximum(t, torch.tensor(7.0)))
    out = grad_norms(grads, INF, reducer=red)
    assert red.calls == [(5.0, "max", torch.Size([]))]
    assert float(out.total) == 7.0
    # a reducer that sees a larger remote shard maximum is not needed: local max kept
    red2 = _Reducer(lambda t, op: torch.maximum(t, torch.tensor(1.0)))
    assert float(grad_norms(grads, INF, reducer=red2).total) == 5.0


def test_reducer_called_on_empty_grads() -> None:
    red = _Reducer(lambda t, op: t + 9.0)
    out = grad_norms([], 2.0, reducer=red)
    assert red.calls == [(0.0, "sum", torch.Size([]))]
    assert float(out.total) == 9.0
    red_inf = _Reducer(lambda t, op: t + 4.0)
    assert float(grad_norms([], INF, reducer=red_inf).total) == 4.0
    assert red_inf.calls[0][1] == "max"


def test_reducer_propagates_nonfinite() -> None:
    grads = [torch.tensor([float("nan"), 1.0])]
    red = _Reducer(lambda t, op: t * 2)
    assert not bool(grad_norms(grads, reducer=red).finite)


@pytest.mark.parametrize("bad", [0, -1.0, NAN, -INF])
def test_bad_norm_type_value(bad: float) -> None:
    with pytest.raises(ValueError, match="norm_type"):
        grad_norms([torch.ones(1)], bad)


@pytest.mark.parametrize("bad", ["2", None, True])
def test_bad_norm_type_type(bad: object) -> None:
    with pytest.raises(TypeError, match="norm_type"):
        grad_norms([torch.ones(1)], bad)  # type: ignore[arg-type]


def test_group_by_device_and_dtype_first_seen_order() -> None:
    ts = [torch.ones(1).half(), torch.ones(1), torch.ones(1).half(), torch.ones(1).double(),
          torch.ones(1)]
    groups = group_by_device_and_dtype(ts)
    cpu = torch.device("cpu")
    assert list(groups.items()) == [
        ((cpu, torch.float16), [0, 2]),
        ((cpu, torch.float32), [1, 4]),
        ((cpu, torch.float64), [3]),
    ]
    assert group_by_device_and_dtype([]) == {}


def test_gradnorms_is_frozen_dataclass() -> None:
    out = grad_norms([torch.ones(1)])
    assert isinstance(out, GradNorms)
    with pytest.raises(AttributeError):
        out.total = torch.tensor(0.0)  # type: ignore[misc]


def test_grads_not_modified() -> None:
    grads = _grads([torch.float32, torch.float16], seed=11)
    before = [g.clone() for g in grads]
    grad_norms(grads)
    for a, b in zip(grads, before, strict=True):
        assert torch.equal(a, b)


# --- Sharded (DTensor) gradients, without a process group ------------------------------------
# A stand-in DTensor class (``_dtensor_type`` patched) and a stand-in ``dist.all_reduce`` that
# adds (SUM) or takes the larger of (MAX, dropping NaN as a real MAX all-reduce may) what the
# other ranks of each process group hold, so the reduction over each mesh dimension is checked
# by exact values, with the real placements of torch.distributed.tensor.


class _Group:
    def __init__(self, name: str, remote: float) -> None:
        self.name, self.remote = name, remote

    def __repr__(self) -> str:
        return self.name


class _Mesh:
    def __init__(self, *groups: _Group) -> None:
        self.groups = groups

    def get_group(self, dim: int) -> _Group:
        return self.groups[dim]


class _FakeDTensor:
    def __init__(self, local: torch.Tensor, placements: tuple, mesh: _Mesh) -> None:
        self._local_tensor, self.placements, self.device_mesh = local, placements, mesh
        self.redistributed: list[tuple] = []

    def redistribute(self, mesh: _Mesh, placements: tuple) -> _FakeDTensor:
        assert mesh is self.device_mesh
        self.redistributed.append(placements)
        # two ranks hold equal summands: the replicated value is twice the local one
        return _FakeDTensor(self._local_tensor * 2, placements, mesh)


class _AllReduce:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[float]]] = []

    def __call__(self, t: torch.Tensor, op: object, group: _Group) -> None:
        import torch.distributed as dist

        seen = [] if t.device.type == "meta" else t.tolist()
        self.calls.append((group.name, "sum" if op == dist.ReduceOp.SUM else "max", seen))
        remote = torch.full_like(t, group.remote)
        if op == dist.ReduceOp.SUM:
            t.add_(remote)
        else:
            t.copy_(torch.fmax(t, remote))


@pytest.fixture
def sharded(monkeypatch: pytest.MonkeyPatch) -> _AllReduce:
    import torch.distributed as dist

    from lightning_gradguard.core import norms

    reduce = _AllReduce()
    monkeypatch.setattr(norms, "_dtensor_type", lambda: _FakeDTensor)
    monkeypatch.setattr(dist, "all_reduce", reduce)
    return reduce


def _placements() -> tuple:
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Shard(0), Replicate(), Partial()


def test_dtensor_sum_reduced_once_per_shard_group(sharded: _AllReduce) -> None:
    shard, rep, _ = _placements()
    g0 = _Group("g0", remote=11.0)
    mesh = _Mesh(g0)
    grads = [
        _FakeDTensor(torch.tensor([3.0, 4.0]), (shard,), mesh),  # norm 5: partial 25 (+11)
        torch.tensor([1.0, 2.0]),  # plain tensor: 5, not reduced
        _FakeDTensor(torch.tensor([2.0]), (rep,), mesh),  # replicated: 4, not reduced
        _FakeDTensor(torch.tensor([0.0, 3.0]), (shard,), mesh),  # 9, with the first shard
    ]
    out = grad_norms(grads, 2.0)  # type: ignore[arg-type]
    assert sharded.calls == [("g0", "sum", [34.0])]
    assert out.total.item() == pytest.approx(math.sqrt(34.0 + 11.0 + 5.0 + 4.0), rel=1e-6)
    assert out.per_tensor is not None
    assert out.per_tensor.tolist() == pytest.approx([5.0, math.sqrt(5.0), 2.0, 3.0])
    assert out.norm_type == 2.0


def test_dtensor_p1_partial_statistic_is_the_sum_of_norms(sharded: _AllReduce) -> None:
    shard, _, _ = _placements()
    mesh = _Mesh(_Group("g0", remote=4.0))
    grads = [_FakeDTensor(torch.tensor([3.0, -4.0]), (shard,), mesh), torch.tensor([-2.0])]
    out = grad_norms(grads, 1.0)  # type: ignore[arg-type]
    assert sharded.calls == [("g0", "sum", [7.0])]
    assert out.total.item() == 7.0 + 4.0 + 2.0


def test_dtensor_two_mesh_dimensions_each_group_reduced(sharded: _AllReduce) -> None:
    shard, rep, _ = _placements()
    ga, gb = _Group("ga", remote=100.0), _Group("gb", remote=1000.0)
    mesh = _Mesh(ga, gb)
    grads = [
        _FakeDTensor(torch.tensor([1.0]), (rep, shard), mesh),  # over gb only: 1
        _FakeDTensor(torch.tensor([2.0]), (shard, shard), mesh),  # over ga and gb: 4
        _FakeDTensor(torch.tensor([3.0]), (shard, rep), mesh),  # over ga only: 9
        torch.tensor([4.0]),  # plain: 16
        _FakeDTensor(torch.tensor([5.0]), (shard, shard), mesh),  # with the second: 25
    ]
    out = grad_norms(grads, 2.0)  # type: ignore[arg-type]
    # statistics in first-seen order: (gb,) 1, (ga, gb) 29, (ga,) 9, () 16;
    # groups in first-seen order gb, ga; each all-reduce carries the statistics it spans
    assert sharded.calls == [("gb", "sum", [1.0, 29.0]), ("ga", "sum", [29.0 + 1000.0, 9.0])]
    expected = (1.0 + 1000.0) + (29.0 + 1000.0 + 100.0) + (9.0 + 100.0) + 16.0
    assert out.total.item() == pytest.approx(math.sqrt(expected), rel=1e-6)


def test_dtensor_inf_norm_max_reduced(sharded: _AllReduce) -> None:
    shard, rep, _ = _placements()
    mesh = _Mesh(_Group("g0", remote=7.0))
    grads = [
        _FakeDTensor(torch.tensor([1.0, -3.0]), (shard,), mesh),
        _FakeDTensor(torch.tensor([-2.0]), (shard,), mesh),
        torch.tensor([5.0, -6.0]),
    ]
    out = grad_norms(grads, INF)  # type: ignore[arg-type]
    assert sharded.calls == [("g0", "max", [3.0])]
    assert out.total.item() == 7.0  # the remote shard's maximum
    mesh_low = _Mesh(_Group("g1", remote=0.5))
    grads[0] = _FakeDTensor(torch.tensor([1.0, -3.0]), (shard,), mesh_low)
    grads[1] = _FakeDTensor(torch.tensor([-2.0]), (rep,), mesh_low)
    assert grad_norms(grads, INF).total.item() == 6.0  # type: ignore[arg-type]


def test_dtensor_inf_norm_nan_shard_stays_nonfinite(sharded: _AllReduce) -> None:
    shard, _, _ = _placements()
    mesh = _Mesh(_Group("g0", remote=7.0))
    grads = [
        _FakeDTensor(torch.tensor([1.0, NAN]), (shard,), mesh),
        _FakeDTensor(torch.tensor([2.0]), (shard,), mesh),
        torch.tensor([5.0]),
    ]
    out = grad_norms(grads, INF)  # type: ignore[arg-type]
    # the NaN group goes out as +inf (a MAX all-reduce may drop a NaN) and stays inf
    assert sharded.calls == [("g0", "max", [INF])]
    assert out.total.item() == INF
    assert not bool(out.finite)


def test_dtensor_inf_norm_nan_in_plain_tensor(sharded: _AllReduce) -> None:
    shard, _, _ = _placements()
    mesh = _Mesh(_Group("g0", remote=7.0))
    grads = [_FakeDTensor(torch.tensor([1.0]), (shard,), mesh), torch.tensor([NAN, 1.0])]
    out = grad_norms(grads, INF)  # type: ignore[arg-type]
    assert sharded.calls == [("g0", "max", [1.0])]
    # NaN statistics become +inf before the all-reduces, the unsharded one included
    assert out.total.item() == INF


def test_dtensor_partial_made_replicate_first(sharded: _AllReduce) -> None:
    shard, rep, partial = _placements()
    g0, g1 = _Group("g0", remote=10.0), _Group("g1", remote=20.0)
    mesh = _Mesh(g0, g1)
    pending = _FakeDTensor(torch.tensor([3.0]), (partial, shard), mesh)
    out = grad_norms([pending, torch.tensor([1.0])], 2.0)  # type: ignore[list-item]
    assert pending.redistributed == [(rep, shard)]
    # the replicated value is 6 (two summands of 3), reduced over g1 only (dimension 1)
    assert sharded.calls == [("g1", "sum", [36.0])]
    assert out.total.item() == pytest.approx(math.sqrt(36.0 + 20.0 + 1.0), rel=1e-6)
    assert out.per_tensor is not None
    assert out.per_tensor.tolist() == [6.0, 1.0]


def test_dtensor_with_reducer_applied_last(sharded: _AllReduce) -> None:
    shard, _, _ = _placements()
    mesh = _Mesh(_Group("g0", remote=5.0))
    grads = [_FakeDTensor(torch.tensor([3.0, 4.0]), (shard,), mesh), torch.tensor([2.0])]
    red = _Reducer(lambda t, op: t * 3)
    out = grad_norms(grads, 2.0, reducer=red)  # type: ignore[arg-type]
    assert red.calls == [(25.0 + 5.0 + 4.0, "sum", torch.Size([]))]
    assert out.total.item() == pytest.approx(math.sqrt(3 * 34.0), rel=1e-6)
    red_inf = _Reducer(lambda t, op: t + 0.5)
    out_inf = grad_norms(grads, INF, reducer=red_inf)  # type: ignore[arg-type]
    assert red_inf.calls == [(5.0, "max", torch.Size([]))]
    assert out_inf.total.item() == 5.5


def test_dtensor_replicated_only_no_all_reduce(sharded: _AllReduce) -> None:
    _, rep, _ = _placements()
    mesh = _Mesh(_Group("g0", remote=5.0))
    grads = [_FakeDTensor(torch.tensor([3.0, 4.0]), (rep,), mesh), torch.tensor([12.0])]
    out = grad_norms(grads, 2.0)  # type: ignore[arg-type]
    assert sharded.calls == []
    assert out.total.item() == 13.0
    assert grad_norms(grads, INF).total.item() == 12.0  # type: ignore[arg-type]
    assert sharded.calls == []


def test_plain_tensors_do_not_look_up_dtensor(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_gradguard.core import norms

    def boom() -> None:
        raise AssertionError("DTensor looked up for plain tensors")

    monkeypatch.setattr(norms, "_dtensor_type", boom)
    assert grad_norms([torch.tensor([3.0, 4.0])]).total.item() == 5.0


def test_tensor_subclass_that_is_not_a_dtensor(sharded: _AllReduce) -> None:
    class Sub(torch.Tensor):
        pass

    g = torch.tensor([3.0, 4.0]).as_subclass(Sub)
    out = grad_norms([g, torch.tensor([12.0])])
    assert sharded.calls == []
    assert out.total.item() == 13.0


def test_unsupported_layout_message_exact() -> None:
    csr = torch.eye(3).to_sparse_csr()
    msg = ("gradients with layout torch.sparse_csr are not supported; "
           "supported: dense (torch.strided) and sparse COO gradients")
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        grad_norms([csr])


@pytest.mark.parametrize("p", [2.0, INF])
def test_no_grads_float32_on_the_requested_device(p: float, float64_default: None) -> None:
    out = grad_norms([], p, device=torch.device("meta"))
    assert out.total.device.type == "meta"
    assert out.total.dtype == torch.float32
    assert out.total.shape == ()
    assert out.per_tensor is not None
    assert out.per_tensor.device.type == "meta"
    assert out.per_tensor.dtype == torch.float32
    assert out.per_tensor.shape == (0,)
    cpu = grad_norms([], p)
    assert cpu.total.device.type == "cpu"
    assert cpu.total.dtype == torch.float32
    assert cpu.total.item() == 0.0
    assert cpu.per_tensor is not None
    assert cpu.per_tensor.dtype == torch.float32
    assert grad_norms([], p, per_tensor=False).per_tensor is None


def test_mixed_devices_reduced_on_the_accelerator() -> None:
    # "meta" stands in for an accelerator: the CPU norms go there, never the other way
    grads = [torch.ones(3), torch.ones(2, device="meta"), torch.ones(4, dtype=torch.float16)]
    out = grad_norms(grads)
    assert out.total.device.type == "meta"
    assert out.per_tensor is not None
    assert out.per_tensor.device.type == "meta"
    out2 = grad_norms([grads[1], grads[0]])
    assert out2.total.device.type == "meta"


def test_result_device_of_cpu_only_or_nothing() -> None:
    from lightning_gradguard.core.norms import _result_device

    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert _result_device([cpu, meta]) == meta
    assert _result_device([meta, cpu]) == meta
    assert _result_device([cpu, cpu]) == cpu
    assert _result_device([]) == cpu


@pytest.mark.parametrize("p", [2.0, INF])
def test_dtensor_float64_statistics_stay_float64(sharded: _AllReduce, p: float) -> None:
    shard, _, _ = _placements()
    mesh = _Mesh(_Group("g0", remote=0.0))
    grads = [_FakeDTensor(torch.tensor([3.0, 4.0], dtype=torch.float64), (shard,), mesh),
             torch.tensor([1e-20], dtype=torch.float64)]
    out = grad_norms(grads, p)  # type: ignore[arg-type]
    assert out.total.dtype == torch.float64
    assert out.total.item() == (5.0 if p == 2.0 else 4.0)


@pytest.mark.parametrize("p", [2.0, INF])
def test_dtensor_statistics_stay_on_the_gradients_device(sharded: _AllReduce, p: float) -> None:
    # "meta" stands in for an accelerator: every helper tensor (indices, partial statistics,
    # NaN counts) is made on the gradients' device, or torch refuses to mix them
    shard, rep, _ = _placements()
    ga, gb = _Group("ga", remote=1.0), _Group("gb", remote=2.0)
    mesh = _Mesh(ga, gb)
    meta = torch.device("meta")
    grads = [
        _FakeDTensor(torch.ones(3, device=meta), (shard, rep), mesh),
        _FakeDTensor(torch.ones(2, device=meta), (rep, shard), mesh),
        torch.ones(4, device=meta),
    ]
    sharded.calls.clear()
    out = grad_norms(grads, p)  # type: ignore[arg-type]
    assert out.total.device == meta
    assert out.total.shape == ()
    assert [name for name, _, _ in sharded.calls] == ["ga", "gb"]


def test_no_grads_on_the_cpu_by_default_whatever_the_default_device() -> None:
    torch.set_default_device("meta")
    try:
        out = grad_norms([])
    finally:
        torch.set_default_device(None)
    assert out.total.device.type == "cpu"
    assert out.total.item() == 0.0
    assert out.per_tensor is not None
    assert out.per_tensor.device.type == "cpu"
