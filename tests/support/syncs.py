"""A host-synchronisation counter for CPU tests that code under test cannot step around.

Two layers, because a tensor -> Python conversion can happen at either:

* a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every ATen operator
  dispatched inside the block, also those called from torch's C++ (``torch.is_nonzero``,
  ``bool(t)``, ``float(t)``, ``t.item()``, ``if t:``, formatting a 0-dim tensor,
  ``torch.equal``...). Every read of a tensor's value into a Python scalar ends in
  ``aten._local_scalar_dense`` (counted as ``"scalar"``); ``aten.equal``/``aten.allclose``
  return a Python bool directly (counted as ``"equal"``).
* conversions that never reach the dispatcher on CPU are counted by wrapping the
  ``torch.Tensor`` methods: ``tolist``, ``numpy``, ``__array__``, ``cpu`` and ``to`` with a
  target device written as the string ``"cpu"`` (each one a device -> host copy on an
  accelerator).

Known blind spots (documented, not hidden): calling the C base class directly
(``torch._C.TensorBase.tolist(t)``) and ``t.to(torch.device("cpu"))`` / ``t.to(other.device)``
on CPU, which cannot be told apart from a same-device move. On CUDA,
``torch.cuda.set_sync_debug_mode("error")`` is the ground truth.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_syncs", "nonzero"]

_SCALAR = {torch.ops.aten._local_scalar_dense.default}
_EQUAL = {torch.ops.aten.equal.default, torch.ops.aten.allclose.default}
_METHODS = ("tolist", "numpy", "__array__", "cpu")


class _Counter(TorchDispatchMode):
    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func in _SCALAR:
            self.counts["scalar"] += 1
        elif func in _EQUAL:
            self.counts["equal"] += 1
        return func(*args, **(kwargs or {}))


def _to_host_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    dev = kwargs.get("device", args[0] if args else None)
    return isinstance(dev, str) and dev.split(":")[0] == "cpu"


@contextlib.contextmanager
def count_syncs() -> Iterator[dict[str, int]]:
    """Count host synchronisations inside the block, by kind.

    Yields a dict ``{"scalar", "equal", "tolist", "numpy", "__array__", "cpu", "to"}`` ->
    count; :func:`nonzero` drops the zeros.

    Example:
        >>> t = torch.tensor([1.0, float("nan")])
        >>> with count_syncs() as c:
        ...     _ = torch.is_nonzero(torch.isfinite(t).all())  # inside torch's C++
        ...     _ = t.cpu()
        ...     _ = t.tolist()
        >>> nonzero(c)
        {'scalar': 1, 'tolist': 1, 'cpu': 1}
    """
    counts = dict.fromkeys(("scalar", "equal", *_METHODS, "to"), 0)
    saved = {name: torch.Tensor.__dict__.get(name) for name in (*_METHODS, "to")}

    def wrap(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return orig(self, *args, **kwargs)
        return wrapper

    def wrap_to(orig: Callable[..., Any]) -> Callable[..., Any]:
        def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if _to_host_device(args, kwargs):
                counts["to"] += 1
            return orig(self, *args, **kwargs)
        return to

    for name in _METHODS:
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    torch.Tensor.to = wrap_to(torch.Tensor.to)  # type: ignore[method-assign]
    try:
        with _Counter(counts):
            yield counts
    finally:
        for name, orig in saved.items():
            if orig is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, orig)


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    """The kinds that were counted at least once.

    Example:
        >>> nonzero({"scalar": 0, "tolist": 1})
        {'tolist': 1}
    """
    return {k: v for k, v in counts.items() if v}
