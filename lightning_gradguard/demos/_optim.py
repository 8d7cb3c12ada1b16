"""The one place where the demo models build their optimizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal

import torch
from torch import nn

from ..core._validation import check_choice, check_number

__all__ = ["OPTIMIZERS", "OptimizerName", "build_optimizer"]

OptimizerName = Literal["sgd", "sgd_momentum", "adam", "rmsprop"]
"""Optimizer names accepted by :func:`build_optimizer` and the demo models."""

OPTIMIZERS: Final[tuple[OptimizerName, ...]] = ("sgd", "sgd_momentum", "adam", "rmsprop")
"""All values of :data:`OptimizerName`."""

SGD_MOMENTUM: Final[float] = 0.9
"""Momentum used by ``"sgd_momentum"``."""


def build_optimizer(
    params: Iterable[nn.Parameter], name: OptimizerName, lr: float
) -> torch.optim.Optimizer:
    """Build one of the demo optimizers with library defaults apart from ``lr``.

    Args:
        params: Parameters to optimize.
        name: ``"sgd"`` (plain SGD), ``"sgd_momentum"`` (SGD with momentum 0.9), ``"adam"`` or
            ``"rmsprop"``.
        lr: Learning rate, ``> 0``.

    Returns:
        The optimizer.

    Raises:
        ValueError: If ``name`` is unknown or ``lr`` is not a finite positive number.

    Example:
        >>> layer = nn.Linear(3, 1)
        >>> build_optimizer(layer.parameters(), "sgd_momentum", lr=0.1).defaults["momentum"]
        0.9
    """
    check_choice("optimizer", name, OPTIMIZERS)
    lr = check_number("lr", lr, low=0, low_inclusive=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.RMSprop(params, lr=lr)
