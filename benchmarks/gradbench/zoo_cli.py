"""The zoo benchmark's runs, targets and report (entry point: ``benchmarks/zoo.py``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_gradguard.testing import Fault

from .common import BENCH_ROOT, library_id, quiet, to_float
from .methods import get_method, with_faults
from .run import RunCache, run_one
from .zoo import DEFAULT_LR, SGD_SWEEP, Recipe, ZooWorkload, draw, recipes

__all__ = ["PEERS", "TARGETS", "Job", "main", "plan"]

PEERS: tuple[str, ...] = ("none", "clip1", "zclip", "autoclip_p10", "agc")
HIGH: tuple[int, ...] = (10, 30)
FAULTS: tuple[str, ...] = ("nan_loss", "inf_grad", "spike1e6")


@dataclass(frozen=True)
class Targets:
    """The targets of the zoo issue (validation draws)."""

    healthy_close: float = 1.005  # GradGuard / none at the healthy LR, on >= 95 % of draws
    healthy_close_share: float = 0.95
    healthy_max: float = 1.02  # ... and on every draw
    high_within: float = 1.02  # best or within 2 % of the best peer ...
    high_within_share: float = 0.90  # ... on >= 90 % of too-high draws
    fault_within: float = 1.005  # a fault costs <= 0.5 % of the fault-free run


TARGETS = Targets()


def _fault(name: str, step: int) -> Fault:
    if name == "nan_loss":
        return Fault(step=step, kind="nan", target="loss")
    if name == "inf_grad":
        return Fault(step=step, kind="inf", target="grad")
    return Fault(step=step, kind="scale", factor=1e6, target="loss")


def faulted(method: str, fault: str, step: int) -> str:
    """Register (once) and name ``method`` with one ``fault`` injected at ``step``."""
    return with_faults(method, f"{fault}@{step}", [_fault(fault, step)])


@dataclass(frozen=True)
class Job:
    """One run: a recipe (by generator seed), an LR, a method name."""

    seed: int
    steps: int
    lr: float
    method: str


def _run(job: Job, cache_root: str) -> dict[str, Any]:
    """Worker: run ``job`` unless cached, return its record."""
    import torch

    quiet()
    torch.set_num_threads(1)
    recipe = draw(job.seed, job.steps)
    workload = ZooWorkload(recipe)
    if "+" in job.method:
        base, rest = job.method.split("+", 1)
        fault, step = rest.split("@")
        faulted(base, fault, int(step))
    # AGC is a peer: its runs stay valid when the rest of the library changes
    cache = RunCache(Path(cache_root), any_library=job.method == "agc")
    rec = cache.load(workload, job.lr, recipe.seed, job.method, job.steps)
    if rec is None:
        rec = run_one(workload, job.lr, recipe.seed, get_method(job.method),
                      job.steps)
        cache.save(rec)
    return rec


def _final(rec: dict[str, Any]) -> float:
    v = to_float(rec["final"]["val_loss"])
    return v if math.isfinite(v) else math.inf


def run_jobs(jobs: Sequence[Job], cache: Path, workers: int) -> dict[Job, dict[str, Any]]:
    """Run every job (cached ones are read back), ``workers`` processes."""
    out: dict[Job, dict[str, Any]] = {}
    t0 = time.perf_counter()
    if workers <= 1:
        for i, j in enumerate(jobs):
            out[j] = _run(j, str(cache))
            _progress(i + 1, len(jobs), t0)
        return out
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        futures = {j: ex.submit(_run, j, str(cache)) for j in jobs}
        for i, (j, f) in enumerate(futures.items()):
            out[j] = f.result()
            _progress(i + 1, len(jobs), t0)
    return out


def _progress(done: int, total: int, t0: float) -> None:
    if done == total or done % 20 == 0:
        print(f"  {done}/{total} runs ({time.perf_counter() - t0:.0f} s)", flush=True)


def healthy_lr(r: Recipe, cache: Path, workers: int) -> tuple[float, dict[float, float]]:
    """The recipe's healthy LR: its family default, or the best of the SGD sweep."""
    if not r.sgd_family:
        return DEFAULT_LR[r.optimizer], {}
    recs = run_jobs([Job(r.seed, r.steps, lr, "none") for lr in SGD_SWEEP], cache, workers)
    finals = {j.lr: _final(v) for j, v in recs.items()}
    return min(finals, key=lambda lr: (finals[lr], lr)), finals


