"""What the user reads: every message of the guard, built here from structured values.

Ranked causes, the first non-finite step, the pre-flight warning, the reason of a backoff
(:func:`reason_text`, from :class:`~lightning_gradguard.core.decide.Reason`), rollbacks, the
halt, the end of fit. Plain strings from host values (no tensors); no other module writes
prose for the user or parses it. Messages put the most important fact first and carry no
source location.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_gradguard.core.decide import CLIP_RULE, Reason
from lightning_gradguard.core.diagnosis import Cause, Diagnosis
from lightning_gradguard.core.settings import GuardSettings
from lightning_gradguard.core.streaks import CLIP_HISTORY

__all__ = ["HALT_MARKER", "backoff_notice", "cause_ids", "causes_markdown", "causes_text",
           "end_of_fit_line",
           "needed_help", "nonfinite_message", "nonfinite_weights_message",
           "preflight_message", "reason_text", "rollback_message"]


#: how the TensorBoard text entry of a halt starts (the report finds the halt by it)
HALT_MARKER = "**halt**"

#: a numbered cause as :func:`causes_text` and :func:`causes_markdown` write it
_CAUSE_LINE = re.compile(r"^\s*\d+\. `?([a-z_]+)`?:", re.MULTILINE)


def cause_ids(text: str) -> list[str]:
    """The ranked cause ids in a text written by :func:`causes_text` / :func:`causes_markdown`.

    The report reads them back from the ``gradguard/events`` text: the format is this
    module's, written and read here.

    Example:
        >>> c = [Cause("lr_too_high", "40 %", "lower the LR"), Cause("data_nonfinite", "", "")]
        >>> cause_ids("GradGuard: step 3: ...\\n" + causes_text(c)), cause_ids(causes_markdown(c))
        (['lr_too_high', 'data_nonfinite'], ['lr_too_high', 'data_nonfinite'])
    """
    return [m.group(1) for m in _CAUSE_LINE.finditer(text)]


def reason_text(reason: Reason, s: GuardSettings) -> str:
    """Why the guard backed the LR off (or halted), in words, with the settings that fired.

    Example:
        >>> print(reason_text(Reason.UPDATE_CAPPED, GuardSettings()))
        ... # doctest: +NORMALIZE_WHITESPACE
        3 spikes or capped updates within 50 steps, this update over the update cap (the LR
        times the gradient would move the weights by more than max_update_ratio=0.1 of their
        norm)
        >>> reason_text(Reason.NONFINITE_REPEAT, GuardSettings())
        'a second non-finite step within nonfinite_window=50 steps'
    """
    spikes = f"{s.spike_patience} spikes within {s.spike_window} steps"
    texts = {
        Reason.NONFINITE_REPEAT: (
            f"a second non-finite step within nonfinite_window={s.nonfinite_window} steps"
            if s.nonfinite_window else "a non-finite step, with nonfinite_window=0"),
        Reason.NONFINITE_WEIGHTS: "non-finite weights (finite gradients and loss)",
        Reason.UPDATE_CAPPED: (
            f"{s.spike_patience} spikes or capped updates within {s.spike_window} steps, this "
            "update over the update cap (the LR times the gradient would move the weights by "
            f"more than max_update_ratio={s.max_update_ratio} of their norm)"),
        Reason.CLIPPING_RULE: (f"{spikes} while clipping is the rule ({CLIP_RULE} of the last "
                               f"{CLIP_HISTORY} steps clipped)"),
        Reason.ALREADY_BACKED_OFF: f"{spikes} while the LR is still backed off",
        Reason.GROWTH: (f"sustained growth of the gradient norm ({s.growth_patience} rising "
                        "steps in a row)"),
        Reason.HALT: f"{s.halt_after} consecutive non-finite steps",
        Reason.AMP_HALT: (f"{s.amp_halt_after} consecutive steps the GradScaler skipped with a "
                          "finite loss"),
    }
    return texts[reason]


def backoff_notice(step: int, number: int, reason: Reason | None, lr_scale: float,
                   s: GuardSettings, *, held: int = 0, cause: str | None = None) -> str:
    """The one-line notice of an LR backoff: its number, its reason and the LR now.

    Args:
        step: The step of the backoff.
        number: How many backoffs the run has had, this one included.
        reason: The backoff's :class:`~lightning_gradguard.core.decide.Reason`.
        lr_scale: The LR scale after the backoff.
        s: The guard's settings (the reason names them).
        held: Backoffs since the last notice that were not announced (rate limit).
        cause: The most likely cause diagnosed so far (``None``: none).

    Example:
        >>> print(backoff_notice(12, 1, Reason.GROWTH, 0.5, GuardSettings()))
        ... # doctest: +NORMALIZE_WHITESPACE
        GradGuard: step 12: LR backoff #1 (sustained growth of the gradient norm (5 rising
        steps in a row)): LR now x0.5 of the schedule
    """
    why = reason_text(reason, s) if reason is not None else "LR backoff"
    more = f"; {held} more since the last notice" if held else ""
    tail = f"; likely cause: {cause}" if cause else ""
    return (f"GradGuard: step {step}: LR backoff #{number} ({why}{more}): LR now "
            f"x{lr_scale:.2g} of the schedule{tail}")


def preflight_message(step: int, causes: Sequence[Cause]) -> str:
    """The warning of the first step whose evidence already says the run will explode.

    Example:
        >>> print(preflight_message(1, [Cause("init_scale", "x3 per layer", "use He init")]))
        ... # doctest: +NORMALIZE_WHITESPACE
        GradGuard: step 1: the first step's evidence already says this run is likely to
        explode (silence with GradGuard(preflight=False)):
          1. init_scale: x3 per layer
             remedy: use He init
    """
    return (f"GradGuard: step {step}: the first step's evidence already says this run is "
            "likely to explode (silence with GradGuard(preflight=False)):\n"
            + causes_text(causes))


def nonfinite_weights_message(step: int, restored_from: int | None) -> str:
    """A finite step whose weights are non-finite: skipped, and the snapshot restored (or not).

    Args:
        step: The step.
        restored_from: The step of the snapshot restored (``None``: none was available).

    Example:
        >>> print(nonfinite_weights_message(9, None).split("; ")[1])
        the step was skipped and no snapshot was available to restore
    """
    done = (f"the last good snapshot (step {restored_from}) restored"
            if restored_from is not None else "no snapshot was available to restore")
    return (f"GradGuard: step {step}: the weights are non-finite although the gradients and "
            "the loss are finite (e.g. an Inf weight behind a saturating activation); the "
            f"step was skipped and {done}")


def rollback_message(snapshot_step: int | None, streak: int) -> str:
    """The notice of a rollback after a streak of non-finite steps.

    Example:
        >>> rollback_message(100, 3)
        'GradGuard: restored the last good snapshot (step 100) after 3 consecutive non-finite steps'
    """
    where = "?" if snapshot_step is None else snapshot_step
    return (f"GradGuard: restored the last good snapshot (step {where}) after {streak} "
            "consecutive non-finite steps")


def causes_markdown(causes: Sequence[Cause]) -> str:
    """The ranked causes as a numbered markdown list (TensorBoard text, the report).

    Example:
        >>> print(causes_markdown([Cause("lr_too_high", "40 % per step", "lower the LR")]))
        1. `lr_too_high`: 40 % per step. **Remedy:** lower the LR
    """
    return "\n".join(f"{i}. `{c.cause}`: {c.evidence}. **Remedy:** {c.remedy}"
                     for i, c in enumerate(causes, 1))


def causes_text(causes: Sequence[Cause], indent: str = "  ") -> str:
    """The ranked causes, one numbered entry each with its evidence and remedy.

    Example:
        >>> print(causes_text([Cause("lr_too_high", "40 % per step", "lower the LR")]))
          1. lr_too_high: 40 % per step
             remedy: lower the LR
    """
    lines = []
    for i, c in enumerate(causes, 1):
        lines.append(f"{indent}{i}. {c.cause}: {c.evidence}")
        lines.append(f"{indent}   remedy: {c.remedy}")
    return "\n".join(lines)


def nonfinite_message(d: Diagnosis, causes: Sequence[Cause], *, resumed: bool = False,
                      halt_after: int = 0) -> str:
    """The first-non-finite-step message: the most important fact first, then the causes.

    Args:
        d: The step's :class:`~lightning_gradguard.core.diagnosis.Diagnosis`.
        causes: The ranked causes (empty: the generic list of usual causes is given).
        resumed: The run was resumed from a checkpoint.
        halt_after: The guard's ``halt_after`` (0: never halts).

    Example:
        >>> d = Diagnosis(3, ("0.weight",), "0.weight", "usual", weights_finite=False,
        ...               first_step=True)
        >>> print(nonfinite_message(d, [], resumed=True).splitlines()[0])
        GradGuard: step 3: the weights loaded from the checkpoint are non-finite (NaN/Inf).
    """
    top = causes[0].cause if causes else None
    if d.weights_finite is False:
        if d.first_step:
            head = ("the weights loaded from the checkpoint are non-finite (NaN/Inf)." if resumed
                    else "the weights were already non-finite (NaN/Inf) when training started.")
        else:
            head = "the weights themselves are non-finite (NaN/Inf): an earlier update diverged."
        head += ("\nSkipping steps cannot repair them: restore a good checkpoint, or use "
                 "GradGuard(rollback=True) to keep a last-good snapshot.")
    elif top == "data_nonfinite":
        head = "the batch of this step holds NaN/Inf (corrupt data); the step was skipped."
    elif d.finding == "loss_nonfinite":
        head = "the loss is non-finite; the step was skipped (weights untouched)."
    elif top == "loss_nonfinite":
        head = ("the loss is finite but its gradients are not (a log/sqrt/division at 0 in "
                "the backward); the step was skipped (weights untouched).")
    else:
        head = (f"{len(d.nonfinite_params)} parameter(s) have non-finite gradients; the step "
                "was skipped (weights untouched).")
    lines = [f"GradGuard: step {d.step}: {head}"]
    if causes:
        lines.append("Likely causes, most likely first:")
        lines.append(causes_text(causes))
    else:
        lines.append(f"Likely cause: {d.likely_cause}")
    if d.nonfinite_params:
        names = ", ".join(d.nonfinite_params[:8])
        more = (f", ... (+{len(d.nonfinite_params) - 8} more)"
                if len(d.nonfinite_params) > 8 else "")
        origin = f"; most likely origin: {d.origin} (closest to the output)" if d.origin else ""
        lines.append(f"Non-finite gradients in {len(d.nonfinite_params)} parameter(s): "
                     f"{names}{more}{origin}.")
    if halt_after:
        lines.append(f"GradGuard skips such steps and halts after {halt_after} in a row.")
    return "\n".join(lines)


def end_of_fit_line(summary: Mapping[str, Any]) -> str:
    """One line: what the guard did (empty when it did nothing).

    The most likely cause is named only when the run needed help (see :func:`needed_help`).

    Example:
        >>> print(end_of_fit_line({"steps": 300, "clipped_steps": 21, "skipped_steps": 0,
        ...                        "lr_backoffs": 8, "lr_scale": 0.0068, "rollbacks": 0}))
        GradGuard: 300 steps, 21 clipped, 0 skipped, 8 LR backoffs (LR now x0.0068 of the schedule)
        >>> end_of_fit_line({"steps": 300, "clipped_steps": 0, "skipped_steps": 0,
        ...                  "lr_backoffs": 0, "lr_scale": 1.0, "rollbacks": 0})
        ''
    """
    acted = (summary.get("clipped_steps", 0) or summary.get("skipped_steps", 0)
             or summary.get("lr_backoffs", 0) or summary.get("rollbacks", 0)
             or summary.get("halted", False) or summary.get("lr_scale", 1.0) < 1.0)
    if not acted:
        return ""
    line = (f"GradGuard: {summary.get('steps', 0)} steps, {summary.get('clipped_steps', 0)} "
            f"clipped, {summary.get('skipped_steps', 0)} skipped, "
            f"{summary.get('lr_backoffs', 0)} LR backoffs")
    if summary.get("lr_scale", 1.0) < 1.0:
        line += f" (LR now x{summary['lr_scale']:.2g} of the schedule)"
    if summary.get("rollbacks", 0):
        line += f", {summary['rollbacks']} rollbacks"
    if summary.get("halted", False):
        line += ", halted"
    diagnosis = summary.get("diagnosis") or []
    if diagnosis and needed_help(summary):
        line += f"; likely cause: {diagnosis[0]['cause']} (see summary()['diagnosis'])"
    return line


def needed_help(summary: Mapping[str, Any]) -> bool:
    """Whether the run needed help: an LR backoff, a skipped step, a rollback or a halt.

    Clipping alone does not count: a spike that clipping contained is not an explosion, and
    no cause is named for it.

    Example:
        >>> needed_help({"clipped_steps": 7, "skipped_steps": 0, "lr_backoffs": 0})
        False
        >>> needed_help({"clipped_steps": 7, "skipped_steps": 1})
        True
    """
    return bool(summary.get("skipped_steps", 0) or summary.get("lr_backoffs", 0)
                or summary.get("rollbacks", 0) or summary.get("halted", False))
