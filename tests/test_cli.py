"""The ``gradguard`` command line: ``--version``, help and ``demo``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_gradguard
from lightning_gradguard.cli import main

pytestmark = [
    pytest.mark.filterwarnings("ignore:GradGuard. step:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*"),
]


def test_version_subprocess(tmp_path: Path) -> None:
    root = Path(lightning_gradguard.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "lightning_gradguard", "--version"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == lightning_gradguard.__version__


def test_version_and_help_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == lightning_gradguard.__version__
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out
    assert "report" in out


def test_unknown_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--model", "transformer"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lightning_gradguard.demos")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    logdir = tmp_path / "runs"
    assert main(["demo", "--steps", "12", "--logdir", str(logdir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if "no guard" in line)
    assert "GradGuard()" in header
    assert header.index("no guard") < header.index("GradGuard()")
    rows = {line.split("  ")[0].strip(): line.split() for line in lines}
    assert rows["steps"][-2:] == ["12", "12"]
    for label in ("final train loss", "final val loss", "non-finite steps", "skipped steps",
                  "clipped steps", "LR backoffs"):
        assert label in rows, label
    assert f"tensorboard --logdir {logdir}" in out
    assert f"gradguard report {logdir}" in out
    for run in ("no_guard", "gradguard"):
        d = logdir / "lstm" / run
        assert list(d.glob("events.out.tfevents.*")), f"no event file in {d}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]

    # the printed follow-up command works on what the demo wrote
    png = tmp_path / "demo.png"
    assert main(["report", str(logdir), "-o", str(png)]) == 0
    report = capsys.readouterr().out
    assert "lstm/no_guard:" in report
    assert "lstm/gradguard:" in report
    assert png.stat().st_size > 20_000
