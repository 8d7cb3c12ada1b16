r"""Optimizer-specific update control: how large may one update be?

Gradient statistics alone cannot protect the very first steps of a run whose learning rate is
far too high: there is no history yet. Where the optimizer's update is a known function of the
gradient, the guard can bound the *update* instead. This module is the one place that knows
optimizers: :func:`make_update_control` picks the control once, from the optimizer, and the
guard's decision (:func:`~lightning_gradguard.core.decide.decide`) only sees the
:class:`UpdateLimit` it returns each step.

* :class:`SGDUpdateCap` (``torch.optim.SGD``, ``max_update_ratio`` set): the update of plain
  SGD is :math:`\eta\,g`, so :math:`\eta\,\|g\| \le r\,\|w\|` caps the relative weight change
  at :math:`r`: the gradient is clipped to :math:`r\,\|w\| / \eta`. The cap is **armed** only
  by an update over it at the run's first step (no history can judge it, and the first steps
  are where a far-too-high LR does its damage) or, later, by one whose gradient grew by
  ``arm_growth`` (default 5) or more: since the previous step, or over a run of consecutive
  rising steps, measured against the largest norm of the :data:`ARM_HISTORY` steps before
  that run began. Both are the signature of an LR above SGD's stability limit.
  Above the limit :math:`2/\lambda` the component of the gradient along the sharpest
  direction is multiplied by :math:`|1 - \eta\lambda|` every step; in a stable run, however
  large its updates are relative to the weights (early steps against large targets, small or
  zero-initialised weights), the gradient shrinks or grows slowly. An update larger than
  :math:`r\,\|w\|` alone is therefore no sign of too high an LR, and an unarmed cap clips
  nothing. With momentum, or an LR only a few times the limit, that factor is below 5 per
  step but compounds, so a divergence builds over several steps without a 5-fold jump: a
  run of rises that takes the norm to ``arm_growth`` times anything the steps before it had
  seen is the same signature, spread out. A stable run that oscillates returns to levels it
  has seen: it is measured against its recent peaks, not the trough a rise started from.
  Independently of the cap, a spike or sustained growth counts toward an LR backoff
  only when its update would move the weights by more than :math:`r / \text{far}` (default
  ``far=10``): at a comfortable LR a gradient spike is clipped but is no sign of too high an
  LR.
* :class:`NormalisedUpdates` (an adaptive optimizer, see
  :func:`~lightning_gradguard.core.optim.is_adaptive`: Adam, AdamW, RMSprop, Adagrad,
  schedule-free AdamW ...): no cap, every spike counts, and the limit says the updates are
  *normalised*: each coordinate's step is divided by its own running gradient scale, so a
  gradient norm that keeps rising does not make the updates larger. Clipping that has become
  the rule is then no evidence that the LR is too high (see
  :func:`~lightning_gradguard.core.decide.decide`).
* :class:`NoUpdateControl` (every other optimizer, or plain SGD with
  ``max_update_ratio=None``): no cap, every spike counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core._validation import check_int, check_number
from lightning_gradguard.core.optim import is_adaptive, learning_rate

__all__ = ["ARM_HISTORY", "NORMALISED", "NO_LIMIT", "NoUpdateControl", "NormalisedUpdates",
           "SGDUpdateCap", "UpdateControl", "UpdateLimit", "make_update_control"]

_INF = float("inf")

#: finite steps of history against which a run of rising gradient norms is measured: the
#: cap arms when a run of rises reaches ``arm_growth`` times the largest norm of the steps
#: before it within this history (a run that began before it does not arm the cap)
ARM_HISTORY = 10


@dataclass(frozen=True, slots=True)
class UpdateLimit:
    """What the update control allows at one step (host floats only).

    Attributes:
        cap: Largest total gradient norm the update may have (``inf``: no cap).
        far: A spike or growth counts toward an LR backoff only when ``far * norm > scale``;
            ``None``: always.
        scale: The gradient norm whose update moves the weights by ``max_update_ratio``
            (``None``: the same as ``cap``; an unarmed cap has ``cap=inf`` and a finite
            ``scale``).
        normalised: The optimizer divides each coordinate's step by its own running gradient
            scale (adaptive): the size of its update does not follow the gradient norm.

    Example:
        >>> UpdateLimit().counts(1e9), UpdateLimit(cap=1.0, far=10.0).counts(0.05)
        (True, False)
        >>> UpdateLimit(far=10.0, scale=1.0).counts(0.05)   # unarmed: no cap, same rule
        False
    """

    cap: float = _INF
    far: float | None = None
    scale: float | None = None
    normalised: bool = False

    def counts(self, norm: float) -> bool:
        """Whether a spike/growth at ``norm`` is large enough to count toward a backoff."""
        return self.far is None or self.far * norm > (self.cap if self.scale is None
                                                      else self.scale)


#: no cap, every spike counts (one shared instance: a limit is a value)
NO_LIMIT = UpdateLimit()
#: no cap, every spike counts, the updates are normalised (an adaptive optimizer)
NORMALISED = UpdateLimit(normalised=True)


class UpdateControl(Stateful):
    """Base class: no cap (see :class:`NoUpdateControl`). Subclasses override the hooks.

    The guard asks :meth:`wants_weight_norm` when it builds the step's measurement (the
    weight norm is then read in the step's single host transfer); :meth:`preview` gives the
    step's :class:`UpdateLimit` from the values read without changing anything (the decision
    needs it), and the apply stage hands them over with :meth:`take`
    (:meth:`observe_weight_norm`, then :meth:`observe_grad_norm`).
    """

    def wants_weight_norm(self, finite_steps: int) -> bool:
        """Whether to measure the weight norm at this step (``finite_steps``: 1-based)."""
        return False

    def observe_weight_norm(self, value: float) -> None:
        """Take the weight norm measured at this step."""

    def observe_grad_norm(self, value: float, lr_scale: float) -> None:
        """Take this step's raw gradient norm (called after :meth:`observe_weight_norm`)."""

    def limit(self, lr_scale: float) -> UpdateLimit:
        """This step's limit, under the LR backoff scale ``lr_scale``."""
        return NO_LIMIT

    def preview(self, weight_norm: float | None, grad_norm: float,
                lr_scale: float) -> UpdateLimit:
        """The limit a step with these values gets, as if :meth:`take` had them: no change.

        Args:
            weight_norm: The weight norm read at this step (``None``: not measured).
            grad_norm: The step's raw total gradient norm.
            lr_scale: The LR backoff scale.
        """
        return NO_LIMIT

    def take(self, weight_norm: float | None, grad_norm: float, lr_scale: float) -> None:
        """Take a step's values (the apply stage): the weight norm, then the gradient norm."""
        if weight_norm is not None:
            self.observe_weight_norm(weight_norm)
        self.observe_grad_norm(grad_norm, lr_scale)


