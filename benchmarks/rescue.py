#!/usr/bin/env python
"""Rescue-without-harm benchmark (issue 14): realistic workloads, peers at their defaults.

Workloads (:mod:`rescue_workloads`): word LSTM LM (SGD lr 20), decoder-only transformer LMs
(AdamW; pre-/post-LN, with/without warmup), a ResNet with BatchNorm (SGD momentum), an IRNN
on the adding problem, a user's healthy MLP (SGD; also 2,000 steps), and healthy MLP runs
(Adam and SGD) with one injected NaN / Inf / x1e6 batch. Each at its tuned LR and x3, x10,
x30 (the fault workloads at the tuned LR), seeds as asked, methods:

==================  ==========================================================================
method              what runs
==================  ==========================================================================
``none``            plain Lightning, no clipping
``clip1``           ``Trainer(gradient_clip_val=1.0)``; ``clip<v>`` any value (``clip0.25``:
                    the LSTM recipe's own clipping)
``zclip``           ``ZClipLightningCallback()`` (package defaults)
``autoclip_p10``    AutoClip paper setting (10th percentile of the global norm history)
``agc``             unit-wise AGC (clipping 0.01, output layer excluded)
``gradguard``       ``GradGuard()`` (defaults); ``gradguard(...)`` any keyword variant
``proto:<name>``    a scratch prototype from ``rescue_prototypes.py`` (candidate rules tried
                    without editing the package)
==================  ==========================================================================

Each run is one ``Trainer.fit`` of a fixed number of optimizer steps; metric: the module's
validation loss after training (``diverged``: non-finite or above the initial one). Runs are
cached as JSON under ``benchmarks/.cache/rescue/runs/``, keyed by the run's configuration,
the hash of ``rescue_workloads.py``, the hash of the library's sources and (for prototypes)
the hash of ``rescue_prototypes.py``: a changed library or workload reruns, nothing else does.

The train / validation split is fixed in ``benchmarks/results/rescue_split.md`` (``--set``).

Usage::

    python benchmarks/rescue.py --quick                        # smoke run (seconds)
    python benchmarks/rescue.py --set tuning                   # the tuning set, then report
    python benchmarks/rescue.py --set validation               # once, at the end
    python benchmarks/rescue.py --workloads lstm_lm --seeds 0 --methods none gradguard
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import rescue_workloads as rw  # noqa: E402
from gradbench.analysis import average_ranks  # noqa: E402
from gradbench.common import fmt, library_id, quiet  # noqa: E402
from gradbench.methods import get_method, method_slug  # noqa: E402
from gradbench.run import Monitor  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from rescue_split import (  # noqa: E402
    TUNING_SEEDS,
    TUNING_WORKLOADS,
    VALIDATION_ONLY_WORKLOADS,
    VALIDATION_SEEDS,
)

from lightning_gradguard.callbacks import GradGuard  # noqa: E402
from lightning_gradguard.testing import Fault, FaultInjector  # noqa: E402

DEFAULT_CACHE = rw.CACHE / "runs"
DEFAULT_MD = ROOT / "results" / "rescue.md"
PROTOTYPES = ROOT / "rescue_prototypes.py"
#: Bump when the run protocol changes.
CACHE_VERSION = 1

PEERS: tuple[str, ...] = ("none", "clip1", "zclip", "autoclip_p10", "agc")
MAIN_METHODS: tuple[str, ...] = (*PEERS, "gradguard")

QUICK_STEPS = 25
QUICK_FAULT = (Fault(step=10, kind="nan", target="loss"),)


# ----------------------------------------------------------------------------- methods
@functools.lru_cache(maxsize=1)
def _prototypes() -> Any:
    return importlib.import_module("rescue_prototypes")


def _file_hash(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12] if path.exists() else "-"


def _proto_hash(name: str) -> str:
    """Hash of prototype ``name``: its registry entry and the source of what it uses.

    The classes of ``rescue_prototypes`` named in the entry (and, for ``ProtoGuard``, the
    core and statistics it builds on) are hashed; adding or changing another prototype does
    not invalidate this one's runs.
    """
    import inspect

    text = PROTOTYPES.read_text() if PROTOTYPES.exists() else ""
    _, _, registry = text.partition("\nPROTOTYPES: dict")
    entry, collecting = [], False
    for line in registry.splitlines():
        if line.startswith("    \""):
            collecting = line.startswith(f'    "{name}":')
        elif not line.startswith("     "):
            collecting = False
        if collecting:
            entry.append(line)
    body = "\n".join(entry)
    mod = _prototypes()
    used = {n for n in ("ProtoGuard", "AdamUpdateControl") if n in body}
    if "ProtoGuard" in used:
        used |= {"ProtoCore", "LossStats"}
    for n in sorted(used):
        body += inspect.getsource(getattr(mod, n))
    return hashlib.sha1(body.encode()).hexdigest()[:12]


def methods_for(workload: rw.Workload, methods: Sequence[str]) -> list[str]:
    """``methods`` plus the workload's own recipe methods (e.g. the LSTM's ``clip0.25``)."""
    out = list(methods)
    if list(methods) == list(MAIN_METHODS):
        out += [m for m in workload.extra_methods if m not in out]
    return out


def make_method(method: str) -> tuple[list[Callback], dict[str, Any]]:
    """Callbacks and extra Trainer kwargs of ``method``."""
    if method.startswith("clip") and method[4:].replace(".", "", 1).isdigit():
        return [], {"gradient_clip_val": float(method[4:])}
    if method.startswith("proto:"):
        return _prototypes().build(method[len("proto:"):]), {}
    setup = get_method(method).build()
    return setup.callbacks, setup.trainer_kwargs


# ----------------------------------------------------------------------------- guard events
_EVENTS: list[list[Any]] | None = None


def _install_recorder() -> None:
    """Record every non-trivial :class:`GuardCore` step report (clip, skip, backoff...)."""
    from lightning_gradguard.core.guard import GuardCore

    if getattr(GuardCore.step, "_rescue_recorder", False):
        return
    original = GuardCore.step

    @functools.wraps(original)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        before = self.counters.lr_backoffs
        r = original(self, *args, **kwargs)
        backoff = self.counters.lr_backoffs > before
        if _EVENTS is not None and (r.action.value != "none" or backoff or r.spike
                                    or r.growth or not r.finite):
            if not r.finite:
                why = "nonfinite"
            elif r.growth:
                why = "growth"
            elif r.spike:
                why = "spike"
            else:
                why = "cap"
            _EVENTS.append([r.step, r.action.value, why, int(backoff), _r(r.grad_norm),
                            _r(r.grad_norm_clipped), _r(r.threshold), _r(r.lr_scale)])
        return r

    step._rescue_recorder = True  # type: ignore[attr-defined]
    GuardCore.step = step  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- one run
def _r(x: float) -> float | str:
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.4g}")


def _f(x: float | str | None) -> float:
    return math.nan if x is None else float(x)


def run_key(workload: str, lr: float, seed: int, fault: str, method: str, steps: int) -> str:
    """Cache key: the configuration, the workloads' source, the library (and prototypes)."""
    parts = [CACHE_VERSION, workload, lr, seed, fault, method, steps, rw.source_hash(),
             library_id().split(" sha1:")[-1]]
    if method.startswith("proto:"):
        parts.append(_proto_hash(method[len("proto:"):]))
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def run_one(workload: str, lr: float, seed: int, fault: str, method: str,
            steps: int | None = None, faults: Sequence[Fault] | None = None) -> dict[str, Any]:
    """Train one cell and return its JSON record."""
    global _EVENTS
    w = rw.WORKLOADS[workload]
    steps = w.steps if steps is None else steps
    faults = rw.FAULTS[fault] if faults is None else faults
    lightning.seed_everything(seed, verbose=False)
    model, loader = w.build(lr, seed)
    initial = model.val_loss()  # type: ignore[operator]
    callbacks, trainer_kwargs = make_method(method)
    monitor = Monitor()
    injector = [FaultInjector(list(faults))] if faults else []
    tmp = tempfile.mkdtemp(prefix="gg_rescue_")
    _install_recorder()
    _EVENTS = []
    t0 = time.perf_counter()
    try:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp,
            callbacks=[monitor, *injector, *callbacks], **trainer_kwargs,
        )
        trainer.fit(model, train_dataloaders=loader)
        steps_run = trainer.global_step
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        events, _EVENTS = _EVENTS, None
    seconds = time.perf_counter() - t0
    final = model.val_loss()  # type: ignore[operator]
    nonfinite = monitor.nonfinite_steps
    if monitor.params_nonfinite_at is not None:
        nonfinite += steps - steps_run
        final = math.nan
    rec: dict[str, Any] = {
        "version": CACHE_VERSION, "workload": workload, "lr": lr, "seed": seed, "fault": fault,
        "method": method, "steps": steps, "initial": _r(initial), "final": _r(final),
        "diverged": (not math.isfinite(final)) or final > initial,
        "nonfinite_steps": nonfinite, "steps_run": steps_run,
        "params_nonfinite_at": monitor.params_nonfinite_at, "seconds": round(seconds, 2),
        "library": library_id(), "workloads": rw.source_hash(),
        "trace": {"loss": [_r(x) for x in monitor.loss],
                  "raw_norm": [_r(x) for x in monitor.raw],
                  "lr": [_r(x) for x in monitor.lr]},
        "events": events,
    }
    guards = [cb for cb in callbacks if isinstance(cb, GradGuard)]
    if guards:
        s = guards[0].summary()
        rec["gradguard"] = {k: s.get(k) for k in ("spikes", "clipped_steps", "skipped_steps",
                                                  "lr_backoffs", "growth_events", "lr_scale",
                                                  "halted")}
    return rec


