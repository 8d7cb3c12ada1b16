"""The diagnosis on the demos' explode/healthy configurations (models we did not tune it on).

The demo modules are used as plain ``nn.Module`` s in a plain loop (no Trainer).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lightning_gradguard.core._host import host_reads, reset_host_reads
from lightning_gradguard.core.diagnosis import Cause, Diagnostician

pytest.importorskip("lightning")
from lightning_gradguard.demos import AddingProblemRNN, DeepMLP, ResidualMLP

from ._diagnosis_cases import feed


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(cfg: Any, max_steps: int) -> tuple[str, list[Cause], list[Cause]]:
    model, dm = cfg.build()
    dm.setup("fit")
    opt = model.configure_optimizers()
    doc = Diagnostician(model, opt)
    doc.watch_forward()
    batches = (b for _, b in zip(range(max_steps), dm.train_dataloader(), strict=False))
    fed = feed(doc, model, opt, batches, model.compute_loss)
    return fed.event, fed.pre, doc.diagnose(fed.event, fed.norms, fed.loss)  # type: ignore[arg-type]


@pytest.mark.parametrize(("cls", "first", "also"), [
    # its healthy twin adds BatchNorm, but at step 0 the plain net shows no growth through
    # its depth: a structural cause needs that evidence, the explosion alone is not enough
    (DeepMLP, "lr_too_high", None),
    (ResidualMLP, "no_normalization", "lr_too_high"),  # its healthy twin adds BatchNorm
    (AddingProblemRNN, "lr_too_high", None),           # its healthy twin uses Adam
])
def test_demo_explode_configs(cls: Any, first: str, also: str | None) -> None:
    event, _, causes = _run(cls.explode_config(), 60)
    assert event in ("spike", "nonfinite")
    assert causes[0].cause == first
    if also:
        assert also in [c.cause for c in causes]
    if first == "lr_too_high":
        assert causes[0].remedy.startswith("lower the LR to ~")
        assert "torch.optim.Adam" in causes[0].remedy  # plain SGD in these demos


@pytest.mark.parametrize("cls", [DeepMLP, ResidualMLP, AddingProblemRNN])
def test_demo_healthy_configs(cls: Any) -> None:
    event, pre, causes = _run(cls.healthy_config(), 25)
    assert (event, pre, causes) == ("on_demand", [], [])


def test_batch_is_read_only_on_a_nonfinite_step() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    doc = Diagnostician(model, torch.optim.SGD(model.parameters(), lr=0.01))
    bad = (torch.tensor([[math.nan, 1.0, 2.0]]), torch.zeros(1, 1))
    for step in range(4):
        doc.observe(step, loss=1.0, grad_norm=1.0)
    doc.diagnose("on_demand", {})
    reset_host_reads()
    causes = doc.diagnose("spike", {}, 1.0, batch=bad)
    assert host_reads() == 0  # step-0 evidence already gathered; the batch is not read
    assert "data_nonfinite" not in [c.cause for c in causes]
    assert doc.diagnose("nonfinite", {}, math.nan, batch=bad)[0].cause == "data_nonfinite"
