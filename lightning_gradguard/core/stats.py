r"""Running statistics of the gradient norm that NaN, Inf and outliers cannot poison.

Update rule for an observation :math:`x_t` (after the :math:`n`-th finite one):

.. math::

    a &= \max\big(1 - \beta,\ 1/(n+1)\big) \\
    \tilde x &= \min(x_t, u_t) \qquad (u_t\text{: the bound, e.g. the clip threshold}) \\
    \delta &= \tilde x - \mu, \quad \mu \leftarrow \mu + a\,\delta, \quad
    \sigma^2 \leftarrow (1 - a)\,(\sigma^2 + a\,\delta^2)

For the first :math:`1/(1-\beta)` observations this is the exact running mean and
(population) variance; after that an exponential moving average with decay :math:`\beta`.
Non-finite observations are masked out entirely (state and count unchanged), and a spike
enters only in bounded form (clamped to :math:`u_t`), so one ×1e6 outlier moves the mean
by at most :math:`a (u_t - \mu)`. Everything is tensor arithmetic on the gradients' device:
no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core._validation import check_number

__all__ = ["RobustNormStats"]


class RobustNormStats(Stateful):
    """EMA mean and variance of a scalar with NaN/Inf masking and bounded entries.

    Args:
        ema_decay: :math:`\\beta` in ``[0, 1)``; the weight of the history once warmed up.

    Example:
        >>> s = RobustNormStats(ema_decay=0.9)
        >>> for x in [1.0, 3.0, float("nan"), float("inf")]:
        ...     s.update(torch.tensor(x))
        >>> s.count.item(), s.mean.item(), s.std.item()
        (2, 2.0, 1.0)
        >>> s.update(torch.tensor(1e6), bound=torch.tensor(4.0))  # a spike enters as 4.0
        >>> round(s.mean.item(), 4)
        2.6667
    """

    count: Tensor
    mean: Tensor
    var: Tensor

    def __init__(self, ema_decay: float = 0.97) -> None:
        super().__init__()
        self.ema_decay = check_number("ema_decay", ema_decay, low=0.0, high=1.0,
                                      high_inclusive=False)
        self._add_state("count", torch.tensor(0, dtype=torch.long))
        # float64: squared deviations of norms up to ~1e154 stay finite
        self._add_state("mean", torch.tensor(0.0, dtype=torch.float64))
        self._add_state("var", torch.tensor(0.0, dtype=torch.float64))

    @property
    def std(self) -> Tensor:
        """Standard deviation, :math:`\\sqrt{\\sigma^2}` (0-dim tensor)."""
        return self.var.clamp_min(0.0).sqrt()

    def update(self, x: Tensor, bound: Tensor | None = None) -> None:
        """Feed one observation; non-finite ones are ignored, spikes clamped to ``bound``.

        Args:
            x: 0-dim tensor (any float dtype, any device; state follows its device).
            bound: Optional 0-dim upper bound for what enters the statistics. A non-finite
                bound means "no bound".
        """
        self.to(x.device)
        x = x.detach().to(torch.float64)
        finite = torch.isfinite(x)
        if bound is not None:
            b = bound.detach().to(device=x.device, dtype=torch.float64)
            x = torch.where(torch.isfinite(b), torch.minimum(x, b), x)
        x = torch.where(finite, x, self.mean)
        a = torch.clamp_min(1.0 / (self.count + 1).to(torch.float64), 1.0 - self.ema_decay)
        delta = x - self.mean
        new_mean = self.mean + a * delta
        new_var = (1.0 - a) * (self.var + a * delta * delta)
        finite = finite & torch.isfinite(new_var)
        self.mean = torch.where(finite, new_mean, self.mean)
        self.var = torch.where(finite, new_var, self.var)
        self.count = self.count + finite.to(torch.long)
