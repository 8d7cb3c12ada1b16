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

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "LossTrend",
    "MicroBatches",
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

    Returns:
        The ratio; NaN when it means nothing: zero (or non-finite) weights, whose relative
        change is not a measure of the step (never an infinite ratio).

    Example:
        >>> update_ratio(0.1, 5.0, 2.0)
        0.25
        >>> update_ratio(1e-3, 123.0, 1.0, adaptive=True, numel=10_000)
        0.1
        >>> update_ratio(0.1, 5.0, 0.0)
        nan
    """
    step = lr * math.sqrt(numel) if adaptive else lr * grad_norm
    if weight_norm <= 0 or not math.isfinite(weight_norm):
        return math.nan
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
    # a ratio only to a positive start (a loss at or below 0 gives no growth factor)
    grown = last_finite / start if start > 0 else 1.0
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


class MicroBatches(tuple):  # type: ignore[type-arg]
    """The micro-batches of one optimizer step under gradient accumulation (oldest first).

    :func:`batch_nonfinite` names each one's tensors ``micro-batch i/k: batch[...]``.

    Example:
        >>> bad = batch_nonfinite(MicroBatches([torch.ones(2), torch.tensor([float("nan")])]))
        >>> bad
        [('micro-batch 2/2: batch', 1, 1)]
    """

    __slots__ = ()


_MAX_TENSORS = 1024  # tensors read from one batch at most
_MAX_DEPTH = 6       # containers walked into
_MAX_CONTAINERS = 10_000  # containers and objects visited at most


def _values(t: Tensor) -> list[Tensor]:
    """The stored values of ``t``: the values of a sparse or nested tensor, else ``t``."""
    if t.is_nested:
        try:
            return [t.values()]
        except Exception:  # a strided nested tensor: its components
            return list(t.unbind())
    if t.layout == torch.sparse_coo:
        return [t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        return [t.values()]
    return [t]


def _walk(value: Any, path: str, out: list[tuple[str, Tensor]], depth: int,
          seen: set[int]) -> None:
    if len(out) >= _MAX_TENSORS or depth > _MAX_DEPTH or len(seen) > _MAX_CONTAINERS:
        return
    if isinstance(value, Tensor):
        out.extend((path, v) for v in _values(value))
        return
    if isinstance(value, (str, bytes, int, float, bool, type(None))) or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, Mapping):
        items = [(f"[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        items = [(f".{k}", getattr(value, k)) for k in value._fields]
    elif isinstance(value, (list, tuple)):
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f".{f.name}", getattr(value, f.name, None))
                 for f in dataclasses.fields(value)]
    elif isinstance(value, torch.nn.Module):
        return  # a model is not data
    else:  # an object holding tensors (a custom batch class)
        attrs = getattr(value, "__dict__", None)
        if not isinstance(attrs, dict):
            return
        items = [(f".{k}", v) for k, v in attrs.items() if not k.startswith("__")]
    for suffix, v in items:
        _walk(v, path + suffix, out, depth + 1, seen)


def batch_nonfinite(batch: Any) -> list[tuple[str, int, int]]:
    """Floating tensors of ``batch`` that hold NaN/Inf: ``(path, bad count, numel)``.

    Every kind of batch is read: nested tuples, lists, namedtuples, mappings (a Hugging
    Face ``BatchEncoding`` too), dataclasses, objects holding tensors in attributes, and
    sparse (COO/CSR/CSC/BSR/BSC) and nested tensors (their stored values). A
    :class:`MicroBatches` is read micro-batch by micro-batch. One host read for all the
    tensors; nothing that is not a tensor is changed or called.

    Example:
        >>> x = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
        >>> batch_nonfinite((x, torch.tensor([0, 1])))
        [('batch[0]', 2, 4)]
        >>> batch_nonfinite({"x": torch.ones(3)})
        []
    """
    found: list[tuple[str, Tensor]] = []
    if isinstance(batch, MicroBatches):
        for i, micro in enumerate(batch, 1):
            _walk(micro, f"micro-batch {i}/{len(batch)}: batch", found, 0, set())
    else:
        _walk(batch, "batch", found, 0, set())
    found = [(p, t) for p, t in found
             if (t.is_floating_point() or t.is_complex()) and t.device.type != "meta"]
    if not found:
        return []
    from lightning_gradguard.core._host import to_host

    device = found[0][1].device
    counts = to_host(torch.stack([(~torch.isfinite(t.detach())).sum().to(device)
                                  for _, t in found]))
    sizes: dict[str, list[int]] = {}
    for (p, t), c in zip(found, counts, strict=True):
        entry = sizes.setdefault(p, [0, 0])
        entry[0] += int(c)
        entry[1] += int(t.numel())
    return [(p, c, n) for p, (c, n) in sizes.items() if c]
