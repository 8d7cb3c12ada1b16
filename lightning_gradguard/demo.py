"""``gradguard demo``: a model that explodes, trained without and with ``GradGuard()``.

Both runs use the same seed, data and hyperparameters (a demo "explode" scenario from
:mod:`lightning_gradguard.demos`). The run without the guard has a
:class:`~lightning_gradguard.GradientMonitor` so its gradient norms are visible in
TensorBoard too (under its own ``gradmonitor/`` tags). Each call writes into a new
versioned folder, as Lightning's
``version_N``: ``LOGDIR/<model>/version_N/no_guard`` and ``.../gradguard``, so repeated demos
never mix their event files. Every step is logged (``log_every_n_steps=1``): the report
marks every event, and the last logged counters equal the table's counts.

The default model, ``mlp`` (:class:`~lightning_gradguard.demos.DeepMLP`, 8 layers, plain SGD
at ``lr=0.1``), goes non-finite within 20 steps without a guard and learns with one. The
LSTM (``--model lstm``, SGD at ``lr=1.0``) is kept finite by the guard too, but in 300 steps
it ends at the adding problem's trivial predictor (validation MSE about 1/6): it shows a
rescue from NaN, not learning.

Lightning's progress bar is shown only when stdout is a terminal (``progress=None``); it
names the run (``run=no guard`` / ``run=GradGuard()``) instead of Lightning's ``v_num``, which
would show the last four characters of the version folder's name (``uard`` for both).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MODEL", "DEFAULT_STEPS", "DEMO_MODELS", "GUARDED_NAME", "UNGUARDED_NAME",
           "DemoResult", "format_diagnosis", "format_table", "next_version_dir", "run_demo"]

DEMO_MODELS = ("mlp", "lstm", "rnn", "residual")
DEFAULT_MODEL = "mlp"
DEFAULT_STEPS = 300
#: :attr:`DemoResult.name` of the run without a guard (also its progress bar's ``run=``)
UNGUARDED_NAME = "no guard"
#: :attr:`DemoResult.name` of the run with ``GradGuard()``
GUARDED_NAME = "GradGuard()"


@dataclass(frozen=True)
class DemoResult:
    """Outcome of one demo run.

    The counts are the guard's cumulative counters (``GradGuard.summary()``); for the run
    without a guard, the ``GradientMonitor``'s ``gradmonitor/nonfinite_steps`` counter (steps
    with NaN/Inf gradients) at the last step. ``gradguard report`` prints the same numbers.
    """

    name: str
    steps: int
    final_train_loss: float
    final_val_loss: float
    nonfinite_steps: int
    skipped_steps: int
    clipped_steps: int
    lr_backoffs: int
    log_dir: str
    initial_val_loss: float = math.nan
    lr_scale: float = 1.0
    #: the guard's diagnosis (``summary()["diagnosis"]``): ranked ``{"cause", "evidence",
    #: "remedy"}``; empty for the run without a guard
    diagnosis: tuple[Mapping[str, str], ...] = ()


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


def next_version_dir(root: str | os.PathLike[str]) -> Path:
    """``root/version_N`` with ``N`` one more than the largest existing (as Lightning numbers).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> next_version_dir(root).name
        'version_0'
        >>> (root / "version_3").mkdir(); next_version_dir(root).name
        'version_4'
    """
    base = Path(root)
    taken = [int(m.group(1)) for p in base.glob("version_*")
             if (m := re.fullmatch(r"version_(\d+)", p.name)) is not None]
    return base / f"version_{max(taken, default=-1) + 1}"


def _validate(net: Any, data: Any) -> list[Mapping[str, float]]:
    """Validation loss with a Trainer of its own: nothing logged, one event file per run."""
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False)
    return trainer.validate(net, datamodule=data, verbose=False)


def _stdout_is_a_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stdout
        return False


def _progress_bar(run: str) -> Any:
    """Lightning's progress bar, naming the demo's run instead of showing ``v_num``."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class _RunProgressBar(TQDMProgressBar):
        def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, int | str | float |
                                                                     dict[str, float]]:
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return {"run": run, **items}

    return _RunProgressBar()


def _run_one(model: str, guarded: bool, steps: int, version_dir: Path,
             progress: bool) -> DemoResult:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradguard.callbacks import GradGuard, GradientMonitor
    from lightning_gradguard.report import counts, load_run

    class _LastLoss(Callback):
        def __init__(self) -> None:
            self.loss = math.nan

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self.loss = float(loss.detach())

    cfg = _config(model)
    net, data = cfg.build()
    name = "gradguard" if guarded else "no_guard"
    logger = TensorBoardLogger(save_dir=str(version_dir), name="", version=name,
                               default_hp_metric=False)
    last = _LastLoss()
    guard = GradGuard() if guarded else None
    title = GUARDED_NAME if guarded else UNGUARDED_NAME
    callbacks: list[Callback] = [last, guard if guard is not None else GradientMonitor()]
    if progress:
        callbacks.append(_progress_bar(title))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
        log_every_n_steps=1, val_check_interval=None, check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = _validate(net, data)
        trainer.fit(net, datamodule=data)
        val = _validate(net, data)
    val0 = float(before[0].get("val_loss", math.nan)) if before else math.nan
    val_loss = float(val[0].get("val_loss", math.nan)) if val else math.nan
    if guard is not None:
        c = guard.summary()
    else:  # the monitor's counter as logged at the last step: what the report reads
        run = load_run(logger.log_dir)
        c = counts(run)
    return DemoResult(
        name=title, steps=trainer.global_step,
        final_train_loss=last.loss, final_val_loss=val_loss,
        nonfinite_steps=int(c.get("nonfinite_steps", 0)),
        skipped_steps=int(c.get("skipped_steps", 0)),
        clipped_steps=int(c.get("clipped_steps", 0)),
        lr_backoffs=int(c.get("lr_backoffs", 0)), log_dir=str(logger.log_dir),
        initial_val_loss=val0, lr_scale=float(c.get("lr_scale", 1.0)),
        diagnosis=tuple(c.get("diagnosis", ())),
    )


