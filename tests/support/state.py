"""Copies and comparisons of parameters, optimizer state and guard state."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch


def params_of(module: torch.nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of a module's parameters (or of the given tensors), in order."""
    params = module.parameters() if isinstance(module, torch.nn.Module) else module
    return [p.detach().clone() for p in params]


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def opt_tensors(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of the optimizer's ``state_dict()`` (state tensors and param groups)."""
    return copy.deepcopy(opt.state_dict())


def policy_state(guard: Any, idx: int = 0) -> dict[str, Any]:
    """``GuardCore.state_dict()`` of a ``GradGuard``'s ``idx``-th optimizer."""
    return guard.cores[idx].state_dict()  # type: ignore[no-any-return]


def assert_state_equal(a: Any, b: Any, path: str = "") -> None:
    """Equal nested state (dicts, lists, tuples, tensors, Python values), bit for bit.

    Dicts must have the same keys, sequences the same length (a list may equal a tuple),
    tensors the same dtype, shape and values (``torch.equal``).

    NaN rule: a NaN equals a NaN in the same place -- a float NaN equals a float NaN, and
    a floating-point tensor's NaNs must sit at the same positions, its other values
    bit-identical (other tensors: ``torch.equal``). A state holding NaN (say, a skipped
    step's statistics) thus equals its exact copy, while a NaN against a number still fails.
    ``path`` names the first difference in the assertion message.
    """
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
            assert_state_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)), path
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float), path
        assert math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def assert_state_close(a: Any, b: Any, path: str = "", rtol: float = 1e-5,
                       atol: float = 1e-7) -> None:
    """Like :func:`assert_state_equal`, tensors compared in float64 with
    ``allclose(rtol, atol)``; the same NaN rule (NaN equals NaN in the same place)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol,
                              equal_nan=True), (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict), path
        assert a.keys() == b.keys(), path
        for k in a:
            assert_state_close(a[k], b[k], f"{path}/{k}", rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_close(x, y, f"{path}[{i}]", rtol, atol)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), (path, a, b)
    else:
        assert a == b, (path, a, b)
