"""NaN / Inf / x1e6 gradients, during and after warmup, across optimizers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support.modules import TinyModule
from support.recorders import Recorder, StateAround
from support.state import all_finite, assert_state_equal
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.core import Action
from lightning_gradguard.testing import Fault, FaultInjector

OPTIMIZERS = ["sgdm", "adam", "adamw", "adamw_foreach", "adamw_fused", "rmsprop"]
LR = {"sgdm": 0.02, "adam": 0.01, "adamw": 0.01, "adamw_foreach": 0.01, "adamw_fused": 0.01,
      "rmsprop": 0.005}
WARMUP_K = 3  # inside ZScoreClip's default warmup (25 observations)
LATE_K = 40  # after it
N_STEPS = 50


@pytest.mark.parametrize("k", [WARMUP_K, LATE_K])
@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_nonfinite_step_is_a_true_skip(opt: str, kind: str, k: int) -> None:
    around = StateAround(k)
    guard = GradGuard()
    injector = FaultInjector([Fault(k, kind=kind)])
    module = TinyModule(opt=opt, lr=LR[opt])
    trainer = fit(module, k + 3, [injector, guard, around])
    assert injector.injected == [(k, "grad", kind)]
    assert guard.last_reports[0].finite
    s = guard.summary()
    assert (s["nonfinite_steps"], s["skipped_steps"], s["steps"]) == (1, 1, trainer.global_step)
    assert around.before is not None
    assert around.after is not None
    params_before, opt_before = around.before
    params_after, opt_after = around.after
    for a, b in zip(params_before, params_after, strict=True):
        assert torch.equal(a, b)
    # state tensors (step counts, moments, momentum buffers) and param groups (lr, ...)
    assert_state_equal(opt_before, opt_after)
    # NaN equals NaN in assert_state_equal: the state must also be finite
    assert all(bool(torch.isfinite(t).all())
               for s in opt_after["state"].values() for t in s.values())
    assert opt_before["state"], "the optimizer had state before the fault (k >= 1)"
    assert all_finite(module)
    # the steps after the skip did update the weights
    assert any(not torch.equal(a, b.detach()) for a, b in
               zip(params_after, module.parameters(), strict=True))


class GradsAt(Callback):
    """Copies the gradients at step ``k`` in ``on_before_optimizer_step`` (list it before
    or after GradGuard to see them before or after the guard acted)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if trainer.global_step == self.k:
            self.grads = [p.grad.detach().clone() for p in pl_module.parameters()
                          if p.grad is not None]


def _norm(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.double()) for g in grads])))


@pytest.mark.parametrize("k", [WARMUP_K, LATE_K])
@pytest.mark.parametrize("opt", ["sgdm", "adam", "adamw_fused"])
def test_scaled_gradient_is_clipped_and_training_stays_finite(opt: str, k: int) -> None:
    guard = GradGuard()
    before, after = GradsAt(k), GradsAt(k)
    reports: dict[int, Any] = {}

    class Reports(Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                     optimizer: torch.optim.Optimizer) -> None:
            reports[trainer.global_step] = guard.last_reports[0]

    module = TinyModule(opt=opt, lr=LR[opt])
    fit(module, k + 5, [FaultInjector([Fault(k, kind="scale", factor=1e6)]), before, guard,
                        after, Reports()])
    assert all_finite(module)
    s = guard.summary()
    assert s["spikes"] == 1
    assert s["clipped_steps"] == 1
    assert s["nonfinite_steps"] == 0
    report = reports[k]
    assert report.spike
    assert report.action is Action.CLIP
    assert report.step == k  # reported with Lightning's global_step
    # the gradients the optimizer receives: the x1e6 gradients scaled down, direction kept,
    # to the reported clipped norm, which is the threshold (up to clip_coef's eps)
    norm_in, norm_out = _norm(before.grads), _norm(after.grads)
    assert norm_in == pytest.approx(report.grad_norm, rel=1e-5)
    assert norm_out == pytest.approx(report.grad_norm_clipped, rel=1e-5)
    assert norm_out == pytest.approx(report.threshold, rel=1e-5)
    assert norm_out < 1e-3 * norm_in
    coef = norm_out / norm_in
    for g_in, g_out in zip(before.grads, after.grads, strict=True):
        torch.testing.assert_close(g_out.double(), g_in.double() * coef, rtol=1e-5, atol=0.0)