# ----------------------------------------------------------------------------- cache
def cache_file(cache: Path, workload: str, lr: float, seed: int, fault: str, method: str,
               steps: int) -> Path:
    key = run_key(workload, lr, seed, fault, method, steps)
    return cache / workload / f"lr{lr:g}_s{seed}_{fault}_{method_slug(method)}_{key}.json"


def get(cache: Path, workload: str, lr: float, seed: int, fault: str, method: str,
        steps: int, run: bool, faults: Sequence[Fault] | None = None) -> dict[str, Any] | None:
    """The cached record, or a new run (``run``), or ``None``."""
    path = cache_file(cache, workload, lr, seed, fault, method, steps)
    if path.exists():
        try:
            rec: dict[str, Any] = json.loads(path.read_text())
            return rec
        except (OSError, json.JSONDecodeError):
            pass
    if not run:
        return None
    rec = run_one(workload, lr, seed, fault, method, steps, faults)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)
    return rec


# ----------------------------------------------------------------------------- report
Key = tuple[str, float, str]  # (workload, lr, fault)


def _loss(rec: dict[str, Any]) -> float:
    return math.inf if rec["diverged"] else _f(rec["final"])


def _mean(xs: Sequence[float]) -> float:
    fin = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(fin) if len(fin) == len(xs) and fin else math.inf


