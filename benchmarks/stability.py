#!/usr/bin/env python
"""Stability benchmark: does each anti-explosion method keep training alive, and at what cost?

Grid: the three demo models (``DeepMLP``, ``ResidualMLP``, ``AddingProblemRNN`` LSTM) x a
log-spaced range of plain-SGD learning rates, from comfortable to ~100x too high (the range is
derived from each model's ``explode_config()``) x seeds x methods:

==================  ==========================================================================
method              what runs
==================  ==========================================================================
``none``            plain Lightning, no clipping
``clip1``           ``Trainer(gradient_clip_val=1.0)`` (norm clipping, Lightning's default
                    algorithm)
``zclip``           ``zclip.ZClipLightningCallback()`` with the package's defaults (``alpha=0.97,
                    z_thresh=2.5, max_grad_norm=1.0, warmup_steps=25, mode="zscore",
                    clip_option="adaptive_scaling"``)
``autoclip``        ``autoclip.torch.QuantileClip(model.parameters())`` with the package's
                    defaults (``quantile=0.9, history_length=1000``, per-parameter thresholds),
                    stepped right before ``optimizer.step()``
``autoclip_p10``    the AutoClip paper's setting: ``QuantileClip(..., quantile=0.1,
                    global_threshold=True)`` (10th percentile of the global norm history)
``agc``             unit-wise AGC, ``lightning_gradguard.core.AdaptiveGradClip(clipping=0.01,
                    exclude=[<output layer>.*])`` applied in ``on_before_optimizer_step``
``gradguard``       ``GradGuard()`` with its defaults
``gradguard(...)``  scratch variants: any ``GradGuard(...)`` call, e.g.
                    ``"gradguard(recovery_steps=100)"`` or
                    ``"gradguard(clip=ZScoreClip(z_threshold=3.0))"``
==================  ==========================================================================

Per run (one ``Trainer.fit`` for a fixed number of optimizer steps, no validation loop): the
validation loss and the model's validation metric (``val_mae``) before and after training,
whether the run *diverged* (final validation loss non-finite or above the initial one), the
number of *non-finite steps* (optimizer steps whose training loss or raw gradient - measured
before any method touches it - is NaN/Inf), and per-step traces (raw and applied gradient
norm, applied learning rate, training loss) for diagnosis.

Every run is cached as one JSON file per (model, lr, seed, method) under
``benchmarks/.cache/stability/``, so the grid can be built up over several invocations; the
report is always regenerated from everything cached for the requested grid.

Usage::

    python benchmarks/stability.py --quick              # smoke run (< 60 s, temp dirs)
    python benchmarks/stability.py                      # full grid (resumable), then report
    python benchmarks/stability.py --models LSTM --seeds 0 1 2 --methods none gradguard
    python benchmarks/stability.py --methods "gradguard(recovery_steps=100)"   # a variant
    python benchmarks/stability.py --report-only        # regenerate md/png from the cache

Needs ``zclip==1.0.0``, ``autoclip==0.2.1`` and ``matplotlib`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

# GG_STABILITY_LIB=<dir>: import lightning_gradguard from <dir> (e.g. a `git archive` of a
# commit) instead of the working tree, so that concurrent edits cannot change a long run.
if os.environ.get("GG_STABILITY_LIB"):
    sys.path.insert(0, os.environ["GG_STABILITY_LIB"])

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

import lightning_gradguard  # noqa: E402
from lightning_gradguard.callbacks import GradGuard  # noqa: E402
from lightning_gradguard.core import (  # noqa: E402
    AdaptiveGradClip,
    FixedNormClip,
    NoClip,
    PercentileClip,
    ZScoreClip,
)
from lightning_gradguard.demos import AddingProblemRNN, DeepMLP, DemoConfig, ResidualMLP  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_CACHE = ROOT / ".cache" / "stability"
DEFAULT_MD = ROOT / "results" / "stability.md"
DEFAULT_PNG = ROOT / "results" / "stability.png"

#: Bump when the run protocol changes: older cache files are then ignored and rerun.
CACHE_VERSION = 2


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class ModelSpec:
    """One model of the grid: a demo config, overrides, the LR range and the run length."""

    name: str
    config: Callable[[], DemoConfig[Any, Any]]
    lrs: tuple[float, ...]
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def model_kwargs(self, lr: float) -> dict[str, Any]:
        return {**self.config().model_kwargs, **self.overrides, "lr": lr}


def _lrs(low: float, n: int = 6) -> tuple[float, ...]:
    """``n`` half-decade LRs from ``low``: ``low, 3 low, 10 low, 30 low, ...``."""
    return tuple(float(f"{low * (1, 3)[i % 2] * 10 ** (i // 2):.3g}") for i in range(n))


# LR ranges (probed with no clipping, seed 0, 300 steps): the lowest two LRs train without
# clipping, the explode_config() LR is the third, the highest is ~100x the highest
# comfortable LR.
MODELS: dict[str, ModelSpec] = {
    "DeepMLP": ModelSpec(
        name="DeepMLP",
        config=DeepMLP.explode_config,
        lrs=_lrs(0.01),
        steps=300,
        note="explode_config(): 8x64 ReLU MLP, He init, no BatchNorm, plain SGD "
        "(explodes at lr=0.1)",
    ),
    "ResidualMLP": ModelSpec(
        name="ResidualMLP",
        config=ResidualMLP.explode_config,
        lrs=_lrs(1e-4),
        steps=300,
        note="explode_config(): 8 residual blocks x 64, He init, no BatchNorm, plain SGD "
        "(explodes at lr=0.01)",
    ),
    "LSTM": ModelSpec(
        name="LSTM",
        config=AddingProblemRNN.explode_config,
        lrs=_lrs(0.1),
        steps=300,
        note="AddingProblemRNN.explode_config(): LSTM(32) on the adding problem (seq_len 20), "
        "plain SGD (explodes at lr=1.0)",
    ),
}

MAIN_METHODS: tuple[str, ...] = (
    "none", "clip1", "zclip", "autoclip", "autoclip_p10", "agc", "gradguard",
)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
#: Scratch GradGuard variants shown in the report's "variants" section (when cached).
DEFAULT_VARIANTS: tuple[str, ...] = ()

QUICK = {"model": "DeepMLP", "lrs": (0.003, 0.3), "seeds": (0,),
         "methods": ("none", "clip1", "gradguard"), "steps": 40}


# ----------------------------------------------------------------------------- methods
class AutoClipCallback(Callback):
    """``autoclip``'s raw-clipper pattern: ``clipper.step()`` right before ``optimizer.step()``.

    (``QuantileClip.as_optimizer`` cannot be used under Lightning's automatic optimization:
    the wrapper calls ``clipper.step()`` before ``optimizer.step(closure)``, i.e. before the
    closure has computed this step's gradients.)
    """

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.clipper: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from autoclip.torch import QuantileClip

        self.clipper = QuantileClip(pl_module.parameters(), **self.kwargs)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self.clipper.step()


def output_layer(model: torch.nn.Module) -> str:
    """Name of the last ``nn.Linear`` of ``model`` (the output layer AGC leaves alone)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return names[-1]


class AGCCallback(Callback):
    """Unit-wise AGC with :class:`AdaptiveGradClip` in ``on_before_optimizer_step``."""

    def __init__(self, clipping: float = 0.01) -> None:
        self.clipping = clipping
        self.policy: AdaptiveGradClip | None = None
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.policy = AdaptiveGradClip(clipping=self.clipping,
                                       exclude=[f"{output_layer(pl_module)}.*"])
        named = list(pl_module.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        assert self.policy is not None
        self.policy.clip_unitwise_(self.params, self.names)


_VARIANT_NS = {"GradGuard": GradGuard, "ZScoreClip": ZScoreClip, "PercentileClip": PercentileClip,
               "FixedNormClip": FixedNormClip, "NoClip": NoClip,
               "AdaptiveGradClip": AdaptiveGradClip, "inf": math.inf}


def is_variant(method: str) -> bool:
    return method.startswith("gradguard(") and method.endswith(")")


def build_method(method: str) -> tuple[list[Callback], dict[str, Any]]:
    """Callbacks and extra ``Trainer`` kwargs of ``method``."""
    if method == "none":
        return [], {}
    if method == "clip1":
        return [], {"gradient_clip_val": 1.0}
    if method == "zclip":
        from zclip import ZClipLightningCallback

        return [ZClipLightningCallback()], {}
    if method == "autoclip":
        return [AutoClipCallback()], {}
    if method == "autoclip_p10":
        return [AutoClipCallback(quantile=0.1, global_threshold=True)], {}
    if method == "agc":
        return [AGCCallback(0.01)], {}
    if method == "gradguard":
        return [GradGuard()], {}
    if is_variant(method):
        guard = eval("GradGuard" + method[len("gradguard"):], {"__builtins__": {}}, _VARIANT_NS)
        if not isinstance(guard, GradGuard):
            raise ValueError(f"not a GradGuard variant: {method!r}")
        return [guard], {}
    raise ValueError(f"unknown method {method!r}; known: {', '.join(MAIN_METHODS)} or "
                     "'gradguard(<GradGuard kwargs>)'")


def method_slug(method: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_]+", method):
        return method
    short = re.sub(r"[^A-Za-z0-9]+", "_", method).strip("_")[:60]
    return f"{short}_{hashlib.sha1(method.encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------- one run
def total_norm(tensors: Sequence[torch.Tensor]) -> float:
    """L2 norm of all ``tensors`` together (independent of the library under test)."""
    if not tensors:
        return 0.0
    norms = torch._foreach_norm([t.detach().float() for t in tensors], 2.0)
    return float(torch.linalg.vector_norm(torch.stack(norms)))


@functools.lru_cache(maxsize=1)
def library_id() -> str:
    """Where ``lightning_gradguard`` was imported from and a hash of its sources."""
    pkg = Path(lightning_gradguard.__file__).resolve().parent
    h = hashlib.sha1()
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode())
        h.update(f.read_bytes())
    return f"{pkg} sha1:{h.hexdigest()[:12]}"


class Monitor(Callback):
    """First callback: records the raw step (before any method acts) and the applied update.

    * ``on_before_backward``: the training loss;
    * ``on_before_optimizer_step`` (runs before every other callback's hook and before
      Lightning's own clipping): the raw total gradient norm;
    * an optimizer step post-hook, registered before any other method's hooks (so it runs
      before GradGuard puts the scheduled LR back): the applied gradient norm (after every
      clip; 0 when the step was skipped) and the applied learning rate. (A pre-hook would be
      too early: under Lightning the closure - zero_grad, forward, backward, the
      ``on_before_optimizer_step`` hooks - runs inside ``optimizer.step()``.)
    * ``on_train_batch_end``: stops the run once the weights are non-finite (nothing can
      change after that; the remaining steps are counted as non-finite).
    """

    def __init__(self) -> None:
        self.loss: list[float] = []
        self.raw: list[float] = []
        self.applied: list[float] = []
        self.lr: list[float] = []
        self.nonfinite_steps = 0
        self.params_nonfinite_at: int | None = None
        self._loss_ok = True
        self._handle: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0]
        opt = getattr(opt, "_optimizer", opt)
        self._handle = opt.register_step_post_hook(self._post_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        self.applied.append(total_norm(grads))
        self.lr.append(float(optimizer.param_groups[0]["lr"]))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        value = float(loss.detach())
        self.loss.append(value)
        self._loss_ok = math.isfinite(value)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = total_norm(grads)
        self.raw.append(norm)
        if not (self._loss_ok and math.isfinite(norm)):
            self.nonfinite_steps += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not math.isfinite(total_norm(list(pl_module.parameters()))):
            self.params_nonfinite_at = trainer.global_step
            trainer.should_stop = True


@torch.no_grad()
def evaluate(model: pl.LightningModule, datamodule: Any) -> dict[str, float]:
    """Validation loss (sample-weighted mean) and the model's validation metrics."""
    was_training = model.training
    model.eval()
    metrics = model.val_metrics.clone()
    metrics.reset()
    total, n = 0.0, 0
    for inputs, target in datamodule.val_dataloader():
        preds = model(inputs)
        total += float(model.compute_loss(preds, target)) * len(target)
        n += len(target)
        metrics.update(preds, target)
    out = {"val_loss": total / n}
    out.update({k: float(v) for k, v in metrics.compute().items()})
    model.train(was_training)
    return out


def _r(x: float) -> float | str:
    """JSON-safe float with 4 significant digits (non-finite values as strings)."""
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.4g}")


