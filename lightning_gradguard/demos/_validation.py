"""Argument validation shared by the demo models and datamodules.

Every check raises with a message that names the argument, states what is allowed and shows what
was received, e.g. ``"`activation` must be one of ('relu', 'tanh', 'steep'), got 'foo'"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

__all__ = [
    "check_choice",
    "check_fraction",
    "check_int",
    "check_non_negative_float",
    "check_positive_float",
]

ChoiceT = TypeVar("ChoiceT", bound=str)


def check_choice(name: str, value: object, choices: Sequence[ChoiceT]) -> ChoiceT:
    """Check that ``value`` is one of the allowed string ``choices``.

    Args:
        name: Argument name used in the error message.
        value: Received value.
        choices: Allowed values.

    Returns:
        The matching element of ``choices`` (so ``Literal`` types are preserved).

    Raises:
        ValueError: If ``value`` is not one of ``choices``.

    Example:
        >>> check_choice("optimizer", "adam", ("sgd", "adam"))
        'adam'
        >>> check_choice("optimizer", "lbfgs", ("sgd", "adam"))
        Traceback (most recent call last):
            ...
        ValueError: `optimizer` must be one of ('sgd', 'adam'), got 'lbfgs'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)!r}, got {value!r}")
    return choices[choices.index(value)]


def check_int(name: str, value: object, minimum: int) -> int:
    """Check that ``value`` is an ``int`` (not a ``bool``) that is at least ``minimum``.

    Args:
        name: Argument name used in the error message.
        value: Received value.
        minimum: Smallest allowed value.

    Returns:
        ``value``, typed as ``int``.

    Raises:
        TypeError: If ``value`` is not an ``int``.
        ValueError: If ``value < minimum``.

    Example:
        >>> check_int("depth", 8, minimum=1)
        8
        >>> check_int("depth", 0, minimum=1)
        Traceback (most recent call last):
            ...
        ValueError: `depth` must be an int >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{name}` must be an int >= {minimum}, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def _check_real(name: str, value: object, requirement: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be {requirement}, got {type(value).__name__} {value!r}")
    return float(value)


def check_positive_float(name: str, value: object) -> float:
    """Check that ``value`` is a finite real number greater than zero.

    Args:
        name: Argument name used in the error message.
        value: Received value (``int`` or ``float``, not ``bool``).

    Returns:
        ``value`` converted to ``float``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If ``value`` is not finite or not ``> 0``.

    Example:
        >>> check_positive_float("lr", 0.1)
        0.1
        >>> check_positive_float("lr", 0.0)
        Traceback (most recent call last):
            ...
        ValueError: `lr` must be a finite float > 0, got 0.0
    """
    requirement = "a finite float > 0"
    number = _check_real(name, value, requirement)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"`{name}` must be {requirement}, got {value!r}")
    return number


def check_fraction(name: str, value: object) -> float:
    """Check that ``value`` is a real number strictly between 0 and 1.

    Args:
        name: Argument name used in the error message.
        value: Received value.

    Returns:
        ``value`` converted to ``float``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If ``value`` is not in the open interval ``(0, 1)``.

    Example:
        >>> check_fraction("val_fraction", 0.2)
        0.2
    """
    requirement = "a float in (0, 1)"
    number = _check_real(name, value, requirement)
    if not 0.0 < number < 1.0:
        raise ValueError(f"`{name}` must be {requirement}, got {value!r}")
    return number


def check_non_negative_float(name: str, value: object) -> float:
    """Check that ``value`` is a finite real number ``>= 0``.

    Args:
        name: Argument name used in the error message.
        value: Received value.

    Returns:
        ``value`` converted to ``float``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If ``value`` is negative or not finite.

    Example:
        >>> check_non_negative_float("noise_std", 0.0)
        0.0
    """
    requirement = "a finite float >= 0"
    number = _check_real(name, value, requirement)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"`{name}` must be {requirement}, got {value!r}")
    return number
