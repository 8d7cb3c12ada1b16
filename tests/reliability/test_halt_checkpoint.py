"""Halting and writing the halt checkpoint: a remote ``checkpoint_dir`` is written through
fsspec, an unwritable one is reported and training still stops cleanly, and a halt held open
by ``Trainer(min_steps=...)`` happens once (one message, one checkpoint, frozen weights)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import fsspec
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support.modules import NaNFrom
from support.state import params_of
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard

CKPT = "gradguard_last_good.ckpt"


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "lightning_gradguard" and r.levelno == logging.ERROR]


def test_remote_checkpoint_dir_writes_through_fsspec(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = "memory://gradguard_i16/run"
    guard = GradGuard(halt_after=3, checkpoint_dir=url)
    trainer = fit(NaNFrom(5), 30, [guard])
    assert guard.summary()["halted"]
    fs = fsspec.filesystem("memory")
    try:
        assert fs.isfile("/gradguard_i16/run/" + CKPT)
        assert guard.summary()["halt_checkpoint"] == f"{url}/{CKPT}"
        assert not any(tmp_path.iterdir())  # nothing on local disk ("memory:/...")
        assert trainer.global_step == 5 + 3
    finally:
        fs.rm("/gradguard_i16", recursive=True)


def test_halt_under_min_steps_happens_once(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    saved: list[int] = []

    class Count(Callback):
        def on_save_checkpoint(self, trainer: pl.Trainer, *args: Any) -> None:
            saved.append(trainer.global_step)

    class Weights(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            self.last = params_of(pl_module)
            if trainer.global_step == 9:
                self.at_halt = self.last

    weights = Weights()
    guard = GradGuard(halt_after=3)
    with caplog.at_level(logging.ERROR, logger="lightning_gradguard"):
        trainer = fit(NaNFrom(6), 30, [guard, Count(), weights], default_root_dir=tmp_path,
                      min_steps=30)
    assert trainer.global_step == 30  # Lightning keeps going until min_steps
    errors = _errors(caplog)
    assert len(errors) == 1
    assert "min_steps=30" in errors[0]
    assert saved == [9]
    assert guard.summary()["halted"]
    assert guard.summary()["skipped_steps"] == 3
    assert all(torch.equal(x, y) for x, y in zip(weights.at_halt, weights.last, strict=True))


def test_unwritable_checkpoint_dir_still_halts_cleanly(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    guard = GradGuard(halt_after=3, checkpoint_dir=blocker / "sub")
    with caplog.at_level(logging.ERROR, logger="lightning_gradguard"):
        trainer = fit(NaNFrom(4), 30, [guard])
    assert trainer.global_step == 4 + 3
    s = guard.summary()
    assert s["halted"]
    assert s["halt_checkpoint"] is None
    errors = _errors(caplog)
    assert "halted training" in errors[0]
    assert "consecutive non-finite steps" in errors[0]
    assert any("could NOT be saved" in e and "checkpoint_dir" in e for e in errors)
