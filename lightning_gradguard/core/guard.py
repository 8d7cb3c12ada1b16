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

Per step (one fused read of the gradients, one host synchronisation):

1. measure the total and per-tensor gradient norms (:mod:`~lightning_gradguard.core.norms`);
2. take the policy's threshold from the history *before* this step, then feed the norm to
   the statistics (non-finite: ignored; spike: clamped);
3. read ``[norm, threshold, growth, loss, ...]`` to the host in one transfer and decide:

   ============================  =========================================================
   situation                     action
   ============================  =========================================================
   non-finite gradient or loss   **skip** (gradients cleared: weights and optimizer state
                                 untouched), LR backoff, rollback after ``rollback_after``
                                 such steps in a row, halt after ``halt_after``
   non-finite under a GradScaler  nothing: the scaler skips it itself (``amp_overflow``);
                                 40 in a row (finite loss) halt, with ``halt_after`` > 0
   norm > threshold (spike)      **clip** to the threshold (one read-write pass)
   SGD update over               **clip** to ``max_update_ratio`` of the weight norm
   ``max_update_ratio``
   ``spike_patience`` spikes     LR backoff (with SGD, a spike counts only if its update
   or capped updates within      ``lr * ||g||`` would move the weights by more than
   ``spike_window`` steps        ``max_update_ratio / 10``: a smaller one is clipped but
                                 is no sign of too high an LR)
   sustained growth              LR backoff (:class:`~lightning_gradguard.core.growth.
                                 GrowthDetector`; with SGD, only once the update would
                                 move the weights by more than ``max_update_ratio / 10``)
   clean step                    LR scale recovers toward 1
   ============================  =========================================================
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_gradguard.core._host import to_host
from lightning_gradguard.core._validation import check_bool, check_int, check_number
from lightning_gradguard.core.backoff import LRBackoff, LRScaler
from lightning_gradguard.core.clip import clip_coef, scale_grads_, skip_step_
from lightning_gradguard.core.diagnosis import Diagnosis, diagnose
from lightning_gradguard.core.growth import GrowthDetector
from lightning_gradguard.core.norms import NormReducer, grad_norms, group_by_device_and_dtype
from lightning_gradguard.core.policies import ClipPolicy, ZScoreClip
from lightning_gradguard.core.snapshot import Snapshot

__all__ = ["Action", "GuardCore", "GuardSettings", "StepReport"]

_INF = float("inf")
_PLAIN = (torch.nn.Parameter, torch.Tensor)
#: The weight norm for ``max_update_ratio`` is measured on every step up to this one (counted
#: in finite steps: non-finite ones do not shift the schedule) ...
_TRUST_EVERY_STEP_UNTIL = 16
#: ... and on every this-many-th step after it.
_TRUST_EVERY = 8
#: With plain SGD, a spike counts toward ``spike_patience`` only if its whole update would
#: change the weights by more than ``max_update_ratio / _TRUST_FAR`` of their norm.
_TRUST_FAR = 10.0
#: Consecutive steps a GradScaler skipped (finite loss, non-finite gradients) after which they
#: are no longer its calibration: it halved its scale at each one, 2**-40 in all, so gradients
#: still non-finite are non-finite at any scale (e.g. sqrt or log at 0 in the backward). With
#: ``halt_after`` > 0 training halts there, with the diagnosis.
_AMP_STREAK_HALT = 40


class Action(str, Enum):
    """What the guard did to the step."""

    NONE = "none"
    CLIP = "clip"
    SKIP = "skip"
    AMP_SKIP = "amp_skip"


