r"""Clipping-threshold policies: one small class each, one interface.

Every policy is :class:`~lightning_gradguard.core._stateful.Stateful` and answers two calls
per optimizer step, both on device tensors (no host synchronisation):

1. :meth:`ClipPolicy.threshold` — the threshold :math:`\tau_t` for this step, computed from
   the history *before* the step (so a spike can never raise the threshold it is judged by);
   ``inf`` means "no global clip".
2. :meth:`ClipPolicy.observe` — feed the step's total norm. Non-finite norms never enter the
   history; spikes enter in bounded form.

=========================  =========================================================
policy                     threshold :math:`\tau_t`
=========================  =========================================================
:class:`NoClip`            ``inf`` (never clip; detection and skipping only)
:class:`FixedNormClip`     ``max_norm`` (what ``gradient_clip_val`` does)
:class:`ZScoreClip`        :math:`\mu + z\,\sigma` of an EMA (ZClip, Kumar et al. 2025),
                           with protection during warmup
:class:`PercentileClip`    :math:`q`-th percentile of a bounded history (AutoClip,
                           Seetharaman et al. 2020)
:class:`AdaptiveGradClip`  none globally; per unit :math:`\lambda \max(\|W_i\|, \epsilon)`
                           (AGC, Brock et al. 2021, arXiv:2102.06171)
=========================  =========================================================
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core._validation import check_int, check_number
from lightning_gradguard.core.stats import RobustNormStats

__all__ = [
    "AdaptiveGradClip",
    "ClipPolicy",
    "FixedNormClip",
    "NoClip",
    "PercentileClip",
    "ZScoreClip",
    "unitwise_norm",
]

_INF = float("inf")
#: Floor of the z-score's sigma relative to the mean: with perfectly constant norms
#: (sigma = 0) the threshold would equal the mean and could never rise again.
_MIN_REL_STD = 0.01


class ClipPolicy(Stateful):
    """Base class of the threshold policies.

    Subclasses implement :meth:`threshold` and :meth:`observe`; unit-wise policies also
    override :meth:`clip_unitwise_`.
    """

    #: Whether this policy clips per unit (then :meth:`clip_unitwise_` is called each step).
    unitwise: bool = False

    def threshold(self, device: torch.device | None = None) -> Tensor:
        """Threshold for the coming step as a 0-dim float32 tensor (``inf``: no clip)."""
        raise NotImplementedError

    def observe(self, norm: Tensor, threshold: Tensor) -> None:
        """Feed the step's total norm (pre-clip) and the threshold it was judged by."""

    def clip_unitwise_(
        self, params: Sequence[torch.nn.Parameter], names: Sequence[str] | None = None
    ) -> Tensor:
        """Clip gradients per unit in place; returns the number of clipped units (tensor)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_")
                         and not isinstance(v, (Tensor, Stateful)))
        return f"{type(self).__name__}({args})"


class FixedNormClip(ClipPolicy):
    """A fixed norm threshold, as ``Trainer(gradient_clip_val=max_norm)``.

    Args:
        max_norm: The threshold (> 0).

    Example:
        >>> FixedNormClip(1.0).threshold()
        tensor(1.)
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        super().__init__()
        self.max_norm = check_number("max_norm", max_norm, low=0.0, low_inclusive=False)

    def threshold(self, device: torch.device | None = None) -> Tensor:
        """Return ``max_norm``."""
        return torch.tensor(self.max_norm, dtype=torch.float32, device=device)


class NoClip(ClipPolicy):
    """Never clip (detection, skipping and LR backoff still work).

    Example:
        >>> NoClip().threshold()
        tensor(inf)
    """

    def threshold(self, device: torch.device | None = None) -> Tensor:
        """Return ``inf``."""
        return torch.tensor(_INF, dtype=torch.float32, device=device)


