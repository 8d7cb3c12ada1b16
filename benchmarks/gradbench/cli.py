"""The stability command line, shared by ``stability.py`` and ``stability_momentum.py``.

``main(suite, argv)`` runs the missing cells of the requested grid (one process, one torch
thread), then writes the report from everything cached for that grid.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .analysis import Grid, Results, gradguard_libraries
from .common import library_id, quiet, source_hash
from .methods import get_method
from .render import write_report
from .run import RunCache, run_one
from .workloads import Suite

__all__ = ["collect", "main", "parse_args"]


def parse_args(suite: Suite, argv: Sequence[str] | None) -> argparse.Namespace:
    """The options of a stability suite's entry point."""
    p = argparse.ArgumentParser(description=suite.title,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 model, 2 LRs, 1 seed, 3 methods, 40 steps, temp cache")
    p.add_argument("--models", nargs="+", choices=list(suite.workloads), default=None)
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"methods to run (default: {' '.join(suite.methods)}); "
                   "'gradguard(...)' runs a GradGuard variant")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="override the LR grid (all selected models)")
    p.add_argument("--steps", type=int, default=None, help="override the steps per run")
    p.add_argument("--variants", nargs="+", default=None,
                   help="GradGuard variants to include in the report (default: the suite's "
                   "variants plus variants in --methods)")
    p.add_argument("--jobs", type=int, default=1, choices=[1],
                   help="runs in parallel (only 1: one process, one thread)")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--any-library", action="store_true",
                   help="reuse cached runs of library-dependent methods (gradguard, agc) made "
                   "with other lightning_gradguard sources (default: rerun them)")
    p.add_argument("--out", type=Path, default=None, help="markdown report path")
    p.add_argument("--png", type=Path, default=None, help="plot path")
    p.add_argument("--json", type=Path, default=None, help="summary JSON path")
    p.add_argument("--report-only", action="store_true", help="no runs, report from the cache")
    p.add_argument("--budget-min", type=float, default=None,
                   help="stop starting new runs after this many minutes (then report)")
    return p.parse_args(argv)


def collect(suite: Suite, cache: RunCache, grid: Grid) -> Results:
    """Every cached record of ``grid`` (main methods and variants)."""
    out: Results = {}
    for mo in grid.models:
        for lr in grid.lrs[mo]:
            for seed in grid.seeds:
                for m in [*grid.methods, *grid.variants]:
                    rec = cache.load(suite.workloads[mo], lr, seed, m, grid.steps[mo])
                    if rec is not None:
                        out[(mo, lr, seed, m)] = rec
    return out


def main(suite: Suite, argv: Sequence[str] | None = None) -> int:
    """Run the missing cells of the requested grid of ``suite``, then write its report."""
    args = parse_args(suite, argv)
    quiet()
    torch.set_num_threads(1)
    q = suite.quick
    if args.quick:
        tmpdir = Path(tempfile.mkdtemp(prefix=f"gg_{suite.name}_quick_"))
        models = args.models or [q.model]
        methods = args.methods or list(q.methods)
        seeds = args.seeds or list(q.seeds)
        lrs = {mo: tuple(args.lrs or q.lrs) for mo in models}
        steps = {mo: args.steps or q.steps for mo in models}
        cache_dir = args.cache or tmpdir / "cache"
        out = args.out or tmpdir / f"{suite.name}.md"
        png = args.png or tmpdir / f"{suite.name}.png"
        js = args.json or tmpdir / f"{suite.name}.json"
    else:
        models = args.models or list(suite.workloads)
        methods = args.methods or list(suite.methods)
        seeds = args.seeds or list(suite.seeds)
        lrs = {mo: tuple(args.lrs) if args.lrs else suite.workloads[mo].lrs for mo in models}
        steps = {mo: args.steps or suite.workloads[mo].steps for mo in models}
        cache_dir = args.cache or suite.cache_dir
        out = args.out or suite.md_path
        # a report written elsewhere (e.g. a subset run) keeps its plot beside it: only the
        # committed report updates the committed plot
        png = args.png or (args.out.with_suffix(".png") if args.out else suite.png_path)
        js = args.json or cache_dir / "summary.json"
    resolved = {m: get_method(m) for m in methods}  # validate names before any run
    run_variants = [m for m in methods if m not in suite.methods]
    variants = list(args.variants) if args.variants is not None else \
        list(dict.fromkeys([*suite.variants, *run_variants]))
    for v in variants:
        get_method(v)
    main_methods = [m for m in suite.methods if m in methods] if args.quick \
        else list(suite.methods)
    cache = RunCache(cache_dir, any_library=args.any_library)

    t_start = time.perf_counter()
    todo = [(mo, lr, s, m) for mo in models for lr in lrs[mo] for s in seeds for m in methods]
    done = ran = 0
    if not args.report_only:
        for mo, lr, s, m in todo:
            workload = suite.workloads[mo]
            if cache.load(workload, lr, s, m, steps[mo]) is not None:
                done += 1
                continue
            if args.budget_min is not None and time.perf_counter() - t_start > 60 * args.budget_min:
                print(f"budget of {args.budget_min} min reached; stopping", flush=True)
                break
            rec = run_one(workload, lr, s, resolved[m], steps[mo])
            cache.save(rec)
            ran += 1
            print(f"[{done + ran}/{len(todo)}] {mo} lr={lr:g} seed={s} {m}: "
                  f"val_loss {rec['initial']['val_loss']} -> {rec['final']['val_loss']}"
                  f"{' DIVERGED' if rec['diverged'] else ''}, non-finite steps "
                  f"{rec['nonfinite_steps']}, {rec['seconds']:.1f}s", flush=True)
    grid = Grid(models=models, lrs=lrs, seeds=seeds, methods=main_methods, variants=variants,
                steps=steps)
    results = collect(suite, cache, grid)
    current = source_hash(library_id())
    stale = {sha: n for sha, n in gradguard_libraries(results).items() if sha != current}
    if stale:
        print(f"warning: {sum(stale.values())} cached GradGuard runs were made with other "
              f"library sources ({', '.join(stale)}; now {current})", file=sys.stderr,
              flush=True)
    summary = write_report(results, grid, suite, out, png, js)
    print(f"ran {ran} runs ({done} cached) in {time.perf_counter() - t_start:.0f}s; "
          f"{summary['runs']}/{summary['expected_runs']} main-grid runs available")
    print(f"report: {out}\nplot: {png}\nsummary: {js}")
    return 0
