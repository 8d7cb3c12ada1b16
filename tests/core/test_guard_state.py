"""GuardCore state, compared exactly where a bug would show first.

* Right after a skipped non-finite step the statistics equal those of a guard that never saw
  the step (a skipped step must leave no trace in them): compared at once, not 20 steps
  later when two runs could have drifted back within a tolerance.
* Right after ``load_state_dict`` the guard's state equals the saved one, with a growth
  streak that crosses the checkpoint, so that the LR backoff must come at the same step as
  in the uninterrupted run.

Only the public API is used: ``GuardCore.step`` / ``state_dict`` / ``load_state_dict`` and
the :class:`~lightning_gradguard.core.StepReport`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_gradguard.core import (
    ClipPolicy,
    GuardCore,
    PercentileClip,
    StepReport,
    ZScoreClip,
)

from ._util import assert_state_equal, batches, loss_fn, tiny_model

DATA = batches(16)


class Loop:
    """A plain Adam loop with a guard; one :meth:`step` per optimizer step (1-based)."""

    def __init__(self, **settings: Any) -> None:
        self.model = tiny_model()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.guard = GuardCore(self.model, self.opt, **settings)
        self.t = 0
        self.reports: dict[int, StepReport] = {}

    def step(self, *, loss_scale: float = 1.0, nan: bool = False, unseen: bool = False) -> None:
        """One step. ``nan``: a NaN in one gradient; ``unseen``: the step is skipped
        without the guard seeing it (the reference for a skipped fault)."""
        self.t += 1
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.model, DATA[(self.t - 1) % len(DATA)]) * loss_scale
        loss.backward()
        if unseen:
            for p in self.model.parameters():
                p.grad = None
        else:
            if nan:
                g = self.model[0].weight.grad
                assert g is not None
                g.view(-1)[0] = math.nan
            self.reports[self.t] = self.guard.step(loss.detach(), step=self.t)
        self.opt.step()

    def checkpoint(self) -> dict[str, Any]:
        return copy.deepcopy({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                              "guard": self.guard.state_dict(), "t": self.t})

    @classmethod
    def resumed(cls, ckpt: dict[str, Any], **settings: Any) -> Loop:
        loop = cls(**settings)
        loop.model.load_state_dict(ckpt["model"])
        loop.opt.load_state_dict(ckpt["opt"])
        loop.guard.load_state_dict(copy.deepcopy(ckpt["guard"]))
        loop.t = ckpt["t"]
        return loop


POLICIES: dict[str, Callable[[], ClipPolicy]] = {
    "zscore": ZScoreClip,
    "zscore-short-warmup": lambda: ZScoreClip(warmup_steps=5),
    "percentile": lambda: PercentileClip(min_history=5, history_size=16),
}


# ----------------------------------------------------------------- a skipped fault leaves no trace
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("k", [3, 12, 30])
def test_nan_step_leaves_statistics_exactly_as_if_unseen(policy: str, k: int) -> None:
    faulty = Loop(clip=POLICIES[policy]())
    ref = Loop(clip=POLICIES[policy]())
    for _ in range(k - 1):
        faulty.step()
        ref.step()
    faulty.step(nan=True)
    ref.step(unseen=True)
    assert faulty.reports[k].action.value == "skip"
    assert not faulty.reports[k].finite
    # right after the fault: the clip statistics and the growth detector are exactly the
    # reference's (the counters and the LR backoff legitimately differ)
    a, b = faulty.guard.state_dict(), ref.guard.state_dict()
    assert_state_equal(a["policy"], b["policy"], "policy")
    assert_state_equal(a["growth"], b["growth"], "growth")
    # and the next step is judged by the same threshold, bit for bit (the skipped step
    # changed no weight, so its gradients are the same too)
    faulty.step()
    ref.step()
    assert faulty.reports[k + 1].grad_norm == ref.reports[k + 1].grad_norm
    assert faulty.reports[k + 1].threshold == ref.reports[k + 1].threshold


# ----------------------------------------------------------------- resume across a growth streak
GROW_FROM, PATIENCE, END = 12, 4, 24
SETTINGS: dict[str, Any] = {"growth_patience": PATIENCE, "spike_patience": 0}


def _scale(t: int) -> float:
    """The loss multiplies by 1.6 every step from GROW_FROM on: sustained growth."""
    return 1.6 ** max(0, t - GROW_FROM + 1)


def _uninterrupted() -> Loop:
    loop = Loop(**SETTINGS)
    while loop.t < END:
        loop.step(loss_scale=_scale(loop.t + 1))
    return loop


@pytest.mark.parametrize("split", [12, 13, 21, 22])
def test_resume_mid_growth_streak_backs_off_at_the_same_step(split: int) -> None:
    full = _uninterrupted()
    growth_steps = [t for t, r in full.reports.items() if r.growth]
    # the streak crosses the split: it started before it and fires after it (at 14 and 23)
    assert growth_steps == [14, 23], "the scaled loss must trigger the growth detector"
    assert all(full.reports[t].backoff for t in growth_steps)

    first = Loop(**SETTINGS)
    while first.t < split:
        first.step(loss_scale=_scale(first.t + 1))
    ckpt = first.checkpoint()
    assert ckpt["guard"]["growth"]["streak"] >= 2  # mid-streak at the checkpoint
    second = Loop.resumed(ckpt, **SETTINGS)
    # right after loading: every part of the guard's state is the saved one
    assert_state_equal(second.guard.state_dict(), ckpt["guard"], "guard")
    while second.t < END:
        second.step(loss_scale=_scale(second.t + 1))
    for t in range(split + 1, END + 1):
        a, b = full.reports[t], second.reports[t]
        assert (b.growth, b.backoff, b.lr_scale, b.action) == (
            a.growth, a.backoff, a.lr_scale, a.action), t
        assert b.grad_norm == a.grad_norm, t
        assert b.threshold == a.threshold, t
    assert_state_equal(second.guard.state_dict(), full.guard.state_dict(), "guard")
