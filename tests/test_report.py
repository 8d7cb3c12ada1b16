"""``gradguard report`` on real runs (GradGuard + a fault, GradientMonitor) and its errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from support.modules import TinyRegression

from lightning_gradguard.callbacks import GradGuard, GradientMonitor
from lightning_gradguard.cli import main
from lightning_gradguard.report import (
    PanelDrawing,
    RunData,
    counts,
    draw_report,
    load_runs,
    scan_logdir,
    scan_notes,
    summarize,
)
from lightning_gradguard.testing import Fault, FaultInjector

pytestmark = [
    pytest.mark.filterwarnings("ignore:GradGuard. step:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*"),
]

NAN_STEP = 7


def _fit(logdir: Path, version: str, callbacks: list[Callback], steps: int = 24) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, log_every_n_steps=2,
        logger=TensorBoardLogger(str(logdir), name="", version=version),
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyRegression())


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("runs")
        _fit(root, "guarded", [FaultInjector([Fault(step=NAN_STEP, kind="nan")]), GradGuard()])
        _fit(root, "monitored", [GradientMonitor()])
        return root
    finally:
        torch.set_num_threads(threads)


def test_load_runs_finds_both_runs(logdir: Path) -> None:
    runs = {r.name: r for r in load_runs(logdir)}
    assert set(runs) == {"guarded", "monitored"}
    assert runs["guarded"].events("gradguard/skipped_steps") == [NAN_STEP]
    assert "gradmonitor/layer_norm/net.0" in runs["monitored"].scalars
    assert "train_loss" in runs["guarded"].scalars


def test_report_cli_writes_png_and_summary(logdir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    png = tmp_path / "out" / "report.png"
    assert main(["report", str(logdir), "-o", str(png)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert png.is_file()
    assert png.stat().st_size > 20_000
    with Image.open(png) as im:
        w, h = im.size
        assert im.format == "PNG"
    assert w > 600
    assert h > 400
    assert w > h  # two runs side by side
    assert "guarded:" in out
    assert "monitored:" in out
    assert f"skipped steps: 1 (first at step {NAN_STEP})" in out
    assert "non-finite steps: 1" in out
    assert "grad norm: min" in out
    assert f"wrote {png}" in out


def test_report_default_output_path(logdir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # copy one run so the default PNG (LOGDIR/gradguard_report.png) lands in tmp_path
    import shutil

    root = tmp_path / "logs"
    shutil.copytree(logdir / "guarded", root / "guarded")
    assert main(["report", str(root)]) == 0
    png = root / "gradguard_report.png"
    assert png.is_file()
    assert png.stat().st_size > 20_000
    assert "skipped steps: 1" in capsys.readouterr().out


def test_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert "gradguard report: error: log directory not found" in err
    assert str(missing) in err
    assert out == ""
    assert not missing.exists()


def test_directory_without_event_files(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("hi")
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert "no TensorBoard event files" in err
    assert not (tmp_path / "r.png").exists()


def test_event_files_without_gradguard_tags(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _fit(tmp_path, "plain", [], steps=4)
    assert list((tmp_path / "plain").glob("events.out.tfevents.*"))
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert "no run has gradguard tags" in err
    assert "1 run has no gradguard/ or gradmonitor/ tags (not drawn): plain" in err
    assert not (tmp_path / "r.png").exists()


def test_nonfinite_loss_markers_are_inside_a_log_scaled_loss_panel() -> None:
    """A run whose loss went from huge to NaN: the finite part puts the panel on a log scale,
    where y = 0 does not exist; the NaN markers must still be drawn inside the panel."""
    import matplotlib.pyplot as plt

    steps = list(range(10))
    loss = [1e3 * 10.0**s for s in range(4)] + [float("nan")] * 6
    run = RunData("diverged", {"train_loss": (steps, loss),
                               "gradguard/grad_norm": (steps, [1.0] * 10)})
    drawing = draw_report([run])
    fig = drawing.figure
    try:
        ax = drawing.panels[0].axes[2]
        assert ax.get_yscale() == "log"
        assert drawing.panels[0].markers["loss_nonfinite"].steps == [4, 5, 6, 7, 8, 9]
        (markers,) = [c for c in ax.collections
                      if c.get_label() == "loss NaN/Inf (at logged steps)"]
        fig.canvas.draw()
        pts = markers.get_offset_transform().transform(markers.get_offsets())
        box = ax.get_window_extent()
        assert len(pts) == 6
        assert all(box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1 for x, y in pts)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------ what the report draws
def _artists_agree(panel: PanelDrawing) -> None:
    """The record and the figure agree: every recorded curve and marker set is on the axes,
    with the same data, and the legend lists exactly those labels."""
    ax = panel.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for label, (xs, ys) in panel.curves.items():
        assert list(lines[label].get_xdata()) == xs
        assert list(lines[label].get_ydata()) == ys
    scatters = {c.get_label(): c for c in ax.collections}
    for key, ms in panel.markers.items():
        if key in ("halt", "loss_nonfinite"):
            continue
        offsets = scatters[ms.label].get_offsets()
        assert [int(x) for x, _ in offsets] == ms.steps
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    expected = list(panel.curves) + [m.label for k, m in panel.markers.items()
                                     if k != "loss_nonfinite"]
    assert sorted(legend) == sorted(expected)


def test_draw_report_records_curves_and_markers() -> None:
    """Every step logged: one mark per event; spikes told apart from update-cap clips."""
    import matplotlib.pyplot as plt

    steps = list(range(8))
    run = RunData("r", {
        "gradguard/grad_norm": (steps, [1.0, 2.0, 50.0, 1.5, 9.0, 1.0, 1.0, 1.0]),
        "gradguard/grad_norm_clipped": (steps, [1.0, 2.0, 5.0, 1.5, 3.0, 1.0, 1.0, 1.0]),
        "gradguard/clip_threshold": (steps, [10.0, 10.0, 5.0, 6.0, 3.0, 6.0, 6.0, 6.0]),
        "gradguard/lr_scale": (steps, [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.6, 0.6]),
        "gradguard/spikes": (steps, [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        "gradguard/clipped_steps": (steps, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]),
        "gradguard/skipped_steps": (steps, [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0]),
        "gradguard/nonfinite_steps": (steps, [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0]),
        "gradguard/lr_backoffs": (steps, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    })
    drawing = draw_report([run])
    try:
        (panel,) = drawing.panels
        assert panel.curves["grad norm (before clipping)"] == (steps, run.series(
            "gradguard/grad_norm")[1])
        assert panel.curves["clip threshold"][1][2] == 5.0
        assert panel.curves["grad norm after clipping"][1][4] == 3.0
        m = panel.markers
        assert m["spikes"].steps == [2]
        assert m["spikes"].label == "spike, clipped to the threshold: 1 (each marked)"
        assert m["other_clips"].steps == [4]  # clipped, no spike: the update cap
        assert m["other_clips"].label == "clipped by the update cap / per unit: 1 (each marked)"
        assert m["skipped"].steps == [5, 6]
        assert m["skipped"].count == 2
        assert "nonfinite" not in m  # every non-finite step was skipped
        assert m["lr_backoffs"].steps == [3]
        assert panel.lr_scale == (steps, run.series("gradguard/lr_scale")[1])
        assert panel.counts == {"nonfinite_steps": 2, "skipped_steps": 2, "spikes": 1,
                                "clipped_steps": 2, "lr_backoffs": 1, "other_clips": 1}
        assert panel.halted_at is None
        assert panel.title == "r — GradGuard"
        _artists_agree(panel)
    finally:
        plt.close(drawing.figure)


def test_markers_at_a_logging_interval_say_so() -> None:
    """A counter logged every 10 steps: the count is its last value, the marks are the
    logged steps where it rose, and the label says exactly that."""
    import matplotlib.pyplot as plt

    steps = [0, 10, 20, 30]
    run = RunData("monitored", {
        "gradguard/grad_norm": (steps, [1.0, 2.0, 3.0, 4.0]),
        "gradguard/nonfinite_steps": (steps, [0.0, 4.0, 4.0, 13.0]),
    })
    drawing = draw_report([run])
    try:
        ms = drawing.panels[0].markers["nonfinite"]
        assert ms.steps == [10, 30]
        assert ms.count == 13
        assert not ms.every_event
        assert ms.label == ("non-finite gradients: 13 (marked: the 2 logged steps where the "
                            "count rose)")
        assert drawing.panels[0].title == "monitored — not guarded (GradientMonitor)"
        _artists_agree(drawing.panels[0])
    finally:
        plt.close(drawing.figure)
    assert "  non-finite steps: 13 (first at step 10)" in summarize(run).splitlines()


def test_panels_in_a_grid() -> None:
    import matplotlib.pyplot as plt

    runs = [RunData(f"r{i}", {"gradguard/grad_norm": ([0, 1], [1.0, 2.0])}) for i in range(5)]
    drawing = draw_report(runs)
    try:
        w, h = drawing.figure.get_size_inches()
        assert (w, h) == (21.0, 14.0)  # 3 columns x 2 rows, not one long row
        x0 = {round(p.axes[0].get_position().x0, 3) for p in drawing.panels}
        y0 = {round(p.axes[0].get_position().y0, 3) for p in drawing.panels}
        assert len(x0) == 3
        assert len(y0) == 2
    finally:
        plt.close(drawing.figure)
    with pytest.raises(ValueError, match="`runs` must hold at least one run"):
        draw_report([])


def test_halted_run_is_marked_halted(tmp_path: Path) -> None:
    """A real halt (NaN from step 5 on, halt_after=3): read from GradGuard's text entry."""
    faults = FaultInjector([Fault(step=s, kind="nan") for s in range(5, 30)])
    _fit(tmp_path, "halted", [faults, GradGuard(halt_after=3)], steps=20)
    (run,) = load_runs(tmp_path)
    assert run.halted_at == 7
    assert counts(run)["skipped_steps"] == 3
    assert "  HALTED after step 7" in summarize(run).splitlines()
    import matplotlib.pyplot as plt

    drawing = draw_report([run])
    try:
        panel = drawing.panels[0]
        assert panel.title == "halted — GradGuard — HALTED after step 7"
        assert panel.markers["halt"].steps == [7]
        assert panel.markers["skipped"].steps == [5, 6, 7]
        assert panel.axes[0].get_title() == panel.title
        _artists_agree(panel)
    finally:
        plt.close(drawing.figure)


