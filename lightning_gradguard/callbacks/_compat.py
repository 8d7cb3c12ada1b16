"""Trainer compatibility checks for :class:`~lightning_gradguard.GradGuard`.

What the guard cannot work with, or works with only in part, is said once, before the
first step, with how to fix it:

* two guards with one ``state_key`` (Lightning keeps one state per key): raise;
* DeepSpeed (its engine steps the optimizer, so a step cannot be skipped): raise;
* a module's own ``configure_gradient_clipping`` (runs after the guard, on the gradients
  it clipped): warn;
* ``Trainer(gradient_clip_val=...)`` (clips the guard's result again): warn;
* LBFGS and other closure-evaluating optimizers (every evaluation would count as a
  step): raise;
* an optimizer without trainable parameters (nothing to guard): warn.

:func:`check_trainer` runs at ``setup``, :func:`check_optimizers` at ``on_fit_start``
(the optimizers exist only then).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

__all__ = ["check_optimizers", "check_trainer", "raw_optimizer", "trainable"]


def raw_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer under Lightning's ``LightningOptimizer`` wrapper (or itself)."""
    return getattr(optimizer, "_optimizer", optimizer)  # type: ignore[no-any-return]


def trainable(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` holds at least one parameter with ``requires_grad``.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(1), requires_grad=False)
        >>> trainable(torch.optim.SGD([p], lr=0.1))
        False
    """
    return any(p.requires_grad for g in getattr(optimizer, "param_groups", [])
               for p in g["params"])


def overrides_clipping(pl_module: Any) -> bool:
    """Whether the module's class (not Lightning's) defines ``configure_gradient_clipping``."""
    for cls in type(pl_module).__mro__:
        if "configure_gradient_clipping" in vars(cls):
            return not cls.__module__.startswith(("lightning.", "pytorch_lightning."))
    return False


def check_trainer(guard: Any, guard_type: type, trainer: Any, pl_module: Any) -> None:
    """The checks of ``setup``: the Trainer's and the module's settings against the guard.

    Args:
        guard: The callback (its ``state_key``).
        guard_type: Callbacks of this type with the same ``state_key`` conflict.
        trainer: The Trainer.
        pl_module: The LightningModule.

    Raises:
        ValueError: Two guards share a ``state_key``, or the strategy is DeepSpeed.
    """
    same = [cb for cb in getattr(trainer, "callbacks", [])
            if isinstance(cb, guard_type) and cb is not guard
            and getattr(cb, "state_key", None) == guard.state_key]
    if same:
        raise ValueError(
            f"Two GradGuard callbacks share state_key {guard.state_key!r}; "
            "give each a distinct `name=` (e.g. GradGuard(name='a'), GradGuard(name='b'))"
        )
    if "DeepSpeed" in type(trainer.strategy).__name__:
        raise ValueError(
            "GradGuard does not support DeepSpeed: its engine steps the optimizer itself, "
            "so a step cannot be skipped by clearing gradients. Use DeepSpeed's own "
            "`gradient_clipping` config, or a DDP/FSDP strategy with GradGuard."
        )
    if overrides_clipping(pl_module):
        rank_zero_warn(
            f"{type(pl_module).__name__} overrides `configure_gradient_clipping`. It still "
            "runs, after GradGuard, on every step GradGuard does not skip, and sees the "
            "gradients GradGuard already clipped; on skipped steps the gradients are None. "
            "If it clips too, the effective threshold is the smaller of the two: remove "
            "the override's clipping to let GradGuard adapt."
        )
    if trainer.gradient_clip_val:
        rank_zero_warn(
            f"GradGuard and Trainer(gradient_clip_val={trainer.gradient_clip_val}) are both "
            "active. GradGuard runs first (it skips non-finite steps and clips spikes to "
            "its adaptive threshold); Lightning then clips the result again to "
            "gradient_clip_val, so the effective threshold is the smaller of the two. "
            "Remove `gradient_clip_val` to let GradGuard adapt, or use "
            "GradGuard(clip=FixedNormClip(...)) for a fixed threshold with GradGuard's "
            "skipping and backoff."
        )


def refuse_closure_optimizer(index: int, optimizer: Optimizer) -> None:
    """Raise for optimizers that evaluate the closure several times per step (LBFGS).

    Such an optimizer runs ``on_before_optimizer_step`` once per function evaluation inside
    its ``step`` and reads its learning rate before the closure: every evaluation would count
    as a step (skewing halt, rollback and spike windows), a skip would feed it zero
    gradients, and an LR backoff would never reach its update.

    Raises:
        ValueError: For LBFGS and optimizers named like it.
    """
    if isinstance(optimizer, torch.optim.LBFGS) or "LBFGS" in type(optimizer).__name__:
        raise ValueError(
            f"GradGuard does not support optimizer {index} ({type(optimizer).__name__}): it "
            "evaluates the closure several times per step, so GradGuard would count function "
            "evaluations as steps and its LR backoff could not reach the update. Use "
            "GradientMonitor to watch the gradients, or a first-order optimizer (SGD, Adam, "
            "AdamW) with GradGuard.")


def check_optimizers(optimizers: Iterable[Any]) -> None:
    """The checks of ``on_fit_start``: closure optimizers refused, empty ones warned about.

    Raises:
        ValueError: For an optimizer that evaluates the closure several times per step.
    """
    for i, opt in enumerate(optimizers):
        raw = raw_optimizer(opt)
        refuse_closure_optimizer(i, raw)
        if not trainable(raw):
            rank_zero_warn(
                f"GradGuard: optimizer {i} ({type(raw).__name__}) has no trainable "
                "parameters (its param groups are empty or every parameter has "
                "requires_grad=False): there is nothing to guard."
            )
