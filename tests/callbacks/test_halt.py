"""Item 4: persistent NaN -> clean halt, last-good checkpoint, resumable."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lightning_gradguard.callbacks import GradGuard, GradGuardHalt
from lightning_gradguard.testing import Fault, FaultInjector

from ._helpers import TinyModule, all_finite, fit

K, HALT_AFTER, MAX_STEPS = 10, 5, 60
CKPT_NAME = "gradguard_last_good.ckpt"


def _persistent_nan(start: int = K, target: str = "loss") -> FaultInjector:
    return FaultInjector([Fault(s, kind="nan", target=target) for s in range(start, MAX_STEPS)])


def _halted_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> tuple[GradGuard, int]:
    guard = GradGuard(halt_after=HALT_AFTER)
    module = TinyModule()
    with caplog.at_level(logging.ERROR, logger="lightning_gradguard"):
        trainer = fit(module, MAX_STEPS, [_persistent_nan(), guard], default_root_dir=tmp_path)
    return guard, trainer.global_step


def test_persistent_nan_halts_saves_and_resumes(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    guard, global_step = _halted_run(tmp_path, caplog)
    assert global_step <= K + HALT_AFTER + 1
    s = guard.summary()
    assert s["halted"] is True
    assert s["nonfinite_steps"] == s["skipped_steps"] == HALT_AFTER
    ckpt = tmp_path / CKPT_NAME
    assert s["halt_checkpoint"] == str(ckpt)
    assert ckpt.is_file()
    assert not list(tmp_path.glob("*.tmp"))

    # the error message: which step, and why
    errors = [r for r in caplog.records
              if r.name == "lightning_gradguard" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    msg = errors[0].getMessage()
    assert "halted training" in msg
    # messages use Lightning's global_step
    assert f"steps {K}..{K + HALT_AFTER - 1}" in msg
    assert f"first non-finite step: step {K}" in msg
    assert "the loss itself is non-finite" in msg
    assert str(ckpt) in msg

    raw = torch.load(ckpt, weights_only=False)
    assert raw["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in raw["state_dict"].values())
    loaded = TinyModule.load_from_checkpoint(ckpt)
    assert all_finite(loaded)
    assert bool(torch.isfinite(loaded(torch.ones(2, 4))).all())

    # resume from the last-good checkpoint with the fault gone
    resumed_guard = GradGuard(halt_after=HALT_AFTER)
    module = TinyModule()
    trainer = fit(module, 30, [resumed_guard], ckpt_path=str(ckpt), default_root_dir=tmp_path)
    assert trainer.global_step == 30
    assert all_finite(module)
    assert resumed_guard.summary()["nonfinite_steps"] == HALT_AFTER  # carried over


def test_resume_from_halt_checkpoint_counts_consistently(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _halted_run(tmp_path, caplog)
    guard = GradGuard(halt_after=HALT_AFTER)
    trainer = fit(TinyModule(), 25, [guard], ckpt_path=str(tmp_path / CKPT_NAME))
    s = guard.summary()
    assert s["steps"] == trainer.global_step == 25
    assert s["halted"] is False


def test_on_halt_raise(tmp_path: Path) -> None:
    guard = GradGuard(halt_after=3, on_halt="raise")
    with pytest.raises(GradGuardHalt, match="3 consecutive non-finite steps"):
        fit(TinyModule(), MAX_STEPS, [_persistent_nan(), guard], default_root_dir=tmp_path)
    assert (tmp_path / CKPT_NAME).is_file()
    assert guard.summary()["halted"]


def test_halt_with_nonfinite_weights_and_no_snapshot_saves_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    guard = GradGuard(halt_after=3)
    module = TinyModule()
    with caplog.at_level(logging.ERROR, logger="lightning_gradguard"):
        fit(module, MAX_STEPS, [FaultInjector([Fault(5, target="param")]), guard],
            default_root_dir=tmp_path)
    s = guard.summary()
    assert s["halted"]
    assert s["halt_checkpoint"] is None
    assert not (tmp_path / CKPT_NAME).exists()
    assert "nothing was saved" in caplog.text


def test_halt_with_nonfinite_weights_restores_snapshot_before_saving(tmp_path: Path) -> None:
    guard = GradGuard(halt_after=3, rollback=True, snapshot_every=2, rollback_after=100)
    module = TinyModule()
    fit(module, MAX_STEPS, [FaultInjector([Fault(5, target="param")]), guard],
        default_root_dir=tmp_path)
    assert guard.summary()["halted"]
    raw = torch.load(tmp_path / CKPT_NAME, weights_only=False)
    assert all(bool(torch.isfinite(v).all()) for v in raw["state_dict"].values())
    assert all_finite(module)