def test_a_rerun_into_the_same_folder_is_not_merged(tmp_path: Path) -> None:
    """Two runs into one fixed version folder: only the newest is read (the old code merged
    both: steps went back to 0 and the counts doubled); the older file is named."""
    _fit(tmp_path, "v", [FaultInjector([Fault(step=NAN_STEP, kind="nan")]), GradGuard()])
    first = sorted((tmp_path / "v").glob("events.out.tfevents.*"))
    _fit(tmp_path, "v", [FaultInjector([Fault(step=3, kind="nan")]), GradGuard()], steps=12)
    scan = scan_logdir(tmp_path)
    (run,) = scan.runs
    steps, _ = run.series("gradguard/grad_norm")
    assert steps == sorted(steps)
    assert steps[-1] == 10  # logged every 2 steps
    assert run.events("gradguard/skipped_steps") == [3]
    assert counts(run)["skipped_steps"] == 1
    assert scan.ignored_files == [f"v/{first[0].name}"]
    assert "1 older event file of earlier runs in the same folder not read" in scan_notes(scan)[0]


def test_a_resumed_run_continues_in_a_new_file(tmp_path: Path) -> None:
    """Event files that continue each other (a resume) are one run."""
    from torch.utils.tensorboard import SummaryWriter

    for start in (0, 10):
        w = SummaryWriter(str(tmp_path / "run"))
        for step in range(start, start + 10):
            w.add_scalar("gradguard/grad_norm", 1.0 + step, step)
            w.add_scalar("gradguard/skipped_steps", float(step >= 12), step)
        w.close()
    scan = scan_logdir(tmp_path)
    (run,) = scan.runs
    assert run.series("gradguard/grad_norm")[0] == list(range(20))
    assert run.events("gradguard/skipped_steps") == [12]
    assert scan.ignored_files == []


