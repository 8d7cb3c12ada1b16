"""``gradguard report LOGDIR``: one picture of what happened, from TensorBoard event files.

Every folder under ``LOGDIR`` that holds event files is one run (Lightning writes each run
into its own ``version_N`` folder; ``gradguard demo`` does the same). Event files of
different runs are never merged: when one folder holds several event files (a run repeated
into a fixed ``version``), the newest file is read, together with older files only while
they continue it (a resumed run: each older file ends before the newer one starts); the
files left out are listed.

Counts come from one place: the last logged value of the guard's cumulative counters
(``gradguard/nonfinite_steps``, ``gradguard/skipped_steps``, ...), in the text, in the legend
and in ``gradguard demo``'s table alike. ``GradientMonitor`` logs in its own namespace
(``gradmonitor/grad_norm``, ``gradmonitor/nonfinite_steps``, ...): in a run with both
callbacks the guard's values are reported (the monitor, listed after the guard, never sees
the gradients of a step the guard skipped); in a run with the monitor only, the monitor's
norm and non-finite count are. The tag names are constants in
:mod:`lightning_gradguard._tags`. Markers are drawn at the logged steps where a
counter rose, and the legend says whether that is every event (every step logged, or an
event logged at its own step, as GradGuard does for skips, spikes and backoffs) or only the
logged steps where the count rose. Runs are drawn in a grid, one panel per run: the
gradient norm on a log axis with the clip threshold and the clipped norm, the markers, the
LR scale, and the training loss when it was logged. A halted run (GradGuard's text entry
``gradguard/events``) is marked as halted. Clips at a spike (norm above the threshold) are
told apart from the other clips (plain SGD's update cap, AGC's per-unit clipping) by the
``gradguard/spikes`` and ``gradguard/clipped_steps`` counters.

Needs ``matplotlib`` (the ``report`` extra: ``pip install "lightning-gradguard[report]"``).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_gradguard import _tags
from lightning_gradguard._paths import writable_dir_problem
from lightning_gradguard.core import CAUSES
from lightning_gradguard.core.messages import cause_ids

#: a numbered cause in GradGuard's diagnosis text: ``1. lr_too_high:`` or ``1. `lr_too_high`:``

__all__ = [
    "COUNTERS",
    "LogScan",
    "MarkerSet",
    "PanelDrawing",
    "ReportDrawing",
    "ReportError",
    "RunData",
    "check_logdir",
    "check_output",
    "counts",
    "draw_report",
    "load_run",
    "load_runs",
    "render_report",
    "scan_logdir",
    "scan_notes",
    "summarize",
]

_PREFIX = _tags.GUARD_PREFIX
_EVENTS_TEXT = _tags.GUARD_EVENTS

_COUNTER_WORDS = {
    "nonfinite_steps": "non-finite steps",
    "skipped_steps": "skipped steps",
    "spikes": "spikes",
    "clipped_steps": "clipped steps",
    "lr_backoffs": "LR backoffs",
    "rollbacks": "rollbacks",
    "amp_overflow_steps": "AMP overflow steps",
}
#: The cumulative counter tags the report reads (GradGuard's), with the words it prints for
#: them. A run without GradGuard's ``nonfinite_steps`` reads GradientMonitor's.
COUNTERS: tuple[tuple[str, str], ...] = tuple(
    (_tags.guard_tag(k), _COUNTER_WORDS[k]) for k in _COUNTER_WORDS)
assert set(_COUNTER_WORDS) == set(_tags.GUARD_COUNTERS)


class ReportError(Exception):
    """A clear, user-facing problem with the report's input."""


