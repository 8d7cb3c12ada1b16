"""The guard's last-good state: when a snapshot is due, taking it, restoring it.

:class:`LastGood` wraps a :class:`~lightning_gradguard.core.snapshot.Snapshot` with the
schedule of ``snapshot_every`` (and a snapshot taken again at once after the optimizer's
param groups changed). On a snapshot step the guard's measurement asks whether the weights
are finite (:meth:`LastGood.request`, read with the step's single host read); the apply
stage captures and restores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_gradguard.core.measure import Gradients, Meter, Request
from lightning_gradguard.core.snapshot import Snapshot

__all__ = ["LastGood"]


class LastGood:
    """The last-good snapshot of a module and its optimizers, on a schedule.

    Args:
        module: The module whose weights are kept (``None``: nothing is ever taken).
        every: A snapshot every this many guarded steps (``snapshot_every``).

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> last = LastGood(net, every=3)
        >>> [last.wanted(step) for step in (1, 2, 3, 4)]
        [True, False, False, True]
    """

    def __init__(self, module: torch.nn.Module | None, every: int) -> None:
        self.module = module
        self.every = every
        self.snapshot = Snapshot()
        #: the optimizer's param groups changed: a snapshot is due at the next finite step
        self.due = False

    def wanted(self, count: int) -> bool:
        """Whether guarded step ``count`` (1-based) is a snapshot step."""
        return self.module is not None and (count % self.every == 1 % self.every or self.due)

    def request(self, meter: Meter) -> Request:
        """The module's weights' norm, reduced like the gradients (all ranks agree on finite)."""
        module = self.module
        assert module is not None

        def params_norm(grads: Gradients, device: torch.device) -> Tensor:
            return meter.total([p.detach() for p in module.parameters()], device)
        return params_norm

    def capture(self, optimizers: Sequence[Optimizer], step: int) -> None:
        """Take the snapshot (weights and optimizer state) of ``step``."""
        if self.module is not None:
            self.snapshot.capture(self.module, optimizers, step)
            self.due = False

    def restore(self, optimizers: Sequence[Optimizer]) -> bool:
        """Restore the last snapshot in place, if there is one; whether it was restored."""
        if not self.snapshot.available or self.module is None:
            return False
        self.snapshot.restore(self.module, optimizers)
        return True

    def clear(self) -> None:
        """Drop the snapshot (its optimizer state no longer matches) and take one soon."""
        self.snapshot.clear()
        self.due = True
