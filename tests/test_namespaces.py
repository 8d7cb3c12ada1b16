"""The same behaviour under both import namespaces: ``lightning.pytorch`` and the standalone
``pytorch_lightning`` package (whose Trainer rejects callbacks of the other namespace)."""

from __future__ import annotations

import copy
import csv
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from support.modules import tiny_regression_class
from torch.utils.data import TensorDataset

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


def _callbacks(ns: str) -> ModuleType:
    if ns == "lightning.pytorch":
        return importlib.import_module("lightning_gradguard.callbacks")
    return importlib.import_module("lightning_gradguard.pytorch_lightning")


def _module_cls(pl: ModuleType) -> type:
    class Tiny(tiny_regression_class(pl.LightningModule)):  # type: ignore[misc]
        def __init__(self, faults: dict[int, str] | None = None) -> None:
            g = torch.Generator().manual_seed(1)
            x = torch.randn(256, 4, generator=g)
            super().__init__(lr=0.01, opt="adam",
                             data=TensorDataset(x, x.sum(1, keepdim=True)))
            self.faults = faults or {}
            self.history: list[tuple[int, list[torch.Tensor], Any]] = []

        def on_after_backward(self) -> None:
            kind = self.faults.get(self.global_step)
            g = self.net[0].weight.grad
            if kind == "nan" and g is not None:
                g[0, 0] = float("nan")
            elif kind == "scale":
                for p in self.parameters():
                    if p.grad is not None:
                        p.grad.mul_(1e6)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers().optimizer  # type: ignore[union-attr]
            self.history.append((self.global_step - 1,
                                 [p.detach().clone() for p in self.parameters()],
                                 copy.deepcopy(opt.state_dict()["state"])))

    return Tiny


def _fit(ns: str, tmp_path: Path, steps: int, faults: dict[int, str],
         callbacks: list[Any], logger: Any = False) -> tuple[Any, Any]:
    pl = importlib.import_module(ns)
    model = _module_cls(pl)(faults)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks,
                         logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         log_every_n_steps=5)
    trainer.fit(model)
    return trainer, model


@pytest.mark.parametrize("ns", NAMESPACES)
def test_nan_step_is_a_true_skip(ns: str, tmp_path: Path) -> None:
    guard = _callbacks(ns).GradGuard()
    _, model = _fit(ns, tmp_path, 12, {6: "nan"}, [guard])
    before, after = model.history[5], model.history[6]
    assert after[0] == 6
    for a, b in zip(before[1], after[1], strict=True):
        assert torch.equal(a, b)
    for k, state in before[2].items():
        for name, t in state.items():
            assert torch.equal(t, after[2][k][name]), name
    s = guard.summary()
    assert (s["skipped_steps"], s["nonfinite_steps"], s["steps"]) == (1, 1, 12)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_spike_is_clipped(ns: str, tmp_path: Path) -> None:
    guard = _callbacks(ns).GradGuard()
    _, model = _fit(ns, tmp_path, 12, {8: "scale"}, [guard])
    s = guard.summary()
    assert (s["spikes"], s["clipped_steps"], s["skipped_steps"]) == (1, 1, 0)
    assert guard.last_reports[0].finite
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("ns", NAMESPACES)
def test_persistent_nan_halts_with_checkpoint(ns: str, tmp_path: Path) -> None:
    guard = _callbacks(ns).GradGuard(halt_after=3)
    trainer, _ = _fit(ns, tmp_path, 40, dict.fromkeys(range(5, 40), "nan"), [guard])
    assert guard.summary()["halted"]
    assert trainer.global_step <= 5 + 3
    assert (tmp_path / "gradguard_last_good.ckpt").is_file()


@pytest.mark.parametrize("ns", NAMESPACES)
def test_tags_reach_the_csv_logger(ns: str, tmp_path: Path) -> None:
    loggers = importlib.import_module(f"{ns}.loggers")
    cbs = _callbacks(ns)
    logger = loggers.CSVLogger(str(tmp_path), name="run")
    guard = cbs.GradGuard()
    _fit(ns, tmp_path, 12, {7: "nan"}, [guard], logger=logger)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0])
    for tag in ("grad_norm", "grad_norm_clipped", "clip_threshold", "lr_scale", "skipped_steps",
                "spikes", "clipped_steps", "nonfinite_steps"):
        assert f"gradguard/{tag}" in header
    skip_rows = [r for r in rows if r.get("gradguard/skipped_steps") == "1.0"]
    assert skip_rows
    assert skip_rows[0]["step"] == "7"  # the event is logged at its step, between intervals


@pytest.mark.parametrize("ns", NAMESPACES)
def test_gradient_monitor_runs(ns: str, tmp_path: Path) -> None:
    loggers = importlib.import_module(f"{ns}.loggers")
    logger = loggers.CSVLogger(str(tmp_path), name="mon")
    _fit(ns, tmp_path, 11, {}, [_callbacks(ns).GradientMonitor()], logger=logger)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        header = set(next(csv.reader(f)))
    assert {"gradmonitor/grad_norm", "gradmonitor/nonfinite_steps"} <= header


@pytest.mark.parametrize("ns", NAMESPACES)
def test_callbacks_subclass_their_namespace_callback(ns: str) -> None:
    callback_cls = importlib.import_module(ns).Callback
    cbs = _callbacks(ns)
    assert isinstance(cbs.GradGuard(), callback_cls)
    assert isinstance(cbs.GradientMonitor(), callback_cls)
