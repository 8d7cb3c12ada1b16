"""Where a non-finite gradient comes from, and its likely cause.

In backpropagation the gradient flows from the output back to the input, so a NaN/Inf born
in one layer contaminates every layer before it. Of the parameters whose gradients are
non-finite, the one registered *last* (closest to the output in the usual module order) is
where the non-finite value most likely originates.
"""

from __future__ import annotations

import math
import textwrap  # noqa: F401  (used in doctests)
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Diagnosis", "diagnose"]

_USUAL_CAUSES = (
    "one of the usual ones: a learning rate that is too high; initialisation that is too large for "
    "the depth (use Xavier/He init); a deep plain network without normalisation or skip "
    "connections; an activation with large derivatives; a loss with log(0) or division by "
    "zero; corrupt data (NaN/Inf in the batch)"
)


@dataclass(frozen=True)
class Diagnosis:
    """What a non-finite step looked like.

    Attributes:
        step: The optimizer step.
        nonfinite_params: Names of the parameters with non-finite gradients (model order).
        origin: The one closest to the output (most likely origin), or ``None``.
        likely_cause: A one-line explanation.
    """

    step: int
    nonfinite_params: tuple[str, ...]
    origin: str | None
    likely_cause: str

    def message(self, limit: int = 8) -> str:
        """Human-readable summary (at most ``limit`` parameter names).

        Example:
            >>> d = Diagnosis(7, ("a.weight", "b.weight"), "b.weight", "lr too high")
            >>> print(textwrap.fill(d.message(), 88))
            step 7: non-finite gradients in 2 parameter(s): a.weight, b.weight; most likely origin:
            b.weight (closest to the output). Likely cause: lr too high
        """
        names = ", ".join(self.nonfinite_params[:limit])
        if len(self.nonfinite_params) > limit:
            names += f", ... (+{len(self.nonfinite_params) - limit} more)"
        origin = (
            f"; most likely origin: {self.origin} (closest to the output)" if self.origin else ""
        )
        return (
            f"step {self.step}: non-finite gradients in {len(self.nonfinite_params)} "
            f"parameter(s): {names}{origin}. Likely cause: {self.likely_cause}"
        )


def diagnose(
    step: int,
    names: Sequence[str],
    per_tensor_norms: Sequence[float],
    *,
    loss: float | None = None,
    growth_before: bool = False,
    lr_scale: float = 1.0,
) -> Diagnosis:
    """Build a :class:`Diagnosis` from the per-tensor norms of a non-finite step.

    Args:
        step: The optimizer step.
        names: Parameter names, aligned with ``per_tensor_norms``.
        per_tensor_norms: Host floats of each gradient's norm.
        loss: The loss of the step, when known.
        growth_before: Whether the norm was growing step over step before this step.
        lr_scale: The LR scale in force.

    Example:
        >>> d = diagnose(3, ["l1.weight", "l2.weight"], [float("nan"), 1.0], loss=float("nan"))
        >>> d.origin, d.likely_cause.split(";")[0]
        ('l1.weight', 'the loss itself is non-finite (nan)')
    """
    bad = tuple(n for n, v in zip(names, per_tensor_norms, strict=False) if not math.isfinite(v))
    origin = bad[-1] if bad else None
    if loss is not None and not math.isfinite(loss):
        cause = f"the loss itself is non-finite ({loss}); " + _USUAL_CAUSES
    elif growth_before:
        cause = ("the gradient norm was growing step over step before this (an explosion): "
                 "the learning rate is most likely too high; " + _USUAL_CAUSES)
    elif not bad:
        cause = "the total norm overflowed although every gradient is finite; " + _USUAL_CAUSES
    else:
        cause = _USUAL_CAUSES
    if lr_scale < 1.0:
        cause += f" (the guard had already reduced the LR to {lr_scale:.3g}x)"
    return Diagnosis(step=step, nonfinite_params=bad, origin=origin, likely_cause=cause)