@dataclass
class GuardSettings:
    """Validated settings shared by :class:`GuardCore` and the Lightning callbacks.

    Args:
        clip: Threshold policy (default :class:`~lightning_gradguard.core.policies.ZScoreClip`).
        norm_type: Norm used for detection and clipping (2 or ``inf``, or any p > 0).
        skip_nonfinite: Skip steps with non-finite gradients or loss.
        lr_backoff: Enable learning-rate backoff.
        backoff_factor: LR scale multiplier per backoff, in (0, 1).
        recovery_steps: Clean steps to undo one backoff.
        min_lr_scale: Floor of the LR scale.
        spike_patience: Spikes within ``spike_window`` steps that trigger a backoff (0: never).
            Steps clipped by ``max_update_ratio`` count toward it like spikes. With
            ``torch.optim.SGD`` and ``max_update_ratio`` set, a spike counts only if its whole
            update ``lr * ||g||`` would change the weights by more than
            ``max_update_ratio / 10`` of their norm (momentum is not counted; an LR of 0
            never counts): at a comfortable LR a gradient spike is clipped, but it is no
            reason to lower the LR. With other optimizers, or ``max_update_ratio=None``,
            every spike counts.
        spike_window: Window (in optimizer steps) for ``spike_patience``.
        growth_patience: Consecutive rising norms that trigger a backoff (0: off). With
            ``torch.optim.SGD`` and ``max_update_ratio`` set, growth counts under the same
            condition as a spike (an update of more than ``max_update_ratio / 10`` of the
            weights, momentum not counted): a healthy run's norm may rise for a few steps
            while its updates are tiny, an explosion's updates are not. Until it counts the
            detector stays armed (a rise that goes on counts at its first large update) and
            nothing is recorded (``growth_events``, ``StepReport.growth``).
        growth_min_rise: Minimum relative rise that counts for ``growth_patience``.
        rollback: Keep a last-good snapshot and restore it when training cannot recover.
        snapshot_every: Steps between snapshots (with ``rollback``).
        rollback_after: Consecutive non-finite steps that trigger a rollback.
        halt_after: Consecutive non-finite steps that halt training (0: never). Under a
            GradScaler, steps it skips (finite loss, non-finite gradients) are its
            calibration and do not count; 40 of them in a row halt training too (unless
            ``halt_after`` is 0): the gradients are then non-finite at any loss scale.
        max_update_ratio: Largest relative weight change one SGD update may make: with a
            ``torch.optim.SGD`` optimizer the gradient is also clipped so that
            ``lr * ||g|| <= max_update_ratio * ||w||`` (``lr``: the largest group LR, times
            the backoff scale; momentum is not counted). This protects the very first steps,
            before any history exists, from a learning rate that is far too high; a step
            clipped by it counts toward an LR backoff like a spike. The weight
            norm is measured on the first 16 finite steps and every 8th finite step after
            (a skipped step does not shift the schedule), inside the step's single host
            read. ``None`` disables it; other optimizers (Adam, RMSprop,
            ...) normalise their updates and are not affected, nor is an SGD whose LR is a
            tensor on an accelerator (reading it would cost a host synchronisation).

    Raises:
        TypeError, ValueError: Naming the argument, what is allowed and what was received.

    Example:
        >>> GuardSettings(halt_after=-1)
        Traceback (most recent call last):
        ...
        ValueError: `halt_after` must be an int in [0, inf], got -1
    """

    clip: ClipPolicy | None = None
    norm_type: float = 2.0
    skip_nonfinite: bool = True
    lr_backoff: bool = True
    backoff_factor: float = 0.5
    recovery_steps: int = 200
    min_lr_scale: float = 1e-3
    spike_patience: int = 3
    spike_window: int = 50
    growth_patience: int = 5
    growth_min_rise: float = 0.05
    rollback: bool = False
    snapshot_every: int = 100
    rollback_after: int = 3
    halt_after: int = 25
    max_update_ratio: float | None = 0.1

    def __post_init__(self) -> None:
        if self.clip is None:
            self.clip = ZScoreClip()
        elif not isinstance(self.clip, ClipPolicy):
            raise TypeError(
                "`clip` must be a ClipPolicy (NoClip, FixedNormClip, ZScoreClip, "
                f"PercentileClip, AdaptiveGradClip) or None, got {self.clip!r}"
            )
        check_number("norm_type", self.norm_type, low=0.0, low_inclusive=False, allow_inf=True)
        check_bool("skip_nonfinite", self.skip_nonfinite)
        check_bool("lr_backoff", self.lr_backoff)
        check_number("backoff_factor", self.backoff_factor, low=0.0, high=1.0,
                     low_inclusive=False, high_inclusive=False)
        check_int("recovery_steps", self.recovery_steps, low=1)
        check_number("min_lr_scale", self.min_lr_scale, low=0.0, high=1.0, low_inclusive=False)
        check_int("spike_patience", self.spike_patience, low=0)
        check_int("spike_window", self.spike_window, low=1)
        check_int("growth_patience", self.growth_patience, low=0)
        check_number("growth_min_rise", self.growth_min_rise, low=0.0)
        check_bool("rollback", self.rollback)
        check_int("snapshot_every", self.snapshot_every, low=1)
        check_int("rollback_after", self.rollback_after, low=1)
        check_int("halt_after", self.halt_after, low=0)
        if self.max_update_ratio is not None:
            check_number("max_update_ratio", self.max_update_ratio, low=0.0,
                         low_inclusive=False)

    @property
    def policy(self) -> ClipPolicy:
        """The clip policy (never ``None`` after construction)."""
        assert self.clip is not None  # set in __post_init__
        return self.clip


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
        growth: Sustained growth detected at this step (with SGD and ``max_update_ratio``:
            only growth whose update would move the weights by more than
            ``max_update_ratio / 10``, the growth that counts; see ``growth_patience``).
        backoff: An LR backoff happened at this step.
        lr_scale: LR scale applied to this step's update.
        rollback: The last-good snapshot was restored at this step.
        params_finite: ``False`` when the weights, measured for a rollback snapshot, were
            non-finite although this step's gradients and loss were finite (e.g. an Inf
            weight behind a saturating activation): the step is skipped and the snapshot
            restored.
        halt: Training cannot recover: stop (see :attr:`GuardCore.halt_message`).
        loss: The loss passed to :meth:`GuardCore.step` (``None`` if not given).
        diagnosis: On the first non-finite step (and on halt), where it came from.
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


