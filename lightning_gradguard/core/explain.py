"""The guard's explanations: where a non-finite step came from, its ranked causes, the halt.

:class:`Explainer` is the diagnosis glue of :class:`~lightning_gradguard.core.guard.GuardCore`,
called from its apply stage with what the step already measured:

* at the first step, the pre-flight evidence: the per-tensor gradient norms and the weight
  norms come with the step's single host read (:meth:`Explainer.requests` names them);
* on a non-finite step, :meth:`Explainer.nonfinite`: which parameters are non-finite and
  whether the weights are (one more host read, on that step only);
* on the events worth a diagnosis (the first backoff, the first non-finite step, the halt),
  the ranked causes (:meth:`Explainer.explain`; the rules are pure functions in
  :mod:`~lightning_gradguard.core.causes`);
* the halt's facts and message, from structured values (:meth:`Explainer.halt_facts`).

A spike that clipping contains is not diagnosed. Nothing here changes gradients, weights or
the LR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch import Tensor

from lightning_gradguard.core._host import to_host
from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core.decide import Decision
from lightning_gradguard.core.diagnosis import Cause, Diagnosis, Diagnostician, diagnose
from lightning_gradguard.core.measure import Gradients, Measurement, Meter, Request
from lightning_gradguard.core.messages import causes_text
from lightning_gradguard.core.streaks import Streaks

if TYPE_CHECKING:
    from lightning_gradguard.core.guard import GuardCounters

__all__ = ["Explained", "Explainer"]


class Explainer(Stateful):
    """What a guard says about why: the first non-finite step, ranked causes, the halt.

    Its state is declared (:class:`~lightning_gradguard.core._stateful.Stateful`): the first
    non-finite step and its diagnosis; with a diagnostician, the diagnostician and its
    findings too (a state saved without one loads them fresh).

    Args:
        diagnostician: The cause diagnosis (``None``: without ``diagnose``, or without a
            module); it starts probing the next forward pass now.
    """

    def __init__(self, diagnostician: Diagnostician | None) -> None:
        super().__init__()
        #: the cause diagnosis (``None``: only the first non-finite step is explained)
        self.diagnostician = diagnostician
        if diagnostician is not None:
            diagnostician.watch_forward()
        self._weight_names: list[tuple[str, int]] = []
        #: the first non-finite step of the run and its diagnosis
        self.first_nonfinite_step: int | None
        self.first_diagnosis: Diagnosis | None
        self._add_state("first_nonfinite_step", None)
        self._add_state("first_diagnosis", None, save=_diagnosis_to_state,
                        load=_diagnosis_from_state)
        #: the pre-flight evidence has been read (or the first step could not give it)
        self.preflight_done = False
        #: the explosion events already diagnosed (each is diagnosed at its first step)
        self.diagnosed_events: set[str] = set()
        #: the ranked causes of the last diagnosis, most likely first
        self.causes: tuple[Cause, ...] = ()
        if diagnostician is not None:  # the findings: saved with a diagnostician only, and
            # a state saved without one loads them fresh
            self._add_child("diagnostician", diagnostician, optional=True)
            self._add_state("preflight_done", False, optional=True)
            self._add_state("diagnosed_events", set(), save=sorted, load=set, optional=True)
            self._add_state("causes", (), save=lambda cs: [asdict(c) for c in cs],
                            load=lambda cs: tuple(Cause(**c) for c in cs), optional=True)

    # ------------------------------------------------------------------ the step
    def requests(self) -> dict[str, Request]:
        """What this step's single host read should answer: the pre-flight evidence.

        Empty except before the pre-flight evidence is read: then the per-tensor gradient
        norms (``"per_tensor"``) and the weights' norms (``"weight_norms"``).
        """
        if self.diagnostician is None or self.preflight_done:
            return {}
        self._weight_names, weights = self.diagnostician.weight_norm_request()
        if weights is None:
            return {}
        return {"per_tensor": _per_tensor, "weight_norms": weights}

    def nonfinite(self, m: Measurement, grads: Gradients | None, names: Sequence[str],
                  params: Sequence[torch.nn.Parameter], meter: Meter, *,
                  growth_before: bool, lr_scale: float,
                  first_step: bool) -> tuple[Diagnosis, list[float] | None]:
        """Which parameters are non-finite (one more host read: first and last bad step).

        The same read tells whether the weights themselves are finite. The first diagnosis
        of the run is also kept as :attr:`first_diagnosis`.

        Returns:
            The diagnosis, and the per-tensor norms read (``None``: none).
        """
        per_tensor = grads.per_tensor if grads is not None else None
        weights = [p.detach() for p in params if p.numel()]
        weights_finite: bool | None = None
        norms: list[float] | None = None
        if per_tensor is not None and weights:
            w_total = meter.total(weights, per_tensor.device)
            values = to_host(torch.cat([per_tensor.float(), w_total.reshape(1).float()]))
            norms, weights_finite = values[:-1], math.isfinite(values[-1])
        elif per_tensor is not None:
            norms = to_host(per_tensor)
        with_grad = _with_grad(names, params)
        diagnosis = diagnose(m.step, with_grad, norms or [], loss=m.loss,
                             growth_before=growth_before, lr_scale=lr_scale)
        if weights_finite is not None:
            diagnosis = replace(diagnosis, weights_finite=weights_finite, first_step=first_step)
        if self.first_nonfinite_step is None:
            self.first_nonfinite_step = m.step
            self.first_diagnosis = diagnosis
        return diagnosis, norms

    def explain(self, m: Measurement, d: Decision, grads: Gradients | None,
                norms: list[float] | None, names: Callable[[], Sequence[str]], batch: Any, *,
                lr_backoffs: int) -> tuple[tuple[Cause, ...] | None, str | None]:
        """Feed the diagnostician this step's host floats; rank causes on an event.

        No host read on a finite step, except the first (whose pre-flight evidence came with
        the step's one read) and a first backoff (none: the step-0 evidence and the history
        are already on the host). A spike alone is not diagnosed: clipping contains it.

        Args:
            m: The step's measurement.
            d: The step's decision.
            grads: The gradients in hand (their host vectors read with the measurement).
            norms: The per-tensor norms read by :meth:`nonfinite` (``None``: not read).
            names: Gives the names of the parameters that have a gradient, in order (called
                only at the first step and on an event: no cost on the usual step).
            batch: The step's batch (read for NaN/Inf on a non-finite step or a halt only).
            lr_backoffs: The backoffs before this step.

        Returns:
            This step's ranked causes and the event they answer (``(None, None)``: none).
        """
        doc = self.diagnostician
        if doc is None or m.empty:
            return None, None
        causes: list[Cause] | None = None
        event: str | None = None
        if not self.preflight_done:
            doc.finish_probe()  # the forward is over: its hooks go, read or not
            self.preflight_done = True
            host = grads.host if grads is not None else {}
            per = host.get("per_tensor")
            named = names() if per is not None else []
            if m.finite and per is not None and len(per) == len(named):
                weights = {n: (v, k) for (n, k), v in
                           zip(self._weight_names, host.get("weight_norms", []), strict=False)}
                causes = doc.preflight(dict(zip(named, per, strict=True)), m.loss,
                                       step=m.step, weight_norms=weights or None)
                if causes:
                    doc.causes = [c.to_dict() for c in causes]
                    event = "preflight"
        if doc.last_step < m.step:
            doc.observe(m.step, m.loss, m.grad_norm)
        if d.halt:
            event = "halt"
        elif d.path == "nonfinite" and "nonfinite" not in self.diagnosed_events:
            event = "nonfinite"
        elif d.backoff and lr_backoffs == 0 and "backoff" not in self.diagnosed_events:
            event = "backoff"
        elif event is None:  # a spike alone is not diagnosed: clipping contains it
            return None, None
        if event != "preflight":
            self.diagnosed_events.add(event)
            named = names() if norms is not None else []
            per_tensor = (dict(zip(named, norms, strict=False)) if norms is not None
                          and len(norms) == len(named) else None)
            before = doc.causes
            causes = doc.diagnose(event, per_tensor, m.loss,  # type: ignore[arg-type]
                                  batch if event in ("nonfinite", "halt") else None)
            if not causes and before:
                # a later event with no evidence does not erase an earlier finding (the
                # summary and the halt message keep it; this step's report has none)
                doc.causes = before
                return (), event
        self.causes = tuple(causes or ())
        return self.causes, event

    # ------------------------------------------------------------------ the halt
    def halt_facts(self, counters: GuardCounters, streaks: Streaks, *, end: int,
                   lr_scale: float, amp_halt_after: int,
                   last_diagnosis: Diagnosis | None) -> str:
        """Why training should stop, without the ranked causes (empty unless halted).

        Args:
            counters: The guard's counters.
            streaks: Its streaks.
            end: The step of the halt.
            lr_scale: The LR scale reached.
            amp_halt_after: The GradScaler streak that halts.
            last_diagnosis: The halting step's diagnosis (for a GradScaler halt).
        """
        if not counters.halted:
            return ""
        if streaks.amp >= amp_halt_after:
            parts = [f"{streaks.amp} consecutive steps with finite loss and non-finite "
                     f"gradients under the GradScaler (steps {streaks.amp_start}..{end}); "
                     "it skipped each one and halved its loss scale each time, so these are "
                     "not fp16 overflows but gradients that are non-finite at any scale "
                     "(sqrt or log at 0, division by zero in the backward, NaN reaching only "
                     "the backward)"]
            return self._with_diagnosis(parts, "last step", last_diagnosis)
        parts = [f"{streaks.nonfinite} consecutive non-finite steps (steps "
                 f"{streaks.nonfinite_start}..{end}); LR scale already reduced to "
                 f"{lr_scale:.3g}"]
        if (streaks.nonfinite == counters.nonfinite_steps
                or self.first_nonfinite_step == streaks.nonfinite_start):
            parts.append("non-finite at every step since the first one while the skipped "
                         "steps left the weights untouched: the data or the loss function "
                         "(log(0), division by zero, corrupt batches) is the likely cause, "
                         "unless the weights had already diverged")
        return self._with_diagnosis(parts, "first non-finite step", self.first_diagnosis)

    def _with_diagnosis(self, parts: list[str], label: str, diagnosis: Diagnosis | None) -> str:
        """``parts`` joined, then the labelled step's facts (the causes follow separately)."""
        if diagnosis is not None:
            parts.append(f"{label}: {diagnosis.message(ranked=bool(self.causes))}")
        return "; ".join(parts)

    def halt_message(self, facts: str) -> str:
        """``facts``, then (with a diagnosis) the ranked causes, most likely first."""
        if facts and self.causes:
            return facts + ".\nLikely causes, most likely first:\n" + causes_text(self.causes)
        return facts

    def summary(self) -> list[dict[str, str]]:
        """The last ranked diagnosis as ``[{"cause", "evidence", "remedy"}]``."""
        return self.diagnostician.to_dicts() if self.diagnostician is not None else []

def _diagnosis_to_state(diagnosis: Diagnosis | None) -> dict[str, Any] | None:
    return asdict(diagnosis) if diagnosis is not None else None


def _diagnosis_from_state(state: Mapping[str, Any] | None) -> Diagnosis | None:
    if state is None:
        return None
    return Diagnosis(**dict(state, nonfinite_params=tuple(state["nonfinite_params"])))


T = TypeVar("T")


class Explained(Generic[T]):
    """A read-only attribute of a guard, answered by its explainer (same name)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, guard: Any, owner: type | None = None) -> T:
        if guard is None:  # the class itself (documentation tools)
            return self  # type: ignore[return-value]
        return getattr(guard.explainer, self.name)  # type: ignore[no-any-return]


def _per_tensor(grads: Gradients, device: torch.device) -> Tensor | None:
    """The step's per-tensor gradient norms (a request answered with the step's read)."""
    return grads.per_tensor


def _with_grad(names: Sequence[str], params: Sequence[torch.nn.Parameter]) -> list[str]:
    """The names of the parameters that have a gradient."""
    return [n for n, p in zip(names, params, strict=True) if p.grad is not None]
