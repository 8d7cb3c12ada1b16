"""The ``gradguard`` command line: ``--version``, help and ``demo``."""

from __future__ import annotations

import itertools
import math
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


#: what ``gradguard --version`` prints: the distribution name, then the version
VERSION_LINE = f"lightning-gradguard {lightning_gradguard.__version__}"


def test_version_subprocess(tmp_path: Path) -> None:
    root = Path(lightning_gradguard.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "lightning_gradguard", "--version"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == VERSION_LINE


def test_version_and_help_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == VERSION_LINE
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out
    assert "report" in out


def test_unknown_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--model", "transformer"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_steps_zero_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "-3", "ten"):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--steps", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --steps: must be an integer >= 1, got '{bad}'" in err
        assert "Traceback" not in err


def test_demo_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "TensorBoard log directory (default: gradguard_runs)" in out
    assert "optimizer steps per run (default: 300)" in out
    assert "(default: mlp)" in out
    assert "--no-progress" in out


def _table(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        label = line.split("  ")[0].strip()
        if label:
            rows[label] = line.split()
    return rows


def _demo(logdir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["demo", "--steps", "12", "--logdir", str(logdir), "--no-progress"]) == 0
    return capsys.readouterr().out


def test_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str]) -> None:
    """Two demos into one log directory: two version folders, a report that does not merge
    them (the old layout wrote both demos' event files into the same two folders), and the
    same counts in the demo's table, the report's text and the report's picture."""
    pytest.importorskip("lightning_gradguard.demos")
    from lightning_gradguard.report import counts, draw_report, scan_logdir

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    logdir = tmp_path / "runs"
    outs = [_demo(logdir, capsys), _demo(logdir, capsys)]
    for version, out in enumerate(outs):
        lines = out.splitlines()
        header = next(line for line in lines if "no guard" in line)
        assert "GradGuard()" in header
        assert header.index("no guard") < header.index("GradGuard()")
        rows = _table(out)
        assert rows["steps"][-2:] == ["12", "12"]
        for label in ("val loss before training", "final train loss", "final val loss",
                      "non-finite steps", "skipped steps", "clipped steps", "LR backoffs",
                      "LR scale at the end"):
            assert label in rows, label
        vdir = logdir / "mlp" / f"version_{version}"
        assert f"tensorboard --logdir {logdir}" in out
        assert f"gradguard report {vdir}" in out
        for run in ("no_guard", "gradguard"):
            files = list((vdir / run).glob("events.out.tfevents.*"))
            assert len(files) == 1, f"{vdir / run}: {files}"
    assert outs[0].split("Logs:")[0] == outs[1].split("Logs:")[0]  # same seed, same table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]

    # the report over both demos: four runs, none merged, nothing left out
    scan = scan_logdir(logdir)
    assert [r.name for r in scan.runs] == [
        f"mlp/version_{v}/{run}" for v in (0, 1) for run in ("gradguard", "no_guard")]
    assert scan.untagged == []
    assert scan.ignored_files == []
    for run in scan.runs:
        # GradGuard's counter, or GradientMonitor's in its own namespace (the no-guard run)
        tag = ("gradmonitor/nonfinite_steps" if run.name.endswith("no_guard")
               else "gradguard/nonfinite_steps")
        steps, _ = run.series(tag)
        assert steps == list(range(12)), run.name  # every step logged once, in order
        if run.name.endswith("no_guard"):  # the monitor writes none of the guard's tags
            assert not [t for t in run.scalars if t.startswith("gradguard/")], run.name

    # one source of truth: the table, the report's text and the picture's legend agree
    png = tmp_path / "demo.png"
    vdir = logdir / "mlp" / "version_1"
    assert main(["report", str(vdir), "-o", str(png)]) == 0
    report = capsys.readouterr().out
    assert png.stat().st_size > 20_000
    rows = _table(outs[1])
    table = {"no_guard": {k: int(rows[label][-2]) for k, label in (
                 ("nonfinite_steps", "non-finite steps"),)},
             "gradguard": {k: int(rows[label][-1]) for k, label in (
                 ("nonfinite_steps", "non-finite steps"), ("skipped_steps", "skipped steps"),
                 ("clipped_steps", "clipped steps"), ("lr_backoffs", "LR backoffs"))}}
    assert table["no_guard"]["nonfinite_steps"] > 0  # it did explode
    runs = {r.name.split("/")[-1]: r for r in scan_logdir(vdir).runs}
    drawing = draw_report(list(runs.values()))
    import matplotlib.pyplot as plt

    plt.close(drawing.figure)
    panels = {p.name.split("/")[-1]: p for p in drawing.panels}
    words = {"nonfinite_steps": "non-finite steps", "skipped_steps": "skipped steps",
             "clipped_steps": "clipped steps", "lr_backoffs": "LR backoffs"}
    for name, expected in table.items():
        assert {k: counts(runs[name])[k] for k in expected} == expected, name
        assert {k: panels[name].counts[k] for k in expected} == expected, name
        after = ("\n" + report).split(f"\n{name}: ")[1].splitlines()[1:]
        section = "\n".join(line for line in itertools.takewhile(
            lambda line: line.startswith("  "), after))
        for key, value in expected.items():
            assert f"  {words[key]}: {value}" in section, (name, key)
    nonfinite = panels["no_guard"].markers["nonfinite"]
    assert nonfinite.label == (f"non-finite gradients: {table['no_guard']['nonfinite_steps']} "
                               "(each marked)")
    assert len(nonfinite.steps) == table["no_guard"]["nonfinite_steps"]
    legend = [t.get_text() for t in panels["no_guard"].axes[0].get_legend().get_texts()]
    assert nonfinite.label in legend


