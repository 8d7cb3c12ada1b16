"""Timing machinery of the overhead benchmark: interleaved repeats, two clocks, machine info.

Every timed thing is a :class:`Timed` (``prepare()`` untimed, then ``run()`` timed);
:func:`measure` warms every one up, then runs rounds in a rotated order and records the
calling thread's CPU time (``time.thread_time``) and the wall clock.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Timed", "fmt_bytes", "fmt_t", "log", "machine_info", "measure", "median", "timed"]


def log(msg: str) -> None:
    """Progress to stderr (the report goes to stdout or a file)."""
    print(msg, file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    """Median, NaN for an empty list."""
    return statistics.median(xs) if xs else float("nan")


def fmt_t(seconds: float) -> str:
    """Format a duration with a unit that keeps 3 significant digits."""
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_bytes(n: float) -> str:
    """``1.5 MiB``-style byte counts."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def machine_info(threads: int) -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            model = m.group(1).strip()
    mem = ""
    with contextlib.suppress(Exception):
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if m:
            mem = fmt_bytes(int(m.group(1)) * 1024)
    versions = {"torch": str(torch.__version__)}
    for mod in ("lightning", "zclip"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:
            versions[mod] = "not installed"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory": mem,
        "torch_threads": threads,
        "python": platform.python_version(),
        "versions": versions,
        "load_start": os.getloadavg(),
    }



# ----------------------------------------------------------------------------- timing
@dataclass
class Timed:
    """One timed thing: ``prepare()`` (untimed) then ``run()`` (timed), per call."""

    name: str
    run: Callable[[], Any]
    prepare: Callable[[], None] = lambda: None
    validate: Callable[[Any], str] | None = None  # called once on a warm-up result
    note: str = ""
    times: list[float] = field(default_factory=list)  # per-repeat medians, CPU time
    wall: list[float] = field(default_factory=list)  # per-repeat medians, wall clock
    calls: int = 1


def measure(methods: list[Timed], repeats: int, warmup: int, block_s: float,
            max_calls: int = 50) -> None:
    """Warm up every method, then run ``repeats`` rounds, each method ``calls`` times per
    round in a rotated order; a round's value is the median of its calls. Records the
    calling thread's CPU time (``time.thread_time``) and the wall clock of every call."""
    for m in methods:
        t_warm = []
        for i in range(warmup):
            m.prepare()
            t0 = time.perf_counter()
            out = m.run()
            t_warm.append(time.perf_counter() - t0)
            if i == 0 and m.validate is not None:
                m.note = m.validate(out)
        m.calls = max(1, min(max_calls, round(block_s / max(min(t_warm), 1e-7))))
    for r in range(repeats):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            ts, ws = [], []
            for _ in range(m.calls):
                m.prepare()
                c0 = time.thread_time()
                t0 = time.perf_counter()
                m.run()
                t1 = time.perf_counter()
                ts.append(time.thread_time() - c0)
                ws.append(t1 - t0)
            m.times.append(median(ts))
            m.wall.append(median(ws))



def timed(fn: Callable[..., Any], acc: list[tuple[float, float]]) -> Callable[..., Any]:
    """Wrap ``fn`` to append (wall, thread CPU) seconds of every call to ``acc``."""
    def wrapper(*a: Any, **k: Any) -> Any:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc.append((time.perf_counter() - t0, time.thread_time() - c0))
    return wrapper


