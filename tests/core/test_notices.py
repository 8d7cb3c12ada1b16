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


# --- Speaker and log_notice on hand-made reports (exact notices; issue 27) ---

from lightning_gradguard.core.causes import Cause  # noqa: E402
from lightning_gradguard.core.decide import Action, Reason  # noqa: E402
from lightning_gradguard.core.diagnosis import Diagnosis  # noqa: E402
from lightning_gradguard.core.guard import StepReport  # noqa: E402
from lightning_gradguard.core.messages import (  # noqa: E402
    backoff_notice,
    causes_markdown,
    nonfinite_message,
    nonfinite_weights_message,
    preflight_message,
    rollback_message,
)
from lightning_gradguard.core.notices import Speaker, log_notice  # noqa: E402
from lightning_gradguard.core.settings import GuardSettings  # noqa: E402

_CAUSES = (Cause("lr_too_high", "40 %", "lower the LR"), Cause("data_nonfinite", "x", "y"))


def _report(step: int = 7, **kw: Any) -> StepReport:
    return StepReport(step, 1.0, 1.0, 2.0, True, Action.NONE, **kw)


def _speaker(**settings: Any) -> tuple[Speaker, list[Notice]]:
    speaker, got = Speaker(GuardSettings(**settings)), []
    speaker.sink = got.append
    return speaker, got


def test_has_news_per_field() -> None:
    d = Diagnosis(7, (), None, "c")
    assert not Speaker.has_news(_report())
    for kw in ({"backoff": True}, {"rollback": True}, {"halt": True},
               {"diagnosis_event": "preflight"}, {"diagnosis": d}, {"params_finite": False}):
        assert Speaker.has_news(_report(**kw)), kw
    speaker, got = _speaker()
    speaker.speak(_report(), first_nonfinite=True, causes=_CAUSES, halt_text="x")
    assert got == []


@pytest.mark.parametrize("verbose", [True, False])
def test_first_nonfinite_notice_exact(verbose: bool) -> None:
    d = Diagnosis(7, ("w",), "w", "c")
    speaker, got = _speaker(verbose=verbose, halt_after=4)
    speaker.speak(_report(diagnosis=d, causes=_CAUSES[:1]), first_nonfinite=True, resumed=True)
    msg = nonfinite_message(d, list(_CAUSES[:1]), resumed=True, halt_after=4)
    assert "halts after 4 in a row" in msg
    assert got == [Notice(NoticeKind.NONFINITE, 7, msg, "**first non-finite step**\n\n" + msg,
                          logging.WARNING, verbose)]
    # a diagnosis that is not of the run's first non-finite step says nothing
    speaker, got = _speaker()
    speaker.speak(_report(diagnosis=d, causes=_CAUSES[:1]))
    assert got == []


def test_first_nonfinite_notice_without_causes_and_weights_resumed() -> None:
    d = Diagnosis(7, (), None, "c", weights_finite=False, first_step=True)
    speaker, got = _speaker(halt_after=6)
    speaker.speak(_report(diagnosis=d), first_nonfinite=True, resumed=True)
    assert got[0].text == nonfinite_message(d, [], resumed=True, halt_after=6)
    assert got[0].text.startswith("GradGuard: step 7: the weights loaded from the checkpoint")


@pytest.mark.parametrize("verbose", [True, False])
def test_preflight_notice_exact(verbose: bool) -> None:
    speaker, got = _speaker(verbose=verbose)
    speaker.speak(_report(diagnosis_event="preflight", causes=_CAUSES))
    msg = preflight_message(7, list(_CAUSES))
    assert got == [Notice(NoticeKind.PREFLIGHT, 7, msg, "**pre-flight**\n\n" + msg,
                          logging.WARNING, verbose)]
    speaker, got = _speaker()
    speaker.speak(_report(diagnosis_event="preflight", causes=()))
    assert got == []


def test_diagnosis_notice_at_the_first_backoff_is_markdown_only() -> None:
    speaker, got = _speaker(verbose=False)
    speaker.speak(_report(diagnosis_event="backoff", causes=_CAUSES))
    assert got == [Notice(NoticeKind.DIAGNOSIS, 7, "",
                          "**diagnosis at the first backoff** (step 7)\n\n"
                          + causes_markdown(list(_CAUSES)), logging.INFO, True)]
    speaker, got = _speaker()
    speaker.speak(_report(diagnosis_event="backoff"))
    assert got == []


def test_backoff_notice_exact_and_its_markdown() -> None:
    speaker, got = _speaker(verbose=False)
    s = speaker.settings
    speaker.speak(_report(backoff=True, lr_scale=0.25, reason=Reason.GROWTH), backoffs=2,
                  causes=_CAUSES)
    msg = backoff_notice(7, 2, Reason.GROWTH, 0.25, s, held=0, cause="lr_too_high")
    assert msg.endswith("; likely cause: lr_too_high")
    assert got == [Notice(NoticeKind.BACKOFF, 7, msg,
                          "**LR backoff #2** (step 7): sustained growth of the gradient norm "
                          "(5 rising steps in a row); LR now x0.25 of the schedule",
                          logging.INFO, False)]
    # no reason, no cause: the words of backoff_notice's fallback; the markdown's reason empty
    speaker, got = _speaker()
    speaker.speak(_report(backoff=True, lr_scale=0.5), backoffs=1)
    assert got[0].text == backoff_notice(7, 1, None, 0.5, speaker.settings)
    assert got[0].markdown == "**LR backoff #1** (step 7): ; LR now x0.5 of the schedule"


