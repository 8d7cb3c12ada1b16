from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch

from lightning_gradguard.core.backoff import LRBackoff, LRScaler

# ----------------------------------------------------------------------------- LRBackoff


def test_defaults() -> None:
    b = LRBackoff()
    assert b.scale == 1.0
    assert b.backoffs == 0
    b.recover()
    assert b.scale == 1.0


def test_docstring_math() -> None:
    b = LRBackoff(factor=0.5, recovery_steps=2)
    b.backoff()
    assert b.scale == 0.5
    b.recover()
    assert math.isclose(b.scale, math.sqrt(0.5), rel_tol=1e-12)
    b.recover()
    assert b.scale == 1.0


@pytest.mark.parametrize(("factor", "steps", "k"),
                         [(0.5, 4, 2), (0.3, 7, 3), (0.9, 200, 1), (0.5, 200, 4), (0.1, 1, 2)])
def test_exact_scale_after_backoffs_and_recovery(factor: float, steps: int, k: int) -> None:
    b = LRBackoff(factor=factor, recovery_steps=steps, min_scale=1e-9)
    for _ in range(k):
        b.backoff()
    assert b.backoffs == k
    assert math.isclose(b.scale, factor**k, rel_tol=1e-12)
    growth = factor ** (-1.0 / steps)
    expected = factor**k
    n = 0
    while b.scale < 1.0:
        b.recover()
        n += 1
        expected = min(1.0, expected * growth)
        if b.scale < 1.0:
            assert math.isclose(b.scale, expected, rel_tol=1e-9)
        assert n <= k * steps
    # one backoff is undone after exactly `recovery_steps` clean steps, and the scale lands on
    # exactly 1.0 (not 0.9999999 or 1.0000001)
    assert n == k * steps
    assert b.scale == 1.0
    b.recover()
    assert b.scale == 1.0
    assert b.backoffs == k  # recovery does not erase the count


def test_backoff_after_partial_recovery() -> None:
    b = LRBackoff(factor=0.5, recovery_steps=2)
    b.backoff()
    b.recover()
    b.backoff()
    assert math.isclose(b.scale, 0.5 * math.sqrt(2) * 0.5, rel_tol=1e-12)


def test_min_scale_floor() -> None:
    b = LRBackoff(factor=0.5, recovery_steps=3, min_scale=0.1)
    for _ in range(5):
        b.backoff()
    assert b.scale == 0.1
    assert b.backoffs == 5
    b.backoff()
    assert b.scale == 0.1
    # recovering from the floor: ceil(log(1/0.1) / log(2) * 3) = 10 steps
    n = 0
    while b.scale < 1.0:
        b.recover()
        n += 1
    assert n == math.ceil(math.log(10) / math.log(2) * 3)
    assert b.scale == 1.0


def test_min_scale_one_disables_backoff_effect() -> None:
    b = LRBackoff(min_scale=1.0)
    b.backoff()
    assert b.scale == 1.0
    assert b.backoffs == 1


@pytest.mark.parametrize("through_disk", [False, True])
def test_state_dict_round_trip(through_disk: bool) -> None:
    a = LRBackoff(factor=0.5, recovery_steps=5)
    a.backoff()
    a.backoff()
    a.recover()
    sd = a.state_dict()
    assert sd == {"scale": a.scale, "backoffs": 2}
    if through_disk:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    b = LRBackoff(factor=0.5, recovery_steps=5)
    b.load_state_dict(sd)
    for op in ["recover"] * 3 + ["backoff"] + ["recover"] * 12:
        getattr(a, op)()
        getattr(b, op)()
        assert a.scale == b.scale
    assert a.backoffs == b.backoffs == 3


def test_reset() -> None:
    b = LRBackoff()
    b.backoff()
    b.reset()
    assert b.scale == 1.0
    assert b.backoffs == 0


# ----------------------------------------------------------------------------- LRScaler


def _sgd(lr: float | torch.Tensor = 0.1, **kw: object) -> tuple[torch.nn.Parameter,
                                                              torch.optim.Optimizer]:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    return p, torch.optim.SGD([p], lr=lr, **kw)  # type: ignore[arg-type]


def test_update_uses_scaled_lr_and_lr_restored_after_step() -> None:
    p, opt = _sgd(0.1)
    scaler = LRScaler(opt)
    g = torch.tensor([0.5, 1.0, -4.0])
    p.grad = g.clone()
    before = p.detach().clone()
    scaler.apply(0.25)
    assert opt.param_groups[0]["lr"] == 0.1 * 0.25
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.1  # exactly restored
    expected = before - (0.1 * 0.25) * g
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-7)
    unscaled = before - 0.1 * g
    assert not torch.allclose(p.detach(), unscaled)
    # the scale applies to one update only
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    assert torch.allclose(p.detach(), before - 0.1 * g, rtol=0, atol=1e-7)