@dataclass
class RunData:
    """Scalar series of one run: ``tag -> (steps, values)``, plus GradGuard's text entries.

    Args:
        name: The run's folder, relative to the log directory.
        scalars: ``tag -> (steps, values)`` in step order.
        texts: ``(step, text)`` of the ``gradguard/events`` entries (diagnosis, halt, ...).

    Example:
        >>> r = RunData("demo", {"gradguard/skipped_steps": ([0, 3, 9], [0.0, 1.0, 3.0])})
        >>> r.count("gradguard/skipped_steps"), r.rises("gradguard/skipped_steps")
        (3, [(3, 1), (9, 2)])
    """

    name: str
    scalars: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    texts: list[tuple[int, str]] = field(default_factory=list)

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``tag`` (empty when absent)."""
        return self.scalars.get(tag, ([], []))

    def counter_tag(self, tag: str) -> str:
        """The tag to read for GradGuard's tag ``tag``, falling back to GradientMonitor's.

        GradGuard's tag when logged, else GradientMonitor's with the same suffix when logged,
        else ``tag``.

        Example:
            >>> r = RunData("m", {"gradmonitor/nonfinite_steps": ([0], [0.0])})
            >>> r.counter_tag("gradguard/nonfinite_steps")
            'gradmonitor/nonfinite_steps'
        """
        if tag in self.scalars or not tag.startswith(_tags.GUARD_PREFIX):
            return tag
        mine = _tags.monitor_tag(tag.removeprefix(_tags.GUARD_PREFIX))
        return mine if mine in self.scalars else tag

    @property
    def grad_norm_tag(self) -> str:
        """The total gradient norm's tag: GradGuard's if logged, else GradientMonitor's."""
        return self.counter_tag(_tags.GUARD_GRAD_NORM)

    def count(self, counter: str) -> int | None:
        """A cumulative counter's last logged value (``None`` when the tag is absent).

        ``counter`` names GradGuard's tag; without it, GradientMonitor's is read (see
        :meth:`counter_tag`).
        """
        _, values = self.series(self.counter_tag(counter))
        return int(values[-1]) if values else None

    def rises(self, counter: str) -> list[tuple[int, int]]:
        """``(step, increase)`` at each logged step where a cumulative counter rose."""
        steps, values = self.series(self.counter_tag(counter))
        out, prev = [], 0
        for s, v in zip(steps, values, strict=True):
            if int(v) > prev:
                out.append((s, int(v) - prev))
            prev = max(prev, int(v))
        return out

    def events(self, counter: str) -> list[int]:
        """Logged steps at which a cumulative counter rose."""
        return [s for s, _ in self.rises(counter)]

    @property
    def last_step(self) -> int | None:
        """The last step any scalar of the run was logged at."""
        return max((s[-1] for s, _ in self.scalars.values() if s), default=None)

    @property
    def guarded(self) -> bool:
        """Logged by ``GradGuard`` (it logs the LR scale; ``GradientMonitor`` does not)."""
        return _tags.GUARD_LR_SCALE in self.scalars

    @property
    def halted_at(self) -> int | None:
        """The last step before GradGuard halted the run, else ``None``.

        Read from the ``**halt**`` text entry (written at the step counter after the
        halted step): the last step the guard logged at or before it.
        """
        at = next((s for s, t in self.texts if t.lstrip().startswith(_tags.HALT_MARKER)), None)
        if at is None:
            return None
        logged = [s for tag, _ in COUNTERS for s in self.series(self.counter_tag(tag))[0]
                  if s <= at]
        return max(logged, default=at)

    @property
    def diagnosis(self) -> tuple[int, list[str]] | None:
        """The step and the ranked cause ids of GradGuard's last diagnosis text, if any.

        Read from the ``gradguard/events`` text entries (pre-flight, first backoff, first
        non-finite step, halt): the numbered causes ``1. lr_too_high: ...``.

        Example:
            >>> r = RunData("x", {}, texts=[(4, "**diagnosis at the first backoff** (step 4)"
            ...                               "\\n\\n1. `lr_too_high`: 40 %. **Remedy:** lower")])
            >>> r.diagnosis
            (4, ['lr_too_high'])
        """
        for step, text in reversed(self.texts):
            ids = [c for c in cause_ids(text) if c in CAUSES]
            if ids:
                return step, ids
        return None


def counts(run: RunData) -> dict[str, int]:
    """The run's counters, one source of truth: each counter tag's last logged value.

    Also ``other_clips``: clips not at a spike (plain SGD's update cap, AGC's per-unit
    clipping), ``clipped_steps - spikes``, when both are logged.

    Example:
        >>> r = RunData("r", {"gradguard/clipped_steps": ([9], [5.0]),
        ...                   "gradguard/spikes": ([9], [2.0])})
        >>> counts(r)
        {'spikes': 2, 'clipped_steps': 5, 'other_clips': 3}
    """
    out = {}
    for tag, _ in COUNTERS:
        value = run.count(tag)
        if value is not None:
            out[tag.removeprefix(_PREFIX)] = value
    if "clipped_steps" in out and "spikes" in out:
        out["other_clips"] = max(0, out["clipped_steps"] - out["spikes"])
    return out


