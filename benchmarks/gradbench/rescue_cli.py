"""The rescue benchmark's runs, report and summary (entry point: ``benchmarks/rescue.py``).

A cell is ``(workload, lr, seed, fault, method)``; a faulty cell runs the method with the
fault's :class:`~lightning_gradguard.testing.FaultInjector` in front
(:func:`~gradbench.methods.with_faults`, named ``"<method>+<fault>"``). Runs are
:func:`gradbench.run.run_one` records in a :class:`gradbench.run.RunCache`
(``benchmarks/.cache/rescue/runs/``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_gradguard.testing import Fault

from .analysis import average_ranks, rank_key
from .common import BENCH_ROOT, fmt, library_id, quiet
from .methods import get_method, with_faults
from .rescue import (
    FAULTS,
    TUNING_SEEDS,
    TUNING_WORKLOADS,
    VALIDATION_ONLY_WORKLOADS,
    VALIDATION_SEEDS,
    WORKLOADS,
    RescueWorkload,
)
from .run import RunCache, run_one

__all__ = ["MAIN_METHODS", "PEERS", "Key", "main", "methods_for", "report", "summary"]

DEFAULT_CACHE = BENCH_ROOT / ".cache" / "rescue" / "runs"

PEERS: tuple[str, ...] = ("none", "clip1", "zclip", "autoclip_p10", "agc")
MAIN_METHODS: tuple[str, ...] = (*PEERS, "gradguard")
#: the peers a GradGuard variant is compared with in the summary (with the LSTM's recipe)
SUMMARY_PEERS: tuple[str, ...] = ("none", "clip1", "clip0.25", "zclip", "autoclip_p10", "agc")

QUICK_STEPS = 25
QUICK_FAULTS: dict[str, tuple[Fault, ...]] = {
    "nan_step10": (Fault(step=10, kind="nan", target="loss"),)}

Key = tuple[str, float, str]  # (workload, lr, fault)
Results = dict[tuple[str, float, int, str, str], dict[str, Any]]


def methods_for(workload: RescueWorkload, methods: Sequence[str]) -> list[str]:
    """``methods`` plus the workload's own recipe methods (e.g. the LSTM's ``clip0.25``)."""
    out = list(methods)
    if list(methods) == list(MAIN_METHODS):
        out += [m for m in workload.extra_methods if m not in out]
    return out


def run_method(method: str, fault: str, faults: Sequence[Fault] | None = None) -> str:
    """The registry name of ``method`` in a cell with ``fault`` (``"clean"``: itself)."""
    faults = FAULTS[fault] if faults is None else faults
    return with_faults(method, fault, faults) if faults else get_method(method).name


def get(cache: RunCache, workload: str, lr: float, seed: int, fault: str, method: str,
        steps: int, run: bool, faults: Sequence[Fault] | None = None) -> dict[str, Any] | None:
    """The cached record of a cell, or a new run (``run``), or ``None``."""
    w = WORKLOADS[workload]
    name = run_method(method, fault, faults)
    rec = cache.load(w, lr, seed, name, steps)
    if rec is None and run:
        rec = run_one(w, lr, seed, get_method(name), steps)
        cache.save(rec)
    return rec


# ----------------------------------------------------------------------------- report
def _mean(xs: Sequence[float]) -> float:
    fin = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(fin) if len(fin) == len(xs) and fin else math.inf


def report(results: Results, cells: Sequence[Key], seeds: Sequence[int],
           methods: Sequence[str], title: str) -> str:
    """Markdown: per cell mean (spread) per method, ranks, targets, GradGuard's actions."""
    lines = [f"# {title}", "",
             f"Seeds {list(seeds)}. Final validation loss, mean over seeds (min-max); "
             "`div k`: k seeds diverged (non-finite or above the initial loss). "
             "**bold**: best mean of the cell.", ""]
    ranks: dict[str, list[float]] = {m: [] for m in methods}
    by_workload: dict[str, list[Key]] = {}
    for c in cells:
        by_workload.setdefault(c[0], []).append(c)
    target_lines: list[str] = []
    for wname, wcells in by_workload.items():
        w = WORKLOADS[wname]
        ms = [m for m in methods_for(w, methods)
              if all((wname, lr, s, f, m) in results for (_, lr, f) in wcells for s in seeds)]
        if not ms:
            continue
        steps = results[(wname, wcells[0][1], seeds[0], wcells[0][2], ms[0])]["steps"]
        lines += [f"## {wname}: {w.note} ({steps} steps)", "",
                  "| LR | fault | " + " | ".join(f"`{m}`" for m in ms) + " |",
                  "|---|---|" + "---|" * len(ms)]
        for (_, lr, fault) in wcells:
            recs = {m: [results[(wname, lr, s, fault, m)] for s in seeds] for m in ms}
            means = {m: _mean([rank_key(r) for r in rs]) for m, rs in recs.items()}
            best = min(means.values())
            row = []
            for m in ms:
                losses = [rank_key(r) for r in recs[m]]
                div = sum(r["diverged"] for r in recs[m])
                fin = [x for x in losses if math.isfinite(x)]
                txt = fmt(means[m]) if math.isfinite(means[m]) else "-"
                if fin and len(fin) > 1:
                    txt += f" ({fmt(min(fin))}-{fmt(max(fin))})"
                if div:
                    txt += f" div {div}"
                if means[m] == best and math.isfinite(best):
                    txt = f"**{txt}**"
                row.append(txt)
            lines.append(f"| {lr:g} | {fault} | " + " | ".join(row) + " |")
            for s in seeds:
                present = [m for m in methods if (wname, lr, s, fault, m) in results]
                rk = average_ranks([rank_key(results[(wname, lr, s, fault, m)])
                                    for m in present])
                for m, x in zip(present, rk, strict=True):
                    ranks[m].append(x)
            if "gradguard" in means:
                peers = {m: v for m, v in means.items() if m in PEERS or m.startswith("clip")}
                if peers:
                    bp = min(peers, key=lambda m: peers[m])
                    ratio = means["gradguard"] / peers[bp] if math.isfinite(peers[bp]) else math.nan
                    target_lines.append(f"| {wname} | {lr:g} | {fault} | {fmt(means['gradguard'])}"
                                        f" | `{bp}` {fmt(peers[bp])} | {fmt(ratio, 4)} |")
        lines.append("")
        gg = [m for m in ms if get_method(m).gradguard]
        if gg:
            lines += ["GradGuard's actions (summed over seeds): clipped / skipped / LR backoffs "
                      "(by cause) / final lr_scale (mean):", ""]
            for m in gg:
                for (_, lr, fault) in wcells:
                    lines.append(_actions(m, lr, fault,
                                          [results[(wname, lr, s, fault, m)] for s in seeds]))
            lines.append("")
    lines += ["## Average rank (1 = best; diverged runs tie for last)", "",
              "| method | average rank | cells |", "|---|---|---|"]
    for m in sorted(ranks, key=lambda m: statistics.fmean(ranks[m]) if ranks[m] else math.inf):
        if ranks[m]:
            lines.append(f"| `{m}` | {statistics.fmean(ranks[m]):.2f} | {len(ranks[m])} |")
    if target_lines:
        lines += ["", "## GradGuard() against the best peer (ratio of means; <= 1.02 meets the "
                  "rescue target, <= 1.005 at the tuned LR the do-no-harm one)", "",
                  "| workload | LR | fault | GradGuard | best peer | ratio |",
                  "|---|---|---|---|---|---|", *target_lines]
    return "\n".join(lines) + "\n"