def report(results: dict[tuple[str, float, int, str, str], dict[str, Any]],
           cells: Sequence[Key], seeds: Sequence[int], methods: Sequence[str],
           title: str) -> str:
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
        w = rw.WORKLOADS[wname]
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
            means = {m: _mean([_loss(r) for r in rs]) for m, rs in recs.items()}
            best = min(means.values())
            row = []
            for m in ms:
                losses = [_loss(r) for r in recs[m]]
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
                rk = average_ranks([_loss(results[(wname, lr, s, fault, m)]) for m in methods
                                    if (wname, lr, s, fault, m) in results])
                for m, x in zip([m for m in methods if (wname, lr, s, fault, m) in results], rk,
                                strict=True):
                    ranks[m].append(x)
            if "gradguard" in means:
                peers = {m: v for m, v in means.items() if m in PEERS or m.startswith("clip")}
                if peers:
                    bp = min(peers, key=lambda m: peers[m])
                    ratio = means["gradguard"] / peers[bp] if math.isfinite(peers[bp]) else math.nan
                    target_lines.append(f"| {wname} | {lr:g} | {fault} | {fmt(means['gradguard'])}"
                                        f" | `{bp}` {fmt(peers[bp])} | {fmt(ratio, 4)} |")
        lines.append("")
        # GradGuard's actions
        gg = [m for m in ms if m == "gradguard" or m.startswith(("gradguard(", "proto:"))]
        if gg:
            lines += ["GradGuard's actions (summed over seeds): clipped / skipped / LR backoffs "
                      "(by cause) / final lr_scale (mean):", ""]
            for m in gg:
                for (_, lr, fault) in wcells:
                    rs = [results[(wname, lr, s, fault, m)] for s in seeds]
                    summ = [r.get("gradguard") or {} for r in rs]
                    causes: dict[str, int] = {}
                    for r in rs:
                        for e in r.get("events") or []:
                            if e[3]:
                                causes[e[2]] = causes.get(e[2], 0) + 1
                    scale = [float(x.get("lr_scale", 1.0) or 1.0) for x in summ]
                    clipped, skipped, backoffs = (
                        sum(x.get(k, 0) or 0 for x in summ)
                        for k in ("clipped_steps", "skipped_steps", "lr_backoffs"))
                    lines.append(
                        f"- `{m}` lr {lr:g} {fault}: clipped {clipped}, skipped {skipped}, "
                        f"backoffs {backoffs} {causes or ''}, "
                        f"lr_scale {statistics.fmean(scale):.3g}")
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


