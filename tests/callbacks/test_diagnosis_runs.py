"""The GradGuard callback's diagnosis on real fits: every micro-batch and every batch
type read for NaN/Inf, a non-finite step with a sparse or nested batch skipped without a crash,
the end-of-fit line naming a cause only when the run needed help, compiled modules."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from support.trainer import make_trainer
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_gradguard import GradGuard
from lightning_gradguard.core import FixedNormClip


@dataclasses.dataclass
class Batch:
    x: Tensor
    y: Tensor
    extra: Any = None


def _batches(n: int, nan_at: int | None = None, extra: Any = None) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(8, 4, generator=g)
        if i == nan_at:
            x[2, 1] = math.nan
        out.append(Batch(x, torch.randn(8, 1, generator=g), extra))
    return out


class Regression(pl.LightningModule):
    """A plain regression whose batches are whatever the loader yields."""

    def __init__(self, batches: list[Batch], compile_net: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net: torch.nn.Module = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        if compile_net:
            self.net = torch.compile(self.net, backend="aot_eager")  # type: ignore[assignment]
        self._batches = batches

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return torch.nn.functional.mse_loss(self.net(batch.x), batch.y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        # each item is a whole batch, yielded as it is (no collation)
        return DataLoader(self._batches, batch_size=None, collate_fn=_as_is)  # type: ignore[arg-type]


def _as_is(batch: Any) -> Any:
    return batch


def _fit(module: pl.LightningModule, steps: int, guard: GradGuard, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(steps, [guard], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return trainer


@pytest.mark.parametrize("micro", [0, 1, 2])
def test_a_nan_in_any_micro_batch_is_the_data(micro: int) -> None:
    """Accumulating 3 micro-batches per step: a NaN in the first or the middle one is as much the
    data as one in the last (it was reported as loss_nonfinite, 'and the batch is finite')."""
    guard = GradGuard()
    _fit(Regression(_batches(12, nan_at=6 + micro)), 4, guard, accumulate_grad_batches=3)
    s = guard.summary()
    assert s["skipped_steps"] == 1
    first = s["diagnosis"][0]
    assert first["cause"] == "data_nonfinite"
    assert f"micro-batch {micro + 1}/3: batch.x holds 1 NaN/Inf of 32 values" in first["evidence"]


@pytest.mark.parametrize("extra", ["sparse_coo", "sparse_csr", "nested"])
def test_a_nonfinite_step_with_a_sparse_or_nested_batch_is_skipped(extra: str) -> None:
    def holder() -> Tensor:
        dense = torch.eye(3)
        if extra == "sparse_coo":
            return dense.to_sparse()
        if extra == "sparse_csr":
            return dense.to_sparse_csr()
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)

    batches = _batches(6, nan_at=3)
    for b in batches:
        b.extra = holder()
    guard = GradGuard()
    _fit(Regression(batches), 6, guard)
    s = guard.summary()
    assert s["skipped_steps"] == 1
    assert s["diagnosis"][0]["cause"] == "data_nonfinite"


def test_the_end_of_fit_line_names_no_cause_for_a_run_that_needed_no_help(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every step is clipped (a tiny fixed threshold) and nothing else happens."""
    guard = GradGuard(clip=FixedNormClip(1e-3))
    with caplog.at_level(logging.INFO, logger="lightning_gradguard"):
        _fit(Regression(_batches(8)), 8, guard)
    lines = [r.getMessage() for r in caplog.records if "steps," in r.getMessage()]
    assert lines
    assert lines[-1].startswith("GradGuard: 8 steps, 8 clipped, 0 skipped")
    assert "likely cause" not in lines[-1]
    assert guard.summary()["diagnosis"] == []


@pytest.mark.parametrize("how", ["compiled submodule", "compiled LightningModule"])
def test_compiled_modules_work_under_the_guard(how: str) -> None:
    module = Regression(_batches(6), compile_net=how == "compiled submodule")
    guard = GradGuard()
    target: Any = module if how == "compiled submodule" else torch.compile(
        module, backend="aot_eager")
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(4, [guard])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(target)
    s = guard.summary()
    assert s["steps"] == 4
    assert s["nonfinite_steps"] == 0
    assert all(not m._forward_hooks for m in module.modules())
    doc = guard.cores[0].diagnostician
    assert doc is not None
    # what a compiled forward computes cannot be read: unknown (no structural cause), never
    # "no skip connection, no normalisation"
    assert doc.structure.residual is None
    assert doc.structure.probed_norms is None


class _Recording(Regression):
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.last_loss = float(loss.detach())
        return loss


def test_the_loss_under_a_gradscaler_is_the_users_not_the_scaled_one() -> None:
    """Lightning hands ``on_before_backward`` the loss times the loss scale (65536 at first):
    the guard's reports and the diagnosis' loss history must hold the loss itself."""
    from lightning.pytorch.plugins import MixedPrecision

    module = _Recording(_batches(4))
    guard = GradGuard()
    _fit(module, 3, guard, plugins=[MixedPrecision("16-mixed", "cpu",
                                                   scaler=torch.amp.GradScaler("cpu"))])
    report = guard.last_reports[0]
    assert report.loss is not None
    assert report.loss == pytest.approx(module.last_loss, rel=1e-3)
    doc = guard.cores[0].diagnostician
    assert doc is not None
    assert max(doc.losses) < 100  # 65536x the loss before
