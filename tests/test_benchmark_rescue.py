"""``benchmarks/rescue.py`` (``gradbench.rescue``, ``gradbench.rescue_cli``): a ``--quick``
smoke run (a subprocess, in a temp dir, seconds), the split, the summary mode, and no
benchmark that patches a library class."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "rescue.py"


@pytest.mark.timeout(170)
def test_rescue_quick(tmp_path: Path) -> None:
    pytest.importorskip("zclip")
    cache, out = tmp_path / "cache", tmp_path / "r.md"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--cache", str(cache), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=160, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    # 2 workloads (healthy SGD MLP, Adam MLP with a NaN loss at step 10) x 3 methods
    records = [json.loads(p.read_text()) for p in cache.rglob("*.json")]
    assert len(records) == 6
    # faulty cells run "<method>+<fault>" (the FaultInjector in front of the method)
    by = {(r["model"], r["method"].partition("+")[0]): r for r in records}
    assert by[("mlp_adam_fault", "gradguard")]["method"] == "gradguard+nan_step10"
    for rec in records:
        assert rec["steps"] == 25
        if rec["params_nonfinite_at"] is None:  # else the run stops there (nothing can change)
            assert rec["steps_run"] == len(rec["trace"]["loss"]) == 25
        assert "sha1:" in rec["library"]
    # the NaN batch: no guard -> the weights go non-finite; GradGuard skips exactly that step
    unguarded = by[("mlp_adam_fault", "none")]
    assert unguarded["diverged"]
    assert unguarded["params_nonfinite_at"] == 11  # global_step after the poisoned update
    guarded = by[("mlp_adam_fault", "gradguard")]
    assert not guarded["diverged"]
    assert guarded["gradguard"]["skipped_steps"] == 1
    # an isolated NaN batch: a skip, no backoff, so no reason (StepReport.reason)
    assert [e[:4] for e in guarded["events"] if e[1] == "skip"] == [[10, "skip", "", 0]]
    # the healthy run: every method trains (final below initial)
    for m in ("none", "clip1", "gradguard"):
        rec = by[("mlp_sgd", m)]
        assert float(rec["final"]["val_loss"]) < float(rec["initial"]["val_loss"])
    text = out.read_text()
    assert "| `gradguard` |" in text
    assert "mlp_adam_fault" in text

    # a second invocation reuses every cached run (no new records, same files)
    before = sorted(p.name for p in cache.rglob("*.json"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=160, check=False)
    assert proc.returncode == 0
    assert sorted(p.name for p in cache.rglob("*.json")) == before


def _bench_path() -> None:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))


def test_split_is_disjoint() -> None:
    _bench_path()
    from gradbench.rescue import (
        TUNING_SEEDS,
        TUNING_WORKLOADS,
        VALIDATION_ONLY_WORKLOADS,
        VALIDATION_SEEDS,
        WORKLOADS,
    )

    assert not set(TUNING_SEEDS) & set(VALIDATION_SEEDS)
    assert not set(TUNING_WORKLOADS) & set(VALIDATION_ONLY_WORKLOADS)
    assert set(TUNING_WORKLOADS) | set(VALIDATION_ONLY_WORKLOADS) == set(WORKLOADS)
    assert (BENCH / "results" / "rescue_split.md").exists()


def test_clip_values_and_faulty_methods_are_registry_methods() -> None:
    _bench_path()
    from gradbench.methods import get_method, with_faults
    from gradbench.rescue import FAULTS

    assert get_method("clip0.25").build().trainer_kwargs == {"gradient_clip_val": 0.25}
    assert get_method("clip1").build().trainer_kwargs == {"gradient_clip_val": 1.0}
    name = with_faults("gradguard", "all3", FAULTS["all3"])
    assert name == "gradguard+all3"
    method = get_method(name)
    assert method.gradguard
    assert method.library
    setup = method.build()
    assert [type(cb).__name__ for cb in setup.callbacks] == ["FaultInjector", "GradGuard"]
    assert with_faults("gradguard", "all3", FAULTS["all3"]) == name  # registered once


def test_summary_mode_reads_the_cache_only(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _bench_path()
    from gradbench.rescue_cli import main

    assert main(["--summary", "--methods", "gradguard", "--workloads", "mlp_sgd",
                 "mlp_adam_fault", "--seeds", "0", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| method | mlp_sgd | mlp_adam_fault |"
    assert "| `gradguard` | 0.05: ?<br>0.15: ?<br>0.5: ?<br>1.5: ? | ? |" in out
    assert not list(tmp_path.rglob("*.json"))  # nothing ran
    assert main(["--split"]) == 0
    assert "seeds [3, 4, 5]" in capsys.readouterr().out


def test_no_benchmark_patches_a_library_class() -> None:
    """Benchmarks observe the guard through ``GuardCore.listeners`` or wrap an instance's
    bound method, never assign to an attribute of a library class."""
    pattern = re.compile(r"\b(GuardCore|GradGuard|GradientMonitor)\.\w+\s*=[^=]")
    hits = [f"{p.relative_to(BENCH)}:{i}" for p in BENCH.rglob("*.py")
            if ".cache" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