def test_backoff_rate_limit_edges_and_held_count() -> None:
    speaker, got = _speaker()
    for step in (0, NOTICE_EVERY - 1, NOTICE_EVERY, 2 * NOTICE_EVERY - 1, 2 * NOTICE_EVERY + 1):
        speaker.speak(_report(step, backoff=True, lr_scale=0.5, reason=Reason.HALT),
                      backoffs=step)
    # step 0 is announced after a fresh start; 49 is held, 50 shown with it counted; 99 held,
    # 101 shown with one held
    assert [(n.step, "1 more since the last notice" in n.text) for n in got] == [
        (0, False), (NOTICE_EVERY, True), (2 * NOTICE_EVERY + 1, True)]
    assert "more since" not in got[0].text
    speaker.reset()
    speaker.speak(_report(2 * NOTICE_EVERY + 2, backoff=True, lr_scale=0.5), backoffs=9)
    assert got[-1].step == 2 * NOTICE_EVERY + 2
    assert "more since" not in got[-1].text


def test_nonfinite_weights_rollback_and_halt_notices_exact() -> None:
    speaker, got = _speaker(verbose=False)
    speaker.speak(_report(params_finite=False, rollback=True), snapshot_step=3, streak=2)
    msg = nonfinite_weights_message(7, 3)
    assert got == [Notice(NoticeKind.NONFINITE_WEIGHTS, 7, msg, msg, logging.WARNING, True)]
    speaker, got = _speaker()
    speaker.speak(_report(params_finite=False), snapshot_step=3)
    assert got[0].text == nonfinite_weights_message(7, None)
    speaker, got = _speaker(verbose=False)
    speaker.speak(_report(rollback=True), snapshot_step=3, streak=2)
    msg = rollback_message(3, 2)
    assert got == [Notice(NoticeKind.ROLLBACK, 7, msg, msg, logging.WARNING, True)]
    speaker, got = _speaker(verbose=False)
    speaker.speak(_report(halt=True), halt_text="why")
    assert got == [Notice(NoticeKind.HALT, 7, "GradGuard halted training: why",
                          "**halt** — GradGuard halted training: why", logging.ERROR, True)]


def test_notices_of_one_step_in_order() -> None:
    speaker, got = _speaker()
    d = Diagnosis(7, ("w",), "w", "c")
    speaker.speak(_report(diagnosis=d, backoff=True, rollback=True, halt=True,
                          reason=Reason.HALT), first_nonfinite=True, snapshot_step=1, streak=3,
                  halt_text="h")
    assert [n.kind for n in got] == [NoticeKind.NONFINITE, NoticeKind.BACKOFF,
                                     NoticeKind.ROLLBACK, NoticeKind.HALT]


def test_log_notice_logs_only_shown_text(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="lightning_gradguard"):
        log_notice(Notice(NoticeKind.HALT, 1, "said", "", logging.ERROR, True))
        log_notice(Notice(NoticeKind.BACKOFF, 1, "hidden", "", logging.INFO, False))
        log_notice(Notice(NoticeKind.DIAGNOSIS, 1, "", "md", logging.INFO, True))
    assert _records(caplog) == [(logging.ERROR, "said")]
    assert Notice(NoticeKind.HALT, 1, "t", "m").level == logging.INFO
    assert Notice(NoticeKind.HALT, 1, "t", "m").shown is True


def test_held_backoffs_are_counted_one_by_one() -> None:
    speaker, got = _speaker()
    for step in (10, 11, 12, 13, 10 + NOTICE_EVERY):
        speaker.speak(_report(step, backoff=True, lr_scale=0.5), backoffs=step)
    assert [n.step for n in got] == [10, 10 + NOTICE_EVERY]
    assert "; 3 more since the last notice)" in got[1].text


def test_speak_defaults() -> None:
    """Without the other keywords: not resumed, backoff #0, no snapshot step, a streak of 0, no
    halt text."""
    d = Diagnosis(7, (), None, "c", weights_finite=False, first_step=True)
    speaker, got = _speaker()
    speaker.speak(_report(diagnosis=d, backoff=True, rollback=True, halt=True),
                  first_nonfinite=True)
    assert got[0].text == nonfinite_message(d, [], resumed=False,
                                            halt_after=speaker.settings.halt_after)
    assert "when training started" in got[0].text
    assert got[1].markdown == "**LR backoff #0** (step 7): ; LR now x1 of the schedule"
    assert got[2].text == rollback_message(None, 0)
    assert got[3].text == "GradGuard halted training: "
