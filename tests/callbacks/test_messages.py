"""What the user sees: the diagnosis (summary, warnings, TensorBoard text), the end-of-fit
line, backoff notices and the ``verbose``/``preflight`` switches (argument errors are in
``test_validation.py``)."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from support.modules import TinyModule
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard, GradGuardWarning
from lightning_gradguard.callbacks._messages import install_format
from lightning_gradguard.core import CAUSES, FixedNormClip
from lightning_gradguard.demos import DeepMLP, ResidualMLP
from lightning_gradguard.report import load_run
from lightning_gradguard.testing import Fault, FaultInjector

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*")


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lightning_gradguard"]


# ----------------------------------------------------------------- end of fit, notices
def test_end_of_fit_line_when_the_guard_acted(caplog: pytest.LogCaptureFixture) -> None:
    guard = GradGuard(clip=FixedNormClip(1e-3), lr_backoff=False)  # every step clips
    with caplog.at_level(logging.INFO, logger="lightning_gradguard"):
        fit(TinyModule(), 12, [guard])
    s = guard.summary()
    assert s["clipped_steps"] == 12
    assert _lines(caplog) == ["GradGuard: 12 steps, 12 clipped, 0 skipped, 0 LR backoffs"]


def test_end_of_fit_line_names_the_lr_scale_and_backoff_notices_are_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    # a NaN loss at steps 3..8: step 3 is an isolated bad batch (one skip, no backoff); 4..8
    # come within nonfinite_window of it: five backoffs (x0.5 each), one notice (rate limit)
    faults = FaultInjector([Fault(s, kind="nan", target="loss") for s in range(3, 9)])
    guard = GradGuard(halt_after=0, diagnose=False)
    with caplog.at_level(logging.INFO, logger="lightning_gradguard"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(TinyModule(), 12, [faults, guard])
    s = guard.summary()
    assert s["lr_backoffs"] == 5
    lines = _lines(caplog)
    assert lines[0] == ("GradGuard: step 4: LR backoff #1 (a second non-finite step within "
                        "nonfinite_window=50 steps): LR now x0.5 of the schedule")
    assert lines[-1] == (f"GradGuard: 12 steps, 0 clipped, 6 skipped, 5 LR backoffs (LR now "
                         f"x{s['lr_scale']:.2g} of the schedule)")
    assert len(lines) == 2


def test_backoff_notices_exactly_the_rate_limit_apart_are_both_shown(
        caplog: pytest.LogCaptureFixture) -> None:
    """At most one notice per 50 steps: step 51 (49 after the first notice) is held and
    counted in the next one; step 52, 50 steps after it, is shown."""
    faults = FaultInjector([Fault(s, kind="nan", target="loss") for s in (2, 51, 52)])
    guard = GradGuard(nonfinite_window=0, diagnose=False)
    with caplog.at_level(logging.INFO, logger="lightning_gradguard"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(TinyModule(), 54, [faults, guard])
    assert guard.summary()["lr_backoffs"] == 3
    notices = [line.removeprefix("GradGuard: ").split(": LR now")[0]
               for line in _lines(caplog) if "LR backoff #" in line]
    assert notices == ["step 2: LR backoff #1 (a non-finite step, with nonfinite_window=0)",
                       "step 52: LR backoff #3 (a non-finite step, with nonfinite_window=0; 1 "
                       "more since the last notice)"]


def test_verbose_false_prints_nothing(caplog: pytest.LogCaptureFixture) -> None:
    faults = FaultInjector([Fault(s, kind="nan", target="loss") for s in range(3, 9)])
    guard = GradGuard(halt_after=0, verbose=False, clip=FixedNormClip(1e-3))
    with caplog.at_level(logging.INFO, logger="lightning_gradguard"), \
            warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(TinyModule(), 12, [faults, guard])
    assert guard.summary()["lr_backoffs"] >= 5  # NaN steps 4..8 (3 is isolated), and spikes
    assert _lines(caplog) == []
    assert not [w for w in rec if issubclass(w.category, GradGuardWarning)]


def test_nothing_printed_when_nothing_happened(caplog: pytest.LogCaptureFixture) -> None:
    guard = GradGuard()
    with caplog.at_level(logging.INFO, logger="lightning_gradguard"), \
            warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(TinyModule(lr=0.01), 10, [guard])
    s = guard.summary()
    assert (s["clipped_steps"], s["skipped_steps"], s["lr_backoffs"]) == (0, 0, 0)
    assert _lines(caplog) == []
    assert not [w for w in rec if issubclass(w.category, GradGuardWarning)]
    assert s["diagnosis"] == []


# ----------------------------------------------------------------- the first non-finite warning
def test_first_nonfinite_warning_is_multiline_without_source_location() -> None:
    faults = FaultInjector([Fault(4, kind="nan", target="loss")])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(TinyModule(), 8, [faults, GradGuard()])
    ours = [w for w in rec if issubclass(w.category, GradGuardWarning)]
    assert len(ours) == 1
    shown = warnings.formatwarning(ours[0].message, ours[0].category, ours[0].filename,
                                   ours[0].lineno, ours[0].line)
    lines = shown.splitlines()
    assert lines[0] == "GradGuard: step 4: the loss is non-finite; the step was skipped " \
                       "(weights untouched)."
    assert ".py:" not in shown
    assert "Non-finite gradients in 4 parameter(s)" in shown
    assert lines[-1] == "GradGuard skips such steps and halts after 25 in a row."


def test_nan_weights_are_the_first_fact() -> None:
    module = TinyModule()
    with torch.no_grad():
        module.net[0].weight[0, 0] = math.nan  # e.g. loaded from a corrupt checkpoint
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(module, 3, [GradGuard()])
    ours = [str(w.message) for w in rec if issubclass(w.category, GradGuardWarning)]
    assert ours[0].splitlines()[0] == ("GradGuard: step 0: the weights were already non-finite "
                                       "(NaN/Inf) when training started.")
    assert ours[0].splitlines()[1].startswith("Skipping steps cannot repair them")


def test_formatwarning_shows_only_the_message_for_gradguard_warnings() -> None:
    install_format()  # what the callback does before each of its warnings
    text = warnings.formatwarning(GradGuardWarning("GradGuard: x\ny"), GradGuardWarning,
                                  "/a/lightning_gradguard/callbacks/guard.py", 317)
    assert text == "GradGuard: x\ny\n"
    other = warnings.formatwarning(UserWarning("z"), UserWarning, "/a/b.py", 3)
    assert "b.py:3" in other  # every other warning keeps its location
    # a formatter installed later that wraps ours (as Lightning's does) causes no loop
    saved = warnings.formatwarning
    ours = warnings.formatwarning

    def later(message: Any, category: Any, filename: str, lineno: int,
              line: str | None = None) -> str:
        return ours(message, category, filename, lineno, line)

    try:
        warnings.formatwarning = later
        install_format()
        assert warnings.formatwarning("z", UserWarning, "/a/b.py", 3) == \
            "/a/b.py:3: UserWarning: z\n"
        assert warnings.formatwarning("y", GradGuardWarning, "/a/b.py", 3) == "y\n"
    finally:
        warnings.formatwarning = saved


# ----------------------------------------------------------------- the diagnosis
def _demo_fit(cfg: Any, steps: int, guard: GradGuard, tmp_path: Path) -> pl.Trainer:
    torch.manual_seed(0)
    net, data = cfg.build()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=[guard],
        logger=TensorBoardLogger(str(tmp_path), name="", version="run",
                                 default_hp_metric=False),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        log_every_n_steps=1, limit_val_batches=0, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, datamodule=data)
    return trainer


def test_diagnosis_of_the_exploding_demo_in_summary_and_tensorboard(tmp_path: Path) -> None:
    # (DeepMLP's explosion is contained by two clipped steps under the guard: nothing to
    # diagnose there; this one's step-0 evidence already shows its residual stream growing)
    guard = GradGuard()
    trainer = _demo_fit(ResidualMLP.explode_config(), 80, guard, tmp_path)
    diagnosis = guard.summary()["diagnosis"]
    assert diagnosis, "the exploding demo must be diagnosed"
    assert all(set(d) == {"cause", "evidence", "remedy"} for d in diagnosis)
    assert {d["cause"] for d in diagnosis} <= set(CAUSES)
    ids = [d["cause"] for d in diagnosis]
    # residual blocks without BatchNorm (its healthy twin adds BatchNorm)
    assert ids[0] == "no_normalization"
    # the same ranking in the real TensorBoard event files (text), as the report reads it
    run = load_run(str(Path(trainer.logger.log_dir)))  # type: ignore[union-attr]
    assert run.diagnosis is not None
    assert run.diagnosis[1] == ids
    assert any("BatchNorm1d" in t for _, t in run.texts)


def test_no_diagnosis_on_the_healthy_demo(tmp_path: Path) -> None:
    guard = GradGuard()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer = _demo_fit(DeepMLP.healthy_config(), 60, guard, tmp_path)
    assert guard.summary()["diagnosis"] == []
    assert not [w for w in rec if issubclass(w.category, GradGuardWarning)]
    assert load_run(str(Path(trainer.logger.log_dir))).diagnosis is None  # type: ignore[union-attr]


class _TooLargeInit(pl.LightningModule):
    """Eight ReLU layers with weights at 2.8x the He std: the step-0 evidence says it explodes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for _ in range(8):
            layers += [torch.nn.Linear(64, 64), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(64, 1))
        for m in self.net:
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.5)
        self.data = torch.utils.data.TensorDataset(torch.randn(64, 64), torch.randn(64, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)  # not self(x): probe ends in hook

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-6)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.data, batch_size=32)