@dataclass
class LogScan:
    """What :func:`scan_logdir` found under a log directory.

    Attributes:
        root: The log directory.
        runs: Runs with ``gradguard/`` or ``gradmonitor/`` tags, sorted by name.
        untagged: Runs (folders) with event files but neither.
        ignored_files: Older event files not read because they belong to an earlier run
            in the same folder.
    """

    root: Path
    runs: list[RunData] = field(default_factory=list)
    untagged: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)


def _file_order(path: Path) -> tuple[int, int, str]:
    # events.out.tfevents.<unix seconds>.<host>.<pid>.<n>; the mtime breaks ties
    parts = path.name.split(".")
    created = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
    return created, path.stat().st_mtime_ns, path.name


def _read_file(path: Path) -> tuple[dict[str, tuple[list[int], list[float]]],
                                    list[tuple[int, str]]]:
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {}
    for tag in tags.get("scalars", []):
        events = acc.Scalars(tag)
        scalars[tag] = ([e.step for e in events], [float(e.value) for e in events])
    texts: list[tuple[int, str]] = []
    for tag in tags.get("tensors", []):
        if tag.startswith(_EVENTS_TEXT):
            from tensorboard.util import tensor_util

            for e in acc.Tensors(tag):
                arr = tensor_util.make_ndarray(e.tensor_proto).reshape(-1)
                texts += [(e.step, v.decode("utf-8", "replace") if isinstance(v, bytes)
                           else str(v)) for v in arr]
    return scalars, texts


def _load_folder(folder: Path, name: str) -> tuple[RunData, list[Path]]:
    """The folder's run: the newest event file and the older files it continues."""
    files = sorted(folder.glob("events.out.tfevents.*"), key=_file_order)
    chain: list[tuple[dict[str, tuple[list[int], list[float]]], list[tuple[int, str]]]] = []
    first: dict[str, int] = {}  # tag -> first step in the files taken so far
    ignored: list[Path] = []
    for i in range(len(files) - 1, -1, -1):
        scalars, texts = _read_file(files[i])
        if not scalars:
            continue  # no scalars (e.g. hyperparameters only): neither a run nor a break
        # an older file continues the newer ones (a resumed run, a validate before fit
        # or a validate after fit at its last step) only if every tag they share ends at or
        # before the step the newer files start it; a rerun starts again below that
        if any(steps and tag in first and max(steps) > first[tag]
               for tag, (steps, _) in scalars.items()):
            ignored = files[: i + 1]  # an earlier run: it and everything older are left out
            break
        chain.insert(0, (scalars, texts))
        for tag, (steps, _) in scalars.items():
            if steps:
                first[tag] = min(steps)
    run = RunData(name)
    for scalars, texts in chain:
        for tag, (steps, values) in scalars.items():
            old_s, old_v = run.scalars.get(tag, ([], []))
            run.scalars[tag] = (old_s + steps, old_v + values)
        run.texts += texts
    return run, ignored


def load_run(folder: str | os.PathLike[str], name: str | None = None) -> RunData:
    """The run in one folder of event files (the newest run, as :func:`scan_logdir` reads it).

    Args:
        folder: A folder holding ``events.out.tfevents.*`` files.
        name: The run's name (default: the folder's name).
    """
    path = Path(folder)
    return _load_folder(path, name if name is not None else path.name)[0]


def check_logdir(logdir: str | os.PathLike[str]) -> Path:
    """``logdir`` as a path, if it is a directory.

    Raises:
        ReportError: ``logdir`` is missing or is a file.
    """
    root = Path(logdir)
    if root.exists() and not root.is_dir():
        raise ReportError(f"not a log directory: {root} is a file")
    if not root.is_dir():
        raise ReportError(f"log directory not found: {root}")
    return root


def scan_logdir(logdir: str | os.PathLike[str]) -> LogScan:
    """Find the runs under ``logdir``: one per folder holding event files.

    Raises:
        ReportError: Missing directory or no event files at all.

    Example:
        >>> import tempfile
        >>> scan_logdir(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_gradguard.report.ReportError: no TensorBoard event files (...) under ...
    """
    root = check_logdir(logdir)
    folders = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    if not folders:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) under {root}")
    scan = LogScan(root)
    for folder in folders:
        name = str(folder.relative_to(root)) if folder != root else root.name
        run, ignored = _load_folder(folder, name)
        scan.ignored_files += [str(p.relative_to(root)) for p in ignored]
        if any(t.startswith(_tags.PREFIXES) for t in run.scalars):
            scan.runs.append(run)
        else:
            scan.untagged.append(name)
    return scan


