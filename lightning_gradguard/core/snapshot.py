"""Last-good snapshots of model and optimizer state, kept off the hot path.

A snapshot is a copy of ``module.state_dict()`` (parameters *and* buffers, e.g. BatchNorm
running statistics) and of each optimizer's ``state_dict()``, stored on ``device`` (CPU by
default, so GPU memory is not touched). Memory cost: one copy of the model plus one copy of
the optimizer state — for Adam about 3x the parameter bytes, on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._stateful import Stateful

__all__ = ["Snapshot"]


def _copy_to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, Mapping):
        return {k: _copy_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_to(v, device) for v in obj)
    return obj


@friendly_kwargs
class Snapshot(Stateful):
    """Holds the last good ``(model, optimizers)`` state and restores it in place.

    Its state (``step``, ``model``, ``optim``) is the snapshot itself, kept on ``device``;
    :meth:`reset` drops it.

    Args:
        device: Where copies are kept (default CPU).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> snap = Snapshot()
        >>> snap.capture(model, [opt], step=3)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(float("nan"))
        >>> snap.restore(model, [opt])
        3
        >>> bool(torch.isfinite(model.weight).all())
        True
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.step: int | None = None
        self._model: dict[str, torch.Tensor] | None = None
        self._optim: list[dict[str, Any]] = []

    @property
    def available(self) -> bool:
        """Whether a snapshot has been captured."""
        return self._model is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshot (model + optimizer tensors)."""

        def count(obj: Any) -> int:
            if isinstance(obj, torch.Tensor):
                return obj.numel() * obj.element_size()
            if isinstance(obj, Mapping):
                return sum(count(v) for v in obj.values())
            if isinstance(obj, (list, tuple)):
                return sum(count(v) for v in obj)
            return 0

        return count(self._model) + count(self._optim)

    def capture(self, module: torch.nn.Module, optimizers: Sequence[Optimizer],
                step: int) -> None:
        """Copy the current state (call only when it is known to be finite)."""
        self._model = _copy_to(module.state_dict(), self.device)
        self._optim = [_copy_to(opt.state_dict(), self.device) for opt in optimizers]
        self.step = step

    def clear(self) -> None:
        """Drop the snapshot (e.g. when it no longer matches the optimizer's param groups)."""
        self._model = None
        self._optim = []
        self.step = None

    def restore(self, module: torch.nn.Module, optimizers: Sequence[Optimizer]) -> int:
        """Copy the snapshot back in place; returns the step it was taken at.

        Learning rates are not rolled back: the scheduler's current values are kept.

        Raises:
            RuntimeError: If no snapshot was captured.
        """
        if self._model is None or self.step is None:
            raise RuntimeError("no snapshot to restore: none was captured yet")
        self._check_matches(optimizers)
        with torch.no_grad():
            module.load_state_dict(self._model)
        for opt, state in zip(optimizers, self._optim, strict=True):
            lrs = [g["lr"] for g in opt.param_groups]
            # a fresh copy: load_state_dict keeps same-device tensors by reference, and the
            # next optimizer step would otherwise write into the snapshot itself
            opt.load_state_dict(_copy_to(state, self.device))
            for g, lr in zip(opt.param_groups, lrs, strict=True):
                g["lr"] = lr
        return self.step

    def _check_matches(self, optimizers: Sequence[Optimizer]) -> None:
        """Refuse, before writing anything, a restore that would leave the two inconsistent."""
        if len(optimizers) != len(self._optim):
            raise RuntimeError(
                f"the snapshot holds {len(self._optim)} optimizer states but "
                f"{len(optimizers)} optimizers were given; nothing was restored")
        for i, (opt, state) in enumerate(zip(optimizers, self._optim, strict=True)):
            saved = [len(g["params"]) for g in state["param_groups"]]
            now = [len(g["params"]) for g in opt.param_groups]
            if saved != now:
                raise RuntimeError(
                    f"the snapshot of optimizer {i} has param groups of sizes {saved} but the "
                    f"optimizer now has {now} (param groups were added after it was taken); "
                    "nothing was restored")

    def reset(self) -> None:
        """Drop the snapshot (as :meth:`clear`)."""
        self.clear()

    def state_dict(self) -> dict[str, Any]:
        """The snapshot itself (so a resumed run keeps its last good state)."""
        return {"step": self.step, "model": self._model, "optim": self._optim}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.step = state_dict["step"]
        self._model = _copy_to(state_dict["model"], self.device) if state_dict["model"] else None
        self._optim = [_copy_to(s, self.device) for s in state_dict["optim"]]
