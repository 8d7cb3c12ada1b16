r"""Is training making progress? The loss trend that keeps a learning run from a backoff.

A gradient norm that rises step after step is the signature of an LR above the stability
limit, but not only of that: while a model fits targets of a large scale, or while a
zero-initialised head grows, the gradient that reaches the body grows with it, and the loss
falls all the while. A z-score threshold lags such a trend, so clipping becomes the rule on a
run that is learning well (a regression MLP with Adam: gradient norm 10 -> 28 while the loss
fell 15 -> 7; four backoffs left it 4.5x worse than without the guard). An unstable run does
not learn: its loss rises, or at least stops falling, and stays above where it started.

The evidence is the median of the last :data:`RECENT` finite losses, the median of the last
:data:`LONG` (the default ``spike_window``), and the run's first loss. The loss is
*improving* when the recent median is below both: still going down, and below where the run
started. Medians, because one outlier batch (a loss of 1e7 on a corrupt batch) is not a
trend: it moves neither median, where it would hold a running mean up for a hundred steps.
The first loss matters because a loss that an instability drove to ten times its start falls
back afterwards, and against a longer median inflated by that excursion the run would look
as if it learned. Up to :data:`RECENT` losses both windows hold the same values, so over the
first steps nothing counts as improving: an explosion at the start is judged as before.
Non-finite losses are ignored; a run without a loss never counts as improving.
"""

from __future__ import annotations

import math
import statistics

from torch import Tensor

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._stateful import Stateful

__all__ = ["LONG", "RECENT", "LossTrend"]

#: how many of the latest finite losses make the recent median
RECENT = 10
#: how many of the latest finite losses make the longer median
LONG = 50


@friendly_kwargs
class LossTrend(Stateful):
    """The recent and longer medians of the loss; ``improving`` when the recent is lower.

    Example:
        >>> t = LossTrend()
        >>> for x in [4.0, 4.0, 4.0]:
        ...     t.update(x)
        >>> t.improving  # both windows hold the same losses: no progress shown yet
        False
        >>> for x in [float(40 - k) / 10 for k in range(30)]:
        ...     t.update(x)
        >>> t.improving
        True
        >>> t.update(1e7)  # one outlier batch is not a trend
        >>> t.improving
        True
        >>> for x in [5.0] * 10 + [float("nan")]:
        ...     t.update(x)
        >>> t.improving  # the recent median above the longer one and above the first loss
        False
    """

    first: float
    losses: list[float]

    def __init__(self) -> None:
        super().__init__()
        self._add_state("first", math.nan)
        #: the latest finite losses, oldest first (at most :data:`LONG`)
        self._add_state("losses", [])

    def update(self, loss: float | Tensor | None) -> None:
        """Feed one step's loss (``None`` and non-finite values are ignored)."""
        if loss is None:
            return
        v = float(loss)
        if not math.isfinite(v):
            return
        if math.isnan(self.first):
            self.first = v
        self.losses.append(v)
        if len(self.losses) > LONG:
            del self.losses[0]

    @property
    def recent(self) -> float:
        """Median of the last :data:`RECENT` finite losses (NaN before the first)."""
        return statistics.median(self.losses[-RECENT:]) if self.losses else math.nan

    @property
    def long(self) -> float:
        """Median of the last :data:`LONG` finite losses (NaN before the first)."""
        return statistics.median(self.losses) if self.losses else math.nan

    @property
    def improving(self) -> bool:
        """The recent median is below the longer one and below the first loss."""
        if len(self.losses) <= RECENT:
            return False
        recent = self.recent
        return recent < self.long and recent < self.first