@dataclass
class _Counters:
    steps: int = 0
    nonfinite_steps: int = 0
    skipped_steps: int = 0
    spikes: int = 0
    clipped_steps: int = 0
    lr_backoffs: int = 0
    growth_events: int = 0
    rollbacks: int = 0
    amp_overflow_steps: int = 0
    nonfinite_streak: int = 0
    amp_streak: int = 0
    amp_streak_start: int | None = None
    halted: bool = False
    first_nonfinite_step: int | None = None
    streak_start: int | None = None
    spike_steps: list[int] = field(default_factory=list)


def _named_params(
    model: torch.nn.Module | Iterable[Any], optimizer: Optimizer | None
) -> tuple[list[str], list[torch.nn.Parameter]]:
    if isinstance(model, torch.nn.Module):
        # torch.compile wraps modules as ``_orig_mod``: report the user's names
        named = [(n.replace("_orig_mod.", ""), p) for n, p in model.named_parameters()]
    else:
        items = list(model)
        if items and isinstance(items[0], tuple):
            named = [(str(n), p) for n, p in items]
        else:
            named = [(f"param_{i}", p) for i, p in enumerate(items)]
    if optimizer is not None:
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        names_by_id = {id(p): n for n, p in named}
        ordered = [p for g in optimizer.param_groups for p in g["params"]]
        # keep model order (output layer last) for the parameters the optimizer updates
        named = [(n, p) for n, p in named if id(p) in in_opt]
        known = {id(p) for _, p in named}
        named += [(names_by_id.get(id(p), f"param_{i}"), p)
                  for i, p in enumerate(ordered) if id(p) not in known]
    return [n for n, _ in named], [p for _, p in named]


