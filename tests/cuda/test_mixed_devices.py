"""Gradients on two devices, on a GPU: a CPU gradient first, CUDA gradients after (a
CPU-offloaded table).

The total norm of CPU and CUDA gradients is exact on every one of 30 reads, a NaN in the last
CUDA gradient read as NaN (the partial norms must be complete before the total is read, not
read back through unsynchronised asynchronous copies); the guard skips every NaN step of a
model whose embedding table stays on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradguard.core import GuardCore
from lightning_gradguard.core.guard import Action
from lightning_gradguard.core.norms import grad_norms

pytestmark = pytest.mark.cuda


def test_total_of_cpu_then_cuda_grads_is_exact() -> None:
    torch.manual_seed(0)
    cpu = torch.randn(1000)
    big = [torch.randn(4096, 4096, device="cuda") for _ in range(4)]
    for trial in range(30):
        if trial % 2:
            big[-1][-1, -1] = float("nan")
        else:
            big[-1][-1, -1] = 1.0
        norms = grad_norms([cpu, *big])
        assert norms.total.device.type == "cuda"
        total = float(norms.total)
        expected = float(torch.linalg.vector_norm(
            torch.stack([cpu.norm().cuda(), *[b.norm() for b in big]])))
        if trial % 2:
            assert math.isnan(total), trial
        else:
            assert total == pytest.approx(expected, rel=1e-5), trial


class Offloaded(torch.nn.Module):
    """An embedding table kept on the CPU (registered first) and a CUDA head."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(1000, 64)
        self.head = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)]).cuda()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(idx).cuda()).pow(2).mean()  # type: ignore[no-any-return]


def test_guard_skips_every_nan_step_with_offloaded_table() -> None:
    torch.manual_seed(0)
    model = Offloaded()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = GuardCore(model, opt, rollback=True, snapshot_every=5)
    for step in range(30):
        opt.zero_grad()
        model(torch.randint(0, 1000, (256,))).backward()
        if step % 3 == 2:
            model.head[-1].weight.grad[0, 0] = float("nan")
        report = guard.step()
        if step % 3 == 2:
            assert report.action is Action.SKIP, step
            assert not report.finite
        else:
            assert report.finite, step
        opt.step()
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), step
