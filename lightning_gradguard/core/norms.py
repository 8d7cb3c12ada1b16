r"""Gradient norms in one fused pass.

For gradients :math:`g_1, \dots, g_n` and norm type :math:`p` the total norm is

.. math::

    \|g\|_p = \Big(\sum_i \|g_i\|_p^p\Big)^{1/p}, \qquad
    \|g\|_\infty = \max_i \|g_i\|_\infty .

The per-tensor norms :math:`\|g_i\|_p` come from ``torch._foreach_norm`` over the gradients
grouped by device and dtype (one kernel launch per group, low-precision gradients accumulated
in float32); the total is computed from them, so one read of every gradient gives both. A
gradient containing NaN/Inf makes the total non-finite, which is how non-finite gradients are
detected without a second pass. (A finite gradient whose norm overflows the accumulation dtype
also gives ``inf``: such a step cannot be clipped meaningfully either and is reported as
non-finite.)

Sharded gradients:

* ``DTensor`` gradients (FSDP2 ``fully_shard``, tensor parallel) are handled natively: the
  norms are computed on the local shards and the partial statistic (the local sum of
  :math:`\|g_i\|_p^p`, or the local maximum for :math:`p=\infty`) is all-reduced over the
  process groups of the mesh dimensions each gradient is sharded on (one small all-reduce
  per such process group, whatever the number of gradients). The total is then the norm of
  the full, unsharded gradients, identical on every rank; :func:`grad_norms` must therefore
  be called on every rank of the mesh. ``Partial`` placements are made ``Replicate`` first.
* Plain tensors that are shards (FSDP1's flat shards, ZeRO) pass a ``reducer`` that
  all-reduces the partial statistic: the local sum of :math:`\|g_i\|_p^p` with
  ``op="sum"``, or the local maximum with ``op="max"`` for :math:`p=\infty`. It is applied
  last, to the whole statistic (after the ``DTensor`` reduction, if any).

Per-tensor norms are always those of the local shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._validation import check_number

__all__ = [
    "GradNorms",
    "NormReducer",
    "collect_grads",
    "grad_norms",
    "group_by_device_and_dtype",
]


@friendly_kwargs
class NormReducer(Protocol):
    """Reduces a partial norm statistic across processes that hold gradient shards.

    Called with a 0-dim tensor and ``"sum"`` (sum of :math:`\\|g_i\\|_p^p`) or ``"max"``
    (for :math:`p=\\infty`); returns the reduced tensor (same shape, same device).
    """

    def __call__(self, partial: Tensor, op: Literal["sum", "max"]) -> Tensor:
        """Return ``partial`` reduced over all shards with ``op``."""
        ...


@dataclass(frozen=True)
class GradNorms:
    """Result of :func:`grad_norms`.

    Attributes:
        total: 0-dim tensor, the total norm (non-finite if any gradient is non-finite).
        per_tensor: 1-D tensor of per-gradient norms in input order (``None`` when not asked
            for). Under a ``reducer`` these are norms of the local shards.
        norm_type: The :math:`p` of the norm.
    """

    total: Tensor
    per_tensor: Tensor | None
    norm_type: float

    @property
    def finite(self) -> Tensor:
        """0-dim bool tensor: whether the total norm is finite."""
        return torch.isfinite(self.total)


def collect_grads(params: Iterable[Tensor]) -> list[Tensor]:
    """Return the ``.grad`` of every parameter that has one (frozen/unused ones are skipped).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2)); w.grad = torch.ones(2)
        >>> frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        >>> len(collect_grads([w, frozen]))
        1
    """
    return [p.grad for p in params if p.grad is not None]


def group_by_device_and_dtype(
    tensors: Sequence[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by ``(device, dtype)``, in first-seen order.

    Example:
        >>> group_by_device_and_dtype([torch.ones(1), torch.ones(1).half(), torch.ones(2)])
        {(device(type='cpu'), torch.float32): [0, 2], (device(type='cpu'), torch.float16): [1]}
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def _foreach_norms(tensors: list[Tensor], p: float, dtype: torch.dtype) -> list[Tensor]:
    """Per-tensor norms accumulated in :func:`_acc_dtype` (complex: of the moduli ``|z|``)."""
    if dtype.is_complex:  # as clip_grad_norm_: the norm of |z|, a real number
        return list(torch._foreach_norm(tensors, p))
    return list(torch._foreach_norm(tensors, p, dtype=_acc_dtype(dtype)))


def _result_device(devices: Iterable[torch.device]) -> torch.device:
    """Where the per-tensor norms are gathered: the first accelerator device, else the CPU.

    Mixed CPU/accelerator gradients (a CPU-offloaded embedding table) are reduced on the
    accelerator: the CPU partial norms are copied there (a host-to-device copy is ordered on
    the accelerator's stream), never the other way, where an asynchronous device-to-host copy
    would be read before it completes.

    Example:
        >>> _result_device([torch.device("cpu"), torch.device("meta")])
        device(type='meta')
        >>> _result_device([torch.device("cpu")])
        device(type='cpu')
    """
    first: torch.device | None = None
    for d in devices:
        if d.type != "cpu":
            return d
        first = first or d
    return first if first is not None else torch.device("cpu")


def _dense(t: Tensor) -> Tensor:
    if t.is_sparse:
        return t.coalesce().values()
    if t.layout != torch.strided:
        raise TypeError(
            f"gradients with layout {t.layout} are not supported; "
            "supported: dense (torch.strided) and sparse COO gradients"
        )
    return t


def _dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or ``None`` where torch lacks it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def _localize(grads: Sequence[Tensor]) -> tuple[list[Tensor], list[tuple[Any, ...]] | None]:
    """Split ``grads`` into local tensors and the process groups of their shards.

    Returns the local tensors and, when some are ``DTensor`` s, the process groups to reduce
    each one's partial statistic over (``()`` for plain and replicated tensors).
    """
    if all(type(g) is Tensor for g in grads):  # the common case: no import, no isinstance
        return list(grads), None
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(g, dtensor) for g in grads):
        return list(grads), None
    from torch.distributed.tensor import Replicate

    local: list[Tensor] = []
    groups: list[tuple[Any, ...]] = []
    for grad in grads:
        if not isinstance(grad, dtensor):
            local.append(grad)
            groups.append(())
            continue
        g: Any = grad
        placements = tuple(g.placements)
        if any(pl.is_partial() for pl in placements):
            # pending reduction: the local values are summands, not a shard
            placements = tuple(Replicate() if pl.is_partial() else pl for pl in placements)
            g = g.redistribute(g.device_mesh, placements)
        mesh = g.device_mesh
        local.append(g._local_tensor)
        groups.append(tuple(mesh.get_group(d) for d, pl in enumerate(placements)
                            if pl.is_shard()))
    return local, groups


def _reduce_over_groups(values: Tensor, groups: list[tuple[Any, ...]],
                        op: Literal["sum", "max"]) -> Tensor:
    """Reduce ``values[j]`` over every process group in ``groups[j]``.

    One all-reduce per distinct process group (in first-seen order, which is the same on
    every rank), carrying the entries of every statistic that needs it.
    """
    import torch.distributed as dist

    order: list[Any] = []
    for gs in groups:
        order.extend(g for g in gs if not any(g is o for o in order))
    if not order:
        return values
    values = values.clone()
    if op == "max":
        # NaN is not ordered: a MAX all-reduce may drop it. Inf is, and stays non-finite.
        values = torch.where(torch.isnan(values), torch.full_like(values, math.inf), values)
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    for pg in order:
        idx = [j for j, gs in enumerate(groups) if any(g is pg for g in gs)]
        index = torch.tensor(idx, device=values.device)
        sub = values.index_select(0, index)
        dist.all_reduce(sub, op=reduce_op, group=pg)
        values = values.index_copy(0, index, sub)
    return values


def _partial_statistic(per: Tensor, p: float, groups: list[tuple[Any, ...]]) -> Tensor:
    """Sum of ``per ** p`` (max for p = inf) with the ``DTensor`` shards' parts reduced."""
    keys: list[tuple[Any, ...]] = []
    member: list[int] = []
    for gs in groups:
        j = next((k for k, key in enumerate(keys) if len(key) == len(gs)
                  and all(a is b for a, b in zip(key, gs, strict=True))), None)
        if j is None:
            keys.append(gs)
            j = len(keys) - 1
        member.append(j)
    index = torch.tensor(member, device=per.device)
    if math.isinf(p):
        parts = torch.full((len(keys),), -math.inf, dtype=per.dtype, device=per.device)
        parts = parts.scatter_reduce(0, index, per, reduce="amax")
        # torch's amax propagates NaN; a NaN shard must make its group non-finite
        bad = torch.zeros(len(keys), dtype=per.dtype, device=per.device)
        bad = bad.index_add(0, index, torch.isnan(per).to(per.dtype))
        parts = torch.where(bad > 0, torch.full_like(parts, math.nan), parts)
        parts = _reduce_over_groups(parts, keys, "max")
        return parts.max()
    parts = torch.zeros(len(keys), dtype=per.dtype, device=per.device)
    parts = parts.index_add(0, index, per.pow(p))
    return _reduce_over_groups(parts, keys, "sum").sum()


def grad_norms(
    grads: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    per_tensor: bool = True,
    reducer: NormReducer | None = None,
    device: torch.device | None = None,
    groups: Mapping[tuple[torch.device, torch.dtype], Sequence[int]] | None = None,
) -> GradNorms:
    """Total and per-tensor gradient norms in one fused pass, non-finite aware.

    Args:
        grads: The gradient tensors (e.g. from :func:`collect_grads`). May be empty, mix
            devices and dtypes (fp32/bf16/fp16/fp64), and contain sparse COO tensors and
            ``DTensor`` s (norm of the full tensors; a collective: call on every rank).
        norm_type: :math:`p > 0`, or ``float("inf")``.
        per_tensor: Also return the per-tensor norms (free: they are computed anyway).
        reducer: Optional all-reduce of the partial statistic for sharded gradients.
        device: Where the result lives when ``grads`` is empty (default: CPU); otherwise the
            first accelerator (non-CPU) device among the gradients', else the CPU: mixed
            CPU/accelerator gradients are reduced on the accelerator.
        groups: The indices of ``grads`` by ``(device, dtype)``, known in advance (e.g. from
            the parameters they belong to, see :func:`group_by_device_and_dtype`): skips the
            per-tensor layout checks and grouping. Only for dense, plain (non-``DTensor``)
            tensors; torch raises ``NotImplementedError`` for a sparse one.

    Returns:
        A :class:`GradNorms` whose tensors are float32 (float64 if any gradient is float64).
        No host synchronisation happens here.

    Raises:
        ValueError: If ``norm_type`` is not positive.
        TypeError: For gradient layouts other than strided and sparse COO.

    Example:
        >>> g = [torch.tensor([3.0, 4.0]), torch.tensor([0.0]).half()]
        >>> n = grad_norms(g)
        >>> n.total, n.per_tensor
        (tensor(5.), tensor([5., 0.]))
        >>> grad_norms([torch.tensor([float("nan")])]).finite
        tensor(False)
    """
    # the common case (a float already validated by the caller) without the generic check
    p = (norm_type if type(norm_type) is float and norm_type > 0.0
         else check_number("norm_type", norm_type, low=0, low_inclusive=False, allow_inf=True))
    if not grads:
        return _no_grads(p, per_tensor, reducer, device)
    if groups is None:
        local, shard_groups = _localize(grads)
        dense = [_dense(g) for g in local]
        groups = group_by_device_and_dtype(dense)
    else:  # the caller vouches for plain dense tensors in these groups
        dense, shard_groups = list(grads), None
    if len(groups) == 1:  # one device and dtype (the usual case)
        ((out_device, only),) = groups
        out_dtype = _acc_dtype(only)
    else:
        out_device = _result_device(d for d, _ in groups)
        out_dtype = torch.float32
        for _, dtype in groups:
            out_dtype = torch.promote_types(out_dtype, _acc_dtype(dtype))

    chunks: list[Tensor] = []
    order: list[int] = []
    for (_, dtype), idx in groups.items():
        tensors = [dense[i] for i in idx]
        chunk = torch.stack(_foreach_norms(tensors, p, dtype))
        if chunk.device != out_device or chunk.dtype != out_dtype:
            chunk = chunk.to(device=out_device, dtype=out_dtype, non_blocking=True)
        chunks.append(chunk)
        order.extend(idx)

    if len(chunks) == 1:
        per = chunks[0]
    else:
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        per = torch.cat(chunks).index_select(0, inverse.to(out_device))

    total = _total(per, p, shard_groups, reducer)
    return GradNorms(total=total, per_tensor=per if per_tensor else None, norm_type=p)


def _no_grads(p: float, per_tensor: bool, reducer: NormReducer | None,
              device: torch.device | None) -> GradNorms:
    """The norms of no gradient at all (zero; still reduced: a collective on every rank)."""
    dev = device if device is not None else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    if reducer is not None:
        zero = reducer(zero, "max" if math.isinf(p) else "sum")
    empty = torch.zeros(0, dtype=torch.float32, device=dev) if per_tensor else None
    return GradNorms(total=zero, per_tensor=empty, norm_type=p)


def _total(per: Tensor, p: float, shard_groups: list[tuple[Any, ...]] | None,
           reducer: NormReducer | None) -> Tensor:
    """The total norm from the per-tensor norms (of shards: their partial statistic)."""
    if shard_groups is not None:
        partial = _partial_statistic(per, p, shard_groups)
        if math.isinf(p):
            return partial if reducer is None else reducer(partial, "max")
        return (partial if reducer is None else reducer(partial, "sum")).pow(1.0 / p)
    if math.isinf(p):
        total = per.max()
        return total if reducer is None else reducer(total, "max")
    if reducer is None:
        norm: Tensor = torch.linalg.vector_norm(per, p)
        return norm
    partial = torch.linalg.vector_norm(per, p).pow(p)
    return reducer(partial, "sum").pow(1.0 / p)