# ----------------------------------------------------------------------------- statistics
class SilentSkip(GradGuard):
    """Reference: step ``skip_at`` is skipped *without* the guard seeing it."""

    def __init__(self, skip_at: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.skip_at = skip_at

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if trainer.global_step == self.skip_at:
            for p in pl_module.parameters():
                p.grad = None
            self._loss = None
            return
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def _thresholds(faults: list[Fault], guard: GradGuard, opt: str = "sgdm") -> dict[int, float]:
    rec = Recorder(guard)
    module = TinyModule(opt=opt, lr=LR[opt])
    fit(module, N_STEPS, [FaultInjector(faults), guard, rec])
    assert all_finite(module)
    return rec.threshold


_CACHE: dict[str, dict[int, float]] = {}


def _fault_free() -> dict[int, float]:
    if "clean" not in _CACHE:
        _CACHE["clean"] = _thresholds([], GradGuard())
    return _CACHE["clean"]


def _rel(a: float, b: float) -> float:
    return abs(a / b - 1.0)


@pytest.mark.parametrize("k", [WARMUP_K, LATE_K])
def test_nonfinite_step_leaves_no_trace_in_statistics(k: int) -> None:
    """Against a run where the same step is skipped without the guard seeing it, the
    threshold sequence is identical (no backoff in either run, so same trajectory)."""
    faulty = _thresholds([Fault(k, kind="nan")], GradGuard(lr_backoff=False))
    ref = _thresholds([], SilentSkip(k, lr_backoff=False))
    assert sorted(faulty) == sorted(ref)
    for step in range(k, N_STEPS):
        assert faulty[step] == ref[step], step


# Relative difference of guard.cores[0].policy.threshold() right after the fault step vs a
# fault-free run (SGD momentum 0.9, lr 0.02, default GradGuard), and at the last step. After
# warmup every fault is within 1% right after: a non-finite norm never enters the statistics
# and an isolated x1e6 spike is left out of them. During warmup the statistics are an exact
# running mean over a handful of norms, so the faulty run (one observation fewer, plus the LR
# backoff of a non-finite step) differs by a few percent: bounded at 5% there. Measured with
# the default z_threshold 2.5: nan/inf/x1e6@40 0.64% right after (0.18% / 1.7% at the last
# step); @3 3.2% right after (5.0% / 12.5% at the last step). Run with -s to print them.
# Later the runs differ by their trajectories (a skipped update and a backoff, or one larger
# clipped update), not by poisoned statistics (the exact-equality test above); hence the looser
# bound at the last step. x1e6 during warmup is clipped to the lower of ``warmup_factor`` (10)
# x the mean norm (15.8 here) and the SGD update cap of ``max_update_ratio`` (9.57 here): with
# momentum 0.9 that one larger update moves the trajectory most.
@pytest.mark.parametrize(
    ("kind", "k", "bound", "end_bound"),
    [
        ("nan", LATE_K, 0.01, 0.02),
        ("inf", LATE_K, 0.01, 0.02),
        ("scale", LATE_K, 0.01, 0.02),
        ("nan", WARMUP_K, 0.05, 0.06),
        ("inf", WARMUP_K, 0.05, 0.06),
        ("scale", WARMUP_K, 0.05, 0.15),
    ],
)
def test_threshold_after_fault_close_to_fault_free(kind: str, k: int, bound: float,
                                                   end_bound: float) -> None:
    clean = _fault_free()
    faulty = _thresholds([Fault(k, kind=kind, factor=1e6)], GradGuard())
    diff = _rel(faulty[k], clean[k])
    end = _rel(faulty[N_STEPS - 1], clean[N_STEPS - 1])
    print(f"threshold after {kind}@{k}: {faulty[k]:.6g} vs fault-free {clean[k]:.6g} "
          f"-> {100 * diff:.3f}%; at the last step {100 * end:.3f}%")
    assert diff <= bound
    assert end <= end_bound