def _actions(method: str, lr: float, fault: str, recs: Sequence[dict[str, Any]]) -> str:
    """One line: what a GradGuard did in one cell, summed over its seeds."""
    summ = [r.get("gradguard") or {} for r in recs]
    causes: dict[str, int] = {}
    for r in recs:
        for e in r.get("events") or []:
            if e[3]:
                causes[e[2]] = causes.get(e[2], 0) + 1
    scale = [float(x.get("lr_scale", 1.0) or 1.0) for x in summ]
    clipped, skipped, backoffs = (sum(x.get(k, 0) or 0 for x in summ)
                                  for k in ("clipped_steps", "skipped_steps", "lr_backoffs"))
    return (f"- `{method}` lr {lr:g} {fault}: clipped {clipped}, skipped {skipped}, "
            f"backoffs {backoffs} {causes or ''}, lr_scale {statistics.fmean(scale):.3g}")


# ----------------------------------------------------------------------------- summary
def summary(cache: RunCache, methods: Sequence[str], workloads: Sequence[str],
            seeds: Sequence[int]) -> str:
    """Compact per-method table of the cached runs (for the ablation file).

    For each method: at each workload's tuned LR (clean) the ratio of its mean final loss to
    the better of ``none`` and ``clip1`` (do-no-harm target <= 1.005); at the other LRs the
    ratio to the best peer (rescue target <= 1.02); on the fault runs the worst per-seed ratio
    of the fault run to the same method's clean run (target <= 1.005) and the smallest final
    ``lr_scale``. ``?``: not cached.
    """
    def rec(w: str, lr: float, s: int, f: str, m: str) -> dict[str, Any] | None:
        return get(cache, w, lr, s, f, m, WORKLOADS[w].steps, False)

    def mean(w: str, lr: float, f: str, m: str) -> float | None:
        recs = [rec(w, lr, s, f, m) for s in seeds]
        if any(r is None for r in recs):
            return None
        return _mean([rank_key(r) for r in recs if r is not None])

    lines = ["| method | " + " | ".join(f"{w}" for w in workloads) + " |",
             "|---|" + "---|" * len(workloads)]
    for m in methods:
        cells = []
        for wname in workloads:
            w = WORKLOADS[wname]
            parts = []
            for lr in w.lrs():
                if w.faults != ("clean",):
                    worst, scale, pairs = 1.0, 1.0, 0
                    for f in w.faults[1:]:
                        for s in seeds:
                            rf, rc = rec(wname, lr, s, f, m), rec(wname, lr, s, "clean", m)
                            if rf is None or rc is None:
                                continue
                            pairs += 1
                            worst = max(worst, rank_key(rf) / rank_key(rc))
                            scale = min(scale, float((rf.get("gradguard") or {}).get(
                                "lr_scale", 1.0)))
                    mc = mean(wname, lr, "clean", m)
                    if not pairs:
                        parts.append("?")
                        continue
                    parts.append(f"clean {fmt(mc) if mc else '?'}; worst fault/clean "
                                 f"{worst:.4f}, min lr_scale {scale:.2f}")
                    continue
                mm = mean(wname, lr, "clean", m)
                if mm is None:
                    parts.append(f"{lr:g}: ?")
                    continue
                if lr == w.lrs()[0]:
                    base = [x for x in (mean(wname, lr, "clean", "none"),
                                        mean(wname, lr, "clean", "clip1")) if x is not None]
                    ref, tag = (min(base) if base else math.nan), "harm"
                else:
                    peers = [x for x in (mean(wname, lr, "clean", q) for q in SUMMARY_PEERS)
                             if x is not None]
                    ref, tag = (min(peers) if peers else math.nan), "peer"
                ratio = mm / ref if math.isfinite(ref) and math.isfinite(mm) else math.nan
                parts.append(f"{lr:g}: {fmt(mm)} ({tag} {ratio:.3f})")
            cells.append("<br>".join(parts))
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Rescue-without-harm benchmark (benchmarks/rescue.py): realistic "
        "workloads, peers at their defaults.")
    p.add_argument("--quick", action="store_true", help="smoke run (seconds, own cache)")
    p.add_argument("--set", choices=("tuning", "validation", "all"), default=None,
                   help="the split's workloads and seeds (rescue_split.md)")
    p.add_argument("--workloads", nargs="+", default=None, choices=sorted(WORKLOADS))
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--mults", nargs="+", type=float, default=None,
                   help="only these LR multipliers of the tuned LR")
    p.add_argument("--faults", nargs="+", default=None, help="only these faults")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    p.add_argument("--report-only", action="store_true", help="no new runs")
    p.add_argument("--summary", action="store_true",
                   help="no runs: the compact per-method table of the cached runs of "
                   "--methods (default: the tuning set) for the ablation file")
    p.add_argument("--split", action="store_true", help="print the train / validation split")
    return p.parse_args(argv)


