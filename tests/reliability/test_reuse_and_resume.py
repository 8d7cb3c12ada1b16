"""Reuse and resume: an interrupted run resumed from a checkpoint equals the uninterrupted one
-- counters exactly, statistics allclose, weights allclose -- with PercentileClip
(mid-"warmup"), AdaptiveGradClip, gradient accumulation, rollback snapshots that actually
rolled back (before and after the split), and fp16 with a GradScaler, every checkpoint taken
mid-backoff (LR scale < 1); one ``GradGuard`` instance reused for another fit resumes like a
fresh one and takes state loaded between fits; the halt checkpoint and
``GradientMonitor``'s non-finite count are per fit, and the monitor's count is saved in
checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from support.modules import NaNFrom, TinyModule
from support.state import all_finite, assert_state_close
from support.trainer import fit, precision_kwargs

from lightning_gradguard import AdaptiveGradClip, PercentileClip, ZScoreClip
from lightning_gradguard.callbacks import GradGuard, GradientMonitor
from lightning_gradguard.testing import Fault, FaultInjector

CKPT = "gradguard_last_good.ckpt"

pytestmark = pytest.mark.filterwarnings(
    "ignore:GradGuard:UserWarning",
    "ignore:.*resuming from a checkpoint that ended before the epoch ended.*",
)

#: 21, not 20: with accumulate_grad_batches=2, 20 steps end exactly at an epoch boundary, and
#: Lightning 2.6 resumes such a checkpoint by first running the "unfinished" epoch's last
#: batch as a one-micro-batch step -- the resumed run then differs even without any guard
#: (checked: no callbacks, params differ at 20, equal at 21). Mid-epoch checkpoints resume
#: exactly (TinyModule picks its batch from global_step).
SPLIT, TOTAL = 21, 40
#: NaN before and after the split, x1e6 before it; the NaN at 18 leaves the LR scale < 1 at 21
FAULTS = [Fault(5), Fault(12, kind="scale", factor=1e6), Fault(18, kind="inf"), Fault(30)]
#: two bursts of 2 consecutive NaN steps: one rollback before the split, one after
ROLLBACK_FAULTS = [Fault(11), Fault(12), Fault(18, kind="inf"), Fault(26), Fault(27, "inf")]

CASES: dict[str, tuple[Callable[[], GradGuard], dict[str, Any], list[Fault]]] = {
    # min_history > SPLIT: the checkpoint is taken before the percentile threshold is active
    "percentile_mid_warmup": (lambda: GradGuard(clip=PercentileClip(percentile=50,
                                                                    history_size=32,
                                                                    min_history=25)),
                              {}, FAULTS),
    "percentile_ring_wrapped": (lambda: GradGuard(clip=PercentileClip(history_size=8)),
                                {}, FAULTS),
    "agc": (lambda: GradGuard(clip=AdaptiveGradClip(clipping=0.05, exclude=["net.2.*"])),
            {}, FAULTS),
    "accumulate2": (GradGuard, {"accumulate_grad_batches": 2}, FAULTS),
    "zscore_mid_warmup_accumulate2": (lambda: GradGuard(clip=ZScoreClip(warmup_steps=30)),
                                      {"accumulate_grad_batches": 2}, FAULTS),
    "rollback": (lambda: GradGuard(rollback=True, snapshot_every=4, rollback_after=2),
                 {}, ROLLBACK_FAULTS),
    "fp16_scaler": (GradGuard, precision_kwargs("16-mixed+scaler"),
                    [Fault(5, target="loss"), Fault(12, kind="scale"),
                     Fault(18, kind="inf", target="loss"), Fault(30, target="loss")]),
}


def _module() -> TinyModule:
    return TinyModule(opt="adam", lr=0.01, sched="cosine", max_steps=TOTAL)


def _interrupted(case: str, via: str, root: Path) -> tuple[GradGuard, GradGuard, TinyModule]:
    make_guard, kwargs, faults = CASES[case]
    g1 = make_guard()
    if via == "save_checkpoint":
        t1 = fit(_module(), SPLIT, [FaultInjector(faults), g1], default_root_dir=root,
                 **kwargs)
        ckpt = root / "split.ckpt"
        t1.save_checkpoint(ckpt)
    else:
        mc = ModelCheckpoint(dirpath=root / "mc", every_n_train_steps=SPLIT, save_top_k=-1)
        fit(_module(), TOTAL, [FaultInjector(faults), g1, mc, _StopAt(SPLIT)],
            default_root_dir=root, enable_checkpointing=True, **kwargs)
        ckpts = sorted((root / "mc").glob("*.ckpt"))
        assert len(ckpts) == 1, ckpts
        ckpt = ckpts[0]
        assert torch.load(ckpt, weights_only=False)["global_step"] == SPLIT
    g2 = make_guard()
    m2 = _module()
    t2 = fit(m2, TOTAL, [FaultInjector(faults), g2], ckpt_path=str(ckpt),
             default_root_dir=root, **kwargs)
    assert t2.global_step == TOTAL
    return g1, g2, m2


class _StopAt(Callback):
    """Stops the run right after step ``n`` (an interruption, not max_steps)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step >= self.n:
            trainer.should_stop = True


@pytest.mark.parametrize("via", ["save_checkpoint", "model_checkpoint"])
@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_uninterrupted(case: str, via: str, tmp_path: Path) -> None:
    make_guard, kwargs, faults = CASES[case]
    g_full = make_guard()
    m_full = _module()
    fit(m_full, TOTAL, [FaultInjector(faults), g_full], default_root_dir=tmp_path / "full",
        **kwargs)

    g1, g2, m2 = _interrupted(case, via, tmp_path)
    core1 = g1._cores[0]
    assert core1.backoff.scale < 1.0, "the checkpoint is mid-backoff"
    if case == "percentile_mid_warmup":
        assert int(core1.policy.count) < 25, "the checkpoint is before min_history"
    if case == "zscore_mid_warmup_accumulate2":
        assert int(core1.policy.stats.count) < 30, "the checkpoint is mid-warmup"

    full, resumed = g_full._cores[0].state_dict(), g2._cores[0].state_dict()
    assert g2.summary() == g_full.summary()  # counters: exactly
    assert resumed["counters"] == full["counters"]
    assert resumed["backoff"] == full["backoff"]
    assert resumed["policy"]["type"] == full["policy"]["type"]
    assert_state_close(resumed["policy"]["state"], full["policy"]["state"])  # statistics: allclose
    assert_state_close(resumed["growth"], full["growth"])
    for a, b in zip(m_full.parameters(), m2.parameters(), strict=True):
        assert torch.allclose(a, b)
    assert all_finite(m2)

    s = g_full.summary()
    if case == "rollback":
        assert s["rollbacks"] == 2
        assert g1.summary()["rollbacks"] == 1, "one rollback before the split"
        assert resumed["snapshot"]["step"] == full["snapshot"]["step"]
        assert_state_close(resumed["snapshot"]["model"], full["snapshot"]["model"])
        assert_state_close(resumed["snapshot"]["optim"], full["snapshot"]["optim"])
    elif case == "fp16_scaler":
        assert (s["nonfinite_steps"], s["skipped_steps"], s["amp_overflow_steps"]) == (3, 3, 0)
    else:
        assert (s["nonfinite_steps"], s["skipped_steps"]) == (3, 3)


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
