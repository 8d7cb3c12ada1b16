"""Items 6 and 7: accumulation, fast_dev_run, gradient_clip_val, logger=False; rollback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support.modules import TinyModule
from support.recorders import Recorder
from support.state import all_finite, params_of
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.testing import Fault, FaultInjector


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


class ClipSeen(TinyModule):
    """Records the total gradient norm after Lightning's own clipping (what the optimizer
    receives), per global step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: dict[int, float] = {}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                            gradient_clip_algorithm)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.seen[self.global_step] = float(torch.nn.utils.get_total_norm(grads))


class GuardReports(Callback):
    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.reports: dict[int, Any] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.reports[trainer.global_step] = self.guard.last_reports[0]


@pytest.mark.parametrize("clip_val", [1e-3, 50.0], ids=["trainer-smaller", "guard-smaller"])
def test_gradient_clip_val_warns_and_the_smaller_threshold_wins(clip_val: float) -> None:
    guard = GradGuard()
    rec = GuardReports(guard)
    module = ClipSeen()
    k = 30  # a x1e6 spike after the guard's warmup
    with pytest.warns(UserWarning, match="gradient_clip_val.*the effective threshold is the "
                                         "smaller of the two"):
        fit(module, 35, [FaultInjector([Fault(k, kind="scale", factor=1e6)]), guard, rec],
            gradient_clip_val=clip_val)
    assert guard.summary()["steps"] == 35
    assert all_finite(module)
    assert sorted(module.seen) == list(range(35))
    for t, seen in module.seen.items():
        r = rec.reports[t]
        # the optimizer receives the guard's output clipped again to gradient_clip_val:
        # the norm is min(guard's clipped norm, gradient_clip_val)
        assert seen == pytest.approx(min(r.grad_norm_clipped, clip_val), rel=1e-4), t
    spike = rec.reports[k]
    assert spike.spike
    assert spike.threshold < 50.0
    if clip_val < 1.0:  # the Trainer's threshold is the smaller one at every step
        assert all(r.grad_norm_clipped > clip_val for r in rec.reports.values())
        assert all(v == pytest.approx(clip_val, rel=1e-4) for v in module.seen.values())
    else:  # the guard's is: the spike reaches the optimizer at the guard's threshold
        assert module.seen[k] == pytest.approx(spike.threshold, rel=1e-4)
        assert all(r.grad_norm_clipped < clip_val for r in rec.reports.values())


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
    core = guard.cores[0]
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
