"""GradGuard's core in a Lightning Fabric loop.

    python examples/fabric_loop.py
"""

from __future__ import annotations

import torch
from lightning.fabric import Fabric

from lightning_gradguard.core import GuardCore


def main(steps: int = 100, lr: float = 0.5) -> dict[str, object]:
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model, optimizer = fabric.setup(model, optimizer)
    guard = GuardCore(model, optimizer.optimizer)      # the wrapped torch optimizer
    data = torch.randn(1024, 8)
    target = data.sum(1, keepdim=True)
    for step in range(steps):
        idx = torch.randint(0, len(data), (32,))
        loss = torch.nn.functional.mse_loss(model(data[idx]), target[idx])
        fabric.backward(loss)
        if step == 20:
            next(model.parameters()).grad.fill_(float("inf"))  # a fault
        report = guard.step(loss)
        optimizer.step()
        optimizer.zero_grad()
        if report.halt:
            break
    summary = guard.summary()
    fabric.print(summary)
    return summary


if __name__ == "__main__":
    main()
