"""Every path error of the command line is one line on stderr and exit status 2
(no traceback); ``gradguard demo`` without a terminal prints no progress bar, and its bar
names the run instead of ``v_num=uard``.

The command line's path arguments: ``demo --logdir``, ``report LOGDIR``, ``report -o`` (and
its default, ``LOGDIR/gradguard_report.png``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lightning_gradguard.cli import main

pytestmark = [
    pytest.mark.filterwarnings("ignore:GradGuard. step:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*"),
]

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
needs_non_root = pytest.mark.skipif(ROOT, reason="root may write anywhere")


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str, *words: str) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gradguard {command}: error: "), err
    for w in words:
        assert w in lines[0], (w, err)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log directory with one real (tiny) GradientMonitor run."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradguard.callbacks import GradientMonitor

    root = tmp_path_factory.mktemp("logs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pl.Trainer(accelerator="cpu", max_steps=3, log_every_n_steps=1,
                   logger=TensorBoardLogger(str(root), name="", version="run"),
                   callbacks=[GradientMonitor()], enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(BoringModel())
    finally:
        torch.set_num_threads(threads)
    assert list((root / "run").glob("events.out.tfevents.*"))
    return root


# ------------------------------------------------------------------ demo --logdir
def _file(tmp_path: Path) -> Path:
    f = tmp_path / "afile"
    f.write_text("not a directory")
    return f


DEMO_LOGDIRS: dict[str, Callable[[Path], Path]] = {
    "an existing file": _file,
    "under an existing file": lambda tmp: _file(tmp) / "runs",
}


@pytest.mark.parametrize("case", list(DEMO_LOGDIRS))
def test_demo_logdir_errors(case: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    logdir = DEMO_LOGDIRS[case](tmp_path)
    assert main(["demo", "--steps", "2", "--logdir", str(logdir)]) == 2
    out = _one_line_error(capsys, "demo", f"--logdir {logdir}", "is a file, not a directory")
    assert "training" not in out  # refused before any training
    assert (tmp_path / "afile").read_text() == "not a directory"


@needs_non_root
def test_demo_logdir_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["demo", "--steps", "2", "--logdir", str(locked / "runs")]) == 2
        _one_line_error(capsys, "demo", "no permission to write in", str(locked))
    finally:
        locked.chmod(0o755)


def test_demo_oserror_while_running_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A path problem found only while running (a disk full, a folder removed) too."""
    import lightning_gradguard.demo as demo

    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "runs" / "x"))

    monkeypatch.setattr(demo, "run_demo", failing)
    assert main(["demo", "--steps", "2", "--logdir", str(tmp_path / "runs")]) == 2
    _one_line_error(capsys, "demo", "No space left on device", str(tmp_path / "runs" / "x"))


# ------------------------------------------------------------------ report LOGDIR
def test_report_logdir_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert _one_line_error(capsys, "report", "log directory not found",
                           str(tmp_path / "nope")) == ""


def test_report_logdir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _file(tmp_path)
    assert main(["report", str(f)]) == 2
    assert _one_line_error(capsys, "report", f"not a log directory: {f} is a file") == ""


@needs_non_root
def test_report_logdir_unreadable(runs: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    logdir = tmp_path / "logs"
    shutil.copytree(runs, logdir)
    (logdir / "run").chmod(0o000)
    try:
        assert main(["report", str(logdir), "-o", str(tmp_path / "r.png")]) == 2
        _one_line_error(capsys, "report", "Permission denied")
    finally:
        (logdir / "run").chmod(0o755)


# ------------------------------------------------------------------ report -o
REPORT_OUTPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "an existing directory": (lambda tmp: tmp, "it is a directory"),
    "under an existing file": (lambda tmp: _file(tmp) / "r.png", "is a file, not a directory"),
    "deep under an existing file": (lambda tmp: _file(tmp) / "a" / "b" / "r.png",
                                    "is a file, not a directory"),
    "an unknown image format": (lambda tmp: tmp / "r.xyz",
                                "matplotlib cannot write '.xyz' images"),
}


@pytest.mark.parametrize("case", list(REPORT_OUTPUTS))
def test_report_output_errors(case: str, runs: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    make, words = REPORT_OUTPUTS[case]
    output = make(tmp_path)
    assert main(["report", str(runs), "-o", str(output)]) == 2
    out = _one_line_error(capsys, "report", f"cannot write the report to {output}", words)
    assert out == ""  # nothing printed as if it had worked


def test_report_default_output_is_a_directory(runs: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    logdir = tmp_path / "logs"
    shutil.copytree(runs, logdir)
    (logdir / "gradguard_report.png").mkdir()
    assert main(["report", str(logdir)]) == 2
    _one_line_error(capsys, "report", "gradguard_report.png: it is a directory")


@needs_non_root
def test_report_output_not_writable(runs: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["report", str(runs), "-o", str(locked / "r.png")]) == 2
        _one_line_error(capsys, "report", "no permission to write in", str(locked))
        existing = tmp_path / "r.png"
        existing.write_bytes(b"")
        existing.chmod(0o444)
        assert main(["report", str(runs), "-o", str(existing)]) == 2
        _one_line_error(capsys, "report", "no permission to write it")
    finally:
        locked.chmod(0o755)


def test_report_output_that_works(runs: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The checks refuse nothing valid: new folders, other formats, no suffix."""
    for given, written in ((tmp_path / "new" / "deeper" / "r.png",) * 2,
                           (tmp_path / "r.svg",) * 2, (tmp_path / "r", tmp_path / "r.png")):
        assert main(["report", str(runs), "-o", str(given)]) == 0
        assert written.is_file()
        out, err = capsys.readouterr()
        assert err == ""
        assert f"wrote {written}\n" in out


# ------------------------------------------------------------------ demo: progress bar
_BAR = re.compile(r"Epoch \d+|it/s|\d+/\d+ \[|v_num")


def test_demo_without_a_terminal_prints_no_progress_bar(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the command-line entry, stdout captured (not a terminal), no --no-progress:
    no progress bar line; and "Why did it explode?" is the guarded run's diagnosis, as its
    own event file records it."""
    from lightning_gradguard.report import load_run

    logdir = tmp_path / "runs"
    assert main(["demo", "--model", "residual", "--steps", "5", "--logdir", str(logdir)]) == 0
    out, err = capsys.readouterr()
    assert not _BAR.search(out), out
    assert "\r" not in out
    assert not _BAR.search(err), err
    vdir = logdir / "residual" / "version_0"
    guarded = load_run(vdir / "gradguard").diagnosis
    unguarded = load_run(vdir / "no_guard").diagnosis
    assert guarded is not None, "the demo's guarded run diagnoses its explosion"
    assert unguarded is None
    why = out.split("Why did it explode? (GradGuard's diagnosis, most likely first)\n")[1]
    why = why.split("\n\n")[0]
    ids = [m.group(1) for m in re.finditer(r"^  \d+\. ([a-z_]+):", why, re.MULTILINE)]
    assert ids == guarded[1]


def test_demo_progress_bar_names_the_run(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--progress forces the bar on (here, without a terminal): each run's bar says which
    run it is, not Lightning's v_num (the version folder's last 4 characters: 'uard')."""
    assert main(["demo", "--steps", "2", "--progress", "--logdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "v_num" not in out
    assert "run=no guard" in out
    assert "run=GradGuard()" in out
    assert "Epoch 0" in out


def test_demo_no_progress_still_works(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-progress wins over a terminal."""
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["demo", "--steps", "2", "--no-progress", "--logdir", str(tmp_path)]) == 0
    assert not _BAR.search(capsys.readouterr().out)
