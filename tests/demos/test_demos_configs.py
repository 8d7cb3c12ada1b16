"""The documented explode / healthy scenarios behave as documented (seed 0, no guard)."""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

import pytest
import torch
from support.trainer import run_config

from lightning_gradguard.demos import (
    AddingProblemDataModule,
    AddingProblemRNN,
    DeepMLP,
    DemoConfig,
    RegressionDataModule,
    ResidualMLP,
)

MODELS = [DeepMLP, ResidualMLP, AddingProblemRNN]
IDS = ["mlp", "residual", "lstm"]


@pytest.mark.parametrize("model_cls", MODELS, ids=IDS)
def test_explode_config_goes_nonfinite_within_stated_steps(model_cls: Any) -> None:
    config = model_cls.explode_config()
    assert config.kind == "explode"
    recorder, _ = run_config(config, stop_on_nonfinite=True, limit_val_batches=0)
    assert recorder.first_nonfinite is not None, (
        f"no non-finite loss/grad in {config.max_steps} steps: {recorder.losses[-5:]}"
    )
    assert recorder.first_nonfinite <= config.max_steps
    # The run starts finite: the explosion is caused by training, not by the first forward pass.
    assert math.isfinite(recorder.losses[0])
    assert recorder.grads_finite[0]


def test_lstm_explode_config_is_the_cheap_main_demo() -> None:
    config = AddingProblemRNN.explode_config()
    assert config.max_steps < 200
    assert config.model_kwargs["cell"] == "lstm"
    assert config.model_kwargs["optimizer"] == "sgd"
    recorder, _ = run_config(config, stop_on_nonfinite=True, limit_val_batches=0)
    # Several finite steps with a growing loss before the blow-up, so a guard has time to act.
    assert recorder.first_nonfinite is not None
    assert recorder.first_nonfinite > 5
    finite = recorder.losses[: recorder.first_nonfinite - 1]
    assert max(finite) > 1e3 * finite[0]


def test_rnn_cell_with_lstm_explode_settings_also_explodes() -> None:
    config = AddingProblemRNN.explode_config()
    rnn_config = DemoConfig(
        "explode",
        AddingProblemRNN,
        {**config.model_kwargs, "cell": "rnn"},
        AddingProblemDataModule,
        config.datamodule_kwargs,
        config.max_steps,
    )
    recorder, _ = run_config(rnn_config, stop_on_nonfinite=True, limit_val_batches=0)
    assert recorder.first_nonfinite is not None
    assert recorder.first_nonfinite <= config.max_steps


@pytest.mark.parametrize("model_cls", MODELS, ids=IDS)
def test_healthy_config_trains_with_finite_decreasing_loss(model_cls: Any) -> None:
    config = model_cls.healthy_config()
    assert config.kind == "healthy"
    recorder, trainer = run_config(config)
    assert recorder.first_nonfinite is None
    assert len(recorder.losses) == config.max_steps
    assert all(recorder.grads_finite)
    first, last = recorder.losses[:10], recorder.losses[-10:]
    assert sum(last) < 0.6 * sum(first), (first, last)
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))


@pytest.mark.parametrize("model_cls", MODELS, ids=IDS)
def test_configs_differ_only_in_the_remedy(model_cls: Any) -> None:
    explode, healthy = model_cls.explode_config(), model_cls.healthy_config()
    assert explode.model_cls is healthy.model_cls is model_cls
    assert explode.datamodule_cls is healthy.datamodule_cls
    assert dict(explode.datamodule_kwargs) == dict(healthy.datamodule_kwargs)
    assert explode.seed == healthy.seed == 0
    changed = {
        k
        for k in {*explode.model_kwargs, *healthy.model_kwargs}
        if explode.model_kwargs.get(k) != healthy.model_kwargs.get(k)
    }
    assert 1 <= len(changed) <= 2
    assert explode.description
    assert healthy.description


def test_config_kwargs_are_read_only_and_build_is_seeded() -> None:
    config = DeepMLP.explode_config()
    assert isinstance(config.model_kwargs, MappingProxyType)
    with pytest.raises(TypeError):
        config.model_kwargs["lr"] = 1.0  # type: ignore[index]
    model_a, data_a = config.build()
    torch.manual_seed(123)
    model_b, _ = config.build()
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    assert isinstance(model_a, DeepMLP)
    assert isinstance(data_a, RegressionDataModule)
    torch.manual_seed(123)
    model_c, _ = config.build(seed=False)
    model_d, _ = config.build(seed=False)
    assert not torch.equal(next(model_c.parameters()), next(model_d.parameters()))


def test_config_builds_independent_copies() -> None:
    config = ResidualMLP.healthy_config()
    (m1, d1), (m2, d2) = config.build(), config.build()
    assert m1 is not m2
    assert d1 is not d2
    assert config == ResidualMLP.healthy_config()
