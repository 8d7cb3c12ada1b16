"""``benchmarks/overhead.py``: options, the configuration registry, and a real ``syncs`` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _gradbench() -> None:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))


def test_e2e_configurations_are_registry_methods() -> None:
    _gradbench()
    from gradbench.methods import REGISTRY
    from gradbench.overhead.e2e import E2E_CONFIGS, FLOOR_CFG, e2e_configs

    assert set(E2E_CONFIGS.values()) <= set(REGISTRY)
    names, skipped = e2e_configs(have_zclip=False)
    assert names[:4] == ["none", FLOOR_CFG, "gradient_clip_val=1.0", "GradGuard()"]
    assert skipped == {"ZClipLightningCallback()": "zclip not installed"}
    assert REGISTRY["gradguard"].gradguard
    assert not REGISTRY["clip1"].gradguard


def test_parse_args_quick_and_full() -> None:
    _gradbench()
    from gradbench.overhead.cli import parse_args

    q = parse_args(["--quick"])
    assert (q.e2e_repeats, q.e2e_steps, q.e2e_warmup, q.width, q.depth) == (1, 8, 3, 256, 3)
    assert q.grid == [(10, 1_000_000), (200, 1_000_000)]
    assert q.command == "python benchmarks/overhead.py --quick"
    full = parse_args([])
    assert (2000, 1_000_000) not in full.grid
    assert (2000, 10_000_000) in full.grid
    assert full.sections == ["micro", "e2e", "memory", "syncs"]
    with pytest.raises(SystemExit):
        parse_args(["--sections", "micro,bogus"])


@pytest.mark.timeout(120)
def test_overhead_syncs_section(tmp_path: Path) -> None:
    """The ``syncs`` section end to end: measured, rendered, written (a subprocess)."""
    out, js = tmp_path / "o.md", tmp_path / "o.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "overhead.py"), "--quick", "--sections", "syncs",
         "--out", str(out), "--json", str(js)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    md = out.read_text()
    assert md.startswith("# GradGuard overhead benchmark")
    assert "## 4. Host synchronisations per optimizer step" in md
    assert "| `GuardCore.step()`, clean step, no loss | 1 |" in md  # one host read
    res = json.loads(js.read_text())["results"]
    assert set(res) == {"syncs", "elapsed_s"}
    assert res["syncs"]["GradGuard in Trainer.fit"]["optimizer_steps"] == 20
