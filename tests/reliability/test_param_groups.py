"""Param groups that change mid-run: parameters added to the optimizer later
(``add_param_group``, ``BackboneFinetuning``) are guarded from the next step on, the rollback
snapshot is taken again with the new groups, and a snapshot that no longer matches the
optimizer is refused before anything is restored."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support.modules import TinyModule
from support.state import all_finite, params_of
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.core import GuardCore
from lightning_gradguard.core.guard import Action
from lightning_gradguard.core.snapshot import Snapshot
from lightning_gradguard.testing import Fault, FaultInjector

NAN = float("nan")


def _two_layers() -> tuple[torch.nn.Sequential, torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    return torch.nn.Sequential(a, b), a, b


def _backward(model: torch.nn.Module) -> None:
    model(torch.ones(4, 3)).pow(2).mean().backward()


def test_param_group_added_later_is_guarded() -> None:
    model, a, b = _two_layers()
    opt = torch.optim.Adam(a.parameters(), lr=0.1)
    guard = GuardCore(model, opt)
    _backward(model)
    guard.step()
    opt.step()
    opt.zero_grad()
    opt.add_param_group({"params": list(b.parameters())})  # e.g. BackboneFinetuning
    _backward(model)
    with torch.no_grad():
        b.weight.grad[0, 0] = NAN  # NaN only in the new group
    report = guard.step()
    assert not report.finite
    assert report.action is Action.SKIP
    assert a.weight.grad is None
    assert b.weight.grad is None
    opt.step()
    assert all_finite(model)


class UnfreezeAt(Callback):
    """Adds ``net.0`` to the optimizer at ``step`` (as ``BackboneFinetuning`` does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            backbone = list(pl_module.net[0].parameters())
            for p in backbone:
                p.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": backbone})


class FrozenBackbone(TinyModule):
    def configure_optimizers(self) -> Any:
        for p in self.net[0].parameters():
            p.requires_grad_(False)
        return torch.optim.Adam(self.net[2].parameters(), lr=0.01)


def test_unfrozen_backbone_is_guarded_in_a_fit() -> None:
    guard = GradGuard(rollback=True, snapshot_every=2, rollback_after=2)
    faults = FaultInjector([Fault(s, kind="nan", params="net.0.*") for s in (5, 6, 7)])
    module = FrozenBackbone()
    fit(module, 10, [UnfreezeAt(3), faults, guard])
    assert all_finite(module)
    s = guard.summary()
    assert s["skipped_steps"] == 3
    assert s["rollbacks"] == 1


def test_rollback_after_add_param_group_restores_consistently() -> None:
    model, a, b = _two_layers()
    opt = torch.optim.SGD(a.parameters(), lr=0.01, momentum=0.9)
    guard = GuardCore(model, opt, rollback=True, rollback_after=2)
    _backward(model)
    guard.step()  # step 1: snapshot of the one-group optimizer
    opt.step()
    opt.zero_grad()
    opt.add_param_group({"params": list(b.parameters())})
    _backward(model)
    guard.step()  # finite: the snapshot is taken again with both groups (before the update)
    good = params_of(model)
    opt.step()
    opt.zero_grad()
    assert guard.snapshot is not None
    assert guard.snapshot.step == 2
    with torch.no_grad():
        a.weight.fill_(1e3)  # the weights move on, then the steps fail
    for _ in range(2):
        _backward(model)
        with torch.no_grad():
            b.weight.grad.fill_(NAN)
        report = guard.step()  # rollback at the second: no "different number of groups"
        opt.step()
        opt.zero_grad()
    assert report.rollback
    assert all(torch.equal(x, y) for x, y in zip(params_of(model), good, strict=True))
    assert len(opt.state_dict()["param_groups"]) == 2


def test_snapshot_restore_with_other_groups_changes_nothing() -> None:
    model, a, b = _two_layers()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    snap = Snapshot()
    snap.capture(model, [opt], step=1)
    opt.add_param_group({"params": list(b.parameters())})
    with torch.no_grad():
        a.weight.fill_(7.0)
    with pytest.raises(RuntimeError, match=r"param groups of sizes \[2\].*\[2, 2\]"):
        snap.restore(model, [opt])
    assert bool((a.weight == 7.0).all())  # the model was not restored either
