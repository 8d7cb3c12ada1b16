"""Stage 1 of a guarded step: **measure** (one fused read of the gradients, one host transfer).

:class:`HostValues` gathers device scalars by name and reads them all back in a single
:func:`~lightning_gradguard.core._host.to_host` call; :class:`Meter` builds the step's
:class:`Measurement` (named host floats, frozen) and keeps the gradients in hand
(:class:`Gradients`) for the apply stage. Nothing here decides anything, and nothing here
writes the gradients: a unit-wise policy (AGC) gives its units' factors, the clipped total is
computed from them and read with the rest, and the apply stage multiplies the gradients by them.

Whatever else a component needs from the step (the weights' norm for the update control or a
rollback snapshot, the per-tensor norms for a diagnosis) it asks for by name: a
:data:`Request` in ``Meter.measure(requests=...)``, answered in ``Gradients.host`` by the same
host transfer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_gradguard.core._host import to_host
from lightning_gradguard.core.norms import (
    NormReducer,
    _localize,
    _total,
    grad_norms,
    group_by_device_and_dtype,
)
from lightning_gradguard.core.policies import ClipPolicy, UnitScale, apply_unit_scales_
from lightning_gradguard.core.update_cap import NO_LIMIT, UpdateLimit

__all__ = ["Gradients", "HostValues", "Measurement", "Meter", "Request"]

_PLAIN = (torch.nn.Parameter, torch.Tensor)
Groups = dict[tuple[torch.device, torch.dtype], list[int]]


class HostValues:
    """Device scalars gathered by name, read to the host in one transfer.

    Example:
        >>> values = HostValues(torch.device("cpu"))
        >>> values.add("norm", torch.tensor(3.0))
        >>> values.add("loss", torch.tensor([0.5]))
        >>> values.read()
        {'norm': 3.0, 'loss': 0.5}
        >>> values.add_vector("per_tensor", torch.tensor([1.0, 2.0]))
        >>> values.read(), values.vectors
        ({'norm': 3.0, 'loss': 0.5}, {'per_tensor': [1.0, 2.0]})
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._names: list[str] = []
        self._values: list[Tensor] = []
        self._vector_names: list[str] = []
        self._vectors: list[Tensor] = []
        #: the vectors queued with :meth:`add_vector`, as host lists after :meth:`read`
        self.vectors: dict[str, list[float]] = {}

    def add_vector(self, name: str, values: Tensor) -> None:
        """Queue a tensor of any shape under ``name``, read flattened in the same transfer."""
        if name in self._vector_names:
            raise ValueError(f"`name` must be new, got {name!r} a second time")
        self._vector_names.append(name)
        self._vectors.append(values.detach().reshape(-1).to(device=self.device,
                                                              dtype=torch.float32))

    def add(self, name: str, value: Tensor) -> None:
        """Queue a one-element tensor under ``name`` (as float32 on this device)."""
        if name in self._names:
            raise ValueError(f"`name` must be new, got {name!r} a second time")
        self._names.append(name)
        if value.requires_grad:
            value = value.detach()
        if value.dim():
            value = value.reshape(())
        if value.dtype != torch.float32 or value.device != self.device:
            value = value.to(device=self.device, dtype=torch.float32)
        self._values.append(value)

    def read(self) -> dict[str, float]:
        """All queued values as host floats: one synchronisation."""
        if not self._vectors:
            host = to_host(torch.stack(self._values))
            return dict(zip(self._names, host, strict=True))
        host = to_host(torch.cat([torch.stack(self._values), *self._vectors]))
        k = len(self._values)
        for name, v in zip(self._vector_names, self._vectors, strict=True):
            self.vectors[name] = host[k:k + v.numel()]
            k += v.numel()
        return dict(zip(self._names, host[:len(self._values)], strict=True))


def _scalar_loss(loss: Tensor) -> Tensor:
    """A one-element summary of ``loss`` (the mean of a non-scalar per-sample loss).

    Example:
        >>> _scalar_loss(torch.tensor([1.0, float("nan")]))
        tensor(nan)
    """
    if loss.numel() == 1:
        return loss
    return loss.detach().float().mean()