def _f(x: float | str | None) -> float:
    return math.nan if x is None else float(x)


def run_one(model_name: str, lr: float, seed: int, method: str, steps: int) -> dict[str, Any]:
    """Train one (model, lr, seed, method) cell and return its JSON record."""
    spec = MODELS[model_name]
    cfg = spec.config()
    lightning.seed_everything(seed, verbose=False)
    model = cfg.model_cls(**spec.model_kwargs(lr))
    datamodule = cfg.datamodule_cls(**{**cfg.datamodule_kwargs, "seed": seed})
    datamodule.setup("fit")
    initial = evaluate(model, datamodule)
    callbacks, trainer_kwargs = build_method(method)
    monitor = Monitor()
    tmp = tempfile.mkdtemp(prefix="gg_stability_")
    t0 = time.perf_counter()
    try:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp,
            callbacks=[monitor, *callbacks], **trainer_kwargs,
        )
        trainer.fit(model, datamodule=datamodule)
        steps_run = trainer.global_step
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    final = evaluate(model, datamodule)
    nonfinite = monitor.nonfinite_steps
    if monitor.params_nonfinite_at is not None:
        nonfinite += steps - steps_run  # every remaining step would be non-finite too
    final_loss = final["val_loss"]
    record: dict[str, Any] = {
        "version": CACHE_VERSION,
        "model": model_name, "lr": lr, "seed": seed, "method": method, "steps": steps,
        "model_kwargs": {k: v for k, v in spec.model_kwargs(lr).items()},
        "initial": {k: _r(v) for k, v in initial.items()},
        "final": {k: _r(v) for k, v in final.items()},
        "diverged": (not math.isfinite(final_loss)) or final_loss > initial["val_loss"],
        "nonfinite_steps": nonfinite,
        "steps_run": steps_run,
        "params_nonfinite_at": monitor.params_nonfinite_at,
        "seconds": round(seconds, 2),
        "library": library_id(),
        "trace": {
            "loss": [_r(x) for x in monitor.loss],
            "raw_norm": [_r(x) for x in monitor.raw],
            "applied_norm": [_r(x) for x in monitor.applied],
            "lr": [_r(x) for x in monitor.lr],
        },
    }
    guards = [cb for cb in callbacks if isinstance(cb, GradGuard)]
    if guards:
        s = guards[0].summary()
        record["gradguard"] = {k: s[k] for k in ("spikes", "clipped_steps", "skipped_steps",
                                                 "lr_backoffs", "growth_events", "lr_scale",
                                                 "halted")}
    return record