def plan(rs: Sequence[Recipe], lrs: dict[int, float], gradguard: str,
         peers: Sequence[str], fault_step: int) -> list[Job]:
    """Every run of the benchmark for these recipes and healthy LRs."""
    jobs: list[Job] = []
    for r in rs:
        lr = lrs[r.seed]
        jobs += [Job(r.seed, r.steps, lr, m) for m in ("none", gradguard)]
        for k in HIGH:
            jobs += [Job(r.seed, r.steps, _lr(lr * k), m) for m in (*peers, gradguard)]
        jobs += [Job(r.seed, r.steps, lr, faulted(gradguard, f, fault_step)) for f in FAULTS]
    return list(dict.fromkeys(jobs))


def _lr(x: float) -> float:
    return float(f"{x:.4g}")


def analyse(rs: Sequence[Recipe], lrs: dict[int, float], recs: dict[Job, dict[str, Any]],
            gradguard: str, peers: Sequence[str], fault_step: int) -> dict[str, Any]:
    """Per-recipe rows and the targets' results."""
    def rec(r: Recipe, lr: float, m: str) -> dict[str, Any]:
        return recs[Job(r.seed, r.steps, lr, m)]

    rows = []
    for r in rs:
        lr = lrs[r.seed]
        none, gg = rec(r, lr, "none"), rec(r, lr, gradguard)
        row: dict[str, Any] = {
            "recipe": r, "lr": lr, "none": _final(none), "gg": _final(gg),
            "ratio": _final(gg) / _final(none) if _final(none) > 0 else math.nan,
            "backoffs": gg.get("gradguard", {}).get("lr_backoffs", 0),
            "clipped": gg.get("gradguard", {}).get("clipped_steps", 0),
            "high": {}, "faults": {}}
        for k in HIGH:
            hl = _lr(lr * k)
            finals = {m: _final(rec(r, hl, m)) for m in (*peers, gradguard)}
            div = {m: bool(rec(r, hl, m)["diverged"]) for m in finals}
            best_peer = min(finals[m] for m in peers)
            ranks = _ranks(finals)
            row["high"][k] = {"finals": finals, "diverged": div, "best_peer": best_peer,
                              "ratio": finals[gradguard] / best_peer
                              if math.isfinite(best_peer) and best_peer > 0 else
                              (1.0 if math.isfinite(finals[gradguard]) else math.inf),
                              "rank": ranks[gradguard], "ranks": ranks}
        for f in FAULTS:
            fr = rec(r, lr, faulted(gradguard, f, fault_step))
            g = fr.get("gradguard", {})
            row["faults"][f] = {"final": _final(fr), "ratio": _final(fr) / _final(gg),
                                "lr_scale": g.get("lr_scale", 1.0),
                                "backoffs": g.get("lr_backoffs", 0)}
        rows.append(row)
    t = TARGETS
    n = len(rows)
    close = sum(row["ratio"] <= t.healthy_close for row in rows)
    worst = max((row["ratio"] for row in rows), default=math.nan)
    backed = [row["recipe"].name for row in rows if row["backoffs"]]
    highs = [(row, k) for row in rows for k in HIGH]
    gg_div = [(row["recipe"].name, k) for row, k in highs if row["high"][k]["diverged"][gradguard]]
    within = sum(row["high"][k]["ratio"] <= t.high_within for row, k in highs)
    methods = (*peers, gradguard)
    avg_rank = {m: statistics.mean(row["high"][k]["ranks"][m] for row, k in highs)
                for m in methods} if highs else {}
    fault_ok = [(row["recipe"].name, f) for row in rows for f in FAULTS
                if row["faults"][f]["lr_scale"] == 1.0
                and row["faults"][f]["ratio"] <= t.fault_within]
    return {"rows": rows, "n": n, "close": close, "worst": worst, "backed": backed,
            "gg_div": gg_div, "within": within, "n_high": len(highs), "avg_rank": avg_rank,
            "fault_ok": len(fault_ok), "n_fault": n * len(FAULTS)}


def _ranks(finals: dict[str, float]) -> dict[str, float]:
    """Average ranks (1 = best; ties share; a non-finite loss ranks last)."""
    out = {}
    for m, v in finals.items():
        below = sum(1 for w in finals.values() if w < v)
        same = sum(1 for w in finals.values() if w == v)
        out[m] = below + (same + 1) / 2
    return out


def _f(x: float, d: int = 3) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{d}g}"