class GuardCore:
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

    def __init__(
        self,
        model: torch.nn.Module | Iterable[Any],
        optimizer: Optimizer | None = None,
        settings: GuardSettings | None = None,
        *,
        reducer: NormReducer | None = None,
        **kwargs: Any,
    ) -> None:
        if settings is not None and kwargs:
            raise TypeError("pass either `settings` or keyword settings, not both")
        self.settings = settings if settings is not None else GuardSettings(**kwargs)
        self.module = model if isinstance(model, torch.nn.Module) else None
        self.optimizer = optimizer
        self.names, self.params = _named_params(model, optimizer)
        self.reducer = reducer
        self.policy: ClipPolicy = copy.deepcopy(self.settings.policy)
        s = self.settings
        self.backoff = LRBackoff(s.backoff_factor, s.recovery_steps, s.min_lr_scale)
        self.growth = GrowthDetector(max(1, s.growth_patience), s.growth_min_rise)
        self.counters = _Counters()
        self.snapshot = Snapshot() if s.rollback else None
        self.first_diagnosis: Diagnosis | None = None
        self.last_report: StepReport | None = None
        self._lr = LRScaler(optimizer) if optimizer is not None else None
        self._weight_norm: float | None = None
        #: the parameters' (device, dtype) grouping, shared by their dense gradients; None
        #: for parameters that are not plain tensors (DTensor, FSDP1's FlatParameter)
        self._groups = (group_by_device_and_dtype(self.params)
                        if all(type(p) in _PLAIN for p in self.params) else None)
        self._trust = (s.max_update_ratio is not None and isinstance(optimizer, torch.optim.SGD)
                       and bool(self.params))

    # ------------------------------------------------------------------ decisions
    def step(self, loss: Tensor | float | None = None, *, amp_overflow: bool = False,
             snapshot_extra: Sequence[Optimizer] = (), step: int | None = None) -> StepReport:
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

        Returns:
            A :class:`StepReport`.
        """
        s = self.settings
        c = self.counters
        grads = [p.grad for p in self.params if p.grad is not None]
        c.steps += 1
        count = c.steps
        step = count if step is None else step
        if not grads:
            # nothing to measure (e.g. every grad cleared by another guard): keep statistics
            report = StepReport(step=step, grad_norm=0.0, grad_norm_clipped=0.0,
                                threshold=float("inf"), finite=True, action=Action.NONE,
                                lr_scale=self.backoff.scale)
            self.last_report = report
            return report
        device = grads[0].device if grads else None
        # every parameter has a gradient (the usual case): reuse the parameters' grouping
        groups = self._groups if len(grads) == len(self.params) else None
        try:
            norms = grad_norms(grads, s.norm_type, reducer=self.reducer, device=device,
                               groups=groups)
        except NotImplementedError:  # a sparse gradient: the general path from now on
            if groups is None:
                raise
            self._groups = groups = None
            norms = grad_norms(grads, s.norm_type, reducer=self.reducer, device=device)
        total = norms.total
        packed = [total.float()]
        unitwise = self.policy.unitwise and bool(grads)
        if unitwise:
            self.policy.clip_unitwise_(self.params, self.names)
            packed.append(grad_norms(grads, s.norm_type, reducer=self.reducer).total.float())
        loss_t: Tensor | None = None
        if isinstance(loss, Tensor):
            loss_t = loss.detach().reshape(()).to(device=total.device, dtype=torch.float32)
            packed.append(loss_t)
        take_snapshot = (self.snapshot is not None and self.module is not None
                         and count % s.snapshot_every == 1 % s.snapshot_every)
        if take_snapshot:
            assert self.module is not None
            # reduced like the gradients: every rank must agree on "the weights are finite"
            pn = grad_norms([p.detach() for p in self.module.parameters()], per_tensor=False,
                            reducer=self.reducer, device=total.device).total
            packed.append(pn.float())
        # counted in finite steps, so that a skipped step leaves no trace in the schedule
        n = count - c.nonfinite_steps - c.amp_overflow_steps
        measure_w = self._trust and (n <= _TRUST_EVERY_STEP_UNTIL or n % _TRUST_EVERY == 0)
        if measure_w:
            wn = grad_norms([p.detach() for p in self.params], s.norm_type, per_tensor=False,
                            groups=self._groups,
                            reducer=self.reducer, device=total.device).total
            packed.append(wn.float())
        host = to_host(torch.stack(packed))  # the one host synchronisation of the step

        it = iter(host)
        norm = next(it)
        clipped_norm = next(it) if unitwise else norm
        loss_v: float | None = (
            next(it) if loss_t is not None else (None if loss is None else float(loss))
        )
        params_finite = math.isfinite(next(it)) if take_snapshot else True
        if measure_w:
            wv = next(it)
            self._weight_norm = wv if math.isfinite(wv) and wv > 0.0 else None
        # judged by the statistics of the history before this step
        threshold = self.policy.threshold_value()
        finite = math.isfinite(norm) and (loss_v is None or math.isfinite(loss_v))

        if not finite:
            return self._nonfinite(step, norm, threshold, loss_v, norms.per_tensor, amp_overflow,
                                   snapshot_extra)
        c.nonfinite_streak = 0
        c.amp_streak = 0
        if not params_finite:
            return self._nonfinite_params(step, norm, threshold, loss_v, snapshot_extra)
        # a skipped step (non-finite gradients, loss or weights) never enters the statistics,
        # even when its gradient norm happens to be finite
        self.policy.observe_value(norm, threshold)
        grew = self.growth.update(norm) if s.growth_patience > 0 else False
        action = Action.NONE
        spike = norm > threshold
        backoff = False
        sgd_lr = self._sgd_lr()
        cap = self._update_cap(sgd_lr)
        # with SGD, a spike whose whole update would still change the weights by less than a
        # tenth of max_update_ratio (or not at all: LR 0) is clipped but is no sign of too
        # high an LR; without a cap every spike counts
        counts = sgd_lr is None or (sgd_lr > 0.0 and _TRUST_FAR * norm > cap)
        # the same for a rising norm: at a comfortable LR a healthy run's norm may rise for a
        # few steps in a row (leaving a plateau); growth is an explosion only once its
        # updates are large. Until then the detector stays armed, so a rise that goes on
        # counts at its first large update
        if grew and not counts:
            self.growth.hold()
            grew = False
        counted = False
        if spike:
            c.spikes += 1
            if counts:
                c.spike_steps.append(step)
                counted = True
            coef = clip_coef(norm, threshold)
            if coef < 1.0:
                scale_grads_(grads, coef, groups)
                clipped_norm = norm * coef
                action = Action.CLIP
        elif self.policy.unitwise and clipped_norm < norm * (1 - 1e-6):
            action = Action.CLIP
        if cap < clipped_norm:
            # too large an update for the weights (plain SGD): clipped, and counted toward an
            # LR backoff like a spike
            if not counted:
                c.spike_steps.append(step)
            coef = clip_coef(clipped_norm, cap)
            scale_grads_(grads, coef, groups)
            clipped_norm = clipped_norm * coef
            action = Action.CLIP
            threshold = min(threshold, cap)
        if action is Action.CLIP:
            c.clipped_steps += 1
        c.spike_steps = [t for t in c.spike_steps if t > step - s.spike_window]
        if grew:
            c.growth_events += 1
        if s.lr_backoff and (grew or (s.spike_patience > 0
                                      and len(c.spike_steps) >= s.spike_patience)):
            self._backoff()
            c.spike_steps.clear()
            backoff = True
        if take_snapshot and params_finite and self.snapshot is not None:
            assert self.module is not None
            self.snapshot.capture(self.module, self._optimizers(snapshot_extra), step)
        applied = self._apply_lr()
        if not (spike or backoff):
            self.backoff.recover()  # takes effect from the next update on
        report = StepReport(step=step, grad_norm=norm, grad_norm_clipped=clipped_norm,
                            threshold=threshold, finite=True, action=action, spike=spike,
                            growth=grew, backoff=backoff, lr_scale=applied, loss=loss_v)
        self.last_report = report
        return report

    def _sgd_lr(self) -> float | None:
        """The update's LR for ``max_update_ratio`` (largest group LR x backoff scale).

        ``None`` when there is no cap: not plain SGD, no weight norm measured yet, a
        non-finite LR, or a tensor LR on an accelerator (reading it would add a host
        synchronisation every step).
        """
        if not self._trust or self._weight_norm is None or self.settings.max_update_ratio is None:
            return None
        assert self.optimizer is not None
        lr = 0.0
        for g in self.optimizer.param_groups:
            glr = g.get("lr", 0.0)
            if isinstance(glr, Tensor) and glr.device.type != "cpu":
                return None
            lr = max(lr, float(glr))
        lr *= self.backoff.scale if self.settings.lr_backoff else 1.0
        return lr if math.isfinite(lr) and lr >= 0.0 else None

    def _update_cap(self, lr: float | None) -> float:
        """The gradient norm at which an SGD step with ``lr`` moves ``max_update_ratio`` of w.

        ``inf`` when there is no cap, or for an LR of 0 (the update moves nothing).
        """
        ratio, weight_norm = self.settings.max_update_ratio, self._weight_norm
        if lr is None or lr == 0.0 or ratio is None or weight_norm is None:
            return _INF
        return ratio * weight_norm / lr

    def _optimizers(self, extra: Sequence[Optimizer]) -> list[Optimizer]:
        return ([self.optimizer] if self.optimizer else []) + list(extra)

    def restore_snapshot(self, snapshot_extra: Sequence[Optimizer] = ()) -> bool:
        """Restore the last-good snapshot (with ``rollback``), if there is one.

        Args:
            snapshot_extra: The further optimizers passed to :meth:`step`.

        Returns:
            Whether a snapshot was restored (counters are the caller's business).
        """
        if self.snapshot is None or not self.snapshot.available or self.module is None:
            return False
        self.snapshot.restore(self.module, self._optimizers(snapshot_extra))
        return True

    def _backoff(self) -> None:
        self.backoff.backoff()
        self.counters.lr_backoffs += 1

    def _apply_lr(self) -> float:
        scale = self.backoff.scale if self.settings.lr_backoff else 1.0
        if self._lr is not None:
            self._lr.apply(scale)
        return scale

    def _nonfinite_params(self, step: int, norm: float, threshold: float, loss: float | None,
                          snapshot_extra: Sequence[Optimizer]) -> StepReport:
        """Finite gradients and loss, but non-finite weights: skip, back off, restore."""
        c = self.counters
        skip_step_(self.params)  # gradients of broken weights: not an update to apply
        c.skipped_steps += 1
        backoff = False
        if self.settings.lr_backoff:
            self._backoff()
            backoff = True
        rollback = self.restore_snapshot(snapshot_extra)
        c.rollbacks += int(rollback)
        if self._lr is not None:
            self._lr.restore()
        report = StepReport(step=step, grad_norm=norm, grad_norm_clipped=norm,
                            threshold=threshold, finite=True, action=Action.SKIP,
                            backoff=backoff, lr_scale=self.backoff.scale, rollback=rollback,
                            params_finite=False, loss=loss)
        self.last_report = report
        return report

    def _nonfinite(self, step: int, norm: float, threshold: float, loss: float | None,
                   per_tensor: Tensor | None, amp_overflow: bool,
                   snapshot_extra: Sequence[Optimizer]) -> StepReport:
        s = self.settings
        c = self.counters
        if self._lr is not None:
            self._lr.restore()
        if amp_overflow and (loss is None or math.isfinite(loss)):
            c.amp_overflow_steps += 1
            c.amp_streak += 1
            if c.amp_streak == 1:
                c.amp_streak_start = step
            halt = s.halt_after > 0 and c.amp_streak >= _AMP_STREAK_HALT
            diagnosis = None
            if halt:  # not an overflow any more: the scaler cannot fix it
                c.halted = True
                diagnosis = self._diagnose(step, per_tensor, loss)
            report = StepReport(step=step, grad_norm=norm, grad_norm_clipped=norm,
                                threshold=threshold, finite=False, action=Action.AMP_SKIP,
                                lr_scale=self.backoff.scale, halt=halt, loss=loss,
                                diagnosis=diagnosis)
            self.last_report = report
            return report
        c.nonfinite_steps += 1
        c.nonfinite_streak += 1
        if c.nonfinite_streak == 1:
            c.streak_start = step
        diagnosis = None
        if c.first_nonfinite_step is None or c.nonfinite_streak >= s.halt_after > 0:
            diagnosis = self._diagnose(step, per_tensor, loss)
        action = Action.NONE
        if s.skip_nonfinite:
            skip_step_(self.params)
            c.skipped_steps += 1
            action = Action.SKIP
        backoff = False
        if s.lr_backoff:
            self._backoff()
            backoff = True
        rollback = (c.nonfinite_streak % s.rollback_after == 0
                    and self.restore_snapshot(snapshot_extra))
        c.rollbacks += int(rollback)
        halt = s.halt_after > 0 and c.nonfinite_streak >= s.halt_after
        if halt:
            c.halted = True
        report = StepReport(step=step, grad_norm=norm, grad_norm_clipped=norm,
                            threshold=threshold, finite=False, action=action,
                            backoff=backoff, lr_scale=self.backoff.scale, rollback=rollback,
                            halt=halt, loss=loss, diagnosis=diagnosis)
        self.last_report = report
        return report

    def _diagnose(self, step: int, per_tensor: Tensor | None, loss: float | None) -> Diagnosis:
        """Which parameters are non-finite (one more host read: first and last bad step).

        The first diagnosis of the run is also kept as :attr:`first_diagnosis`.
        """
        norms = to_host(per_tensor) if per_tensor is not None else []
        names = [n for n, p in zip(self.names, self.params, strict=True) if p.grad is not None]
        diagnosis = diagnose(step, names, norms, loss=loss,
                             growth_before=self.counters.growth_events > 0,
                             lr_scale=self.backoff.scale)
        if self.counters.first_nonfinite_step is None:
            self.counters.first_nonfinite_step = step
            self.first_diagnosis = diagnosis
        return diagnosis

    # ------------------------------------------------------------------ reporting
    @property
    def halt_message(self) -> str:
        """Why training should stop (empty unless halted): step, parameters, likely cause."""
        c = self.counters
        if not c.halted:
            return ""
        first = self.first_diagnosis
        if c.amp_streak >= _AMP_STREAK_HALT:
            end = self.last_report.step if self.last_report else c.steps
            last = self.last_report.diagnosis if self.last_report else None
            parts = [f"{c.amp_streak} consecutive steps with finite loss and non-finite "
                     f"gradients under the GradScaler (steps {c.amp_streak_start}..{end}); it "
                     "skipped each one and halved its loss scale each time, so these are not "
                     "fp16 overflows but gradients that are non-finite at any scale (sqrt or "
                     "log at 0, division by zero in the backward, NaN reaching only the "
                     "backward)"]
            if last is not None:
                parts.append(f"last step: {last.message()}")
            return "; ".join(parts)
        start = c.streak_start
        end = self.last_report.step if self.last_report else c.steps
        parts = [f"{c.nonfinite_streak} consecutive non-finite steps (steps {start}..{end}); "
                 f"LR scale already reduced to {self.backoff.scale:.3g}"]
        if c.nonfinite_streak == c.nonfinite_steps or c.first_nonfinite_step == start:
            parts.append("non-finite at every step since the first one while the skipped "
                         "steps left the weights untouched: the data or the loss function "
                         "(log(0), division by zero, corrupt batches) is the likely cause, "
                         "unless the weights had already diverged")
        if first is not None:
            parts.append(f"first non-finite step: {first.message()}")
        return "; ".join(parts)

    def summary(self) -> dict[str, Any]:
        """Counters and current state as a plain dict.

        Example:
            >>> sorted(GuardCore([torch.nn.Parameter(torch.ones(1))]).summary())[:4]
            ['amp_overflow_steps', 'clipped_steps', 'growth_events', 'halted']
        """
        out = asdict(self.counters)
        out.pop("spike_steps")
        out.pop("nonfinite_streak")
        out.pop("amp_streak")
        out.pop("amp_streak_start")
        out.pop("first_nonfinite_step")
        out.pop("streak_start")
        out["lr_scale"] = self.backoff.scale
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (statistics, counters, backoff, snapshot)."""
        out: dict[str, Any] = {
            "policy_type": type(self.policy).__name__,
            "policy": self.policy.state_dict(),
            "backoff": self.backoff.state_dict(),
            "growth": self.growth.state_dict(),
            "counters": asdict(self.counters),
            "first_diagnosis": asdict(self.first_diagnosis) if self.first_diagnosis else None,
            "weight_norm": self._weight_norm,  # max_update_ratio's last measurement
        }
        if self.snapshot is not None:
            out["snapshot"] = self.snapshot.state_dict()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        A state saved with another clip policy type restores everything but the policy's
        statistics (with a warning). A state saved at a halt is resumed as a fresh attempt:
        ``halted`` and the non-finite streak are cleared.
        """
        saved_type = state_dict.get("policy_type", type(self.policy).__name__)
        if saved_type == type(self.policy).__name__:
            self.policy.load_state_dict(state_dict["policy"])
        else:
            warnings.warn(
                f"GradGuard state was saved with clip policy {saved_type} but this guard uses "
                f"{type(self.policy).__name__}: its statistics start fresh; counters, LR "
                "backoff and growth state are restored",
                stacklevel=2,
            )
        self.backoff.load_state_dict(state_dict["backoff"])
        self.growth.load_state_dict(state_dict["growth"])
        counters = dict(state_dict["counters"])
        if counters.get("halted"):
            counters.update(halted=False, nonfinite_streak=0, streak_start=None, amp_streak=0,
                            amp_streak_start=None)
        self.counters = _Counters(**counters)
        first = state_dict.get("first_diagnosis")
        self.first_diagnosis = None if first is None else Diagnosis(
            step=first["step"], nonfinite_params=tuple(first["nonfinite_params"]),
            origin=first["origin"], likely_cause=first["likely_cause"])
        if self.snapshot is not None and "snapshot" in state_dict:
            self.snapshot.load_state_dict(state_dict["snapshot"])
        self._weight_norm = state_dict.get("weight_norm")

    def close(self) -> None:
        """Restore learning rates and remove optimizer hooks."""
        if self._lr is not None:
            self._lr.remove()
            self._lr = None