# ----------------------------------------------------------------------------- cache
def cache_path(cache: Path, model: str, lr: float, seed: int, method: str) -> Path:
    return cache / model / f"lr{lr:g}_seed{seed}_{method_slug(method)}.json"


def load(cache: Path, model: str, lr: float, seed: int, method: str,
         steps: int) -> dict[str, Any] | None:
    path = cache_path(cache, model, lr, seed, method)
    if not path.exists():
        return None
    try:
        rec: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("version") != CACHE_VERSION or rec.get("steps") != steps \
            or rec.get("method") != method:
        return None
    return rec


def save(cache: Path, rec: dict[str, Any]) -> None:
    path = cache_path(cache, rec["model"], rec["lr"], rec["seed"], rec["method"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- analysis
@dataclass
class Grid:
    models: list[str]
    lrs: dict[str, tuple[float, ...]]
    seeds: list[int]
    methods: list[str]  # main methods (ranked)
    variants: list[str]  # scratch variants (compared to the main methods separately)
    steps: dict[str, int]


def loss_of(rec: dict[str, Any]) -> float:
    return _f(rec["final"]["val_loss"])


def rank_key(rec: dict[str, Any]) -> float:
    """Diverged runs rank last (all tied); otherwise by final validation loss."""
    return math.inf if rec["diverged"] else loss_of(rec)


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties (including all diverged = inf) share their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def fmt(x: float, digits: int = 3) -> str:
    if not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}f}"


