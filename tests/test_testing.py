"""``lightning_gradguard.testing``: where and when each kind of fault lands."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support.modules import TinyModule
from support.state import params_of
from support.trainer import fit

from lightning_gradguard.testing import Fault, FaultInjector

STEPS = 6
FAULT_STEP = 3
FACTOR = 1e3


class Weights(Callback):
    """The weights at ``on_before_optimizer_step`` (``before_update``) and at the end of the
    batch (``at_end``, as this callback sees them), keyed by the optimizer step."""

    def __init__(self) -> None:
        self.before_update: dict[int, list[torch.Tensor]] = {}
        self.at_end: dict[int, list[torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.before_update[trainer.global_step] = params_of(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.at_end[trainer.global_step - 1] = params_of(pl_module)


def test_param_fault_lands_right_after_its_optimizer_step() -> None:
    """``Fault(step=k, target="param")`` corrupts the weights the update of step ``k`` left,
    at the end of that batch: not before step ``k``'s update, not a step early or late."""
    first, last = Weights(), Weights()  # listed before and after the injector
    injector = FaultInjector([Fault(FAULT_STEP, kind="scale", factor=FACTOR, target="param",
                                    params="net.0.weight")])
    fit(TinyModule(), STEPS, [first, injector, last])
    assert injector.injected == [(FAULT_STEP, "param", "scale")]
    assert sorted(first.at_end) == sorted(last.at_end) == list(range(STEPS))
    for step in range(STEPS):
        clean, seen = first.at_end[step], last.at_end[step]
        if step == FAULT_STEP:
            assert torch.equal(seen[0], clean[0] * FACTOR)  # net.0.weight only
            assert all(torch.equal(a, b) for a, b in zip(seen[1:], clean[1:], strict=True))
        else:
            assert all(torch.equal(a, b) for a, b in zip(seen, clean, strict=True)), step
    # the update of the fault's step saw clean weights; the next one the corrupted ones
    big = float(first.at_end[FAULT_STEP][0].abs().max()) * 10
    assert float(last.before_update[FAULT_STEP][0].abs().max()) < big
    assert float(last.before_update[FAULT_STEP + 1][0].abs().max()) > big


def test_param_nan_fault_is_seen_from_the_next_step_on() -> None:
    seen = Weights()
    injector = FaultInjector([Fault(FAULT_STEP, target="param")])
    fit(TinyModule(), STEPS, [injector, seen])
    finite = {s: all(bool(torch.isfinite(p).all()) for p in seen.before_update[s])
              for s in range(STEPS)}
    assert finite == {s: s <= FAULT_STEP for s in range(STEPS)}


class LossAndGrads(Callback):
    """Listed after the injector: the loss backward starts from and the gradients it left."""

    def __init__(self) -> None:
        self.loss: dict[int, torch.Tensor] = {}
        self.grads: dict[int, list[torch.Tensor]] = {}

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        self.loss[trainer.global_step] = loss.detach().clone()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.grads[trainer.global_step] = [p.grad.detach().clone()
                                           for p in pl_module.parameters()
                                           if p.grad is not None]


@pytest.mark.parametrize("target", ["loss", "grad"])
@pytest.mark.parametrize("kind", ["nan", "inf", "scale"])
def test_loss_and_grad_faults_put_in_the_value_of_their_kind(kind: str, target: str) -> None:
    """NaN is NaN, Inf is +Inf, scale multiplies by ``factor``: in the loss (and so every
    gradient) or, for a gradient fault, in the first element of each matching gradient."""
    step = 2
    clean, seen = LossAndGrads(), LossAndGrads()
    fit(TinyModule(), step + 1, [clean])
    injector = FaultInjector([Fault(step, kind=kind, target=target, factor=FACTOR,
                                    params="net.0.*")])
    fit(TinyModule(), step + 1, [injector, seen])
    assert injector.injected == [(step, target, kind)]
    for s in range(step):
        assert torch.equal(seen.loss[s], clean.loss[s])
    loss, ref = seen.loss[step], clean.loss[step]
    grads, ref_grads = seen.grads[step], clean.grads[step]
    if target == "loss":
        if kind == "scale":
            assert torch.equal(loss, ref * FACTOR)
            for g, r in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(g, r * FACTOR)
        else:
            assert bool(loss.isnan()) if kind == "nan" else bool(loss.isposinf())
        return
    assert torch.equal(loss, ref)  # a gradient fault leaves the loss alone
    names = [n for n, _ in TinyModule().named_parameters()]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        if not name.startswith("net.0."):
            assert torch.equal(g, r), name
        elif kind == "scale":
            assert torch.equal(g, r * FACTOR), name
        else:
            first = g.reshape(-1)[0]
            assert bool(first.isnan()) if kind == "nan" else bool(first.isposinf()), name
            assert torch.equal(g.reshape(-1)[1:], r.reshape(-1)[1:]), name
