"""GradGuard's logging contract, read back from real TensorBoard event files and a real
TensorBoard server (plus CSVLogger, a recording logger and ``logger=False``)."""

from __future__ import annotations

import csv
import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.logger import Logger
from support.modules import TinyRegression
from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.core.guard import Action, StepReport
from lightning_gradguard.testing import Fault, FaultInjector

CONTRACT_TAGS = (
    "gradguard/grad_norm",
    "gradguard/grad_norm_clipped",
    "gradguard/clip_threshold",
    "gradguard/lr_scale",
    "gradguard/skipped_steps",
    "gradguard/spikes",
    "gradguard/clipped_steps",
    "gradguard/nonfinite_steps",
)
COUNTER_TAGS = (
    "skipped_steps", "spikes", "clipped_steps", "nonfinite_steps",
    "lr_backoffs", "rollbacks", "amp_overflow_steps",
)
ALL_TAGS = (*CONTRACT_TAGS, "gradguard/lr_backoffs", "gradguard/rollbacks",
            "gradguard/amp_overflow_steps")

pytestmark = [
    pytest.mark.filterwarnings("ignore:GradGuard. step:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*"),
]

LR = 0.1
STEPS = 12
EVERY = 5
NAN_STEP = 7      # between logging intervals (0, 5, 10)
SPIKE_STEP = 9    # x1e3 on the gradients once the threshold is known
LOGGED = {0, 5, 10}
EXPECTED_STEPS = LOGGED | {NAN_STEP, SPIKE_STEP}


class NormBefore(Callback):
    """Listed before GradGuard: the total grad norm the guard is about to judge."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))


class AfterGuard(Callback):
    """Listed after GradGuard: its report, the grad norm it left and the LR it set."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.reports: dict[int, StepReport] = {}
        self.norms: dict[int, float] = {}
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        self.reports[step] = self.guard.last_reports[0]
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms[step] = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.lrs[step] = float(optimizer.param_groups[0]["lr"])


