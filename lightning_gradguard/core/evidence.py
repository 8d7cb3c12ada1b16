r"""Cheap evidence for the diagnosis: pure functions of host floats (and, rarely, tensors).

* :func:`fit_growth`: the geometric factor per layer of a depth profile, fitted by least
  squares on the logarithms (not first over last, so one odd layer does not decide it):
  for values :math:`v_0, \dots, v_{n-1}` ordered from the output towards the input, the
  factor is :math:`e^{b}` where :math:`\log v_i \approx a + b\,i`.
* :func:`update_ratio`: how far one step moves the weights,
  :math:`\eta\,\|g\| / \|w\|` for SGD and :math:`\eta\sqrt{n} / \|w\|` for adaptive optimizers
  (Adam's first steps move every coordinate by about :math:`\eta`).
* :func:`loss_trend`: a sudden jump (flat, then ×10 in one step or non-finite) versus a
  gradual rise (several steps in a row, ×2 or more overall).
* :func:`schedule_position`: where the learning rate is in its schedule (warmup just ended,
  at its peak).
* :func:`batch_nonfinite`: NaN/Inf in the tensors of a batch (only called on a non-finite
  step: it reads the batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "LossTrend",
    "batch_nonfinite",
    "fit_growth",
    "loss_trend",
    "schedule_position",
    "update_ratio",
]


def fit_growth(values: Sequence[float]) -> float | None:
    """Geometric growth factor per position, least-squares fit of ``log(values)``.

    Non-finite and non-positive values are left out; fewer than 3 usable values give ``None``.

    Example:
        >>> round(fit_growth([1.0, 2.0, 4.0, 8.0, 16.0]), 3)
        2.0
        >>> round(fit_growth([1.0, 2.1, 3.9, 8.3, 15.8]), 1)
        2.0
        >>> fit_growth([1.0, float("nan")]) is None
        True
    """
    pts = [(float(i), math.log(v)) for i, v in enumerate(values) if math.isfinite(v) and v > 0]
    if len(pts) < 3:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return math.exp(sxy / sxx)


def update_ratio(lr: float, grad_norm: float, weight_norm: float, *, adaptive: bool = False,
                 numel: int = 1) -> float:
    r"""Relative size of one update: :math:`\eta\|g\|/\|w\|`, or :math:`\eta\sqrt n/\|w\|`.

    Args:
        lr: The learning rate.
        grad_norm: The gradient's norm (ignored when ``adaptive``).
        weight_norm: The weights' norm.
        adaptive: Adam-like optimizer (each coordinate moves by about ``lr``).
        numel: Number of weights (used when ``adaptive``).

    Example:
        >>> update_ratio(0.1, 5.0, 2.0)
        0.25
        >>> update_ratio(1e-3, 123.0, 1.0, adaptive=True, numel=10_000)
        0.1
    """
    step = lr * math.sqrt(numel) if adaptive else lr * grad_norm
    if weight_norm <= 0 or not math.isfinite(weight_norm):
        return math.inf if step > 0 else 0.0
    return step / weight_norm


@dataclass(frozen=True)
class LossTrend:
    """How the loss got where it is.

    Attributes:
        kind: ``"jump"`` (flat, then a sudden jump or non-finite), ``"rise"`` (several
            steps in a row going up), or ``"flat"``.
        factor: Last finite loss over the reference loss (``inf`` for a non-finite one).
        steps: Steps the rise lasted (``1`` for a jump).
        before: The loss just before the jump / at the start of the rise.
    """

    kind: Literal["jump", "rise", "flat"]
    factor: float
    steps: int
    before: float


def loss_trend(losses: Sequence[float], *, jump: float = 10.0, rise: float = 2.0) -> LossTrend:
    """Classify the end of a loss history (oldest first; the last entry is the current step).

    A **rise**: the loss went up at least 3 steps in a row (or ended non-finite after at least
    2 rising steps) and grew by ``rise`` or more since the start of the run-up. A **jump**:
    the current loss is non-finite or ``jump`` times the previous one, without such a run-up.

    Example:
        >>> loss_trend([1.0, 0.9, 0.95, 0.9, float("nan")]).kind
        'jump'
        >>> t = loss_trend([1.0, 1.5, 3.0, 9.0, 40.0])
        >>> t.kind, t.steps, t.factor
        ('rise', 4, 40.0)
        >>> loss_trend([1.0, 0.8, 0.7]).kind
        'flat'
    """
    if not losses:
        return LossTrend("flat", 1.0, 0, math.nan)
    cur = losses[-1]
    prev = [v for v in losses[:-1]]
    # the run-up: consecutive increases ending at the last finite value
    seq = list(prev) + ([cur] if math.isfinite(cur) else [])
    k = len(seq) - 1
    while k > 0 and math.isfinite(seq[k - 1]) and seq[k] > seq[k - 1]:
        k -= 1
    steps = len(seq) - 1 - k
    start = seq[k] if seq else math.nan
    last_finite = seq[-1] if seq else math.nan
    grown = last_finite / start if start > 0 else math.inf
    if not math.isfinite(cur):
        if steps >= 2 and grown >= rise:
            return LossTrend("rise", math.inf, steps + 1, start)
        return LossTrend("jump", math.inf, 1, prev[-1] if prev else math.nan)
    if steps >= 3 and grown >= rise:
        return LossTrend("rise", grown, steps, start)
    if prev and math.isfinite(prev[-1]) and prev[-1] > 0 and cur >= jump * prev[-1]:
        return LossTrend("jump", cur / prev[-1], 1, prev[-1])
    return LossTrend("flat", grown if steps else 1.0, steps, start)


def schedule_position(lrs: Sequence[float], *, recent: int = 5) -> str | None:
    """Where the learning rate stands, from its history (oldest first), in words.

    Returns ``None`` for a constant LR.

    Example:
        >>> schedule_position([0.01, 0.02, 0.03, 0.04, 0.04])
        'the LR reached its peak 0.04 1 step(s) ago, at the end of a warmup from 0.01'
        >>> schedule_position([0.1, 0.1, 0.1]) is None
        True
    """
    finite = [v for v in lrs if math.isfinite(v)]
    if len(finite) < 2 or max(finite) == min(finite):
        return None
    peak = max(finite)
    at = max(i for i, v in enumerate(finite) if v == peak)
    first_peak = min(i for i, v in enumerate(finite) if v == peak)
    ago = len(finite) - 1 - first_peak
    rising = first_peak > 0 and finite[0] < peak
    if rising and ago <= recent:
        return (f"the LR reached its peak {peak:.3g} {ago} step(s) ago, at the end of a warmup "
                f"from {finite[0]:.3g}")
    if at == len(finite) - 1:
        return f"the LR is at its peak {peak:.3g}"
    return None


def _walk(value: Any, path: str, out: list[tuple[str, Tensor]]) -> None:
    if isinstance(value, Tensor):
        out.append((path or "batch", value))
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _walk(v, f"{path}[{k!r}]" if path else f"batch[{k!r}]", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]" if path else f"batch[{i}]", out)


def batch_nonfinite(batch: Any) -> list[tuple[str, int, int]]:
    """Floating tensors of ``batch`` that hold NaN/Inf: ``(path, bad count, numel)``.

    Nested tuples, lists and mappings are walked. One host read for all the tensors.

    Example:
        >>> x = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
        >>> batch_nonfinite((x, torch.tensor([0, 1])))
        [('batch[0]', 2, 4)]
        >>> batch_nonfinite({"x": torch.ones(3)})
        []
    """
    found: list[tuple[str, Tensor]] = []
    _walk(batch, "", found)
    found = [(p, t) for p, t in found if t.is_floating_point() or t.is_complex()]
    if not found:
        return []
    from lightning_gradguard.core._host import to_host

    device = found[0][1].device
    counts = to_host(torch.stack([(~torch.isfinite(t.detach())).sum().to(device)
                                  for _, t in found]))
    return [(p, int(c), int(t.numel())) for (p, t), c in zip(found, counts, strict=True) if c]
