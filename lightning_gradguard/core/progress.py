r"""Is training making progress? The loss trend that keeps a learning run from a backoff.

A gradient norm that rises step after step is the signature of an LR above the stability
limit, but not only of that: while a model fits targets of a large scale, or while a
zero-initialised head grows, the gradient that reaches the body grows with it, and the loss
falls all the while. A z-score threshold lags such a trend, so clipping becomes the rule on a
run that is learning well (a regression MLP with Adam: gradient norm 10 -> 28 while the loss
fell 15 -> 7; four backoffs left it 4.5x worse than without the guard). An unstable run does
not learn: its loss rises, or at least stops falling, and stays above where it started.

The evidence is two running means of the finite loss, a recent one (decay
:data:`RECENT_DECAY`, about the last 10 steps) and a longer one (:data:`LONG_DECAY`, about
the last 50 steps, the default ``spike_window``), and the run's first loss. The loss is
*improving* when the recent mean is below both: still going down, and below where the run
started. (The first loss matters: a loss that an instability drove to ten times its start
falls back afterwards, and against a longer mean inflated by that excursion the run would
look as if it learned.) Both means are exact running means over their first steps (see
:class:`~lightning_gradguard.core.stats.RobustNormStats`), so over the first steps they are
equal and nothing counts as improving: an explosion at the start is judged as before.
Non-finite losses are ignored; a run without a loss never counts as improving.
"""

from __future__ import annotations

import math

from torch import Tensor

from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core.stats import RobustNormStats

__all__ = ["LONG_DECAY", "RECENT_DECAY", "LossTrend"]

#: decay of the recent running mean of the loss (about the last 10 steps)
RECENT_DECAY = 0.9
#: decay of the longer running mean of the loss (about the last 50 steps)
LONG_DECAY = 0.98


class LossTrend(Stateful):
    """Recent and longer running means of the loss; ``improving`` when the recent is lower.

    Example:
        >>> t = LossTrend()
        >>> for x in [4.0, 4.0, 4.0]:
        ...     t.update(x)
        >>> t.improving  # equal means: no progress shown yet
        False
        >>> for x in [float(40 - k) / 10 for k in range(30)]:
        ...     t.update(x)
        >>> t.improving
        True
        >>> for x in [5.0] * 10 + [float("nan")]:
        ...     t.update(x)
        >>> t.improving  # recent mean above the longer one and above the first loss
        False
    """

    first: float

    def __init__(self) -> None:
        super().__init__()
        self.recent = RobustNormStats(ema_decay=RECENT_DECAY)
        self.long = RobustNormStats(ema_decay=LONG_DECAY)
        self._add_child("recent", self.recent)
        self._add_child("long", self.long)
        self._add_state("first", math.nan)

    def update(self, loss: float | Tensor | None) -> None:
        """Feed one step's loss (``None`` and non-finite values are ignored)."""
        if loss is None:
            return
        v = float(loss)
        if math.isnan(self.first) and math.isfinite(v):
            self.first = v
        self.recent.update(v)
        self.long.update(v)

    @property
    def improving(self) -> bool:
        """The recent mean of the loss is below the longer one and below the first loss."""
        return (self.recent.count > 0 and self.recent.mean < self.long.mean
                and self.recent.mean < self.first)
