"""GradientMonitor: what it logs, how often it reads back to the host, and that it never
changes the training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.logger import Logger
from support.modules import TinyRegression
from support.syncs import count_syncs, nonzero
from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    SCALARS,
    EventAccumulator,
)

from lightning_gradguard.callbacks import GradientMonitor
from lightning_gradguard.core._host import host_reads, reset_host_reads
from lightning_gradguard.testing import Fault, FaultInjector

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*")

STEPS = 12
EVERY = 5
LOGGED = (0, 5, 10)


# --------------------------------------------------------------------------- tiny models
def tiny(depth: int = 2) -> pl.LightningModule:
    """``make_net(depth)`` from the global RNG, SGD with momentum (LR 0.1) on 128 noiseless
    samples, shuffled by a generator seeded with 1."""
    return TinyRegression(opt="sgdm", depth=depth, log_loss=False, seed=None, shuffle_seed=1)


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def gradguard(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for s, m in self.calls:
            gg = {k: v for k, v in m.items() if k.startswith("gradmonitor/")}
            if gg:
                assert s is not None
                assert s not in out, f"two gradguard calls at step {s}"
                out[s] = gg
        return out


class Before(Callback):
    """Listed before the monitor: grads, per-module norms, host-read count."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}
        self.modules: dict[int, dict[str, float]] = {}
        self.grads: dict[int, list[torch.Tensor]] = {}
        self.reads: dict[int, int] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        self.grads[step] = [g.detach().clone() for _, g in named]
        self.total[step] = float(torch.nn.utils.get_total_norm([g for _, g in named]))
        groups: dict[str, list[torch.Tensor]] = {}
        for n, g in named:
            groups.setdefault(".".join(n.split(".")[:2]), []).append(g)
        self.modules[step] = {k: float(torch.nn.utils.get_total_norm(v))
                              for k, v in groups.items()}
        self.reads[step] = host_reads()


class After(Callback):
    """Listed after the monitor: grads unchanged? host reads during its hook."""

    def __init__(self, before: Before) -> None:
        self.before = before
        self.reads: dict[int, int] = {}
        self.unchanged: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        self.reads[step] = host_reads() - self.before.reads[step]
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        ref = self.before.grads[step]
        self.unchanged[step] = len(grads) == len(ref) and all(
            torch.equal(a, b) or (torch.isnan(a).any() and torch.equal(
                torch.nan_to_num(a), torch.nan_to_num(b)))
            for a, b in zip(grads, ref, strict=True))


def count_hook_syncs(monitor: GradientMonitor) -> dict[int, dict[str, int]]:
    """Wrap the monitor's hook in :func:`count_syncs`: every host synchronisation it makes,
    also those made inside torch's C++ (``bool(t)``, ``t.item()``, ``torch.is_nonzero``),
    per global step. The core's ``to_host`` counter only sees reads that go through it."""
    per_step: dict[int, dict[str, int]] = {}
    hook = monitor.on_before_optimizer_step

    def counted(trainer: pl.Trainer, pl_module: pl.LightningModule,
                optimizer: torch.optim.Optimizer) -> None:
        with count_syncs() as counts:
            hook(trainer, pl_module, optimizer)
        per_step[trainer.global_step] = nonzero(counts)

    monitor.on_before_optimizer_step = counted  # type: ignore[method-assign]
    return per_step


