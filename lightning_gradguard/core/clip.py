r"""Applying a clip with the norm already computed.

Norm clipping rescales every gradient by :math:`c = \min(1, \tau / \|g\|)`. The norm comes
from :func:`~lightning_gradguard.core.norms.grad_norms`, so clipping is one read-write pass
(``torch._foreach_mul_`` per device/dtype group), done only when :math:`c < 1`.

A non-finite gradient is never "clipped": :math:`\tau / \infty = 0` would zero the step
(Adam would still move the weights with its moments) and :math:`\tau / \mathrm{NaN}` would
write NaN into every gradient. :func:`clip_coef` refuses both; the caller skips the step
instead (:func:`skip_step_` clears the gradients so ``optimizer.step()`` leaves weights and
optimizer state untouched).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_gradguard.core.norms import group_by_device_and_dtype

__all__ = ["clip_coef", "scale_grads_", "skip_step_"]


def clip_coef(norm: float, threshold: float, eps: float = 1e-6) -> float:
    r"""The clip coefficient :math:`\min(1, \tau / (\|g\| + \epsilon))` for a finite norm.

    Args:
        norm: Total gradient norm (host float).
        threshold: Clip threshold :math:`\tau` (``inf``: never clip).
        eps: Added to the norm for numerical safety, as in ``clip_grad_norm_``.

    Returns:
        The coefficient in ``[0, 1]``; ``1.0`` means "do not touch the gradients".

    Raises:
        ValueError: If ``norm`` is not finite (skip the step instead of clipping).

    Example:
        >>> clip_coef(10.0, 2.0, eps=0.0)
        0.2
        >>> clip_coef(1.0, 2.0)
        1.0
    """
    if not math.isfinite(norm):
        raise ValueError(
            f"cannot clip a non-finite gradient (norm={norm}); skip the step instead"
        )
    if norm <= threshold:
        return 1.0
    return min(1.0, threshold / (norm + eps))


def scale_grads_(grads: Sequence[Tensor], coef: float | Tensor,
                 groups: Mapping[tuple[torch.device, torch.dtype], Sequence[int]] | None = None,
                 ) -> None:
    """Multiply every gradient in place by ``coef`` (one fused pass per device/dtype group).

    Sparse COO gradients are scaled one by one. ``groups``: the indices of ``grads`` by
    ``(device, dtype)`` when known in advance (dense tensors only; skips the grouping).

    Example:
        >>> g = [torch.ones(2), torch.ones(3).half()]
        >>> scale_grads_(g, 0.5)
        >>> g[1]
        tensor([0.5000, 0.5000, 0.5000], dtype=torch.float16)
    """
    if groups is None:
        dense = [g for g in grads if not g.is_sparse]
        for g in grads:
            if g.is_sparse:
                g.mul_(coef)
        groups = group_by_device_and_dtype(dense)
    else:
        dense = list(grads)
    for (device, _), idx in groups.items():
        group = [dense[i] for i in idx]
        c = coef.to(device) if isinstance(coef, Tensor) else coef
        torch._foreach_mul_(group, c)


def skip_step_(params: Iterable[torch.nn.Parameter]) -> None:
    """Turn the coming ``optimizer.step()`` into a true no-op by clearing every gradient.

    Every built-in optimizer skips parameters whose ``grad`` is ``None``: weights, step
    counts and moments stay bit-identical (zeroing the gradients is *not* a skip).

    Example:
        >>> p = torch.nn.Parameter(torch.ones(1)); p.grad = torch.ones(1)
        >>> skip_step_([p]); p.grad is None
        True
    """
    for p in params:
        p.grad = None