class ZScoreClip(ClipPolicy):
    r"""Z-score adaptive threshold :math:`\tau = \mu + z\,\sigma` over an EMA of the norm.

    As in ZClip, spikes are judged against the statistics of the steps before them. An
    isolated spike does not enter the statistics at all (so one ×1e6 outlier leaves the
    threshold exactly where it was); consecutive spikes enter clamped to :math:`\tau`, so a
    genuine change of scale is followed. Unlike a watch-only warmup, the threshold is
    active from the second step: during the first ``warmup_steps`` observations it is
    :math:`\max(\mu + z\sigma,\ f\,\mu)` with :math:`f` = ``warmup_factor`` (the variance
    estimate is still noisy, so the bound is looser but present). :math:`\sigma` is floored
    at 1% of :math:`\mu` so that perfectly constant norms cannot freeze the threshold, and
    all-zero gradients (norm 0) carry no scale information and do not enter.

    Args:
        z_threshold: :math:`z > 0`; how many standard deviations above the mean is a spike.
        ema_decay: Decay :math:`\beta \in [0, 1)` of the EMA (the ZClip paper's ``alpha``).
        warmup_steps: Observations before the pure z-score threshold is used.
        warmup_factor: :math:`f \geq 1`; the warmup threshold is at least :math:`f\mu`.

    Example:
        >>> clip = ZScoreClip(z_threshold=3.0, warmup_steps=2)
        >>> clip.threshold()  # nothing seen yet
        tensor(inf)
        >>> for x in [1.0, 1.2, 0.8, 1.0]:
        ...     clip.observe(torch.tensor(x), clip.threshold())
        >>> round(clip.threshold().item(), 3)
        1.424
    """

    prev_spike: Tensor

    def __init__(
        self,
        z_threshold: float = 3.0,
        ema_decay: float = 0.97,
        warmup_steps: int = 25,
        warmup_factor: float = 3.0,
    ) -> None:
        super().__init__()
        self.z_threshold = check_number("z_threshold", z_threshold, low=0.0,
                                        low_inclusive=False)
        self.ema_decay = check_number("ema_decay", ema_decay, low=0.0, high=1.0,
                                      high_inclusive=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        self.warmup_factor = check_number("warmup_factor", warmup_factor, low=1.0)
        self._stats = RobustNormStats(ema_decay=self.ema_decay)
        self._add_child("stats", self._stats)
        self._add_state("prev_spike", torch.tensor(False))

    @property
    def stats(self) -> RobustNormStats:
        """The underlying running statistics."""
        return self._stats

    def threshold(self, device: torch.device | None = None) -> Tensor:
        """:math:`\\mu + z\\sigma` (warmup: at least ``warmup_factor`` × mean; none: inf)."""
        s = self._stats
        if device is not None:
            s.to(device)
        std = torch.maximum(s.std, _MIN_REL_STD * s.mean)
        z_thr = s.mean + self.z_threshold * std
        warm_thr = torch.maximum(z_thr, self.warmup_factor * s.mean)
        thr = torch.where(s.count >= self.warmup_steps, z_thr, warm_thr)
        thr = torch.where((s.count > 0) & (s.mean > 0), thr, torch.full_like(thr, _INF))
        return thr.float()

    def observe(self, norm: Tensor, threshold: Tensor) -> None:
        """Update the EMA: an isolated spike is left out, a repeated one enters clamped.

        A norm above ``threshold`` right after a normal step is an isolated outlier and does
        not enter the statistics at all; a second spike in a row (a genuine shift of the
        scale) enters clamped to ``threshold``, so the statistics can follow a new regime
        without ever being dragged by the size of a spike. Non-finite norms never enter.
        """
        self.to(norm.device)
        finite = torch.isfinite(norm) & (norm > 0)  # all-zero gradients carry no scale
        spike = finite & torch.isfinite(threshold) & (norm > threshold)
        enter = ~spike | self.prev_spike
        self.prev_spike = torch.where(finite, spike, self.prev_spike)
        x = torch.where(enter, norm.detach().float(), torch.full_like(norm, math.nan).float())
        self._stats.update(x, bound=threshold)



class PercentileClip(ClipPolicy):
    """The ``percentile``-th percentile of the last ``history_size`` finite norms (AutoClip).

    The history is a fixed-size ring buffer tensor, so memory is bounded whatever the run
    length. Non-finite norms never enter it. The threshold is ``inf`` until ``min_history``
    norms have been seen.

    Args:
        percentile: In ``(0, 100]``; AutoClip's paper recommends 10.
        history_size: Capacity of the ring buffer (>= 1).
        min_history: Norms needed before clipping starts (1 .. ``history_size``).

    Example:
        >>> clip = PercentileClip(percentile=50, history_size=4, min_history=1)
        >>> for x in [1.0, 2.0, 3.0, float("nan"), 4.0, 5.0]:
        ...     clip.observe(torch.tensor(x), clip.threshold())
        >>> clip.threshold()
        tensor(3.5000)
    """

    history: Tensor
    cursor: Tensor
    count: Tensor

    def __init__(self, percentile: float = 10.0, history_size: int = 1000,
                 min_history: int = 1) -> None:
        super().__init__()
        self.percentile = check_number("percentile", percentile, low=0.0, high=100.0,
                                       low_inclusive=False)
        self.history_size = check_int("history_size", history_size, low=1)
        self.min_history = check_int("min_history", min_history, low=1, high=history_size)
        self._add_state("history", torch.full((history_size,), math.nan, dtype=torch.float32))
        self._add_state("cursor", torch.tensor(0, dtype=torch.long))
        self._add_state("count", torch.tensor(0, dtype=torch.long))

    def threshold(self, device: torch.device | None = None) -> Tensor:
        """Percentile of the history (``inf`` until ``min_history`` norms were seen)."""
        if device is not None:
            self.to(device)
        q = torch.nanquantile(self.history, self.percentile / 100.0)
        ready = (self.count >= self.min_history) & torch.isfinite(q)
        return torch.where(ready, q, torch.full_like(q, _INF))

    def observe(self, norm: Tensor, threshold: Tensor) -> None:
        """Append a finite norm to the ring buffer (a quantile needs no clamping)."""
        self.to(norm.device)
        x = norm.detach().to(torch.float32)
        finite = torch.isfinite(x)
        slot = self.cursor % self.history_size
        current = self.history[slot]
        self.history = self.history.index_put((slot.reshape(1),),
                                              torch.where(finite, x, current).reshape(1))
        step = finite.to(torch.long)
        self.cursor = self.cursor + step
        self.count = torch.clamp_max(self.count + step, self.history_size)


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm per unit: vectors/scalars as a whole, matrices/conv kernels per output row/channel.

    PyTorch's layouts put the output dimension first: ``Linear.weight`` is ``(out, in)``,
    ``Conv2d.weight`` is ``(out, in, kh, kw)``; the result keeps dims for broadcasting.

    Example:
        >>> unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([[5.],
                [1.]])
    """
    out: Tensor
    if x.ndim <= 1:
        out = torch.linalg.vector_norm(x.float())
    else:
        out = torch.linalg.vector_norm(x.float(), dim=tuple(range(1, x.ndim)), keepdim=True)
    return out


class AdaptiveGradClip(ClipPolicy):
    r"""Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, arXiv:2102.06171).

    For every unit :math:`i` (output row of a weight, output channel of a conv kernel, or a
    whole bias vector) with weights :math:`W_i` and gradient :math:`G_i`:

    .. math::

        G_i \leftarrow G_i \cdot \min\Big(1,\ \frac{\lambda \max(\|W_i\|, \epsilon)}
        {\|G_i\|}\Big)

    There is no global threshold (``threshold()`` is ``inf``). Parameters whose name matches
    one of the ``exclude`` glob patterns are not clipped (the paper excludes the final
    classifier layer).

    Args:
        clipping: :math:`\lambda > 0`.
        eps: :math:`\epsilon > 0`, the floor for zero-initialised weights.
        exclude: Glob patterns of parameter names to leave alone (e.g. ``["head.*"]``).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
        >>> w.grad = torch.tensor([[30.0, 40.0]])   # ||G|| = 50, ||W|| = 5
        >>> AdaptiveGradClip(clipping=0.1).clip_unitwise_([w])
        tensor(1)
        >>> w.grad  # rescaled to 0.1 * 5 = 0.5
        tensor([[0.3000, 0.4000]])
    """

    unitwise = True

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3,
                 exclude: Sequence[str] = ()) -> None:
        super().__init__()
        self.clipping = check_number("clipping", clipping, low=0.0, low_inclusive=False)
        self.eps = check_number("eps", eps, low=0.0, low_inclusive=False)
        if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
            raise TypeError(f"`exclude` must be a sequence of glob strings, got {exclude!r}")
        self.exclude = tuple(exclude)

    def threshold(self, device: torch.device | None = None) -> Tensor:
        """No global threshold: ``inf``."""
        return torch.tensor(_INF, dtype=torch.float32, device=device)

    def _excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)

    def clip_unitwise_(
        self, params: Sequence[torch.nn.Parameter], names: Sequence[str] | None = None
    ) -> Tensor:
        """Clip every unit's gradient in place; return how many units were clipped."""
        clipped: list[Tensor] = []
        for i, p in enumerate(params):
            g = p.grad
            if g is None or (names is not None and self._excluded(names[i])):
                continue
            max_norm = unitwise_norm(p.detach()).clamp_min(self.eps) * self.clipping
            g_norm = unitwise_norm(g.detach())
            over = g_norm > max_norm
            scale = torch.where(over, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
            g.mul_(scale.to(g.dtype))
            clipped.append(over.sum())
        if not clipped:
            return torch.tensor(0)
        return torch.stack(clipped).sum()