def _quick(args: argparse.Namespace) -> int:
    cache = RunCache(args.cache if args.cache != DEFAULT_CACHE
                     else Path(tempfile.mkdtemp(prefix="gg_rescue_quick_")))
    results: Results = {}
    cells: list[Key] = []
    methods = ["none", "clip1", "gradguard"]
    for wname, fault, faults in (("mlp_sgd", "clean", ()),
                                 ("mlp_adam_fault", "nan_step10", QUICK_FAULTS["nan_step10"])):
        lr = WORKLOADS[wname].tuned_lr
        cells.append((wname, lr, fault))
        for m in methods:
            rec = get(cache, wname, lr, 0, fault, m, QUICK_STEPS, True, faults)
            assert rec is not None
            results[(wname, lr, 0, fault, m)] = rec
    text = report(results, cells, [0], methods, "Rescue benchmark (--quick smoke run)")
    out = args.out or cache.root / "rescue_quick.md"
    out.write_text(text)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the missing cells of the requested grid, then print (and write) the report."""
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(1)
    if args.split:
        print(f"tuning: workloads {' '.join(TUNING_WORKLOADS)}; seeds {list(TUNING_SEEDS)}\n"
              f"validation: every workload (also {' '.join(VALIDATION_ONLY_WORKLOADS)}); "
              f"seeds {list(VALIDATION_SEEDS)}")
        return 0
    if args.quick:
        return _quick(args)
    if args.set == "validation":
        wl, seeds = list(TUNING_WORKLOADS + VALIDATION_ONLY_WORKLOADS), list(VALIDATION_SEEDS)
    elif args.set == "all":
        wl, seeds = list(WORKLOADS), list(TUNING_SEEDS + VALIDATION_SEEDS)
    else:
        wl, seeds = list(TUNING_WORKLOADS), list(TUNING_SEEDS)
    wl = args.workloads or wl
    seeds = args.seeds if args.seeds is not None else seeds
    cache = RunCache(args.cache)
    if args.summary:
        if not args.methods:
            raise SystemExit("--summary needs --methods")
        print(summary(cache, args.methods, wl, seeds), end="")
        return 0
    methods = args.methods or list(MAIN_METHODS)
    results: Results = {}
    cells: list[Key] = []
    t0 = time.perf_counter()
    n_new = 0
    for wname in wl:
        w = WORKLOADS[wname]
        for lr, mult in zip(w.lrs(), w.lr_mults, strict=True):
            if args.mults is not None and mult not in args.mults:
                continue
            for fault in w.faults:
                if args.faults is not None and fault not in args.faults:
                    continue
                cells.append((wname, lr, fault))
                for seed in seeds:
                    for m in methods_for(w, methods):
                        had = get(cache, wname, lr, seed, fault, m, w.steps, False) is not None
                        rec = get(cache, wname, lr, seed, fault, m, w.steps,
                                  not args.report_only)
                        if rec is None:
                            continue
                        results[(wname, lr, seed, fault, m)] = rec
                        if not had:
                            n_new += 1
                            print(f"{wname} lr {lr:g} seed {seed} {fault} {m}: "
                                  f"{rec['final']['val_loss']} ({rec['seconds']} s)"
                                  + (f" {rec['gradguard']}" if "gradguard" in rec else ""),
                                  flush=True)
    title = f"Rescue benchmark ({args.set or 'custom'} set)"
    text = report(results, cells, seeds, methods, title)
    text += f"\n{n_new} new runs in {time.perf_counter() - t0:.0f} s; library {library_id()}\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
