"""Argument checks shared by every public constructor.

Each check raises a builtin :class:`TypeError` or :class:`ValueError` whose message names
the argument, the allowed values and what was received, e.g.::

    ValueError: `z_threshold` must be a finite number > 0, got -1.0
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
]


def _fmt(value: Any) -> str:
    return repr(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_inf: bool = False,
) -> float:
    """Validate a real number and return it as ``float``.

    Args:
        name: Argument name used in the error message.
        value: The received value.
        low: Lower bound (``None``: unbounded).
        high: Upper bound (``None``: unbounded).
        low_inclusive: Whether ``low`` itself is allowed.
        high_inclusive: Whether ``high`` itself is allowed.
        allow_inf: Whether ``+inf`` is an allowed value.

    Returns:
        The value as a float.

    Raises:
        TypeError: If ``value`` is not a real number (``bool`` is rejected).
        ValueError: If ``value`` is NaN, infinite (unless allowed) or out of range.

    Example:
        >>> check_number("lr_scale", 0.5, low=0, high=1)
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a real number, got {_fmt(value)} ({type(value).__name__})"
        )
    try:
        out = float(value)
    except OverflowError:
        raise ValueError(f"`{name}` must be a finite number, got {_fmt(value)}") from None
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'<=' if high_inclusive else '<'} {high:g}")
    allowed = "a " + ("" if allow_inf else "finite ") + "number" + (
        " " + " and ".join(parts) if parts else ""
    )
    bad = math.isnan(out) or (math.isinf(out) and not allow_inf)
    if low is not None and (out < low or (out == low and not low_inclusive)):
        bad = True
    if high is not None and (out > high or (out == high and not high_inclusive)):
        bad = True
    if bad:
        raise ValueError(f"`{name}` must be {allowed}, got {_fmt(value)}")
    return out


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Validate an integer (``bool`` rejected) within ``[low, high]``.

    Example:
        >>> check_int("warmup_steps", 10, low=0)
        10
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {_fmt(value)} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = (f">= {low}" if high is None else f"<= {high}" if low is None
                   else f"in [{low}, {high}]")
        raise ValueError(f"`{name}` must be an int {allowed}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Validate a ``bool``.

    Example:
        >>> check_bool("per_tensor", True)
        True
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {_fmt(value)} ({type(value).__name__})")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """Validate that ``value`` is one of ``choices``.

    Example:
        >>> check_choice("on_halt", "stop", ("stop", "raise"))
        'stop'
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)!r}, got {_fmt(value)}")
    return value
