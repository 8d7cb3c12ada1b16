"""Training/validation logic shared by all demo models."""

from __future__ import annotations

from typing import Final, Literal

from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ..core._validation import check_choice, check_int, check_number
from ._optim import OPTIMIZERS, OptimizerName, build_optimizer

__all__ = ["TASKS", "DemoModule", "Task"]

Task = Literal["regression", "classification"]
"""``"regression"``: MSE loss on float targets; ``"classification"``: cross-entropy on labels."""

TASKS: Final[tuple[Task, ...]] = ("regression", "classification")
"""All values of :data:`Task`."""


class DemoModule(LightningModule):
    """Base class of the demo models: loss, logging, validation metrics and optimizer.

    Subclasses define ``forward``, call ``super().__init__`` and then
    ``self.save_hyperparameters()``. Nothing here guards against exploding gradients: a
    non-finite loss is logged and back-propagated like any other, so the demos show what an
    unprotected run does.

    Logged values:
        * ``train_loss``: training loss of every step.
        * ``val_loss``: validation loss (epoch mean).
        * ``val_mse``, ``val_mae`` (regression) or ``val_acc`` (classification): torchmetrics.

    Args:
        task: ``"regression"`` (MSE loss) or ``"classification"`` (cross-entropy).
        out_features: Number of outputs; the number of classes for classification (``>= 2``).
        optimizer: Optimizer name, see :func:`~lightning_gradguard.demos.build_optimizer`.
        lr: Learning rate, ``> 0``.
    """

    def __init__(self, task: Task, out_features: int, optimizer: OptimizerName, lr: float) -> None:
        super().__init__()
        self.task = check_choice("task", task, TASKS)
        self.out_features = check_int(
            "out_features", out_features, low=2 if task == "classification" else 1
        )
        self.optimizer_name = check_choice("optimizer", optimizer, OPTIMIZERS)
        self.lr = check_number("lr", lr, low=0, low_inclusive=False)
        self.val_metrics: MetricCollection
        if task == "regression":
            self.val_metrics = MetricCollection(
                {"val_mse": MeanSquaredError(), "val_mae": MeanAbsoluteError()}
            )
        else:
            self.val_metrics = MetricCollection(
                {"val_acc": MulticlassAccuracy(num_classes=out_features)}
            )

    def compute_loss(self, preds: Tensor, target: Tensor) -> Tensor:
        """MSE for regression, cross-entropy for classification (mean over the batch)."""
        if self.task == "regression":
            return nn.functional.mse_loss(preds, target)
        return nn.functional.cross_entropy(preds, target)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Compute and log ``train_loss``; a non-finite loss is returned unchanged."""
        inputs, target = batch
        loss = self.compute_loss(self(inputs), target)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log ``val_loss`` and update the validation metrics."""
        inputs, target = batch
        preds = self(inputs)
        self.log("val_loss", self.compute_loss(preds, target), prog_bar=True)
        self.val_metrics.update(preds, target)
        self.log_dict(self.val_metrics)

    def configure_optimizers(self) -> Optimizer:
        """Build the optimizer named by the ``optimizer`` hyperparameter."""
        return build_optimizer(self.parameters(), self.optimizer_name, self.lr)
