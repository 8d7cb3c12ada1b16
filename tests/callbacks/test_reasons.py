"""Every LR backoff and halt carries its reason: the notice, the TensorBoard events text and
``summary()["reasons"]`` are built from it; windows count each optimizer's own steps."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from support.modules import TwoNetManual
from support.trainer import fit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.core import NoClip

N = 100


class CappedSGD(pl.LightningModule):
    """One weight vector of 100 ones, SGD lr 1, the gradient set by the batch: norm 0.25 at
    the first step, then 1.5 — six times larger (which arms the update cap) and 1.5x over
    the cap ``0.1 * ||w|| / lr`` of about 1. No norm spikes (``NoClip``): every counted step
    is a capped update."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(N))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (g,) = batch
        return (self.w * g[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader[Any]:
        norms = torch.tensor([0.25] + [1.5] * 7)
        grads = norms[:, None].expand(-1, N) / math.sqrt(N)
        return DataLoader(TensorDataset(grads.contiguous()), batch_size=1)


def _guard_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lightning_gradguard"]


def test_a_backoff_by_capped_updates_is_announced_as_such(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Not "3 spikes within 50 steps": there was no spike; the notice, the events text and
    the summary give the reason the decision fired on."""
    guard = GradGuard(clip=NoClip(), diagnose=False)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with caplog.at_level(logging.INFO, logger="lightning_gradguard"):
        fit(CappedSGD(), 4, [guard], logger=logger, log_every_n_steps=1)
    s = guard.summary()
    assert (s["spikes"], s["lr_backoffs"]) == (0, 1)
    assert s["reasons"] == {"update_capped": 1}
    notices = [line for line in _guard_lines(caplog) if "LR backoff #" in line]
    assert notices == [
        "GradGuard: step 3: LR backoff #1 (3 spikes or capped updates within 50 steps, this "
        "update over the update cap (the LR times the gradient would move the weights by "
        "more than max_update_ratio=0.1 of their norm)): LR now x0.5 of the schedule"]
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {e.step: tensor_util.make_ndarray(e.tensor_proto).reshape(-1)[0].decode()
             for e in acc.Tensors("gradguard/events/text_summary")}
    assert texts == {3: "**LR backoff #1** (step 3): 3 spikes or capped updates within 50 "
                        "steps, this update over the update cap (the LR times the gradient "
                        "would move the weights by more than max_update_ratio=0.1 of their "
                        "norm); LR now x0.5 of the schedule"}


class NaNDiscriminator(TwoNetManual):
    """The GAN-like module, its second optimizer's loss NaN at two of its own steps."""

    def __init__(self, nan_at: tuple[int, ...], with_generator: bool = True) -> None:
        super().__init__()
        self.nan_at, self.with_generator = nan_at, with_generator
        self.disc_steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt1, opt2 = self.optimizers()  # type: ignore[misc]
        if self.with_generator:
            loss1 = torch.nn.functional.mse_loss(self.gen(x), y)
            opt1.zero_grad()
            self.manual_backward(loss1)
            opt1.step()
        loss2 = torch.nn.functional.mse_loss(self.disc(x), -y)
        if self.disc_steps in self.nan_at:
            loss2 = loss2 * math.nan
        opt2.zero_grad()
        self.manual_backward(loss2)
        opt2.step()
        self.disc_steps += 1


@pytest.mark.parametrize("with_generator", [False, True])
def test_two_nan_steps_of_one_optimizer_are_judged_in_its_own_steps(
        with_generator: bool) -> None:
    """Two NaN steps 30 of the discriminator's steps apart are a repeat (nonfinite_window
    50) whether or not a generator steps in between: with it, Lightning's global_step runs
    twice as fast, and the discriminator's windows must not shrink to 25 of its steps."""
    guard = GradGuard(diagnose=False)
    module = NaNDiscriminator(nan_at=(5, 35), with_generator=with_generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(module, 80 if with_generator else 40, [guard])
    disc = guard.cores[1]
    assert module.disc_steps == 40
    assert disc.counters.nonfinite_steps == 2
    assert disc.counters.lr_backoffs == 1
    assert disc.counters.reasons == {"nonfinite_repeat": 1}
    if with_generator:
        gen = guard.cores[0]
        assert (gen.counters.steps, gen.counters.lr_backoffs) == (40, 0)
        assert gen.backoff.scale == 1.0
