"""Ranks, per-cell statistics and summaries: pure functions of cached run records.

``results`` maps ``(workload, lr, seed, method)`` to a record of :func:`gradbench.run.run_one`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .common import source_hash, to_float
from .methods import get_method

__all__ = ["Grid", "Results", "average_ranks", "cell_stats", "gradguard_libraries", "loss_of",
           "rank_key", "summarize"]

Results = dict[tuple[str, float, int, str], dict[str, Any]]


@dataclass
class Grid:
    """The requested grid: what a report covers."""

    models: list[str]
    lrs: dict[str, tuple[float, ...]]
    seeds: list[int]
    methods: list[str]  # main methods (ranked)
    variants: list[str]  # scratch variants (compared to the main methods separately)
    steps: dict[str, int]


def loss_of(rec: dict[str, Any]) -> float:
    """Final validation loss of a record."""
    return to_float(rec["final"]["val_loss"])


def rank_key(rec: dict[str, Any]) -> float:
    """Diverged runs rank last (all tied); otherwise by final validation loss."""
    return math.inf if rec["diverged"] else loss_of(rec)


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties (including all diverged = inf) share their average rank.

    >>> average_ranks([0.3, 0.1, float("inf"), float("inf")])
    [2.0, 1.0, 3.5, 3.5]
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def summarize(results: Results, grid: Grid, method_list: Sequence[str]) -> dict[str, Any]:
    """Ranks (overall and per model), divergences and non-finite steps of ``method_list``."""
    ranks: dict[str, list[float]] = {m: [] for m in method_list}
    ranks_by_model: dict[str, dict[str, list[float]]] = {
        mo: {m: [] for m in method_list} for mo in grid.models}
    complete_cells = 0
    for mo in grid.models:
        for lr in grid.lrs[mo]:
            for seed in grid.seeds:
                recs = [results.get((mo, lr, seed, m)) for m in method_list]
                if any(r is None for r in recs):
                    continue
                complete_cells += 1
                rk = average_ranks([rank_key(r) for r in recs])  # type: ignore[arg-type]
                for m, x in zip(method_list, rk, strict=True):
                    ranks[m].append(x)
                    ranks_by_model[mo][m].append(x)
    div = {m: {mo: [0, 0] for mo in grid.models} for m in method_list}
    nonfinite = {m: {mo: 0 for mo in grid.models} for m in method_list}
    for (mo, _lr, _seed, m), rec in results.items():
        if m in div and mo in grid.models:
            div[m][mo][0] += int(rec["diverged"])
            div[m][mo][1] += 1
            nonfinite[m][mo] += rec["nonfinite_steps"]
    return {"ranks": ranks, "ranks_by_model": ranks_by_model, "complete_cells": complete_cells,
            "div": div, "nonfinite": nonfinite}


def cell_stats(results: Results, model: str, lr: float, seeds: Sequence[int],
               method: str) -> dict[str, Any] | None:
    """Mean/std final loss (finite runs), divergences, metric, over the seeds of one cell."""
    recs = [results[(model, lr, s, method)] for s in seeds if (model, lr, s, method) in results]
    if not recs:
        return None
    losses = [loss_of(r) for r in recs]
    finite = [x for x in losses if math.isfinite(x)]
    metric_key = next((k for k in recs[0]["final"] if k != "val_loss"), None)
    metrics = [to_float(r["final"][metric_key]) for r in recs] if metric_key else []
    fmetrics = [x for x in metrics if math.isfinite(x)]
    return {
        "n": len(recs),
        "diverged": sum(r["diverged"] for r in recs),
        "nonfinite_runs": len(losses) - len(finite),
        "mean": statistics.fmean(finite) if finite else math.nan,
        "std": statistics.pstdev(finite) if len(finite) > 1 else 0.0,
        "metric_key": metric_key,
        "metric_mean": statistics.fmean(fmetrics) if fmetrics else math.nan,
        "initial": statistics.fmean(to_float(r["initial"]["val_loss"]) for r in recs),
        "nonfinite_steps": sum(r["nonfinite_steps"] for r in recs),
    }


def gradguard_libraries(results: Results) -> dict[str, int]:
    """Source hash -> number of GradGuard runs (``gradguard`` and variants) made with it."""
    out: dict[str, int] = {}
    for (_, _, _, m), rec in results.items():
        if get_method(m).gradguard:
            sha = source_hash(str(rec.get("library", "")))
            out[sha] = out.get(sha, 0) + 1
    return out
