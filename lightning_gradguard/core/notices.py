"""How the guard speaks: a step's notices, through one logger and one ``verbose`` switch.

:class:`Speaker` turns what a step did (its :class:`~lightning_gradguard.core.guard.StepReport`)
into :class:`Notice` values, with the words of :mod:`~lightning_gradguard.core.messages`,
and hands each to a sink. The default sink, :func:`log_notice`, writes the text to the
``lightning_gradguard`` logger, so :class:`~lightning_gradguard.core.GuardCore` in a plain
loop warns at the first non-finite step and announces every LR backoff; the Lightning
callback replaces the sink with one that also writes TensorBoard text.

What is said, and when:

====================  =========  ======================================================
notice                level      when (``verbose=False`` keeps only the "always" ones)
====================  =========  ======================================================
``preflight``         WARNING    the first step's evidence says the run will explode
``nonfinite``         WARNING    the run's first non-finite step, with the diagnosis
``diagnosis``         (text for  the first backoff's ranked causes (TensorBoard only)
                      TB only)
``backoff``           INFO       every LR backoff with its reason, at most one per
                                 :data:`NOTICE_EVERY` steps (the others are counted in it)
``nonfinite_weights`` WARNING    always: finite step, non-finite weights
``rollback``          WARNING    always: the last good snapshot restored
``halt``              ERROR      always: training cannot recover
====================  =========  ======================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from lightning_gradguard.core.diagnosis import Cause
from lightning_gradguard.core.messages import (
    HALT_MARKER,
    backoff_notice,
    causes_markdown,
    nonfinite_message,
    nonfinite_weights_message,
    preflight_message,
    reason_text,
    rollback_message,
)
from lightning_gradguard.core.settings import GuardSettings

if TYPE_CHECKING:
    from lightning_gradguard.core.guard import StepReport

__all__ = ["NOTICE_EVERY", "Notice", "NoticeKind", "NoticeSink", "Speaker", "log", "log_notice"]

#: the package's logger: every console message of the guard and the callbacks
log = logging.getLogger("lightning_gradguard")

#: at most one backoff notice per this many steps (the others are counted in the next one)
NOTICE_EVERY = 50


class NoticeKind(str, Enum):
    """What a :class:`Notice` is about."""

    PREFLIGHT = "preflight"
    NONFINITE = "nonfinite"
    DIAGNOSIS = "diagnosis"
    BACKOFF = "backoff"
    NONFINITE_WEIGHTS = "nonfinite_weights"
    ROLLBACK = "rollback"
    HALT = "halt"


@dataclass(frozen=True)
class Notice:
    """One thing the guard says about a step.

    Attributes:
        kind: What it is about.
        step: The step it belongs to.
        text: The console text (``""``: nothing for the console).
        markdown: The TensorBoard events text (``""``: none).
        level: The ``logging`` level of :attr:`text`.
        shown: Whether :attr:`text` is shown (``verbose``, or a notice that always is).
    """

    kind: NoticeKind
    step: int
    text: str
    markdown: str
    level: int = logging.INFO
    shown: bool = True


#: a callable that receives every notice of a step
NoticeSink = Callable[[Notice], None]


def log_notice(notice: Notice) -> None:
    """The default sink: the text of a shown notice to the ``lightning_gradguard`` logger."""
    if notice.shown and notice.text:
        log.log(notice.level, notice.text)


class Speaker:
    """Builds a step's notices and hands them to :attr:`sink` (rate-limits backoff notices).

    Args:
        settings: The guard's settings (``verbose``, and the values the reasons name).

    Example:
        >>> from lightning_gradguard.core.decide import Action, Reason
        >>> from lightning_gradguard.core.guard import StepReport
        >>> said = []
        >>> speaker = Speaker(GuardSettings())
        >>> speaker.sink = said.append
        >>> r = StepReport(7, 9.0, 2.0, 2.0, True, Action.CLIP, backoff=True, lr_scale=0.5,
        ...                reason=Reason.CLIPPING_RULE)
        >>> speaker.speak(r, backoffs=1)
        >>> said[0].kind.value, said[0].text.split(" (")[0]
        ('backoff', 'GradGuard: step 7: LR backoff #1')
    """

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        #: where the notices go (default: :func:`log_notice`)
        self.sink: NoticeSink = log_notice
        self.reset()

    def reset(self) -> None:
        """A fresh run: the next backoff is announced."""
        self._last_backoff = -NOTICE_EVERY
        self._held = 0

    @staticmethod
    def has_news(r: StepReport) -> bool:
        """Whether step ``r`` has anything to say (the usual step has not: one test)."""
        return bool(r.backoff or r.rollback or r.halt or r.diagnosis_event
                    or r.diagnosis is not None or not r.params_finite)

    def speak(self, r: StepReport, *, first_nonfinite: bool = False, resumed: bool = False,
              backoffs: int = 0, causes: Sequence[Cause] = (), snapshot_step: int | None = None,
              streak: int = 0, halt_text: str = "") -> None:
        """Say what step ``r`` did.

        Args:
            r: The step's report.
            first_nonfinite: ``r`` is the run's first non-finite step.
            resumed: The run was resumed from a checkpoint (the first-step message says so).
            backoffs: The run's LR backoffs, this step's included.
            causes: The ranked causes diagnosed so far (the backoff notice names the first).
            snapshot_step: The step of the snapshot a rollback restored.
            streak: The non-finite streak (the rollback notice counts it).
            halt_text: Why training halts (with ``r.halt``).
        """
        if not self.has_news(r):
            return  # the usual step: nothing to say
        s, out = self.settings, []
        step_causes = list(r.causes or ())
        if r.diagnosis is not None and first_nonfinite:
            msg = nonfinite_message(r.diagnosis, step_causes, resumed=resumed,
                                    halt_after=s.halt_after)
            out.append(Notice(NoticeKind.NONFINITE, r.step, msg,
                              "**first non-finite step**\n\n" + msg, logging.WARNING,
                              s.verbose))
        elif r.diagnosis_event == "preflight" and step_causes:
            msg = preflight_message(r.step, step_causes)
            out.append(Notice(NoticeKind.PREFLIGHT, r.step, msg, "**pre-flight**\n\n" + msg,
                              logging.WARNING, s.verbose))
        elif r.diagnosis_event == "backoff" and step_causes:
            out.append(Notice(NoticeKind.DIAGNOSIS, r.step, "",
                              f"**diagnosis at the first backoff** (step {r.step})\n\n"
                              + causes_markdown(step_causes)))
        if r.backoff:
            out.extend(self._backoff(r, backoffs, causes))
        if not r.params_finite:
            msg = nonfinite_weights_message(r.step, snapshot_step if r.rollback else None)
            out.append(Notice(NoticeKind.NONFINITE_WEIGHTS, r.step, msg, msg, logging.WARNING))
        elif r.rollback:
            msg = rollback_message(snapshot_step, streak)
            out.append(Notice(NoticeKind.ROLLBACK, r.step, msg, msg, logging.WARNING))
        if r.halt:
            msg = f"GradGuard halted training: {halt_text}"
            out.append(Notice(NoticeKind.HALT, r.step, msg, f"{HALT_MARKER} — {msg}",
                              logging.ERROR))
        for notice in out:
            self.sink(notice)

    def _backoff(self, r: StepReport, number: int, causes: Sequence[Cause]) -> list[Notice]:
        """The backoff notice, unless one was given less than NOTICE_EVERY steps ago."""
        if r.step - self._last_backoff < NOTICE_EVERY:
            self._held += 1
            return []
        msg = backoff_notice(r.step, number, r.reason, r.lr_scale, self.settings,
                             held=self._held, cause=causes[0].cause if causes else None)
        why = reason_text(r.reason, self.settings) if r.reason is not None else ""
        self._last_backoff, self._held = r.step, 0
        return [Notice(NoticeKind.BACKOFF, r.step, msg,
                       f"**LR backoff #{number}** (step {r.step}): {why}; LR now "
                       f"x{r.lr_scale:.2g} of the schedule", logging.INFO, self.settings.verbose)]