class RecordingLogger(Logger):
    """Records every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def gradguard_calls(self) -> list[tuple[int | None, dict[str, float]]]:
        return [(s, m) for s, m in self.calls if any(k.startswith("gradguard/") for k in m)]


def _faults() -> FaultInjector:
    return FaultInjector([Fault(step=NAN_STEP, kind="nan"),
                          Fault(step=SPIKE_STEP, kind="scale", factor=1e3)])


def _fit(logger: Any, callbacks: list[Callback], steps: int = STEPS) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, log_every_n_steps=EVERY, logger=logger,
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyRegression(lr=LR, seed=None))
    return trainer


def _expected_counters(reports: dict[int, StepReport], step: int) -> dict[str, float]:
    """Counters derived independently from the per-step reports up to ``step``."""
    upto = [r for s, r in reports.items() if s <= step]
    return {
        "skipped_steps": sum(r.action is Action.SKIP for r in upto),
        "spikes": sum(r.finite and r.spike for r in upto),
        "clipped_steps": sum(r.action is Action.CLIP for r in upto),
        "nonfinite_steps": sum(not r.finite for r in upto),
        "lr_backoffs": sum(r.backoff for r in upto),
        "rollbacks": sum(r.rollback for r in upto),
        "amp_overflow_steps": sum(r.action is Action.AMP_SKIP for r in upto),
    }


# --------------------------------------------------------------------------- the TB run
class TBRun:
    def __init__(self, logdir: Path, log_dir: Path, before: NormBefore, after: AfterGuard,
                 guard: GradGuard) -> None:
        self.logdir, self.log_dir = logdir, log_dir
        self.before, self.after, self.guard = before, after, guard
        self.acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, TENSORS: 0})
        self.acc.Reload()

    def scalars(self, tag: str) -> dict[int, float]:
        return {e.step: e.value for e in self.acc.Scalars(tag)}


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> TBRun:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        logdir = tmp_path_factory.mktemp("tb")
        guard = GradGuard(nonfinite_window=0)  # the NaN step backs off (lr_scale logged)
        before, after = NormBefore(), AfterGuard(guard)
        trainer = _fit(TensorBoardLogger(str(logdir)), [_faults(), before, guard, after])
        assert trainer.logger is not None
        return TBRun(logdir, Path(trainer.logger.log_dir), before, after, guard)
    finally:
        torch.set_num_threads(threads)


def test_the_faults_happened_as_planned(tb_run: TBRun) -> None:
    reports = tb_run.after.reports
    assert sorted(reports) == list(range(STEPS))
    assert reports[NAN_STEP].action is Action.SKIP
    assert reports[SPIKE_STEP].spike
    assert reports[SPIKE_STEP].action is Action.CLIP
    s = tb_run.guard.summary()
    assert (s["skipped_steps"], s["nonfinite_steps"], s["spikes"], s["clipped_steps"]) == (
        1, 1, 1, 1)


def test_event_file_has_every_contract_tag(tb_run: TBRun) -> None:
    tags = set(tb_run.acc.Tags()["scalars"])
    missing = [t for t in ALL_TAGS if t not in tags]
    assert not missing, f"missing tags {missing}; present: {sorted(tags)}"


def test_logged_only_at_interval_and_event_steps(tb_run: TBRun) -> None:
    reports = tb_run.after.reports
    events = {s for s, r in reports.items()
              if r.action in (Action.SKIP, Action.AMP_SKIP) or r.spike or r.backoff
              or r.rollback or r.halt}
    assert {NAN_STEP, SPIKE_STEP} <= events
    expected = LOGGED | events
    for tag in [f"gradguard/{k}" for k in COUNTER_TAGS] + ["gradguard/lr_scale"]:
        assert set(tb_run.scalars(tag)) == expected, tag


def test_skipped_step_between_intervals_is_logged_at_its_step(tb_run: TBRun) -> None:
    skipped = tb_run.scalars("gradguard/skipped_steps")
    nonfinite = tb_run.scalars("gradguard/nonfinite_steps")
    assert skipped[NAN_STEP] == 1.0
    assert nonfinite[NAN_STEP] == 1.0
    assert skipped[5] == 0.0
    assert nonfinite[5] == 0.0
    assert skipped[10] == 1.0
    # the NaN norm itself is dropped (non-finite values are never written)
    assert NAN_STEP not in tb_run.scalars("gradguard/grad_norm")
    assert NAN_STEP not in tb_run.scalars("gradguard/grad_norm_clipped")


def test_plain_skip_between_intervals_is_logged_with_default_settings(tmp_path: Path) -> None:
    """``GradGuard()`` as shipped (``nonfinite_window=50``): an isolated NaN step is a plain
    skip, not a backoff, and still gets its own entry in the event file (the fixture above
    uses ``nonfinite_window=0``, where the same step is also a backoff)."""
    guard = GradGuard()
    after = AfterGuard(guard)
    trainer = _fit(TensorBoardLogger(str(tmp_path)),
                   [FaultInjector([Fault(step=NAN_STEP, kind="nan")]), guard, after])
    report = after.reports[NAN_STEP]
    assert report.action is Action.SKIP
    assert not report.backoff
    assert trainer.logger is not None
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={SCALARS: 0})
    acc.Reload()

    def scalars(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in acc.Scalars(tag)}

    assert set(scalars("gradguard/skipped_steps")) == LOGGED | {NAN_STEP}
    assert scalars("gradguard/skipped_steps") == {0: 0.0, 5: 0.0, NAN_STEP: 1.0, 10: 1.0}
    assert scalars("gradguard/nonfinite_steps")[NAN_STEP] == 1.0
    assert scalars("gradguard/lr_backoffs")[NAN_STEP] == 0.0
    assert scalars("gradguard/lr_scale")[NAN_STEP] == 1.0


def test_counters_match_the_per_step_reports(tb_run: TBRun) -> None:
    for step in EXPECTED_STEPS:
        expected = _expected_counters(tb_run.after.reports, step)
        for k, v in expected.items():
            assert tb_run.scalars(f"gradguard/{k}")[step] == v, (k, step)
    assert tb_run.scalars("gradguard/spikes")[SPIKE_STEP] == 1.0
    assert tb_run.scalars("gradguard/clipped_steps")[SPIKE_STEP] == 1.0
    assert tb_run.scalars("gradguard/spikes")[5] == 0.0


def test_grad_norm_equals_independent_norm(tb_run: TBRun) -> None:
    logged = tb_run.scalars("gradguard/grad_norm")
    assert set(logged) == EXPECTED_STEPS - {NAN_STEP}
    for step, value in logged.items():
        ref = tb_run.before.norms[step]
        assert math.isfinite(ref)
        assert value == pytest.approx(ref, rel=1e-5), step


def test_grad_norm_clipped_equals_norm_left_by_the_guard(tb_run: TBRun) -> None:
    logged = tb_run.scalars("gradguard/grad_norm_clipped")
    assert set(logged) == EXPECTED_STEPS - {NAN_STEP}
    for step, value in logged.items():
        assert value == pytest.approx(tb_run.after.norms[step], rel=1e-5), step
    # the spike was clipped to the threshold the step was judged by
    thr = tb_run.scalars("gradguard/clip_threshold")[SPIKE_STEP]
    assert logged[SPIKE_STEP] == pytest.approx(thr, rel=1e-5)
    assert tb_run.scalars("gradguard/grad_norm")[SPIKE_STEP] > 10 * thr
    for step in LOGGED:
        assert logged[step] == pytest.approx(tb_run.before.norms[step], rel=1e-5)


def test_clip_threshold_values(tb_run: TBRun) -> None:
    logged = tb_run.scalars("gradguard/clip_threshold")
    for step in EXPECTED_STEPS:
        thr = tb_run.after.reports[step].threshold
        if math.isfinite(thr):
            assert logged[step] == pytest.approx(thr, rel=1e-5)
        else:  # unknown during warmup: absent
            assert step not in logged
    assert 0 not in logged  # first step: no statistics yet
    assert {5, NAN_STEP, SPIKE_STEP, 10} <= set(logged)


def test_lr_scale_matches_the_lr_actually_applied(tb_run: TBRun) -> None:
    logged = tb_run.scalars("gradguard/lr_scale")
    assert logged[0] == 1.0
    assert logged[5] == 1.0
    assert logged[NAN_STEP] < 1.0  # a non-finite step backs the LR off
    for step in EXPECTED_STEPS - {NAN_STEP}:  # the skipped step has no update
        assert logged[step] == pytest.approx(tb_run.after.lrs[step] / LR, rel=1e-6), step
        assert logged[step] == pytest.approx(tb_run.after.reports[step].lr_scale, rel=1e-6)


def test_text_events_entry(tb_run: TBRun) -> None:
    tensors = tb_run.acc.Tags()["tensors"]
    # torch's SummaryWriter.add_text stores the text under "<tag>/text_summary"
    text_tags = [t for t in tensors if t.startswith("gradguard/events")]
    assert text_tags == ["gradguard/events/text_summary"]
    meta = tb_run.acc.SummaryMetadata(text_tags[0])
    assert meta.plugin_data.plugin_name == "text"
    events = tb_run.acc.Tensors(text_tags[0])
    texts = {e.step: tensor_util.make_ndarray(e.tensor_proto).reshape(-1)[0].decode()
             for e in events}
    assert NAN_STEP in texts
    text = texts[NAN_STEP]
    assert "first non-finite step" in text
    assert "Non-finite gradients" in text
    # the step's backoff is in the same entry, with its reason (one entry per step)
    assert ("**LR backoff #1** (step 7): a non-finite step, with nonfinite_window=0; LR now "
            "x0.5 of the schedule") in text
    # any other entry is the diagnosis at the first backoff, or a backoff with its reason
    for step, other in texts.items():
        if step != NAN_STEP:
            assert other.startswith(("**diagnosis at the first backoff", "**LR backoff #")), other


def test_text_event_names_the_global_step(tb_run: TBRun) -> None:
    events = tb_run.acc.Tensors("gradguard/events/text_summary")
    text = tensor_util.make_ndarray(events[0].tensor_proto).reshape(-1)[0].decode()
    assert f"step {events[0].step}:" in text


def test_custom_scalars_layout(tb_run: TBRun) -> None:
    tensors = tb_run.acc.Tags()["tensors"]
    assert "custom_scalars__config__" in tensors
    meta = tb_run.acc.SummaryMetadata("custom_scalars__config__")
    assert meta.plugin_data.plugin_name == "custom_scalars"
    proto = tb_run.acc.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    assert [c.title for c in layout.category] == ["gradguard"]
    charts = {ch.title: list(ch.multiline.tag) for ch in layout.category[0].chart}
    assert set(charts) == {"gradient norm", "interventions", "LR scale"}
    in_layout = {t for tags in charts.values() for t in tags}
    assert set(ALL_TAGS) <= in_layout
    # every chart refers to tags that really exist in the run
    assert in_layout <= set(tb_run.acc.Tags()["scalars"])


# --------------------------------------------------------------------------- TB server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tb_server(tb_run: TBRun) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(tb_run.logdir),
           "--host", "127.0.0.1", "--port", str(port), "--load_fast=false",
           "--reload_interval", "1"]
    # tensorboard is a test dependency (imported at the top of this module) and the port was
    # just bound: nothing here may be skipped, a server that fails is a failure
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.communicate()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def test_tensorboard_server_serves_the_tags(
    tb_run: TBRun, tb_server: tuple[str, subprocess.Popen[bytes]]
) -> None:
    base, proc = tb_server
    run = tb_run.log_dir.relative_to(tb_run.logdir).as_posix()
    deadline = time.monotonic() + 120  # generous: 2 shared cores under a parallel test run
    tags: dict[str, Any] = {}
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"tensorboard exited with {proc.returncode}: {out[-2000:]}")
        try:
            tags = _get(base + "/data/plugin/scalars/tags")
            if "gradguard/grad_norm" in tags.get(run, {}):
                break
        except (urllib.error.URLError, ConnectionError, OSError, ValueError) as err:
            last_err = err
        time.sleep(0.5)
    else:
        pytest.fail(f"tensorboard serves no gradguard tags for run {run!r} within 120 s: "
                    f"tags={tags}, last error={last_err!r}")
    assert set(ALL_TAGS) <= set(tags[run])

    def series(tag: str) -> dict[int, float]:
        q = urllib.parse.urlencode({"run": run, "tag": tag})
        return {int(step): value for _, step, value in
                _get(f"{base}/data/plugin/scalars/scalars?{q}")}

    norms = series("gradguard/grad_norm")
    assert set(norms) == EXPECTED_STEPS - {NAN_STEP}
    for step, value in norms.items():
        assert value == pytest.approx(tb_run.before.norms[step], rel=1e-5)
    skipped = series("gradguard/skipped_steps")
    assert skipped[NAN_STEP] == 1.0
    assert skipped[5] == 0.0

    layout = _get(base + "/data/plugin/custom_scalars/layout")
    charts = layout["category"][0]["chart"]
    assert {c["title"] for c in charts} == {"gradient norm", "interventions", "LR scale"}
    text_tags = _get(base + "/data/plugin/text/tags")
    assert "gradguard/events/text_summary" in text_tags[run]


# --------------------------------------------------------------------------- other loggers
def test_csv_and_recording_logger(tmp_path: Path) -> None:
    rec = RecordingLogger()
    csv_logger = CSVLogger(str(tmp_path))
    guard = GradGuard()
    _fit([csv_logger, rec], [_faults(), guard])

    # recording logger: one call with all tags per interval step and per event step
    calls = rec.gradguard_calls()
    steps = [s for s, _ in calls]
    assert steps == sorted(EXPECTED_STEPS)
    by_step = dict(calls)
    for step, metrics in by_step.items():
        assert all(k.startswith("gradguard/") for k in metrics)
        expected = set(ALL_TAGS)
        if step == 0:
            expected.discard("gradguard/clip_threshold")
        if step == NAN_STEP:
            expected -= {"gradguard/grad_norm", "gradguard/grad_norm_clipped"}
        assert set(metrics) == expected, step
        assert all(math.isfinite(v) for v in metrics.values())
    assert by_step[NAN_STEP]["gradguard/skipped_steps"] == 1.0
    assert by_step[SPIKE_STEP]["gradguard/spikes"] == 1.0
    assert by_step[5]["gradguard/skipped_steps"] == 0.0

    # CSV
    path = Path(csv_logger.log_dir) / "metrics.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert set(ALL_TAGS) <= columns
    gg = {int(r["step"]): r for r in rows if r["gradguard/skipped_steps"] != ""}
    assert set(gg) == EXPECTED_STEPS
    assert float(gg[NAN_STEP]["gradguard/skipped_steps"]) == 1.0
    assert gg[NAN_STEP]["gradguard/grad_norm"] == ""
    assert float(gg[10]["gradguard/nonfinite_steps"]) == 1.0
    assert float(gg[5]["gradguard/grad_norm"]) == pytest.approx(
        by_step[5]["gradguard/grad_norm"], rel=1e-6)


def test_no_logger(tmp_path: Path) -> None:
    guard = GradGuard()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=STEPS, log_every_n_steps=EVERY, logger=False,
        callbacks=[_faults(), guard], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(TinyRegression(lr=LR, seed=None))
    assert trainer.global_step == STEPS
    s = guard.summary()
    assert (s["skipped_steps"], s["spikes"]) == (1, 1)
    assert list(tmp_path.iterdir()) == []
