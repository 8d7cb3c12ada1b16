"""``gradguard report LOGDIR``: one picture of what happened, from TensorBoard event files.

Reads the event files of every run under ``LOGDIR`` with TensorBoard's own reader and draws,
for each run, the gradient norm on a log axis with the clip threshold and the clipped norm,
markers where steps were skipped, spikes clipped, the LR backed off or a snapshot restored,
the LR scale, and the training loss when it was logged. Needs ``matplotlib`` (the ``report``
extra: ``pip install "lightning-gradguard[report]"``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "RunData", "load_runs", "render_report", "summarize"]

_PREFIX = "gradguard/"


class ReportError(Exception):
    """A clear, user-facing problem with the report's input."""


@dataclass
class RunData:
    """Scalar series of one run: ``tag -> (steps, values)``."""

    name: str
    scalars: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``tag`` (empty when absent)."""
        return self.scalars.get(tag, ([], []))

    def events(self, counter: str) -> list[int]:
        """Steps at which a cumulative counter (e.g. ``gradguard/skipped_steps``) increased."""
        steps, values = self.series(counter)
        out, prev = [], 0.0
        for s, v in zip(steps, values, strict=True):
            if v > prev:
                out.append(s)
            prev = max(prev, v)
        return out


def _event_dirs(logdir: Path) -> list[Path]:
    dirs = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})
    return dirs


def load_runs(logdir: str | os.PathLike[str]) -> list[RunData]:
    """Load every run with gradguard tags under ``logdir``.

    Raises:
        ReportError: Missing directory, no event files, or no run with gradguard tags.
    """
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    root = Path(logdir)
    if not root.is_dir():
        raise ReportError(f"log directory not found: {root}")
    dirs = _event_dirs(root)
    if not dirs:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) under {root}")
    runs = []
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={SCALARS: 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        if not any(t.startswith(_PREFIX) for t in tags):
            continue
        run = RunData(name=str(d.relative_to(root)) if d != root else root.name)
        for tag in tags:
            events = acc.Scalars(tag)
            run.scalars[tag] = ([e.step for e in events], [float(e.value) for e in events])
        runs.append(run)
    if not runs:
        raise ReportError(
            f"found event files under {root} but no run has gradguard tags "
            "(train with GradGuard() or GradientMonitor() and a TensorBoardLogger)"
        )
    return runs


def summarize(run: RunData) -> str:
    """A few lines of text about one run.

    Example:
        >>> r = RunData("demo", {"gradguard/skipped_steps": ([3, 9], [1.0, 2.0])})
        >>> print(summarize(r).splitlines()[1])
          skipped steps: 2 (first at step 3)
    """
    lines = [f"{run.name}:"]
    labels = [("gradguard/skipped_steps", "skipped steps"),
              ("gradguard/nonfinite_steps", "non-finite steps"),
              ("gradguard/spikes", "spikes"), ("gradguard/clipped_steps", "clipped steps"),
              ("gradguard/lr_backoffs", "LR backoffs"), ("gradguard/rollbacks", "rollbacks")]
    for tag, label in labels:
        steps, values = run.series(tag)
        if values:
            ev = run.events(tag)
            first = f" (first at step {ev[0]})" if ev else ""
            lines.append(f"  {label}: {int(max(values))}{first}")
    steps, norms = run.series("gradguard/grad_norm")
    finite = [v for v in norms if math.isfinite(v)]
    if finite:
        lines.append(f"  grad norm: min {min(finite):.3g}, max {max(finite):.3g}, "
                     f"last {norms[-1]:.3g} at step {steps[-1]}")
    _, lr = run.series("gradguard/lr_scale")
    if lr:
        lines.append(f"  LR scale: min {min(lr):.3g}, last {lr[-1]:.3g}")
    return "\n".join(lines)


def _loss_tag(run: RunData) -> str | None:
    for tag in ("train_loss", "train_loss_step", "loss", "train/loss"):
        if tag in run.scalars:
            return tag
    return None


def render_report(runs: list[RunData], output: str | os.PathLike[str]) -> Path:
    """Draw the runs side by side into a PNG at ``output``; returns its path.

    Raises:
        ReportError: If matplotlib is not installed (names the extra to install).
    """
    plt = _pyplot()
    fig = _draw(runs)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
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


def _draw(runs: list[RunData]) -> Any:
    """The report's matplotlib figure (three rows of panels, one column per run)."""
    plt = _pyplot()
    ncols = len(runs)
    fig, axes = plt.subplots(3, ncols, figsize=(6.5 * ncols, 9), squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [3, 1.2, 1.5]})
    for col, run in enumerate(runs):
        ax_norm, ax_lr, ax_loss = axes[0][col], axes[1][col], axes[2][col]
        steps, norms = run.series("gradguard/grad_norm")
        fin = [(s, v) for s, v in zip(steps, norms, strict=True) if math.isfinite(v) and v > 0]
        if fin:
            ax_norm.plot(*zip(*fin, strict=True), color="tab:blue", lw=1.2,
                         label="grad norm (before clipping)")
        for tag, style, label in (
            ("gradguard/clip_threshold", dict(color="tab:orange", ls="--"), "clip threshold"),
            ("gradguard/grad_norm_clipped", dict(color="tab:green", lw=0.9),
             "grad norm after clipping"),
            ("gradguard/grad_norm_max", dict(color="tab:purple", lw=0.8, alpha=0.7),
             "max grad norm per interval"),
        ):
            s, v = run.series(tag)
            pts = [(a, b) for a, b in zip(s, v, strict=True) if math.isfinite(b) and b > 0]
            if pts:
                ax_norm.plot(*zip(*pts, strict=True), label=label, **style)
        ax_norm.set_yscale("log")
        ax_norm.set_title(run.name, fontsize=11)
        ax_norm.set_ylabel("gradient norm (log)")
        ymax = max((v for _, v in fin), default=1.0)
        markers: tuple[tuple[str | None, str, str, str], ...] = (
            ("gradguard/skipped_steps", "x", "tab:red", "skipped (NaN/Inf)"),
            ("gradguard/nonfinite_steps", "x", "darkred", "non-finite steps, not skipped")
            if not run.series("gradguard/skipped_steps")[0] else (None, "", "", ""),
            ("gradguard/spikes", "v", "tab:orange", "spike clipped"),
            ("gradguard/lr_backoffs", "s", "tab:purple", "LR backoff"),
            ("gradguard/rollbacks", "D", "black", "rollback"),
        )
        for marker_tag, marker, color, label in markers:
            if marker_tag is None:
                continue
            ev = run.events(marker_tag)
            if ev:
                ax_norm.scatter(ev, [ymax * 1.6] * len(ev), marker=marker, color=color,
                                s=36, label=f"{label} ({len(ev)})", zorder=3)
                for e in ev[:50]:
                    ax_norm.axvline(e, color=color, alpha=0.12, lw=1)
        ax_norm.legend(fontsize=8, loc="lower left")
        ax_norm.grid(alpha=0.3, which="both")
        s, lr = run.series("gradguard/lr_scale")
        if lr:
            ax_lr.step(s, lr, where="post", color="tab:purple")
            ax_lr.set_ylim(0, 1.05)
        else:
            ax_lr.text(0.5, 0.5, "no LR scale (not guarded)", ha="center", va="center",
                       transform=ax_lr.transAxes, color="gray")
        ax_lr.set_ylabel("LR scale")
        ax_lr.grid(alpha=0.3)
        loss_tag = _loss_tag(run)
        if loss_tag:
            s, v = run.series(loss_tag)
            pts = [(a, b) for a, b in zip(s, v, strict=True) if math.isfinite(b)]
            if pts:
                ax_loss.plot(*zip(*pts, strict=True), color="tab:gray")
            bad = [a for a, b in zip(s, v, strict=True) if not math.isfinite(b)]
            if bad:  # no value to plot: marked along the top of the panel, on any y scale
                ax_loss.scatter(bad, [0.92] * len(bad), marker="x", color="tab:red",
                                transform=ax_loss.get_xaxis_transform(), clip_on=False,
                                label=f"non-finite loss ({len(bad)})")
                ax_loss.legend(fontsize=8)
            if pts and all(b > 0 for _, b in pts):
                ax_loss.set_yscale("log")
        else:
            ax_loss.text(0.5, 0.5, "training loss not logged", ha="center", va="center",
                         transform=ax_loss.transAxes, color="gray")
        ax_loss.set_ylabel(loss_tag or "loss")
        ax_loss.set_xlabel("optimizer step")
        ax_loss.grid(alpha=0.3)
    fig.suptitle("gradguard report: gradient norm, interventions, LR scale, loss", fontsize=13)
    fig.tight_layout()
    return fig
