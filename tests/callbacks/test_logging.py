"""Logged tags, events between logging intervals, TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only
from support.modules import TinyModule, TwoNetManual
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.testing import Fault, FaultInjector

DESIGN_TAGS = {
    "gradguard/grad_norm", "gradguard/grad_norm_clipped", "gradguard/clip_threshold",
    "gradguard/lr_scale", "gradguard/skipped_steps", "gradguard/spikes",
    "gradguard/clipped_steps", "gradguard/nonfinite_steps",
}


class MemLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "mem"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def at(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for s, m in self.calls:
            if s == step:
                out.update(m)
        return out


def test_every_design_tag_logged_and_events_between_intervals() -> None:
    logger = MemLogger()
    # nonfinite_window=0: the NaN step backs off, so the event carries a backed-off scale
    fit(TinyModule(), 60, [FaultInjector([Fault(7)]), GradGuard(nonfinite_window=0)],
        logger=logger,
        log_every_n_steps=50)
    tags = {k for _, m in logger.calls for k in m}
    assert tags >= DESIGN_TAGS
    assert all(k.startswith("gradguard/") for k in tags)
    steps = {s for s, _ in logger.calls}
    assert {0, 7, 50} <= steps
    assert len(steps) <= 5  # intervals + events only, not every step
    event = logger.at(7)
    assert event["gradguard/nonfinite_steps"] == 1.0
    assert event["gradguard/skipped_steps"] == 1.0
    assert event["gradguard/lr_scale"] == 0.5
    assert "gradguard/grad_norm" not in event  # NaN is dropped, the counters tell
    assert logger.at(50)["gradguard/grad_norm"] > 0


def test_tags_of_second_optimizer_have_suffix() -> None:
    logger = MemLogger()
    fit(TwoNetManual(), 6, [GradGuard()], logger=logger, log_every_n_steps=1)
    tags = {k for _, m in logger.calls for k in m}
    assert "gradguard/grad_norm" in tags
    assert "gradguard/grad_norm/optimizer1" in tags


def test_tensorboard_logger_events_and_halt_checkpoint_in_log_dir(tmp_path: Path) -> None:
    tb = TensorBoardLogger(tmp_path, name="tb")
    guard = GradGuard(halt_after=3)
    faults = FaultInjector([Fault(s, target="loss") for s in range(4, 20)])
    trainer = fit(TinyModule(), 20, [faults, guard], logger=tb, root=tmp_path)
    assert trainer.log_dir is not None
    log_dir = Path(trainer.log_dir)
    assert guard.summary()["halt_checkpoint"] == str(log_dir / "gradguard_last_good.ckpt")
    assert (log_dir / "gradguard_last_good.ckpt").is_file()
    assert list(log_dir.glob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------- progress bar
class _BarSeen(Callback):
    """Records the progress-bar metrics after every batch."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append({k: float(v) for k, v in trainer.progress_bar_metrics.items()
                          if k.startswith("gg_")})


def test_progress_bar_shows_skips_clips_and_lr_scale(tmp_path: Path) -> None:
    seen = _BarSeen()
    guard = GradGuard(nonfinite_window=0)  # the NaN step backs off: gg_lr shows
    logged: list[dict[str, float]] = []

    class Rec(CSVLogger):
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            logged.append(dict(metrics))
            super().log_metrics(metrics, step)

    fit(TinyModule(), 12, [FaultInjector([Fault(4), Fault(8, kind="scale", factor=1e6)]),
                           guard, seen],
        enable_progress_bar=True, logger=Rec(tmp_path), log_every_n_steps=1)
    assert seen.seen[0] == {"gg_skip": 0.0, "gg_clip": 0.0}
    assert seen.seen[4]["gg_skip"] == 1.0
    assert "gg_lr" in seen.seen[4]
    assert seen.seen[4]["gg_lr"] == 0.5
    assert seen.seen[8]["gg_clip"] == 1.0
    s = guard.summary()
    assert seen.seen[-1]["gg_skip"] == s["skipped_steps"]
    assert seen.seen[-1]["gg_clip"] == s["clipped_steps"]
    assert not any(k.startswith("gg_") for m in logged for k in m)  # never sent to loggers


def test_progress_bar_lr_scale_is_the_smallest_of_the_optimizers() -> None:
    """Two optimizers, only the second backs off: ``gg_lr`` shows its scale, not the
    first one's 1.0 (global step 7 is the discriminator's step of batch 3)."""
    seen = _BarSeen()
    guard = GradGuard(nonfinite_window=0)
    fit(TwoNetManual(), 12, [FaultInjector([Fault(7, params="disc.*")]), guard, seen],
        enable_progress_bar=True)
    assert [c.backoff.scale < 1.0 for c in guard.cores.values()] == [False, True]
    assert "gg_lr" not in seen.seen[2]
    assert seen.seen[3]["gg_skip"] == 1.0
    assert seen.seen[3]["gg_lr"] == 0.5
    assert seen.seen[-1]["gg_lr"] == round(guard.cores[1].backoff.scale, 2) < 1.0


def test_progress_bar_opt_out() -> None:
    seen = _BarSeen()
    fit(TinyModule(), 5, [FaultInjector([Fault(2)]), GradGuard(progress_bar=False), seen],
        enable_progress_bar=True)
    assert seen.seen
    assert all(m == {} for m in seen.seen)
