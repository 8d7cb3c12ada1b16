"""Stage 2 of a guarded step: **decide**, a pure function of host floats.

:func:`decide` maps the step's :class:`~lightning_gradguard.core.measure.Measurement`, the
guard's :class:`GuardState` and the :class:`~lightning_gradguard.core.settings.GuardSettings`
to a :class:`Decision`; it touches no tensor and changes nothing (the apply stage,
:meth:`GuardCore.step <lightning_gradguard.core.GuardCore.step>`, carries it out). Each row of
the decision table is one function below:

==============================  ======================================  ====================
situation                       action                                  function
==============================  ======================================  ====================
no gradient at all              nothing (statistics untouched)          :func:`_empty`
non-finite gradient or loss     **skip**; LR backoff only if another    :func:`_nonfinite`
                                non-finite step came within
                                ``nonfinite_window`` steps; rollback
                                every ``rollback_after`` in a row,
                                halt at ``halt_after``
non-finite under a GradScaler   nothing (the scaler skips it itself);   :func:`_amp_overflow`
(finite loss)                   ``amp_halt_after`` in a row halt
finite step, non-finite         **skip**, LR backoff, rollback          :func:`_nonfinite_weights`
weights (snapshot steps)
norm > threshold (spike)        **clip** to the threshold               :func:`_clip`
update over the optimizer's     **clip** to the update cap; counts      :func:`_clip`
update cap                      like a spike
spikes or cap hits within       LR backoff if the LR is shown too       :func:`_backoff_due`,
``spike_window`` reach          high (this update capped, clipping on   :func:`_lr_too_high`
``spike_patience``; growth      most recent steps, or the LR already
                                backed off); otherwise the spike count
                                restarts (a spike counts only if the
                                update control says it is large)
clean step                      LR scale recovers toward 1              :func:`_finite`
==============================  ======================================  ====================

Why a backoff needs evidence (the rules and their mechanisms):

* **An isolated non-finite step costs one skip.** One corrupt batch (a NaN in the data, an
  Inf loss) is a property of the batch, not of the learning rate, and the skip leaves the
  weights and the optimizer state untouched: nothing is left to repair. Non-finite steps
  that repeat within ``nonfinite_window`` steps mean the weights or the LR produce them: the
  second one backs the LR off.
* **A spike-count or growth backoff needs evidence that the LR is too high.** A z-score
  spike of a healthy run is a gradient a little above its own recent history, and the clip
  has already answered it. Too high an LR shows otherwise: (a) this step's update was
  clipped by the optimizer's update cap (the LR times this gradient would move the weights
  by more than ``max_update_ratio`` of their norm), (b) clipping is the rule, not the
  exception (at least :data:`CLIP_RULE` of the last
  :data:`~lightning_gradguard.core.streaks.CLIP_HISTORY` steps clipped, this one included),
  or (c) the LR is already backed off (``lr_scale < 1``): spikes that return while it
  recovers are that instability returning. Without any of these the step is clipped and
  the spike count restarts.
* **Clipping as the rule is no evidence under an adaptive optimizer.** (b) stands for a
  gradient norm that rises past a lagging threshold, step after step: under SGD the update
  is the LR times that gradient and grows with it. Adam, RMSprop, Adagrad and their kin
  divide each coordinate's step by its own running gradient scale
  (:class:`~lightning_gradguard.core.update_cap.NormalisedUpdates`,
  ``Measurement.limit.normalised``), so a gradient that keeps rising leaves their updates
  about ``lr`` per coordinate: for them (b) does not count, and the steps are clipped and the
  count restarts. They have no update cap, so (a) never holds for them; (c), repeated
  non-finite steps, growth with evidence and the halt are unchanged.
* **A run whose loss keeps falling is not backed off because clipping became the rule.** A
  gradient norm also rises while a model fits large targets or a zero-initialised head
  grows, and a z-score threshold lags that trend until clipping is the rule (evidence (b));
  an unstable run does not learn. So while the median of the last 10 losses is below the
  median of the last 50 and below the run's first loss
  (:class:`~lightning_gradguard.core.progress.LossTrend`, ``loss_improving``) (b) does not
  count: the steps are clipped and the count restarts. An update clipped by the armed update
  cap (a) still counts — it measures the LR against the weights directly and does not lag.
  This holds only at the full LR (``lr_scale`` 1): while the LR is backed off, a falling
  loss is the backoff's doing, not proof that the full LR is safe, and spikes that return
  are answered as in (c). Non-finite steps are judged without it, and so is a run that
  gives no loss.

Example:
    >>> from lightning_gradguard.core.measure import Measurement
    >>> from lightning_gradguard.core.settings import GuardSettings
    >>> m = Measurement(step=3, grad_norm=10.0, threshold=2.0, clipped_norm=10.0)
    >>> d = decide(m, GuardState(), GuardSettings())
    >>> d.action, d.spike, round(d.clipped_norm, 4), d.spike_steps
    (<Action.CLIP: 'clip'>, True, 2.0, (3,))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from lightning_gradguard.core.clip import clip_coef
from lightning_gradguard.core.measure import Measurement
from lightning_gradguard.core.settings import GuardSettings
from lightning_gradguard.core.streaks import Streaks

__all__ = ["CLIP_RULE", "Action", "Decision", "GuardState", "Reason", "decide"]

#: clipped steps among the last ``CLIP_HISTORY`` that make clipping the rule (evidence (b))
CLIP_RULE = 5

Path = Literal["empty", "finite", "nonfinite", "amp_overflow", "nonfinite_weights"]


class Action(str, Enum):
    """What the guard did to the step."""

    NONE = "none"
    CLIP = "clip"
    SKIP = "skip"
    AMP_SKIP = "amp_skip"


class Reason(str, Enum):
    """Why a step backed the LR off or halted: one value per decision, the rule that fired.

    ``Decision.reason`` (and ``StepReport.reason``) is the halt's reason on a halting step
    (a halt outranks the backoff it comes with), otherwise the backoff's; ``None`` on every
    other step. :func:`~lightning_gradguard.core.messages.reason_text` says it in words.

    Example:
        >>> Reason.UPDATE_CAPPED.value
        'update_capped'
    """

    #: a non-finite step came within ``nonfinite_window`` steps of the last one (with
    #: ``nonfinite_window=0``: every non-finite step)
    NONFINITE_REPEAT = "nonfinite_repeat"
    #: the weights are non-finite although the gradients and the loss are finite
    NONFINITE_WEIGHTS = "nonfinite_weights"
    #: spikes or capped updates reached ``spike_patience`` and this update was over the
    #: optimizer's update cap (evidence (a))
    UPDATE_CAPPED = "update_capped"
    #: spikes reached ``spike_patience`` while clipping is the rule (evidence (b))
    CLIPPING_RULE = "clipping_rule"
    #: spikes reached ``spike_patience`` while the LR is still backed off (evidence (c))
    ALREADY_BACKED_OFF = "already_backed_off"
    #: the gradient norm rose ``growth_patience`` steps in a row (with evidence)
    GROWTH = "growth"
    #: ``halt_after`` consecutive non-finite steps
    HALT = "halt"
    #: ``amp_halt_after`` consecutive steps the GradScaler skipped with a finite loss
    AMP_HALT = "amp_halt"


@dataclass(slots=True)
class GuardState:
    """The guard's state as the decision sees it (host values only; a value, never changed).

    Attributes:
        streaks: The non-finite and GradScaler streaks, the last non-finite step and the
            recent clipped steps, before this step.
        spike_steps: Steps of the spikes (and cap hits) that count toward a backoff, in the
            window.
        diagnosed: The run's first non-finite step has been diagnosed already.
        growth_fires: The growth detector fires on this step's norm.
        lr_scale: The LR backoff scale before this step (below 1: backed off, not yet
            recovered).
        loss_improving: The median of the last 10 losses is below the median of the last 50
            and below the run's first loss (see
            :class:`~lightning_gradguard.core.progress.LossTrend`): the run is learning.
        clock: The optimizer's own step count, the clock of every window (``spike_window``,
            ``nonfinite_window``, the clip history); ``None``: the measurement's step. With
            several optimizers the caller's step (Lightning's ``global_step``) advances on
            every optimizer's step, so each guard counts its windows in its own steps.
    """

    streaks: Streaks = field(default_factory=Streaks)
    spike_steps: tuple[int, ...] = ()
    diagnosed: bool = False
    growth_fires: bool = False
    lr_scale: float = 1.0
    loss_improving: bool = False
    clock: int | None = None


@dataclass(slots=True)
class Decision:
    """What to do at one step; the apply stage carries it out in a fixed order.

    A value (not frozen only because a frozen dataclass of this size costs microseconds to
    build, every step): nothing changes it after :func:`decide` returns it.

    Attributes:
        path: Which row of the table the step took.
        action: :class:`Action` for the report.
        streaks: The streaks after this step.
        spike_steps: The backoff window after this step (in the clock of
            :attr:`GuardState.clock`).
        threshold: The threshold to report (lowered to the update cap when that clipped).
        clipped_norm: The total norm after clipping.
        scales: Multiply the gradients by each of these, in order (clipping).
        observe: Feed the norm to the clip statistics and the growth detector.
        spike: ``grad_norm > threshold``.
        growth: Sustained growth that counts (an event).
        hold_growth: Growth fired but does not count: keep the detector armed.
        skip: Clear the gradients (a true skip of the update).
        backoff: Back the LR scale off.
        recover: Let the LR scale recover one step.
        rollback: Restore the last-good snapshot, if there is one.
        snapshot: Capture a last-good snapshot.
        halt: Training cannot recover: stop.
        diagnose: Diagnose where the non-finite values came from.
        reason: Why this step halts or backs the LR off (:class:`Reason`; ``None``: it
            does neither).
    """

    path: Path
    action: Action
    streaks: Streaks
    spike_steps: tuple[int, ...]
    threshold: float
    clipped_norm: float
    scales: tuple[float, ...] = ()
    observe: bool = False
    spike: bool = False
    growth: bool = False
    hold_growth: bool = False
    skip: bool = False
    backoff: bool = False
    recover: bool = False
    rollback: bool = False
    snapshot: bool = False
    halt: bool = False
    diagnose: bool = False
    reason: Reason | None = None


def decide(m: Measurement, state: GuardState, s: GuardSettings) -> Decision:
    """The decision for one step (pure: host floats in, a :class:`Decision` out)."""
    if m.empty:
        return _empty(m, state)
    if not m.finite:
        if m.amp_overflow and (m.loss is None or math.isfinite(m.loss)):
            return _amp_overflow(m, state, s)
        return _nonfinite(m, state, s)
    if m.params_finite is False:
        return _nonfinite_weights(m, state, s)
    return _finite(m, state, s)



def _empty(m: Measurement, state: GuardState) -> Decision:
    """No gradient to measure (e.g. every one cleared by another guard): change nothing."""
    return Decision("empty", Action.NONE, state.streaks, state.spike_steps, m.threshold,
                    m.clipped_norm)


def _nonfinite(m: Measurement, state: GuardState, s: GuardSettings) -> Decision:
    """Non-finite gradient or loss: skip; back off if it repeats; roll back / halt on a streak.

    An isolated one costs the skip only (the batch's fault; the skip left weights and
    optimizer state untouched); another within ``nonfinite_window`` steps backs the LR off.
    """
    last = state.streaks.last_nonfinite
    clock = m.step if state.clock is None else state.clock
    repeated = s.nonfinite_window == 0 or (last is not None
                                           and 0 <= clock - last < s.nonfinite_window)
    streaks = state.streaks.on_nonfinite(m.step, clock)
    n = streaks.nonfinite
    backoff = s.lr_backoff and repeated
    halt = s.halt_after > 0 and n >= s.halt_after
    return Decision(
        "nonfinite", Action.SKIP if s.skip_nonfinite else Action.NONE, streaks,
        state.spike_steps, m.threshold, m.grad_norm, skip=s.skip_nonfinite,
        backoff=backoff, rollback=n % s.rollback_after == 0, halt=halt,
        diagnose=not state.diagnosed or n >= s.halt_after > 0,
        reason=Reason.HALT if halt else Reason.NONFINITE_REPEAT if backoff else None)


def _amp_overflow(m: Measurement, state: GuardState, s: GuardSettings) -> Decision:
    """Left to the GradScaler (its calibration); a streak of ``amp_halt_after`` halts."""
    streaks = state.streaks.on_amp_overflow(m.step)
    # not an overflow any more at the halt: the scaler cannot fix it
    halt = s.halt_after > 0 and streaks.amp >= s.amp_halt_after
    return Decision("amp_overflow", Action.AMP_SKIP, streaks, state.spike_steps, m.threshold,
                    m.grad_norm, halt=halt, diagnose=halt,
                    reason=Reason.AMP_HALT if halt else None)


def _nonfinite_weights(m: Measurement, state: GuardState, s: GuardSettings) -> Decision:
    """Finite gradients and loss, but non-finite weights: skip, back off, restore."""
    return Decision("nonfinite_weights", Action.SKIP, state.streaks.on_finite(),
                    state.spike_steps, m.threshold, m.grad_norm, skip=True,
                    backoff=s.lr_backoff, rollback=True,
                    reason=Reason.NONFINITE_WEIGHTS if s.lr_backoff else None)


def _clip(m: Measurement, spike: bool) -> tuple[Action, tuple[float, ...], float, float, bool]:
    """Clip a spike to the threshold, then an update over the cap to the cap.

    Returns:
        ``(action, scales, clipped_norm, reported threshold, capped)``.
    """
    clipped, threshold = m.clipped_norm, m.threshold
    if not (spike or m.unitwise or m.limit.cap < clipped):
        return Action.NONE, (), clipped, threshold, False  # the usual step
    action, scales = Action.NONE, []
    if spike:
        coef = clip_coef(m.grad_norm, threshold)
        if coef < 1.0:
            scales.append(coef)
            clipped = m.grad_norm * coef
            action = Action.CLIP
    elif m.unitwise and clipped < m.grad_norm * (1 - 1e-6):
        action = Action.CLIP  # the unit-wise policy clips units (measured; apply clips)
    capped = m.limit.cap < clipped
    if capped:
        coef = clip_coef(clipped, m.limit.cap)
        scales.append(coef)
        clipped = clipped * coef
        action = Action.CLIP
        threshold = min(threshold, m.limit.cap)
    return action, tuple(scales), clipped, threshold, capped


def _backoff_due(window: tuple[int, ...], grew: bool, s: GuardSettings) -> bool:
    """The trigger: sustained growth, or ``spike_patience`` counted spikes within the window."""
    return s.lr_backoff and (grew or (s.spike_patience > 0 and len(window) >= s.spike_patience))


def _lr_too_high(capped: bool, clipped: tuple[int, ...], lr_scale: float,
                 normalised: bool) -> Reason | None:
    """Evidence that the LR, not the batch, is the problem (a triggered backoff needs it).

    (a) this update was clipped by the update cap, (b) at least :data:`CLIP_RULE` of the
    recent steps (``clipped``, this one included) were clipped and the optimizer's updates
    are not ``normalised`` (an adaptive optimizer's do not grow with the gradient), or (c)
    the LR is already backed off and has not recovered.

    Returns:
        The first evidence that holds, in that order (``None``: none).
    """
    if capped:
        return Reason.UPDATE_CAPPED
    if len(clipped) >= CLIP_RULE and not normalised:
        return Reason.CLIPPING_RULE
    return Reason.ALREADY_BACKED_OFF if lr_scale < 1.0 else None


def _finite(m: Measurement, state: GuardState, s: GuardSettings) -> Decision:
    """A finite step: clip spikes and oversized updates, back off on repeated ones."""
    # a spike or a rise whose update is small (update control) is clipped but is no sign of
    # too high an LR; a rise that does not count keeps the detector armed
    large = m.limit.counts(m.grad_norm)
    fired = s.growth_patience > 0 and state.growth_fires
    grew = fired and large
    spike = m.grad_norm > m.threshold
    action, scales, clipped, threshold, capped = _clip(m, spike)
    clock = m.step if state.clock is None else state.clock
    window = state.spike_steps
    if (spike and large) or capped:
        window = (*window, clock)
    if window:  # forget counted steps that left the window
        oldest = clock - s.spike_window
        window = tuple([t for t in window if t > oldest])
    streaks = state.streaks.on_finite(clock, clipped=action is Action.CLIP)
    triggered = _backoff_due(window, grew, s)
    evidence: Reason | None = None
    if triggered:
        # without evidence that the LR is too high the clip has answered it: the count
        # restarts. A loss that keeps falling at the full LR shows that clipping became the
        # rule because the threshold lags a rising norm of a run that learns: only a capped
        # update counts then (once backed off, a falling loss is the backoff's doing: (c)
        # counts as always)
        learning = state.loss_improving and state.lr_scale >= 1.0
        evidence = ((Reason.UPDATE_CAPPED if capped else None) if learning
                    else _lr_too_high(capped, streaks.clipped, state.lr_scale,
                                      m.limit.normalised))
    backoff = evidence is not None
    return Decision(
        "finite", action, streaks, () if triggered else window, threshold,
        clipped, scales=scales, observe=True, spike=spike, growth=grew,
        hold_growth=fired and not large, backoff=backoff, recover=not (spike or backoff),
        snapshot=m.params_finite is True,
        reason=(Reason.GROWTH if grew else evidence) if backoff else None)