def summarize(results: dict[tuple[str, float, int, str], dict[str, Any]], grid: Grid,
              method_list: Sequence[str]) -> dict[str, Any]:
    """Ranks, divergences, per-(model, lr) means and the 2% target for ``method_list``."""
    ranks: dict[str, list[float]] = {m: [] for m in method_list}
    ranks_by_model: dict[str, dict[str, list[float]]] = {
        mo: {m: [] for m in method_list} for mo in grid.models}
    complete_cells = 0
    for mo in grid.models:
        for lr in grid.lrs[mo]:
            for seed in grid.seeds:
                recs = [results.get((mo, lr, seed, m)) for m in method_list]
                if any(r is None for r in recs):
                    continue
                complete_cells += 1
                rk = average_ranks([rank_key(r) for r in recs])  # type: ignore[arg-type]
                for m, x in zip(method_list, rk, strict=True):
                    ranks[m].append(x)
                    ranks_by_model[mo][m].append(x)
    div = {m: {mo: [0, 0] for mo in grid.models} for m in method_list}
    nonfinite = {m: {mo: 0 for mo in grid.models} for m in method_list}
    for (mo, _lr, _seed, m), rec in results.items():
        if m in div and mo in grid.models:
            div[m][mo][0] += int(rec["diverged"])
            div[m][mo][1] += 1
            nonfinite[m][mo] += rec["nonfinite_steps"]
    return {"ranks": ranks, "ranks_by_model": ranks_by_model, "complete_cells": complete_cells,
            "div": div, "nonfinite": nonfinite}


def cell_stats(results: dict[tuple[str, float, int, str], dict[str, Any]], model: str,
               lr: float, seeds: Sequence[int], method: str) -> dict[str, Any] | None:
    recs = [results[(model, lr, s, method)] for s in seeds if (model, lr, s, method) in results]
    if not recs:
        return None
    losses = [loss_of(r) for r in recs]
    finite = [x for x in losses if math.isfinite(x)]
    metric_key = next((k for k in recs[0]["final"] if k != "val_loss"), None)
    metrics = [_f(r["final"][metric_key]) for r in recs] if metric_key else []
    fmetrics = [x for x in metrics if math.isfinite(x)]
    return {
        "n": len(recs),
        "diverged": sum(r["diverged"] for r in recs),
        "nonfinite_runs": len(losses) - len(finite),
        "mean": statistics.fmean(finite) if finite else math.nan,
        "std": statistics.pstdev(finite) if len(finite) > 1 else 0.0,
        "metric_key": metric_key,
        "metric_mean": statistics.fmean(fmetrics) if fmetrics else math.nan,
        "initial": statistics.fmean(_f(r["initial"]["val_loss"]) for r in recs),
        "nonfinite_steps": sum(r["nonfinite_steps"] for r in recs),
    }


