"""An LSTM / plain RNN regressor for the adding problem."""

from __future__ import annotations

from typing import Final, Literal

from torch import Tensor, nn

from ..core._validation import check_choice, check_int
from ._base import DemoModule
from ._config import DemoConfig
from ._data import AddingProblemDataModule
from ._layers import InitName, init_weights
from ._optim import OptimizerName

__all__ = ["CELLS", "AddingProblemRNN", "CellName"]

CellName = Literal["lstm", "rnn"]
"""Recurrent cell types accepted by :class:`AddingProblemRNN`."""

CELLS: Final[tuple[CellName, ...]] = ("lstm", "rnn")
"""All values of :data:`CellName`."""


class AddingProblemRNN(DemoModule):
    """A recurrent network reading ``(value, marker)`` sequences, predicting from the last state.

    ``nn.LSTM`` or ``nn.RNN`` (tanh) with ``batch_first=True`` followed by a linear head on the
    final hidden state; trained with MSE on :class:`AddingProblemDataModule`. Back-propagation
    through time multiplies one recurrent Jacobian per time step, and with SGD at a high learning
    rate the gradient norm spikes until the weights (and then the loss) become non-finite.

    Demo scenarios (``lightning.seed_everything(0)``, see :meth:`explode_config` and
    :meth:`healthy_config`):

    * **explodes**: LSTM (hidden size 32), default init, plain SGD with ``lr=1.0`` on
      ``seq_len=20``: after a few finite steps the gradient norm grows by roughly an order of
      magnitude per step (about 2 -> 40 -> 1e18) and the loss is non-finite within 60
      optimizer steps (step 19 when measured; 19-29 for seeds 0-4).
    * **healthy**: the same LSTM and data with Adam, ``lr=0.01``: the loss stays finite and
      drops from about 0.45 to the predict-the-mean plateau (MSE 1/6); with seed 0 it then
      learns the task (validation MSE about 0.02 after 300 steps).

    Args:
        cell: ``"lstm"`` or ``"rnn"`` (Elman RNN with tanh).
        hidden_size: Hidden units per layer.
        num_layers: Number of stacked recurrent layers, ``>= 1``.
        init: ``"default"`` (PyTorch), ``"xavier"``, ``"he"`` or ``"too_large"`` (std 1.0),
            applied to the recurrent and head weight matrices (biases zeroed).
        optimizer: ``"sgd"``, ``"sgd_momentum"``, ``"adam"`` or ``"rmsprop"``.
        lr: Learning rate, ``> 0``.
        input_size: Features per time step (2 for the adding problem).

    Example:
        >>> import torch
        >>> model = AddingProblemRNN(cell="rnn", hidden_size=8)
        >>> model(torch.rand(4, 20, 2)).shape
        torch.Size([4, 1])
        >>> AddingProblemRNN(cell="gru")
        Traceback (most recent call last):
            ...
        ValueError: `cell` must be one of ('lstm', 'rnn'), got 'gru'
    """

    def __init__(
        self,
        cell: CellName = "lstm",
        hidden_size: int = 32,
        num_layers: int = 1,
        init: InitName = "default",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.01,
        input_size: int = 2,
    ) -> None:
        super().__init__(task="regression", out_features=1, optimizer=optimizer, lr=lr)
        cell = check_choice("cell", cell, CELLS)
        hidden_size = check_int("hidden_size", hidden_size, low=1)
        num_layers = check_int("num_layers", num_layers, low=1)
        input_size = check_int("input_size", input_size, low=1)
        self.save_hyperparameters()

        rnn_cls = nn.LSTM if cell == "lstm" else nn.RNN
        self.rnn: nn.RNNBase = rnn_cls(input_size, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, seq_len, input_size)`` sequences to ``(batch, 1)`` predictions."""
        states, _ = self.rnn(x)
        out: Tensor = self.head(states[:, -1])
        return out

    @classmethod
    def explode_config(cls) -> DemoConfig[AddingProblemRNN, AddingProblemDataModule]:
        """LSTM + plain SGD at ``lr=1.0``: non-finite within 60 steps (seed 0, no guard)."""
        return DemoConfig(
            kind="explode",
            model_cls=cls,
            model_kwargs={"cell": "lstm", "hidden_size": 32, "optimizer": "sgd", "lr": 1.0},
            datamodule_cls=AddingProblemDataModule,
            datamodule_kwargs={"seq_len": 20, "num_samples": 4096, "batch_size": 64},
            max_steps=60,
            description="lr=1.0 is too high for SGD on this LSTM: updates overshoot, the "
            "gradient norm grows ~10x per step and the weights reach inf/nan",
        )

    @classmethod
    def healthy_config(cls) -> DemoConfig[AddingProblemRNN, AddingProblemDataModule]:
        """Same LSTM and data with Adam at ``lr=0.01``: finite, decreasing loss for 300 steps."""
        return DemoConfig(
            kind="healthy",
            model_cls=cls,
            model_kwargs={"cell": "lstm", "hidden_size": 32, "optimizer": "adam", "lr": 0.01},
            datamodule_cls=AddingProblemDataModule,
            datamodule_kwargs={"seq_len": 20, "num_samples": 4096, "batch_size": 64},
            max_steps=300,
            description="Adam's per-parameter step size stays bounded whatever the gradient scale",
        )