class ZeroNonFinite(Callback):
    """After the monitor: replace NaN/Inf grads so an unguarded run stays finite."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        for p in pl_module.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)


def _fit(callbacks: list[Callback], logger: Any = False, depth: int = 2,
         steps: int = STEPS) -> tuple[pl.Trainer, pl.LightningModule]:
    pl.seed_everything(0, verbose=False)
    model = tiny(depth)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, log_every_n_steps=EVERY, logger=logger,
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    reset_host_reads()
    trainer.fit(model)
    return trainer, model


# --------------------------------------------------------------------------- tests
def test_tags_values_and_host_reads(tmp_path: Path) -> None:
    rec = RecordingLogger()
    before = Before()
    after = After(before)
    monitor = GradientMonitor(log_histograms=True)
    syncs = count_hook_syncs(monitor)
    tb = TensorBoardLogger(str(tmp_path))
    _fit([before, monitor, after], logger=[rec, tb])

    logged = rec.gradguard()
    assert sorted(logged) == list(LOGGED)
    layer_tags = {"gradmonitor/layer_norm/net.0", "gradmonitor/layer_norm/net.2"}
    for step, m in logged.items():
        assert set(m) == {"gradmonitor/grad_norm", "gradmonitor/grad_norm_max",
                          "gradmonitor/nonfinite_steps", "gradmonitor/depth_ratio"} | layer_tags
        assert m["gradmonitor/grad_norm"] == pytest.approx(before.total[step], rel=1e-5)
        assert m["gradmonitor/nonfinite_steps"] == 0.0
        mods = before.modules[step]
        assert m["gradmonitor/layer_norm/net.0"] == pytest.approx(mods["net.0"], rel=1e-5)
        assert m["gradmonitor/layer_norm/net.2"] == pytest.approx(mods["net.2"], rel=1e-5)
        assert m["gradmonitor/depth_ratio"] == pytest.approx(mods["net.0"] / mods["net.2"],
                                                           rel=1e-5)
    # largest norm of the interval (the logging step included)
    prev = -1
    for step in LOGGED:
        window = [before.total[s] for s in range(prev + 1, step + 1)]
        assert logged[step]["gradmonitor/grad_norm_max"] == pytest.approx(max(window), rel=1e-5)
        prev = step

    # zero host reads between intervals, exactly one at each logging step
    assert after.reads == {s: int(s % EVERY == 0) for s in range(STEPS)}
    assert host_reads() == len(LOGGED)
    # the same, counted by torch: no synchronisation at all between intervals; at a logging
    # step one transfer of the packed values and no scalar read (the histogram's values are
    # already on the host: TensorBoard's own numpy()/cpu() of them are no device sync)
    assert sorted(syncs) == list(range(STEPS))
    for s, counts in syncs.items():
        if s % EVERY:
            assert counts == {}, f"step {s}: {counts}"
        else:
            assert counts.get("tolist") == 1, f"step {s}: {counts}"
            assert "scalar" not in counts, f"step {s}: {counts}"
    # grads are untouched by the monitor's hook
    assert all(after.unchanged.values())
    assert sorted(after.unchanged) == list(range(STEPS))

    # the same values reach TensorBoard, plus the histogram of per-layer norms
    acc = EventAccumulator(tb.log_dir, size_guidance={SCALARS: 0, HISTOGRAMS: 0})
    acc.Reload()
    scal = {e.step: e.value for e in acc.Scalars("gradmonitor/grad_norm")}
    assert sorted(scal) == list(LOGGED)
    assert scal[5] == pytest.approx(before.total[5], rel=1e-5)
    assert "gradmonitor/layer_norms" in acc.Tags()["histograms"]
    assert [e.step for e in acc.Histograms("gradmonitor/layer_norms")] == list(LOGGED)


def test_layer_tags_bounded_by_max_layers() -> None:
    rec = RecordingLogger()
    before = Before()
    # 6 Linear modules: net.0, net.2, ..., net.10; max_layers=4 -> groups of 2 -> 3 tags
    _fit([before, GradientMonitor(max_layers=4)], logger=rec, depth=6, steps=6)
    logged = rec.gradguard()
    assert sorted(logged) == [0, 5]
    for step, m in logged.items():
        layer = {k.removeprefix("gradmonitor/layer_norm/"): v for k, v in m.items()
                 if k.startswith("gradmonitor/layer_norm/")}
        assert 1 < len(layer) <= 4
        assert list(layer) == ["net.0..net.2", "net.4..net.6", "net.8..net.10"]
        mods = before.modules[step]
        merged = math.sqrt(mods["net.0"] ** 2 + mods["net.2"] ** 2)
        assert layer["net.0..net.2"] == pytest.approx(merged, rel=1e-5)
        last = math.sqrt(mods["net.8"] ** 2 + mods["net.10"] ** 2)
        assert m["gradmonitor/depth_ratio"] == pytest.approx(merged / last, rel=1e-5)


def test_layer_depth_zero_logs_no_layer_tags() -> None:
    rec = RecordingLogger()
    _fit([GradientMonitor(layer_depth=0)], logger=rec, steps=6)
    for m in rec.gradguard().values():
        assert set(m) == {"gradmonitor/grad_norm", "gradmonitor/grad_norm_max",
                          "gradmonitor/nonfinite_steps"}


def test_nan_between_intervals_shows_in_next_log() -> None:
    rec = RecordingLogger()
    before = Before()
    after = After(before)
    monitor = GradientMonitor()
    syncs = count_hook_syncs(monitor)
    _fit([FaultInjector([Fault(step=7, kind="nan")]), before, monitor, after,
          ZeroNonFinite()], logger=rec)
    logged = rec.gradguard()
    assert sorted(logged) == list(LOGGED)  # observe-only: no extra log at the NaN step
    assert logged[0]["gradmonitor/nonfinite_steps"] == 0.0
    assert logged[5]["gradmonitor/nonfinite_steps"] == 0.0
    assert logged[10]["gradmonitor/nonfinite_steps"] == 1.0
    assert math.isnan(before.total[7])
    # the max of the interval ignores the NaN step
    window = [before.total[s] for s in (6, 8, 9, 10)]
    assert logged[10]["gradmonitor/grad_norm_max"] == pytest.approx(max(window), rel=1e-5)
    assert after.reads == {s: int(s % EVERY == 0) for s in range(STEPS)}
    # counted by torch too (the NaN step included): one transfer per logging step, no other
    assert syncs == {s: {"tolist": 1} if s % EVERY == 0 else {} for s in range(STEPS)}
    assert all(after.unchanged.values())


def test_training_identical_with_and_without_monitor() -> None:
    _, plain = _fit([])
    _, monitored = _fit([GradientMonitor(log_histograms=True)], logger=RecordingLogger())
    a, b = plain.state_dict(), monitored.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_no_logger_nothing_breaks() -> None:
    before = Before()
    after = After(before)
    trainer, _ = _fit([before, GradientMonitor(log_histograms=True), after], steps=6)
    assert trainer.global_step == 6
    assert all(after.unchanged.values())


@pytest.mark.parametrize("norm_type", [1.0, math.inf])
def test_logged_norms_follow_norm_type(norm_type: float) -> None:
    """The total, per-module and maximum norms are of the requested type (not the 2-norm),
    compared with an independent norm of the gradients the monitor saw."""
    rec = RecordingLogger()
    before = Before()
    _fit([before, GradientMonitor(norm_type=norm_type)], logger=rec, steps=6)
    logged = rec.gradguard()
    assert sorted(logged) == [0, 5]

    def norm(grads: list[torch.Tensor]) -> float:
        flat = torch.cat([g.reshape(-1).double() for g in grads])
        return float(torch.linalg.vector_norm(flat, norm_type))

    names = [n for n, p in tiny().named_parameters()]  # the order of ``before.grads``
    for step, m in logged.items():
        grads = before.grads[step]
        total = norm(grads)
        assert total != pytest.approx(before.total[step], rel=1e-3)  # not the 2-norm
        assert m["gradmonitor/grad_norm"] == pytest.approx(total, rel=1e-5)
        for layer in ("net.0", "net.2"):
            mine = [g for n, g in zip(names, grads, strict=True) if n.startswith(layer + ".")]
            assert m[f"gradmonitor/layer_norm/{layer}"] == pytest.approx(norm(mine), rel=1e-5)
    window = [norm(before.grads[s]) for s in range(1, 6)]
    assert logged[5]["gradmonitor/grad_norm_max"] == pytest.approx(max(window), rel=1e-5)
