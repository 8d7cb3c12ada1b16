"""Models and synthetic data that make gradients explode on purpose, and the classic remedies.

Importable like :mod:`lightning.pytorch.demos`. Every model is a plain
:class:`~lightning.pytorch.LightningModule` (no fault injection, no guard) that logs
``train_loss`` and ``val_loss``; ``explode_config()`` / ``healthy_config()`` return a
:class:`DemoConfig` with the model and datamodule kwargs of a verified scenario.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_gradguard.demos import AddingProblemRNN
    >>> model, datamodule = AddingProblemRNN.healthy_config().build()
    >>> trainer = pl.Trainer(
    ...     accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1,
    ...     logger=False, enable_checkpointing=False, enable_progress_bar=False,
    ...     enable_model_summary=False,
    ... )
    >>> trainer.fit(model, datamodule=datamodule)
    >>> sorted(trainer.callback_metrics)
    ['train_loss', 'val_loss', 'val_mae', 'val_mse']
"""

from ._base import TASKS, DemoModule, Task
from ._config import DemoConfig, DemoKind
from ._data import AddingProblemDataModule, ClassificationDataModule, RegressionDataModule
from ._layers import (
    ACTIVATIONS,
    INITS,
    TOO_LARGE_STD,
    ActivationName,
    InitName,
    SteepLeakyReLU,
    init_weights,
    make_activation,
)
from ._optim import OPTIMIZERS, OptimizerName, build_optimizer
from .mlp import DeepMLP
from .recurrent import CELLS, AddingProblemRNN, CellName
from .residual import ResidualBlock, ResidualMLP

__all__ = [
    "ACTIVATIONS",
    "CELLS",
    "INITS",
    "OPTIMIZERS",
    "TASKS",
    "TOO_LARGE_STD",
    "ActivationName",
    "AddingProblemDataModule",
    "AddingProblemRNN",
    "CellName",
    "ClassificationDataModule",
    "DeepMLP",
    "DemoConfig",
    "DemoKind",
    "DemoModule",
    "InitName",
    "OptimizerName",
    "RegressionDataModule",
    "ResidualBlock",
    "ResidualMLP",
    "SteepLeakyReLU",
    "Task",
    "build_optimizer",
    "init_weights",
    "make_activation",
]