def format_table(results: list[DemoResult]) -> str:
    """Side-by-side table of demo results.

    Example:
        >>> r = DemoResult("no guard", 10, float("nan"), float("nan"), 3, 0, 0, 0, "x", 1.31)
        >>> print(format_table([r]))
                                   no guard
        steps                            10
        val loss before training       1.31
        final train loss                nan
        final val loss                  nan
        non-finite steps                  3
        skipped steps                     0
        clipped steps                     0
        LR backoffs                       0
        LR scale at the end               1
    """
    rows = [
        ("", [r.name for r in results]),
        ("steps", [str(r.steps) for r in results]),
        ("val loss before training", [f"{r.initial_val_loss:.4g}" for r in results]),
        ("final train loss", [f"{r.final_train_loss:.4g}" for r in results]),
        ("final val loss", [f"{r.final_val_loss:.4g}" for r in results]),
        ("non-finite steps", [str(r.nonfinite_steps) for r in results]),
        ("skipped steps", [str(r.skipped_steps) for r in results]),
        ("clipped steps", [str(r.clipped_steps) for r in results]),
        ("LR backoffs", [str(r.lr_backoffs) for r in results]),
        ("LR scale at the end", [f"{r.lr_scale:.3g}" for r in results]),
    ]
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(r[1][i]) for r in rows) for i in range(len(results))]
    return "\n".join(
        f"{label:<{w0}}" + "".join(f"   {v:>{widths[i]}}" for i, v in enumerate(vals))
        for label, vals in rows
    )


def format_diagnosis(result: DemoResult) -> str:
    """The guarded run's diagnosis: why it exploded and what to change (empty if none).

    Example:
        >>> r = DemoResult("GradGuard()", 10, 1.0, 1.0, 0, 0, 3, 1, "x", diagnosis=(
        ...     {"cause": "lr_too_high", "evidence": "40 % per step", "remedy": "lower the LR"},))
        >>> print(format_diagnosis(r))
        Why did it explode? (GradGuard's diagnosis, most likely first)
          1. lr_too_high: 40 % per step
             remedy: lower the LR
    """
    if not result.diagnosis:
        return ""
    lines = ["Why did it explode? (GradGuard's diagnosis, most likely first)"]
    for i, c in enumerate(result.diagnosis, 1):
        lines.append(f"  {i}. {c['cause']}: {c['evidence']}")
        lines.append(f"     remedy: {c['remedy']}")
    return "\n".join(lines)


def run_demo(model: str = DEFAULT_MODEL, steps: int | None = None,
             logdir: str | os.PathLike[str] = "gradguard_runs",
             progress: bool | None = None) -> list[DemoResult]:
    """Run the demo: the explode scenario of ``model`` without and with ``GradGuard()``.

    Args:
        model: One of ``"mlp"`` (default), ``"lstm"``, ``"rnn"``, ``"residual"``.
        steps: Optimizer steps per run (default 300: long enough to see the guarded run
            learn while the unguarded one is NaN).
        logdir: TensorBoard log directory; this call writes into the next free
            ``LOGDIR/<model>/version_N`` (see :func:`next_version_dir`).
        progress: Show Lightning's progress bar (``None``: only when stdout is a terminal;
            without one the bar prints hundreds of lines). The bar names the run
            (``run=no guard``, ``run=GradGuard()``) instead of showing ``v_num``.

    Returns:
        The two :class:`DemoResult` s (without, with the guard); their ``log_dir`` s share
        the version folder.

    Raises:
        ValueError: Unknown ``model`` or ``steps < 1``.
        OSError: The version folder cannot be created under ``logdir`` (checked before
            training).
    """
    _config(model)
    n = DEFAULT_STEPS if steps is None else steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`steps` must be an int >= 1, got {steps!r}")
    version_dir = next_version_dir(Path(logdir) / model)
    version_dir.mkdir(parents=True)  # a path problem shows now, not after the first run
    show = _stdout_is_a_terminal() if progress is None else bool(progress)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo models are tiny: one thread is several times faster
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no "GPU available" / tips between the demo's lines
    try:
        return [_run_one(model, guarded, n, version_dir, show) for guarded in (False, True)]
    finally:
        quiet.setLevel(level)
        torch.set_num_threads(threads)
