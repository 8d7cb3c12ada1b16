"""The framework-free guard: call it between ``backward()`` and ``optimizer.step()``.

.. code-block:: python

    guard = GuardCore(model, optimizer)
    for batch in loader:
        loss = model(batch).mean()
        loss.backward()
        report = guard.step(loss)        # measure, decide, clip / skip, scale the LR
        optimizer.step()
        optimizer.zero_grad()
        if report.halt:
            break

One step is three stages, each findable by name:

1. **measure** (:meth:`GuardCore.measure`, :mod:`~lightning_gradguard.core.measure`): one
   fused read of the total and per-tensor gradient norms, and every other value the step
   needs (loss, the clip policy's unit-wise total, and what the components ask for by name:
   the weights' norm on snapshot steps and for the update control, the pre-flight evidence),
   read to the host in one transfer; it changes no state and writes no gradient (a
   unit-wise policy, AGC, gives its units' factors here: the clipped total they give is
   part of the read, and the apply stage multiplies the gradients by them);
2. **decide** (:func:`~lightning_gradguard.core.decide.decide`): a pure function of that
   measurement and the guard's state; its module docstring is the decision table, one
   function per row;
3. **apply** (:meth:`GuardCore.apply`): the only place that clips, skips, backs off,
   snapshots, rolls back, scales the LR and hands the update control its values; the
   :class:`StepReport` is built there. The explanations (first non-finite step, ranked
   causes, the halt) come from :class:`~lightning_gradguard.core.explain.Explainer`.

The optimizer-specific update control (the plain-SGD update cap of ``max_update_ratio``)
lives in :mod:`~lightning_gradguard.core.update_cap`, chosen once from the optimizer.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core.backoff import LRBackoff, LRScaler
from lightning_gradguard.core.clip import scale_grads_, skip_step_
from lightning_gradguard.core.decide import Action, Decision, GuardState, Reason, decide
from lightning_gradguard.core.diagnosis import Cause, Diagnosis, Diagnostician
from lightning_gradguard.core.explain import Explained, Explainer
from lightning_gradguard.core.growth import GrowthDetector
from lightning_gradguard.core.guard_state import (
    STATE_VERSION,
    PolicyState,
    check_version,
    counters_from_state,
    fresh_attempt,
    streaks_from_state,
)
from lightning_gradguard.core.measure import Gradients, Measurement, Meter, Request
from lightning_gradguard.core.norms import NormReducer
from lightning_gradguard.core.notices import Speaker
from lightning_gradguard.core.optim import group_layout, named_params
from lightning_gradguard.core.policies import ClipPolicy
from lightning_gradguard.core.progress import LossTrend
from lightning_gradguard.core.report import GuardCounters, StepListener, StepReport
from lightning_gradguard.core.rollback import LastGood
from lightning_gradguard.core.settings import GuardSettings
from lightning_gradguard.core.snapshot import Snapshot
from lightning_gradguard.core.streaks import Streaks
from lightning_gradguard.core.update_cap import UpdateControl, make_update_control

__all__ = ["STATE_VERSION", "Action", "GuardCore", "GuardCounters", "GuardSettings", "Reason",
           "StepListener", "StepReport"]



@friendly_kwargs
class GuardCore(Stateful):
    """Gradient guard for one optimizer, usable in any training loop.

    Args:
        model: The module (enables names in diagnoses and rollback) or an iterable of
            parameters / ``(name, parameter)`` pairs.
        optimizer: The optimizer whose step is guarded (needed for LR backoff and rollback;
            its parameters are the ones watched).
        settings: A :class:`GuardSettings`; keyword arguments build one when omitted.
        reducer: All-reduce hook for sharded gradients (see
            :class:`~lightning_gradguard.core.norms.NormReducer`).
        **kwargs: Fields of :class:`GuardSettings`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> guard = GuardCore(model, opt)
        >>> model(torch.ones(2, 4)).sum().backward()
        >>> report = guard.step()
        >>> report.action, report.finite
        (<Action.NONE: 'none'>, True)
        >>> _ = model.weight.grad.fill_(float("nan"))
        >>> guard.step().action                      # a true skip: grads cleared
        <Action.SKIP: 'skip'>
        >>> model.weight.grad is None
        True
    """

    #: the keyword settings ``**kwargs`` passes on to :class:`GuardSettings`
    _MORE_ARGUMENTS = tuple(inspect.signature(GuardSettings).parameters)

    def __init__(
        self,
        model: torch.nn.Module | Iterable[Any],
        optimizer: Optimizer | None = None,
        settings: GuardSettings | None = None,
        *,
        reducer: NormReducer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if settings is not None and kwargs:
            raise TypeError("pass either `settings` or keyword settings, not both")
        self.settings = s = settings if settings is not None else GuardSettings(**kwargs)
        self.module = model if isinstance(model, torch.nn.Module) else None
        self.optimizer = optimizer
        self.names, self.params = named_params(model, optimizer)
        self._layout = group_layout(optimizer)
        self.reducer = reducer
        self.meter = Meter(self.params, s.norm_type, reducer)
        self.policy: ClipPolicy = copy.deepcopy(s.policy)
        # the state, each part declared once (saved, loaded and reset by Stateful): the
        # policy's (with its type), the LR backoff, growth, update control, loss trend, the
        # run's counts, the explainer and, with rollback, the last-good snapshot
        self._add_child("policy", PolicyState(self.policy))
        self.backoff = LRBackoff(s.backoff_factor, s.recovery_steps, s.min_lr_scale)
        self.growth = GrowthDetector(max(1, s.growth_patience), s.growth_min_rise)
        self.update_control: UpdateControl = make_update_control(
            optimizer, s.max_update_ratio, has_params=bool(self.params))
        self._add_child("backoff", self.backoff)
        self._add_child("growth", self.growth)
        self._add_child("update_control", self.update_control)
        #: the loss trend: a run whose loss keeps falling is not backed off for spikes
        self.loss_trend = LossTrend()
        self._add_child("loss_trend", self.loss_trend)
        #: the counts of the run (reset by :meth:`reset`; a halted run resumes as a fresh
        #: attempt, see :meth:`load_state_dict`)
        self.counters: GuardCounters
        #: the non-finite and GradScaler streaks
        self.streaks: Streaks
        #: steps of the spikes (and cap hits) in the window that count toward a backoff
        self.spike_steps: tuple[int, ...]
        self._add_state("counters", GuardCounters(), save=asdict, load=counters_from_state)
        self._add_state("streaks", Streaks(), save=asdict, load=streaks_from_state)
        self._add_state("spike_steps", (), save=list, load=tuple)
        #: the last-good snapshot and its schedule (``None`` without ``rollback``)
        self.last_good = LastGood(self.module, s.snapshot_every) if s.rollback else None
        if self.last_good is not None:  # a state saved without rollback loads it empty
            self._add_child("snapshot", self.last_good.snapshot, optional=True)
        self._lr = LRScaler(optimizer) if optimizer is not None else None
        # sharded parameters (DTensor, FSDP1's FlatParameter) hold only a local shard: the
        # per-layer evidence would be wrong, so no cause diagnosis there
        plain = all(type(p) in (torch.nn.Parameter, torch.Tensor) for p in self.params)
        #: the explanations: the first non-finite step, ranked causes (with ``diagnose``
        #: and a module: the diagnostician, built now, probes the next forward pass), the halt
        self.explainer = Explainer(
            Diagnostician(self.module, optimizer, preflight=s.preflight)
            if s.diagnose and self.module is not None and plain else None)
        self._add_child("explainer", self.explainer)
        #: called after every step with its measurement, decision and report (e.g. a cause
        #: diagnosis that looks at the first steps or the first backoff)
        self.listeners: list[StepListener] = []
        #: what the guard says about a step (its ``sink``: the ``lightning_gradguard`` logger
        #: by default; the callback adds TensorBoard text), under ``verbose``
        self.speaker = Speaker(s)
        self._reset_run()

    def _reset_run(self) -> None:
        """What is not state: the last report, the resume bookkeeping, the speaker."""
        self.last_report: StepReport | None = None
        #: ``counters.steps`` when this run (or resume) started
        self._steps_at_start = 0
        #: the state was loaded from a checkpoint
        self.resumed = False
        #: :meth:`stop` was called: every further step is skipped
        self.stopped = False
        self.speaker.reset()

    # ------------------------------------------------------------------ the step
    def step(self, loss: Tensor | float | None = None, *, amp_overflow: bool = False,
             snapshot_extra: Sequence[Optimizer] = (), step: int | None = None,
             batch: Any = None) -> StepReport:
        """Guard one optimizer step; call after ``backward()``, before ``optimizer.step()``.

        Args:
            loss: The step's loss (optional): a non-finite loss is treated as a non-finite
                step, and its value is reported.
            amp_overflow: The caller knows a GradScaler will skip this step if its
                gradients are non-finite: then they count as ``amp_overflow_steps`` and the
                gradients are left for the scaler.
            snapshot_extra: Further optimizers to include in rollback snapshots.
            step: The caller's step number for reports and messages (e.g. Lightning's
                ``global_step``); default: the guard's own 1-based count.
            batch: The step's batch (optional): with ``diagnose``, read for NaN/Inf on a
                non-finite step only (the ``data_nonfinite`` cause). Any kind of batch
                (tensors in tuples, lists, namedtuples, mappings, dataclasses or objects;
                sparse and nested tensors); under gradient accumulation pass every
                micro-batch of the step as a
                :class:`~lightning_gradguard.core.evidence.MicroBatches`.

        Returns:
            A :class:`StepReport`.
        """
        if self.stopped:
            return self._held(step)
        self.counters.steps += 1
        step = self.counters.steps if step is None else step
        self.follow_optimizer()
        measurement, grads = self.measure(loss, amp_overflow=amp_overflow, step=step)
        decision = decide(measurement, self.state(measurement), self.settings)
        return self.apply(measurement, decision, grads, snapshot_extra, batch=batch)

    def stop(self) -> None:
        """The run is over: every further :meth:`step` is skipped, the weights stay as they are.

        For a caller that cannot end the run at once (Lightning's ``min_steps`` keeps a halted
        run going). Held steps are not counted; :meth:`reset` or :meth:`load_state_dict`
        starts again.

        Example:
            >>> p = torch.nn.Parameter(torch.ones(2))
            >>> guard = GuardCore([p])
            >>> guard.stop()
            >>> p.grad = torch.ones(2)
            >>> guard.step().action, p.grad, guard.counters.steps
            (<Action.SKIP: 'skip'>, None, 0)
        """
        self.stopped = True

    def _held(self, step: int | None) -> StepReport:
        """A step after :meth:`stop`: the gradients cleared, nothing measured or counted."""
        skip_step_(self.params)
        nan = float("nan")
        return StepReport(step=self.counters.steps if step is None else step, grad_norm=nan,
                          grad_norm_clipped=nan, threshold=nan, finite=True,
                          action=Action.SKIP, lr_scale=self.lr_scale,
                          halt=self.counters.halted)

    def end_forward(self) -> None:
        """The step's forward pass is over: the diagnosis' one-shot forward probe ends now.

        Call it before ``backward()`` when the forward did not run through the module itself
        (the probe otherwise ends at the first :meth:`step`). No cost after the first step.
        """
        doc = self.explainer.diagnostician
        if doc is not None and not self.explainer.preflight_done:
            doc.finish_probe()

    def follow_optimizer(self) -> bool:
        """Watch the parameters the optimizer holds now (e.g. after ``add_param_group``).

        Called by :meth:`step` (a comparison of the group sizes: no cost when nothing
        changed). When the optimizer's param groups changed, the watched parameters are
        rebuilt, and the last-good snapshot (whose optimizer state no longer matches) is
        dropped and taken again at the next finite step.

        Returns:
            Whether the parameters changed.
        """
        layout = group_layout(self.optimizer)
        if layout == self._layout:
            return False
        self._layout = layout
        source: Any = (self.module if self.module is not None
                       else list(zip(self.names, self.params, strict=True)))
        self.names, self.params = named_params(source, self.optimizer)
        self.meter = Meter(self.params, self.settings.norm_type, self.reducer)
        if self.last_good is not None:
            self.last_good.clear()
        return True

    def measure(self, loss: Tensor | float | None = None, *, amp_overflow: bool = False,
                step: int | None = None) -> tuple[Measurement, Gradients | None]:
        """Stage 1: the step's :class:`~lightning_gradguard.core.measure.Measurement`.

        One host read, which also answers what the components ask for by name: the weights'
        norm (the update control's schedule, and whether they are finite on a rollback
        snapshot step) and, with ``diagnose``, the pre-flight evidence at the first step.
        The update control's limit is previewed from it (the apply stage hands the values
        over). A unit-wise clip policy gives its units' factors here, without writing the
        gradients (the clipped total they give is part of the read; :meth:`apply` clips).
        Counts the step as already started (:meth:`step` counts it first).
        """
        c = self.counters
        count = c.steps
        requests: dict[str, Request] = dict(self.explainer.requests())
        if self.last_good is not None and self.last_good.wanted(count):
            requests["params_norm"] = self.last_good.request(self.meter)
        # counted in finite steps, so that a skipped step leaves no trace in the schedule
        if self.update_control.wants_weight_norm(count - c.nonfinite_steps
                                                 - c.amp_overflow_steps):
            requests["weight_norm"] = self.meter.weights_norm
        m, grads = self.meter.measure(count if step is None else step, loss, self.policy,
                                      requests, names=self.names, amp_overflow=amp_overflow)
        if grads is None:
            return m, grads
        params, weights = grads.host.get("params_norm"), grads.host.get("weight_norm")
        return m._replace(
            params_finite=None if params is None else math.isfinite(params[0]),
            limit=self.update_control.preview(None if weights is None else weights[0],
                                              m.grad_norm, self.lr_scale)), grads

    def state(self, measurement: Measurement) -> GuardState:
        """The guard's state as :func:`~lightning_gradguard.core.decide.decide` sees it."""
        return GuardState(streaks=self.streaks, spike_steps=self.spike_steps,
                          diagnosed=self.explainer.first_nonfinite_step is not None,
                          growth_fires=self.growth.fires(measurement.grad_norm),
                          lr_scale=self.backoff.scale,
                          loss_improving=self.loss_trend.improving, clock=self.counters.steps)

    def apply(self, m: Measurement, d: Decision, grads: Gradients | None,
              snapshot_extra: Sequence[Optimizer] = (), *, batch: Any = None) -> StepReport:
        """Stage 3: carry out ``d``; the only place that changes gradients, LR or weights."""
        if grads is not None:  # the update control takes the values its limit was previewed on
            weights = grads.host.get("weight_norm")
            self.update_control.take(None if weights is None else weights[0], m.grad_norm,
                                     self.lr_scale)
        if d.path in ("nonfinite", "amp_overflow"):
            self.restore_lr()
        explainer, c = self.explainer, self.counters
        host_norms: list[float] | None = None
        diagnosis = None
        if d.diagnose:
            diagnosis, host_norms = explainer.nonfinite(
                m, grads, self.names, self.params, self.meter,
                growth_before=c.growth_events > 0, lr_scale=self.backoff.scale,
                first_step=c.steps - self._steps_at_start == 1)
        causes, event = explainer.explain(m, d, grads, host_norms, self._names_with_grad,
                                          batch, lr_backoffs=c.lr_backoffs)
        if d.observe:  # a skipped step never enters the statistics, even with a finite norm
            self.policy.observe_value(m.grad_norm, m.threshold)
            if self.settings.growth_patience > 0:
                self.growth.update(m.grad_norm)
            if d.hold_growth:
                self.growth.hold()
            self.loss_trend.update(m.loss)
        if d.skip:
            skip_step_(self.params)
        if grads is not None:
            if grads.unit_scales and not d.skip:  # the unit-wise clip, from measured factors
                self.meter.clip_units_(grads)
            for coef in d.scales:
                scale_grads_(grads.grads, coef, grads.groups)
        if d.backoff:
            self.backoff.backoff()
        rolled_back = d.rollback and self.restore_snapshot(snapshot_extra)
        if d.snapshot and self.last_good is not None:
            self.last_good.capture(self._optimizers(snapshot_extra), m.step)
        lr_scale = self.backoff.scale
        if d.path == "finite":
            lr_scale = self._apply_lr()
        elif d.path == "nonfinite_weights":
            self.restore_lr()
        if d.recover:
            self.backoff.recover()  # takes effect from the next update on
        self.counters.record(d)
        self.streaks, self.spike_steps = d.streaks, d.spike_steps
        self.last_report = StepReport(
            step=m.step, grad_norm=m.grad_norm, grad_norm_clipped=d.clipped_norm,
            threshold=d.threshold, finite=m.finite, action=d.action, spike=d.spike,
            growth=d.growth, backoff=d.backoff, lr_scale=lr_scale, rollback=rolled_back,
            params_finite=d.path != "nonfinite_weights", halt=d.halt, loss=m.loss,
            diagnosis=diagnosis, causes=causes, diagnosis_event=event, reason=d.reason)
        r = self.last_report
        if Speaker.has_news(r):
            self.speaker.speak(
                r, first_nonfinite=(diagnosis is not None
                                    and r.step == explainer.first_nonfinite_step),
                resumed=self.resumed, backoffs=self.counters.lr_backoffs,
                causes=explainer.causes,
                snapshot_step=self.snapshot.step if self.snapshot is not None else None,
                streak=self.streaks.nonfinite, halt_text=self.halt_message if d.halt else "")
        for listener in self.listeners:
            listener(m, d, r)
        return self.last_report

    # ------------------------------------------------------------------ LR and snapshots
    @property
    def lr_scale(self) -> float:
        """The LR scale the next update gets (1.0 without ``lr_backoff``)."""
        return self.backoff.scale if self.settings.lr_backoff else 1.0

    def _apply_lr(self) -> float:
        scale = self.lr_scale
        if self._lr is not None:
            self._lr.apply(scale)
        return scale

    def restore_lr(self) -> None:
        """Put the scheduled learning rates back now (idempotent; e.g. at the end of fit)."""
        if self._lr is not None:
            self._lr.restore()

    @property
    def snapshot(self) -> Snapshot | None:
        """The last-good snapshot (``None`` without ``rollback``)."""
        return self.last_good.snapshot if self.last_good is not None else None

    @property
    def _weight_norm(self) -> float | None:
        """The update control's last weight-norm measurement (``None``: none usable)."""
        return getattr(self.update_control, "weight_norm", None)

    def _optimizers(self, extra: Sequence[Optimizer]) -> list[Optimizer]:
        return ([self.optimizer] if self.optimizer else []) + list(extra)

    def restore_snapshot(self, snapshot_extra: Sequence[Optimizer] = ()) -> bool:
        """Restore the last-good snapshot (with ``rollback``), if there is one.

        Args:
            snapshot_extra: The further optimizers passed to :meth:`step`.

        Returns:
            Whether a snapshot was restored (counted in ``rollbacks``).
        """
        if self.last_good is None or not self.last_good.snapshot.available:
            return False
        # the scheduled LRs first: loading the optimizer's state replaces its group dicts, and
        # an LR scale still applied to the old ones could then never be put back
        self.restore_lr()
        if not self.last_good.restore(self._optimizers(snapshot_extra)):
            return False
        self.counters.rollbacks += 1
        return True

    def _names_with_grad(self) -> list[str]:
        return [n for n, p in zip(self.names, self.params, strict=True) if p.grad is not None]

    # ------------------------------------------------------------------ reporting
    # answered by the explainer (see :class:`~lightning_gradguard.core.explain.Explainer`):
    # the diagnostician (``None`` without ``diagnose`` or a module), the ranked causes of the
    # last diagnosis, whether the pre-flight evidence was read, the events diagnosed, and
    # the run's first non-finite step and its diagnosis
    diagnostician: Explained[Diagnostician | None] = Explained()
    causes: Explained[tuple[Cause, ...]] = Explained()
    preflight_done: Explained[bool] = Explained()
    diagnosed_events: Explained[set[str]] = Explained()
    first_nonfinite_step: Explained[int | None] = Explained()
    first_diagnosis: Explained[Diagnosis | None] = Explained()

    @property
    def halt_message(self) -> str:
        """Why training should stop (empty unless halted): step, parameters, likely causes.

        :attr:`halt_facts`, then (with a diagnosis) the ranked causes, most likely first.
        """
        return self.explainer.halt_message(self.halt_facts)

    @property
    def halt_facts(self) -> str:
        """Why training should stop, without the ranked causes (empty unless halted)."""
        last = self.last_report
        return self.explainer.halt_facts(
            self.counters, self.streaks, end=last.step if last else self.counters.steps,
            lr_scale=self.backoff.scale, amp_halt_after=self.settings.amp_halt_after,
            last_diagnosis=last.diagnosis if last else None)

    def summary(self) -> dict[str, Any]:
        """The counters (:class:`GuardCounters`), ``lr_scale`` and ``diagnosis`` as a dict.

        ``diagnosis`` is the last ranked diagnosis as ``[{"cause", "evidence", "remedy"}]``,
        most likely first (empty when nothing is wrong, or without ``diagnose``).

        Example:
            >>> sorted(GuardCore([torch.nn.Parameter(torch.ones(1))]).summary())[:4]
            ['amp_overflow_steps', 'clipped_steps', 'diagnosis', 'growth_events']
        """
        return {**asdict(self.counters), "lr_scale": self.backoff.scale,
                "diagnosis": self.explainer.summary()}

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Start over: every declared state and the run's bookkeeping.

        The declared state: statistics, LR backoff, update control, loss trend, counters,
        streaks, diagnoses and the last-good snapshot.
        """
        super().reset()
        self._reset_run()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (statistics, counters, backoff, snapshot).

        One layout, marked ``"version"`` (:data:`STATE_VERSION`); :meth:`load_state_dict`
        refuses another.
        """
        return {"version": STATE_VERSION, **super().state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        A state saved with another clip policy type restores everything but the policy's
        statistics (with a warning). A state saved at a halt is resumed as a fresh attempt:
        ``halted`` and the streaks are cleared.

        Raises:
            ValueError: The state is of another layout (its ``"version"`` is not
                :data:`STATE_VERSION`).
        """
        check_version(state_dict)
        super().load_state_dict(state_dict)
        self.counters, self.streaks = fresh_attempt(self.counters, self.streaks)
        self._steps_at_start = self.counters.steps
        self.resumed = True
        self.stopped = False

    def close(self) -> None:
        """Restore learning rates and remove optimizer hooks."""
        if self._lr is not None:
            self._lr.remove()
            self._lr = None
