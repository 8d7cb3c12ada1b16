"""What the user reads: ranked causes, the first non-finite step, backoffs, the end of fit.

Plain strings from host values (no tensors); the callbacks print them, :class:`GuardCore
<lightning_gradguard.core.GuardCore>` users may too. Messages put the most important fact
first and carry no source location.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_gradguard.core.diagnosis import Cause, Diagnosis

__all__ = ["causes_text", "end_of_fit_line", "needed_help", "nonfinite_message"]


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
    elif d.likely_cause.startswith("the loss itself"):
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
