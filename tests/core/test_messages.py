"""Every message of ``core/messages.py`` by its exact text: the words, the settings they name,
and each branch (what is added, what is left out)."""

from __future__ import annotations

import pytest

from lightning_gradguard.core.causes import Cause
from lightning_gradguard.core.decide import Reason
from lightning_gradguard.core.diagnosis import Diagnosis
from lightning_gradguard.core.messages import (
    HALT_MARKER,
    backoff_notice,
    cause_ids,
    causes_markdown,
    causes_text,
    end_of_fit_line,
    needed_help,
    nonfinite_message,
    nonfinite_weights_message,
    preflight_message,
    reason_text,
    rollback_message,
)
from lightning_gradguard.core.settings import GuardSettings

# settings whose every value differs from the default, so a text names the one it reads
_S = GuardSettings(spike_patience=4, spike_window=60, nonfinite_window=7, max_update_ratio=0.25,
                   growth_patience=6, halt_after=9, amp_halt_after=11)

_TWO = [Cause("lr_too_high", "40 % per step", "lower the LR"),
        Cause("data_nonfinite", "NaN in x", "clean the data")]


@pytest.mark.parametrize(("reason", "text"), [
    (Reason.NONFINITE_REPEAT, "a second non-finite step within nonfinite_window=7 steps"),
    (Reason.NONFINITE_WEIGHTS, "non-finite weights (finite gradients and loss)"),
    (Reason.UPDATE_CAPPED,
     "4 spikes or capped updates within 60 steps, this update over the update cap (the LR "
     "times the gradient would move the weights by more than max_update_ratio=0.25 of their "
     "norm)"),
    (Reason.CLIPPING_RULE,
     "4 spikes within 60 steps while clipping is the rule (5 of the last 10 steps clipped)"),
    (Reason.ALREADY_BACKED_OFF, "4 spikes within 60 steps while the LR is still backed off"),
    (Reason.GROWTH, "sustained growth of the gradient norm (6 rising steps in a row)"),
    (Reason.HALT, "9 consecutive non-finite steps"),
    (Reason.AMP_HALT, "11 consecutive steps the GradScaler skipped with a finite loss"),
])
def test_reason_text_names_the_settings_that_fired(reason: Reason, text: str) -> None:
    assert reason_text(reason, _S) == text


def test_reason_text_nonfinite_window_zero() -> None:
    assert (reason_text(Reason.NONFINITE_REPEAT, GuardSettings(nonfinite_window=0))
            == "a non-finite step, with nonfinite_window=0")


def test_backoff_notice_every_part() -> None:
    assert backoff_notice(12, 3, Reason.HALT, 0.25, _S) == (
        "GradGuard: step 12: LR backoff #3 (9 consecutive non-finite steps): LR now x0.25 of "
        "the schedule")
    assert backoff_notice(12, 3, None, 0.123456, _S, held=2, cause="lr_too_high") == (
        "GradGuard: step 12: LR backoff #3 (LR backoff; 2 more since the last notice): LR now "
        "x0.12 of the schedule; likely cause: lr_too_high")
    assert backoff_notice(1, 1, None, 0.5, _S, held=0, cause="") == (
        "GradGuard: step 1: LR backoff #1 (LR backoff): LR now x0.5 of the schedule")


def test_preflight_message_exact() -> None:
    assert preflight_message(4, _TWO) == (
        "GradGuard: step 4: the first step's evidence already says this run is likely to "
        "explode (silence with GradGuard(preflight=False)):\n"
        "  1. lr_too_high: 40 % per step\n"
        "     remedy: lower the LR\n"
        "  2. data_nonfinite: NaN in x\n"
        "     remedy: clean the data")


def test_nonfinite_weights_and_rollback_messages_exact() -> None:
    head = ("GradGuard: step 9: the weights are non-finite although the gradients and the loss "
            "are finite (e.g. an Inf weight behind a saturating activation); the step was "
            "skipped and ")
    assert nonfinite_weights_message(9, None) == head + "no snapshot was available to restore"
    assert nonfinite_weights_message(9, 0) == head + "the last good snapshot (step 0) restored"
    assert rollback_message(None, 2) == ("GradGuard: restored the last good snapshot (step ?) "
                                         "after 2 consecutive non-finite steps")
    assert rollback_message(0, 3) == ("GradGuard: restored the last good snapshot (step 0) "
                                      "after 3 consecutive non-finite steps")