def test_apply_does_not_compound_and_one_is_noop() -> None:
    _, opt = _sgd(0.1)
    scaler = LRScaler(opt)
    scaler.apply(0.5)
    scaler.apply(0.5)
    assert opt.param_groups[0]["lr"] == 0.05
    scaler.apply(1.0)
    assert opt.param_groups[0]["lr"] == 0.1
    scaler.restore()
    scaler.restore()
    assert opt.param_groups[0]["lr"] == 0.1


def test_multiple_param_groups() -> None:
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.02}])
    scaler = LRScaler(opt)
    scaler.apply(0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.01]
    a.grad = torch.ones(2)
    b.grad = torch.ones(2)
    opt.step()
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]
    assert torch.allclose(a.detach(), torch.full((2,), 0.95))
    assert torch.allclose(b.detach(), torch.full((2,), 0.99))


def test_tensor_lr_scaled_in_place_and_restored() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    lr = torch.tensor(0.01)
    opt = torch.optim.Adam([p], lr=lr)
    scaler = LRScaler(opt)
    lr_obj = opt.param_groups[0]["lr"]
    scaler.apply(0.5)
    assert opt.param_groups[0]["lr"] is lr_obj  # same tensor, modified in place
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.005)
    p.grad = torch.ones(2)
    opt.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == float(torch.tensor(0.01))
    # Adam's first step moves by ~lr: the scaled one
    assert torch.allclose(p.detach(), torch.full((2,), 1 - 0.005), atol=1e-6)


def test_remove_restores_lr() -> None:
    p, opt = _sgd(0.1)
    scaler = LRScaler(opt)
    scaler.apply(0.5)
    scaler.remove()
    assert opt.param_groups[0]["lr"] == 0.1
    p.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.1
    assert torch.allclose(p.detach(), torch.tensor([0.9, -2.1, 2.9]))


def test_two_scalers_of_one_optimizer_multiply_and_restore_once() -> None:
    p, opt = _sgd(0.1)
    a, b = LRScaler(opt), LRScaler(opt)
    a.apply(0.5)
    b.apply(0.25)
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5 * 0.25
    a.apply(0.5)  # re-applying does not compound
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5 * 0.25
    p.grad = torch.ones(3)
    before = p.detach().clone()
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.1
    assert torch.allclose(p.detach(), before - 0.1 * 0.125, rtol=0, atol=1e-7)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "exponential": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7),
    "multiplicative": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda e: 0.95),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=20),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_sees_only_its_own_values(name: str) -> None:
    def run(scales: list[float] | None) -> tuple[list[float], list[float]]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        sched = SCHEDULERS[name](opt)
        scaler = LRScaler(opt) if scales is not None else None
        lrs, used = [], []
        for t in range(12):
            p.grad = torch.full((3,), 0.1 * (t + 1))
            if scaler is not None and scales is not None:
                scaler.apply(scales[t])
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()  # type: ignore[attr-defined]
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, used

    scales = [0.5, 0.25, 1.0, 0.3, 0.3, 0.7, 1.0, 0.125, 0.9, 1.0, 1.0, 0.5]
    ref_lrs, ref_used = run(None)
    lrs, used = run(scales)
    assert lrs == ref_lrs  # exactly the unguarded schedule
    for u, r, s in zip(used, ref_used, scales, strict=True):
        assert u == r * s


# ------------------------------------------------------------------ defaults and no-op scale
def test_backoff_documented_defaults() -> None:
    b = LRBackoff()
    assert (b.factor, b.recovery_steps, b.min_scale) == (0.5, 200, 1e-3)


def test_scale_one_leaves_a_later_lr_change_alone() -> None:
    # apply(1.0) is a no-op: it saves nothing the step post-hook could put back
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.1)
    LRScaler(opt).apply(1.0)
    opt.param_groups[0]["lr"] = 0.2  # e.g. the user's own LR change
    p.grad = torch.ones(1)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.2
    assert p.item() == pytest.approx(0.8)


def test_lr_scaler_keeps_its_optimizer() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    assert LRScaler(opt).optimizer is opt


def test_scale_one_keeps_the_scheduled_lr_object() -> None:
    # A total scale of exactly 1 writes back the scheduled LR itself, not ``lr * 1.0``: an
    # integer LR stays an int (and a float subclass its class).
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1)
    scaler = LRScaler(opt)
    scaler.apply(0.5)
    assert opt.param_groups[0]["lr"] == 0.5
    scaler.apply(1.0)
    assert type(opt.param_groups[0]["lr"]) is int
    assert opt.param_groups[0]["lr"] == 1
