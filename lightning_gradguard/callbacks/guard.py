"""``GradGuard``: the Lightning adapter over :class:`~lightning_gradguard.core.GuardCore`.

Hook -> gather -> core -> log. The core decides and acts (its ``apply`` is the only place
that skips, clips, backs off, snapshots and restores); this module only knows Lightning:
where the gradients are ready (``on_before_optimizer_step``: after accumulation and
GradScaler unscaling, before Lightning's own clipping and the update), what to gather for
the core (the loss, the batch, the other optimizers), and how to log. How a halt ends the
run (checkpoint, message, stop or raise) is :mod:`._halt`; what the Trainer must not be
set to (DeepSpeed, LBFGS, ...) is :mod:`._compat`. The guard of each optimizer is
:attr:`GradGuardLogic.cores`.

Logged scalars (every logger of the Trainer, rank 0, at ``log_every_n_steps`` and at every
step where an event happens):

==================================  ============================================================
tag                                 value
==================================  ============================================================
``gradguard/grad_norm``             total gradient norm before any clipping
``gradguard/grad_norm_clipped``     total norm after GradGuard's clipping
``gradguard/clip_threshold``        threshold the step was judged by (absent while unknown)
``gradguard/lr_scale``              LR scale applied to the update (1 = scheduled LR)
``gradguard/skipped_steps``         cumulative skipped (non-finite) steps
``gradguard/spikes``                cumulative spikes (norm above threshold)
``gradguard/clipped_steps``         cumulative clipped steps
``gradguard/nonfinite_steps``       cumulative steps with NaN/Inf gradients or loss
``gradguard/lr_backoffs``           cumulative LR backoffs
``gradguard/rollbacks``             cumulative rollbacks to the last good snapshot
``gradguard/amp_overflow_steps``    cumulative GradScaler overflow steps (not explosions)
==================================  ============================================================

With several optimizers, tags of optimizer ``i > 0`` end in ``/optimizer{i}``.

With a :class:`~lightning.pytorch.loggers.TensorBoardLogger`, GradGuard also writes a
custom-scalars layout (tab "CUSTOM SCALARS": one chart with grad norm, threshold and clipped
norm, one with the counters, one with the LR scale) and a text entry ``gradguard/events``
with the diagnosis of the first non-finite step, every rollback and the halt message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

from lightning_gradguard.callbacks._compat import (
    check_optimizers,
    check_trainer,
    raw_optimizer,
    trainable,
)
from lightning_gradguard.callbacks._distributed import ConsensusReducer, make_reducer
from lightning_gradguard.callbacks._halt import GradGuardHalt, halt
from lightning_gradguard.callbacks._logging import (
    events_text,
    guard_layout,
    guard_metrics,
    log_scalars,
    should_log,
    tensorboard_writers,
)
from lightning_gradguard.callbacks._messages import GradGuardWarning, install_format
from lightning_gradguard.core._friendly import friendly_init
from lightning_gradguard.core._validation import check_bool, check_choice
from lightning_gradguard.core.amp import unscale_once_
from lightning_gradguard.core.evidence import MicroBatches
from lightning_gradguard.core.guard import (
    STATE_VERSION,
    Action,
    GuardCore,
    GuardSettings,
    StepReport,
)
from lightning_gradguard.core.messages import end_of_fit_line
from lightning_gradguard.core.notices import Notice, NoticeKind, log
from lightning_gradguard.core.policies import ClipPolicy

__all__ = ["GradGuard", "GradGuardHalt", "GradGuardLogic", "GradGuardWarning"]

log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():  # as Lightning does for its own logger
    log.addHandler(logging.StreamHandler())
    log.propagate = False


class GradGuardLogic:
    """Detects NaN/Inf and gradient-norm spikes every optimizer step, and answers them.

    ``GradGuard()`` with no arguments is the recommended setting: z-score adaptive clipping
    (protective from the second step), a true skip of non-finite steps, LR backoff on
    repeated spikes or sustained growth with recovery over clean steps, and a clean halt
    after 25 consecutive non-finite steps with the last good weights saved.

    Args:
        clip: Threshold policy (default ``ZScoreClip()``); see :mod:`lightning_gradguard.core`.
        norm_type: Norm for detection and clipping.
        skip_nonfinite: Skip steps with non-finite gradients or loss.
        lr_backoff: Enable LR backoff.
        backoff_factor: LR scale multiplier per backoff.
        recovery_steps: Clean steps to undo one backoff.
        min_lr_scale: Floor of the LR scale.
        spike_patience: Spikes within ``spike_window`` steps that trigger a backoff (updates
            clipped by the armed ``max_update_ratio`` cap count like spikes; with
            ``torch.optim.SGD`` only spikes with a large update count, see
            :class:`~lightning_gradguard.core.update_cap.SGDUpdateCap`). The LR backs off
            only with evidence that it is too high: this update capped, 5 of the last 10
            steps clipped, or the LR already backed off; otherwise the count restarts.
        spike_window: Window for ``spike_patience``.
        growth_patience: Consecutive rising norms that trigger a backoff (0: off); growth
            counts under the same condition as a spike.
        growth_min_rise: Minimum relative rise counted by ``growth_patience``.
        rollback: Keep a last-good snapshot (on CPU) and restore it when steps keep failing.
        snapshot_every: Steps between snapshots.
        rollback_after: Consecutive non-finite steps that trigger a rollback.
        halt_after: Consecutive non-finite steps that halt training (0: never); under a
            GradScaler, ``amp_halt_after`` consecutive steps it skipped with a finite loss
            halt instead.
        max_update_ratio: Largest relative weight change ``lr * ||g|| / ||w||`` of one
            plain-SGD update (momentum not counted; the gradient is clipped to it, and the
            step counts toward a backoff like a spike); protects the first steps from a far
            too high learning rate. ``None`` disables it. Other optimizers are not affected.
        amp_halt_after: Consecutive GradScaler-skipped steps with a finite loss after which
            the gradients are non-finite at any loss scale: halt (unless ``halt_after`` is 0).
        nonfinite_window: A non-finite step is skipped; it backs the LR off only if another
            non-finite step came within this many steps (an isolated bad batch costs one
            skipped step, not a lower LR); ``0``: every non-finite step backs off.
        diagnose: Name the cause of an explosion with its evidence and remedy (ranked, see
            "Why did it explode?" in the README): in the first-non-finite warning, the halt
            message, TensorBoard text and ``summary()["diagnosis"]``.
        preflight: Warn at the first step when its evidence already says the run will
            explode (e.g. too-large init with depth growth); ``False`` silences it.
        verbose: Print one line at the end of fit when the guard did anything, a
            rate-limited notice at each LR backoff, and the pre-flight and first-non-finite
            warnings (``False``: silent; the halt message is always shown).
        on_halt: ``"stop"`` (``trainer.should_stop``, the run ends cleanly) or ``"raise"``
            (:class:`GradGuardHalt`).
        checkpoint_dir: Where the last-good checkpoint goes on halt (default: the Trainer's
            ``log_dir``, else ``default_root_dir``).
        name: Distinguishes several guards in one Trainer (part of ``state_key``).
        progress_bar: Show ``gg_skip`` / ``gg_clip`` (and ``gg_lr`` while the LR is backed
            off) in Lightning's progress bar. Updated only when a value changes (and once
            per epoch); never sent to the loggers.

    Example:
        >>> import lightning.pytorch as pl
        >>> guard = GradGuard()
        >>> trainer = pl.Trainer(callbacks=[guard], max_steps=1, logger=False)  # doctest: +SKIP
        >>> GradGuard(on_halt="explode")
        Traceback (most recent call last):
        ...
        ValueError: `on_halt` must be one of ('stop', 'raise'), got 'explode'
    """

    @friendly_init
    def __init__(
        self,
        clip: ClipPolicy | None = None,
        norm_type: float = 2.0,
        skip_nonfinite: bool = True,
        lr_backoff: bool = True,
        backoff_factor: float = 0.5,
        recovery_steps: int = 200,
        min_lr_scale: float = 1e-3,
        spike_patience: int = 3,
        spike_window: int = 50,
        growth_patience: int = 5,
        growth_min_rise: float = 0.05,
        rollback: bool = False,
        snapshot_every: int = 100,
        rollback_after: int = 3,
        halt_after: int = 25,
        max_update_ratio: float | None = 0.1,
        amp_halt_after: int = 40,
        nonfinite_window: int = 50,
        diagnose: bool = True,
        preflight: bool = True,
        verbose: bool = True,
        on_halt: Literal["stop", "raise"] = "stop",
        checkpoint_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        progress_bar: bool = True,
    ) -> None:
        self.settings = GuardSettings(
            clip=clip, norm_type=norm_type, skip_nonfinite=skip_nonfinite,
            lr_backoff=lr_backoff, backoff_factor=backoff_factor,
            recovery_steps=recovery_steps, min_lr_scale=min_lr_scale,
            spike_patience=spike_patience, spike_window=spike_window,
            growth_patience=growth_patience, growth_min_rise=growth_min_rise,
            rollback=rollback, snapshot_every=snapshot_every, rollback_after=rollback_after,
            halt_after=halt_after, max_update_ratio=max_update_ratio,
            amp_halt_after=amp_halt_after, nonfinite_window=nonfinite_window,
            diagnose=diagnose, preflight=preflight, verbose=verbose,
        )
        self.on_halt = check_choice("on_halt", on_halt, ("stop", "raise"))
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"`checkpoint_dir` must be a path or None, got {checkpoint_dir!r}")
        self.checkpoint_dir = checkpoint_dir
        if name is not None and not isinstance(name, str):
            raise TypeError(f"`name` must be a str or None, got {name!r}")
        self.name = name
        self.progress_bar = check_bool("progress_bar", progress_bar)
        self._bar_shown: dict[str, float] = {}
        self._cores: dict[int, GuardCore] = {}
        self._cores_view = MappingProxyType(self._cores)
        self._pending_state: dict[int, Any] = {}
        self._loss: torch.Tensor | None = None
        #: where the halt checkpoint went (a ``Path``; a ``str`` for a URL such as s3://)
        self.halt_checkpoint: Path | str | None = None
        self._halt_pending: GuardCore | None = None
        self._stopping = False
        self._in_fit = False
        self.last_reports: dict[int, StepReport] = {}
        #: the micro-batches of the current optimizer step (read only on a non-finite step)
        self._batches: list[Any] = []
        self._window_done = False
        self._trainer: pl.Trainer | None = None
        #: this step's TensorBoard text (one ``gradguard/events`` entry per step)
        self._markdown: list[str] = []

    # ----------------------------------------------------------------- identity & state
    @property
    def cores(self) -> Mapping[int, GuardCore]:
        """The guard of each optimizer, by its index in ``trainer.optimizers`` (read-only).

        A live view: the guards are built when training starts (one per optimizer with
        trainable parameters) and replaced at the next fit's start. Read their counters,
        statistics or reports; the callback drives them. Empty before the first fit.

        Example:
            >>> guard = GradGuard()
            >>> dict(guard.cores)
            {}
            >>> guard.cores[0] = None
            Traceback (most recent call last):
            ...
            TypeError: 'mappingproxy' object does not support item assignment
        """
        return self._cores_view

    @property
    def state_key(self) -> str:
        """Stable across hyperparameter changes; ``name`` tells two guards apart."""
        return "GradGuard" if self.name is None else f"GradGuard[{self.name}]"

    def state_dict(self) -> dict[str, Any]:
        """Statistics, counters, backoff and warmup progress of every optimizer's guard."""
        cores = {i: c.state_dict() for i, c in self._cores.items()}
        cores.update({i: s for i, s in self._pending_state.items() if i not in cores})
        return {"version": STATE_VERSION, "cores": cores} if cores else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state; applied as soon as each optimizer's guard exists.

        Outside a fit (before it, or between two fits of a reused instance) the state waits
        for the next fit's guards.
        """
        if state_dict and state_dict.get("version") != STATE_VERSION:
            raise ValueError(
                f"{self.state_key} state has version {state_dict.get('version')!r}, this "
                f"lightning_gradguard reads version {STATE_VERSION}: the checkpoint was saved "
                "by another release; resume without the guard's state (delete "
                f"checkpoint['callbacks'][{self.state_key!r}]) to start its statistics afresh")
        for i, s in state_dict.get("cores", {}).items():
            if self._in_fit and int(i) in self._cores:
                self._cores[int(i)].load_state_dict(s)
            else:
                self._pending_state[int(i)] = s

    # ----------------------------------------------------------------- fit start
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check for conflicts with the Trainer's own settings (``_compat``); start a fit."""
        if stage == "fit":
            self._start_fit()
        check_trainer(self, GradGuardLogic, trainer, pl_module)

    def _start_fit(self) -> None:
        """Per-fit state starts fresh (a reused instance; ``load_state_dict`` comes after).

        The previous fit's guards are closed: their optimizers are gone, and a state restored
        from a checkpoint must reach the guards of this fit's optimizers. A state loaded
        before the fit (``load_state_dict``) is kept for them.
        """
        for core in self._cores.values():
            core.close()
        self._cores.clear()
        self._in_fit = True
        self._loss = None
        self.halt_checkpoint = None
        self._halt_pending = None
        self._stopping = False
        self.last_reports = {}
        self._bar_shown.clear()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse closure-based optimizers, warn about empty ones, write the TB layout."""
        check_optimizers(trainer.optimizers)
        for writer in tensorboard_writers(trainer):
            writer.add_custom_scalars(guard_layout())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build each optimizer's guard now, so its diagnosis probes the first forward pass."""
        for opt in trainer.optimizers:
            if trainable(raw_optimizer(opt)):
                self._core_for(trainer, pl_module, raw_optimizer(opt))

    def _core_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                  optimizer: Optimizer) -> tuple[int, GuardCore]:
        optimizers = trainer.optimizers
        idx = (0 if len(optimizers) == 1 else
               next((i for i, o in enumerate(optimizers) if raw_optimizer(o) is optimizer), 0))
        core = self._cores.get(idx)
        if core is None or core.optimizer is not optimizer:
            # several processes: one decision on all ranks, global norms of sharded grads
            core = GuardCore(pl_module, optimizer, self.settings, reducer=make_reducer(trainer))
            core.speaker.sink = self._say
            self._cores[idx] = core
        if idx in self._pending_state:
            core.load_state_dict(self._pending_state.pop(idx))
        if trainer.ckpt_path:
            core.resumed = True  # the first-step message names the checkpoint
        return idx, core

    # ----------------------------------------------------------------- gather
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        """Keep a reference to the batch (read for NaN/Inf only on a non-finite step).

        Under gradient accumulation every micro-batch of the optimizer step is kept (a NaN
        in the first of them is as much the step's as one in the last).
        """
        if self._window_done:
            self._batches, self._window_done = [], False
        self._batches.append(batch)

    def _step_batch(self) -> Any:
        """The batch of this optimizer step: the batch, or all its micro-batches."""
        if len(self._batches) == 1:
            return self._batches[0]
        return MicroBatches(self._batches) if self._batches else None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        """Remember the loss of the step (its finiteness is part of the decision).

        With gradient accumulation the micro-batches' losses are summed (each is already
        divided by the number of micro-batches), so a NaN in any of them is seen; a
        non-scalar loss (``manual_backward(loss, gradient=...)``) counts by its mean.

        Under a GradScaler Lightning passes the loss already multiplied by the loss scale:
        it is divided back on the device (no host read), so the loss history the diagnosis
        reads ("the loss became nan right after 0.52") is the user's loss, not the scale's.

        The forward pass is over: the diagnosis' one-shot forward probe ends here when the
        training step did not call the module itself (one read, on the first step only).
        """
        value = loss.detach()
        if value.dim():  # (a 0-dim loss, the usual case, needs no reshape: a view costs µs)
            value = value.reshape(()) if value.numel() == 1 else value.float().mean()
        scale = getattr(getattr(trainer.precision_plugin, "scaler", None), "_scale", None)
        if isinstance(scale, torch.Tensor):
            value = value.float() / scale.to(value.device).reshape(())
        self._loss = value if self._loss is None else self._loss + value
        for core in self._cores.values():
            core.end_forward()

    # ----------------------------------------------------------------- the step
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        """Hand the step to its optimizer's guard (measure, decide, act), then log it."""
        optimizer = raw_optimizer(optimizer)
        idx, core = self._core_for(trainer, pl_module, optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # fused optimizers unscale inside step(): unscale now so the guard sees true grads
            unscale_once_(scaler, optimizer)
        self._loss, loss = None, self._loss
        self._window_done = True
        if self._stopping:
            # halted, but the Trainer's min_steps/min_epochs keep it running: every guard
            # skips, a guard built after the halt too (GuardCore.stop)
            core.stop()
            core.step()
            return
        self._trainer = trainer
        consensus = core.reducer if isinstance(core.reducer, ConsensusReducer) else None
        try:
            report = core.step(loss if consensus is None else consensus.arm(loss),
                               amp_overflow=scaler is not None, step=trainer.global_step,
                               snapshot_extra=self._others(trainer, optimizer),
                               batch=self._step_batch())
        finally:
            if consensus is not None:
                consensus.disarm()
        if self._markdown:
            events_text(trainer, "\n\n".join(self._markdown))
            self._markdown = []
        self.last_reports[idx] = report
        self._log(trainer, idx, core, report)
        self._show_progress(trainer, pl_module)
        if report.halt:
            # act after the (skipped) step completes, so the checkpoint's loop state and the
            # guard's counters agree on where training is
            self._halt_pending = core

    @staticmethod
    def _others(trainer: pl.Trainer, optimizer: Optimizer | None) -> list[Optimizer]:
        """The Trainer's other optimizers (a rollback snapshot restores them too)."""
        if len(trainer.optimizers) < 2:
            return []
        return [raw_optimizer(o) for o in trainer.optimizers
                if raw_optimizer(o) is not optimizer]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Halt (checkpoint, message, stop or raise: ``_halt``) after a step that decided so."""
        core, self._halt_pending = self._halt_pending, None
        if core is None:
            return
        halted = halt(trainer, pl_module, core, others=self._others(trainer, core.optimizer),
                      checkpoint_dir=self.checkpoint_dir)
        self.halt_checkpoint = halted.checkpoint
        self._stopping = self.on_halt == "stop"
        halted.end(trainer, self.on_halt, self._cores.values())

    # ----------------------------------------------------------------- log
    def _say(self, notice: Notice) -> None:
        """The guards' notices: warnings and notices on rank 0, TensorBoard events text.

        The halt notice is left out: ``_halt`` says it, with where the weights went.
        """
        trainer = self._trainer
        if trainer is None or notice.kind is NoticeKind.HALT:
            return
        if notice.shown and notice.text and trainer.is_global_zero:
            if notice.level >= logging.WARNING:
                install_format()  # again: a module imported later may have replaced it
                rank_zero_warn(notice.text, category=GradGuardWarning)
            else:
                log.log(notice.level, notice.text)
        if notice.markdown:
            self._markdown.append(notice.markdown)  # written once the step is over

    def _log(self, trainer: pl.Trainer, idx: int, core: GuardCore, report: StepReport) -> None:
        step = trainer.global_step
        event = (report.action in (Action.SKIP, Action.AMP_SKIP) or report.spike
                 or report.backoff or report.rollback or report.halt)
        if not (event or should_log(trainer, step)):
            return
        log_scalars(trainer, guard_metrics(report, core.counters, idx), step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Show the progress-bar status again in the new epoch."""
        self._bar_shown.clear()

    def _show_progress(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Progress-bar status; logged only when a value changed (no per-step cost)."""
        if not self.progress_bar or getattr(trainer, "progress_bar_callback", None) is None:
            return
        cores = self._cores.values()
        values = {"gg_skip": float(sum(c.counters.skipped_steps for c in cores)),
                  "gg_clip": float(sum(c.counters.clipped_steps for c in cores))}
        scale = min(c.backoff.scale for c in cores)
        if scale < 1.0 or "gg_lr" in self._bar_shown:
            values["gg_lr"] = round(scale, 2)  # recovery moves it a little every step
        suffix = f"_{self.name}" if self.name else ""
        changed = {k + suffix: v for k, v in values.items() if self._bar_shown.get(k) != v}
        if not changed:
            return
        self._bar_shown.update(values)
        for key, value in changed.items():
            pl_module.log(key, value, prog_bar=True, logger=False, on_step=True,
                          on_epoch=False, batch_size=1)

    def summary(self) -> dict[str, Any]:
        """Counters over all optimizers as a plain ``dict``.

        Keys: ``steps``, ``nonfinite_steps``, ``skipped_steps``, ``spikes``,
        ``clipped_steps``, ``lr_backoffs``, ``lr_scale`` (the smallest over optimizers),
        ``rollbacks``, ``growth_events``, ``amp_overflow_steps``, ``halted``,
        ``halt_checkpoint`` (path or ``None``), ``reasons`` (LR backoffs and halts counted by
        their reason, e.g. ``{"update_capped": 2}``) and ``diagnosis`` (each cause once, in
        the order of the optimizers).

        Example:
            >>> GradGuard().summary()["steps"]
            0
        """
        keys = ("steps", "nonfinite_steps", "skipped_steps", "spikes", "clipped_steps",
                "lr_backoffs", "rollbacks", "growth_events", "amp_overflow_steps")
        each = [core.summary() for core in self._cores.values()]
        out: dict[str, Any] = {k: sum(s[k] for s in each) for k in keys}
        out["lr_scale"] = min([1.0] + [s["lr_scale"] for s in each])
        out["halted"] = any(s["halted"] for s in each)
        out["halt_checkpoint"] = str(self.halt_checkpoint) if self.halt_checkpoint else None
        reasons: dict[str, int] = {}
        diagnosis: dict[str, Any] = {}  # each cause once, the first optimizer's entry
        for s in each:
            for reason, n in s["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + n
            for entry in s["diagnosis"]:
                diagnosis.setdefault(entry["cause"], entry)
        out["reasons"] = reasons
        out["diagnosis"] = list(diagnosis.values())
        return out

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The fit is over: a later ``load_state_dict`` waits for the next fit."""
        if stage == "fit":
            self._in_fit = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put scheduled learning rates back; one line on rank 0 if the guard did anything."""
        for core in self._cores.values():
            core.restore_lr()
        if self.settings.verbose and trainer.is_global_zero:
            line = end_of_fit_line(self.summary())
            if line:
                log.info(line)


class GradGuard(GradGuardLogic, Callback):  # noqa: D101
    __doc__ = GradGuardLogic.__doc__