def test_demo_prints_the_guarded_runs_diagnosis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """"Why did it explode?" is the guarded run's diagnosis, never the unguarded run's
    (the demo's two results come in the order: no guard, GradGuard())."""
    import lightning_gradguard.demo as demo
    from lightning_gradguard.demo import DemoResult

    vdir = tmp_path / "runs" / "rnn" / "version_0"
    unguarded = DemoResult("no guard", 12, math.nan, math.nan, 12, 0, 0, 0,
                           str(vdir / "no_guard"), 1.0,
                           diagnosis=({"cause": "init_too_large", "evidence": "unguarded",
                                       "remedy": "not this one"},))
    guarded = DemoResult("GradGuard()", 12, 0.5, 0.6, 3, 3, 4, 1, str(vdir / "gradguard"), 1.0,
                         lr_scale=0.5,
                         diagnosis=({"cause": "recurrent_weights", "evidence": "spectral "
                                     "radius 1.9", "remedy": "orthogonal init"},
                                    {"cause": "lr_too_high", "evidence": "12 % per step",
                                     "remedy": "lower the LR"}))
    results = [unguarded, guarded]
    calls: list[tuple[str, int]] = []

    def fake_run_demo(model: str, steps: int, logdir: str,
                      progress: bool = True) -> list[DemoResult]:
        calls.append((model, steps))
        return results

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--model", "rnn", "--steps", "12", "--logdir",
                 str(tmp_path / "runs"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert calls == [("rnn", 12)]
    assert demo.format_diagnosis(guarded) in out
    why = out.split("Why did it explode?")[1].split("Logs:")[0]
    assert "1. recurrent_weights: spectral radius 1.9" in why
    assert "2. lr_too_high: 12 % per step" in why
    assert "init_too_large" not in out
    lines = out.splitlines()
    assert f"Logs: {vdir}" in lines
    assert f"  gradguard report {vdir}" in lines

    # a guarded run without a diagnosis prints no such section, whatever the other run had
    results[1] = DemoResult("GradGuard()", 12, 0.5, 0.6, 0, 0, 4, 0, str(vdir / "gradguard"),
                            1.0)
    assert main(["demo", "--steps", "12", "--logdir", str(tmp_path / "runs"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Why did it explode?" not in out
    assert "init_too_large" not in out
