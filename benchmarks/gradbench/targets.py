"""Every target of the benchmarks, with its threshold, in one place.

Stability (``stability.py``, ``stability_momentum.py``; for ``GradGuard()``):

* no diverged run in the whole grid (:data:`MAX_DIVERGED_RUNS`);
* the best average rank of all methods;
* within :data:`LOSS_TOLERANCE` (2 %) of the best method's mean final validation loss at every
  (model, lr) where some method converges on all seeds (:func:`loss_tolerance_check`).

Overhead (``overhead.py``):

* end to end, step time with ``GradGuard()`` at most :data:`E2E_MAX_RATIO` x no callback;
* micro, the guard's work at most :data:`MICRO_MAX_VS_CLIP` x ``clip_grad_norm_`` (grids of
  >= :data:`MICRO_MIN_TENSORS` tensors) and at most :data:`MICRO_MAX_VS_ZCLIP` x
  ``ZClip.step``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .analysis import Grid, Results, cell_stats

__all__ = [
    "E2E_MAX_RATIO", "LOSS_TOLERANCE", "MAX_DIVERGED_RUNS", "MICRO_MAX_VS_CLIP",
    "MICRO_MAX_VS_ZCLIP", "MICRO_MIN_TENSORS", "TargetRow", "loss_tolerance_check",
    "stability_targets",
]

#: Stability: GradGuard runs allowed to diverge in a grid.
MAX_DIVERGED_RUNS = 0
#: Stability: GradGuard's mean final loss within ``1 + LOSS_TOLERANCE`` of the best method's.
LOSS_TOLERANCE = 0.02
#: Overhead, end to end: step time with GradGuard() / step time with no callback.
E2E_MAX_RATIO = 1.03
#: Overhead, micro: guard / ``clip_grad_norm_(params, 1.0)`` (both clean and spike steps).
MICRO_MAX_VS_CLIP = 1.2
#: Overhead, micro: the clip target applies to parameter sets of at least this many tensors.
MICRO_MIN_TENSORS = 200
#: Overhead, micro: guard / ``ZClip.step`` in every grid cell.
MICRO_MAX_VS_ZCLIP = 0.6


@dataclass(frozen=True)
class TargetRow:
    """One row of a targets table."""

    target: str
    result: str
    met: bool | None  # None: not applicable (nothing to judge)

    def markdown(self) -> str:
        """``| target | result | yes/**no**/- |``."""
        met = "-" if self.met is None else ("yes" if self.met else "**no**")
        return f"| {self.target} | {self.result} | {met} |"


def loss_tolerance_check(results: Results, grid: Grid, methods: Sequence[str], candidate: str,
                         tol: float = LOSS_TOLERANCE,
                         ratios: list[dict[str, Any]] | None = None
                         ) -> tuple[int, list[dict[str, Any]]]:
    """(model, lr) cells where some method converged on every seed, and the misses.

    The best method of a cell is the one with the lowest mean final validation loss among the
    methods that converged (did not diverge) on every seed; ``candidate`` must have converged
    on every seed too and have a mean within ``(1 + tol)`` of the best. ``ratios``, if given,
    receives every checked cell's ratio of ``candidate`` to the best of the other methods.
    """
    checked = 0
    misses: list[dict[str, Any]] = []
    for mo in grid.models:
        for lr in grid.lrs[mo]:
            stats = {m: cell_stats(results, mo, lr, grid.seeds, m) for m in methods}
            if any(s is None or s["n"] < len(grid.seeds) for s in stats.values()):
                continue
            ok = {m: s for m, s in stats.items() if s is not None and s["diverged"] == 0}
            if not ok:
                continue
            checked += 1
            best = min(ok, key=lambda m: ok[m]["mean"])
            c = stats[candidate]
            if c is None:
                raise RuntimeError(f"no statistics for {candidate!r}")
            ratio = c["mean"] / ok[best]["mean"] if c["diverged"] == 0 else math.inf
            if ratios is not None:
                others = [m for m in ok if m != candidate]
                rival = min(others, key=lambda m: ok[m]["mean"]) if others else None
                ratios.append({"model": mo, "lr": lr, "best_other": rival,
                               "ratio": (c["mean"] / ok[rival]["mean"]
                                         if rival is not None and c["diverged"] == 0
                                         else math.nan)})
            if not ratio <= 1 + tol:
                misses.append({"model": mo, "lr": lr, "best": best, "best_mean": ok[best]["mean"],
                               "mean": c["mean"], "diverged": c["diverged"], "ratio": ratio})
    return checked, misses


def stability_targets(results: Results, grid: Grid, summ: dict[str, Any], order: list[str],
                      candidate: str = "gradguard"
                      ) -> tuple[list[TargetRow], list[dict[str, Any]]]:
    """The stability targets of ``candidate``: table rows and the loss-tolerance misses.

    Args:
        results: The run records.
        grid: The grid the report covers.
        summ: :func:`gradbench.analysis.summarize` of ``grid.methods``.
        order: ``grid.methods`` sorted by average rank (best first).
        candidate: The method the targets are for.
    """
    d = sum(summ["div"][candidate][mo][0] for mo in grid.models)
    n = sum(summ["div"][candidate][mo][1] for mo in grid.models)
    best_rank = order[0] if summ["ranks"][order[0]] else None
    ratios: list[dict[str, Any]] = []
    checked, misses = loss_tolerance_check(results, grid, grid.methods, candidate,
                                           ratios=ratios)
    finite = [r for r in ratios if math.isfinite(r["ratio"])]
    closest = max(finite, key=lambda r: r["ratio"]) if finite else None
    ranks = summ["ranks"][candidate]
    rank = statistics.fmean(ranks) if ranks else math.nan
    rows = [TargetRow("zero diverged runs in the whole grid", f"{d}/{n} diverged",
                      d <= MAX_DIVERGED_RUNS)]
    if best_rank:
        rows.append(TargetRow(
            "best average rank of all methods",
            f"{rank:.2f} (best: `{best_rank}`, {statistics.fmean(summ['ranks'][best_rank]):.2f})",
            best_rank == candidate))
    else:
        rows.append(TargetRow("best rank", "-", None))
    result = f"{checked - len(misses)}/{checked} (model, lr) cells"
    if closest:
        result += (f"; highest ratio to the best other method: {closest['ratio']:.3f} "
                   f"({closest['model']} lr {closest['lr']:g}, `{closest['best_other']}`)")
    rows.append(TargetRow(
        f"within {LOSS_TOLERANCE:.0%} of the best method's mean final val loss at every "
        "(model, lr) where some method converges on all seeds", result, not misses))
    return rows, misses
