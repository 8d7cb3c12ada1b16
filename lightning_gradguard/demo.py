"""``gradguard demo``: a model that explodes, trained without and with ``GradGuard()``.

Both runs use the same seed, data and hyperparameters (a demo "explode" scenario from
:mod:`lightning_gradguard.demos`). The run without the guard has a
:class:`~lightning_gradguard.GradientMonitor` so its gradient norms are visible in
TensorBoard too. Logs go to ``LOGDIR/<model>/no_guard`` and ``LOGDIR/<model>/gradguard``.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEMO_MODELS", "DemoResult", "format_table", "run_demo"]

DEMO_MODELS = ("lstm", "rnn", "mlp", "residual")


@dataclass(frozen=True)
class DemoResult:
    """Outcome of one demo run."""

    name: str
    steps: int
    final_train_loss: float
    final_val_loss: float
    nonfinite_steps: int
    skipped_steps: int
    clipped_steps: int
    lr_backoffs: int
    log_dir: str


def _config(model: str) -> Any:
    from lightning_gradguard import demos

    if model == "lstm":
        return demos.AddingProblemRNN.explode_config()
    if model == "rnn":
        cfg = demos.AddingProblemRNN.explode_config()
        kwargs = {**cfg.model_kwargs, "cell": "rnn"}
        return demos.DemoConfig(cfg.kind, cfg.model_cls, kwargs, cfg.datamodule_cls,
                                cfg.datamodule_kwargs, cfg.max_steps, cfg.seed,
                                cfg.description)
    if model == "mlp":
        return demos.DeepMLP.explode_config()
    if model == "residual":
        return demos.ResidualMLP.explode_config()
    raise ValueError(f"`model` must be one of {DEMO_MODELS!r}, got {model!r}")


def _run_one(model: str, guarded: bool, steps: int, logdir: Path, progress: bool) -> DemoResult:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradguard.callbacks import GradGuard, GradientMonitor

    class _LastLoss(Callback):
        def __init__(self) -> None:
            self.loss = math.nan
            self.nonfinite = 0

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self.loss = float(loss.detach())
                self.nonfinite += int(not math.isfinite(self.loss))

    cfg = _config(model)
    net, data = cfg.build()
    name = "gradguard" if guarded else "no_guard"
    logger = TensorBoardLogger(save_dir=str(logdir), name=model, version=name,
                               default_hp_metric=False)
    last = _LastLoss()
    guard = GradGuard() if guarded else None
    callbacks: list[Callback] = [last, guard if guard is not None else GradientMonitor()]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
        log_every_n_steps=10, val_check_interval=None, check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, datamodule=data)
        val = trainer.validate(net, datamodule=data, verbose=False)
    val_loss = float(val[0].get("val_loss", math.nan)) if val else math.nan
    summary = guard.summary() if guard is not None else {}
    nonfinite = summary.get("nonfinite_steps", last.nonfinite) if guard else last.nonfinite
    return DemoResult(
        name="GradGuard()" if guarded else "no guard", steps=trainer.global_step,
        final_train_loss=last.loss, final_val_loss=val_loss, nonfinite_steps=int(nonfinite),
        skipped_steps=int(summary.get("skipped_steps", 0)),
        clipped_steps=int(summary.get("clipped_steps", 0)),
        lr_backoffs=int(summary.get("lr_backoffs", 0)), log_dir=str(logger.log_dir),
    )


def format_table(results: list[DemoResult]) -> str:
    """Side-by-side table of demo results.

    Example:
        >>> r = DemoResult("no guard", 10, float("nan"), float("nan"), 3, 0, 0, 0, "x")
        >>> print(format_table([r]).splitlines()[2])
        final train loss        nan
    """
    rows = [
        ("", [r.name for r in results]),
        ("steps", [str(r.steps) for r in results]),
        ("final train loss", [f"{r.final_train_loss:.4g}" for r in results]),
        ("final val loss", [f"{r.final_val_loss:.4g}" for r in results]),
        ("non-finite steps", [str(r.nonfinite_steps) for r in results]),
        ("skipped steps", [str(r.skipped_steps) for r in results]),
        ("clipped steps", [str(r.clipped_steps) for r in results]),
        ("LR backoffs", [str(r.lr_backoffs) for r in results]),
    ]
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(r[1][i]) for r in rows) for i in range(len(results))]
    return "\n".join(
        f"{label:<{w0}}" + "".join(f"   {v:>{widths[i]}}" for i, v in enumerate(vals))
        for label, vals in rows
    )


def run_demo(model: str = "lstm", steps: int | None = None,
             logdir: str | os.PathLike[str] = "gradguard_runs",
             progress: bool = True) -> list[DemoResult]:
    """Run the demo: the explode scenario of ``model`` without and with ``GradGuard()``.

    Args:
        model: One of ``"lstm"``, ``"rnn"``, ``"mlp"``, ``"residual"``.
        steps: Optimizer steps per run (default: 5x the scenario's explosion bound, 300 for
            the LSTM: long enough to see the guarded run converge).
        logdir: TensorBoard log directory.
        progress: Show Lightning's progress bar.

    Returns:
        The two :class:`DemoResult` s (without, with the guard).
    """
    cfg = _config(model)
    n = steps if steps is not None else cfg.max_steps * 5
    if n < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps!r}")
    out = Path(logdir)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo models are tiny: one thread is several times faster
    try:
        return [_run_one(model, guarded, n, out, progress) for guarded in (False, True)]
    finally:
        torch.set_num_threads(threads)