def render(a: dict[str, Any], which: str, gradguard: str, peers: Sequence[str],
           elapsed: float, fault_step: int, command: str) -> str:
    """The markdown report."""
    t = TARGETS
    n, nh = a["n"], a["n_high"]
    best_rank = min(a["avg_rank"].values()) if a["avg_rank"] else math.nan
    lines = [
        f"# Zoo benchmark: the {which} draws",
        "",
        f"`{command}` — {n} recipes (generator seeds "
        f"{min(r['recipe'].seed for r in a['rows'])}-{max(r['recipe'].seed for r in a['rows'])}"
        f"), {a['rows'][0]['recipe'].steps if a['rows'] else 0} steps per run; method under test "
        f"`{gradguard}`; library `{library_id()}`; {elapsed / 60:.0f} min.",
        "",
        "The split is by generator seed and was fixed before any result: tuning seeds 0-31, "
        "validation seeds 100-131 (`benchmarks/gradbench/zoo.py`). Final loss = validation "
        "loss after the run; a run *diverged* when it is non-finite or above the initial one.",
        "",
        "## Targets",
        "",
        "| target | result | met |",
        "|---|---|---|",
        f"| healthy: GradGuard <= {t.healthy_close}x no guard on >= "
        f"{t.healthy_close_share:.0%} of draws | {a['close']}/{n} "
        f"({a['close'] / max(n, 1):.0%}) | {_yes(a['close'] >= t.healthy_close_share * n)} |",
        f"| healthy: <= {t.healthy_max}x on every draw | worst {_f(a['worst'], 4)}x | "
        f"{_yes(a['worst'] <= t.healthy_max)} |",
        f"| healthy: no LR backoff | {len(a['backed'])} draws backed off | "
        f"{_yes(not a['backed'])} |",
        f"| too high (x10, x30): 0 GradGuard divergences | {len(a['gg_div'])} | "
        f"{_yes(not a['gg_div'])} |",
        f"| too high: best or within {t.high_within - 1:.0%} of the best peer on >= "
        f"{t.high_within_share:.0%} | {a['within']}/{nh} ({a['within'] / max(nh, 1):.0%}) | "
        f"{_yes(a['within'] >= t.high_within_share * nh)} |",
        f"| too high: best average rank | GradGuard {_f(a['avg_rank'].get(gradguard, math.nan))}"
        f", best {_f(best_rank)} | {_yes(a['avg_rank'].get(gradguard, math.inf) <= best_rank)} |",
        f"| isolated faults: lr_scale stays 1, final within 0.5 % | {a['fault_ok']}/"
        f"{a['n_fault']} | {_yes(a['fault_ok'] == a['n_fault'])} |",
        "",
        "Average rank at too-high LRs (1 = best of "
        f"{len(peers) + 1}): " + ", ".join(f"{m} {_f(v)}" for m, v in
                                            sorted(a["avg_rank"].items(), key=lambda kv: kv[1])),
        "",
        "## Healthy LR",
        "",
        "| recipe | traits | LR | none | GradGuard | ratio | clipped | backoffs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in a["rows"]:
        r = row["recipe"]
        lines.append(f"| {r.name} | {r.traits} | {row['lr']:g} | {_f(row['none'], 4)} | "
                     f"{_f(row['gg'], 4)} | {_f(row['ratio'], 4)} | {row['clipped']} | "
                     f"{row['backoffs']} |")
    lines += ["", "## Too high (GradGuard / best peer, rank among "
              f"{len(peers) + 1}; `div` = diverged)", "",
              "| recipe | " + " | ".join(f"x{k}: " + " / ".join(
                  ("none", *peers[1:], "GG")) for k in HIGH) + " | ratio x10 | ratio x30 |",
              "|---|" + "---|" * (len(HIGH) + 2)]
    for row in a["rows"]:
        cells = []
        for k in HIGH:
            h = row["high"][k]
            cells.append(" / ".join(_f(h["finals"][m], 3) + (" div" if h["diverged"][m] else "")
                                    for m in (*peers, gradguard)))
        lines.append(f"| {row['recipe'].name} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{_f(row['high'][k]['ratio'], 3)} (rank "
                                  f"{_f(row['high'][k]['rank'], 2)})" for k in HIGH) + " |")
    lines += ["", f"## Isolated faults (at step {fault_step}; final / fault-free GradGuard run,"
              " lr_scale at the end)", "",
              "| recipe | " + " | ".join(FAULTS) + " |", "|---|" + "---|" * len(FAULTS)]
    for row in a["rows"]:
        lines.append(f"| {row['recipe'].name} | " + " | ".join(
            f"{_f(row['faults'][f]['ratio'], 4)} (x{_f(row['faults'][f]['lr_scale'], 3)})"
            for f in FAULTS) + " |")
    misses = []
    for row in a["rows"]:
        name = row["recipe"].name
        if row["ratio"] > t.healthy_close or row["backoffs"]:
            misses.append(f"- healthy {name}: {_f(row['ratio'], 4)}x, {row['clipped']} clipped, "
                          f"{row['backoffs']} backoffs")
        for k in HIGH:
            h = row["high"][k]
            if h["diverged"][gradguard] or h["ratio"] > t.high_within:
                misses.append(f"- x{k} {name}: GradGuard {_f(h['finals'][gradguard], 4)} vs best "
                              f"peer {_f(h['best_peer'], 4)} ({_f(h['ratio'], 3)}x)"
                              + (" diverged" if h["diverged"][gradguard] else ""))
        for f in FAULTS:
            fr = row["faults"][f]
            if fr["lr_scale"] != 1.0 or fr["ratio"] > t.fault_within:
                misses.append(f"- {f} {name}: {_f(fr['ratio'], 4)}x, lr_scale "
                              f"{_f(fr['lr_scale'], 3)}")
    lines += ["", "## Misses", ""] + (misses or ["none"])
    return "\n".join(lines) + "\n"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The zoo benchmark (benchmarks/zoo.py).")
    p.add_argument("--set", choices=["tuning", "validation", "all"], default="validation")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 recipes, 30 steps, temp cache, report to stdout")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="generator seeds instead of a set (for a look at single recipes)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--gradguard", default="gradguard",
                   help="the method under test (a 'gradguard(...)' variant for tuning)")
    p.add_argument("--peers", nargs="+", default=list(PEERS),
                   help=f"the peers at too-high LRs (default: {' '.join(PEERS)})")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--cache", type=Path, default=BENCH_ROOT / ".cache" / "zoo")
    p.add_argument("--out", type=Path, default=None,
                   help="report path (default benchmarks/results/zoo_<set>.md)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    t0 = time.perf_counter()
    if args.quick:
        rs = [draw(s, 30) for s in (5, 13)]
        cache = Path(tempfile.mkdtemp(prefix="gg_zoo_"))
        peers: tuple[str, ...] = ("none", "clip1")
        fault_step = 15
    else:
        rs = [draw(s, args.steps) for s in args.seeds] if args.seeds else \
            recipes(args.set, args.steps)
        cache = args.cache
        peers = tuple(args.peers)
        fault_step = args.steps // 2
    get_method(args.gradguard)  # validate the variant before any run
    sweep_jobs = [Job(r.seed, r.steps, lr, "none") for r in rs if r.sgd_family
                  for lr in SGD_SWEEP]
    print(f"zoo: {len(rs)} recipes; SGD sweep {len(sweep_jobs)} runs", flush=True)
    run_jobs(sweep_jobs, cache, args.jobs)
    lrs = {r.seed: healthy_lr(r, cache, 1)[0] for r in rs}
    jobs = plan(rs, lrs, args.gradguard, peers, fault_step)
    print(f"zoo: {len(jobs)} runs", flush=True)
    recs = run_jobs(jobs, cache, args.jobs)
    a = analyse(rs, lrs, recs, args.gradguard, peers, fault_step)
    which = "quick" if args.quick else ("selected" if args.seeds else args.set)
    cmd = "python benchmarks/zoo.py " + (
        "--quick" if args.quick else (f"--seeds {' '.join(map(str, args.seeds))}" if args.seeds
                                      else f"--set {args.set}"))
    if args.gradguard != "gradguard":
        cmd += f" --gradguard '{args.gradguard}'"
    text = render(a, which, args.gradguard, peers, time.perf_counter() - t0, fault_step, cmd)
    if args.quick:
        print(text)
    else:
        out = args.out or BENCH_ROOT / "results" / f"zoo_{which}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    if args.json:
        summ = {k: v for k, v in a.items() if k != "rows"}
        summ["rows"] = [{"recipe": row["recipe"].name, "lr": row["lr"], "ratio": row["ratio"],
                         "backoffs": row["backoffs"], "clipped": row["clipped"],
                         "high": {str(k): {"ratio": v["ratio"], "rank": v["rank"],
                                           "gg_diverged": v["diverged"][args.gradguard]}
                                  for k, v in row["high"].items()},
                         "faults": row["faults"]} for row in a["rows"]]
        args.json.write_text(json.dumps(summ, indent=1, default=str))
    return 0
