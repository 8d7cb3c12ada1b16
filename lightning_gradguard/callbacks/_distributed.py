"""Multi-process support for the callbacks: one decision on every rank, global norms of shards.

Every rank runs its own :class:`~lightning_gradguard.core.GuardCore`. The ranks must take the
same decision at every step (skip, clip by the same coefficient, back off), or their weights
drift apart (DDP) and their collectives stop matching (FSDP: a hang). Two things could make
them differ:

* **the gradients**: under DDP they are all-reduced before the guard sees them, so they agree,
  unless something changes them on one rank afterwards (a callback, a bit flip). Under FSDP
  each rank holds a shard, so the global norm needs a reduction anyway;
* **the loss**, which is never all-reduced: a loss that is NaN on one rank while every gradient
  is finite (a NaN term without a gradient, e.g. a detached or logged-only term added to the
  loss) would make only that rank skip.

So, when the world has more than one process, the core gets a :class:`ConsensusReducer`: it
all-reduces, in **one** collective of four numbers, the (already global) norm statistic,
a "some rank saw NaN" flag, a "some rank's loss is non-finite" flag and the loss, with
``MAX``. Every rank then sees the same norm, a loss that was non-finite on any rank is
reported as non-finite on all, and a finite one as the largest over the ranks (the loss
trend that gates backoffs must be the same on every rank). No host synchronisation is
added (the values stay on the gradients' device until the core's single read-back);
single-process runs get no reducer at all.

The gradients' own reduction depends on the strategy:

==============================  =================================================================
strategy                        gradients seen by the guard, and the global norm
==============================  =================================================================
DDP                             replicated (already all-reduced); nothing to add
FSDP2 / ModelParallelStrategy   ``DTensor`` shards: :func:`~lightning_gradguard.core.norms.
                                grad_norms` reduces their partial norms over the mesh itself
FSDP1 (``FSDPStrategy``)        plain tensors, the local part of each flat shard: a
                                :class:`GroupReducer` sums the partial norms over the sharding
                                process group (``NO_SHARD``: replicated, nothing to add)
DeepSpeed                       refused at ``setup`` (its engine steps the optimizer itself)
==============================  =================================================================
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_gradguard.core.norms import NormReducer

__all__ = ["ConsensusReducer", "GroupReducer", "fsdp1_shard_group", "make_reducer"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class GroupReducer:
    """All-reduces a partial norm statistic over one process group (``None``: the world).

    ``op="max"`` turns NaN into ``inf`` first: NaN is unordered, so a ``MAX`` all-reduce could
    drop it, while ``inf`` survives and is just as non-finite.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def __call__(self, partial: Tensor, op: Literal["sum", "max"]) -> Tensor:
        """Return ``partial`` reduced over the group."""
        import torch.distributed as dist

        out = partial.detach().clone()
        if op == "max":
            out = torch.where(torch.isnan(out), torch.full_like(out, math.inf), out)
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        else:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out


class ConsensusReducer:
    """Makes every rank see the same norm statistic and the same loss (its largest value).

    Args:
        shard: Reducer for gradients that are plain-tensor shards (FSDP1), applied first.
        group: Process group of the ranks that must agree (``None``: the world).

    The statistic it receives is already global (replicated gradients, or reduced by
    ``shard`` / over the ``DTensor`` mesh); a ``MAX`` over ranks therefore leaves it
    unchanged when the ranks agree, and makes them agree when they do not.

    Set :attr:`loss` (with :meth:`arm`) to a private float32 copy of the step's loss before
    the core's step and clear it after (:meth:`disarm`): when any rank's loss is non-finite,
    the collective writes NaN into every rank's copy before the core reads it (the core
    reads the loss once, after measuring the norms); otherwise the largest loss of the
    ranks that have one. A rank without a loss gets a NaN
    statistic instead, so it skips too.
    """

    def __init__(self, shard: NormReducer | None = None, group: Any = None) -> None:
        self.shard = shard
        self.group = group
        self.loss: Tensor | None = None

    def arm(self, loss: Tensor | None) -> Tensor | None:
        """Keep (and return) a float32 copy of ``loss`` that the next reduction may mark NaN."""
        self.loss = None if loss is None else loss.detach().reshape(()).float().clone()
        return self.loss

    def disarm(self) -> None:
        """Forget the step's loss."""
        self.loss = None

    def __call__(self, partial: Tensor, op: Literal["sum", "max"]) -> Tensor:
        """Return the statistic every rank agrees on (see the class docstring)."""
        import torch.distributed as dist

        if self.shard is not None:
            partial = self.shard(partial, op)
        stat = partial.detach().reshape(()).double()
        nan = torch.isnan(stat)
        loss = self.loss
        bad_loss = (torch.zeros((), dtype=torch.float64, device=stat.device) if loss is None
                    else (~torch.isfinite(loss)).to(device=stat.device, dtype=torch.float64))
        # the largest finite loss over the ranks (-inf from a rank without one): every rank
        # feeds the same value to the loss trend, which gates backoffs
        own = (torch.full((), -math.inf, dtype=torch.float64, device=stat.device)
               if loss is None else
               torch.nan_to_num(loss.to(device=stat.device, dtype=torch.float64),
                                nan=-math.inf, posinf=-math.inf, neginf=-math.inf))
        packed = torch.stack([torch.where(nan, torch.full_like(stat, math.inf), stat),
                              nan.double(), bad_loss, own])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=self.group)
        any_nan = packed[1] > 0
        any_bad_loss = packed[2] > 0
        out = torch.where(any_nan, torch.full_like(packed[0], math.nan), packed[0])
        if loss is not None:
            marked = torch.where(any_bad_loss.to(loss.device),
                                 torch.full_like(loss, math.nan),
                                 packed[3].to(device=loss.device, dtype=loss.dtype))
            loss.copy_(marked)
        else:
            out = torch.where(any_bad_loss, torch.full_like(out, math.nan), out)
        return out.to(partial.dtype)


def fsdp1_shard_group(model: torch.nn.Module | None) -> tuple[bool, Any]:
    """Whether ``model`` contains FSDP1 units that shard gradients, and their process group.

    Returns:
        ``(False, None)`` without sharding FSDP1 units (``NO_SHARD`` replicates gradients);
        ``(True, group)`` otherwise. For ``HYBRID_SHARD`` the group is the sharding group
        (gradients are already all-reduced across replicas).

    Raises:
        ValueError: If the units shard over different process groups.
    """
    if model is None or not _distributed():
        return False, None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    except ImportError:  # pragma: no cover
        return False, None
    groups = [m.process_group for m in model.modules()
              if isinstance(m, FullyShardedDataParallel)
              and m.sharding_strategy != ShardingStrategy.NO_SHARD]
    if not groups:
        return False, None
    if any(g is not groups[0] for g in groups):
        raise ValueError(
            "GradGuard supports FSDP (FSDPStrategy) when every FSDP unit shards over the same "
            "process group; this model's units use different groups. Use one sharding "
            "strategy for the whole model, or FSDP2 (ModelParallelStrategy + fully_shard)."
        )
    return True, groups[0]


def make_reducer(trainer: Any) -> ConsensusReducer | None:
    """The reducer the core needs under ``trainer``'s strategy (``None``: single process)."""
    if int(getattr(trainer, "world_size", 1) or 1) <= 1 or not _distributed():
        return None
    sharded, group = fsdp1_shard_group(getattr(trainer.strategy, "model", None))
    return ConsensusReducer(shard=GroupReducer(group) if sharded else None)