class Measurement(NamedTuple):
    """What one step measured: host floats only (the input of the decision).

    Immutable (a named tuple: built every step, it costs a fraction of a frozen dataclass).

    Attributes:
        step: The step number for reports (the caller's, or the guard's 1-based count).
        grad_norm: Total gradient norm before any clipping (NaN/Inf when non-finite).
        threshold: The clip policy's threshold from the history *before* this step.
        clipped_norm: Total norm the gradients will have after the policy's unit-wise
            clipping (``grad_norm`` when the policy is not unit-wise or clips no unit).
        loss: The step's loss (``None`` if not given).
        params_finite: Whether the weights are finite (``None``: not measured this step;
            the guard asks for them on rollback-snapshot steps, request ``"params_norm"``).
        limit: The optimizer's update limit for this step, previewed by the guard from the
            values read (:mod:`~lightning_gradguard.core.update_cap`).
        amp_overflow: The caller's GradScaler skips the step itself if it is non-finite.
        unitwise: The clip policy clips per unit (``clipped_norm`` may be below
            ``grad_norm``).
        empty: No parameter had a gradient: nothing was measured.
    """

    step: int
    grad_norm: float
    threshold: float
    clipped_norm: float
    loss: float | None = None
    params_finite: bool | None = None
    limit: UpdateLimit = NO_LIMIT
    amp_overflow: bool = False
    unitwise: bool = False
    empty: bool = False

    @property
    def finite(self) -> bool:
        """Gradients, and the loss if given, are finite."""
        return math.isfinite(self.grad_norm) and (self.loss is None or math.isfinite(self.loss))


@dataclass(slots=True)
class Gradients:
    """The step's gradients in hand (device side), for the apply stage.

    Attributes:
        grads: The gradients that exist, in parameter order.
        groups: Their ``(device, dtype)`` grouping when known (dense, every parameter has one).
        per_tensor: Per-tensor norms (for a diagnosis), on the device.
        host: The answers to the step's named requests (``requests`` of
            :meth:`Meter.measure`), read with the measurement, as host floats (flattened).
        unit_scales: A unit-wise policy's factors (indexed into the meter's parameters), for
            the apply stage to multiply the gradients by (unit-sized device tensors).
    """

    grads: list[Tensor]
    groups: Groups | None
    per_tensor: Tensor | None
    host: dict[str, list[float]] = field(default_factory=dict)
    unit_scales: list[UnitScale] = field(default_factory=list)


#: A value asked of the step's single host read, by name: a device tensor, or a function of the
#: gradients in hand and their device that gives one (``None``: nothing to read)
Request = Tensor | Callable[[Gradients, torch.device], Tensor | None]


