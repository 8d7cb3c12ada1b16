"""The single place where the core reads device tensors back to the host.

Every tensor -> Python conversion of the core goes through :func:`to_host`, so the number
of host synchronisations per optimizer step can be counted (``host_reads``) and kept at
one for :class:`~lightning_gradguard.core.guard.GuardCore`.
"""

from __future__ import annotations

import torch

__all__ = ["host_reads", "reset_host_reads", "to_host"]

_COUNTER = [0]


def to_host(values: torch.Tensor) -> list[float]:
    """Copy a 1-D tensor to the host as a list of floats (one synchronisation).

    Example:
        >>> to_host(torch.tensor([1.0, 2.0]))
        [1.0, 2.0]
    """
    _COUNTER[0] += 1
    # tolist() converts each element to a Python float exactly (float16/bfloat16/float32
    # widen without rounding), so no float64 copy is made on the device first
    if values.dtype.is_floating_point:
        out: list[float] = values.detach().reshape(-1).tolist()
    else:
        out = values.detach().double().reshape(-1).tolist()
    return out


def host_reads() -> int:
    """Number of :func:`to_host` calls since the last :func:`reset_host_reads`."""
    return _COUNTER[0]


def reset_host_reads() -> None:
    """Reset the counter returned by :func:`host_reads`."""
    _COUNTER[0] = 0
