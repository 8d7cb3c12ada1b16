"""Evidence and structure helpers of the diagnosis engine."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard.core.evidence import (
    batch_nonfinite,
    fit_growth,
    loss_trend,
    schedule_position,
    update_ratio,
)
from lightning_gradguard.core.structure import ForwardProbe, activation_gain, inspect_model

from ._diagnosis_cases import ScaledTanh, Seq, Steep, cnn


def test_fit_growth_is_a_fit_not_first_over_last() -> None:
    assert fit_growth([1, 3, 9, 27]) == pytest.approx(3.0)
    # one odd last layer does not decide it (first/last would say x100 per layer)
    assert fit_growth([1.0, 1.1, 0.9, 1.0, 1e6]) < 20
    assert fit_growth([1.0, 0.0, 2.0, math.inf, 4.0]) == pytest.approx(2.0 ** (4 / 4), rel=0.5)
    assert fit_growth([1.0, 2.0]) is None


def test_loss_trend_kinds() -> None:
    assert loss_trend([]).kind == "flat"
    jump = loss_trend([0.5, 0.4, 0.45, 6.0])
    assert (jump.kind, jump.factor, jump.before) == ("jump", pytest.approx(6.0 / 0.45), 0.45)
    rise = loss_trend([1.0, 0.9, 1.2, 2.0, 5.0, math.inf])
    assert (rise.kind, rise.steps, rise.before) == ("rise", 4, 0.9)
    assert loss_trend([1.0, 1.1, 1.05, 1.2]).kind == "flat"


def test_update_ratio() -> None:
    assert update_ratio(0.1, 10.0, 4.0) == pytest.approx(0.25)
    assert update_ratio(0.01, 1e9, 1.0, adaptive=True, numel=100) == pytest.approx(0.1)
    # zero weights: no ratio (never an infinite one)
    assert math.isnan(update_ratio(0.1, 1.0, 0.0))
    assert math.isnan(update_ratio(0.0, 1.0, 0.0))


def test_schedule_position() -> None:
    assert schedule_position([0.1] * 5) is None
    assert schedule_position([0.1, 0.05, 0.02]) is None  # decaying: not at a peak
    assert schedule_position([0.01, 0.1, 0.09, 0.08]) is not None
    assert schedule_position([0.01, 0.02]) == "the LR reached its peak 0.02 0 step(s) ago, " \
        "at the end of a warmup from 0.01"


def test_batch_nonfinite_walks_nested_batches() -> None:
    x = torch.ones(2, 3)
    x[0, 1] = math.nan
    batch = {"inputs": (torch.ones(4), x), "label": torch.tensor([1, 2]),
             "mask": torch.tensor([math.inf])}
    assert batch_nonfinite(batch) == [("batch['inputs'][1]", 1, 6), ("batch['mask']", 1, 1)]
    assert batch_nonfinite("text") == []


def test_activation_gains() -> None:
    relu = activation_gain(nn.ReLU())
    assert relu is not None
    assert relu[0] == pytest.approx(math.sqrt(0.5), abs=0.01)
    steep = activation_gain(Steep())
    assert steep is not None
    assert steep[1] == pytest.approx(2.0)
    assert steep[0] == pytest.approx(math.sqrt(0.5 * 4 + 0.5 * 0.04), abs=0.02)
    stanh = activation_gain(ScaledTanh())
    assert stanh is not None
    assert stanh[1] == pytest.approx(3.0, abs=0.01)
    assert activation_gain(nn.Dropout()) is None
    assert activation_gain(nn.Linear(2, 2)) is None


def test_inspect_model_finds_norms_layers_and_recurrent_sigma() -> None:
    torch.manual_seed(0)
    s = inspect_model(cnn(depth=2, bn=True))
    assert len(s.norm_layers) == 2
    conv = s.layers[1]
    assert (conv.kind, conv.fan_in, conv.fan_out) == ("Conv2d", 72, 72)
    assert conv.init_ratio == pytest.approx(1.0, abs=0.2)  # He init
    rnn = inspect_model(Seq("rnn", hh_scale=3.0))
    assert rnn.recurrent[0].sigma_max == pytest.approx(3.0, rel=1e-4)
    assert rnn.recurrent[0].nonlinearity == "tanh"
    lstm = inspect_model(Seq("lstm", hh_scale=2.0))
    assert lstm.recurrent[0].sigma_max == pytest.approx(2.0, rel=1e-4)
    assert inspect_model(Seq("gru")).recurrent[0].sigma_max < 1.5  # PyTorch default init


def test_probe_projection_shortcut_and_post_activation() -> None:
    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Linear(4, 4)
            self.short = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.short(x) + self.f(torch.relu(self.f(x))))

    class NotResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gated = self.a(x) * torch.sigmoid(self.b(x))  # not an add
            deep = self.b(self.a(x).tanh().sin().cos()).exp()  # input 5 nodes away
            return gated + deep

    net = nn.Sequential(nn.Linear(4, 4), Proj(), NotResidual())
    probe = ForwardProbe(net)
    net(torch.randn(3, 4))
    assert probe.residual == ("1",)
    assert probe.done
    assert probe.batch_size == 3
    # 0, 1.short, 1.f twice, 2.a, 2.b, 2.a, 2.b: every call, in execution order
    assert len(probe.out_rms) == 8


def test_probe_waits_for_a_forward_with_autograd() -> None:
    from ._diagnosis_cases import Block

    net = nn.Sequential(Block("relu", False), nn.Linear(32, 1))
    probe = ForwardProbe(net)
    with torch.no_grad():
        net(torch.randn(2, 32))  # a validation sanity check: no graph to read
    assert not probe.done
    with torch.inference_mode():
        net(torch.randn(2, 32))
    assert not probe.done
    net(torch.randn(2, 32))
    assert probe.done
    assert probe.residual == ("0",)