def scan_notes(scan: LogScan) -> list[str]:
    """What the report leaves out, one line each (runs without tags, older event files).

    Example:
        >>> print(*scan_notes(LogScan(Path("."), untagged=["a", "b"])))
        2 runs have no gradguard/ or gradmonitor/ tags (not drawn): a, b
    """
    notes = []
    if scan.untagged:
        n = len(scan.untagged)
        notes.append(f"{n} run{'s' if n != 1 else ''} {'have' if n != 1 else 'has'} no "
                     f"gradguard/ or gradmonitor/ tags (not drawn): {', '.join(scan.untagged)}")
    if scan.ignored_files:
        n = len(scan.ignored_files)
        notes.append(f"{n} older event file{'s' if n != 1 else ''} of earlier runs in the same "
                     f"folder not read (only the newest run per folder is drawn): "
                     f"{', '.join(scan.ignored_files)}")
    return notes


def load_runs(logdir: str | os.PathLike[str]) -> list[RunData]:
    """Load every run with ``gradguard/`` or ``gradmonitor/`` tags under ``logdir``.

    See :func:`scan_logdir`.

    Raises:
        ReportError: Missing directory, no event files, or no run with gradguard tags.
    """
    scan = scan_logdir(logdir)
    if not scan.runs:
        raise ReportError(
            f"found event files under {scan.root} but no run has gradguard tags "
            f"({len(scan.untagged)} run(s) without them; train with GradGuard() or "
            "GradientMonitor() and a TensorBoardLogger)"
        )
    return scan.runs


_SHOWN_IF_NONZERO = ("spikes", "rollbacks", "amp_overflow_steps")


def summarize(run: RunData) -> str:
    """A few lines of text about one run; the counts are :func:`counts`.

    Example:
        >>> r = RunData("demo", {"gradguard/skipped_steps": ([3, 9], [1.0, 2.0])})
        >>> print(summarize(r))
        demo: not guarded (GradientMonitor), counters as of step 9
          skipped steps: 2 (first at step 3)
    """
    c = counts(run)
    kind = "GradGuard" if run.guarded else "not guarded (GradientMonitor)"
    counter_steps = [s[-1] for tag, _ in COUNTERS if (s := run.series(run.counter_tag(tag))[0])]
    head = f"{run.name}: {kind}"
    if counter_steps:
        head += f", counters as of step {max(counter_steps)}"
    lines = [head]
    halted = run.halted_at
    if halted is not None:
        lines.append(f"  HALTED after step {halted}")
    for tag, label in COUNTERS:
        key = tag.removeprefix(_PREFIX)
        if key not in c or (key in _SHOWN_IF_NONZERO and c[key] == 0):
            continue
        ev = run.events(tag)
        first = f" (first at step {ev[0]})" if ev else ""
        extra = ""
        if key == "clipped_steps" and "other_clips" in c:
            extra = (f"; {c['spikes']} at a spike, {c['other_clips']} by the update cap "
                     "or per-unit clipping")
        lines.append(f"  {label}: {c[key]}{first}{extra}")
    steps, norms = run.series(run.grad_norm_tag)
    finite = [v for v in norms if math.isfinite(v)]
    if finite:
        lines.append(f"  grad norm: min {min(finite):.3g}, max {max(finite):.3g}, "
                     f"last {norms[-1]:.3g} at step {steps[-1]}")
    _, lr = run.series(_tags.GUARD_LR_SCALE)
    if lr:
        lines.append(f"  LR scale: min {min(lr):.3g}, last {lr[-1]:.3g}")
    if run.diagnosis is not None:
        step, ids = run.diagnosis
        lines.append(f"  diagnosis (step {step}, most likely first): {', '.join(ids)}")
    return "\n".join(lines)


def _loss_tag(run: RunData) -> str | None:
    for tag in ("train_loss", "train_loss_step", "loss", "train/loss"):
        if tag in run.scalars:
            return tag
    return None