def test_a_validate_after_fit_is_the_same_run(tmp_path: Path) -> None:
    """``trainer.validate`` after ``fit`` with the same logger writes a second event file with
    ``val_loss`` at the last step, which the fit's file also logged: still one run."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "run"))
    for step in range(10):
        w.add_scalar("gradguard/grad_norm", 1.0, step)
    w.add_scalar("val_loss", 0.5, 9)
    w.close()
    w = SummaryWriter(str(tmp_path / "run"))
    w.add_scalar("val_loss", 0.4, 9)
    w.close()
    scan = scan_logdir(tmp_path)
    (run,) = scan.runs
    assert run.series("gradguard/grad_norm")[0] == list(range(10))
    assert run.series("val_loss") == ([9, 9], [0.5, pytest.approx(0.4)])
    assert scan.ignored_files == []


def test_runs_without_tags_are_named_not_dropped(logdir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    root = tmp_path / "logs"
    shutil.copytree(logdir / "guarded", root / "guarded")
    _fit(root, "plain", [], steps=4)
    assert main(["report", str(root), "-o", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "guarded: GradGuard, counters as of step" in out
    assert "1 run has no gradguard/ or gradmonitor/ tags (not drawn): plain" in out
    assert [r.name for r in scan_logdir(root).runs] == ["guarded"]


def test_diagnosis_is_the_latest_diagnosis_text(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A run whose ``gradguard/events`` hold several diagnoses (pre-flight, first backoff,
    halt; then a rollback text without causes): the report names the latest diagnosis."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_gradguard.core.diagnosis import Cause
    from lightning_gradguard.core.messages import causes_text

    init = Cause("init_too_large", "weights 3x He", "use He init")
    lr = Cause("lr_too_high", "40 % per step", "lower the LR")
    data = Cause("data_nonfinite", "NaN in the batch", "clean the data")
    w = SummaryWriter(str(tmp_path / "run"))
    for step in range(16):
        w.add_scalar("gradguard/lr_scale", 1.0, step)
        w.add_scalar("gradguard/skipped_steps", float(max(0, step - 9)), step)
    w.add_text("gradguard/events", "**pre-flight**\n\nGradGuard: step 0: the first step's "
               "evidence already says this run is likely to explode:\n" + causes_text([init]),
               0)
    # the markdown list GradGuard writes to its events text (written out here, so this test
    # does not depend on where the callback builds it)
    w.add_text("gradguard/events", "**diagnosis at the first backoff** (step 5)\n\n"
               "1. `lr_too_high`: 40 % per step. **Remedy:** lower the LR\n"
               "2. `init_too_large`: weights 3x He. **Remedy:** use He init", 5)
    w.add_text("gradguard/events", "**halt** — GradGuard halted training: 3 consecutive "
               "non-finite steps.\nLikely causes, most likely first:\n"
               + causes_text([data, lr]), 12)
    w.add_text("gradguard/events", "GradGuard: restored the last good snapshot (step 8) "
               "after 3 consecutive non-finite steps", 14)
    w.close()
    (run,) = load_runs(tmp_path)
    assert [s for s, _ in run.texts] == [0, 5, 12, 14]
    assert run.diagnosis == (12, ["data_nonfinite", "lr_too_high"])
    line = "  diagnosis (step 12, most likely first): data_nonfinite, lr_too_high"
    assert line in summarize(run).splitlines()
    import matplotlib.pyplot as plt

    drawing = draw_report([run])
    plt.close(drawing.figure)
    assert drawing.notes == ["run: diagnosis at step 12, most likely first: data_nonfinite, "
                             "lr_too_high"]
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.png")]) == 0
    assert line in capsys.readouterr().out.splitlines()


# ------------------------------------------- GradGuard and GradientMonitor in one Trainer
def test_guard_and_monitor_in_one_trainer_report_the_guards_counts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With GradGuard and GradientMonitor in one Trainer, the monitor writes under its own
    ``gradmonitor/...`` tags and the report reads the guard's values: a run whose guard
    skipped 2 NaN steps is reported with 2 non-finite steps, and ``gradguard/grad_norm`` has
    one value a step (the monitor's values under the guard's tags would give 0 and two)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    steps = 24
    guard = GradGuard()
    faults = FaultInjector([Fault(step=5, kind="nan"), Fault(step=11, kind="nan")])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, log_every_n_steps=1,
        logger=TensorBoardLogger(str(tmp_path), name="", version="both"),
        callbacks=[faults, guard, GradientMonitor()], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(TinyRegression())
    assert guard.summary()["nonfinite_steps"] == 2
    assert guard.summary()["skipped_steps"] == 2

    (file,) = (tmp_path / "both").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(file), size_guidance={SCALARS: 0})
    acc.Reload()
    norm_steps = [e.step for e in acc.Scalars("gradguard/grad_norm")]
    assert len(norm_steps) == len(set(norm_steps)), "two gradguard/grad_norm values at a step"
    assert sorted(norm_steps) == [s for s in range(steps) if s not in (5, 11)]  # NaN: no value
    assert [e.step for e in acc.Scalars("gradguard/nonfinite_steps")] == list(range(steps))
    tags = set(acc.Tags()["scalars"])
    assert {"gradmonitor/grad_norm", "gradmonitor/grad_norm_max",
            "gradmonitor/nonfinite_steps"} <= tags
    assert not {t for t in tags if t.startswith("gradguard/")} - {
        f"gradguard/{k}" for k in ("grad_norm", "grad_norm_clipped", "clip_threshold",
                                   "lr_scale", "skipped_steps", "spikes", "clipped_steps",
                                   "nonfinite_steps", "lr_backoffs", "rollbacks",
                                   "amp_overflow_steps")}

    (run,) = load_runs(tmp_path)
    assert counts(run)["nonfinite_steps"] == 2
    assert counts(run)["skipped_steps"] == 2
    assert run.events("gradguard/nonfinite_steps") == [5, 11]
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "  non-finite steps: 2 (first at step 5)" in out
    assert "  skipped steps: 2 (first at step 5)" in out
    drawing = draw_report([run])
    try:
        (panel,) = drawing.panels
        assert panel.markers["skipped"].steps == [5, 11]
        assert "nonfinite" not in panel.markers  # both non-finite steps were skipped
        # the norm drawn is the guard's (one value per step)
        assert panel.curves["grad norm (before clipping)"][0] == sorted(norm_steps)
    finally:
        import matplotlib.pyplot as plt

        plt.close(drawing.figure)


def test_a_monitor_only_run_still_reports_the_monitors_norm_and_count(logdir: Path) -> None:
    runs = {r.name: r for r in load_runs(logdir)}
    run = runs["monitored"]
    assert "gradmonitor/grad_norm" in run.scalars
    assert not any(t.startswith("gradguard/") for t in run.scalars)
    assert counts(run) == {"nonfinite_steps": 0}
    text = summarize(run)
    assert text.startswith("monitored: not guarded (GradientMonitor), counters as of step 22")
    assert "  non-finite steps: 0" in text.splitlines()
    assert "  grad norm: min " in text
    drawing = draw_report([run])
    try:
        curves = drawing.panels[0].curves
        assert curves["grad norm (before clipping)"][0] == run.series("gradmonitor/grad_norm")[0]
        assert "max grad norm per interval" in curves
    finally:
        import matplotlib.pyplot as plt

        plt.close(drawing.figure)


def _drawn_texts(fig: Any) -> list[Any]:
    """The figure's visible, non-empty texts that are drawn: a tick label only if its tick
    lies inside the axis' view interval (matplotlib keeps the others, visible but undrawn)."""
    from matplotlib.text import Text

    ticks: set[int] = set()
    shown: list[Any] = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            tol = 1e-9 * max(abs(lo), abs(hi), 1.0)
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                labels = (tick.label1, tick.label2)
                ticks.update(id(t) for t in labels)
                if lo - tol <= tick.get_loc() <= hi + tol and tick.get_visible():
                    shown += [t for t in labels if t.get_visible() and t.get_text().strip()]
    others = [t for t in fig.findobj(Text) if id(t) not in ticks and t.get_visible()
              and t.get_text().strip()]
    return others + shown


