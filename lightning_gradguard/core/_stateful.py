"""A base class for stateful core objects with declared state.

Subclasses declare each piece of state once with :meth:`Stateful._add_state` (plain Python
values: numbers, ``None``, lists; a value of another type names how it is saved as plain
values and read back) and each nested stateful object with :meth:`Stateful._add_child`;
``reset``, ``state_dict`` and ``load_state_dict`` are then generic (the torchmetrics idea).
A part declared ``optional`` may be missing from a loaded state: it is then reset. The guard
reads every value it decides on to the host, so no state lives on a device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
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
        self._codecs: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {}
        self._optional: set[str] = set()

    def _add_child(self, name: str, child: Stateful, *, optional: bool = False) -> None:
        """Declare a nested stateful object (its state is saved under ``name``).

        ``optional``: a loaded state without ``name`` resets the child.
        """
        self._children[name] = child
        if optional:
            self._optional.add(name)

    def _add_state(self, name: str, default: Any, *, save: Callable[[Any], Any] | None = None,
                   load: Callable[[Any], Any] | None = None, optional: bool = False) -> None:
        """Declare ``name`` as state with its initial value.

        Args:
            name: The attribute (and the key it is saved under).
            default: Its initial value (deep-copied on every reset).
            save: The value as plain Python values (default: a deep copy of it); with
                ``load``, which reads that back into a value.
            load: See ``save``.
            optional: A loaded state without ``name`` resets it.
        """
        self._defaults[name] = default
        if save is not None or load is not None:
            self._codecs[name] = (save or copy.deepcopy, load or (lambda v: v))
        if optional:
            self._optional.add(name)
        setattr(self, name, copy.deepcopy(default))

    def reset(self) -> None:
        """Restore every declared state to its initial value."""
        for name, default in self._defaults.items():
            setattr(self, name, copy.deepcopy(default))
        for child in self._children.values():
            child.reset()

    def state_dict(self) -> dict[str, Any]:
        """Return a copy of every declared state (safe to ``torch.save``)."""
        out: dict[str, Any] = {}
        for name in self._defaults:
            save = self._codecs[name][0] if name in self._codecs else copy.deepcopy
            out[name] = save(getattr(self, name))
        for name, child in self._children.items():
            out[name] = child.state_dict()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load state produced by :meth:`state_dict`.

        Raises:
            KeyError: If a declared state is missing from ``state_dict``.
        """
        missing = [k for k in [*self._defaults, *self._children]
                   if k not in state_dict and k not in self._optional]
        if missing:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}; "
                f"expected {sorted([*self._defaults, *self._children])}"
            )
        for name, default in self._defaults.items():
            if name not in state_dict:  # an optional state: fresh
                setattr(self, name, copy.deepcopy(default))
                continue
            value = copy.deepcopy(state_dict[name])
            setattr(self, name, self._codecs[name][1](value) if name in self._codecs else value)
        for name, child in self._children.items():
            if name in state_dict:
                child.load_state_dict(state_dict[name])
            else:  # an optional child: fresh
                child.reset()
