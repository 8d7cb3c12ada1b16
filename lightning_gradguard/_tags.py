"""Scalar and text tag names: one place, written by the callbacks and read by the report.

Two namespaces, so that the two callbacks never write the same tag with different values
when both are in one Trainer:

* ``gradguard/...`` — :class:`~lightning_gradguard.GradGuard` (the contract in the design
  brief: the norm before clipping, the clipped norm, the threshold, the LR scale, the
  cumulative counters, and the ``gradguard/events`` text entries);
* ``gradmonitor/...`` — :class:`~lightning_gradguard.GradientMonitor` (observes only): the
  same suffix for the same quantity (``gradmonitor/grad_norm``,
  ``gradmonitor/nonfinite_steps``), plus its own per-layer norms and depth ratio.

Example:
    >>> GUARD_GRAD_NORM, MONITOR_GRAD_NORM
    ('gradguard/grad_norm', 'gradmonitor/grad_norm')
    >>> monitor_layer_norm("net.3")
    'gradmonitor/layer_norm/net.3'
"""

from __future__ import annotations

from lightning_gradguard.core import messages as _messages

__all__ = [
    "GUARD_CLIPPED_STEPS",
    "GUARD_CLIP_THRESHOLD",
    "GUARD_COUNTERS",
    "GUARD_EVENTS",
    "GUARD_GRAD_NORM",
    "GUARD_GRAD_NORM_CLIPPED",
    "GUARD_LR_SCALE",
    "GUARD_NONFINITE_STEPS",
    "GUARD_PREFIX",
    "GUARD_SKIPPED_STEPS",
    "GUARD_SPIKES",
    "HALT_MARKER",
    "MONITOR_DEPTH_RATIO",
    "MONITOR_GRAD_NORM",
    "MONITOR_GRAD_NORM_MAX",
    "MONITOR_LAYER_NORMS",
    "MONITOR_NONFINITE_STEPS",
    "MONITOR_PREFIX",
    "PREFIXES",
    "guard_tag",
    "monitor_layer_norm",
    "monitor_tag",
]

#: GradGuard's namespace.
GUARD_PREFIX = "gradguard/"
#: GradientMonitor's namespace.
MONITOR_PREFIX = "gradmonitor/"
#: Every namespace of this package (a run with a tag in one of them is a run to report).
PREFIXES = (GUARD_PREFIX, MONITOR_PREFIX)


def guard_tag(name: str) -> str:
    """GradGuard's tag for ``name`` (e.g. ``"spikes"`` -> ``"gradguard/spikes"``)."""
    return GUARD_PREFIX + name


def monitor_tag(name: str) -> str:
    """GradientMonitor's tag for ``name`` (e.g. ``"grad_norm"`` -> ``"gradmonitor/grad_norm"``)."""
    return MONITOR_PREFIX + name


# -- GradGuard -----------------------------------------------------------------------------
GUARD_GRAD_NORM = guard_tag("grad_norm")
GUARD_GRAD_NORM_CLIPPED = guard_tag("grad_norm_clipped")
GUARD_CLIP_THRESHOLD = guard_tag("clip_threshold")
GUARD_LR_SCALE = guard_tag("lr_scale")
GUARD_SKIPPED_STEPS = guard_tag("skipped_steps")
GUARD_SPIKES = guard_tag("spikes")
GUARD_CLIPPED_STEPS = guard_tag("clipped_steps")
GUARD_NONFINITE_STEPS = guard_tag("nonfinite_steps")
#: GradGuard's cumulative counters: the ``summary()`` key, which is also the tag's suffix.
GUARD_COUNTERS = ("skipped_steps", "spikes", "clipped_steps", "nonfinite_steps",
                  "lr_backoffs", "rollbacks", "amp_overflow_steps")
#: GradGuard's text entries (pre-flight, diagnosis, halt).
GUARD_EVENTS = guard_tag("events")
#: How a halt entry in :data:`GUARD_EVENTS` starts (defined with the words, in
#: :mod:`lightning_gradguard.core.messages`).
HALT_MARKER = _messages.HALT_MARKER

# -- GradientMonitor -----------------------------------------------------------------------
MONITOR_GRAD_NORM = monitor_tag("grad_norm")
MONITOR_GRAD_NORM_MAX = monitor_tag("grad_norm_max")
MONITOR_NONFINITE_STEPS = monitor_tag("nonfinite_steps")
MONITOR_DEPTH_RATIO = monitor_tag("depth_ratio")
#: The histogram of per-layer norms (``log_histograms=True``).
MONITOR_LAYER_NORMS = monitor_tag("layer_norms")


def monitor_layer_norm(label: str) -> str:
    """GradientMonitor's per-layer norm tag of the layer ``label``."""
    return monitor_tag(f"layer_norm/{label}")
