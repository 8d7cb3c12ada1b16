"""A base class for stateful core objects with declared state.

Subclasses declare each piece of state once with :meth:`Stateful._add_state`; ``reset``,
``state_dict``, ``load_state_dict`` and ``to`` are then generic (the torchmetrics idea).
Tensor state lives on the gradients' device (moved lazily on first use); host state is
plain Python numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["Stateful"]


class Stateful:
    """Declared-state protocol: ``update`` / ``reset`` / ``state_dict`` / ``load_state_dict``.

    Example:
        >>> class Counter(Stateful):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self._add_state("n", torch.tensor(0))
        >>> c = Counter()
        >>> c.n += 1
        >>> c.state_dict()
        {'n': tensor(1)}
        >>> c.reset(); c.n
        tensor(0)
    """

    def __init__(self) -> None:
        self._defaults: dict[str, Any] = {}
        self._children: dict[str, Stateful] = {}

    def _add_child(self, name: str, child: Stateful) -> None:
        """Declare a nested stateful object (its state is saved under ``name``)."""
        self._children[name] = child

    def _add_state(self, name: str, default: Any) -> None:
        """Declare ``name`` as state with its initial value (a tensor or a Python value)."""
        self._defaults[name] = default
        setattr(self, name, self._fresh(default))

    @staticmethod
    def _fresh(default: Any) -> Any:
        if isinstance(default, torch.Tensor):
            return default.detach().clone()
        return copy.deepcopy(default)

    def reset(self) -> None:
        """Restore every declared state to its initial value (on the current device)."""
        device = self.device
        for name, default in self._defaults.items():
            value = self._fresh(default)
            if isinstance(value, torch.Tensor) and device is not None:
                value = value.to(device)
            setattr(self, name, value)
        for child in self._children.values():
            child.reset()

    @property
    def device(self) -> torch.device | None:
        """Device of the tensor state (``None`` when there is none)."""
        for name, default in self._defaults.items():
            if isinstance(default, torch.Tensor):
                value: torch.Tensor = getattr(self, name)
                return value.device
        for child in self._children.values():
            if child.device is not None:
                return child.device
        return None

    def to(self, device: torch.device | str) -> Stateful:
        """Move all tensor state to ``device`` (no-op when already there). Returns ``self``."""
        device = torch.device(device)
        for name, default in self._defaults.items():
            if isinstance(default, torch.Tensor):
                value: torch.Tensor = getattr(self, name)
                if value.device != device:
                    setattr(self, name, value.to(device))
        for child in self._children.values():
            child.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Return a copy of every declared state (tensors on CPU, safe to ``torch.save``)."""
        out: dict[str, Any] = {}
        for name in self._defaults:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                out[name] = value.detach().to("cpu", copy=True)
            else:
                out[name] = copy.deepcopy(value)
        for name, child in self._children.items():
            out[name] = child.state_dict()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load state produced by :meth:`state_dict`.

        Raises:
            KeyError: If a declared state is missing from ``state_dict``.
        """
        missing = [k for k in [*self._defaults, *self._children] if k not in state_dict]
        if missing:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}; "
                f"expected {sorted([*self._defaults, *self._children])}"
            )
        device = self.device
        for name, default in self._defaults.items():
            value = state_dict[name]
            if isinstance(default, torch.Tensor):
                tensor = torch.as_tensor(value).to(dtype=default.dtype)
                setattr(self, name, tensor.to(device) if device is not None else tensor.clone())
            elif isinstance(default, (bool, int, float)) and isinstance(value, torch.Tensor):
                setattr(self, name, type(default)(value.item()))  # a tensor-era checkpoint
            else:
                setattr(self, name, copy.deepcopy(value))
        for name, child in self._children.items():
            child.load_state_dict(state_dict[name])
