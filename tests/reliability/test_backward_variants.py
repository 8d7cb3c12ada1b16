"""Gradients that reach the guard in less common ways: a finite gradient whose float32 norm
overflows under a GradScaler, a NaN loss in an earlier micro-batch of an accumulation window,
and ``manual_backward`` of a non-scalar loss with ``gradient=``."""

from __future__ import annotations

import math
from typing import Any

import torch
from support.modules import TinyModule
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.core import GuardCore
from lightning_gradguard.core.guard import Action

NAN = float("nan")


def test_huge_finite_gradient_under_scaler_is_not_left_to_it() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GuardCore(model, opt)
    for _ in range(30):
        model.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        guard.step(amp_overflow=True)
    model.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    with torch.no_grad():
        model.weight.grad.fill_(6e19)  # finite elements; the float32 norm overflows
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    report = guard.step(amp_overflow=True)
    assert report.action is not Action.AMP_SKIP
    assert report.finite
    assert math.isfinite(report.grad_norm)
    assert report.grad_norm > 1e20
    assert report.action in (Action.CLIP, Action.SKIP)
    if report.action is Action.CLIP:
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert float(total) <= report.threshold * 1.001
    assert guard.counters.amp_overflow_steps == 0


class DetachedNaNLoss(TinyModule):
    """At ``batch_idx == bad``, the loss is NaN while the gradients stay finite."""

    def __init__(self, bad: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad = bad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.bad:
            loss = loss + torch.tensor(NAN)  # a constant: no gradient reaches it
        return loss


def test_nan_loss_in_an_earlier_micro_batch_is_seen() -> None:
    guard = GradGuard()
    fit(DetachedNaNLoss(bad=4), 4, [guard], accumulate_grad_batches=2)  # window 2: 4, 5
    s = guard.summary()
    assert s["nonfinite_steps"] == 1
    assert s["skipped_steps"] == 1
    assert guard.last_reports[0].loss is not None
    assert math.isfinite(guard.last_reports[0].loss)


class PerSampleManual(TinyModule):
    """Manual optimization with ``manual_backward(per_sample_loss, gradient=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self.batch_for_step(batch)
        opt = self.optimizers()
        per_sample = (self(x) - y).pow(2).flatten()
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(per_sample, gradient=torch.full_like(per_sample, 1 / len(x)))
        opt.step()  # type: ignore[union-attr]


def test_manual_backward_with_non_scalar_loss() -> None:
    guard = GradGuard()
    fit(PerSampleManual(), 5, [guard])
    assert guard.summary()["steps"] == 5
    loss = guard.last_reports[0].loss
    assert loss is not None
    assert math.isfinite(loss)
    assert loss > 0
