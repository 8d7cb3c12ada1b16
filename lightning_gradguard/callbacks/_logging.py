"""Logger-agnostic scalar logging shared by the callbacks.

Scalars go to every logger of the Trainer through ``logger.log_metrics(metrics, step)``,
which writes immediately (``pl_module.log`` would only reach the logger at the logging
interval, so an event between intervals would be invisible). Rank 0 only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl

__all__ = ["log_scalars", "should_log"]


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
