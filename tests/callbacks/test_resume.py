"""Checkpoint at step 40, resume to 80 == an uninterrupted 80-step run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support.modules import TinyModule
from support.recorders import Recorder
from support.state import all_finite, assert_state_close
from support.trainer import fit, make_trainer

from lightning_gradguard import FixedNormClip, PercentileClip, ZScoreClip
from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.testing import Fault, FaultInjector

SPLIT, TOTAL = 40, 80
# NaN before and after the split, x1e6 before it; NaN at 38 leaves the LR scale < 1 at 40
FAULTS = [Fault(10), Fault(30, kind="scale", factor=1e6), Fault(38, kind="inf"), Fault(60)]


def _module() -> TinyModule:
    return TinyModule(opt="adam", lr=0.01, sched="cosine", max_steps=TOTAL)


def _split_run(make_guard: Any, tmp_path: Path, via: str) -> tuple[GradGuard, GradGuard, Any]:
    g1 = make_guard()
    if via == "save_checkpoint":
        t1 = fit(_module(), SPLIT, [FaultInjector(FAULTS), g1])
        ckpt = tmp_path / "split.ckpt"
        t1.save_checkpoint(ckpt)
    else:
        mc = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=SPLIT, save_top_k=-1)
        fit(_module(), SPLIT, [FaultInjector(FAULTS), g1, mc], enable_checkpointing=True)
        ckpt = Path(mc.best_model_path or next(iter(tmp_path.glob("*.ckpt"))))
    g2 = make_guard()
    m2 = _module()
    t2 = fit(m2, TOTAL, [FaultInjector(FAULTS), g2], ckpt_path=str(ckpt))
    assert t2.global_step == TOTAL
    return g1, g2, m2


@pytest.mark.parametrize(
    ("case", "via"),
    [("default", "save_checkpoint"), ("warmup60", "model_checkpoint"),
     ("rollback", "save_checkpoint")],
)
def test_resume_equals_uninterrupted(case: str, via: str, tmp_path: Path) -> None:
    def make_guard() -> GradGuard:
        if case == "warmup60":
            return GradGuard(clip=ZScoreClip(warmup_steps=60))
        if case == "rollback":
            return GradGuard(rollback=True, snapshot_every=5)
        return GradGuard()

    g_full = make_guard()
    m_full = _module()
    fit(m_full, TOTAL, [FaultInjector(FAULTS), g_full])

    g1, g2, m2 = _split_run(make_guard, tmp_path, via)
    core1 = g1.cores[0]
    assert core1.backoff.scale < 1.0, "checkpoint is mid-backoff"
    if case == "warmup60":
        assert int(core1.policy.stats.count) < 60, "checkpoint is mid-warmup"

    # sanity: the resumed training itself is the uninterrupted one
    for a, b in zip(m_full.parameters(), m2.parameters(), strict=True):
        assert torch.allclose(a, b)
    assert g2.summary() == g_full.summary()
    s = g_full.summary()
    assert (s["nonfinite_steps"], s["skipped_steps"], s["spikes"]) == (3, 3, 1)
    full, resumed = g_full.cores[0].state_dict(), g2.cores[0].state_dict()
    assert_state_close(resumed["policy"]["state"], full["policy"]["state"])
    assert_state_close(resumed["growth"], full["growth"])
    assert resumed["backoff"] == full["backoff"]
    assert resumed["counters"] == full["counters"]
    if case == "rollback":
        assert resumed["snapshot"]["step"] == full["snapshot"]["step"]
        assert_state_close(resumed["snapshot"]["model"], full["snapshot"]["model"])
    assert all_finite(m2)


def test_state_key_is_stable_across_hyperparameters(tmp_path: Path) -> None:
    g1 = GradGuard()
    t1 = fit(_module(), SPLIT, [FaultInjector(FAULTS), g1])
    ckpt = tmp_path / "a.ckpt"
    t1.save_checkpoint(ckpt)
    assert "GradGuard" in torch.load(ckpt, weights_only=False)["callbacks"]
    g2 = GradGuard(clip=ZScoreClip(z_threshold=2.0, warmup_steps=10), backoff_factor=0.25,
                   recovery_steps=7, halt_after=3, spike_patience=1, growth_patience=0)
    assert g2.state_key == g1.state_key == "GradGuard"
    fit(_module(), SPLIT + 1, [g2], ckpt_path=str(ckpt))
    s1, s2 = g1.summary(), g2.summary()
    assert s2["steps"] == SPLIT + 1
    assert s2["nonfinite_steps"] == s1["nonfinite_steps"] == 2
    assert s2["spikes"] >= s1["spikes"] == 1
    assert int(g2.cores[0].policy.stats.count) == int(g1.cores[0].policy.stats.count) + 1


def test_resume_with_another_clip_policy_type(tmp_path: Path) -> None:
    """A different policy *type* cannot take the old statistics: the documented warning, the
    policy starts fresh, and everything else (counters, LR backoff, growth) is restored."""
    g1 = GradGuard(nonfinite_window=0)  # the NaN step backs off: a scale to restore
    t1 = fit(_module(), 10, [FaultInjector([Fault(3)]), g1])
    s1 = g1.summary()
    assert (s1["steps"], s1["skipped_steps"], s1["lr_backoffs"]) == (10, 1, 1)
    ckpt = tmp_path / "a.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"][g1.state_key]["cores"][0]
    assert saved["policy"]["type"] == "ZScoreClip"
    g2 = GradGuard(clip=PercentileClip(), nonfinite_window=0)
    with pytest.warns(UserWarning, match="saved with clip policy ZScoreClip but this guard "
                                         "uses PercentileClip: its statistics start fresh"):
        fit(_module(), 12, [g2], ckpt_path=str(ckpt))
    s2 = g2.summary()
    assert s2["steps"] == 12  # 10 restored + 2 new
    assert (s2["nonfinite_steps"], s2["skipped_steps"], s2["lr_backoffs"]) == (1, 1, 1)
    state = g2.state_dict()["cores"][0]
    assert state["policy"]["type"] == "PercentileClip"
    # the growth detector was restored and fed the two new steps: its last norm is the
    # last step's, and a fresh PercentileClip saw exactly those two steps
    assert state["growth"]["prev"] == g2.last_reports[0].grad_norm
    ring = [v for v in state["policy"]["state"]["ring"] if v == v]
    assert len(ring) == 2
    assert ring[-1] == g2.last_reports[0].grad_norm
    # the LR backoff continued from the saved scale (recovering), not from 1
    assert saved["backoff"]["scale"] < s2["lr_scale"] < 1.0


def test_two_named_guards_in_one_trainer(tmp_path: Path) -> None:
    a, b = GradGuard(name="a"), GradGuard(name="b", clip=ZScoreClip(z_threshold=2.0))
    assert {a.state_key, b.state_key} == {"GradGuard[a]", "GradGuard[b]"}
    t = fit(_module(), 12, [FaultInjector([Fault(5)]), a, b])
    ckpt = tmp_path / "ab.ckpt"
    t.save_checkpoint(ckpt)
    callbacks = torch.load(ckpt, weights_only=False)["callbacks"]
    assert {"GradGuard[a]", "GradGuard[b]"} <= set(callbacks)
    assert a.summary()["skipped_steps"] == 1
    # b ran after a cleared the gradients: it sees an empty step, not a non-finite one
    assert b.summary()["steps"] == 12
    a2, b2 = GradGuard(name="a"), GradGuard(name="b")
    fit(_module(), 13, [a2, b2], ckpt_path=str(ckpt))
    assert a2.summary()["steps"] == b2.summary()["steps"] == 13
    assert a2.summary()["skipped_steps"] == 1


def test_two_named_guards_both_backing_off_keep_schedule() -> None:
    a = GradGuard(name="a", nonfinite_window=0)  # backs off at the NaN step
    # clips every step: from the 5th, clipping is the rule and each spike backs off
    b = GradGuard(name="b", clip=FixedNormClip(1e-3), spike_patience=1)
    rec = Recorder()
    trainer = fit(TinyModule(lr=0.05), 20, [FaultInjector([Fault(5)]), a, b, rec])
    assert a.summary()["lr_backoffs"] >= 1
    assert b.summary()["lr_backoffs"] >= 1
    assert all(lrs == [0.05] for lrs in rec.sched_lr.values())
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05


def test_two_unnamed_guards_rejected_by_trainer() -> None:
    """Lightning itself refuses two stateful callbacks with one state_key at Trainer(...)."""
    with pytest.raises(RuntimeError, match="state_key"):
        make_trainer(3, [GradGuard(), GradGuard()])


def test_two_unnamed_guards_from_configure_callbacks_raise_value_error() -> None:
    """Model callbacks skip Lightning's check: GradGuard.setup raises a ValueError."""

    class TwoGuards(TinyModule):
        def configure_callbacks(self) -> list[GradGuard]:
            return [GradGuard(), GradGuard()]

    with pytest.raises(ValueError, match=r"state_key 'GradGuard'.*name="):
        fit(TwoGuards(), 3)


def test_resume_keeps_the_update_cap(tmp_path: Path) -> None:
    """``max_update_ratio`` acts on every step of this run (SGD, LR far too high); the weight
    norm it uses is re-measured only every 8th step after the 16th, so a checkpoint at step 21
    must carry it for the resumed run to clip exactly like the uninterrupted one."""
    def module() -> TinyModule:
        return TinyModule(opt="sgd", lr=2.0)

    g_full = GradGuard()
    m_full = module()
    fit(m_full, 40, [g_full])
    assert g_full.summary()["clipped_steps"] >= 10  # the cap acts until backoffs lower the LR

    g1 = GradGuard()
    t1 = fit(module(), 21, [g1])
    ckpt = tmp_path / "split.ckpt"
    t1.save_checkpoint(ckpt)
    g2 = GradGuard()
    m2 = module()
    fit(m2, 40, [g2], ckpt_path=str(ckpt))
    assert g2.summary() == g_full.summary()
    for a, b in zip(m_full.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert g2.cores[0]._weight_norm == g_full.cores[0]._weight_norm