def two_percent_check(results: dict[tuple[str, float, int, str], dict[str, Any]], grid: Grid,
                      methods: Sequence[str], candidate: str, tol: float = 0.02,
                      ratios: list[dict[str, Any]] | None = None
                      ) -> tuple[int, list[dict[str, Any]]]:
    """(model, lr) cells where some method converged on every seed, and the misses.

    The best method of a cell is the one with the lowest mean final validation loss among the
    methods that converged (did not diverge) on every seed; ``candidate`` must have converged
    on every seed too and have a mean within ``(1 + tol)`` of the best. ``ratios``, if given,
    receives every checked cell's ratio of ``candidate`` to the best of the other methods.
    """
    checked = 0
    misses: list[dict[str, Any]] = []
    for mo in grid.models:
        for lr in grid.lrs[mo]:
            stats = {m: cell_stats(results, mo, lr, grid.seeds, m) for m in methods}
            if any(s is None or s["n"] < len(grid.seeds) for s in stats.values()):
                continue
            ok = {m: s for m, s in stats.items() if s is not None and s["diverged"] == 0}
            if not ok:
                continue
            checked += 1
            best = min(ok, key=lambda m: ok[m]["mean"])
            c = stats[candidate]
            assert c is not None
            ratio = c["mean"] / ok[best]["mean"] if c["diverged"] == 0 else math.inf
            if ratios is not None:
                others = [m for m in ok if m != candidate]
                rival = min(others, key=lambda m: ok[m]["mean"]) if others else None
                ratios.append({"model": mo, "lr": lr, "best_other": rival,
                               "ratio": (c["mean"] / ok[rival]["mean"]
                                         if rival is not None and c["diverged"] == 0
                                         else math.nan)})
            if not ratio <= 1 + tol:
                misses.append({"model": mo, "lr": lr, "best": best, "best_mean": ok[best]["mean"],
                               "mean": c["mean"], "diverged": c["diverged"], "ratio": ratio})
    return checked, misses


# ----------------------------------------------------------------------------- report
def collect(cache: Path, grid: Grid) -> dict[tuple[str, float, int, str], dict[str, Any]]:
    out = {}
    for mo in grid.models:
        for lr in grid.lrs[mo]:
            for seed in grid.seeds:
                for m in [*grid.methods, *grid.variants]:
                    rec = load(cache, mo, lr, seed, m, grid.steps[mo])
                    if rec is not None:
                        out[(mo, lr, seed, m)] = rec
    return out


def gradguard_libraries(results: dict[tuple[str, float, int, str], dict[str, Any]]
                        ) -> dict[str, int]:
    """Source hash -> number of cached GradGuard runs (``gradguard`` and variants) made with it.

    The cache key does not include the library (the baselines do not depend on it), so runs
    of an older GradGuard are reused until deleted; this makes that visible.
    """
    out: dict[str, int] = {}
    for (_, _, _, m), rec in results.items():
        if m == "gradguard" or is_variant(m):
            sha = source_hash(str(rec.get("library", "")))
            out[sha] = out.get(sha, 0) + 1
    return out


def source_hash(library: str) -> str:
    """The hash part of a :func:`library_id` string (``"?"`` if there is none)."""
    return library.rpartition("sha1:")[2] or "?"