# ---------------------------------------------------------------------------- drawing
@dataclass
class MarkerSet:
    """One kind of marker drawn on a panel.

    Attributes:
        label: The legend entry (with the count and what the marks are).
        steps: Where the marks are.
        count: The counter value the label names (``None``: no count in the label).
        every_event: ``True`` when there is one mark per counted event.
    """

    label: str
    steps: list[int]
    count: int | None
    every_event: bool


@dataclass
class PanelDrawing:
    """What was drawn for one run (lines, markers, halt), for tests and for the reader.

    Attributes:
        name: The run's name (the panel's title starts with it).
        title: The panel's title.
        curves: ``label -> (steps, values)`` of each line drawn on the gradient-norm axis.
        markers: ``key -> MarkerSet`` (keys: ``skipped``, ``nonfinite``, ``spikes``,
            ``other_clips``, ``lr_backoffs``, ``rollbacks``, ``halt``, ``loss_nonfinite``).
        lr_scale: The LR-scale line (empty when not logged).
        loss: The finite training-loss points drawn (empty when not logged).
        counts: :func:`counts` of the run.
        halted_at: The step the run halted at, else ``None``.
        axes: The panel's matplotlib axes: norm, LR scale, loss.
    """

    name: str
    title: str
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    markers: dict[str, MarkerSet] = field(default_factory=dict)
    lr_scale: tuple[list[int], list[float]] = ([], [])
    loss: tuple[list[int], list[float]] = ([], [])
    counts: dict[str, int] = field(default_factory=dict)
    halted_at: int | None = None
    axes: tuple[Any, ...] = ()


@dataclass
class ReportDrawing:
    """The report's figure and a record of every panel drawn on it.

    Attributes:
        figure: The matplotlib figure.
        panels: One record per run.
        notes: The caption lines under the panels (what the report leaves out, then each
            run's diagnosis).
        captions: The caption text artists, one per note (wrapped to the figure's width).
    """

    figure: Any
    panels: list[PanelDrawing]
    notes: list[str]
    captions: list[Any] = field(default_factory=list)


def _mark_label(label: str, count: int, marks: list[tuple[int, int]]) -> tuple[str, bool]:
    every = sum(n for _, n in marks) == count and all(n == 1 for _, n in marks)
    if every:
        return f"{label}: {count} (each marked)", True
    return (f"{label}: {count} (marked: the {len(marks)} logged steps where the count "
            "rose)"), False


def _marker_sets(run: RunData) -> dict[str, MarkerSet]:
    """The markers of one run, each with its count from :func:`counts`."""
    c = counts(run)
    out: dict[str, MarkerSet] = {}

    def add(key: str, label: str, count: int, marks: list[tuple[int, int]]) -> None:
        if count <= 0 and not marks:
            return
        text, every = _mark_label(label, count, marks)
        out[key] = MarkerSet(text, [s for s, _ in marks], count, every)

    def diff(a: str, b: str) -> list[tuple[int, int]]:
        """Rises of counter ``a`` not matched by a rise of ``b`` at the same logged step."""
        rb = dict(run.rises(b))
        return [(s, n - rb.get(s, 0)) for s, n in run.rises(a) if n > rb.get(s, 0)]

    skipped = c.get("skipped_steps")
    if skipped is not None:
        add("skipped", "skipped (NaN/Inf)", skipped, run.rises(_tags.guard_tag("skipped_steps")))
    nonfinite = c.get("nonfinite_steps")
    if nonfinite is not None:
        if skipped is None:
            add("nonfinite", "non-finite gradients", nonfinite,
                run.rises(_tags.guard_tag("nonfinite_steps")))
        else:
            add("nonfinite", "non-finite, not skipped", max(0, nonfinite - skipped),
                diff(_tags.guard_tag("nonfinite_steps"), _tags.guard_tag("skipped_steps")))
    if "spikes" in c:
        add("spikes", "spike, clipped to the threshold", c["spikes"],
            run.rises(_tags.guard_tag("spikes")))
    if "other_clips" in c:
        add("other_clips", "clipped by the update cap / per unit", c["other_clips"],
            diff(_tags.guard_tag("clipped_steps"), _tags.guard_tag("spikes")))
    if "lr_backoffs" in c:
        add("lr_backoffs", "LR backoff", c["lr_backoffs"],
            run.rises(_tags.guard_tag("lr_backoffs")))
    if "rollbacks" in c:
        add("rollbacks", "rollback", c["rollbacks"], run.rises(_tags.guard_tag("rollbacks")))
    halted = run.halted_at
    if halted is not None:
        out["halt"] = MarkerSet(f"halted after step {halted}", [halted], None, True)
    return out


