"""``GuardCore`` speaks in a plain loop: through the ``lightning_gradguard`` logger, under
``verbose``; a custom sink receives every notice (what the Lightning callback uses)."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch

from lightning_gradguard.core import GuardCore
from lightning_gradguard.core.notices import NOTICE_EVERY, Notice, NoticeKind


def _guard(**settings: Any) -> tuple[torch.nn.Linear, GuardCore]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, GuardCore(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)


def _step(model: torch.nn.Linear, guard: GuardCore, loss_scale: float = 1.0) -> None:
    loss = model(torch.ones(2, 3)).pow(2).mean() * loss_scale
    model.zero_grad()
    loss.backward()
    guard.step(loss)


def _records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name == "lightning_gradguard"]


def test_a_plain_loop_warns_at_the_first_nonfinite_step_and_announces_backoffs(
        caplog: pytest.LogCaptureFixture) -> None:
    model, guard = _guard()
    with caplog.at_level(logging.INFO, logger="lightning_gradguard"):
        _step(model, guard)
        _step(model, guard, math.nan)  # isolated: a skip and the first-step warning
        _step(model, guard, math.nan)  # a repeat: the backoff notice
    said = _records(caplog)
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO]
    assert said[0][1].startswith("GradGuard: step 2: the loss is non-finite; the step was "
                                 "skipped (weights untouched).")
    assert said[1][1].startswith("GradGuard: step 3: LR backoff #1 (a second non-finite step "
                                 "within nonfinite_window=50 steps): LR now x0.5 of the "
                                 "schedule")


def test_verbose_false_keeps_only_what_is_always_said(
        caplog: pytest.LogCaptureFixture) -> None:
    model, guard = _guard(verbose=False, halt_after=3, rollback=True, snapshot_every=1)
    with caplog.at_level(logging.INFO, logger="lightning_gradguard"):
        _step(model, guard)
        for _ in range(3):
            _step(model, guard, math.nan)
    said = _records(caplog)
    # the rollback (third in a row) and the halt: no first-step warning, no backoff notice
    assert [level for level, _ in said] == [logging.WARNING, logging.ERROR]
    assert said[0][1] == ("GradGuard: restored the last good snapshot (step 1) after 3 "
                          "consecutive non-finite steps")
    assert said[1][1].startswith("GradGuard halted training: 3 consecutive non-finite steps "
                                 "(steps 2..4)")
    assert guard.counters.rollbacks == 1


def test_a_sink_receives_every_notice_with_its_kind_and_markdown() -> None:
    model, guard = _guard()
    got: list[Notice] = []
    guard.speaker.sink = got.append
    _step(model, guard)
    _step(model, guard, math.nan)
    _step(model, guard, math.nan)
    assert [(n.kind, n.step, n.level, n.shown) for n in got] == [
        (NoticeKind.NONFINITE, 2, logging.WARNING, True),
        (NoticeKind.BACKOFF, 3, logging.INFO, True)]
    assert got[0].markdown == "**first non-finite step**\n\n" + got[0].text
    assert got[1].markdown == ("**LR backoff #1** (step 3): a second non-finite step within "
                               "nonfinite_window=50 steps; LR now x0.5 of the schedule")


def test_backoff_notices_are_rate_limited_and_count_the_held_ones() -> None:
    model, guard = _guard(nonfinite_window=0, diagnose=False, max_update_ratio=None)
    got: list[Notice] = []
    guard.speaker.sink = got.append
    nan_steps = {2, NOTICE_EVERY, NOTICE_EVERY + 2}  # the second is held, the third shown
    for step in range(1, NOTICE_EVERY + 3):
        _step(model, guard, math.nan if step in nan_steps else 1.0)
    backoffs = [n.text for n in got if n.kind is NoticeKind.BACKOFF]
    assert guard.counters.lr_backoffs == 3
    assert [t.split(": LR now")[0] for t in backoffs] == [
        "GradGuard: step 2: LR backoff #1 (a non-finite step, with nonfinite_window=0)",
        f"GradGuard: step {NOTICE_EVERY + 2}: LR backoff #3 (a non-finite step, with "
        "nonfinite_window=0; 1 more since the last notice)"]


def test_a_reset_announces_the_next_backoff_again() -> None:
    model, guard = _guard(nonfinite_window=0, diagnose=False)
    got: list[Notice] = []
    guard.speaker.sink = got.append
    _step(model, guard, math.nan)
    guard.reset()
    _step(model, guard, math.nan)
    assert [n.step for n in got if n.kind is NoticeKind.BACKOFF] == [1, 1]
