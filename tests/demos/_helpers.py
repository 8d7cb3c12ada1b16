"""Shared helpers for the demo tests: a non-finite recorder and a minimal Trainer."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradguard.demos import DemoConfig


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


def make_trainer(max_steps: int, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer without logger, checkpoints, progress bar or model summary."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def run_config(
    config: DemoConfig[Any, Any], stop_on_nonfinite: bool = False, **trainer_kwargs: Any
) -> tuple[NonFiniteRecorder, pl.Trainer]:
    """Build ``config`` (seeded) and fit it for ``config.max_steps`` steps without any guard."""
    model, datamodule = config.build()
    recorder = NonFiniteRecorder(stop_on_nonfinite=stop_on_nonfinite)
    trainer = make_trainer(config.max_steps, [recorder], **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule)
    return recorder, trainer
