"""Persistent failure: every batch from step K on is corrupt (NaN inputs).

The guard must stop within ``halt_after`` steps with a message that names the cause and the
checkpoint; the checkpoint holds the last good weights (those before the first corrupt
batch), loads with ``torch.load(weights_only=False)``, and training resumes from it to
completion once the data is fixed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from support.modules import TinyModule
from support.state import all_finite, params_of
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard, GradGuardHalt
from lightning_gradguard.testing import Fault, FaultInjector

pytestmark = pytest.mark.filterwarnings("ignore:GradGuard:UserWarning")

K, HALT_AFTER, MAX_STEPS = 10, 5, 40
CKPT = "gradguard_last_good.ckpt"


class CorruptData(TinyModule):
    """The batch of every step >= ``corrupt_from`` has a NaN input (``None``: clean data)."""

    def __init__(self, corrupt_from: int | None = None) -> None:
        super().__init__(opt="adam", lr=0.01)
        self.corrupt_from = corrupt_from

    def batch_for_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().batch_for_step(batch)
        if self.corrupt_from is not None and self.global_step >= self.corrupt_from:
            x = x.clone()
            x[3, 1] = float("nan")
        return x, y


def _halt(source: str, on_halt: str, root: Path,
          caplog: pytest.LogCaptureFixture) -> tuple[CorruptData, GradGuard, str]:
    """Run into the halt; returns the module, the guard and the error message."""
    guard = GradGuard(halt_after=HALT_AFTER, on_halt=on_halt)  # type: ignore[arg-type]
    if source == "data":
        module, callbacks = CorruptData(corrupt_from=K), [guard]
    else:  # the same failure through the public FaultInjector (NaN loss at every step)
        faults = [Fault(s, kind="nan", target="loss") for s in range(K, MAX_STEPS)]
        module, callbacks = CorruptData(), [FaultInjector(faults), guard]
    with caplog.at_level(logging.ERROR, logger="lightning_gradguard"):
        if on_halt == "raise":
            with pytest.raises(GradGuardHalt) as info:
                fit(module, MAX_STEPS, callbacks, default_root_dir=root)
            msg = str(info.value)
        else:
            trainer = fit(module, MAX_STEPS, callbacks, default_root_dir=root)
            # stops within halt_after steps: the K..K+4 steps were the non-finite ones
            assert trainer.global_step == K + HALT_AFTER
            msg = ""
    errors = [r.getMessage() for r in caplog.records
              if r.name == "lightning_gradguard" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    return module, guard, msg or errors[0]


@pytest.mark.parametrize("on_halt", ["stop", "raise"])
@pytest.mark.parametrize("source", ["data", "injector"])
def test_persistent_nan_halts_saves_and_resumes(source: str, on_halt: str, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    module, guard, msg = _halt(source, on_halt, tmp_path, caplog)
    ckpt = tmp_path / CKPT
    s = guard.summary()
    assert s["halted"] is True
    assert s["nonfinite_steps"] == s["skipped_steps"] == HALT_AFTER
    assert s["steps"] == K + HALT_AFTER
    assert s["halt_checkpoint"] == str(ckpt)

    # the message: what happened, where, the likely cause, and the checkpoint path
    assert "GradGuard halted training" in msg
    assert f"{HALT_AFTER} consecutive non-finite steps (steps {K}..{K + HALT_AFTER - 1})" in msg
    assert f"first non-finite step: step {K}" in msg
    assert "the loss itself is non-finite" in msg
    assert "corrupt" in msg
    assert f"The last good weights were saved to {ckpt}" in msg

    # the checkpoint: loads, finite, and it IS the state before the first corrupt batch
    raw = torch.load(ckpt, weights_only=False)
    assert raw["global_step"] == K + HALT_AFTER
    weights = raw["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())
    clean = CorruptData()
    fit(clean, K, [GradGuard()], default_root_dir=tmp_path / "clean")
    for (name, v), p in zip(weights.items(), params_of(clean), strict=True):
        assert torch.equal(v, p), name
    assert "GradGuard" in raw["callbacks"]
    assert all_finite(module)

    # resume with the data fixed -- on the very same module object -- to completion
    module.corrupt_from = None
    resumed = GradGuard(halt_after=HALT_AFTER)
    trainer = fit(module, MAX_STEPS, [resumed], ckpt_path=str(ckpt), default_root_dir=tmp_path)
    assert trainer.global_step == MAX_STEPS
    assert all_finite(module)
    r = resumed.summary()
    assert r["halted"] is False
    assert r["steps"] == MAX_STEPS
    assert r["nonfinite_steps"] == HALT_AFTER  # carried over, none new
    assert r["skipped_steps"] == HALT_AFTER


def test_halt_message_counts_steps_with_accumulation(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """With accumulate_grad_batches=2 the halt still comes after `halt_after` optimizer steps."""
    guard = GradGuard(halt_after=3)
    module = CorruptData(corrupt_from=6)
    with caplog.at_level(logging.ERROR, logger="lightning_gradguard"):
        trainer = fit(module, MAX_STEPS, [guard], default_root_dir=tmp_path,
                      accumulate_grad_batches=2)
    assert trainer.global_step == 6 + 3
    s = guard.summary()
    assert s["halted"]
    assert s["nonfinite_steps"] == 3
    assert (tmp_path / CKPT).is_file()
    assert "steps 6..8" in caplog.text
