"""Items 6 and 7: accumulation, fast_dev_run, gradient_clip_val, logger=False; rollback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.testing import Fault, FaultInjector

from ._helpers import Recorder, TinyModule, all_finite, fit, params_of


def test_accumulation_guard_acts_once_per_optimizer_step() -> None:
    guard = GradGuard()
    rec = Recorder()
    injector = FaultInjector([Fault(2)])
    module = TinyModule()
    trainer = fit(module, 6, [injector, guard, rec], accumulate_grad_batches=4)
    assert trainer.global_step == 6
    s = guard.summary()
    assert s["steps"] == trainer.global_step
    assert sorted(rec.used_lr) == list(range(6))  # one optimizer-step hook per step
    assert injector.injected == [(2, "grad", "nan")]  # once per optimizer step
    assert (s["nonfinite_steps"], s["skipped_steps"]) == (1, 1)
    assert all_finite(module)


def test_fast_dev_run() -> None:
    guard = GradGuard()
    trainer = fit(TinyModule(), 100, [guard], fast_dev_run=True)
    assert trainer.global_step == 1
    assert guard.summary()["steps"] == 1


def test_gradient_clip_val_warns() -> None:
    guard = GradGuard()
    module = TinyModule()
    with pytest.warns(UserWarning, match="gradient_clip_val"):
        fit(module, 5, [guard], gradient_clip_val=1.0)
    assert guard.summary()["steps"] == 5
    assert all_finite(module)


def test_no_warning_without_gradient_clip_val(recwarn: pytest.WarningsRecorder) -> None:
    fit(TinyModule(), 3, [GradGuard()])
    assert not [w for w in recwarn.list if "gradient_clip_val" in str(w.message)]


def test_logger_false_with_events() -> None:
    guard = GradGuard()
    trainer = fit(TinyModule(), 8, [FaultInjector([Fault(3)]), guard], logger=False)
    assert trainer.loggers == []
    assert guard.summary()["skipped_steps"] == 1


# ----------------------------------------------------------------------------- rollback
class ParamsPerStep(Callback):
    def __init__(self) -> None:
        self.params: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.params[trainer.global_step - 1] = params_of(pl_module)


def test_rollback_restores_last_good_snapshot() -> None:
    fault_step = 12
    guard = GradGuard(rollback=True, snapshot_every=5, rollback_after=2)
    track = ParamsPerStep()
    module = TinyModule(opt="adam", lr=0.01)
    # the param fault fires in on_train_batch_end: list the tracker before the injector
    # so the recorded params of step 12 are the clean ones
    fit(module, 25, [track, FaultInjector([Fault(fault_step, target="param")]), guard])
    s = guard.summary()
    assert s["rollbacks"] >= 1
    assert s["nonfinite_steps"] == 2  # steps 13 and 14; the rollback happens at 14
    assert s["halted"] is False
    assert all_finite(module)
    core = guard._cores[0]
    assert core.snapshot is not None
    # snapshots at guard steps 1, 6, 11 (global 0, 5, 10): taken before the update of
    # global step 10, i.e. the weights at the end of step 9
    rolled_back = fault_step + 2
    assert all(torch.equal(a, b) for a, b in
               zip(track.params[rolled_back], track.params[9], strict=True))
    assert all(bool(torch.isfinite(p).all()) for p in track.params[rolled_back])
    # training continues after the rollback
    assert not all(torch.equal(a, b) for a, b in
                   zip(track.params[24], track.params[rolled_back], strict=True))