def test_causes_markdown_and_text_and_ids_read_back() -> None:
    md = causes_markdown(_TWO)
    assert md == ("1. `lr_too_high`: 40 % per step. **Remedy:** lower the LR\n"
                  "2. `data_nonfinite`: NaN in x. **Remedy:** clean the data")
    assert causes_text(_TWO, indent="> ") == ("> 1. lr_too_high: 40 % per step\n"
                                               ">    remedy: lower the LR\n"
                                               "> 2. data_nonfinite: NaN in x\n"
                                               ">    remedy: clean the data")
    assert causes_markdown([]) == ""
    assert cause_ids(md) == ["lr_too_high", "data_nonfinite"]
    assert cause_ids("step 3:\n" + causes_text(_TWO)) == ["lr_too_high", "data_nonfinite"]
    # only numbered lines count, anywhere in the text; an id is lower case and underscores
    assert cause_ids("lr_too_high: no number\n 10. `a_b`: x\nx 1. c: y\n2. Upper: z") == ["a_b"]
    assert HALT_MARKER == "**halt**"


def _diag(**kw: object) -> Diagnosis:
    base: dict[str, object] = dict(step=5, nonfinite_params=(), origin=None,
                                   likely_cause="the usual")
    base.update(kw)
    return Diagnosis(**base)  # type: ignore[arg-type]


_SKIPPED = "the step was skipped (weights untouched)."
_REPAIR = ("\nSkipping steps cannot repair them: restore a good checkpoint, or use "
           "GradGuard(rollback=True) to keep a last-good snapshot.")


@pytest.mark.parametrize(("diag", "causes", "resumed", "head"), [
    (_diag(weights_finite=False, first_step=True), [], True,
     "the weights loaded from the checkpoint are non-finite (NaN/Inf)." + _REPAIR),
    (_diag(weights_finite=False, first_step=True), [], False,
     "the weights were already non-finite (NaN/Inf) when training started." + _REPAIR),
    (_diag(weights_finite=False), [], True,
     "the weights themselves are non-finite (NaN/Inf): an earlier update diverged." + _REPAIR),
    (_diag(finding="loss_nonfinite"), [Cause("data_nonfinite", "e", "r")], False,
     "the batch of this step holds NaN/Inf (corrupt data); the step was skipped."),
    (_diag(finding="loss_nonfinite", weights_finite=True), [], False,
     "the loss is non-finite; " + _SKIPPED),
    (_diag(), [Cause("loss_nonfinite", "e", "r")], False,
     "the loss is finite but its gradients are not (a log/sqrt/division at 0 in the "
     "backward); " + _SKIPPED),
    (_diag(nonfinite_params=("a", "b")), [], False,
     "2 parameter(s) have non-finite gradients; " + _SKIPPED),
])
def test_nonfinite_message_heads(diag: Diagnosis, causes: list[Cause], resumed: bool,
                                 head: str) -> None:
    lines = nonfinite_message(diag, causes, resumed=resumed).split("\n")
    assert "\n".join(lines[:1 + head.count("\n")]) == f"GradGuard: step 5: {head}"


def test_nonfinite_message_exact_without_causes() -> None:
    d = _diag(nonfinite_params=("a", "b"), origin="b")
    assert nonfinite_message(d, [], halt_after=3) == (
        "GradGuard: step 5: 2 parameter(s) have non-finite gradients; " + _SKIPPED + "\n"
        "Likely cause: the usual\n"
        "Non-finite gradients in 2 parameter(s): a, b; most likely origin: b (closest to the "
        "output).\n"
        "GradGuard skips such steps and halts after 3 in a row.")


def test_nonfinite_message_exact_with_causes_and_many_parameters() -> None:
    names = tuple(f"p{i}" for i in range(10))
    d = _diag(nonfinite_params=names)
    assert nonfinite_message(d, _TWO[:1]) == (
        "GradGuard: step 5: 10 parameter(s) have non-finite gradients; " + _SKIPPED + "\n"
        "Likely causes, most likely first:\n"
        "  1. lr_too_high: 40 % per step\n"
        "     remedy: lower the LR\n"
        "Non-finite gradients in 10 parameter(s): p0, p1, p2, p3, p4, p5, p6, p7, ... (+2 "
        "more).")
    eight = _diag(nonfinite_params=names[:8])
    assert nonfinite_message(eight, []).split("\n")[-1] == (
        "Non-finite gradients in 8 parameter(s): p0, p1, p2, p3, p4, p5, p6, p7.")
    assert nonfinite_message(_diag(), []) == (
        "GradGuard: step 5: 0 parameter(s) have non-finite gradients; " + _SKIPPED + "\n"
        "Likely cause: the usual")