def write_report(results: dict[tuple[str, float, int, str], dict[str, Any]], grid: Grid,
                 md_path: Path, png_path: Path | None, json_path: Path | None) -> dict[str, Any]:
    main = grid.methods
    summ = summarize(results, grid, main)
    lines: list[str] = []
    add = lines.append
    expected = sum(len(grid.lrs[mo]) for mo in grid.models) * len(grid.seeds) * len(main)
    have = sum(1 for k in results if k[3] in main)
    add("# Stability benchmark")
    add("")
    add("Generated by `python benchmarks/stability.py` (see `benchmarks/README.md`). "
        f"{have}/{expected} runs of the main grid cached"
        + ("." if have == expected else " - **incomplete grid**: tables show what is cached."))
    libs = gradguard_libraries(results)
    if libs:
        add("GradGuard runs by `lightning_gradguard` source hash: "
            + ", ".join(f"`{sha}` ({n})" for sha, n in sorted(libs.items())) + ".")
    add("")
    add("## Grid")
    add("")
    add("| model | configuration | learning rates (plain SGD) | steps |")
    add("|---|---|---|---|")
    for mo in grid.models:
        spec = MODELS[mo]
        add(f"| {mo} | {spec.note} | {', '.join(f'{x:g}' for x in grid.lrs[mo])} | "
            f"{grid.steps[mo]} |")
    add("")
    add(f"Seeds: {', '.join(map(str, grid.seeds))} (the seed fixes the initial weights, the "
        "synthetic data and the shuffling). Methods: " + ", ".join(f"`{m}`" for m in main)
        + " (defined in the module docstring of `benchmarks/stability.py`).")
    add("")
    add("Definitions:")
    add("")
    add("- **final val loss**: validation MSE after the last step (whole validation set; the "
        "validation metric reported is `val_mae`).")
    add("- **diverged**: the final val loss is non-finite or above the initial val loss "
        "(of the same seed, before training).")
    add("- **non-finite steps**: optimizer steps whose training loss or raw gradient (measured "
        "before any method acts) is NaN/Inf; once the weights themselves are non-finite the run "
        "is stopped and its remaining steps are counted as non-finite.")
    add("- **rank**: in every (model, lr, seed) cell the methods are ranked by final val loss "
        "(1 = best), diverged runs rank last (tied, sharing the average of the remaining "
        "ranks); the average rank is the mean over all complete cells.")
    add("")

    add("## Summary")
    add("")
    header = "| method | avg rank (all) | " + " | ".join(f"avg rank {mo}" for mo in grid.models) \
        + " | diverged runs | non-finite steps |"
    add(header)
    add("|---" * (4 + len(grid.models)) + "|")
    order = sorted(main, key=lambda m: statistics.fmean(summ["ranks"][m])
                   if summ["ranks"][m] else math.inf)
    for m in order:
        r = summ["ranks"][m]
        per = [summ["ranks_by_model"][mo][m] for mo in grid.models]
        d = sum(summ["div"][m][mo][0] for mo in grid.models)
        n = sum(summ["div"][m][mo][1] for mo in grid.models)
        nf = sum(summ["nonfinite"][m][mo] for mo in grid.models)
        add(f"| `{m}` | {statistics.fmean(r):.2f} | " if r else f"| `{m}` | - | ")
        lines[-1] += " | ".join(f"{statistics.fmean(x):.2f}" if x else "-" for x in per)
        lines[-1] += f" | {d}/{n} | {nf} |"
    add("")
    add(f"Ranks over {summ['complete_cells']} complete (model, lr, seed) cells, "
        f"{len(main)} methods (rank 1 = best, {len(main)} = worst).")
    add("")

    # targets
    gg = "gradguard"
    if gg in main:
        add("## Targets (`GradGuard()` defaults)")
        add("")
        d = sum(summ["div"][gg][mo][0] for mo in grid.models)
        n = sum(summ["div"][gg][mo][1] for mo in grid.models)
        best_rank = order[0] if summ["ranks"][order[0]] else None
        ratios: list[dict[str, Any]] = []
        checked, misses = two_percent_check(results, grid, main, gg, ratios=ratios)
        finite = [r for r in ratios if math.isfinite(r["ratio"])]
        closest = max(finite, key=lambda r: r["ratio"]) if finite else None
        gg_rank = statistics.fmean(summ["ranks"][gg]) if summ["ranks"][gg] else math.nan
        add("| target | result | met |")
        add("|---|---|---|")
        add(f"| zero diverged runs in the whole grid | {d}/{n} diverged | "
            f"{'yes' if d == 0 else '**no**'} |")
        add(f"| best average rank of all methods | {gg_rank:.2f} (best: `{best_rank}`, "
            f"{statistics.fmean(summ['ranks'][best_rank]):.2f}) | "
            f"{'yes' if best_rank == gg else '**no**'} |" if best_rank else "| best rank | - | - |")
        add(f"| within 2% of the best method's mean final val loss at every (model, lr) where "
            f"some method converges on all seeds | {checked - len(misses)}/{checked} (model, lr) "
            f"cells" + (f"; highest ratio to the best other method: {closest['ratio']:.3f} "
                        f"({closest['model']} lr {closest['lr']:g}, `{closest['best_other']}`)"
                        if closest else "")
            + f" | {'yes' if not misses else '**no**'} |")
        add("")
        if misses:
            add("Cells where `GradGuard()` is not within 2% of the best method:")
            add("")
            add("| model | lr | best method | best mean | GradGuard mean | ratio | GradGuard "
                "diverged seeds |")
            add("|---|---|---|---|---|---|---|")
            for x in misses:
                add(f"| {x['model']} | {x['lr']:g} | `{x['best']}` | {fmt(x['best_mean'])} | "
                    f"{fmt(x['mean'])} | {fmt(x['ratio'])} | {x['diverged']} |")
            add("")

    # per-model tables
    for mo in grid.models:
        add(f"## {mo}")
        add("")
        add(f"{MODELS[mo].note}; {grid.steps[mo]} steps. Final val loss, mean ± std over "
            "seeds (finite runs only); `(k div)`: k seeds diverged, `(k NaN)`: k of them "
            "non-finite.")
        add("")
        init = [cell_stats(results, mo, lr, grid.seeds, main[0]) for lr in grid.lrs[mo]]
        add("| method | " + " | ".join(f"lr={lr:g}" for lr in grid.lrs[mo]) + " |")
        add("|---" * (1 + len(grid.lrs[mo])) + "|")
        add("| *initial* | " + " | ".join(fmt(s["initial"]) if s else "-" for s in init) + " |")
        for m in [*main, *grid.variants]:
            cells = []
            for lr in grid.lrs[mo]:
                s = cell_stats(results, mo, lr, grid.seeds, m)
                if s is None:
                    cells.append("-")
                    continue
                txt = (f"{fmt(s['mean'])} ± {fmt(s['std'], 2)}" if math.isfinite(s["mean"])
                       else "NaN")
                extra = []
                if s["diverged"]:
                    extra.append(f"{s['diverged']} div")
                if s["nonfinite_runs"]:
                    extra.append(f"{s['nonfinite_runs']} NaN")
                if s["n"] < len(grid.seeds):
                    extra.append(f"{s['n']}/{len(grid.seeds)} seeds")
                if extra:
                    txt += f" ({', '.join(extra)})"
                cells.append(txt)
            add(f"| `{m}` | " + " | ".join(cells) + " |")
        add("")
        mk = next((s["metric_key"] for s in init if s), "val_mae")
        add(f"Final `{mk}` (mean over seeds with a finite value) and non-finite steps (sum over "
            "seeds):")
        add("")
        add("| method | " + " | ".join(f"lr={lr:g}" for lr in grid.lrs[mo]) + " |")
        add("|---" * (1 + len(grid.lrs[mo])) + "|")
        for m in [*main, *grid.variants]:
            cells = []
            for lr in grid.lrs[mo]:
                s = cell_stats(results, mo, lr, grid.seeds, m)
                cells.append("-" if s is None else
                             f"{fmt(s['metric_mean'])} / {s['nonfinite_steps']}")
            add(f"| `{m}` | " + " | ".join(cells) + " |")
        add("")

    # variants
    variants_out = {}
    if grid.variants:
        add("## GradGuard variants")
        add("")
        add("Each variant replaces `gradguard` in the ranking (ranked against the other "
            f"{len(main) - 1} methods) and in the targets; only cells where the variant ran.")
        add("")
        add("| variant | avg rank | cells | diverged runs | non-finite steps | 2% target |")
        add("|---|---|---|---|---|---|")
        for v in [gg, *grid.variants]:
            ms = [m for m in main if m != gg] + [v]
            sv = summarize(results, grid, ms)
            r = sv["ranks"][v]
            d = sum(sv["div"][v][mo][0] for mo in grid.models)
            n = sum(sv["div"][v][mo][1] for mo in grid.models)
            nf = sum(sv["nonfinite"][v][mo] for mo in grid.models)
            checked, misses = two_percent_check(results, grid, ms, v)
            variants_out[v] = {"avg_rank": statistics.fmean(r) if r else None, "cells": len(r),
                               "diverged": d, "runs": n, "two_percent_misses": misses,
                               "two_percent_checked": checked}
            add(f"| `{v}` | {statistics.fmean(r):.2f} | {len(r)} | {d}/{n} | {nf} | "
                f"{checked - len(misses)}/{checked} |" if r else f"| `{v}` | - | 0 | - | - | - |")
        add("")

    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines) + "\n")
    summary = {
        "grid": {"models": grid.models, "lrs": grid.lrs, "seeds": grid.seeds,
                 "methods": main, "variants": grid.variants, "steps": grid.steps},
        "runs": have, "expected_runs": expected,
        "avg_rank": {m: (statistics.fmean(summ["ranks"][m]) if summ["ranks"][m] else None)
                     for m in main},
        "diverged": {m: {mo: summ["div"][m][mo] for mo in grid.models} for m in main},
        "nonfinite_steps": summ["nonfinite"],
        "variants": variants_out,
    }
    if gg in main:
        checked, misses = two_percent_check(results, grid, main, gg)
        summary["two_percent"] = {"checked": checked, "misses": misses}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=1, default=str))
    if png_path is not None:
        plot(results, grid, png_path)
    return summary


