"""Smoke test of ``benchmarks/rescue.py --quick`` (a subprocess, in a temp dir, seconds)."""

from __future__ import annotations

import json
import os
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
    by = {(r["workload"], r["method"]): r for r in records}
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
    assert [e[:3] for e in guarded["events"] if e[1] == "skip"] == [[10, "skip", "nonfinite"]]
    # the healthy run: every method trains (final below initial)
    for m in ("none", "clip1", "gradguard"):
        rec = by[("mlp_sgd", m)]
        assert float(rec["final"]) < float(rec["initial"])
    text = out.read_text()
    assert "| `gradguard` |" in text
    assert "mlp_adam_fault" in text

    # a second invocation reuses every cached run (no new records, same files)
    before = sorted(p.name for p in cache.rglob("*.json"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=160, check=False)
    assert proc.returncode == 0
    assert sorted(p.name for p in cache.rglob("*.json")) == before


def test_split_is_disjoint() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import rescue_workloads as rw
        from rescue_split import (
            TUNING_SEEDS,
            TUNING_WORKLOADS,
            VALIDATION_ONLY_WORKLOADS,
            VALIDATION_SEEDS,
        )
    finally:
        sys.path.remove(str(BENCH))
    assert not set(TUNING_SEEDS) & set(VALIDATION_SEEDS)
    assert not set(TUNING_WORKLOADS) & set(VALIDATION_ONLY_WORKLOADS)
    assert set(TUNING_WORKLOADS) | set(VALIDATION_ONLY_WORKLOADS) == set(rw.WORKLOADS)
    assert (BENCH / "results" / "rescue_split.md").exists()
