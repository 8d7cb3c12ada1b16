"""The overhead command line: parse options, run the sections, write the report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..common import BENCH_ROOT
from ..workloads import E2E_BATCH, E2E_MODELS
from .e2e import run_e2e
from .memory import run_memory
from .micro import run_micro
from .render import render
from .syncs import run_syncs
from .timing import log, machine_info

__all__ = ["DEFAULT_OUT", "main", "parse_args"]

DEFAULT_OUT = BENCH_ROOT / "results" / "overhead.md"
ROOT = BENCH_ROOT
DESCRIPTION = ("Overhead of GradGuard: guard work per step, end-to-end step time, memory, "
               "host syncs.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (small grid and model, few steps); prints the report")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown report path (default: {DEFAULT_OUT.relative_to(ROOT.parent)} "
                        "for a full run, stdout only for --quick)")
    p.add_argument("--json", type=Path, default=None, help="also write raw results as JSON")
    p.add_argument("--sections", default="micro,e2e,memory,syncs",
                   help="comma-separated subset of micro,e2e,memory,syncs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: timings use the calling thread's "
                        "CPU time, robust on a shared machine; with more threads only the "
                        "wall-clock columns are meaningful)")
    p.add_argument("--repeats", type=int, default=None, help="micro repeats (default 5)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="default 5; quick 1")
    p.add_argument("--e2e-steps", type=int, default=None,
                   help="measured steps per fit (default 40; quick 8)")
    p.add_argument("--e2e-warmup", type=int, default=None,
                   help="excluded first steps per fit (default 10; quick 3)")
    p.add_argument("--e2e-models", nargs="+", choices=E2E_MODELS, default=list(E2E_MODELS),
                   metavar="MODEL",
                   help=f"end-to-end models, run in this order (choices: "
                        f"{', '.join(E2E_MODELS)}; default all three)")
    p.add_argument("--width", type=int, default=None,
                   help="DeepMLP width (default 1024; quick 256); e2e, memory snapshot")
    p.add_argument("--depth", type=int, default=None,
                   help="DeepMLP depth (default 6; quick 3); e2e, memory snapshot")
    p.add_argument("--batch", type=int, default=64,
                   help=f"DeepMLP batch size (default 64); ResidualMLP and the LSTM use "
                        f"{E2E_BATCH}, pinned")
    args = p.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or 5
    args.e2e_repeats = args.e2e_repeats or (1 if q else 5)
    args.e2e_steps = args.e2e_steps or (8 if q else 40)
    args.e2e_warmup = args.e2e_warmup or (3 if q else 10)
    args.width = args.width or (256 if q else 1024)
    args.depth = args.depth or (3 if q else 6)
    args.block_s = 0.02 if q else 0.12
    if q:
        args.grid = [(10, 1_000_000), (200, 1_000_000)]
        args.tiny_tensors = (10, 200)
        args.mem_tensors, args.mem_params = (10, 200), 1_000_000
        args.rss_tensors, args.rss_params = 10, 1_000_000
    else:
        # 2000 tensors x 1 M params (500 params per tensor) is no realistic model: skipped
        args.grid = [(n, m) for m in (1_000_000, 10_000_000, 50_000_000)
                     for n in (10, 200, 2000) if not (n == 2000 and m < 10_000_000)]
        args.tiny_tensors = (10, 200, 2000)
        args.mem_tensors, args.mem_params = (10, 200, 2000), 10_000_000
        args.rss_tensors, args.rss_params = 10, 50_000_000
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(args.sections) - {"micro", "e2e", "memory", "syncs"}
    if bad:
        p.error(f"unknown sections {sorted(bad)}")
    if args.e2e_warmup < 1:
        p.error("--e2e-warmup must be >= 1")
    args.e2e_models = list(dict.fromkeys(args.e2e_models))  # repeated names run once
    args.command = "python benchmarks/overhead.py" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:]) else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import lightning.pytorch  # noqa: F401 (sets its loggers to INFO on import: quiet them after)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.get_num_threads())
    try:
        import zclip  # noqa: F401

        have_zclip = True
    except ImportError:
        have_zclip = False
        log("zclip not installed: ZClip baselines skipped (pip install zclip==1.0.0)")
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    for section, fn in (("micro", run_micro), ("e2e", run_e2e), ("memory", run_memory),
                        ("syncs", run_syncs)):
        if section in args.sections:
            ts = time.perf_counter()
            res[section] = fn(args, have_zclip)
            log(f"== {section} done in {time.perf_counter() - ts:.1f}s")
    res["elapsed_s"] = time.perf_counter() - t0
    info["load_end"] = os.getloadavg()
    report = render(info, args, res)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        log(f"wrote {out}")
    else:
        print(report)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "results": res}, indent=1,
                                        default=str))
    return 0
