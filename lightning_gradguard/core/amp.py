"""GradScaler helpers: see the gradients unscaled before deciding on them.

Fused optimizers (``fused=True``) unscale inside their own ``step()``, so at the point where a
guard runs their gradients are still multiplied by the loss scale. :func:`unscale_once_`
unscales them now, unless that already happened for this step; the scaler then does not
unscale them again.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

__all__ = ["unscale_once_"]


def unscale_once_(scaler: Any, optimizer: Optimizer) -> bool:
    """``scaler.unscale_(optimizer)`` unless this step's gradients are already unscaled.

    torch offers no public query of the per-optimizer stage, so this reads the scaler's
    ``_per_optimizer_states`` (a ``defaultdict``: an optimizer it has not seen is READY);
    this is the one place in the package that does.

    Args:
        scaler: A ``torch.amp.GradScaler``.
        optimizer: The optimizer about to step.

    Returns:
        Whether the gradients were unscaled by this call.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.ones(1)); opt = torch.optim.SGD([p], lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        >>> scaler.scale(p.sum()).backward()
        >>> unscale_once_(scaler, opt), unscale_once_(scaler, opt), p.grad
        (True, False, tensor([1.]))
    """
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"].name != "READY":
        return False
    scaler.unscale_(optimizer)
    return True