_MARKER_STYLE: dict[str, tuple[str, str, float]] = {  # marker, color, height (axes fraction)
    "skipped": ("x", "tab:red", 0.965),
    "nonfinite": ("x", "darkred", 0.965),
    "spikes": ("v", "tab:orange", 0.925),
    "other_clips": ("1", "tab:brown", 0.885),
    "lr_backoffs": ("s", "tab:purple", 0.845),
    "rollbacks": ("D", "black", 0.805),
    "halt": ("X", "red", 0.0),
}
#: The gradient-norm curves and the legend stay below this fraction of the axis height; the
#: band above it holds the markers.
_DATA_TOP = 0.76
#: Caption layout, in inches: a line of 8-point text (with its line spacing), the gap between
#: two notes, the margin around the band, the room of the lowest step axis' tick labels and
#: label, and of the title above the panels; and the characters that fit in an inch.
_CAPTION_FONTSIZE = 8
_CAPTION_LINE_IN = 1.2 * _CAPTION_FONTSIZE / 72 * 1.25
_CAPTION_GAP_IN = 0.04
_CAPTION_PAD_IN = 0.16
_AXIS_LABELS_IN = 0.65
_TITLE_IN = 0.8
_CAPTION_CHARS_PER_INCH = 15


def _grid(n: int, ncols: int | None) -> tuple[int, int]:
    cols = ncols if ncols is not None else (1 if n == 1 else 2 if n <= 4 else 3)
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def _finite_positive(steps: Iterable[int], values: Iterable[float]) -> tuple[list[int],
                                                                             list[float]]:
    pts = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v) and v > 0]
    return [s for s, _ in pts], [v for _, v in pts]


