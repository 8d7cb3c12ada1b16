from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from support.state import assert_state_equal, opt_tensors, params_of

from lightning_gradguard.core.clip import clip_coef, scale_grads_, skip_step_
from lightning_gradguard.core.norms import grad_norms

INF = float("inf")


# ----------------------------------------------------------------------------- clip_coef
@pytest.mark.parametrize(
    ("norm", "thr", "eps", "expected"),
    [
        (10.0, 2.0, 0.0, 0.2),
        (10.0, 2.0, 1e-6, 2.0 / (10.0 + 1e-6)),
        (2.0, 2.0, 1e-6, 1.0),  # at the threshold: untouched
        (1.0, 2.0, 1e-6, 1.0),
        (0.0, 2.0, 1e-6, 1.0),
        (1e30, INF, 1e-6, 1.0),  # inf threshold: never clip
        (4.0, 0.0, 0.0, 0.0),
    ],
)
def test_clip_coef_values(norm: float, thr: float, eps: float, expected: float) -> None:
    assert clip_coef(norm, thr, eps) == expected


@pytest.mark.parametrize("norm", [float("nan"), INF, -INF])
def test_clip_coef_refuses_nonfinite(norm: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        clip_coef(norm, 1.0)


@pytest.mark.parametrize("norm", [1e-8, 0.5, 1.0, 3.0, 1e6, 1e30])
@pytest.mark.parametrize("thr", [1e-6, 1.0, 100.0])
def test_clip_coef_in_unit_interval(norm: float, thr: float) -> None:
    c = clip_coef(norm, thr)
    assert 0.0 <= c <= 1.0
    if norm > thr:
        assert c * norm <= thr * (1 + 1e-12)
    else:
        assert c == 1.0


def test_clip_matches_clip_grad_norm() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(5, 3) * 10, torch.randn(7) * 10]
    ref = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref]
    for p, g in zip(params, ref, strict=True):
        p.grad = g.clone()
    max_norm = 1.5
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
    norm = float(grad_norms(grads).total)
    scale_grads_(grads, clip_coef(norm, max_norm))
    for p, g in zip(params, grads, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-6, atol=0)  # type: ignore[arg-type]
    assert math.isclose(float(grad_norms(grads).total), max_norm, rel_tol=1e-5)


# ----------------------------------------------------------------------------- scale_grads_
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("coef", [0.25, torch.tensor(0.25)], ids=["float", "tensor"])
def test_scale_grads_mixed_dtypes_and_sparse(coef: float | torch.Tensor) -> None:
    g = torch.Generator().manual_seed(0)
    dense = [
        torch.randn(3, 4, generator=g),
        torch.randn(5, generator=g).to(torch.bfloat16),
        torch.randn(2, 2, generator=g).to(torch.float16),
        torch.randn(6, generator=g).double(),
        torch.randn(4, generator=g),
    ]
    sp = torch.sparse_coo_tensor(torch.tensor([[0, 2, 2]]), torch.tensor([1.0, 2.0, 4.0]), (5,))
    grads = [*dense, sp]
    before = [t.clone() for t in grads]
    ids = [id(t) for t in grads]
    scale_grads_(grads, coef)
    assert [id(t) for t in grads] == ids  # in place
    for new, old in zip(grads, before, strict=True):
        assert new.dtype == old.dtype
        assert new.is_sparse == old.is_sparse
        if new.is_sparse:
            assert torch.equal(new.to_dense(), old.to_dense() * 0.25)
        else:
            assert torch.equal(new, old * 0.25)  # 0.25 is exact in every dtype


def test_scale_grads_empty_and_one() -> None:
    scale_grads_([], 0.5)
    g = [torch.tensor([1.0, 3.0])]
    scale_grads_(g, 1.0)
    assert g[0].tolist() == [1.0, 3.0]
    scale_grads_(g, 0.0)
    assert g[0].tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- skip_step_
OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov_foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                                      foreach=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, foreach=False),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, foreach=False),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.01, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "rmsprop_momentum_centered": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9,
                                                               centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "adadelta": lambda p: torch.optim.Adadelta(p),
}


def _warm(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = OPTIMIZERS[name](list(model.parameters()))
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    return model, opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_skip_step_makes_optimizer_step_a_noop(name: str) -> None:
    model, opt = _warm(name)
    params = params_of(model)
    state = opt_tensors(opt)
    if name != "sgd":  # plain SGD keeps no state
        assert state["state"], "optimizer must have state after warm steps"
    skip_step_(model.parameters())
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    assert_state_equal(params_of(model), params)
    assert_state_equal(opt.state_dict()["state"], state["state"])


@pytest.mark.parametrize(
    "name", ["adam", "adamw_fused", "sgd_momentum", "rmsprop_momentum_centered"]
)
def test_zeroing_grads_is_not_a_skip(name: str) -> None:
    """Sanity check of the comparison above: a zero gradient does change things."""
    model, opt = _warm(name)
    params = params_of(model)
    state = opt_tensors(opt)
    for p in model.parameters():
        p.grad.zero_()  # type: ignore[union-attr]
    opt.step()
    now = params_of(model)
    moved = not all(torch.equal(a, b) for a, b in zip(now, params, strict=True))
    with pytest.raises(AssertionError):
        assert_state_equal(opt.state_dict()["state"], state["state"])
    assert moved


def test_skip_step_on_generator_and_no_grads() -> None:
    ps = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    ps[0].grad = torch.ones(2)
    skip_step_(p for p in ps)
    assert all(p.grad is None for p in ps)
    skip_step_([])
