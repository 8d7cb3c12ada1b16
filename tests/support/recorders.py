"""Callbacks that record what a run did (or change it in a known way, as a reference)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from .state import opt_tensors, params_of


class Recorder(Callback):
    """Records per step: the LR the update used (``on_before_optimizer_step``; list it
    AFTER GradGuard), the scheduled LR after the step (``on_train_batch_end``) and,
    optionally, the guard's threshold after the step.

    Keys of ``used_lr`` / ``sched_lr`` / ``threshold`` are the 0-based ``global_step`` of the
    optimizer step.
    """

    def __init__(self, guard: Any = None) -> None:
        self.guard = guard
        self.used_lr: dict[int, list[float]] = {}
        self.sched_lr: dict[int, list[float]] = {}
        self.threshold: dict[int, float] = {}
        self.grad_none: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        self.used_lr[step] = [float(g["lr"]) for g in optimizer.param_groups]
        self.grad_none[step] = all(p.grad is None for p in pl_module.parameters())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step - 1
        opt = trainer.optimizers[0]
        self.sched_lr[step] = [float(g["lr"]) for g in opt.param_groups]
        if self.guard is not None and self.guard.cores:
            self.threshold[step] = float(self.guard.cores[0].policy.threshold())


class StateAround(Callback):
    """Captures params + optimizer state at the end of step ``k - 1`` and of step ``k``."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.before: tuple[list[torch.Tensor], dict[str, Any]] | None = None
        self.after: tuple[list[torch.Tensor], dict[str, Any]] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        done = trainer.global_step - 1  # the optimizer step that just finished
        snap = (params_of(pl_module), opt_tensors(trainer.optimizers[0]))
        if done == self.k - 1:
            self.before = snap
        elif done == self.k:
            self.after = snap


class ClearGradsAt(Callback):
    """Reference for a skipped step: clears every grad at ``step`` (list it BEFORE the guard).

    The guard then sees an empty step (no statistics change), the optimizer leaves weights and
    state untouched, and Lightning still counts the step — exactly what a true skip does.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.grad = None


class NonFiniteRecorder(Callback):
    """Record every step's loss and whether all gradients were finite.

    Steps are 1-based optimizer steps. With ``stop_on_nonfinite`` the fit stops at the end of the
    first step whose loss or gradients are non-finite (keeps explode tests fast).
    """

    def __init__(self, stop_on_nonfinite: bool = False) -> None:
        self.stop_on_nonfinite = stop_on_nonfinite
        self.losses: list[float] = []
        self.grads_finite: list[bool] = []
        self.first_nonfinite: int | None = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grads_finite.append(all(bool(torch.isfinite(g).all()) for g in grads))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = float(outputs["loss"].detach())
        self.losses.append(loss)
        step = len(self.losses)
        finite = math.isfinite(loss) and self.grads_finite[step - 1]
        if not finite and self.first_nonfinite is None:
            self.first_nonfinite = step
            if self.stop_on_nonfinite:
                trainer.should_stop = True
