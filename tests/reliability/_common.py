"""Shared runner for the reliability tests: tiny model, three precisions, fault + guard."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.testing import Fault, FaultInjector
from tests.callbacks._helpers import Recorder, TinyModule, fit, params_of

#: Steps per run; ZScoreClip's default warmup is 25 observations.
N_STEPS = 40
PRECISIONS = ("32", "bf16-mixed", "16-mixed+scaler")
COUNTERS = ("nonfinite_steps", "skipped_steps", "spikes", "clipped_steps",
            "amp_overflow_steps", "lr_backoffs", "rollbacks")


def precision_kwargs(precision: str) -> dict[str, Any]:
    """Trainer kwargs; fp16 uses a real GradScaler on CPU (plain '16-mixed' becomes bf16)."""
    if precision == "32":
        return {}
    if precision == "bf16-mixed":
        return {"precision": "bf16-mixed"}
    assert precision == "16-mixed+scaler"
    return {"plugins": [MixedPrecision("16-mixed", "cpu",
                                       scaler=torch.amp.GradScaler("cpu"))]}


def make_module() -> TinyModule:
    """``Linear(4, 8) - Tanh - Linear(8, 1)``, SGD with momentum (it has optimizer state)."""
    return TinyModule(opt="sgdm", lr=0.02)


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


@dataclass
class Run:
    trainer: pl.Trainer
    module: TinyModule
    guard: GradGuard
    rec: Recorder
    injector: FaultInjector
    params: list[torch.Tensor]
    #: the GradScaler's scale at the end (fp16 only)
    scale: float | None

    @property
    def summary(self) -> dict[str, Any]:
        return self.guard.summary()

    def counters(self) -> dict[str, int]:
        s = self.guard.summary()
        return {k: s[k] for k in COUNTERS}


def run(precision: str, faults: Sequence[Fault], guard: GradGuard, root: Path | str, *,
        before_guard: Sequence[Callback] = (), max_steps: int = N_STEPS) -> Run:
    """One fit of the tiny model with ``[injector, *before_guard, guard, recorder]``."""
    rec = Recorder(guard)
    injector = FaultInjector(faults)
    module = make_module()
    trainer = fit(module, max_steps, [injector, *before_guard, guard, rec],
                  default_root_dir=str(root), **precision_kwargs(precision))
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return Run(trainer, module, guard, rec, injector, params_of(module),
               None if scaler is None else float(scaler.get_scale()))


def rel(a: float, b: float) -> float:
    return abs(a / b - 1.0)