_QUIET = {"steps": 300, "clipped_steps": 0, "skipped_steps": 0, "lr_backoffs": 0,
          "lr_scale": 1.0, "rollbacks": 0}


@pytest.mark.parametrize(("changes", "line"), [
    ({}, ""),
    ({"clipped_steps": 2}, "GradGuard: 300 steps, 2 clipped, 0 skipped, 0 LR backoffs"),
    ({"skipped_steps": 3}, "GradGuard: 300 steps, 0 clipped, 3 skipped, 0 LR backoffs"),
    ({"lr_backoffs": 1, "lr_scale": 0.123},
     "GradGuard: 300 steps, 0 clipped, 0 skipped, 1 LR backoffs (LR now x0.12 of the "
     "schedule)"),
    ({"rollbacks": 2}, "GradGuard: 300 steps, 0 clipped, 0 skipped, 0 LR backoffs, 2 rollbacks"),
    ({"halted": True}, "GradGuard: 300 steps, 0 clipped, 0 skipped, 0 LR backoffs, halted"),
    ({"lr_scale": 0.5}, "GradGuard: 300 steps, 0 clipped, 0 skipped, 0 LR backoffs (LR now "
     "x0.5 of the schedule)"),
    # clipping alone: no cause named
    ({"clipped_steps": 2, "diagnosis": [{"cause": "lr_too_high"}]},
     "GradGuard: 300 steps, 2 clipped, 0 skipped, 0 LR backoffs"),
    ({"skipped_steps": 1, "diagnosis": [{"cause": "data_nonfinite"}, {"cause": "x"}]},
     "GradGuard: 300 steps, 0 clipped, 1 skipped, 0 LR backoffs; likely cause: data_nonfinite "
     "(see summary()['diagnosis'])"),
    ({"skipped_steps": 1, "diagnosis": None},
     "GradGuard: 300 steps, 0 clipped, 1 skipped, 0 LR backoffs"),
])
def test_end_of_fit_line(changes: dict[str, object], line: str) -> None:
    assert end_of_fit_line({**_QUIET, **changes}) == line


def test_end_of_fit_line_missing_keys_default() -> None:
    assert end_of_fit_line({}) == ""
    assert end_of_fit_line({"halted": True}) == (
        "GradGuard: 0 steps, 0 clipped, 0 skipped, 0 LR backoffs, halted")
    assert end_of_fit_line({"lr_scale": 0.5}) == (
        "GradGuard: 0 steps, 0 clipped, 0 skipped, 0 LR backoffs (LR now x0.5 of the "
        "schedule)")


@pytest.mark.parametrize(("summary", "helped"), [
    ({}, False),
    ({"clipped_steps": 7, "lr_scale": 0.5}, False),
    ({"skipped_steps": 1}, True),
    ({"lr_backoffs": 1}, True),
    ({"rollbacks": 1}, True),
    ({"halted": True}, True),
])
def test_needed_help(summary: dict[str, object], helped: bool) -> None:
    assert needed_help(summary) is helped


def test_nonfinite_message_defaults_and_nine_parameters() -> None:
    first = _diag(weights_finite=False, first_step=True)
    assert nonfinite_message(first, []) == (
        "GradGuard: step 5: the weights were already non-finite (NaN/Inf) when training "
        "started." + _REPAIR + "\nLikely cause: the usual")
    nine = _diag(nonfinite_params=tuple(f"p{i}" for i in range(9)))
    assert nonfinite_message(nine, []).split("\n")[-1] == (
        "Non-finite gradients in 9 parameter(s): p0, p1, p2, p3, p4, p5, p6, p7, ... (+1 "
        "more).")


def test_end_of_fit_line_a_backoff_alone_counts() -> None:
    """An LR backed off and recovered to 1 (a growth backoff clips nothing) still acted."""
    assert end_of_fit_line({**_QUIET, "lr_backoffs": 2}) == (
        "GradGuard: 300 steps, 0 clipped, 0 skipped, 2 LR backoffs")
