"""Gradient fixtures of the overhead benchmark: parameter sets, pristine gradients, and the
warmed-up state every stateful method is reset to before each timed call."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_gradguard.core.guard import GuardCore

__all__ = ["CLEAN_NORM", "SPIKE", "WARM_NOISE", "WARM_STEPS", "ParamSet", "grads_of",
           "make_grads", "total", "warm_norms", "warmed_guard_state", "warmed_zclip"]

CLEAN_NORM = 0.5  # total gradient norm of a clean step (below clip_grad_norm_'s max_norm=1)
SPIKE = 10.0  # a spike step multiplies the clean gradients by this (total norm 5)
WARM_NOISE = 0.1  # warm-up norms are CLEAN_NORM * (1 +- WARM_NOISE), uniform
WARM_STEPS = 40  # > the 25 warm-up steps of ZScoreClip and of ZClip


class ParamSet(nn.Module):
    """``n_tensors`` parameters like a stack of Linear layers: pairs of a square weight
    ``(r, r)`` and a bias ``(r,)`` with about ``n_params`` parameters in total."""

    def __init__(self, n_tensors: int, n_params: int) -> None:
        super().__init__()
        pairs = max(1, n_tensors // 2)
        r = max(1, int(math.sqrt(n_params / pairs)))
        self.params = nn.ParameterList()
        for _ in range(pairs):
            self.params.append(nn.Parameter(torch.zeros(r, r)))
            self.params.append(nn.Parameter(torch.zeros(r)))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())


def make_grads(params: list[nn.Parameter], norm: float, seed: int = 0) -> list[torch.Tensor]:
    """Pristine gradients (standard normal, rescaled to total norm ``norm``); sets ``.grad``
    of every parameter to a separate buffer of the same shape."""
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(p.shape, generator=g) for p in params]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(base))).item()
    torch._foreach_mul_(base, norm / total)
    for p, b in zip(params, base, strict=True):
        p.grad = torch.empty_like(b)
    return base


def grads_of(params: list[nn.Parameter] | list[torch.Tensor]) -> list[torch.Tensor]:
    """The ``.grad`` of every parameter (all must be set)."""
    out = [p.grad for p in params if p.grad is not None]
    if len(out) != len(params):
        raise RuntimeError("every parameter needs a gradient")
    return out


def warm_norms(seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(WARM_STEPS, generator=g, dtype=torch.float64) * 2 - 1
    return [CLEAN_NORM * (1 + WARM_NOISE * float(x)) for x in u]


def warmed_guard_state() -> dict[str, Any]:
    """GuardCore state after WARM_STEPS clean steps with noisy norms around CLEAN_NORM.

    The state (clip statistics, growth detector, backoff, counters) does not depend on the
    parameter set, so it is produced on a one-element proxy and loaded into the real guard.
    """
    p = nn.Parameter(torch.zeros(1))
    proxy = GuardCore([p])
    for x in warm_norms():
        p.grad = torch.tensor([x])
        proxy.step()
    return proxy.state_dict()


def warmed_zclip() -> Any:
    from zclip import ZClip

    proxy = nn.Linear(1, 1, bias=False)
    zc = ZClip()  # defaults: alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, warmup_steps=25
    for x in warm_norms():
        proxy.weight.grad = torch.tensor([[x]])
        zc.step(proxy)
    assert zc.initialized
    return zc


def total(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

