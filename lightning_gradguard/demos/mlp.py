"""A deep plain (non-residual) MLP: the textbook setting for exploding gradients."""

from __future__ import annotations

from torch import Tensor, nn

from ..core._validation import check_int
from ._base import DemoModule, Task
from ._config import DemoConfig
from ._data import RegressionDataModule
from ._layers import ActivationName, InitName, init_weights, make_activation
from ._optim import OptimizerName

__all__ = ["DeepMLP"]


class DeepMLP(DemoModule):
    """A stack of ``depth`` hidden ``Linear -> [BatchNorm1d] -> activation`` layers plus a head.

    Without skip connections the backward pass multiplies ``depth`` Jacobians, so a per-layer gain
    above one (weights too large, a steep activation) grows gradients exponentially with depth,
    and a learning rate too high for the resulting curvature makes SGD diverge.

    Demo scenarios (``lightning.seed_everything(0)``, see :meth:`explode_config` and
    :meth:`healthy_config`):

    * **explodes**: He init and plain SGD with ``lr=0.1`` on :class:`RegressionDataModule`:
      the learning rate is too high for this depth, the loss and gradient norm grow by orders
      of magnitude per step and are non-finite within 20 optimizer steps (step 4 when
      measured; 4-5 for seeds 0-4).
    * **healthy**: the same model, optimizer and learning rate with ``batch_norm=True``: the
      loss stays finite and falls from about 3 to about 0.26 in 150 steps.

    Args:
        in_features: Input dimension.
        depth: Number of hidden layers, ``>= 1``.
        width: Units per hidden layer.
        out_features: Output dimension (the number of classes for classification).
        activation: ``"relu"``, ``"tanh"`` or ``"steep"`` (``2 * leaky_relu(x, 0.1)``, see
            :class:`SteepLeakyReLU`: derivative 2, so gradients grow with depth).
        init: ``"default"`` (PyTorch), ``"xavier"``, ``"he"`` or ``"too_large"`` (std 1.0).
        batch_norm: Insert ``BatchNorm1d`` before every hidden activation.
        optimizer: ``"sgd"``, ``"sgd_momentum"``, ``"adam"`` or ``"rmsprop"``.
        lr: Learning rate, ``> 0``.
        task: ``"regression"`` (MSE) or ``"classification"`` (cross-entropy).

    Example:
        >>> import torch
        >>> model = DeepMLP(in_features=4, depth=3, width=8, activation="tanh", init="xavier")
        >>> model(torch.randn(5, 4)).shape
        torch.Size([5, 1])
        >>> DeepMLP(activation="sigmoid")
        Traceback (most recent call last):
            ...
        ValueError: `activation` must be one of ('relu', 'tanh', 'steep'), got 'sigmoid'
    """

    def __init__(
        self,
        in_features: int = 32,
        depth: int = 8,
        width: int = 64,
        out_features: int = 1,
        activation: ActivationName = "relu",
        init: InitName = "default",
        batch_norm: bool = False,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.01,
        task: Task = "regression",
    ) -> None:
        super().__init__(task=task, out_features=out_features, optimizer=optimizer, lr=lr)
        in_features = check_int("in_features", in_features, low=1)
        depth = check_int("depth", depth, low=1)
        width = check_int("width", width, low=1)
        make_activation(activation)  # validates the name before anything is built
        if not isinstance(batch_norm, bool):
            raise TypeError(f"`batch_norm` must be a bool, got {type(batch_norm).__name__}")
        self.save_hyperparameters()

        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(in_features if i == 0 else width, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(make_activation(activation))
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)
        init_weights(self.net, init)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_features)`` inputs to ``(batch, out_features)`` outputs."""
        out: Tensor = self.net(x)
        return out

    @classmethod
    def explode_config(cls) -> DemoConfig[DeepMLP, RegressionDataModule]:
        """He init + plain SGD at ``lr=0.1``: non-finite within 20 steps (seed 0, no guard)."""
        return DemoConfig(
            kind="explode",
            model_cls=cls,
            model_kwargs={"init": "he", "optimizer": "sgd", "lr": 0.1},
            datamodule_cls=RegressionDataModule,
            datamodule_kwargs={"num_samples": 2048, "batch_size": 64},
            max_steps=20,
            description="lr=0.1 is too high for an 8-layer plain MLP: each SGD step overshoots "
            "further and the loss reaches inf/nan after a few steps",
        )

    @classmethod
    def healthy_config(cls) -> DemoConfig[DeepMLP, RegressionDataModule]:
        """Same as :meth:`explode_config` plus BatchNorm: finite, decreasing loss for 150 steps."""
        return DemoConfig(
            kind="healthy",
            model_cls=cls,
            model_kwargs={"init": "he", "batch_norm": True, "optimizer": "sgd", "lr": 0.1},
            datamodule_cls=RegressionDataModule,
            datamodule_kwargs={"num_samples": 2048, "batch_size": 64},
            max_steps=150,
            description="BatchNorm re-normalises every layer, so the same lr no longer diverges",
        )
