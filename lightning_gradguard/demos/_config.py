"""Named, reproducible demo scenarios: which model and data, how many steps, what happens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar

import lightning
from lightning.pytorch import LightningDataModule, LightningModule

__all__ = ["DemoConfig", "DemoKind"]

ModelT = TypeVar("ModelT", bound=LightningModule)
DataT = TypeVar("DataT", bound=LightningDataModule)

DemoKind = Literal["explode", "healthy"]
"""``"explode"``: goes non-finite within ``max_steps``; ``"healthy"``: trains fine."""


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class DemoConfig(Generic[ModelT, DataT]):
    """A reproducible demo scenario: model and datamodule kwargs plus the expected outcome.

    For ``kind="explode"``, training the model built by :meth:`build` (same ``seed``) with plain
    Lightning and no guard produces a non-finite loss or gradient at or before optimizer step
    ``max_steps``. For ``kind="healthy"``, training for ``max_steps`` steps keeps the loss and
    gradients finite and the loss goes down.

    Args:
        kind: ``"explode"`` or ``"healthy"``.
        model_cls: LightningModule class to instantiate.
        model_kwargs: Keyword arguments for ``model_cls``.
        datamodule_cls: LightningDataModule class to instantiate.
        datamodule_kwargs: Keyword arguments for ``datamodule_cls``.
        max_steps: Explode: bound on the optimizer step that first goes non-finite.
            Healthy: number of steps the scenario is verified to train for.
        seed: Global seed passed to :func:`lightning.seed_everything` by :meth:`build`.
        description: One-line explanation of why it explodes / stays healthy.

    Example:
        >>> from lightning_gradguard.demos import AddingProblemRNN
        >>> cfg = AddingProblemRNN.explode_config()
        >>> cfg.kind, cfg.max_steps <= 200
        ('explode', True)
        >>> model, datamodule = cfg.build()
        >>> type(model).__name__, type(datamodule).__name__
        ('AddingProblemRNN', 'AddingProblemDataModule')
    """

    kind: DemoKind
    model_cls: type[ModelT]
    model_kwargs: Mapping[str, Any]
    datamodule_cls: type[DataT]
    datamodule_kwargs: Mapping[str, Any]
    max_steps: int
    seed: int = 0
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_kwargs", _frozen(self.model_kwargs))
        object.__setattr__(self, "datamodule_kwargs", _frozen(self.datamodule_kwargs))

    def build(self, seed: bool = True) -> tuple[ModelT, DataT]:
        """Instantiate the model and the datamodule.

        Args:
            seed: Call ``lightning.seed_everything(self.seed)`` first (silently), which fixes
                the model's initial weights. The data is always seeded by the datamodule.

        Returns:
            ``(model, datamodule)``.
        """
        if seed:
            lightning.seed_everything(self.seed, verbose=False)
        model = self.model_cls(**self.model_kwargs)
        datamodule = self.datamodule_cls(**self.datamodule_kwargs)
        return model, datamodule
