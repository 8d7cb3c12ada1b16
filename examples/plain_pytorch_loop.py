"""GradGuard's core in a plain PyTorch loop (no Lightning): three lines around the step.

    python examples/plain_pytorch_loop.py
"""

from __future__ import annotations

import torch

from lightning_gradguard.core import GuardCore


def main(steps: int = 200, lr: float = 1.0, seed: int = 0) -> dict[str, object]:
    torch.manual_seed(seed)
    x = torch.randn(2048, 16)
    y = (x[:, :4].sum(1, keepdim=True)).tanh()
    model = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Linear(16, 16),
                                                                 torch.nn.Tanh())],
                                torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    guard = GuardCore(model, optimizer)                       # 1
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        if step == 50:
            loss = loss * float("nan")                        # a corrupt batch
        loss.backward()
        report = guard.step(loss)                             # 2
        optimizer.step()
        optimizer.zero_grad()
        if report.halt:                                       # 3
            print(guard.halt_message)
            break
    summary = guard.summary()
    print(summary)
    return summary


if __name__ == "__main__":
    main()
