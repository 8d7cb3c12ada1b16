"""Resume cases that tests/callbacks/test_resume.py lacks: an interrupted run resumed from a
checkpoint equals the uninterrupted one -- counters exactly, statistics allclose, weights
allclose -- with PercentileClip (mid-"warmup"), AdaptiveGradClip, gradient accumulation,
rollback snapshots that actually rolled back (before and after the split), and fp16 with a
GradScaler. Every checkpoint is taken mid-backoff (LR scale < 1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_gradguard import AdaptiveGradClip, PercentileClip, ZScoreClip
from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.testing import Fault, FaultInjector
from tests.callbacks._helpers import TinyModule, all_finite, assert_state_close, fit

from ._common import precision_kwargs

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
    assert resumed["policy_type"] == full["policy_type"]
    assert_state_close(resumed["policy"], full["policy"])  # statistics: allclose
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
