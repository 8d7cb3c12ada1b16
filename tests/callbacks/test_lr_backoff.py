"""The LR the update used during backoff, and exact schedules after recovery."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support.modules import TinyModule, TwoNetManual
from support.recorders import Recorder
from support.state import all_finite, params_of
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.core.guard import StepReport
from lightning_gradguard.testing import Fault, FaultInjector

SCHEDULERS = ["lambda", "onecycle", "step", "cosine", "plateau"]
K = 8  # the NaN step
RECOVERY = 5
STEPS = 20


class Reports(Callback):
    """The guard's StepReport of every step (list AFTER GradGuard)."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.by_step: dict[int, StepReport] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self.by_step[trainer.global_step] = self.guard.last_reports[0]


def _guarded(sched: str | None, group_lrs: tuple[float, float] | None = None,
             recovery_steps: int = RECOVERY) -> tuple[GradGuard, Recorder, Reports]:
    # nonfinite_window=0: the one NaN step backs off (by default an isolated one does not)
    guard = GradGuard(recovery_steps=recovery_steps, nonfinite_window=0)
    rec = Recorder()
    reports = Reports(guard)
    module = TinyModule(opt="sgd", sched=sched, max_steps=STEPS, group_lrs=group_lrs)
    fit(module, STEPS, [FaultInjector([Fault(K)]), guard, rec, reports])
    assert all_finite(module)
    return guard, rec, reports


def _reference(sched: str | None, group_lrs: tuple[float, float] | None = None) -> Recorder:
    """Same run without the guard and without the fault."""
    rec = Recorder()
    fit(TinyModule(opt="sgd", sched=sched, max_steps=STEPS, group_lrs=group_lrs), STEPS, [rec])
    return rec


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_backoff_scales_only_the_update_and_schedule_is_exact(sched: str) -> None:
    guard, rec, reports = _guarded(sched)
    ref = _reference(sched)
    assert reports.by_step[K].backoff
    assert not reports.by_step[K].finite
    # the scheduled LR (param_groups after each step) is the guard-free one, bit for bit,
    # at every step: during backoff, during recovery and after it
    assert rec.sched_lr == ref.sched_lr
    # the LR each update used is the scheduled one times the reported scale, exactly
    for t in range(STEPS):
        scale = reports.by_step[t].lr_scale if t != K else 1.0  # step K: restored, skipped
        assert rec.used_lr[t] == [lr * scale for lr in ref.used_lr[t]], t
    assert rec.used_lr[K + 1][0] < ref.used_lr[K + 1][0]  # the backoff is felt
    # the backed-off scale is used by the next RECOVERY updates, recovering geometrically;
    # from then on the update uses the scheduled LR exactly
    for t in range(K + RECOVERY + 1, STEPS):
        assert reports.by_step[t].lr_scale == 1.0
        assert rec.used_lr[t] == ref.used_lr[t], t
    assert guard.summary()["lr_scale"] == 1.0
    assert guard.summary()["lr_backoffs"] == 1
    if sched == "plateau":  # the plateau scheduler did cut the LR during the run
        assert len({lrs[0] for lrs in ref.sched_lr.values()}) > 3


@pytest.mark.parametrize("recovery_steps", [1, RECOVERY])
def test_first_update_after_nan_uses_backoff_factor(recovery_steps: int) -> None:
    guard, rec, _ = _guarded("lambda", recovery_steps=recovery_steps)
    ref = _reference("lambda")
    factor = guard.settings.backoff_factor
    assert rec.used_lr[K + 1] == [lr * factor for lr in ref.used_lr[K + 1]]


def test_several_param_groups_scaled_by_same_factor_and_restored() -> None:
    lrs = (0.1, 0.01)
    _, rec, reports = _guarded("step", group_lrs=lrs)
    ref = _reference("step", group_lrs=lrs)
    assert rec.sched_lr == ref.sched_lr
    for t in range(K + 1, K + RECOVERY):
        scale = reports.by_step[t].lr_scale
        assert scale < 1.0
        assert rec.used_lr[t] == [ref.used_lr[t][0] * scale, ref.used_lr[t][1] * scale]
        assert rec.used_lr[t][0] / rec.used_lr[t][1] == pytest.approx(lrs[0] / lrs[1])
    assert rec.used_lr[STEPS - 1] == ref.used_lr[STEPS - 1]


# ----------------------------------------------------------------------------- manual, 2 opts
class ParamsPerBatch(Callback):
    def __init__(self) -> None:
        self.gen: list[list[torch.Tensor]] = []
        self.disc: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.gen.append(params_of(pl_module.gen))
        self.disc.append(params_of(pl_module.disc))


@pytest.mark.parametrize(("net", "idx"), [("gen", 0), ("disc", 1)])
def test_manual_optimization_two_optimizers_separate_guards(net: str, idx: int) -> None:
    batch = 3
    # global_step counts opt.step() calls: opt1 steps at even, opt2 at odd global steps
    step = 2 * batch + idx
    guard = GradGuard(nonfinite_window=0)  # the one NaN step backs off
    track = ParamsPerBatch()
    module = TwoNetManual()
    injector = FaultInjector([Fault(step, params=f"{net}.*")])
    trainer = fit(module, 12, [injector, guard, track])
    assert injector.injected == [(step, "grad", "nan")]
    assert len(guard.cores) == 2
    assert trainer.global_step == 12
    s = guard.summary()
    assert s["steps"] == 12
    assert (s["nonfinite_steps"], s["skipped_steps"], s["lr_backoffs"]) == (1, 1, 1)
    bad, good = guard.cores[idx].counters, guard.cores[1 - idx].counters
    assert (bad.steps, bad.skipped_steps) == (6, 1)
    assert (good.steps, good.skipped_steps, good.nonfinite_steps) == (6, 0, 0)
    assert guard.cores[1 - idx].backoff.scale == 1.0
    assert s["lr_scale"] == guard.cores[idx].backoff.scale < 1.0
    skipped = track.gen if net == "gen" else track.disc
    other = track.disc if net == "gen" else track.gen
    assert all(torch.equal(a, b) for a, b in zip(skipped[batch - 1], skipped[batch], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(other[batch - 1], other[batch], strict=True))
    assert all_finite(module)
    # each optimizer's LR is back at its own value after fit
    assert [o.param_groups[0]["lr"] for o in trainer.optimizers] == [0.05, 0.05]
