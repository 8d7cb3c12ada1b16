"""Quiet CPU Trainers and fits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from .recorders import NonFiniteRecorder

if TYPE_CHECKING:
    from lightning_gradguard.demos import DemoConfig


def make_trainer(max_steps: int, callbacks: Sequence[Callback] = (),
                 root: Path | str | None = None, **kwargs: Any) -> pl.Trainer:
    """A deterministic one-device CPU Trainer without logger, checkpoints, progress bar, model
    summary or sanity check; ``root`` is ``default_root_dir``; ``kwargs`` override any of it."""
    opts: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "max_steps": max_steps,
        "num_sanity_val_steps": 0, "deterministic": True,
    }
    if root is not None:
        opts["default_root_dir"] = str(root)
    opts.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **opts)


def fit(module: pl.LightningModule, max_steps: int, callbacks: Sequence[Callback] = (),
        seed: int = 0, ckpt_path: str | None = None, **kwargs: Any) -> pl.Trainer:
    """``seed_everything(seed)``, then ``make_trainer(max_steps, callbacks, **kwargs).fit``."""
    pl.seed_everything(seed, verbose=False)
    trainer = make_trainer(max_steps, callbacks, **kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def precision_kwargs(precision: str) -> dict[str, Any]:
    """Trainer kwargs for ``"32"``, ``"bf16-mixed"`` or ``"16-mixed+scaler"``: fp16 uses a
    real GradScaler on CPU (plain ``"16-mixed"`` becomes bf16 there)."""
    if precision == "32":
        return {}
    if precision == "bf16-mixed":
        return {"precision": "bf16-mixed"}
    assert precision == "16-mixed+scaler"
    return {"plugins": [MixedPrecision("16-mixed", "cpu",
                                       scaler=torch.amp.GradScaler("cpu"))]}


def run_config(config: DemoConfig[Any, Any], stop_on_nonfinite: bool = False,
               **trainer_kwargs: Any) -> tuple[NonFiniteRecorder, pl.Trainer]:
    """Build the demo ``config`` (seeded) and fit it for ``config.max_steps`` steps without
    any guard, recording every step's loss and gradient finiteness."""
    model, datamodule = config.build()
    recorder = NonFiniteRecorder(stop_on_nonfinite=stop_on_nonfinite)
    trainer = make_trainer(config.max_steps, [recorder], **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule)
    return recorder, trainer