def test_report_text_never_overlaps() -> None:
    """The caption lines under the panels ("1 run has no gradguard/ tags...", the diagnosis
    line) do not overlap: every text in the figure, both captions present, in one and in
    several panels: no two window extents intersect."""
    import itertools

    import matplotlib.pyplot as plt

    steps = list(range(30))
    diag = ("**diagnosis at the first backoff** (step 9)\n\n1. `lr_too_high`: 40 %.\n"
            "2. `init_too_large`: 3x.")

    def run(name: str) -> RunData:
        return RunData(name, {
            "gradguard/grad_norm": (steps, [1.0 + s for s in steps]),
            "gradguard/clip_threshold": (steps, [5.0] * 30),
            "gradguard/lr_scale": (steps, [1.0] * 9 + [0.5] * 21),
            "gradguard/lr_backoffs": (steps, [0.0] * 9 + [1.0] * 21),
            "gradguard/skipped_steps": (steps, [0.0] * 4 + [1.0] * 26),
            "gradguard/nonfinite_steps": (steps, [0.0] * 4 + [1.0] * 26),
            "train_loss": (steps, [1.0 / (1 + s) for s in steps]),
        }, texts=[(9, diag)])

    notes = ["1 run has no gradguard/ or gradmonitor/ tags (not drawn): plain",
             "2 older event files of earlier runs in the same folder not read (only the "
             "newest run per folder is drawn): a/events.out.tfevents.1, a/events.out.tfevents.2"]
    for runs, extra in (([run("demo")], notes[:1]), ([run(f"r{i}") for i in range(3)], notes)):
        drawing = draw_report(runs, extra)
        fig = drawing.figure
        try:
            assert len(drawing.notes) == len(extra) + len(runs)  # the captions + diagnoses
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            texts = _drawn_texts(fig)
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
            captions = [b for text, b in boxes if " ".join(text.split()) in drawing.notes]
            assert len(captions) == len(drawing.notes)
            assert [" ".join(t.get_text().split()) for t in drawing.captions] == drawing.notes
            for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
                overlap_w = min(a.x1, b.x1) - max(a.x0, b.x0)
                overlap_h = min(a.y1, b.y1) - max(a.y0, b.y0)
                assert overlap_w <= 0 or overlap_h <= 0, f"{ta!r} overlaps {tb!r}"
            # the captions are inside the figure, under every axes
            fig_box = fig.bbox
            lowest_axes = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)
            for box in captions:
                assert box.y0 >= fig_box.y0 - 1e-6
                assert box.y1 <= lowest_axes
        finally:
            plt.close(fig)
