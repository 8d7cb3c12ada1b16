"""``tools/overhead_vs_rev.py``: the exported revision imports under its own name, and the
interleaving gives every measurement every position."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("overhead_vs_rev",
                                                  ROOT / "tools" / "overhead_vs_rev.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs the git checkout")
def test_export_revision_renames_every_import(tmp_path: Path) -> None:
    mod = _module()
    full = mod.export_revision("HEAD", tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert full == head
    pkg = tmp_path / "gg_rev"
    sources = list(pkg.rglob("*.py"))
    assert sources
    assert not (tmp_path / "lightning_gradguard").exists()
    assert not [p for p in sources if "lightning_gradguard" in p.read_text()]
    # importable beside the working tree's package, as a distinct copy
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gg_rev.core.guard as g; "
            "import lightning_gradguard.core.guard as h; assert g.GuardCore is not h.GuardCore; "
            "print(g.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert str(pkg) in out


def test_interleaved_cycles_through_every_order() -> None:
    mod = _module()
    seen: list[str] = []

    def rec(name: str):  # type: ignore[no-untyped-def]
        def f() -> int:
            seen.append(name)
            return {"a": 1000, "b": 2000, "c": 4000}[name]
        return f

    out = mod.interleaved({k: rec(k) for k in "abc"}, rounds=6, calls=1)
    assert out == {"a": 1.0, "b": 2.0, "c": 4.0}
    timed = seen[-18:]  # after the warm-up calls: 6 rounds x 3 measurements
    rounds = {tuple(timed[i:i + 3]) for i in range(0, 18, 3)}
    assert len(rounds) == 6  # all 3! orders, each once
