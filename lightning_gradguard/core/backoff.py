r"""Learning-rate backoff with recovery, without touching the schedule.

The effective learning rate of every param group is :math:`\eta_t = s_t\,\eta^{\mathrm{sched}}_t`
with :math:`s_t \in [s_{\min}, 1]`. A backoff multiplies :math:`s` by ``factor``; every clean
step multiplies it by :math:`\text{factor}^{-1/\text{recovery\_steps}}` (capped at exactly
1), so one backoff is undone after ``recovery_steps`` clean steps.

:class:`LRScaler` applies :math:`s` only for the update: it writes
:math:`s\,\eta^{\mathrm{sched}}` into ``param_groups[i]["lr"]`` right before the step and puts
the scheduled value back in an optimizer step post-hook, right after the update. Schedulers
(closed-form like ``LambdaLR``/``OneCycleLR``, chained like ``StepLR``/``CosineAnnealingLR``,
and ``ReduceLROnPlateau``) therefore only ever see their own values: after full recovery the
LR is exactly what the scheduler gives without the guard.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core._validation import check_int, check_number

__all__ = ["LRBackoff", "LRScaler"]


@friendly_kwargs
class LRBackoff(Stateful):
    """The LR scale :math:`s`: multiplicative backoff, geometric recovery.

    Args:
        factor: Multiplier per backoff, in ``(0, 1)``.
        recovery_steps: Clean steps to undo one backoff (>= 1).
        min_scale: Floor :math:`s_{\\min}` in ``(0, 1]``.

    Example:
        >>> b = LRBackoff(factor=0.5, recovery_steps=2)
        >>> b.backoff(); b.scale
        0.5
        >>> b.recover(); round(b.scale, 4)
        0.7071
        >>> b.recover(); b.scale
        1.0
    """

    scale: float
    backoffs: int

    def __init__(self, factor: float = 0.5, recovery_steps: int = 200,
                 min_scale: float = 1e-3) -> None:
        super().__init__()
        self.factor = check_number("factor", factor, low=0.0, high=1.0, low_inclusive=False,
                                   high_inclusive=False)
        self.recovery_steps = check_int("recovery_steps", recovery_steps, low=1)
        self.min_scale = check_number("min_scale", min_scale, low=0.0, high=1.0,
                                      low_inclusive=False)
        self._growth = self.factor ** (-1.0 / self.recovery_steps)
        self._add_state("scale", 1.0)
        self._add_state("backoffs", 0)

    def backoff(self) -> None:
        """Multiply the scale by ``factor`` (not below ``min_scale``)."""
        self.scale = max(self.min_scale, self.scale * self.factor)
        self.backoffs += 1

    def recover(self) -> None:
        """One clean step: move the scale toward 1 (reaches exactly 1.0)."""
        if self.scale < 1.0:
            nxt = self.scale * self._growth
            self.scale = 1.0 if nxt >= 1.0 - 1e-12 else nxt


class _SharedLR:
    """The scheduled LRs of one optimizer and the scales every guard of it asked for."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.scales: dict[int, float] = {}
        self.saved: list[tuple[dict[str, Any], Any]] = []
        self.handle = optimizer.register_step_post_hook(self._on_step_post)

    def set(self, owner: int, scale: float) -> None:
        if not self.saved:
            for group in self.optimizer.param_groups:
                lr = group["lr"]
                self.saved.append((group, lr.detach().clone() if isinstance(lr, torch.Tensor)
                                   else lr))
        self.scales[owner] = scale
        total = 1.0
        for v in self.scales.values():
            total *= v
        for group, lr in self.saved:
            if isinstance(lr, torch.Tensor):
                group["lr"].copy_(lr * total)
            else:
                group["lr"] = lr if total == 1.0 else lr * total

    def restore(self) -> None:
        for group, lr in self.saved:
            if isinstance(lr, torch.Tensor):
                group["lr"].copy_(lr)
            else:
                group["lr"] = lr
        self.saved.clear()
        self.scales.clear()

    def _on_step_post(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.restore()


_SHARED: weakref.WeakKeyDictionary[Optimizer, _SharedLR] = weakref.WeakKeyDictionary()


@friendly_kwargs
class LRScaler:
    """Applies a scale to an optimizer's learning rates for exactly one update.

    Several scalers of one optimizer (e.g. two guards) cooperate: the scheduled LRs are saved
    once, before any scale is applied, the update uses the product of the scales, and the
    scheduled values are put back right after it.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([p], lr=0.1)
        >>> scaler = LRScaler(opt)
        >>> scaler.apply(0.5); opt.param_groups[0]["lr"]
        0.05
        >>> p.grad = torch.ones(1); opt.step()
        >>> opt.param_groups[0]["lr"], round(p.item(), 4)
        (0.1, 0.95)
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        shared = _SHARED.get(optimizer)
        if shared is None:
            shared = _SHARED[optimizer] = _SharedLR(optimizer)
        self._shared = shared

    def apply(self, scale: float) -> None:
        """Scale every group's ``lr`` until the next ``optimizer.step()`` finishes."""
        if scale == 1.0 and not self._shared.saved:
            return
        self._shared.set(id(self), scale)

    def restore(self) -> None:
        """Put the scheduled learning rates back (idempotent)."""
        self._shared.restore()

    def remove(self) -> None:
        """Restore the learning rates (the shared hook stays for other scalers)."""
        self.restore()