@pytest.mark.parametrize("preflight", [True, False])
def test_preflight_warning_and_its_switch(preflight: bool, tmp_path: Path) -> None:
    guard = GradGuard(preflight=preflight)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(_TooLargeInit(), 1, [guard], default_root_dir=tmp_path)
    ours = [str(w.message) for w in rec if issubclass(w.category, GradGuardWarning)]
    report = guard.last_reports[0]
    if preflight:
        assert len(ours) == 1
        assert ours[0].startswith("GradGuard: step 0: the first step's evidence already says "
                                  "this run is likely to explode")
        assert "1. init_too_large: the weights are 2.8x the He std" in ours[0]
        assert "nn.init.kaiming_normal_" in ours[0]
        assert report.diagnosis_event == "preflight"
        assert report.causes is not None
        assert report.causes[0].cause == "init_too_large"
        assert guard.summary()["diagnosis"][0]["cause"] == "init_too_large"
    else:
        assert ours == []
        assert report.causes is None
        assert guard.summary()["diagnosis"] == []
        # the step-0 evidence is still recorded for a later diagnosis
        doc = guard.cores[0].diagnostician
        assert doc is not None
        assert doc.step0 is not None
        assert doc.step0.init_median == pytest.approx(2.8, abs=0.1)


def test_diagnose_false_builds_no_diagnostician() -> None:
    guard = GradGuard(diagnose=False)
    fit(TinyModule(), 2, [guard])
    assert guard.cores[0].diagnostician is None
    assert guard.summary()["diagnosis"] == []
