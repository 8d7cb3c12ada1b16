"""``GradGuard``: the Lightning adapter over :class:`~lightning_gradguard.core.GuardCore`.

Hook -> gather grads -> core -> act -> log. All decisions live in the core; this module
only knows Lightning: where the gradients are ready (``on_before_optimizer_step``: after
accumulation and GradScaler unscaling, before Lightning's own clipping and the update), how
to stop a run, where to write a checkpoint, and how to log.

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
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

from lightning_gradguard import _tags
from lightning_gradguard.callbacks._distributed import ConsensusReducer, make_reducer
from lightning_gradguard.callbacks._logging import log_scalars, should_log, tensorboard_writers
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
from lightning_gradguard.core.messages import causes_text, end_of_fit_line
from lightning_gradguard.core.norms import grad_norms
from lightning_gradguard.core.notices import Notice, NoticeKind, log
from lightning_gradguard.core.policies import ClipPolicy

__all__ = ["GradGuard", "GradGuardHalt", "GradGuardLogic", "GradGuardWarning"]

log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():  # as Lightning does for its own logger
    log.addHandler(logging.StreamHandler())
    log.propagate = False


class GradGuardHalt(RuntimeError):
    """Raised by ``GradGuard(on_halt="raise")`` when training cannot recover."""


def _overrides_clipping(pl_module: Any) -> bool:
    """Whether the module's class (not Lightning's) defines ``configure_gradient_clipping``."""
    for cls in type(pl_module).__mro__:
        if "configure_gradient_clipping" in vars(cls):
            return not cls.__module__.startswith(("lightning.", "pytorch_lightning."))
    return False


_CKPT_NAME = "gradguard_last_good.ckpt"


def _min_keeps_running(trainer: pl.Trainer) -> str:
    """The Trainer minimum (``"min_steps=N"``) that keeps a stopped run going, else ``""``.

    Lightning ignores ``should_stop`` until ``min_steps`` / ``min_epochs`` are reached.
    """
    loop = getattr(trainer, "fit_loop", None)
    min_steps = getattr(getattr(loop, "epoch_loop", None), "min_steps", None) or 0
    min_epochs = getattr(loop, "min_epochs", None) or 0
    if min_steps and trainer.global_step < min_steps:
        return f"min_steps={min_steps}"
    if min_epochs and trainer.current_epoch < min_epochs:
        return f"min_epochs={min_epochs}"
    return ""


def _refuse_closure_optimizer(index: int, optimizer: Optimizer) -> None:
    """Raise for optimizers that evaluate the closure several times per step (LBFGS).

    Such an optimizer runs ``on_before_optimizer_step`` once per function evaluation inside
    its ``step`` and reads its learning rate before the closure: every evaluation would count
    as a step (skewing halt, rollback and spike windows), a skip would feed it zero
    gradients, and an LR backoff would never reach its update.
    """
    if isinstance(optimizer, torch.optim.LBFGS) or "LBFGS" in type(optimizer).__name__:
        raise ValueError(
            f"GradGuard does not support optimizer {index} ({type(optimizer).__name__}): it "
            "evaluates the closure several times per step, so GradGuard would count function "
            "evaluations as steps and its LR backoff could not reach the update. Use "
            "GradientMonitor to watch the gradients, or a first-order optimizer (SGD, Adam, "
            "AdamW) with GradGuard.")


def _raw(optimizer: Any) -> Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)  # type: ignore[no-any-return]


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

    # ----------------------------------------------------------------- setup checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check for conflicts with the Trainer's own settings; start a fit afresh."""
        if stage == "fit":
            self._start_fit()
        callbacks = getattr(trainer, "callbacks", [])
        same = [cb for cb in callbacks if isinstance(cb, GradGuardLogic) and cb is not self
                and cb.state_key == self.state_key]
        if same:
            raise ValueError(
                f"Two GradGuard callbacks share state_key {self.state_key!r}; "
                "give each a distinct `name=` (e.g. GradGuard(name='a'), GradGuard(name='b'))"
            )
        strategy = type(trainer.strategy).__name__
        if "DeepSpeed" in strategy:
            raise ValueError(
                "GradGuard does not support DeepSpeed: its engine steps the optimizer itself, "
                "so a step cannot be skipped by clearing gradients. Use DeepSpeed's own "
                "`gradient_clipping` config, or a DDP/FSDP strategy with GradGuard."
            )
        if _overrides_clipping(pl_module):
            rank_zero_warn(
                f"{type(pl_module).__name__} overrides `configure_gradient_clipping`. It still "
                "runs, after GradGuard, on every step GradGuard does not skip, and sees the "
                "gradients GradGuard already clipped; on skipped steps the gradients are None. "
                "If it clips too, the effective threshold is the smaller of the two: remove "
                "the override's clipping to let GradGuard adapt."
            )
        if trainer.gradient_clip_val:
            rank_zero_warn(
                f"GradGuard and Trainer(gradient_clip_val={trainer.gradient_clip_val}) are both "
                "active. GradGuard runs first (it skips non-finite steps and clips spikes to "
                "its adaptive threshold); Lightning then clips the result again to "
                "gradient_clip_val, so the effective threshold is the smaller of the two. "
                "Remove `gradient_clip_val` to let GradGuard adapt, or use "
                "GradGuard(clip=FixedNormClip(...)) for a fixed threshold with GradGuard's "
                "skipping and backoff."
            )

    def _start_fit(self) -> None:
        """Per-fit state starts fresh (a reused instance; ``load_state_dict`` comes after).

        The previous fit's guards are closed: their optimizers are gone, and a state restored
        from a checkpoint must reach the guards of this fit's optimizers. A state loaded
        before the fit (``load_state_dict``) is kept for them.
        """
        for core in self._cores.values():
            core.close()
        self._cores = {}
        self._in_fit = True
        self._loss = None
        self.halt_checkpoint = None
        self._halt_pending = None
        self._stopping = False
        self.last_reports = {}
        self._bar_shown.clear()

    # ----------------------------------------------------------------- TensorBoard
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse closure-based optimizers, warn about empty ones, write the TB layout."""
        for i, opt in enumerate(trainer.optimizers):
            raw = _raw(opt)
            _refuse_closure_optimizer(i, raw)
            groups = getattr(raw, "param_groups", [])
            if not any(p.requires_grad for g in groups for p in g["params"]):
                rank_zero_warn(
                    f"GradGuard: optimizer {i} ({type(raw).__name__}) has no trainable "
                    "parameters (its param groups are empty or every parameter has "
                    "requires_grad=False): there is nothing to guard."
                )
        layout = {
            "gradguard": {
                "gradient norm": ["Multiline", [_tags.GUARD_GRAD_NORM,
                                                _tags.GUARD_CLIP_THRESHOLD,
                                                _tags.GUARD_GRAD_NORM_CLIPPED]],
                "interventions": ["Multiline", [_tags.guard_tag(k)
                                                for k in _tags.GUARD_COUNTERS]],
                "LR scale": ["Multiline", [_tags.GUARD_LR_SCALE]],
            }
        }
        for writer in tensorboard_writers(trainer):
            writer.add_custom_scalars(layout)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build each optimizer's guard now, so its diagnosis probes the first forward pass."""
        for opt in trainer.optimizers:
            raw = _raw(opt)
            if any(p.requires_grad for g in getattr(raw, "param_groups", [])
                   for p in g["params"]):
                self._core_for(trainer, pl_module, raw)

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

    def _text(self, trainer: pl.Trainer, message: str) -> None:
        for writer in tensorboard_writers(trainer):
            writer.add_text(_tags.GUARD_EVENTS, message, trainer.global_step)

    # ----------------------------------------------------------------- the step
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
            if core.diagnostician is not None and not core.preflight_done:
                core.diagnostician.finish_probe()

    def _core_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                  optimizer: Optimizer) -> tuple[int, GuardCore]:
        optimizers = trainer.optimizers
        idx = (0 if len(optimizers) == 1
               else next((i for i, o in enumerate(optimizers) if _raw(o) is optimizer), 0))
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

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        """Measure, decide and act on this optimizer step."""
        optimizer = _raw(optimizer)
        idx, core = self._core_for(trainer, pl_module, optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # fused optimizers unscale inside step(): unscale now so the guard sees true grads
            unscale_once_(scaler, optimizer)
        if self._stopping:
            # halted, but the Trainer's min_steps/min_epochs keep it running: every guard
            # skips (GuardCore.stop), once told
            core.stop()  # (a guard built after the halt too)
            core.step()
            self._loss = None
            self._window_done = True
            return
        others = ([_raw(o) for o in trainer.optimizers if _raw(o) is not optimizer]
                  if len(trainer.optimizers) > 1 else ())
        self._trainer = trainer
        consensus = core.reducer if isinstance(core.reducer, ConsensusReducer) else None
        loss = self._loss if consensus is None else consensus.arm(self._loss)
        try:
            report = core.step(loss, amp_overflow=scaler is not None, snapshot_extra=others,
                               step=trainer.global_step, batch=self._step_batch())
        finally:
            if consensus is not None:
                consensus.disarm()
        self._loss = None
        self._window_done = True
        if self._markdown:
            self._text(trainer, "\n\n".join(self._markdown))
            self._markdown = []
        self.last_reports[idx] = report
        self._log(trainer, idx, core, report)
        self._show_progress(trainer, pl_module)
        if report.halt:
            # act after the (skipped) step completes, so the checkpoint's loop state and the
            # guard's counters agree on where training is
            self._halt_pending = core

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Halt (checkpoint, message, stop or raise) after a step that decided so."""
        core, self._halt_pending = self._halt_pending, None
        if core is not None:
            self._halt(trainer, pl_module, core)

    # ----------------------------------------------------------------- halt
    def _checkpoint_path(self, trainer: pl.Trainer) -> Path | str:
        base = os.fspath(self.checkpoint_dir or trainer.log_dir or trainer.default_root_dir)
        if "://" in base:  # a URL (s3://, gs://, memory://): never through pathlib
            return base.rstrip("/") + "/" + _CKPT_NAME
        return Path(base) / _CKPT_NAME

    def _save_halt_checkpoint(self, trainer: pl.Trainer, path: Path | str) -> str | None:
        """Save through the Trainer's fsspec-aware checkpoint IO; return why it failed, or None.

        The write is atomic (``_atomic_save``), local or remote (s3://, gs://, memory://).
        """
        error: str | None = None
        try:
            if trainer.is_global_zero:
                get_filesystem(path).makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
            trainer.save_checkpoint(path)
        except Exception as exc:  # a failed save must not lose the diagnosis
            error = f"{type(exc).__name__}: {exc}"
        trainer.strategy.barrier("gradguard_halt_checkpoint")
        return error

    def _halt(self, trainer: pl.Trainer, pl_module: pl.LightningModule, core: GuardCore) -> None:
        # the same answer on every rank (what follows saves a checkpoint: a collective)
        params_ok = bool(torch.isfinite(grad_norms(
            [p.detach() for p in pl_module.parameters()], per_tensor=False,
            reducer=core.reducer).total))
        if not params_ok:
            others = [_raw(o) for o in trainer.optimizers if _raw(o) is not core.optimizer]
            params_ok = core.restore_snapshot(others)
        head = f"GradGuard halted training: {core.halt_facts.rstrip('.')}."
        kept = _min_keeps_running(trainer)
        if kept:
            head += (f" The Trainer's {kept} keeps the run going past this stop: GradGuard "
                     "skips every remaining step (the weights stay as they are now).")
        path = self._checkpoint_path(trainer)
        where: str
        if params_ok:
            error = self._save_halt_checkpoint(trainer, path)
            if error is None:
                self.halt_checkpoint = path
                where = f"The last good weights were saved to {path}"
            else:
                where = (f"The last good weights could NOT be saved to {path} ({error}); set "
                         "GradGuard(checkpoint_dir=...) to a writable directory")
        else:
            where = ("The weights themselves are non-finite and no snapshot exists: nothing "
                     "was saved (use GradGuard(rollback=True) to keep a last-good snapshot)")
        msg = f"{head} {where}." + ("\nLikely causes, most likely first:\n"
                                     + causes_text(core.causes) if core.causes else "")
        log.error(msg)  # whatever happened to the checkpoint, the diagnosis is not lost
        self._text(trainer, f"{_tags.HALT_MARKER} — {msg}")
        if self.on_halt == "raise":
            raise GradGuardHalt(msg)
        trainer.should_stop = True
        self._stopping = True
        for other in self._cores.values():
            other.stop()

    # ----------------------------------------------------------------- messages
    def _say(self, notice: Notice) -> None:
        """The guards' notices: warnings and notices on rank 0, TensorBoard events text.

        The halt notice is left out: :meth:`_halt` says it, with where the weights went.
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

    # ----------------------------------------------------------------- reporting
    def _log(self, trainer: pl.Trainer, idx: int, core: GuardCore, report: StepReport) -> None:
        step = trainer.global_step
        event = (report.action in (Action.SKIP, Action.AMP_SKIP) or report.spike
                 or report.backoff or report.rollback or report.halt)
        if not (event or should_log(trainer, step)):
            return
        suffix = "" if idx == 0 else f"/optimizer{idx}"
        c = core.counters
        metrics = {
            _tags.GUARD_GRAD_NORM: report.grad_norm,
            _tags.GUARD_GRAD_NORM_CLIPPED: report.grad_norm_clipped,
            _tags.GUARD_CLIP_THRESHOLD: report.threshold,
            _tags.GUARD_LR_SCALE: report.lr_scale,
        }
        metrics.update({_tags.guard_tag(k): float(getattr(c, k)) for k in _tags.GUARD_COUNTERS})
        log_scalars(trainer, {k + suffix: v for k, v in metrics.items()}, step)

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
        their reason, e.g. ``{"update_capped": 2}``) and ``diagnosis``.

        Example:
            >>> GradGuard().summary()["steps"]
            0
        """
        keys = ("steps", "nonfinite_steps", "skipped_steps", "spikes", "clipped_steps",
                "lr_backoffs", "rollbacks", "growth_events", "amp_overflow_steps")
        out: dict[str, Any] = dict.fromkeys(keys, 0)
        out["lr_scale"] = 1.0
        out["halted"] = False
        reasons: dict[str, int] = {}
        for core in self._cores.values():
            s = core.summary()
            for k in keys:
                out[k] += s[k]
            for reason, n in s["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + n
            out["lr_scale"] = min(out["lr_scale"], s["lr_scale"])
            out["halted"] = out["halted"] or s["halted"]
        out["halt_checkpoint"] = str(self.halt_checkpoint) if self.halt_checkpoint else None
        out["reasons"] = reasons
        seen: set[str] = set()
        out["diagnosis"] = []
        for core in self._cores.values():
            for entry in core.summary()["diagnosis"]:
                if entry["cause"] not in seen:
                    seen.add(entry["cause"])
                    out["diagnosis"].append(entry)
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