class Meter:
    """Measures the gradients (and the weights when asked) of a fixed list of parameters.

    Args:
        params: The parameters watched.
        norm_type: The norm of detection and clipping.
        reducer: All-reduce hook for sharded tensors.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], norm_type: float,
                 reducer: NormReducer | None = None) -> None:
        self.params = list(params)
        self.norm_type = norm_type
        self.reducer = reducer
        #: the parameters' (device, dtype) grouping, shared by their dense gradients; None for
        #: parameters that are not plain tensors (DTensor, FSDP1's FlatParameter), or after a
        #: sparse gradient was seen
        self.groups: Groups | None = (group_by_device_and_dtype(self.params)
                                      if all(type(p) in _PLAIN for p in self.params) else None)

    def gradients(self) -> tuple[Gradients, Tensor] | None:
        """The gradients and their total norm (device tensor); ``None`` when there are none."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return None
        device = grads[0].device
        # every parameter has a gradient (the usual case): reuse the parameters' grouping
        groups = self.groups if len(grads) == len(self.params) else None
        try:
            norms = grad_norms(grads, self.norm_type, reducer=self.reducer, device=device,
                               groups=groups)
        except NotImplementedError:  # a sparse gradient: the general path from now on
            if groups is None:
                raise
            self.groups = groups = None
            norms = grad_norms(grads, self.norm_type, reducer=self.reducer, device=device)
        return Gradients(grads, groups, norms.per_tensor), norms.total

    def total(self, tensors: Sequence[Tensor], device: torch.device, *,
              norm_type: float | None = None, groups: Groups | None = None) -> Tensor:
        """The reduced total norm of ``tensors`` (e.g. the weights), on ``device``."""
        kwargs = {} if norm_type is None else {"norm_type": norm_type}
        return grad_norms(list(tensors), per_tensor=False, groups=groups, reducer=self.reducer,
                          device=device, **kwargs).total

    def weights_norm(self, grads: Gradients, device: torch.device) -> Tensor:
        """The watched weights' norm in the norm of detection (a request: the update control)."""
        return self.total([p.detach() for p in self.params], device, norm_type=self.norm_type,
                          groups=self.groups)

    def _scaled_norm(self, grad: Tensor, s: UnitScale) -> Tensor:
        """The norm of ``grad`` multiplied by its unit factors, without writing ``grad``.

        The 2-norm comes from the unit norms; another norm (or a sharded gradient) from the
        scaled gradient, a temporary of this one tensor.
        """
        out: Tensor
        if self.norm_type == 2.0 and type(grad) is Tensor:
            out = torch.linalg.vector_norm(s.unit_norms * s.unit_scale)
            return out
        if grad.is_sparse:
            values = grad.coalesce().values()
            scaled = values * s.unit_scale.to(values.dtype)
        else:
            scaled = grad.detach() * s.scale.to(grad.dtype)
            if type(scaled) is not Tensor and hasattr(scaled, "to_local"):
                scaled = scaled.to_local()  # a DTensor: the local shard's norm, as per_tensor
        if scaled.is_complex():
            out = torch.linalg.vector_norm(scaled, self.norm_type)
        else:
            wide = scaled.dtype == torch.float64
            out = torch.linalg.vector_norm(scaled, self.norm_type,
                                           dtype=torch.float64 if wide else torch.float32)
        return out

    def clipped_total(self, grads: Gradients, total: Tensor) -> Tensor:
        """The total norm once ``grads.unit_scales`` are applied (device tensor; no write).

        The per-tensor norms of the fused pass, with those of the tensors that have a clipped
        unit replaced by their scaled norms, reduced as :func:`grad_norms` reduced them (so
        with no unit clipped it is ``total``, to the bit; with a ``reducer``, a collective).
        """
        scales, per = grads.unit_scales, grads.per_tensor
        if not scales or per is None:
            return total
        slot: dict[int, int] = {}
        for i, p in enumerate(self.params):
            if p.grad is not None:
                slot[i] = len(slot)
        index, norms = [], []
        for s in scales:
            grad = self.params[s.param].grad
            assert grad is not None
            j = slot[s.param]
            scaled = self._scaled_norm(grad, s).to(per.device, per.dtype)
            norms.append(torch.where(s.clipped > 0, scaled, per[j]))
            index.append(j)
        per = per.index_copy(0, torch.tensor(index, device=per.device), torch.stack(norms))
        shard_groups = None if grads.groups is not None else _localize(grads.grads)[1]
        return _total(per, self.norm_type, shard_groups, self.reducer)

    def clip_units_(self, grads: Gradients) -> None:
        """Multiply the gradients by the unit-wise policy's factors (the apply stage's clip)."""
        apply_unit_scales_(self.params, grads.unit_scales)

    def _exact_norm(self, grads: Sequence[Tensor], device: torch.device) -> float:
        """The total norm accumulated in float64 (one more host read; only on an inf total).

        A float32 norm overflows to ``inf`` once it exceeds about 3.4e38, although every
        element may be finite; ``clip_grad_norm_`` would overflow the same way. In float64 such
        a norm is finite, so the step is judged (and clipped) as the explosion it is.
        """
        wide = [g.to(torch.complex128 if g.is_complex() else torch.float64) for g in grads]
        return to_host(self.total(wide, device, norm_type=self.norm_type).reshape(1))[0]

    def measure(self, step: int, loss: Tensor | float | None, policy: ClipPolicy,
                requests: Mapping[str, Request] | None = None, *, names: Sequence[str] = (),
                amp_overflow: bool = False) -> tuple[Measurement, Gradients | None]:
        """One step's :class:`Measurement` (one host read) and the gradients in hand.

        Args:
            step: The step number for the report.
            loss: The step's loss.
            policy: The clip policy: its threshold (before this step) is read; a unit-wise
                policy gives its units' factors (kept in ``Gradients.unit_scales`` for the
                apply stage; the gradients are not written) and the clipped total they give
                is part of the read.
            requests: Further values to read in the same transfer, by name (see
                :data:`Request`), answered in ``Gradients.host``.
            names: The parameters' names (for the unit-wise policy).
            amp_overflow: Passed through to the measurement.
        """
        found = self.gradients()
        if found is None:
            return Measurement(step=step, grad_norm=0.0, threshold=float("inf"),
                               clipped_norm=0.0, empty=True), None
        grads, total = found
        values = HostValues(total.device)
        values.add("grad_norm", total)
        if policy.unitwise:
            grads.unit_scales = policy.unit_scales(self.params, names)
            values.add("clipped_norm", self.clipped_total(grads, total))
        if isinstance(loss, Tensor):
            values.add("loss", _scalar_loss(loss))
        for name, request in (requests or {}).items():
            tensor = request if isinstance(request, Tensor) else request(grads, total.device)
            if tensor is not None:
                values.add_vector(name, tensor)
        host = values.read()  # the one host synchronisation of the step
        grads.host = values.vectors
        norm = host["grad_norm"]
        if norm == math.inf and not math.isinf(self.norm_type):
            # inf from finite elements (e.g. 6e19 in fp32): an explosion, not an overflow
            norm = self._exact_norm(grads.grads, total.device)
        loss_v = host.get("loss", None if loss is None or isinstance(loss, Tensor)
                          else float(loss))
        measurement = Measurement(
            step=step, grad_norm=norm, threshold=policy.threshold_value(),
            clipped_norm=host.get("clipped_norm", norm), loss=loss_v,
            amp_overflow=amp_overflow, unitwise=policy.unitwise)
        return measurement, grads
