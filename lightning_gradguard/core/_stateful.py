"""A base class for stateful core objects with declared state.

Subclasses declare each piece of state once with :meth:`Stateful._add_state` (plain Python
values: numbers, ``None``, lists) and each nested stateful object with
:meth:`Stateful._add_child`; ``reset``, ``state_dict`` and ``load_state_dict`` are then
generic (the torchmetrics idea). The guard reads every value it decides on to the host, so
no state lives on a device.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = ["Stateful"]


class Stateful:
    """Declared-state protocol: ``update`` / ``reset`` / ``state_dict`` / ``load_state_dict``.

    Example:
        >>> class Counter(Stateful):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self._add_state("n", 0)
        >>> c = Counter()
        >>> c.n += 1
        >>> c.state_dict()
        {'n': 1}
        >>> c.reset(); c.n
        0
    """

    def __init__(self) -> None:
        self._defaults: dict[str, Any] = {}
        self._children: dict[str, Stateful] = {}

    def _add_child(self, name: str, child: Stateful) -> None:
        """Declare a nested stateful object (its state is saved under ``name``)."""
        self._children[name] = child

    def _add_state(self, name: str, default: Any) -> None:
        """Declare ``name`` as state with its initial value (a plain Python value)."""
        self._defaults[name] = default
        setattr(self, name, copy.deepcopy(default))

    def reset(self) -> None:
        """Restore every declared state to its initial value."""
        for name, default in self._defaults.items():
            setattr(self, name, copy.deepcopy(default))
        for child in self._children.values():
            child.reset()

    def state_dict(self) -> dict[str, Any]:
        """Return a copy of every declared state (safe to ``torch.save``)."""
        out: dict[str, Any] = {name: copy.deepcopy(getattr(self, name))
                               for name in self._defaults}
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
        for name in self._defaults:
            setattr(self, name, copy.deepcopy(state_dict[name]))
        for name, child in self._children.items():
            child.load_state_dict(state_dict[name])