def _draw_panel(run: RunData, ax_norm: Any, ax_lr: Any, ax_loss: Any) -> PanelDrawing:
    panel = PanelDrawing(run.name, run.name, counts=counts(run), halted_at=run.halted_at,
                         axes=(ax_norm, ax_lr, ax_loss))
    max_tag = _tags.MONITOR_GRAD_NORM_MAX
    for tag, style, label in (
        (run.grad_norm_tag, {"color": "tab:blue", "lw": 1.2}, "grad norm (before clipping)"),
        (_tags.GUARD_CLIP_THRESHOLD, {"color": "tab:orange", "ls": "--"}, "clip threshold"),
        (_tags.GUARD_GRAD_NORM_CLIPPED, {"color": "tab:green", "lw": 0.9},
         "grad norm after clipping"),
        (max_tag, {"color": "tab:purple", "lw": 0.8, "alpha": 0.7},
         "max grad norm per interval"),
    ):
        xs, ys = _finite_positive(*run.series(tag))
        if xs and label not in panel.curves:
            ax_norm.plot(xs, ys, label=label, **style)
            panel.curves[label] = (xs, ys)
    ax_norm.set_yscale("log")
    ys_all = [v for _, ys in panel.curves.values() for v in ys]
    if ys_all:  # leave the top band of the axis to the markers
        lo, hi = math.log10(min(ys_all)), math.log10(max(ys_all))
        lo, hi = lo - 0.05 * max(hi - lo, 1.0), hi + 0.05 * max(hi - lo, 1.0)
        ax_norm.set_ylim(10**lo, 10 ** (lo + (hi - lo) / _DATA_TOP))
    ax_norm.set_ylabel("gradient norm (log)")
    trans = ax_norm.get_xaxis_transform()  # x in steps, y in axes fraction: any y scale
    panel.markers = _marker_sets(run)
    for key, ms in panel.markers.items():
        marker, color, height = _MARKER_STYLE[key]
        if key == "halt":
            ax_norm.axvline(ms.steps[0], color=color, lw=2, ls="-", label=ms.label)
            continue
        ax_norm.scatter(ms.steps, [height] * len(ms.steps), marker=marker, color=color,
                        s=30, transform=trans, clip_on=False, zorder=3, label=ms.label)
    # markers use an axes-fraction y, so they do not widen the x range: set it from the run
    all_steps = [x for xs, _ in run.scalars.values() for x in xs]
    if all_steps:
        lo, hi = min(all_steps), max(all_steps)
        pad = max(1.0, 0.02 * (hi - lo))
        ax_norm.set_xlim(lo - pad, hi + pad)
    ax_norm.legend(fontsize=7, loc="best", bbox_to_anchor=(0.0, 0.0, 1.0, _DATA_TOP),
                   framealpha=0.8)
    ax_norm.grid(alpha=0.3, which="both")
    kind = "GradGuard" if run.guarded else "not guarded (GradientMonitor)"
    panel.title = f"{run.name} — {kind}"
    if panel.halted_at is not None:
        panel.title += f" — HALTED after step {panel.halted_at}"
    ax_norm.set_title(panel.title, fontsize=10,
                      color="red" if panel.halted_at is not None else "black")

    s, lr = run.series(_tags.GUARD_LR_SCALE)
    if lr:
        ax_lr.step(s, lr, where="post", color="tab:purple")
        panel.lr_scale = (list(s), list(lr))
        if min(lr) < 0.1 and min(lr) > 0:
            ax_lr.set_yscale("log")
        else:
            ax_lr.set_ylim(0, 1.05)
    else:
        ax_lr.text(0.5, 0.5, "no LR scale (not guarded)", ha="center", va="center",
                   transform=ax_lr.transAxes, color="gray")
    ax_lr.set_ylabel("LR scale")
    ax_lr.grid(alpha=0.3)

    loss_tag = _loss_tag(run)
    if loss_tag:
        s, v = run.series(loss_tag)
        xs = [a for a, b in zip(s, v, strict=True) if math.isfinite(b)]
        ys = [b for b in v if math.isfinite(b)]
        if xs:
            ax_loss.plot(xs, ys, color="tab:gray")
            panel.loss = (xs, ys)
        bad = [a for a, b in zip(s, v, strict=True) if not math.isfinite(b)]
        if bad:  # no value to plot: marked along the top of the panel, on any y scale
            label = "loss NaN/Inf (at logged steps)"
            ax_loss.scatter(bad, [0.92] * len(bad), marker="x", color="tab:red",
                            transform=ax_loss.get_xaxis_transform(), clip_on=False,
                            label=label)
            panel.markers["loss_nonfinite"] = MarkerSet(label, bad, None, False)
            ax_loss.legend(fontsize=7)
        if ys and all(b > 0 for b in ys):
            ax_loss.set_yscale("log")
    else:
        ax_loss.text(0.5, 0.5, "training loss not logged", ha="center", va="center",
                     transform=ax_loss.transAxes, color="gray")
    ax_loss.set_ylabel(loss_tag or "loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.grid(alpha=0.3)
    return panel


def draw_report(runs: Sequence[RunData], notes: Sequence[str] = (),
                ncols: int | None = None) -> ReportDrawing:
    """Draw the runs in a grid (one panel of three stacked axes per run).

    Args:
        runs: The runs to draw (at least one).
        notes: Lines written under the panels (e.g. :func:`scan_notes`).
        ncols: Panels per row (default: 1 for one run, 2 up to four runs, else 3).

    Returns:
        The figure and, per panel, what was drawn on it.

    Raises:
        ReportError: If matplotlib is not installed (names the extra to install).
        ValueError: If ``runs`` is empty.

    Example:
        >>> r = RunData("r", {"gradguard/grad_norm": ([0, 1, 2], [1.0, 2.0, 1.5]),
        ...                   "gradguard/skipped_steps": ([0, 1, 2], [0.0, 1.0, 1.0])})
        >>> d = draw_report([r])
        >>> d.panels[0].curves["grad norm (before clipping)"]
        ([0, 1, 2], [1.0, 2.0, 1.5])
        >>> d.panels[0].markers["skipped"].label, d.panels[0].markers["skipped"].steps
        ('skipped (NaN/Inf): 1 (each marked)', [1])
        >>> import matplotlib.pyplot as plt; plt.close(d.figure)
    """
    if not runs:
        raise ValueError("`runs` must hold at least one run, got an empty sequence")
    plt = _pyplot()
    nrows, cols = _grid(len(runs), ncols)
    notes = [*notes, *(f"{run.name}: diagnosis at step {d[0]}, most likely first: "
                       f"{', '.join(d[1])}" for run in runs if (d := run.diagnosis) is not None)]
    # the captions: each note wrapped to the figure's width, stacked from the bottom up in
    # a band of their own below the lowest step axis (positions in inches, so lines never
    # overlap whatever the figure's height)
    width_in = 7.0 * cols
    wrapped = [textwrap.fill(n, width=max(40, int(width_in * _CAPTION_CHARS_PER_INCH)),
                             break_long_words=False, break_on_hyphens=False) for n in notes]
    n_lines = sum(w.count("\n") + 1 for w in wrapped)
    band_in = (n_lines * _CAPTION_LINE_IN + len(wrapped) * _CAPTION_GAP_IN + _CAPTION_PAD_IN
               if wrapped else 0.0)
    height_in = 7.0 * nrows + band_in
    fig = plt.figure(figsize=(width_in, height_in))
    # four grid rows per panel row: norm, LR scale, loss, and a spacer that keeps the next
    # panel's title clear of this one's step axis
    bottom = (_AXIS_LABELS_IN + band_in) / height_in
    gs = fig.add_gridspec(4 * nrows - 1, cols, height_ratios=([3.0, 1.1, 1.4, 0.5] * nrows)[:-1],
                          hspace=0.35, wspace=0.22, bottom=bottom,
                          top=1.0 - _TITLE_IN / height_in)
    panels = []
    for i, run in enumerate(runs):
        r, col = divmod(i, cols)
        ax_norm = fig.add_subplot(gs[4 * r, col])
        ax_lr = fig.add_subplot(gs[4 * r + 1, col], sharex=ax_norm)
        ax_loss = fig.add_subplot(gs[4 * r + 2, col], sharex=ax_norm)
        panels.append(_draw_panel(run, ax_norm, ax_lr, ax_loss))
    fig.suptitle("gradguard report: gradient norm, interventions, LR scale, loss", fontsize=13)
    captions = []
    y_in = _CAPTION_PAD_IN / 2
    for text in reversed(wrapped):  # the first note on top
        captions.append(fig.text(0.1, y_in, text, fontsize=_CAPTION_FONTSIZE, color="dimgray",
                                 va="bottom", ha="left", linespacing=1.2,
                                 transform=fig.dpi_scale_trans))
        y_in += (text.count("\n") + 1) * _CAPTION_LINE_IN + _CAPTION_GAP_IN
    captions.reverse()
    return ReportDrawing(fig, panels, list(notes), captions)


def check_output(output: str | os.PathLike[str]) -> Path:
    """Check, before anything is drawn, that the report can be written at ``output``.

    Returns:
        The path the report will be written to: ``output``, with ``.png`` added when it
        has no suffix (as matplotlib does).

    Raises:
        ReportError: ``output`` is a directory, is a file this process may not write, lies
            under a file or a directory it may not write in, or names an image format
            matplotlib cannot write (matplotlib missing: names the extra to install).

    Example:
        >>> check_output("report.xyz")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_gradguard.report.ReportError: cannot write the report to report.xyz: \
matplotlib cannot write '.xyz' images (use one of: ...png...)
    """
    out = Path(output)
    if not out.suffix and not out.is_dir():
        out = out.with_name(out.name + ".png")
    where = f"cannot write the report to {out}"
    if out.is_dir():
        raise ReportError(f"{where}: it is a directory (give a file name, e.g. "
                          f"{out / 'gradguard_report.png'})")
    if out.exists() and not os.access(out, os.W_OK):
        raise ReportError(f"{where}: no permission to write it")
    problem = writable_dir_problem(out.parent)
    if problem is not None:
        raise ReportError(f"{where}: {problem}")
    suffix = out.suffix.lower().lstrip(".")
    if suffix:
        _pyplot()
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if suffix not in formats:
            raise ReportError(f"{where}: matplotlib cannot write '.{suffix}' images (use one "
                              f"of: {', '.join('.' + f for f in sorted(formats))})")
    return out


def render_report(runs: Sequence[RunData], output: str | os.PathLike[str],
                  notes: Sequence[str] = ()) -> Path:
    """Draw the runs (see :func:`draw_report`) into a PNG at ``output``; returns its path.

    Raises:
        ReportError: If matplotlib is not installed (names the extra to install), or the
            report cannot be written at ``output`` (see :func:`check_output`).
    """
    plt = _pyplot()
    out = check_output(output)
    drawing = draw_report(runs, notes)
    out.parent.mkdir(parents=True, exist_ok=True)
    drawing.figure.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(drawing.figure)
    return out


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ReportError(
            'gradguard report needs matplotlib: pip install "lightning-gradguard[report]"'
        ) from err
    return plt
