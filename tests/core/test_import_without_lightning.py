from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One subprocess (a torch import is the expensive part): Lightning is made unimportable,
# then the core is imported and used for a few guarded steps.
SCRIPT = """
import sys
BLOCKED = ("lightning", "pytorch_lightning", "lightning.pytorch", "lightning.fabric",
           "lightning_fabric")
for name in BLOCKED:
    sys.modules[name] = None  # makes `import name` raise ImportError

try:
    import lightning  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("blocking lightning did not work")

import torch
import lightning_gradguard.core as core
from lightning_gradguard.core import Action, GuardCore, ZScoreClip

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
guard = GuardCore(model, opt, clip=ZScoreClip(warmup_steps=2))
actions = []
for t in range(6):
    loss = model(torch.randn(8, 3)).pow(2).mean()
    loss.backward()
    if t == 4:
        model[2].weight.grad[0, 0] = float("nan")
    actions.append(guard.step(loss.detach()).action)
    opt.step()
    opt.zero_grad()
assert actions[4] is Action.SKIP, actions
assert all(a in (Action.NONE, Action.CLIP) for i, a in enumerate(actions) if i != 4), actions
assert guard.summary()["nonfinite_steps"] == 1
assert guard.first_diagnosis.origin == "2.weight"

import lightning_gradguard
assert lightning_gradguard.GuardCore is GuardCore

# nothing Lightning-related got imported behind our back
loaded = sorted(m for m in sys.modules
                if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")
                and sys.modules[m] is not None)
assert loaded == [], loaded
print("OK")
"""


def test_core_imports_and_runs_without_lightning() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.strip().endswith("OK")
