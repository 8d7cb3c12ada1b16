"""What a guarded step reports, and what the guard counts.

:class:`StepReport` is built once per step by the apply stage of
:class:`~lightning_gradguard.core.guard.GuardCore`; :class:`GuardCounters` are the public
counts of :meth:`~.guard.GuardCore.summary`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core.decide import Action, Decision, Reason
from lightning_gradguard.core.diagnosis import Cause, Diagnosis
from lightning_gradguard.core.measure import Measurement

__all__ = ["GuardCounters", "StepListener", "StepReport"]


@dataclass(frozen=True)
class StepReport:
    """What the guard saw and did at one optimizer step.

    Attributes:
        step: 1-based count of guarded optimizer steps.
        grad_norm: Total norm before any clipping (NaN/Inf when non-finite).
        grad_norm_clipped: Total norm after clipping (equal to ``grad_norm`` if untouched).
        threshold: The threshold this step was judged by (``inf``: none yet).
        finite: Whether gradients (and loss, if given) were finite.
        action: :class:`Action` taken.
        spike: ``grad_norm > threshold``.
        growth: Sustained growth detected at this step that counts (the update control
            may rule a rise with small updates out; see ``growth_patience``).
        backoff: An LR backoff happened at this step.
        lr_scale: LR scale applied to this step's update.
        rollback: The last-good snapshot was restored at this step.
        params_finite: ``False`` when the weights, measured for a rollback snapshot, were
            non-finite although this step's gradients and loss were finite (e.g. an Inf
            weight behind a saturating activation): the step is skipped and the snapshot
            restored.
        halt: Training cannot recover: stop (see :attr:`~.guard.GuardCore.halt_message`).
        loss: The loss passed to :meth:`~.guard.GuardCore.step` (``None`` if not given).
        diagnosis: On the first non-finite step (and on halt), where it came from.
        causes: Ranked causes diagnosed at this step (with ``diagnose``): on the first step
            when the pre-flight evidence already shows some, on the first backoff, the first
            non-finite step and the halt (when the run needed help: a spike that clipping
            contains is not diagnosed); ``None`` on other steps.
        diagnosis_event: What :attr:`causes` answer: ``"preflight"``, ``"backoff"``,
            ``"nonfinite"`` or ``"halt"`` (``None`` without them).
        reason: Why this step halted or backed the LR off
            (:class:`~lightning_gradguard.core.decide.Reason`; ``None``: neither).
    """

    step: int
    grad_norm: float
    grad_norm_clipped: float
    threshold: float
    finite: bool
    action: Action
    spike: bool = False
    growth: bool = False
    backoff: bool = False
    lr_scale: float = 1.0
    rollback: bool = False
    params_finite: bool = True
    halt: bool = False
    loss: float | None = None
    diagnosis: Diagnosis | None = None
    causes: tuple[Cause, ...] | None = None
    diagnosis_event: str | None = None
    reason: Reason | None = None


@friendly_kwargs
@dataclass
class GuardCounters:
    """The guard's public counts (every field is a key of :meth:`~.guard.GuardCore.summary`).

    Attributes:
        steps: Guarded optimizer steps.
        nonfinite_steps: Steps with non-finite gradients or loss the guard answered.
        skipped_steps: Steps skipped (gradients cleared).
        spikes: Steps whose norm was above the threshold.
        clipped_steps: Steps whose gradients were clipped.
        lr_backoffs: LR backoffs.
        growth_events: Sustained-growth detections that counted.
        rollbacks: Restores of the last-good snapshot.
        amp_overflow_steps: Non-finite steps left to the GradScaler.
        halted: Training was halted.
        reasons: Steps that backed the LR off or halted, by their
            :class:`~lightning_gradguard.core.decide.Reason` (``{"update_capped": 2}``); a
            halting step counts under its halt reason.
    """

    steps: int = 0
    nonfinite_steps: int = 0
    skipped_steps: int = 0
    spikes: int = 0
    clipped_steps: int = 0
    lr_backoffs: int = 0
    growth_events: int = 0
    rollbacks: int = 0
    amp_overflow_steps: int = 0
    halted: bool = False
    reasons: dict[str, int] = field(default_factory=dict)

    def record(self, d: Decision) -> None:
        """Count what a step's decision did.

        ``steps`` is counted when the step starts, ``rollbacks`` by
        :meth:`~.guard.GuardCore.restore_snapshot`.
        """
        if d.path == "nonfinite":
            self.nonfinite_steps += 1
        elif d.path == "amp_overflow":
            self.amp_overflow_steps += 1
        if d.skip:
            self.skipped_steps += 1
        if d.spike:
            self.spikes += 1
        if d.action is Action.CLIP:
            self.clipped_steps += 1
        if d.growth:
            self.growth_events += 1
        if d.backoff:
            self.lr_backoffs += 1
        if d.halt:
            self.halted = True
        if d.reason is not None:
            self.reasons[d.reason.value] = self.reasons.get(d.reason.value, 0) + 1


#: ``listener(measurement, decision, report)``: see :attr:`~.guard.GuardCore.listeners`
StepListener = Callable[[Measurement, Decision, "StepReport"], None]