# ----------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (seconds, own cache)")
    p.add_argument("--set", choices=("tuning", "validation", "all"), default=None,
                   help="the split's workloads and seeds (rescue_split.md)")
    p.add_argument("--workloads", nargs="+", default=None, choices=sorted(rw.WORKLOADS))
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--mults", nargs="+", type=float, default=None,
                   help="only these LR multipliers of the tuned LR")
    p.add_argument("--faults", nargs="+", default=None, help="only these faults")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    p.add_argument("--report-only", action="store_true", help="no new runs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    if args.quick:
        tmp_cache = args.cache if args.cache != DEFAULT_CACHE else Path(
            tempfile.mkdtemp(prefix="gg_rescue_quick_"))
        results = {}
        cells: list[Key] = []
        methods = ["none", "clip1", "gradguard"]
        for wname, fault, faults in (("mlp_sgd", "clean", ()),
                                     ("mlp_adam_fault", "nan_step10", QUICK_FAULT)):
            lr = rw.WORKLOADS[wname].tuned_lr
            cells.append((wname, lr, fault))
            for m in methods:
                rec = get(tmp_cache, wname, lr, 0, fault, m, QUICK_STEPS, True, faults)
                assert rec is not None
                results[(wname, lr, 0, fault, m)] = rec
        text = report(results, cells, [0], methods, "Rescue benchmark (--quick smoke run)")
        out = args.out or tmp_cache / "rescue_quick.md"
        out.write_text(text)
        print(text)
        return 0
    if args.set == "tuning":
        wl, seeds = list(TUNING_WORKLOADS), list(TUNING_SEEDS)
    elif args.set == "validation":
        wl, seeds = list(TUNING_WORKLOADS + VALIDATION_ONLY_WORKLOADS), list(VALIDATION_SEEDS)
    elif args.set == "all":
        wl, seeds = list(rw.WORKLOADS), list(TUNING_SEEDS + VALIDATION_SEEDS)
    else:
        wl, seeds = list(TUNING_WORKLOADS), list(TUNING_SEEDS)
    wl = args.workloads or wl
    seeds = args.seeds if args.seeds is not None else seeds
    methods = args.methods or list(MAIN_METHODS)
    results: dict[tuple[str, float, int, str, str], dict[str, Any]] = {}
    cells = []
    t0 = time.perf_counter()
    n_new = 0
    for wname in wl:
        w = rw.WORKLOADS[wname]
        mults = [m for m in w.lr_mults if args.mults is None or m in args.mults]
        for mult in mults:
            lr = float(f"{w.tuned_lr * mult:.4g}")
            for fault in w.faults:
                if args.faults is not None and fault not in args.faults:
                    continue
                cells.append((wname, lr, fault))
                for seed in seeds:
                    for m in methods_for(w, methods):
                        had = cache_file(args.cache, wname, lr, seed, fault, m, w.steps).exists()
                        rec = get(args.cache, wname, lr, seed, fault, m, w.steps,
                                  not args.report_only)
                        if rec is None:
                            continue
                        results[(wname, lr, seed, fault, m)] = rec
                        if not had:
                            n_new += 1
                            print(f"{wname} lr {lr:g} seed {seed} {fault} {m}: "
                                  f"{rec['final']} ({rec['seconds']} s)"
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


if __name__ == "__main__":
    sys.exit(main())
