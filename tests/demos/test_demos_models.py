"""The demo LightningModules: shapes, hyperparameters, validation and non-finite tolerance."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from support.recorders import NonFiniteRecorder
from support.trainer import make_trainer
from torch import nn

from lightning_gradguard.demos import (
    ACTIVATIONS,
    INITS,
    OPTIMIZERS,
    TOO_LARGE_STD,
    AddingProblemDataModule,
    AddingProblemRNN,
    ClassificationDataModule,
    DeepMLP,
    RegressionDataModule,
    ResidualMLP,
    SteepLeakyReLU,
    build_optimizer,
    init_weights,
    make_activation,
)

FEED_FORWARD = [DeepMLP, ResidualMLP]


@pytest.mark.parametrize("cls", FEED_FORWARD)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_feed_forward_shapes(cls: Any, activation: str, batch_norm: bool) -> None:
    model = cls(
        in_features=5, depth=3, width=7, out_features=2, activation=activation,
        batch_norm=batch_norm,
    )  # fmt: skip
    assert tuple(model(torch.randn(4, 5)).shape) == (4, 2)


def test_deep_mlp_layer_count() -> None:
    model = DeepMLP(depth=5, batch_norm=True)
    kinds = [type(m) for m in model.net]
    assert kinds.count(nn.Linear) == 6  # 5 hidden + head
    assert kinds.count(nn.BatchNorm1d) == 5
    assert kinds.count(nn.ReLU) == 5


def test_residual_mlp_has_depth_blocks_with_skip_connections() -> None:
    model = ResidualMLP(depth=4, width=8)
    assert len(model.blocks) == 4
    block: Any = model.blocks[0]
    for p in block.branch.parameters():
        nn.init.zeros_(p)
    x = torch.randn(3, 8)
    torch.testing.assert_close(block(x), x)  # zero branch = identity


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_rnn_shapes(cell: Any, num_layers: int) -> None:
    model = AddingProblemRNN(cell=cell, hidden_size=6, num_layers=num_layers)
    assert isinstance(model.rnn, nn.LSTM if cell == "lstm" else nn.RNN)
    assert tuple(model(torch.rand(3, 9, 2)).shape) == (3, 1)


def test_hyperparameters_are_saved() -> None:
    model = DeepMLP(depth=3, activation="steep", init="xavier", optimizer="adam", lr=0.5)
    assert model.hparams["depth"] == 3
    assert model.hparams["activation"] == "steep"
    assert model.hparams["init"] == "xavier"
    assert model.hparams["optimizer"] == "adam"
    assert model.hparams["lr"] == 0.5
    assert AddingProblemRNN(cell="rnn").hparams["cell"] == "rnn"
    assert ResidualMLP(batch_norm=True).hparams["batch_norm"] is True


def test_optimizer_names() -> None:
    assert OPTIMIZERS == ("sgd", "sgd_momentum", "adam", "rmsprop")


@pytest.mark.parametrize(
    ("name", "cls", "options"),
    [
        ("sgd", torch.optim.SGD, {"momentum": 0}),
        ("sgd_momentum", torch.optim.SGD, {"momentum": 0.9}),
        ("adam", torch.optim.Adam, {}),
        ("rmsprop", torch.optim.RMSprop, {}),
    ],
)
def test_configure_optimizers_uses_the_shared_builder(
    name: str, cls: type[torch.optim.Optimizer], options: dict[str, float]
) -> None:
    for model in (
        DeepMLP(depth=1, optimizer=name, lr=0.3),  # type: ignore[arg-type]
        ResidualMLP(depth=1, optimizer=name, lr=0.3),  # type: ignore[arg-type]
        AddingProblemRNN(hidden_size=4, optimizer=name, lr=0.3),  # type: ignore[arg-type]
    ):
        optimizer = model.configure_optimizers()
        assert type(optimizer) is cls
        assert optimizer.defaults["lr"] == 0.3
        for key, value in options.items():
            assert optimizer.defaults[key] == value
        n_params = sum(len(g["params"]) for g in optimizer.param_groups)
        assert n_params == len(list(model.parameters()))


def test_build_optimizer_rejects_bad_args() -> None:
    params = list(nn.Linear(2, 1).parameters())
    with pytest.raises(ValueError, match=r"`optimizer` must be one of \('sgd', "):
        build_optimizer(params, "lbfgs", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`lr` must be a finite number > 0, got -1"):
        build_optimizer(params, "sgd", -1)


def test_init_schemes() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(256, 256)
    default_weight = layer.weight.clone()
    init_weights(layer, "default")
    assert torch.equal(layer.weight, default_weight)
    init_weights(layer, "he")
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    init_weights(layer, "xavier")
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    init_weights(layer, "too_large")
    assert layer.weight.std().item() == pytest.approx(TOO_LARGE_STD, rel=0.05)
    assert layer.bias is not None
    assert not layer.bias.any()


@pytest.mark.parametrize("init", INITS)
def test_init_applies_to_recurrent_weights(init: Any) -> None:
    torch.manual_seed(0)
    model = AddingProblemRNN(hidden_size=64, init=init)
    rnn: Any = model.rnn
    w_hh = rnn.weight_hh_l0
    if init == "too_large":
        assert w_hh.std().item() == pytest.approx(TOO_LARGE_STD, rel=0.05)
    if init != "default":
        assert not rnn.bias_hh_l0.any()


def test_steep_activation_has_derivative_two() -> None:
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    make_activation("steep")(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.tensor([0.2, 2.0]))
    assert isinstance(make_activation("steep"), SteepLeakyReLU)


@pytest.mark.parametrize(
    ("cls", "kwargs", "exc", "fragments"),
    [
        (DeepMLP, {"activation": "foo"}, ValueError,
         ["`activation`", "('relu', 'tanh', 'steep')", "got 'foo'"]),
        (ResidualMLP, {"activation": "sigmoid"}, ValueError, ["`activation`", "got 'sigmoid'"]),
        (DeepMLP, {"init": "orthogonal"}, ValueError,
         ["`init`", "('default', 'xavier', 'he', 'too_large')", "got 'orthogonal'"]),
        (AddingProblemRNN, {"init": None}, ValueError, ["`init`", "got None"]),
        (DeepMLP, {"optimizer": "lbfgs"}, ValueError,
         ["`optimizer`", "('sgd', 'sgd_momentum', 'adam', 'rmsprop')", "got 'lbfgs'"]),
        (DeepMLP, {"depth": 0}, ValueError, ["`depth`", ">= 1", "got 0"]),
        (ResidualMLP, {"depth": -2}, ValueError, ["`depth`", ">= 1", "got -2"]),
        (DeepMLP, {"depth": 2.0}, TypeError, ["`depth`", "int", "got 2.0 (float)"]),
        (DeepMLP, {"width": 0}, ValueError, ["`width`", ">= 1", "got 0"]),
        (DeepMLP, {"lr": 0.0}, ValueError, ["`lr`", "> 0", "got 0.0"]),
        (ResidualMLP, {"lr": -0.1}, ValueError, ["`lr`", "> 0", "got -0.1"]),
        (AddingProblemRNN, {"lr": float("nan")}, ValueError, ["`lr`", "finite", "got nan"]),
        (AddingProblemRNN, {"lr": "0.1"}, TypeError, ["`lr`", "got '0.1' (str)"]),
        (DeepMLP, {"task": "ranking"}, ValueError,
         ["`task`", "('regression', 'classification')", "got 'ranking'"]),
        (DeepMLP, {"task": "classification", "out_features": 1}, ValueError,
         ["`out_features`", ">= 2", "got 1"]),
        (DeepMLP, {"batch_norm": 1}, TypeError, ["`batch_norm`", "bool", "got int"]),
        (AddingProblemRNN, {"cell": "gru"}, ValueError,
         ["`cell`", "('lstm', 'rnn')", "got 'gru'"]),
        (AddingProblemRNN, {"hidden_size": 0}, ValueError, ["`hidden_size`", ">= 1", "got 0"]),
        (AddingProblemRNN, {"num_layers": 0}, ValueError, ["`num_layers`", ">= 1", "got 0"]),
    ],
)  # fmt: skip
def test_constructors_reject_bad_args(
    cls: Any, kwargs: dict[str, Any], exc: type[Exception], fragments: list[str]
) -> None:
    with pytest.raises(exc) as info:
        cls(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def _poison(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))


@pytest.mark.parametrize(
    "make",
    [
        lambda: (DeepMLP(in_features=4, depth=2, width=8, batch_norm=True),
                 RegressionDataModule(in_features=4, num_samples=64, batch_size=16)),
        lambda: (ResidualMLP(in_features=4, depth=2, width=8, task="classification",
                             out_features=3),
                 ClassificationDataModule(in_features=4, num_classes=3, num_samples=64,
                                          batch_size=16)),
        lambda: (AddingProblemRNN(hidden_size=4),
                 AddingProblemDataModule(seq_len=6, num_samples=64, batch_size=16)),
    ],
    ids=["mlp", "residual-classification", "lstm"],
)  # fmt: skip
def test_nonfinite_loss_is_logged_not_raised(make: Any) -> None:
    model, datamodule = make()
    _poison(model)
    recorder = NonFiniteRecorder()
    trainer = make_trainer(3, [recorder], limit_val_batches=1)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 3
    assert recorder.first_nonfinite == 1
    assert math.isnan(float(trainer.callback_metrics["train_loss"]))
    assert math.isnan(float(trainer.callback_metrics["val_loss"]))


def test_logged_metrics_regression_and_classification() -> None:
    torch.manual_seed(0)
    reg = DeepMLP(in_features=4, depth=2, width=8)
    trainer = make_trainer(4, [], limit_val_batches=2)
    trainer.fit(reg, datamodule=RegressionDataModule(in_features=4, num_samples=80, batch_size=16))
    assert {"train_loss", "val_loss", "val_mse", "val_mae"} <= set(trainer.callback_metrics)
    # val_mse (torchmetrics) and val_loss (batch-mean MSE) agree for equal-size batches.
    torch.testing.assert_close(
        trainer.callback_metrics["val_mse"], trainer.callback_metrics["val_loss"]
    )

    cls = ResidualMLP(in_features=4, depth=1, width=8, task="classification", out_features=3)
    data = ClassificationDataModule(in_features=4, num_classes=3, num_samples=80, batch_size=16)
    trainer = make_trainer(4, [], limit_val_batches=2)
    trainer.fit(cls, datamodule=data)
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    assert 0.0 <= float(trainer.callback_metrics["val_acc"]) <= 1.0