@friendly_kwargs
class NoUpdateControl(UpdateControl):
    """No update cap: every spike and every growth counts toward a backoff.

    Example:
        >>> NoUpdateControl().limit(1.0)
        UpdateLimit(cap=inf, far=None, scale=None, normalised=False)
    """


@friendly_kwargs
class NormalisedUpdates(UpdateControl):
    """An adaptive optimizer: no cap, every spike counts, its updates are normalised.

    Adam divides each coordinate's step by the running root mean square of its gradient
    (RMSprop and schedule-free AdamW alike, Adagrad by the root of the running sum): a gradient
    that grows over many steps grows that denominator with it, and the update stays about
    ``lr`` per coordinate. The limit it gives (:data:`NORMALISED`) tells the decision that a
    threshold lagging a rising gradient norm is no sign of too high an LR.

    Example:
        >>> NormalisedUpdates().limit(1.0)
        UpdateLimit(cap=inf, far=None, scale=None, normalised=True)
    """

    def limit(self, lr_scale: float) -> UpdateLimit:
        """No cap; the updates are normalised."""
        return NORMALISED

    def preview(self, weight_norm: float | None, grad_norm: float,
                lr_scale: float) -> UpdateLimit:
        """No cap; the updates are normalised (nothing is read)."""
        return NORMALISED


