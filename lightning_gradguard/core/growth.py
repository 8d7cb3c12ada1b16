r"""Detection of sustained growth: the step-over-step rise that defines an explosion.

A learning rate that is too high from the start gives no isolated spike to clip: the
gradient norm (and the loss) multiply by a factor :math:`r > 1` every step, and a running
mean follows them. The detector counts consecutive finite observations with

.. math::  x_t > (1 + \rho)\, x_{t-1}

and fires when the streak reaches ``patience`` (then starts counting again). Under i.i.d.
noise, ``patience`` strict rises in a row have probability :math:`1/(\text{patience}+1)!`
per window even for :math:`\rho = 0`; the minimum relative rise :math:`\rho` makes false
alarms rarer still. Non-finite observations neither extend nor break a streak. Host state
(two numbers): the guard feeds it the norm it has already read back.
"""

from __future__ import annotations

import math

from torch import Tensor

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core._validation import check_int, check_number

__all__ = ["GrowthDetector"]


@friendly_kwargs
class GrowthDetector(Stateful):
    """Fires after ``patience`` consecutive rises of at least ``min_rise`` (relative).

    Args:
        patience: Consecutive rises needed (>= 1).
        min_rise: :math:`\\rho \\geq 0`, the minimum relative rise that counts.

    Example:
        >>> d = GrowthDetector(patience=3, min_rise=0.1)
        >>> [d.update(x) for x in [1.0, 1.5, 2.3, 3.5, 5.0]]
        [False, False, False, True, False]
    """

    prev: float
    streak: int

    def __init__(self, patience: int = 5, min_rise: float = 0.05) -> None:
        super().__init__()
        self.patience = check_int("patience", patience, low=1)
        self.min_rise = check_number("min_rise", min_rise, low=0.0)
        self._add_state("prev", math.nan)
        self._add_state("streak", 0)

    def _rising(self, v: float) -> bool:
        return v > (1.0 + self.min_rise) * self.prev  # False while prev is NaN

    def fires(self, x: float) -> bool:
        """Whether :meth:`update` with ``x`` would fire (changes nothing).

        Example:
            >>> d = GrowthDetector(patience=1, min_rise=0.0)
            >>> d.update(1.0), d.fires(2.0), d.fires(0.5), d.update(2.0)
            (False, True, False, True)
        """
        if not math.isfinite(x):
            return False
        return (self.streak + 1 if self._rising(x) else 0) >= self.patience

    def update(self, x: float | Tensor) -> bool:
        """Feed one observation; returns ``True`` when sustained growth fired."""
        v = float(x)
        if not math.isfinite(v):
            return False
        rising = self._rising(v)
        self.prev = v
        self.streak = self.streak + 1 if rising else 0
        if self.streak >= self.patience:
            self.streak = 0
            return True
        return False

    def hold(self) -> None:
        """Ignore the fire just reported but stay armed: the next rise fires again.

        For a caller that acts on growth only under a further condition (the guard, with
        plain SGD: only once the updates are large); without it a rise that keeps going
        would need ``patience`` new rises before it is looked at again.

        Example:
            >>> d = GrowthDetector(patience=2, min_rise=0.0)
            >>> [d.update(x) for x in [1.0, 2.0, 3.0]]
            [False, False, True]
            >>> d.hold()
            >>> d.update(4.0), d.update(3.0), d.update(5.0)
            (True, False, False)
        """
        self.streak = self.patience - 1
