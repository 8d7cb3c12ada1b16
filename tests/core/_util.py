"""Shared helpers for the core tests (deterministic, CPU only)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import HealthCheck, settings

#: Hypothesis settings for every property test: modest, deterministic, no deadline.
HYP = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def tiny_model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        y = x @ w + 0.1 * torch.randn(16, 1, generator=g)
        out.append((x, y))
    return out


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def clone_params(params: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def clone_opt_state(opt: torch.optim.Optimizer) -> dict[Any, Any]:
    return copy.deepcopy(opt.state_dict())


def assert_params_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def assert_opt_state_equal(a: dict[Any, Any], b: dict[Any, Any]) -> None:
    """Bit-identical optimizer ``state_dict()["state"]`` (tensors and Python values)."""
    sa, sb = a["state"], b["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), k
        for name in sa[k]:
            va, vb = sa[k][name], sb[k][name]
            if isinstance(va, torch.Tensor):
                assert isinstance(vb, torch.Tensor)
                assert va.dtype == vb.dtype, (k, name)
                assert torch.equal(va, vb), (k, name)
            else:
                assert va == vb, (k, name)


def total_norm_ref(grads: list[torch.Tensor], p: float) -> float:
    """Float64 reference of the total p-norm of the given gradients (as stored)."""
    if not grads:
        return 0.0
    norms = []
    for g in grads:
        v = g.coalesce().values() if g.is_sparse else g
        norms.append(torch.linalg.vector_norm(v.detach().double(), p))
    return float(torch.linalg.vector_norm(torch.stack(norms), p))


def assert_state_equal(a: Any, b: Any, path: str = "") -> None:
    """Recursive equality of state dicts (tensors bit-identical, NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype, path
        assert a.shape == b.shape, path
        if a.is_floating_point():
            assert torch.equal(torch.isnan(a), torch.isnan(b)), path
            assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), path
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict), path
        assert a.keys() == b.keys(), path
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)), path
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float), path
        assert b != b, path
    else:
        assert a == b, path