@friendly_kwargs
class SGDUpdateCap(UpdateControl):
    """Plain-SGD update cap: ``lr * ||g|| <= max_ratio * ||w||`` once armed (momentum not counted).

    The cap is armed (for the rest of the run) by an update over it at the first finite step
    with a weight norm, or at a later one whose gradient norm is at least ``arm_growth`` times
    the previous finite step's, or, at the end of a run of consecutive rises, ``arm_growth``
    times the largest of the (at most :data:`ARM_HISTORY`) norms before that run: the
    signature of an LR above SGD's stability limit (see the module docstring).
    Before that it clips nothing; its scale still decides which spikes count.

    Args:
        optimizer: The ``torch.optim.SGD`` whose group LRs are read (largest one; a tensor LR
            on an accelerator disables the cap, reading it would cost a host sync).
        max_ratio: :math:`r`, the largest relative weight change of one update (> 0).
        every_step_until: The weight norm is measured on every finite step up to this one...
        every: ... and on every this-many-th finite step after it (a skipped step does not
            shift the schedule).
        far: A spike or growth counts toward a backoff only if its update would move the
            weights by more than ``max_ratio / far`` of their norm.
        arm_growth: Growth of the gradient norm that, with an update over the cap, arms the
            cap (> 1): in one step, or over consecutive rises against the steps before them.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(100))
        >>> cap = SGDUpdateCap(torch.optim.SGD([w], lr=1.0), max_ratio=0.1)
        >>> cap.wants_weight_norm(1), cap.wants_weight_norm(17), cap.wants_weight_norm(24)
        (True, False, True)
        >>> cap.observe_weight_norm(10.0)
        >>> cap.observe_grad_norm(0.5, lr_scale=1.0)   # the first step, under the cap
        >>> cap.observe_grad_norm(3.0, lr_scale=1.0)   # a large update, grown x6: armed
        >>> cap.armed, cap.limit(lr_scale=0.5)
        (True, UpdateLimit(cap=2.0, far=10.0, scale=None, normalised=False))
        >>> fresh = SGDUpdateCap(torch.optim.SGD([w], lr=1.0), max_ratio=0.1)
        >>> fresh.observe_weight_norm(10.0)
        >>> for g in (0.9, 0.4, 1.6, 2.4):   # over the cap from 1.6: x4, then x1.5, and 2.4
        ...     fresh.observe_grad_norm(g, lr_scale=1.0)   # is under x5 the 0.9 before the rise
        >>> fresh.armed, fresh.limit(lr_scale=1.0)
        (False, UpdateLimit(cap=inf, far=10.0, scale=1.0, normalised=False))
        >>> fresh.observe_grad_norm(4.5, lr_scale=1.0)   # three rises: x5 the 0.9 before them
        >>> fresh.armed
        True
    """

    weight_norm: float | None
    armed: bool
    last_grad_norm: float | None
    recent: tuple[float, ...]
    rises: int

    def __init__(self, optimizer: Optimizer, max_ratio: float, *, every_step_until: int = 16,
                 every: int = 8, far: float = 10.0, arm_growth: float = 5.0) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.max_ratio = check_number("max_ratio", max_ratio, low=0.0, low_inclusive=False)
        self.every_step_until = check_int("every_step_until", every_step_until, low=0)
        self.every = check_int("every", every, low=1)
        self.far = check_number("far", far, low=0.0, low_inclusive=False)
        self.arm_growth = check_number("arm_growth", arm_growth, low=1.0, low_inclusive=False)
        self._add_state("weight_norm", None)  # the last measurement (None: none usable)
        self._add_state("armed", False)  # the run has shown the divergence signature
        self._add_state("last_grad_norm", None)  # the previous finite step's raw norm
        # the last ARM_HISTORY finite raw norms (oldest first), and how many at their end rose
        # one after another (a state saved before these existed loads with no history)
        self._add_state("recent", (), save=list, load=_floats, optional=True)
        self._add_state("rises", 0, load=int, optional=True)

    def wants_weight_norm(self, finite_steps: int) -> bool:
        """Every step up to ``every_step_until``, then every ``every``-th (finite steps)."""
        return finite_steps <= self.every_step_until or finite_steps % self.every == 0

    def observe_weight_norm(self, value: float) -> None:
        """Keep a finite, positive weight norm; anything else disables the cap until the next."""
        self.weight_norm = value if math.isfinite(value) and value > 0.0 else None

    def observe_grad_norm(self, value: float, lr_scale: float) -> None:
        """Arm the cap on an update over it at the first step or after ``arm_growth``-fold growth.

        Non-finite and zero norms are left out (a skipped step is no step of the dynamics).
        """
        if not (math.isfinite(value) and value > 0.0):
            return
        self.armed = self._arms(value, lr_scale, self.weight_norm)
        last = self.last_grad_norm
        self.rises = min(self.rises + 1, ARM_HISTORY) if last is not None and value > last \
            else 0
        self.recent = (*self.recent, value)[-ARM_HISTORY:]
        self.last_grad_norm = value

    def _grew(self, value: float) -> bool:
        """Whether ``value`` grew enough to arm the cap (with an update over it).

        It did if it is the first norm, or ``arm_growth`` times the last one or, ending a run of
        rises, the largest norm of the history before that run.
        """
        last = self.last_grad_norm
        if last is None or value >= self.arm_growth * last:
            return True
        if value <= last or self.rises == 0:
            return False
        before = self.recent[:max(len(self.recent) - self.rises, 0)]
        return bool(before) and value >= self.arm_growth * max(before)

    def _arms(self, value: float, lr_scale: float, weight_norm: float | None) -> bool:
        """Whether the cap is armed after taking the raw norm ``value`` (at ``weight_norm``)."""
        if not (math.isfinite(value) and value > 0.0):
            return self.armed
        if self.armed or not self._grew(value):
            return self.armed
        # the first step (no history) or ``arm_growth``-fold growth: armed if over
        lr = self._lr(lr_scale, weight_norm)
        return lr is not None and weight_norm is not None \
            and lr * value > self.max_ratio * weight_norm

    def lr(self, lr_scale: float) -> float | None:
        """The update's LR: the optimizer's (:func:`.optim.learning_rate`) times ``lr_scale``.

        ``None`` when there is no cap: no weight norm yet, a non-finite or negative LR, or a
        tensor LR on an accelerator (reading it would add a host synchronisation every step).
        """
        return self._lr(lr_scale, self.weight_norm)

    def _lr(self, lr_scale: float, weight_norm: float | None) -> float | None:
        if weight_norm is None:
            return None
        lr = learning_rate(self.optimizer)
        if lr is None:
            return None
        lr *= lr_scale
        return lr if math.isfinite(lr) and lr >= 0.0 else None

    def limit(self, lr_scale: float) -> UpdateLimit:
        """The cap ``max_ratio * ||w|| / lr`` (``inf`` until armed); an LR of 0 moves nothing."""
        return self._limit(lr_scale, self.weight_norm, self.armed)

    def _limit(self, lr_scale: float, weight_norm: float | None, armed: bool) -> UpdateLimit:
        lr = self._lr(lr_scale, weight_norm)
        if lr is None:
            return NO_LIMIT
        if lr == 0.0 or weight_norm is None:
            return UpdateLimit(cap=_INF, far=self.far)
        scale = self.max_ratio * weight_norm / lr
        if armed:
            return UpdateLimit(cap=scale, far=self.far)
        return UpdateLimit(cap=_INF, far=self.far, scale=scale)

    def preview(self, weight_norm: float | None, grad_norm: float,
                lr_scale: float) -> UpdateLimit:
        """The limit after :meth:`take` of these values, computed without taking them.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(100))
            >>> cap = SGDUpdateCap(torch.optim.SGD([w], lr=1.0), max_ratio=0.1)
            >>> cap.preview(10.0, 3.0, lr_scale=1.0), cap.armed, cap.weight_norm
            (UpdateLimit(cap=1.0, far=10.0, scale=None, normalised=False), False, None)
        """
        wn = self.weight_norm
        if weight_norm is not None:
            wn = weight_norm if math.isfinite(weight_norm) and weight_norm > 0.0 else None
        return self._limit(lr_scale, wn, self._arms(grad_norm, lr_scale, wn))


def _floats(values: object) -> tuple[float, ...]:
    """A saved history back as a tuple of floats."""
    return tuple(float(v) for v in values)  # type: ignore[attr-defined]


def make_update_control(optimizer: Optimizer | None, max_update_ratio: float | None,
                        has_params: bool = True) -> UpdateControl:
    """The update control for ``optimizer``: the one place that looks at its type.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> type(make_update_control(torch.optim.SGD([w], lr=0.1), 0.1)).__name__
        'SGDUpdateCap'
        >>> type(make_update_control(torch.optim.Adam([w]), 0.1)).__name__
        'NormalisedUpdates'
        >>> type(make_update_control(torch.optim.SGD([w], lr=0.1), None)).__name__
        'NoUpdateControl'
    """
    if max_update_ratio is not None and isinstance(optimizer, torch.optim.SGD) and has_params:
        return SGDUpdateCap(optimizer, max_update_ratio)
    if optimizer is not None and is_adaptive(optimizer):
        return NormalisedUpdates()
    return NoUpdateControl()
