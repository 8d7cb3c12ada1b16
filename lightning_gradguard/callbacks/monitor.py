"""``GradientMonitor``: observe and log gradients, never intervene.

Every optimizer step it measures the gradients in one fused pass and accumulates, on the
gradients' device, the number of non-finite steps and the largest norm of the interval. Only
at the Trainer's logging interval does it read anything back to the host (one transfer), so
there are zero host synchronisations between logging intervals.

Logged scalars (rank 0, every logger), in the monitor's own ``gradmonitor/`` namespace, so that
with ``GradGuard`` in the same Trainer no tag is written twice with different values (the
names are constants in :mod:`lightning_gradguard._tags`):

========================================  ======================================================
tag                                       value
========================================  ======================================================
``gradmonitor/grad_norm``                 total gradient norm at the logging step
``gradmonitor/grad_norm_max``             largest finite total norm since the last log
``gradmonitor/nonfinite_steps``           cumulative steps with NaN/Inf gradients (as the
                                          monitor saw them: after any guard listed before it)
``gradmonitor/layer_norm/<module>``       per-module norm (``layer_depth`` name components)
``gradmonitor/depth_ratio``               norm of the module nearest the input divided by the
                                          one nearest the output (> 1: gradients grow toward
                                          the input, the signature of exploding gradients)
========================================  ======================================================

With ``log_histograms=True`` and a TensorBoard logger, a histogram of the per-module norms
(``gradmonitor/layer_norms``) is written at each logging step too.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from lightning_gradguard import _tags
from lightning_gradguard.callbacks._logging import log_scalars, should_log, tensorboard_writers
from lightning_gradguard.core._friendly import friendly_init
from lightning_gradguard.core._host import to_host
from lightning_gradguard.core._validation import check_bool, check_int, check_number
from lightning_gradguard.core.norms import grad_norms

__all__ = ["GradientMonitor", "GradientMonitorLogic"]


class GradientMonitorLogic:
    """Logs gradient norms, non-finite counts and the depth profile; changes nothing.

    Args:
        norm_type: Norm to measure.
        layer_depth: Name components that define a "layer" for per-module norms (e.g. ``2``
            groups ``net.3.weight`` and ``net.3.bias`` as ``net.3``); ``0`` disables
            per-layer logging.
        max_layers: Upper bound on per-layer tags (never a flood of tags): with more modules,
            consecutive modules are merged into this many groups.
        log_histograms: Also write a histogram of per-layer norms (TensorBoard only).

    Example:
        >>> GradientMonitor(layer_depth=-1)
        Traceback (most recent call last):
        ...
        ValueError: `layer_depth` must be an int >= 0, got -1
        >>> GradientMonitor(norm_typ=1.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: GradientMonitor got unexpected keyword argument(s) 'norm_typ' (did you mean \
'norm_type'?); its arguments are: norm_type, layer_depth, max_layers, log_histograms
    """

    #: names that are no misspelling of an argument (see :func:`friendly_init`)
    _ARGUMENT_HINTS: ClassVar[dict[str, str]] = {
        name: "GradientMonitor logs at the Trainer's logging interval: "
              "Trainer(log_every_n_steps=...)"
        for name in ("log_every", "log_every_n_steps", "every", "interval", "log_interval")}

    @friendly_init
    def __init__(self, norm_type: float = 2.0, layer_depth: int = 2, max_layers: int = 32,
                 log_histograms: bool = False) -> None:
        self.norm_type = check_number("norm_type", norm_type, low=0.0, low_inclusive=False,
                                      allow_inf=True)
        self.layer_depth = check_int("layer_depth", layer_depth, low=0)
        self.max_layers = check_int("max_layers", max_layers, low=1)
        self.log_histograms = check_bool("log_histograms", log_histograms)
        self._nonfinite: torch.Tensor | None = None
        self._max_norm: torch.Tensor | None = None
        self._groups: list[tuple[str, list[int]]] | None = None

    @property
    def state_key(self) -> str:
        """Stable key (no hyperparameters in it)."""
        return "GradientMonitor"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A new fit counts from zero (a resumed one gets its count in ``load_state_dict``)."""
        if stage == "fit":
            self._nonfinite = None
            self._max_norm = None
            self._groups = None

    def state_dict(self) -> dict[str, Any]:
        """The cumulative non-finite count (one host read, at checkpoint time only)."""
        count = 0.0 if self._nonfinite is None else to_host(self._nonfinite.reshape(1))[0]
        return {"nonfinite_steps": int(count)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the cumulative non-finite count."""
        self._nonfinite = torch.tensor(float(state_dict.get("nonfinite_steps", 0)))
        self._max_norm = torch.zeros(())

    def _layer_groups(self, names: list[str]) -> list[tuple[str, list[int]]]:
        groups: OrderedDict[str, list[int]] = OrderedDict()
        for i, n in enumerate(names):
            key = ".".join(n.split(".")[: self.layer_depth]) or n
            groups.setdefault(key, []).append(i)
        items = list(groups.items())
        if len(items) > self.max_layers:
            size = math.ceil(len(items) / self.max_layers)
            merged = []
            for j in range(0, len(items), size):
                chunk = items[j:j + size]
                label = f"{chunk[0][0]}..{chunk[-1][0]}" if len(chunk) > 1 else chunk[0][0]
                merged.append((label, [i for _, idx in chunk for i in idx]))
            items = merged
        return items

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        """Measure; read back to the host only at logging steps."""
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        grads = [p.grad for _, p in named if p.grad is not None]
        norms = grad_norms(grads, self.norm_type)
        total = norms.total
        finite = torch.isfinite(total)
        if self._nonfinite is None or self._max_norm is None:
            self._nonfinite = torch.zeros((), dtype=torch.float32, device=total.device)
            self._max_norm = torch.zeros((), dtype=torch.float32, device=total.device)
        elif self._nonfinite.device != total.device:  # a restored count, or a moved model
            self._nonfinite = self._nonfinite.to(device=total.device, dtype=torch.float32)
            self._max_norm = self._max_norm.to(device=total.device, dtype=torch.float32)
        assert self._max_norm is not None
        self._nonfinite = self._nonfinite + (~finite).float()
        self._max_norm = torch.where(finite, torch.maximum(self._max_norm, total.float()),
                                     self._max_norm)
        step = trainer.global_step
        if not should_log(trainer, step) or not trainer.is_global_zero:
            return
        packed = [total.float().reshape(1), self._max_norm.reshape(1),
                  self._nonfinite.reshape(1)]
        groups: list[tuple[str, list[int]]] = []
        if self.layer_depth > 0 and norms.per_tensor is not None and grads:
            groups = self._layer_groups([n for n, _ in named])
            per = norms.per_tensor.float()
            for _, idx in groups:
                packed.append(torch.linalg.vector_norm(per[idx], self.norm_type).reshape(1))
        host = to_host(torch.cat(packed))
        self._max_norm = torch.zeros_like(self._max_norm)
        metrics = {
            _tags.MONITOR_GRAD_NORM: host[0],
            _tags.MONITOR_GRAD_NORM_MAX: host[1],
            _tags.MONITOR_NONFINITE_STEPS: host[2],
        }
        layer_norms = host[3:]
        for (label, _), v in zip(groups, layer_norms, strict=True):
            metrics[_tags.monitor_layer_norm(label)] = v
        if len(layer_norms) >= 2 and layer_norms[-1] > 0 and math.isfinite(layer_norms[0]):
            metrics[_tags.MONITOR_DEPTH_RATIO] = layer_norms[0] / layer_norms[-1]
        log_scalars(trainer, metrics, step)
        if self.log_histograms and layer_norms:
            values = torch.tensor([v for v in layer_norms if math.isfinite(v)])
            if values.numel():
                for writer in tensorboard_writers(trainer):
                    writer.add_histogram(_tags.MONITOR_LAYER_NORMS, values, step)


class GradientMonitor(GradientMonitorLogic, Callback):  # noqa: D101
    __doc__ = GradientMonitorLogic.__doc__
