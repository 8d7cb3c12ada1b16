"""Logger-agnostic scalar logging shared by the callbacks.

Scalars go to every logger of the Trainer through ``logger.log_metrics(metrics, step)``,
which writes immediately (``pl_module.log`` would only reach the logger at the logging
interval, so an event between intervals would be invisible). Rank 0 only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from lightning_gradguard import _tags

__all__ = [
    "events_text", "guard_layout", "guard_metrics", "log_scalars", "should_log",
    "tensorboard_writers",
]


def should_log(trainer: pl.Trainer, step: int) -> bool:
    """Whether ``step`` is on the Trainer's logging interval (``log_every_n_steps``)."""
    every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))
    return step % every == 0


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Write finite ``metrics`` at ``step`` to every logger (rank 0 only; no-op without one).

    Non-finite values are dropped (TensorBoard plots them as gaps anyway, CSV/MLflow may
    reject them); the counters always tell that a non-finite step happened.
    """
    if not trainer.is_global_zero or not trainer.loggers:
        return
    clean = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    if not clean:
        return
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """``SummaryWriter`` s of the Trainer's TensorBoard loggers (rank 0 only).

    Works for both ``lightning.pytorch`` and ``pytorch_lightning`` loggers (matched by class
    name in the MRO, so neither package has to be imported).
    """
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers  # type: ignore[attr-defined]
            if any(c.__name__ == "TensorBoardLogger" for c in type(lg).__mro__)]


def events_text(trainer: pl.Trainer, message: str) -> None:
    """Write ``message`` as the ``gradguard/events`` text at the current step (TensorBoard)."""
    for writer in tensorboard_writers(trainer):
        writer.add_text(_tags.GUARD_EVENTS, message, trainer.global_step)


def guard_layout() -> dict[str, Any]:
    """GradGuard's TensorBoard custom-scalars layout: norms, counters, LR scale."""
    return {
        "gradguard": {
            "gradient norm": ["Multiline", [_tags.GUARD_GRAD_NORM, _tags.GUARD_CLIP_THRESHOLD,
                                            _tags.GUARD_GRAD_NORM_CLIPPED]],
            "interventions": ["Multiline", [_tags.guard_tag(k) for k in _tags.GUARD_COUNTERS]],
            "LR scale": ["Multiline", [_tags.GUARD_LR_SCALE]],
        }
    }


def guard_metrics(report: Any, counters: Any, index: int) -> dict[str, float]:
    """GradGuard's scalars of one step: the report's norms, threshold and LR scale, the counters.

    Tags of optimizer ``index > 0`` end in ``/optimizer{index}``.
    """
    metrics = {
        _tags.GUARD_GRAD_NORM: report.grad_norm,
        _tags.GUARD_GRAD_NORM_CLIPPED: report.grad_norm_clipped,
        _tags.GUARD_CLIP_THRESHOLD: report.threshold,
        _tags.GUARD_LR_SCALE: report.lr_scale,
    }
    metrics.update({_tags.guard_tag(k): float(getattr(counters, k)) for k in _tags.GUARD_COUNTERS})
    suffix = "" if index == 0 else f"/optimizer{index}"
    return {k + suffix: v for k, v in metrics.items()}
