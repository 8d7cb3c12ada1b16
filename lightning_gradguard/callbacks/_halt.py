"""How :class:`~lightning_gradguard.GradGuard` ends a run its core decided to halt.

The core decides *that* training halts (``StepReport.halt``) and says *why*
(``GuardCore.halt_facts``, ``GuardCore.causes``); this module does what only the Lightning
side can, after the (skipped) step has completed, so the checkpoint's loop state and the
guard's counters agree on where training is:

1. **weights**: if the module's weights are non-finite, the core restores its last-good
   snapshot (``GuardCore.restore_snapshot``, counted in ``rollbacks``); without one nothing
   is saved. The check is one fused norm over the module's parameters, reduced over the
   ranks, so every rank gives the same answer (what follows is a collective);
2. **checkpoint**: ``gradguard_last_good.ckpt`` under ``checkpoint_dir`` (default: the
   Trainer's ``log_dir``, else ``default_root_dir``), local or a URL (``s3://``, ``gs://``,
   ``memory://``), written atomically through the Trainer's checkpoint IO;
3. **message**: the facts, where the weights went (or why they could not be saved), a
   Trainer ``min_steps``/``min_epochs`` that keeps the run going, then the ranked causes:
   logged as an ERROR on every verbosity, and written to TensorBoard's events text;
4. **end**: ``on_halt="raise"`` raises :class:`GradGuardHalt`; ``"stop"`` sets
   ``trainer.should_stop`` and stops every optimizer's guard (``GuardCore.stop``), so the
   steps a Trainer minimum still runs leave every weight as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from torch.optim import Optimizer

from lightning_gradguard import _tags
from lightning_gradguard.callbacks._logging import events_text
from lightning_gradguard.core.guard import GuardCore
from lightning_gradguard.core.messages import causes_text
from lightning_gradguard.core.norms import NormReducer, grad_norms
from lightning_gradguard.core.notices import log

__all__ = ["CKPT_NAME", "GradGuardHalt", "Halted", "checkpoint_path", "halt",
           "min_keeps_running", "weights_finite"]

#: the file name of the last-good checkpoint written at a halt
CKPT_NAME = "gradguard_last_good.ckpt"


class GradGuardHalt(RuntimeError):
    """Raised by ``GradGuard(on_halt="raise")`` when training cannot recover."""


def checkpoint_path(checkpoint_dir: str | os.PathLike[str] | None, trainer: Any) -> Path | str:
    """Where the halt checkpoint goes: a ``Path``, or a ``str`` for a URL (never pathlib).

    Example:
        >>> checkpoint_path("s3://bucket/run/", None)
        's3://bucket/run/gradguard_last_good.ckpt'
    """
    base = os.fspath(checkpoint_dir or trainer.log_dir or trainer.default_root_dir)
    if "://" in base:  # a URL (s3://, gs://, memory://): never through pathlib
        return base.rstrip("/") + "/" + CKPT_NAME
    return Path(base) / CKPT_NAME


def save_checkpoint(trainer: Any, path: Path | str) -> str | None:
    """Save through the Trainer's fsspec-aware checkpoint IO; return why it failed, or None.

    The write is atomic (``_atomic_save``), local or remote (s3://, gs://, memory://); every
    rank waits for it.
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


def min_keeps_running(trainer: Any) -> str:
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


def weights_finite(module: torch.nn.Module, reducer: NormReducer | None) -> bool:
    """Whether every parameter of ``module`` is finite (the same answer on every rank).

    Example:
        >>> weights_finite(torch.nn.Linear(2, 1), None)
        True
    """
    params = [p.detach() for p in module.parameters()]
    return bool(torch.isfinite(grad_norms(params, per_tensor=False, reducer=reducer).total))


@dataclass(frozen=True)
class Halted:
    """A halt that was handled: its message, and where the last good weights went."""

    #: the full message (facts, where the weights went, the ranked causes)
    message: str
    #: the checkpoint written (``None``: nothing was saved)
    checkpoint: Path | str | None

    def end(self, trainer: Any, on_halt: str, cores: Iterable[GuardCore]) -> None:
        """Raise :class:`GradGuardHalt` (``on_halt="raise"``), or stop the run and every guard.

        Raises:
            GradGuardHalt: With ``on_halt="raise"``.
        """
        if on_halt == "raise":
            raise GradGuardHalt(self.message)
        trainer.should_stop = True
        for core in cores:
            core.stop()


def halt(trainer: Any, pl_module: torch.nn.Module, core: GuardCore, *,
         others: Sequence[Optimizer], checkpoint_dir: str | os.PathLike[str] | None) -> Halted:
    """Restore finite weights if needed, save them, and say so (steps 1-3 above).

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.
        core: The guard that decided to halt.
        others: The Trainer's other optimizers (restored with a snapshot).
        checkpoint_dir: ``GradGuard(checkpoint_dir=...)``.

    Returns:
        The message and the checkpoint; :meth:`Halted.end` ends the run.
    """
    # the same answer on every rank (what follows saves a checkpoint: a collective)
    params_ok = weights_finite(pl_module, core.reducer) or core.restore_snapshot(others)
    head = f"GradGuard halted training: {core.halt_facts.rstrip('.')}."
    kept = min_keeps_running(trainer)
    if kept:
        head += (f" The Trainer's {kept} keeps the run going past this stop: GradGuard "
                 "skips every remaining step (the weights stay as they are now).")
    path = checkpoint_path(checkpoint_dir, trainer)
    saved: Path | str | None = None
    if not params_ok:
        where = ("The weights themselves are non-finite and no snapshot exists: nothing "
                 "was saved (use GradGuard(rollback=True) to keep a last-good snapshot)")
    elif (error := save_checkpoint(trainer, path)) is None:
        saved = path
        where = f"The last good weights were saved to {path}"
    else:
        where = (f"The last good weights could NOT be saved to {path} ({error}); set "
                 "GradGuard(checkpoint_dir=...) to a writable directory")
    msg = f"{head} {where}." + ("\nLikely causes, most likely first:\n"
                                 + causes_text(core.causes) if core.causes else "")
    log.error(msg)  # whatever happened to the checkpoint, the diagnosis is not lost
    events_text(trainer, f"{_tags.HALT_MARKER} — {msg}")
    return Halted(msg, saved)
