"""Stages that keep their word: measure only measures (components ask its single host read for
what they need, by name); apply is where state changes (here: the update control's)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradguard.core._host import host_reads, reset_host_reads
from lightning_gradguard.core.decide import decide
from lightning_gradguard.core.guard import GuardCore
from lightning_gradguard.core.update_cap import SGDUpdateCap


def _sgd_guard(**kwargs: object) -> tuple[torch.nn.Linear, GuardCore]:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=10.0)
    guard = GuardCore(net, opt, diagnose=False, max_update_ratio=0.1, **kwargs)  # type: ignore[arg-type]
    net(torch.ones(2, 4)).sum().backward()
    return net, guard


def test_measure_changes_no_state_and_apply_takes_the_values_its_limit_was_previewed_on() -> None:
    _, guard = _sgd_guard()
    cap = guard.update_control
    assert isinstance(cap, SGDUpdateCap)
    before = cap.state_dict()
    guard.counters.steps += 1  # as step() does
    reset_host_reads()
    m, grads = guard.measure()
    again, _ = guard.measure()
    assert host_reads() == 2  # one read per measurement
    assert cap.state_dict() == before  # measuring twice changed nothing
    assert m.limit == again.limit
    # the update at lr 10 moves the weights far more than 10 %: the first step arms the cap
    assert m.limit.cap < m.grad_norm
    assert grads is not None
    weights = grads.host["weight_norm"][0]
    assert weights > 0.0
    report = guard.apply(m, decide(m, guard.state(m), guard.settings), grads)
    assert cap.armed
    assert cap.weight_norm == weights
    assert cap.limit(guard.lr_scale) == m.limit
    assert report.grad_norm_clipped <= m.limit.cap * (1 + 1e-6)


def test_the_weight_norm_request_is_in_the_guards_norm_type() -> None:
    net, guard = _sgd_guard(norm_type=1.0)
    guard.step()
    l1 = sum(float(p.detach().abs().sum()) for p in net.parameters())
    cap = guard.update_control
    assert isinstance(cap, SGDUpdateCap)
    assert cap.weight_norm == pytest.approx(l1, rel=1e-6)


def test_a_snapshot_step_asks_whether_the_weights_are_finite() -> None:
    net, guard = _sgd_guard(rollback=True)
    guard.counters.steps += 1
    m, grads = guard.measure()
    assert m.params_finite is True
    assert grads is not None
    assert set(grads.host) == {"params_norm", "weight_norm"}
    with torch.no_grad():
        net.weight[0, 0] = math.inf
    m2, _ = guard.measure()
    assert m2.params_finite is False
    guard.counters.steps += 1  # not a snapshot step (snapshot_every > 1): not asked
    m3, grads3 = guard.measure()
    assert m3.params_finite is None
    assert grads3 is not None
    assert "params_norm" not in grads3.host


def _agc_guard(**kwargs: object) -> tuple[torch.nn.Sequential, GuardCore]:
    from lightning_gradguard.core.policies import AdaptiveGradClip

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = GuardCore(net, opt, clip=AdaptiveGradClip(clipping=0.01), **kwargs)  # type: ignore[arg-type]
    net(torch.ones(2, 4)).sum().mul(100.0).backward()
    return net, guard


def test_a_unitwise_policy_measures_in_measure_and_clips_in_apply() -> None:
    net, guard = _agc_guard()
    before = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    guard.counters.steps += 1  # as step() does
    reset_host_reads()
    m, grads = guard.measure()
    assert host_reads() == 1
    assert grads is not None
    assert grads.unit_scales
    for p, g in zip(net.parameters(), before, strict=True):
        assert p.grad is not None
        assert torch.equal(p.grad, g)  # measure wrote no gradient
    d = decide(m, guard.state(m), guard.settings)
    assert d.action.name == "CLIP"
    assert not d.skip
    r = guard.apply(m, d, grads)
    assert host_reads() == 1
    clipped = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in net.parameters()]))
    assert clipped.item() == pytest.approx(r.grad_norm_clipped, rel=1e-6)
    assert r.grad_norm_clipped < r.grad_norm


def test_a_skipped_step_does_not_apply_the_unit_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    net, guard = _agc_guard()
    first = next(net.parameters())
    assert first.grad is not None
    first.grad[0, 0] = math.nan
    guard.counters.steps += 1
    m, grads = guard.measure()
    assert grads is not None
    assert grads.unit_scales
    d = decide(m, guard.state(m), guard.settings)
    assert d.skip
    calls: list[object] = []
    monkeypatch.setattr(guard.meter, "clip_units_", calls.append)
    guard.apply(m, d, grads)
    assert calls == []
