"""The zoo benchmark (``benchmarks/zoo.py``): its draws, its split, every family and a smoke run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from gradbench import zoo
from gradbench.zoo_cli import main, plan


def test_draws_are_seeded_and_the_split_is_disjoint() -> None:
    assert zoo.draw(11) == zoo.draw(11)
    assert not set(zoo.TUNING_SEEDS) & set(zoo.VALIDATION_SEEDS)
    everything = zoo.recipes("all")
    assert len(everything) >= 60
    assert len({r.name for r in everything}) == len(everything)


def test_the_draws_cover_the_zoo() -> None:
    """Every family and optimizer occurs; the traits that break heuristics occur too."""
    rs = zoo.recipes("all")
    assert {r.family for r in rs} == set(zoo.FAMILIES)
    assert {r.optimizer for r in rs} == set(zoo.OPTIMIZERS)
    assert {r.schedule for r in rs} == set(zoo.SCHEDULES)
    assert any(r.zero_head and r.family != "linear" for r in rs)
    assert any(r.family == "linear" for r in rs)
    assert any(r.frozen for r in rs)
    assert any(r.tied for r in rs)
    assert any(r.weight_decay >= 0.1 for r in rs)
    assert {8, 256} <= {r.batch for r in rs}


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_every_family_builds_and_trains_one_step(family: str) -> None:
    pytest.importorskip("transformers")
    recipe = zoo.Recipe(seed=0, family=family, optimizer="adamw", schedule="constant",
                        batch=8, steps=2, zero_head=family == "linear")
    torch.manual_seed(0)
    model, dm = zoo.ZooWorkload(recipe).build(1e-3, 0)
    opt = model.configure_optimizers()
    before = model.evaluate(dm.data.val)
    loss = model.loss(dm.data.train[0])
    loss.backward()
    opt.step()
    assert math.isfinite(before)
    assert math.isfinite(float(loss))
    assert model.evaluate(dm.data.val) != before  # the step moved the model


def test_a_zero_head_starts_at_zero_and_frozen_parameters_get_no_gradient() -> None:
    recipe = zoo.Recipe(seed=0, family="mlp", optimizer="sgd", schedule="constant", batch=8,
                        zero_head=True, frozen=True)
    net = zoo.build_net(recipe)
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert float(head.weight.abs().sum()) == 0.0
    params = list(net.parameters())
    assert not any(p.requires_grad for p in params[: len(params) // 2])


def test_the_plan_runs_peers_only_at_too_high_lrs_and_faults_only_with_the_guard() -> None:
    rs = [zoo.draw(5, 20)]
    jobs = plan(rs, {5: 1e-3}, "gradguard", ("none", "clip1"), 10)
    healthy = {j.method for j in jobs if j.lr == 1e-3}
    assert {"none", "gradguard"} <= healthy
    assert "clip1" not in healthy
    assert {j.lr for j in jobs if j.method == "clip1"} == {0.01, 0.03}
    assert sum("+" in j.method for j in jobs) == 3


def test_quick_run_reports_every_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    for needle in ("healthy: GradGuard <= 1.005x", "no LR backoff", "0 GradGuard divergences",
                   "best average rank", "isolated faults", "## Misses"):
        assert needle in out