STYLES = {
    "none": ("#7f7f7f", "o", ":"), "clip1": ("#1f77b4", "s", "-"),
    "zclip": ("#2ca02c", "^", "-"), "autoclip": ("#9467bd", "v", "-"),
    "autoclip_p10": ("#8c564b", "P", "-"), "agc": ("#ff7f0e", "D", "-"),
    "gradguard": ("#d62728", "*", "-"),
}


def plot(results: dict[tuple[str, float, int, str], dict[str, Any]], grid: Grid,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [*grid.methods, *grid.variants]
    fig, axes = plt.subplots(1, len(grid.models), figsize=(5.2 * len(grid.models) + 1.5, 4.6),
                             squeeze=False)
    extra_colors = iter(["#e377c2", "#17becf", "#bcbd22", "#000000", "#aec7e8"])
    styles = dict(STYLES)
    for v in grid.variants:
        styles[v] = (next(extra_colors, "#333333"), "x", "--")
    for ax, mo in zip(axes[0], grid.models, strict=True):
        lrs = grid.lrs[mo]
        inits = [s["initial"] for lr in lrs
                 if (s := cell_stats(results, mo, lr, grid.seeds, methods[0])) is not None]
        ceiling = 1.6 * max(inits) if inits else 10.0
        lows = []
        for i, m in enumerate(methods):
            color, marker, ls = styles.get(m, ("#333333", "x", "--"))
            jitter = 1.0 + 0.035 * (i - (len(methods) - 1) / 2)
            xs, ys, xd = [], [], []
            for lr in lrs:
                s = cell_stats(results, mo, lr, grid.seeds, m)
                if s is None:
                    continue
                x = lr * jitter
                if s["nonfinite_runs"] == s["n"] or not math.isfinite(s["mean"]) \
                        or s["mean"] > ceiling:
                    xd.append(x)
                    xs.append(x)
                    ys.append(ceiling)
                else:
                    xs.append(x)
                    ys.append(s["mean"])
                    lows.append(s["mean"])
            label = m if len(m) < 40 else m[:37] + "..."
            ax.plot(xs, ys, color=color, marker=marker, linestyle=ls, linewidth=1.4,
                    markersize=9 if marker == "*" else 6, label=label, alpha=0.9,
                    zorder=3 if m == "gradguard" else 2)
            if xd:
                ax.scatter(xd, [ceiling] * len(xd), marker="x", color=color, s=50, zorder=4)
        if inits:
            ax.axhline(statistics.fmean(inits), color="black", linewidth=0.8, linestyle="--")
            ax.text(lrs[0], statistics.fmean(inits) * 1.04, "initial val loss",
                    fontsize=8, va="bottom")
        ax.axhspan(ceiling * 0.95, ceiling * 1.15, color="#f2dede", zorder=0)
        ax.text(lrs[0], ceiling * 0.9, "non-finite / off scale", fontsize=8, va="top",
                color="#a94442")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(min(lows) * 0.7 if lows else 1e-2, ceiling * 1.15)
        ax.set_xlabel("learning rate (plain SGD)")
        ax.set_title(f"{mo} ({grid.steps[mo]} steps, {len(grid.seeds)} seeds)")
        ax.grid(True, which="both", alpha=0.25)
    axes[0][0].set_ylabel("final validation loss (mean over seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (5.2 * len(grid.models) + 1.5), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 model, 2 LRs, 1 seed, 3 methods, 40 steps, temp cache")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"methods to run (default: {' '.join(MAIN_METHODS)}); "
                   "'gradguard(...)' runs a GradGuard variant")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="override the LR grid (all selected models)")
    p.add_argument("--steps", type=int, default=None, help="override the steps per run")
    p.add_argument("--variants", nargs="+", default=None,
                   help="GradGuard variants to include in the report (default: "
                   "DEFAULT_VARIANTS plus variants in --methods)")
    p.add_argument("--jobs", type=int, default=1, choices=[1],
                   help="runs in parallel (only 1: one process, one thread)")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="markdown report path")
    p.add_argument("--png", type=Path, default=None, help="plot path")
    p.add_argument("--json", type=Path, default=None, help="summary JSON path")
    p.add_argument("--report-only", action="store_true", help="no runs, report from the cache")
    p.add_argument("--budget-min", type=float, default=None,
                   help="stop starting new runs after this many minutes (then report)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    tmpdir: Path | None = None
    if args.quick:
        tmpdir = Path(tempfile.mkdtemp(prefix="gg_stability_quick_"))
        models = args.models or [QUICK["model"]]
        methods = args.methods or list(QUICK["methods"])
        seeds = args.seeds or list(QUICK["seeds"])
        lrs = {mo: tuple(args.lrs or QUICK["lrs"]) for mo in models}
        steps = {mo: args.steps or QUICK["steps"] for mo in models}
        cache = args.cache or tmpdir / "cache"
        out = args.out or tmpdir / "stability.md"
        png = args.png or tmpdir / "stability.png"
        js = args.json or tmpdir / "stability.json"
    else:
        models = args.models or list(MODELS)
        methods = args.methods or list(MAIN_METHODS)
        seeds = args.seeds or list(DEFAULT_SEEDS)
        lrs = {mo: tuple(args.lrs) if args.lrs else MODELS[mo].lrs for mo in models}
        steps = {mo: args.steps or MODELS[mo].steps for mo in models}
        cache = args.cache or DEFAULT_CACHE
        out = args.out or DEFAULT_MD
        png = args.png or DEFAULT_PNG
        js = args.json or cache / "summary.json"
    for m in methods:
        build_method(m)  # validate names before any run
    run_variants = [m for m in methods if m not in MAIN_METHODS]
    variants = list(args.variants) if args.variants is not None else \
        list(dict.fromkeys([*DEFAULT_VARIANTS, *run_variants]))
    main_methods = [m for m in MAIN_METHODS if m in methods] if args.quick else list(MAIN_METHODS)

    t_start = time.perf_counter()
    todo = [(mo, lr, s, m) for mo in models for lr in lrs[mo] for s in seeds for m in methods]
    done = ran = 0
    if not args.report_only:
        for mo, lr, s, m in todo:
            if load(cache, mo, lr, s, m, steps[mo]) is not None:
                done += 1
                continue
            if args.budget_min is not None and time.perf_counter() - t_start > 60 * args.budget_min:
                print(f"budget of {args.budget_min} min reached; stopping", flush=True)
                break
            rec = run_one(mo, lr, s, m, steps[mo])
            save(cache, rec)
            ran += 1
            print(f"[{done + ran}/{len(todo)}] {mo} lr={lr:g} seed={s} {m}: "
                  f"val_loss {rec['initial']['val_loss']} -> {rec['final']['val_loss']}"
                  f"{' DIVERGED' if rec['diverged'] else ''}, non-finite steps "
                  f"{rec['nonfinite_steps']}, {rec['seconds']:.1f}s", flush=True)
    grid = Grid(models=models, lrs=lrs, seeds=seeds, methods=main_methods, variants=variants,
                steps=steps)
    results = collect(cache, grid)
    current = source_hash(library_id())
    stale = {sha: n for sha, n in gradguard_libraries(results).items() if sha != current}
    if stale:
        print(f"warning: {sum(stale.values())} cached GradGuard runs were made with other "
              f"library sources ({', '.join(stale)}; now {current}); delete their JSON files "
              f"in {cache} to rerun them", file=sys.stderr, flush=True)
    summary = write_report(results, grid, out, png, js)
    print(f"ran {ran} runs ({done} cached) in {time.perf_counter() - t_start:.0f}s; "
          f"{summary['runs']}/{summary['expected_runs']} main-grid runs available")
    print(f"report: {out}\nplot: {png}\nsummary: {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
