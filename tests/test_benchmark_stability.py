"""Smoke test of ``benchmarks/stability.py --quick`` (a subprocess, in a temp dir, < 60 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stability.py"


def _run_quick(script: Path, tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """Run ``script --quick`` in ``tmp_path``; returns (md, png, json, cache) paths."""
    pytest.importorskip("matplotlib")
    out, png, js, cache = (tmp_path / "s.md", tmp_path / "s.png", tmp_path / "s.json",
                           tmp_path / "cache")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("GG_STABILITY_LIB", None)  # test the working tree
    cmd = [sys.executable, str(script), "--quick", "--cache", str(cache), "--out", str(out),
           "--png", str(png), "--json", str(js)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=110, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, png, js, cache


@pytest.mark.timeout(120)
def test_stability_quick(tmp_path: Path) -> None:
    out, png, js, cache = _run_quick(SCRIPT, tmp_path)

    # one JSON record per (model, lr, seed, method): 1 model x 2 LRs x 1 seed x 3 methods
    records = [json.loads(p.read_text()) for p in cache.rglob("*.json")]
    assert len(records) == 6
    for rec in records:
        assert {"model", "lr", "seed", "method", "initial", "final", "diverged",
                "nonfinite_steps", "trace"} <= rec.keys()
        assert isinstance(rec["diverged"], bool)
        assert rec["nonfinite_steps"] >= 0
        assert "val_loss" in rec["initial"]
        assert "val_mae" in rec["final"]
    assert {r["method"] for r in records} == {"none", "clip1", "gradguard"}

    summary = json.loads(js.read_text())
    assert summary["runs"] == summary["expected_runs"] == 6
    assert set(summary["avg_rank"]) == {"none", "clip1", "gradguard"}
    ranks = [r for r in summary["avg_rank"].values() if r is not None]
    assert len(ranks) == 3
    assert all(1.0 <= r <= 3.0 for r in ranks)
    assert abs(sum(ranks) - 6.0) < 1e-9  # ranks 1..3 in every cell

    md = out.read_text()
    for heading in ("# Stability benchmark", "## Summary", "## Targets", "## DeepMLP"):
        assert heading in md
    table_rows = [line for line in md.splitlines() if line.startswith("| `gradguard` |")]
    assert table_rows, md
    # the 2% target names GradGuard's closest cell (both quick LRs converge for clip1)
    assert "highest ratio to the best other method: " in md
    assert "GradGuard runs by `lightning_gradguard` source hash: `" in md
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(120)
def test_stability_momentum_quick(tmp_path: Path) -> None:
    """The momentum grid: the same runs with ``sgd_momentum`` and 10x lower learning rates."""
    out, _, _, cache = _run_quick(SCRIPT.with_name("stability_momentum.py"), tmp_path)
    records = [json.loads(p.read_text()) for p in cache.rglob("*.json")]
    assert len(records) == 6
    assert {r["lr"] for r in records} == {0.0003, 0.03}  # the quick LRs, 10x lower
    assert all(r["model_kwargs"]["optimizer"] == "sgd_momentum" for r in records)
    assert "# Stability benchmark: SGD + momentum 0.9" in out.read_text()
    assert "benchmarks/stability_momentum.py" in out.read_text()


def _gradbench() -> None:
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))


def test_stability_helpers() -> None:
    _gradbench()
    from gradbench.analysis import average_ranks, gradguard_libraries
    from gradbench.methods import get_method, method_slug

    inf = float("inf")
    assert average_ranks([0.3, 0.1, inf, inf]) == [2.0, 1.0, 3.5, 3.5]
    assert method_slug("gradguard") == "gradguard"
    slug = method_slug("gradguard(recovery_steps=100)")
    assert slug.startswith("gradguard_recovery_steps_100_")
    assert "(" not in slug
    setup = get_method("gradguard(clip=ZScoreClip(z_threshold=3.0))").build()
    assert len(setup.callbacks) == 1
    assert setup.callbacks[0].settings.clip.z_threshold == 3.0  # not the default (2.5)
    assert setup.trainer_kwargs == {}
    assert get_method("clip1").build().trainer_kwargs == {"gradient_clip_val": 1.0}
    # cached GradGuard runs are grouped by the library sources they ran with; baselines not
    recs = {("LSTM", 1.0, 0, "gradguard"): {"library": "/a sha1:aaa"},
            ("LSTM", 1.0, 1, "gradguard"): {"library": "/b sha1:aaa"},
            ("LSTM", 1.0, 0, "gradguard(recovery_steps=100)"): {"library": "/a sha1:bbb"},
            ("LSTM", 1.0, 0, "none"): {"library": "/a sha1:ccc"}}
    assert gradguard_libraries(recs) == {"aaa": 2, "bbb": 1}
    with pytest.raises(ValueError, match="unknown method"):
        get_method("sgd_magic")


@pytest.mark.parametrize("text", [
    "gradguard(recovery_steps=__import__('os').getpid())",  # not a literal or a policy
    "gradguard(1.0)",  # positional
    "gradguard(**{'a': 1})",
    "gradguard(recovery_steps=100",  # syntax
    "gradguard(no_such_argument=1)",  # GradGuard rejects it
    "gradguard(clip=open('x'))",
])
def test_variants_are_parsed_not_evaluated(text: str) -> None:
    _gradbench()
    from gradbench.methods import get_method

    with pytest.raises(ValueError, match="method"):
        get_method(text)


def test_variant_values() -> None:
    _gradbench()
    from gradbench.methods import get_method, gradguard_variant

    guard = get_method("gradguard(clip=FixedNormClip(max_norm=2.5), recovery_steps=-(-7))")
    cb = guard.build().callbacks[0]
    assert cb.settings.clip.max_norm == 2.5
    assert cb.settings.recovery_steps == 7
    assert guard.gradguard
    assert guard.library
    assert gradguard_variant(recovery_steps=7).name == "gradguard(recovery_steps=7)"


def test_momentum_suite_is_the_same_grid_with_another_optimizer() -> None:
    _gradbench()
    from gradbench.workloads import STABILITY, STABILITY_MOMENTUM

    assert STABILITY_MOMENTUM.methods == STABILITY.methods
    assert STABILITY_MOMENTUM.seeds == STABILITY.seeds
    assert list(STABILITY_MOMENTUM.workloads) == list(STABILITY.workloads)
    for name, w in STABILITY.workloads.items():
        m = STABILITY_MOMENTUM.workloads[name]
        assert m.lrs == tuple(float(f"{lr / 10:.3g}") for lr in w.lrs)
        assert m.model_kwargs(0.1) == {**w.model_kwargs(0.1), "optimizer": "sgd_momentum"}
        assert w.model_kwargs(0.1)["optimizer"] == "sgd"
        assert m.steps == w.steps
    assert STABILITY.workloads["DeepMLP"].note.endswith("plain SGD (explodes at lr=0.1)")
    assert STABILITY_MOMENTUM.quick.lrs == (0.0003, 0.03)


def test_run_cache_keys(tmp_path: Path) -> None:
    """A record is reused only for the same configuration and, for library methods, sources."""
    _gradbench()
    from gradbench.common import library_id
    from gradbench.run import CACHE_VERSION, RunCache, _config
    from gradbench.workloads import STABILITY

    w = STABILITY.workloads["DeepMLP"]
    cache = RunCache(tmp_path)
    for method in ("none", "gradguard"):
        rec = {**_config(w, 0.1, 0, method, 300), "library": "/x sha1:000000000000"}
        cache.save(rec)
        assert rec["version"] == CACHE_VERSION
        assert cache.load(w, 0.1, 1, method, 300) is None  # another seed
        assert cache.load(w, 0.1, 0, method, 200) is None  # other steps
    # a baseline does not depend on the library; GradGuard runs of other sources are rerun
    assert cache.load(w, 0.1, 0, "none", 300) is not None
    assert cache.load(w, 0.1, 0, "gradguard", 300) is None
    assert RunCache(tmp_path, any_library=True).load(w, 0.1, 0, "gradguard", 300) is not None
    cache.save({**_config(w, 0.1, 0, "gradguard", 300), "library": library_id()})
    assert cache.load(w, 0.1, 0, "gradguard", 300) is not None
    # another workload configuration (e.g. the momentum grid's optimizer) is not reused
    m = w.with_optimizer("sgd_momentum", "SGD + momentum", 1.0)
    assert cache.load(m, 0.1, 0, "none", 300) is None


@pytest.mark.timeout(120)
def test_a_report_written_elsewhere_keeps_its_plot_beside_it(tmp_path: Path) -> None:
    """A subset run with ``--out`` (no ``--png``) never overwrites the committed plot."""
    pytest.importorskip("matplotlib")
    committed = SCRIPT.parent / "results" / "stability.png"
    before = committed.read_bytes() if committed.exists() else None
    out = tmp_path / "subset.md"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(SCRIPT), "--models", "DeepMLP", "--lrs", "0.01", "--seeds", "0",
           "--methods", "none", "--steps", "3", "--cache", str(tmp_path / "cache"),
           "--out", str(out), "--json", str(tmp_path / "s.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=110, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert out.exists()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (committed.read_bytes() if committed.exists() else None) == before
