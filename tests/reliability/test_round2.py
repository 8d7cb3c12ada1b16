"""Issue 16, reliability round 2: one test (or more) per item; each fails on d472c44."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import fsspec
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_gradguard.callbacks import GradGuard, GradientMonitor
from lightning_gradguard.core import GuardCore
from lightning_gradguard.core.guard import Action
from lightning_gradguard.core.norms import grad_norms
from lightning_gradguard.core.policies import AdaptiveGradClip
from lightning_gradguard.core.snapshot import Snapshot
from lightning_gradguard.testing import Fault, FaultInjector
from tests.callbacks._helpers import TinyModule, all_finite, fit, params_of

CKPT = "gradguard_last_good.ckpt"
NAN = float("nan")


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "lightning_gradguard" and r.levelno == logging.ERROR]


class NaNFrom(TinyModule):
    """Loss (and so every gradient) NaN from ``global_step == start`` on."""

    def __init__(self, start: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start = start

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * NAN if self.global_step >= self.start else loss


# --------------------------------------------------------------------------- item 1
def _two_layers() -> tuple[torch.nn.Sequential, torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    return torch.nn.Sequential(a, b), a, b


def _backward(model: torch.nn.Module) -> None:
    model(torch.ones(4, 3)).pow(2).mean().backward()


def test_param_group_added_later_is_guarded() -> None:
    model, a, b = _two_layers()
    opt = torch.optim.Adam(a.parameters(), lr=0.1)
    guard = GuardCore(model, opt)
    _backward(model)
    guard.step()
    opt.step()
    opt.zero_grad()
    opt.add_param_group({"params": list(b.parameters())})  # e.g. BackboneFinetuning
    _backward(model)
    with torch.no_grad():
        b.weight.grad[0, 0] = NAN  # NaN only in the new group
    report = guard.step()
    assert not report.finite
    assert report.action is Action.SKIP
    assert a.weight.grad is None
    assert b.weight.grad is None
    opt.step()
    assert all_finite(model)


class UnfreezeAt(Callback):
    """Adds ``net.0`` to the optimizer at ``step`` (as ``BackboneFinetuning`` does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            backbone = list(pl_module.net[0].parameters())
            for p in backbone:
                p.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": backbone})


class FrozenBackbone(TinyModule):
    def configure_optimizers(self) -> Any:
        for p in self.net[0].parameters():
            p.requires_grad_(False)
        return torch.optim.Adam(self.net[2].parameters(), lr=0.01)


def test_unfrozen_backbone_is_guarded_in_a_fit() -> None:
    guard = GradGuard(rollback=True, snapshot_every=2, rollback_after=2)
    faults = FaultInjector([Fault(s, kind="nan", params="net.0.*") for s in (5, 6, 7)])
    module = FrozenBackbone()
    fit(module, 10, [UnfreezeAt(3), faults, guard])
    assert all_finite(module)
    s = guard.summary()
    assert s["skipped_steps"] == 3
    assert s["rollbacks"] == 1


def test_rollback_after_add_param_group_restores_consistently() -> None:
    model, a, b = _two_layers()
    opt = torch.optim.SGD(a.parameters(), lr=0.01, momentum=0.9)
    guard = GuardCore(model, opt, rollback=True, rollback_after=2)
    _backward(model)
    guard.step()  # step 1: snapshot of the one-group optimizer
    opt.step()
    opt.zero_grad()
    opt.add_param_group({"params": list(b.parameters())})
    _backward(model)
    guard.step()  # finite: the snapshot is taken again with both groups (before the update)
    good = params_of(model)
    opt.step()
    opt.zero_grad()
    assert guard.snapshot is not None
    assert guard.snapshot.step == 2
    with torch.no_grad():
        a.weight.fill_(1e3)  # the weights move on, then the steps fail
    for _ in range(2):
        _backward(model)
        with torch.no_grad():
            b.weight.grad.fill_(NAN)
        report = guard.step()  # rollback at the second: no "different number of groups"
        opt.step()
        opt.zero_grad()
    assert report.rollback
    assert all(torch.equal(x, y) for x, y in zip(params_of(model), good, strict=True))
    assert len(opt.state_dict()["param_groups"]) == 2


def test_snapshot_restore_with_other_groups_changes_nothing() -> None:
    model, a, b = _two_layers()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    snap = Snapshot()
    snap.capture(model, [opt], step=1)
    opt.add_param_group({"params": list(b.parameters())})
    with torch.no_grad():
        a.weight.fill_(7.0)
    with pytest.raises(RuntimeError, match=r"param groups of sizes \[2\].*\[2, 2\]"):
        snap.restore(model, [opt])
    assert bool((a.weight == 7.0).all())  # the model was not restored either


# --------------------------------------------------------------------------- item 2
def test_mixed_cpu_accelerator_norm_is_reduced_on_the_accelerator() -> None:
    # 'meta' stands in for an accelerator: the device choice is what is tested on CPU
    grads = [torch.ones(3), torch.ones(4, device="meta")]
    norms = grad_norms(grads)
    assert norms.total.device.type == "meta"
    assert norms.per_tensor is not None
    assert norms.per_tensor.device.type == "meta"
    assert grad_norms([torch.ones(3), torch.ones(2)]).total.device.type == "cpu"


# --------------------------------------------------------------------------- item 3
def test_remote_checkpoint_dir_writes_through_fsspec(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = "memory://gradguard_i16/run"
    guard = GradGuard(halt_after=3, checkpoint_dir=url)
    trainer = fit(NaNFrom(5), 30, [guard])
    assert guard.summary()["halted"]
    fs = fsspec.filesystem("memory")
    try:
        assert fs.isfile("/gradguard_i16/run/" + CKPT)
        assert guard.summary()["halt_checkpoint"] == f"{url}/{CKPT}"
        assert not any(tmp_path.iterdir())  # nothing on local disk ("memory:/...")
        assert trainer.global_step == 5 + 3
    finally:
        fs.rm("/gradguard_i16", recursive=True)


# --------------------------------------------------------------------------- item 4
def test_reused_guard_resumes_like_a_fresh_one(tmp_path: Path) -> None:
    def first_fit(guard: GradGuard) -> Path:
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=10)
        faults = FaultInjector([Fault(3, kind="nan"), Fault(6, kind="scale", factor=1e4)])
        fit(TinyModule(), 10, [faults, guard, ckpt], enable_checkpointing=True)
        return tmp_path / "last.ckpt"

    reused = GradGuard()
    last = first_fit(reused)
    before = reused.summary()
    assert before["steps"] == 10
    assert before["skipped_steps"] == 1
    fit(TinyModule(), 20, [reused], ckpt_path=str(last))

    fresh = GradGuard()
    fit(TinyModule(), 20, [fresh], ckpt_path=str(last))
    assert reused.summary() == fresh.summary()
    assert reused.summary()["steps"] == 20
    assert reused.summary()["skipped_steps"] == 1


def test_state_loaded_between_fits_reaches_the_next_fit() -> None:
    guard = GradGuard()
    fit(TinyModule(), 6, [FaultInjector([Fault(2, kind="nan")]), guard])
    saved = guard.state_dict()
    other = GradGuard()
    fit(TinyModule(), 3, [other])
    other.load_state_dict(saved)  # between two fits of a reused instance
    fit(TinyModule(), 2, [other])
    assert other.summary()["steps"] == 6 + 2
    assert other.summary()["skipped_steps"] == 1


def test_halt_checkpoint_and_monitor_count_are_per_fit(tmp_path: Path) -> None:
    guard = GradGuard(halt_after=3)
    monitor = GradientMonitor()
    fit(NaNFrom(2), 20, [monitor, guard], default_root_dir=tmp_path)
    assert guard.summary()["halt_checkpoint"] == str(tmp_path / CKPT)
    assert monitor.state_dict()["nonfinite_steps"] == 3
    fit(TinyModule(), 5, [monitor, guard], default_root_dir=tmp_path)
    assert guard.summary()["halt_checkpoint"] is None
    assert guard.summary()["halted"] is False
    assert monitor.state_dict()["nonfinite_steps"] == 0


def test_monitor_count_survives_resume(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=8)
    faults = FaultInjector([Fault(2, kind="nan"), Fault(5, kind="inf")])
    fit(TinyModule(), 8, [faults, GradientMonitor(), GradGuard(), ckpt],
        enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert saved["GradientMonitor"] == {"nonfinite_steps": 2}
    resumed = GradientMonitor()
    fit(TinyModule(), 10, [FaultInjector([Fault(9, kind="nan")]), resumed, GradGuard()],
        ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.state_dict()["nonfinite_steps"] == 3


# --------------------------------------------------------------------------- item 5
def test_huge_finite_gradient_under_scaler_is_not_left_to_it() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GuardCore(model, opt)
    for _ in range(30):
        model.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        guard.step(amp_overflow=True)
    model.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    with torch.no_grad():
        model.weight.grad.fill_(6e19)  # finite elements; the float32 norm overflows
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    report = guard.step(amp_overflow=True)
    assert report.action is not Action.AMP_SKIP
    assert report.finite
    assert math.isfinite(report.grad_norm)
    assert report.grad_norm > 1e20
    assert report.action in (Action.CLIP, Action.SKIP)
    if report.action is Action.CLIP:
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert float(total) <= report.threshold * 1.001
    assert guard.counters.amp_overflow_steps == 0


# --------------------------------------------------------------------------- item 6
class DetachedNaNLoss(TinyModule):
    """At ``batch_idx == bad``, the loss is NaN while the gradients stay finite."""

    def __init__(self, bad: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad = bad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.bad:
            loss = loss + torch.tensor(NAN)  # a constant: no gradient reaches it
        return loss


def test_nan_loss_in_an_earlier_micro_batch_is_seen() -> None:
    guard = GradGuard()
    fit(DetachedNaNLoss(bad=4), 4, [guard], accumulate_grad_batches=2)  # window 2: 4, 5
    s = guard.summary()
    assert s["nonfinite_steps"] == 1
    assert s["skipped_steps"] == 1
    assert guard.last_reports[0].loss is not None
    assert math.isfinite(guard.last_reports[0].loss)


# --------------------------------------------------------------------------- item 7
def test_halt_under_min_steps_happens_once(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    saved: list[int] = []

    class Count(Callback):
        def on_save_checkpoint(self, trainer: pl.Trainer, *args: Any) -> None:
            saved.append(trainer.global_step)

    class Weights(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            self.last = params_of(pl_module)
            if trainer.global_step == 9:
                self.at_halt = self.last

    weights = Weights()
    guard = GradGuard(halt_after=3)
    with caplog.at_level(logging.ERROR, logger="lightning_gradguard"):
        trainer = fit(NaNFrom(6), 30, [guard, Count(), weights], default_root_dir=tmp_path,
                      min_steps=30)
    assert trainer.global_step == 30  # Lightning keeps going until min_steps
    errors = _errors(caplog)
    assert len(errors) == 1
    assert "min_steps=30" in errors[0]
    assert saved == [9]
    assert guard.summary()["halted"]
    assert guard.summary()["skipped_steps"] == 3
    assert all(torch.equal(x, y) for x, y in zip(weights.at_halt, weights.last, strict=True))


# --------------------------------------------------------------------------- item 8
def test_unwritable_checkpoint_dir_still_halts_cleanly(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    guard = GradGuard(halt_after=3, checkpoint_dir=blocker / "sub")
    with caplog.at_level(logging.ERROR, logger="lightning_gradguard"):
        trainer = fit(NaNFrom(4), 30, [guard])
    assert trainer.global_step == 4 + 3
    s = guard.summary()
    assert s["halted"]
    assert s["halt_checkpoint"] is None
    errors = _errors(caplog)
    assert "halted training" in errors[0]
    assert "consecutive non-finite steps" in errors[0]
    assert any("could NOT be saved" in e and "checkpoint_dir" in e for e in errors)


# --------------------------------------------------------------------------- item 9
def test_complex_parameters_are_measured_like_clip_grad_norm() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    opt = torch.optim.SGD([w], lr=0.1)
    guard = GuardCore([w], opt)
    (w.abs() ** 2).sum().backward()
    expected = float(torch.nn.utils.get_total_norm([w.grad]))
    report = guard.step()
    assert report.finite
    assert report.grad_norm == pytest.approx(expected, rel=1e-6)
    w.grad = torch.full_like(w, complex(NAN, 0.0))
    assert guard.step().action is Action.SKIP


def test_adaptive_grad_clip_with_sparse_embedding() -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    guard = GuardCore(emb, opt, clip=AdaptiveGradClip(clipping=0.01))
    (emb(torch.tensor([1, 2, 2])).sum() * 100).backward()
    grad = emb.weight.grad
    report = guard.step()
    assert report.action is Action.CLIP
    assert emb.weight.grad is grad  # clipped in place
    dense = grad.to_dense()
    limit = 0.01 * emb.weight.detach().norm(dim=1).clamp_min(1e-3)
    assert bool((dense.norm(dim=1) <= limit * 1.0001).all())
    assert report.grad_norm_clipped == pytest.approx(float(dense.norm()), rel=1e-5)


class PerSampleManual(TinyModule):
    """Manual optimization with ``manual_backward(per_sample_loss, gradient=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self.batch_for_step(batch)
        opt = self.optimizers()
        per_sample = (self(x) - y).pow(2).flatten()
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(per_sample, gradient=torch.full_like(per_sample, 1 / len(x)))
        opt.step()  # type: ignore[union-attr]


def test_manual_backward_with_non_scalar_loss() -> None:
    guard = GradGuard()
    fit(PerSampleManual(), 5, [guard])
    assert guard.summary()["steps"] == 5
    loss = guard.last_reports[0].loss
    assert loss is not None
    assert math.isfinite(loss)
    assert loss > 0


# --------------------------------------------------------------------------- item 10
class LBFGSModule(TinyModule):
    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)


def test_closure_based_optimizer_is_refused_at_setup() -> None:
    with pytest.raises(ValueError, match=r"optimizer 0 \(LBFGS\).*closure several times"):
        fit(LBFGSModule(), 3, [GradGuard()])


# --------------------------------------------------------------------------- item 11
def test_fault_whose_glob_matches_nothing_is_refused() -> None:
    injector = FaultInjector([Fault(2, kind="nan", params="net.O.*")])  # letter O, not 0
    with pytest.raises(ValueError, match=r"matches no parameter.*net\.0\.weight"):
        fit(TinyModule(), 4, [injector, GradGuard()])
    assert injector.injected == []


def test_fault_touching_no_gradient_is_not_recorded() -> None:
    module = TinyModule()
    module.net[0].weight.requires_grad_(False)
    injector = FaultInjector([Fault(1, kind="nan", params="net.0.weight")])
    with pytest.warns(UserWarning, match="touched no gradient"):
        fit(module, 3, [injector])
    assert injector.injected == []
