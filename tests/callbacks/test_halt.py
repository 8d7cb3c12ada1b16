"""Persistent NaN -> clean halt, last-good checkpoint, resumable."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support.modules import TinyModule, TwoNetManual
from support.state import all_finite, params_of
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard, GradGuardHalt
from lightning_gradguard.testing import Fault, FaultInjector

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
    s = guard.summary()
    assert s["halted"]
    # the halt's restore is the run's only one (rollback_after=100), and it is counted
    assert s["rollbacks"] == 1
    raw = torch.load(tmp_path / CKPT_NAME, weights_only=False)
    assert all(bool(torch.isfinite(v).all()) for v in raw["state_dict"].values())
    assert all_finite(module)
    # the checkpoint holds exactly the restored weights, and the module keeps them
    snapshot = guard.cores[0].snapshot
    assert snapshot is not None
    assert snapshot.available
    saved = raw["state_dict"]
    assert set(saved) == {n for n, _ in module.named_parameters()}
    for name, p in module.named_parameters():
        assert torch.equal(saved[name], p.detach()), name


class _WeightsPerBatch(Callback):
    """The parameters of ``net`` at the end of every training batch, keyed by the
    ``global_step`` reached (with two optimizers it advances by two per batch)."""

    def __init__(self, net: str) -> None:
        self.net = net
        self.at: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.at[trainer.global_step] = params_of(getattr(pl_module, self.net))


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_halt_under_min_steps_freezes_every_optimizer(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Manual optimization, two optimizers: the generator's gradients are NaN at its steps
    4, 6 and 8 (global steps; the discriminator steps at the odd ones and stays healthy),
    so the guard halts after the batch that ends at global step 10. ``min_steps`` keeps the
    run going: every remaining step of *both* optimizers must be skipped."""
    gen, disc = _WeightsPerBatch("gen"), _WeightsPerBatch("disc")
    guard = GradGuard(halt_after=3)
    faults = FaultInjector([Fault(s, params="gen.*") for s in (4, 6, 8)])
    with caplog.at_level(logging.ERROR, logger="lightning_gradguard"):
        trainer = fit(TwoNetManual(), 30, [faults, guard, gen, disc], min_steps=30,
                      default_root_dir=tmp_path)
    assert faults.injected == [(4, "grad", "nan"), (6, "grad", "nan"), (8, "grad", "nan")]
    assert trainer.global_step == 30  # Lightning keeps going until min_steps
    errors = [r.getMessage() for r in caplog.records
              if r.name == "lightning_gradguard" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    ckpt = tmp_path / CKPT_NAME
    assert errors[0].startswith("GradGuard halted training: 3 consecutive non-finite steps")
    assert (". The Trainer's min_steps=30 keeps the run going past this stop: GradGuard skips "
            "every remaining step (the weights stay as they are now). The last good weights "
            f"were saved to {ckpt}.") in errors[0]
    assert guard.summary()["halt_checkpoint"] == str(ckpt)
    assert guard.summary()["halted"]
    # every optimizer's guard is stopped, and the held steps are not counted: each guard
    # saw its own five steps (the generator's fifth, global step 8, was the third NaN)
    assert sorted(guard.cores) == [0, 1]
    assert all(core.stopped for core in guard.cores.values())
    assert [core.counters.steps for core in guard.cores.values()] == [5, 5]
    assert guard.summary()["steps"] == 10
    # both nets trained before the halt (the discriminator up to its last step)...
    assert not _same(disc.at[2], disc.at[10])
    assert not _same(gen.at[2], gen.at[4])
    # ...and neither moved after it, whichever optimizer
    for net in (gen, disc):
        assert sorted(net.at) == list(range(2, 31, 2))
        for step in range(12, 31, 2):
            assert _same(net.at[step], net.at[10]), (net.net, step)


def test_reused_guard_after_a_halt_guards_the_next_fit(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A halted fit leaves nothing behind: the same instance guards (and trains) the next."""
    guard, _ = _halted_run(tmp_path, caplog)
    assert guard.summary()["halted"]
    halted_core = guard.cores[0]
    assert halted_core.stopped
    module = TinyModule()
    start = params_of(module)
    trainer = fit(module, 10, [guard], default_root_dir=tmp_path)
    assert trainer.global_step == 10
    s = guard.summary()
    assert s["steps"] == 10
    assert s["halted"] is False
    assert s["skipped_steps"] == 0
    assert guard.last_reports[0].step == 9
    assert guard.cores[0] is not halted_core
    assert not guard.cores[0].stopped
    assert not _same(start, params_of(module))  # the weights moved
    assert all_finite(module)
