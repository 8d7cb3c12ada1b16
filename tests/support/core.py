"""Plain-torch training data and Hypothesis settings for the tests of ``lightning_gradguard.core``
(no Trainer: a loop of ``loss.backward()``, ``GuardCore.step``, ``opt.step()``)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings

#: Hypothesis settings for the core's property tests: modest, deterministic, no deadline.
HYP = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 16 samples ``x ~ N(0, 1)^4``, ``y = x @ (1, -2, 0.5, 3) + 0.1 N(0, 1)``
    (a linear target, unlike :func:`support.modules.make_data`'s ``tanh``), from a generator
    seeded with ``seed`` (the global RNG is not touched)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        y = x @ w + 0.1 * torch.randn(16, 1, generator=g)
        out.append((x, y))
    return out


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of ``model(x)`` against ``y``."""
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
