"""Existing-project cases: torch.compile, DeepSpeed, a user's ``configure_gradient_clipping``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from support.modules import TinyModule
from support.state import all_finite, params_of
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.testing import Fault, FaultInjector


class DeepSpeedStrategy(SingleDeviceStrategy):
    """Stands in for Lightning's DeepSpeedStrategy (not installable here): detection is by name."""


def test_deepspeed_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match=r"does not support DeepSpeed.*gradient_clipping"):
        fit(TinyModule(), 3, [GradGuard()], strategy=DeepSpeedStrategy(device=torch.device("cpu")))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_model_same_as_eager(backend: str) -> None:
    """A compiled module: the guard skips the faulty step and the run equals the eager one."""
    faults = [Fault(3), Fault(6, kind="inf")]
    eager = TinyModule(lr=0.1)
    g_eager = GradGuard()
    fit(eager, 10, [FaultInjector(faults), g_eager])

    module = TinyModule(lr=0.1)
    module.net = torch.compile(module.net, backend=backend)  # type: ignore[assignment]
    guard = GradGuard()
    fit(module, 10, [FaultInjector(faults), guard])
    assert guard.summary()["skipped_steps"] == g_eager.summary()["skipped_steps"] == 2
    assert all_finite(module)
    for a, b in zip(params_of(module), params_of(eager), strict=True):
        torch.testing.assert_close(a, b)


class OwnClipping(TinyModule):
    """A user module with its own clipping, recording what it saw."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: dict[int, float | None] = {}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.seen[self.global_step] = (
            float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            if grads else None)
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1e9)


def test_configure_gradient_clipping_override_runs_after_guard() -> None:
    module = OwnClipping(lr=0.1)
    guard = GradGuard()
    with pytest.warns(UserWarning, match="overrides `configure_gradient_clipping`"):
        fit(module, 8, [FaultInjector([Fault(5)]), guard])
    assert sorted(module.seen) == list(range(8))  # still called on every step
    assert module.seen[5] is None  # the skipped step: no gradients left to clip
    clip_norms = {k: v for k, v in module.seen.items() if k != 5}
    assert all(v is not None and v == v for v in clip_norms.values())
    assert guard.summary()["skipped_steps"] == 1
    assert all_finite(module)


def test_no_clipping_warning_without_override(recwarn: pytest.WarningsRecorder) -> None:
    fit(TinyModule(), 3, [GradGuard()])
    assert not [w for w in recwarn.list if "configure_gradient_clipping" in str(w.message)]
