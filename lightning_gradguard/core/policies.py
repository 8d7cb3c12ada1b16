r"""Clipping-threshold policies: one small class each, one interface.

Every policy is :class:`~lightning_gradguard.core._stateful.Stateful` and answers two calls
per optimizer step, on host floats (the guard has read the step's norm back once already, to
decide; a handful of float operations then cost far less than ~60 tiny device kernels):

1. :meth:`ClipPolicy.threshold_value` — the threshold :math:`\tau_t` for this step, computed
   from the history *before* the step (so a spike can never raise the threshold it is judged
   by); ``inf`` means "no global clip".
2. :meth:`ClipPolicy.observe_value` — feed the step's total norm. Non-finite norms never
   enter the history; spikes enter in bounded form.

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

import bisect
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core._validation import check_int, check_number
from lightning_gradguard.core.stats import RobustNormStats

__all__ = [
    "AdaptiveGradClip",
    "ClipPolicy",
    "FixedNormClip",
    "NoClip",
    "PercentileClip",
    "UnitScale",
    "ZScoreClip",
    "apply_unit_scales_",
    "unitwise_norm",
]

_INF = float("inf")
#: Floor of the z-score's sigma relative to the mean: with perfectly constant norms
#: (sigma = 0) the threshold would equal the mean and could never rise again.
_MIN_REL_STD = 0.01


class UnitScale(NamedTuple):
    """One parameter's unit-wise clip factors (device tensors): :meth:`ClipPolicy.unit_scales`.

    Attributes:
        param: The parameter's position in the list the factors were asked for.
        scale: The factors to multiply the gradient by: broadcastable to a dense gradient
            (``keepdim``); for a row-sparse gradient one per row of the weights.
        clipped: How many units are over their limit (0-dim tensor).
        unit_norms: The norms of the gradient's units (2-norm, float32; for a sparse gradient
            those of the rows it holds).
        unit_scale: The factors aligned with ``unit_norms``: the clipped gradient's 2-norm is
            ``vector_norm(unit_norms * unit_scale)``.
    """

    param: int
    scale: Tensor
    clipped: Tensor
    unit_norms: Tensor
    unit_scale: Tensor


class ClipPolicy(Stateful):
    """Base class of the threshold policies.

    Subclasses implement :meth:`threshold_value` and, if they learn from the history,
    :meth:`observe_value`; both work on host floats (the guard has read the step's norm to
    the host once anyway). :meth:`threshold` / :meth:`observe` are tensor conveniences for
    direct use. Unit-wise policies also override :meth:`unit_scales` and :meth:`clip_unitwise_`.
    """

    #: Whether this policy clips per unit (then :meth:`unit_scales` is asked each step).
    unitwise: bool = False

    def threshold_value(self) -> float:
        """Threshold for the coming step (``inf``: no clip), from the history so far."""
        raise NotImplementedError

    def observe_value(self, norm: float, threshold: float) -> None:
        """Feed the step's total norm (pre-clip) and the threshold it was judged by."""

    def threshold(self, device: torch.device | None = None) -> Tensor:
        """:meth:`threshold_value` as a 0-dim float32 tensor on ``device``."""
        return torch.tensor(self.threshold_value(), dtype=torch.float32, device=device)

    def observe(self, norm: float | Tensor, threshold: float | Tensor) -> None:
        """:meth:`observe_value` for tensors or floats (tensors are read to the host)."""
        self.observe_value(float(norm), float(threshold))

    def unit_scales(
        self, params: Sequence[torch.nn.Parameter], names: Sequence[str] | None = None
    ) -> list[UnitScale]:
        """Each unit's clip factor (device tensors; the gradients are not written).

        The measure stage asks for them (and reads the clipped total from them); the apply
        stage multiplies the gradients by them (:func:`apply_unit_scales_`).
        """
        raise NotImplementedError

    def clip_unitwise_(
        self, params: Sequence[torch.nn.Parameter], names: Sequence[str] | None = None
    ) -> Tensor:
        """Clip gradients per unit in place; returns the number of clipped units (tensor)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_")
                         and not isinstance(v, (Tensor, Stateful)) and k not in self._defaults)
        return f"{type(self).__name__}({args})"


@friendly_kwargs
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

    def threshold_value(self) -> float:
        """Return ``max_norm``."""
        return self.max_norm


@friendly_kwargs
class NoClip(ClipPolicy):
    """Never clip (detection, skipping and LR backoff still work).

    Example:
        >>> NoClip().threshold()
        tensor(inf)
    """

    def threshold_value(self) -> float:
        """Return ``inf``."""
        return _INF


#: During warmup a spike right after a spike enters the statistics unclamped when it is at
#: most this factor above the previous one (a steady level, not growth).
_STEADY_RISE = 1.05


@friendly_kwargs
class ZScoreClip(ClipPolicy):
    r"""Z-score adaptive threshold :math:`\tau = \mu + z\,\sigma` over an EMA of the norm.

    As in ZClip, spikes are judged against the statistics of the steps before them. An
    isolated spike does not enter the statistics at all (so one ×1e6 outlier leaves the
    threshold exactly where it was); consecutive spikes enter clamped to :math:`\tau`, so a
    genuine change of scale is followed; during warmup a second spike no higher than the
    first enters unclamped (a steady level the first few norms missed, e.g. after a tiny
    first gradient, rather than growth). Unlike a watch-only warmup, the threshold is
    active from the second step: during the first ``warmup_steps`` observations it is
    :math:`\max(\mu + z\sigma,\ f\,\mu)` with :math:`f` = ``warmup_factor`` (the variance
    estimate is still noisy, so the bound is looser but present). :math:`\sigma` is floored
    at 1% of :math:`\mu` so that perfectly constant norms cannot freeze the threshold, and
    all-zero gradients (norm 0) carry no scale information and do not enter.

    Args:
        z_threshold: :math:`z > 0`; how many standard deviations above the mean is a spike.
            The default 2.5 is ZClip's; on the stability grid it clips the rare outliers of
            noisy, healthy runs that 3.0 lets through (see the README's defaults section).
        ema_decay: Decay :math:`\beta \in [0, 1)` of the EMA (the ZClip paper's ``alpha``).
        warmup_steps: Observations before the pure z-score threshold is used.
        warmup_factor: :math:`f \geq 1`; the warmup threshold is at least :math:`f\mu`.
            The default 10 leaves the volatile first steps of a healthy run alone (a 5x
            rise at step 2 is common) while any outlier beyond that is still clipped; with
            plain SGD the guard's ``max_update_ratio`` bounds those early updates too.

    Example:
        >>> clip = ZScoreClip(z_threshold=3.0, warmup_steps=2)
        >>> clip.threshold_value()  # nothing seen yet
        inf
        >>> for x in [1.0, 1.2, 0.8, 1.0]:
        ...     clip.observe_value(x, clip.threshold_value())
        >>> round(clip.threshold_value(), 3)
        1.424
    """

    prev_spike: bool
    prev_norm: float

    def __init__(
        self,
        z_threshold: float = 2.5,
        ema_decay: float = 0.97,
        warmup_steps: int = 25,
        warmup_factor: float = 10.0,
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
        self._add_state("prev_spike", False)
        self._add_state("prev_norm", 0.0)

    @property
    def stats(self) -> RobustNormStats:
        """The underlying running statistics."""
        return self._stats

    def threshold_value(self) -> float:
        """:math:`\\mu + z\\sigma` (warmup: at least ``warmup_factor`` × mean; none: inf)."""
        s = self._stats
        if s.count == 0 or s.mean <= 0.0:
            return _INF
        std = max(s.std, _MIN_REL_STD * s.mean)
        thr = s.mean + self.z_threshold * std
        if s.count < self.warmup_steps:
            thr = max(thr, self.warmup_factor * s.mean)
        return thr

    def observe_value(self, norm: float, threshold: float) -> None:
        """Update the EMA: an isolated spike is left out, a repeated one enters clamped.

        A norm above ``threshold`` right after a normal step is an isolated outlier and does
        not enter the statistics at all; a second spike in a row (a genuine shift of the
        scale) enters clamped to ``threshold``, so the statistics can follow a new regime
        without ever being dragged by the size of a spike. Non-finite norms never enter.
        """
        if not (math.isfinite(norm) and norm > 0.0):  # all-zero gradients carry no scale
            return
        spike = math.isfinite(threshold) and norm > threshold
        enter = not spike or self.prev_spike
        bound: float | None = threshold
        if (spike and self.prev_spike and self._stats.count < self.warmup_steps
                and norm <= self.prev_norm * _STEADY_RISE):
            # warmup, and a second spike no higher than the first: a steady level the few
            # early observations missed (e.g. a tiny first norm), not growth -> unclamped
            bound = None
        self.prev_spike = spike
        self.prev_norm = norm
        if enter:
            self._stats.update(norm, bound=bound)


@friendly_kwargs
class PercentileClip(ClipPolicy):
    """The ``percentile``-th percentile of the last ``history_size`` finite norms (AutoClip).

    The history is a fixed-size ring buffer (plus a sorted copy for an O(log n) percentile),
    so memory is bounded whatever the run length. Non-finite norms never enter it. The
    threshold is ``inf`` until ``min_history`` norms have been seen.

    Args:
        percentile: In ``(0, 100]``; AutoClip's paper recommends 10.
        history_size: Capacity of the ring buffer (>= 1).
        min_history: Norms needed before clipping starts (1 .. ``history_size``).

    Example:
        >>> clip = PercentileClip(percentile=50, history_size=4, min_history=1)
        >>> for x in [1.0, 2.0, 3.0, float("nan"), 4.0, 5.0]:
        ...     clip.observe_value(x, clip.threshold_value())
        >>> clip.threshold_value()
        3.5
    """

    ring: list[float]
    cursor: int
    count: int

    def __init__(self, percentile: float = 10.0, history_size: int = 1000,
                 min_history: int = 1) -> None:
        super().__init__()
        self.percentile = check_number("percentile", percentile, low=0.0, high=100.0,
                                       low_inclusive=False)
        self.history_size = check_int("history_size", history_size, low=1)
        self.min_history = check_int("min_history", min_history, low=1, high=history_size)
        self._add_state("ring", [math.nan] * history_size)
        self._add_state("cursor", 0)
        self._add_state("count", 0)
        self._sorted: list[float] = []

    @property
    def history(self) -> Tensor:
        """The ring buffer as a tensor (NaN where empty), in slot order."""
        return torch.tensor(self.ring, dtype=torch.float32)

    def _resort(self) -> None:
        self._sorted = sorted(v for v in self.ring if math.isfinite(v))

    def reset(self) -> None:
        """Forget the history."""
        super().reset()
        self._sorted = []

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        super().load_state_dict(state_dict)
        self._resort()

    def threshold_value(self) -> float:
        """Percentile of the history (``inf`` until ``min_history`` norms were seen)."""
        data = self._sorted
        if self.count < self.min_history or not data:
            return _INF
        pos = self.percentile / 100.0 * (len(data) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    def observe_value(self, norm: float, threshold: float) -> None:
        """Append a finite norm to the ring buffer (a percentile needs no clamping)."""
        if not math.isfinite(norm):
            return
        slot = self.cursor % self.history_size
        old = self.ring[slot]
        if math.isfinite(old):
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        bisect.insort(self._sorted, norm)
        self.ring[slot] = norm
        self.cursor += 1
        self.count = min(self.count + 1, self.history_size)


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


@friendly_kwargs
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

    def threshold_value(self) -> float:
        """No global threshold: ``inf``."""
        return _INF

    def _unit_scale(self, w: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Which units are over their limit, the factor of every unit, and their norms."""
        max_norm = unitwise_norm(w).clamp_min(self.eps) * self.clipping
        g_norm = unitwise_norm(g)
        over = g_norm > max_norm
        return over, torch.where(over, max_norm / g_norm.clamp_min(1e-6),
                                 torch.ones_like(g_norm)), g_norm

    def _sparse_scale(self, index: int, p: torch.nn.Parameter) -> UnitScale:
        """AGC factors of a row-sparse COO gradient (``nn.Embedding(sparse=True)``).

        Each row the gradient holds is judged against the same row of the weights; the
        factor is one per row of the weights (``1`` for the rows the gradient does not hold).

        Raises:
            TypeError: For a sparse gradient that is not row-sparse (``sparse_dim() == 1``)
                over a matrix.
        """
        g = p.grad
        assert g is not None
        if g.sparse_dim() != 1 or p.ndim < 2:
            raise TypeError(
                "AdaptiveGradClip supports sparse gradients only when they are row-sparse "
                f"(sparse_dim()=1) over a matrix, got sparse_dim()={g.sparse_dim()} for a "
                f"{p.ndim}-D parameter; exclude it with `exclude=` or use ZScoreClip")
        summed = g.coalesce()
        rows = summed.indices()[0]
        over, scale, g_norm = self._unit_scale(p.detach()[rows], summed.values())
        factor = torch.ones(p.shape[0], dtype=scale.dtype, device=scale.device)
        factor = factor.index_copy(0, rows, scale.reshape(-1))
        return UnitScale(index, factor, over.sum(), g_norm, scale)

    def _excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)

    def unit_scales(
        self, params: Sequence[torch.nn.Parameter], names: Sequence[str] | None = None
    ) -> list[UnitScale]:
        """The unit factors of every parameter with a gradient that is not excluded.

        The gradients are left as they are (:meth:`clip_unitwise_` also applies them).

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
            >>> w.grad = torch.tensor([[30.0, 40.0]])
            >>> (s,) = AdaptiveGradClip(clipping=0.1).unit_scales([w])
            >>> s.scale, s.clipped, w.grad
            (tensor([[0.0100]]), tensor(1), tensor([[30., 40.]]))
        """
        out: list[UnitScale] = []
        for i, p in enumerate(params):
            g = p.grad
            if g is None or (names is not None and self._excluded(names[i])):
                continue
            if g.is_sparse:
                out.append(self._sparse_scale(i, p))
                continue
            over, scale, g_norm = self._unit_scale(p.detach(), g.detach())
            out.append(UnitScale(i, scale, over.sum(), g_norm, scale))
        return out

    def clip_unitwise_(
        self, params: Sequence[torch.nn.Parameter], names: Sequence[str] | None = None
    ) -> Tensor:
        """Clip every unit's gradient in place; return how many units were clipped.

        :meth:`unit_scales` then :func:`apply_unit_scales_` (the guard runs the two in
        different stages).
        """
        scales = self.unit_scales(params, names)
        apply_unit_scales_(params, scales)
        if not scales:
            return torch.tensor(0)
        return torch.stack([s.clipped for s in scales]).sum()


def apply_unit_scales_(params: Sequence[torch.nn.Parameter],
                       scales: Sequence[UnitScale]) -> None:
    """Multiply the gradients of ``params`` by their unit factors, in place.

    A sparse gradient's stored values are scaled (the gradient stays the same object).
    """
    for s in scales:
        g = params[s.param].grad
        if g is None:
            continue
        if g.is_sparse:
            values = g._values()
            values.mul_(s.scale[g._indices()[0]].to(values.dtype).reshape(
                (-1,) + (1,) * (values.dim() - 1)))
        else:
            g.mul_(s.scale.to(g.dtype))
