"""Fault matrix: {NaN, Inf, x1e6} x {warmup, after warmup} x {grad, loss, param} x
{fp32, bf16-mixed, fp16 + GradScaler} = 54 cases, each a ~40-step fit of a tiny model.

What every case checks:

* training completes (``global_step == N_STEPS``) or ends in the documented halt;
* parameters are finite at the end (except where the documented halt says they cannot be:
  non-finite weights without a snapshot);
* a non-finite gradient/loss step is a true skip: the final parameters (and the whole
  threshold sequence) equal those of a reference run in which that step's gradients were
  cleared before the guard (``ClearGradsAt``). Both runs use ``GradGuard(lr_backoff=False)``:
  the default LR backoff after a NaN would (correctly) change every later update;
* the statistics are not poisoned: right after the fault the threshold is within 1% of the
  fault-free run after warmup, within 5% during warmup (there the statistics are the exact
  running mean of a handful of norms, so one observation fewer -- or a spike left out --
  moves them by a few percent by construction);
* the right counters moved.

fp16 with a GradScaler: a NaN/Inf *gradient* is indistinguishable from a scaler overflow
(finite loss, non-finite unscaled grads): the guard counts it in ``amp_overflow_steps`` and
lets the scaler skip the step. A NaN/Inf *loss* is a real non-finite step (counted, skipped
by the guard). A x1e6 *loss* overflows the fp16 backward, so it is a scaler overflow, not a
spike. In every case the scaler halves its scale; since the scale is a power of two the
unscaled gradients of the following steps are bit-identical, so "equal" still means equal
parameters -- the one trace the fault leaves is the scaler's halved scale, asserted as such.

All 54 cases run in the default (CI) suite.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support.modules import TinyModule
from support.recorders import ClearGradsAt, Recorder
from support.state import params_of
from support.trainer import fit, precision_kwargs

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.testing import Fault, FaultInjector

pytestmark = pytest.mark.filterwarnings("ignore:GradGuard:UserWarning")

#: Steps per run; ZScoreClip's default warmup is 25 observations.
N_STEPS = 40
PRECISIONS = ("32", "bf16-mixed", "16-mixed+scaler")
COUNTERS = ("nonfinite_steps", "skipped_steps", "spikes", "clipped_steps",
            "amp_overflow_steps", "lr_backoffs", "rollbacks")


def make_module() -> TinyModule:
    """``Linear(4, 8) - Tanh - Linear(8, 1)``, SGD with momentum (it has optimizer state)."""
    return TinyModule(opt="sgdm", lr=0.02)


@dataclass
class Run:
    trainer: pl.Trainer
    module: TinyModule
    guard: GradGuard
    rec: Recorder
    injector: FaultInjector
    params: list[torch.Tensor]
    #: the GradScaler's scale at the end (fp16 only)
    scale: float | None

    @property
    def summary(self) -> dict[str, Any]:
        return self.guard.summary()

    def counters(self) -> dict[str, int]:
        s = self.guard.summary()
        return {k: s[k] for k in COUNTERS}


def run(precision: str, faults: Sequence[Fault], guard: GradGuard, root: Path | str, *,
        before_guard: Sequence[Callback] = (), max_steps: int = N_STEPS) -> Run:
    """One fit of the tiny model with ``[injector, *before_guard, guard, recorder]``."""
    rec = Recorder(guard)
    injector = FaultInjector(faults)
    module = make_module()
    trainer = fit(module, max_steps, [injector, *before_guard, guard, rec],
                  default_root_dir=str(root), **precision_kwargs(precision))
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return Run(trainer, module, guard, rec, injector, params_of(module),
               None if scaler is None else float(scaler.get_scale()))


def rel(a: float, b: float) -> float:
    return abs(a / b - 1.0)


KINDS = ("nan", "inf", "scale")
WHEN = {"warmup": 3, "late": 30}
TARGETS = ("grad", "loss", "param")
HALT_AFTER = 5  # so that a fault at step 30 can still halt within a 40-step run
CKPT = "gradguard_last_good.ckpt"


def _guard() -> GradGuard:
    """The guard of the grad/loss cases and of their references."""
    return GradGuard(lr_backoff=False, halt_after=HALT_AFTER)


_REFS: dict[tuple[str, int | None], Run] = {}


@pytest.fixture(scope="module")
def refs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("refs")


def _clean(precision: str, root: Path) -> Run:
    key = (precision, None)
    if key not in _REFS:
        _REFS[key] = run(precision, [], _guard(), root)
    return _REFS[key]


def _skipped(precision: str, k: int, root: Path) -> Run:
    key = (precision, k)
    if key not in _REFS:
        _REFS[key] = run(precision, [], _guard(), root, before_guard=[ClearGradsAt(k)])
    return _REFS[key]


def _expected(kind: str, target: str, precision: str) -> dict[str, int]:
    out = dict.fromkeys(COUNTERS, 0)
    fp16 = precision == "16-mixed+scaler"
    if kind == "scale":
        if fp16 and target == "loss":
            out["amp_overflow_steps"] = 1  # x1e6 * loss scale overflows the fp16 backward
        else:
            out["spikes"] = out["clipped_steps"] = 1
    elif fp16 and target == "grad":
        out["amp_overflow_steps"] = 1  # finite loss, non-finite grads: the scaler's case
    else:
        out["nonfinite_steps"] = out["skipped_steps"] = 1
    return out


def _case_id(kind: str, when: str, target: str, precision: str) -> str:
    return f"{kind}-{when}-{target}-{precision}"


def _cases() -> list[object]:
    """All 54 cases (a few seconds in all: every one of them runs in CI)."""
    return [pytest.param(kind, when, target, precision,
                         id=_case_id(kind, when, target, precision))
            for precision in PRECISIONS for target in TARGETS for kind in KINDS
            for when in WHEN]


def _all_finite(params: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


@pytest.mark.parametrize(("kind", "when", "target", "precision"), _cases())
def test_fault_matrix(kind: str, when: str, target: str, precision: str, tmp_path: Path,
                      refs_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    k = WHEN[when]
    if target == "param":
        _param_case(kind, k, precision, tmp_path, caplog)
        return
    r = run(precision, [Fault(k, kind=kind, target=target)], _guard(), tmp_path)
    assert r.injector.injected == [(k, target, kind)]
    assert r.trainer.global_step == N_STEPS
    assert r.summary["steps"] == N_STEPS
    assert not r.summary["halted"]
    assert _all_finite(r.params)
    assert r.counters() == _expected(kind, target, precision)

    # statistics not poisoned: right after the fault, and at the end
    clean = _clean(precision, refs_root)
    bound = 0.05 if when == "warmup" else 0.01
    assert rel(r.rec.threshold[k], clean.rec.threshold[k]) <= bound
    assert all(t == t for t in r.rec.threshold.values()), "a NaN threshold"

    fp16 = precision == "16-mixed+scaler"
    scaler_skipped = fp16 and r.counters() != _expected("scale", "grad", precision)
    if fp16:
        assert clean.scale is not None
        assert r.scale == (clean.scale / 2 if scaler_skipped else clean.scale)
    if kind == "scale":
        if scaler_skipped:  # fp16 x1e6 loss: the scaler skipped the step; same as a skip
            _assert_equals_skip(r, _skipped(precision, k, refs_root))
        return
    _assert_equals_skip(r, _skipped(precision, k, refs_root))


def _assert_equals_skip(r: Run, ref: Run) -> None:
    """The faulty step left no trace: same weights, same statistics as a cleared-grads step."""
    for a, b in zip(r.params, ref.params, strict=True):
        assert torch.equal(a, b)
    assert r.rec.threshold == ref.rec.threshold
    s, s_ref = r.summary, ref.summary
    assert s["steps"] == s_ref["steps"]


def _param_case(kind: str, k: int, precision: str, tmp_path: Path,
                caplog: pytest.LogCaptureFixture) -> None:
    """Parameter faults (injected right after the optimizer step ``k``)."""
    fault = [Fault(k, kind=kind, target="param")]
    fp16 = precision == "16-mixed+scaler"
    if kind == "scale" and not fp16:
        # finite but huge weights: the output layer's gradients explode every step; the guard
        # clips them (repeated spikes also enter the statistics clamped, so it follows the
        # new scale); nothing is non-finite, training goes on
        r = run(precision, fault, GradGuard(halt_after=HALT_AFTER), tmp_path)
        s = r.summary
        assert r.trainer.global_step == N_STEPS
        assert not s["halted"]
        assert _all_finite(r.params)
        assert s["nonfinite_steps"] == s["skipped_steps"] == 0
        # measured: 2 spikes for a fault during warmup (only norms over 10x the running mean
        # are spikes there), 9 after it
        assert s["spikes"] >= (2 if k < 25 else 3)
        assert s["clipped_steps"] == s["spikes"]
        if k < 25:
            # two clips contain it, and nothing says the LR is too high (no update over the
            # cap, clipping not the rule, LR scale 1): no backoff
            assert (s["lr_backoffs"], s["lr_scale"]) == (0, 1.0)
        else:
            # spikes on most steps: clipping is the rule, the evidence for a backoff
            assert s["lr_backoffs"] >= 1
            assert s["lr_scale"] < 1.0
        assert all(t == t for t in r.rec.threshold.values())
        return

    # NaN/Inf weights -- and under fp16 also x1e6 weights, which overflow the fp16 forward --
    # make every later loss non-finite. (a) Without a snapshot: the documented halt after
    # `halt_after` steps; the weights cannot be repaired and nothing is saved.
    plain = GradGuard(halt_after=HALT_AFTER)
    with caplog.at_level(logging.ERROR, logger="lightning_gradguard"):
        r = run(precision, fault, plain, tmp_path / "plain")
    s = r.summary
    assert s["halted"]
    assert r.trainer.global_step == k + 1 + HALT_AFTER
    assert s["nonfinite_steps"] == s["skipped_steps"] == HALT_AFTER
    assert s["amp_overflow_steps"] == 0  # a non-finite loss is never a scaler overflow
    errors = [rec.getMessage() for rec in caplog.records
              if rec.name == "lightning_gradguard" and rec.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "GradGuard halted training" in errors[0]
    assert f"{HALT_AFTER} consecutive non-finite steps" in errors[0]
    if kind == "scale":
        # fp16: the fp32 master weights are finite, so they are saved -- as they are
        # (x1e6); "last good" means "finite" here, not "before the fault"
        assert _all_finite(r.params)
        assert s["halt_checkpoint"] == str(tmp_path / "plain" / CKPT)
        assert (tmp_path / "plain" / CKPT).is_file()
    else:
        assert not _all_finite(r.params)
        assert s["halt_checkpoint"] is None
        assert not (tmp_path / "plain" / CKPT).exists()
        assert "weights themselves are non-finite" in errors[0]
        assert "nothing was saved" in errors[0]
        assert "GradGuard(rollback=True)" in errors[0]

    # (b) With snapshots and rollback: restored after 2 non-finite steps, training completes
    g = GradGuard(rollback=True, snapshot_every=5, rollback_after=2, halt_after=HALT_AFTER)
    r = run(precision, fault, g, tmp_path / "rollback")
    s = r.summary
    assert r.trainer.global_step == N_STEPS
    assert not s["halted"]
    assert _all_finite(r.params)
    assert s["rollbacks"] == 1
    assert s["nonfinite_steps"] == s["skipped_steps"] == 2

    # (c) With a snapshot but no rollback before the halt: the halt restores the snapshot and
    # saves it as the last good checkpoint in default_root_dir
    g = GradGuard(rollback=True, snapshot_every=5, rollback_after=100, halt_after=HALT_AFTER)
    r = run(precision, fault, g, tmp_path / "halt")
    s = r.summary
    assert s["halted"]
    assert _all_finite(r.params)
    ckpt = tmp_path / "halt" / CKPT
    assert s["halt_checkpoint"] == str(ckpt)
    raw = torch.load(ckpt, weights_only=False)
    assert all(bool(torch.isfinite(v).all()) for v in raw["state_dict"].values())


# ----------------------------------------------------------------------------- found beside it
def test_nonfinite_weights_with_finite_gradients_are_reported(tmp_path: Path) -> None:
    guard = GradGuard(rollback=True, snapshot_every=2)
    fault = Fault(3, kind="inf", target="param", params="net.0.weight")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r = run("32", [fault], guard, tmp_path)
    assert r.injector.injected == [(3, "param", "inf")]
    noticed = [str(w.message) for w in record
               if "GradGuard" in str(w.message) and "weights are non-finite" in str(w.message)]
    # an Inf weight behind a saturated tanh: gradients and loss stay finite; the next weight
    # check (snapshot steps 1, 3, 5, ...: count 5 is global_step 4) finds it and rolls back
    assert len(noticed) == 1, noticed
    assert "step 4" in noticed[0]
    assert "snapshot (step 2) restored" in noticed[0]
    s = r.summary
    assert (s["rollbacks"], s["skipped_steps"], s["nonfinite_steps"]) == (1, 1, 0)
    assert _all_finite(r.params)
