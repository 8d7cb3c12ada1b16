"""GradScaler on CPU (fp16), fused optimizers, bf16."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from support.modules import TinyModule
from support.recorders import StateAround
from support.state import all_finite, assert_state_equal
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.testing import Fault, FaultInjector


def _fp16(init_scale: float = 2.0**16) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu",
                                                                        init_scale=init_scale))


@pytest.mark.parametrize("opt", ["adam", "adam_fused"])
def test_scaler_calibration_overflows_are_not_explosions(opt: str) -> None:
    # a huge initial scale makes the first steps overflow in fp16 (the scaler calibrating)
    guard = GradGuard(halt_after=3)
    module = TinyModule(opt=opt, lr=0.01)
    trainer = fit(module, 30, [guard], plugins=[_fp16(2.0**24)])
    s = guard.summary()
    assert s["amp_overflow_steps"] > 3  # more than halt_after, and still no halt
    assert (s["nonfinite_steps"], s["skipped_steps"], s["lr_backoffs"]) == (0, 0, 0)
    assert s["halted"] is False
    assert s["lr_scale"] == 1.0
    assert trainer.global_step == 30
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**24
    assert all_finite(module)


@pytest.mark.parametrize("opt", ["adam", "adam_fused"])
def test_real_nan_loss_under_scaler_is_nonfinite(opt: str) -> None:
    k = 12
    guard = GradGuard()
    around = StateAround(k)
    module = TinyModule(opt=opt, lr=0.01)
    fit(module, 20, [FaultInjector([Fault(k, target="loss")]), guard, around],
        plugins=[_fp16()])
    s = guard.summary()
    # one non-finite step: skipped, no LR backoff (isolated; nonfinite_window)
    assert (s["nonfinite_steps"], s["skipped_steps"], s["lr_backoffs"]) == (1, 1, 0)
    assert s["amp_overflow_steps"] == 0
    assert around.before is not None
    assert around.after is not None
    for a, b in zip(around.before[0], around.after[0], strict=True):
        assert torch.equal(a, b)
    assert_state_equal(around.before[1]["state"], around.after[1]["state"])
    # NaN equals NaN in assert_state_equal: the state must also be finite
    assert all(bool(torch.isfinite(t).all())
               for s in around.after[1]["state"].values() for t in s.values())
    assert all_finite(module)


def test_bf16_mixed() -> None:
    guard = GradGuard()
    module = TinyModule(opt="adam", lr=0.01)
    trainer = fit(module, 15, [FaultInjector([Fault(5)]), guard], precision="bf16-mixed")
    s = guard.summary()
    assert trainer.global_step == s["steps"] == 15
    assert (s["nonfinite_steps"], s["skipped_steps"], s["amp_overflow_steps"]) == (1, 1, 0)
    assert all_finite(module)


def test_gradients_nonfinite_at_every_scale_halt_cleanly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Finite loss, NaN gradients on every step (e.g. sqrt(0) in the backward): the scaler
    skips each step and halves its scale forever, and training makes no progress. After 40
    such steps in a row the guard halts, with a message that says why."""
    guard = GradGuard(checkpoint_dir=tmp_path)
    module = TinyModule(opt="adam", lr=0.01)
    before = [p.detach().clone() for p in module.parameters()]
    faults = FaultInjector([Fault(k) for k in range(200)])
    with caplog.at_level(logging.ERROR), pytest.warns(UserWarning, match="step 39"):
        trainer = fit(module, 200, [faults, guard], plugins=[_fp16()])
    assert "40 consecutive steps with finite loss and non-finite gradients" in caplog.text
    assert "not fp16 overflows" in caplog.text
    s = guard.summary()
    assert s["halted"] is True
    assert s["amp_overflow_steps"] == 40
    assert (s["nonfinite_steps"], s["skipped_steps"]) == (0, 0)
    assert trainer.global_step == 40
    assert guard.halt_checkpoint is not None
    assert guard.halt_checkpoint.exists()
    for a, b in zip(before, module.parameters(), strict=True):
        assert torch.equal(a, b.detach())  # every update was skipped by the scaler
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**-20


def test_a_clean_step_resets_the_scaler_streak() -> None:
    guard = GradGuard()
    module = TinyModule(opt="adam", lr=0.01)
    faults = FaultInjector([Fault(k) for k in range(60) if k != 30])
    trainer = fit(module, 60, [faults, guard], plugins=[_fp16()])
    s = guard.summary()
    assert s["halted"] is False
    assert s["amp_overflow_steps"] == 59
    assert trainer.global_step == 60
