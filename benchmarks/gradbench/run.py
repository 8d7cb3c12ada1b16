"""One training run of a (workload, lr, seed, method) cell, and the cache of run records.

:func:`run_one` trains with ``Trainer.fit`` for a fixed number of optimizer steps (no
validation loop) behind a :class:`Monitor` that sees every step before any method acts, and
returns a JSON-ready record: validation loss and metric before and after, *diverged* (final
validation loss non-finite or above the initial one), *non-finite steps*, per-step traces and,
for a GradGuard, its summary and every step it acted on (:class:`GuardEvents`, through
``GuardCore.listeners``).

:class:`RunCache` stores one JSON file per cell. A cached record is reused only if it was made
with the same configuration (protocol version, steps, method name, model and datamodule
kwargs) and, for methods that run ``lightning_gradguard`` code, the same library sources.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.core.guard import StepReport

from .common import json_float, library_id, source_hash
from .methods import Method, get_method, method_slug

__all__ = ["CACHE_VERSION", "GuardEvents", "Monitor", "RunCache", "RunWorkload", "run_one",
           "total_norm"]

library_id()  # the sources this process imported (see library_id)

#: Bump when the run protocol or the record changes: older cache files are then ignored.
CACHE_VERSION = 3


class RunWorkload(Protocol):
    """What :func:`run_one` and :class:`RunCache` need of a workload (the stability grid's
    :class:`~gradbench.workloads.Workload`, the zoo's and the rescue benchmark's)."""

    @property
    def name(self) -> str: ...

    @property
    def trainer_kwargs(self) -> dict[str, Any]: ...

    def cache_key(self, lr: float, seed: int) -> dict[str, Any]: ...

    def build(self, lr: float, seed: int) -> tuple[Any, Any]: ...

    def evaluate(self, model: Any, datamodule: Any) -> dict[str, float]: ...


def total_norm(tensors: Sequence[torch.Tensor]) -> float:
    """L2 norm of all ``tensors`` together (independent of the library under test)."""
    if not tensors:
        return 0.0
    norms = torch._foreach_norm([t.detach().float() for t in tensors], 2.0)
    return float(torch.linalg.vector_norm(torch.stack(norms)))


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


class GuardEvents(Callback):
    """Every step a GradGuard acted on, from its cores' ``GuardCore.listeners``.

    One row per step that clipped, skipped, backed off, or saw a spike, growth or a
    non-finite value: ``[step, action, reason, backoff (0/1), grad_norm, grad_norm_clipped,
    threshold, lr_scale]`` (floats as :func:`~gradbench.common.json_float`); ``reason`` is
    the step's ``StepReport.reason`` (why it backed off or halted), ``""`` on other steps.
    Put it after the guards in the callback list: their cores are built in their
    ``on_train_start``.
    """

    def __init__(self, guards: Sequence[GradGuard]) -> None:
        self.guards = list(guards)
        self.events: list[list[Any]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for guard in self.guards:
            for core in guard.cores.values():
                if self._listen not in core.listeners:
                    core.listeners.append(self._listen)

    def _listen(self, measurement: Any, decision: Any, r: StepReport) -> None:
        if r.action.value != "none" or r.backoff or r.spike or r.growth or not r.finite:
            reason = r.reason.value if r.reason is not None else ""
            self.events.append([r.step, r.action.value, reason, int(r.backoff),
                                json_float(r.grad_norm), json_float(r.grad_norm_clipped),
                                json_float(r.threshold), json_float(r.lr_scale)])


def _config(workload: RunWorkload, lr: float, seed: int, method: str,
            steps: int) -> dict[str, Any]:
    """The part of a record that identifies its configuration (the cache key)."""
    return {"version": CACHE_VERSION, "model": workload.name, "lr": lr, "seed": seed,
            "method": method, "steps": steps, **workload.cache_key(lr, seed)}


def run_one(workload: RunWorkload, lr: float, seed: int, method: Method,
            steps: int) -> dict[str, Any]:
    """Train one (workload, lr, seed, method) cell and return its JSON record."""
    lightning.seed_everything(seed, verbose=False)
    model, datamodule = workload.build(lr, seed)
    datamodule.setup("fit")
    initial = workload.evaluate(model, datamodule)
    setup = method.build()
    monitor = Monitor()
    guards = [cb for cb in setup.callbacks if isinstance(cb, GradGuard)]
    recorder = [GuardEvents(guards)] if guards else []
    tmp = tempfile.mkdtemp(prefix="gg_stability_")
    t0 = time.perf_counter()
    try:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp,
            callbacks=[monitor, *setup.callbacks, *recorder],
            **{**workload.trainer_kwargs, **setup.trainer_kwargs},
        )
        trainer.fit(model, datamodule=datamodule)
        steps_run = trainer.global_step
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    final = workload.evaluate(model, datamodule)
    nonfinite = monitor.nonfinite_steps
    if monitor.params_nonfinite_at is not None:
        nonfinite += steps - steps_run  # every remaining step would be non-finite too
    final_loss = final["val_loss"]
    record: dict[str, Any] = {
        **_config(workload, lr, seed, method.name, steps),
        "initial": {k: json_float(v) for k, v in initial.items()},
        "final": {k: json_float(v) for k, v in final.items()},
        "diverged": (not math.isfinite(final_loss)) or final_loss > initial["val_loss"],
        "nonfinite_steps": nonfinite,
        "steps_run": steps_run,
        "params_nonfinite_at": monitor.params_nonfinite_at,
        "seconds": round(seconds, 2),
        "library": library_id(),
        "trace": {
            "loss": [json_float(x) for x in monitor.loss],
            "raw_norm": [json_float(x) for x in monitor.raw],
            "applied_norm": [json_float(x) for x in monitor.applied],
            "lr": [json_float(x) for x in monitor.lr],
        },
    }
    if guards:
        s = guards[0].summary()
        record["gradguard"] = {k: s[k] for k in ("spikes", "clipped_steps", "skipped_steps",
                                                 "lr_backoffs", "growth_events", "lr_scale",
                                                 "halted")}
        record["events"] = recorder[0].events
    return record


@dataclass(frozen=True)
class RunCache:
    """One JSON record per (workload, lr, seed, method) under ``root``.

    Args:
        root: The cache directory (``<root>/<workload>/lr<lr>_seed<seed>_<method>.json``).
        any_library: Reuse runs of library-dependent methods made with other
            ``lightning_gradguard`` sources too (by default they are rerun).
    """

    root: Path
    any_library: bool = False

    def path(self, model: str, lr: float, seed: int, method: str) -> Path:
        return self.root / model / f"lr{lr:g}_seed{seed}_{method_slug(method)}.json"

    def load(self, workload: RunWorkload, lr: float, seed: int, method: str,
             steps: int) -> dict[str, Any] | None:
        """The cached record of this configuration, or ``None`` (missing, stale, unreadable)."""
        path = self.path(workload.name, lr, seed, method)
        if not path.exists():
            return None
        try:
            rec: dict[str, Any] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        want = _config(workload, lr, seed, method, steps)
        if any(rec.get(k) != v for k, v in want.items()):
            return None
        if get_method(method).library and not self.any_library \
                and source_hash(str(rec.get("library", ""))) != source_hash(library_id()):
            return None
        return rec

    def save(self, rec: dict[str, Any]) -> None:
        path = self.path(rec["model"], rec["lr"], rec["seed"], rec["method"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)
