"""Seeded synthetic LightningDataModules; nothing is downloaded or written to disk."""

from __future__ import annotations

from abc import abstractmethod

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ..core._validation import check_int, check_number

__all__ = ["AddingProblemDataModule", "ClassificationDataModule", "RegressionDataModule"]

Batch = tuple[Tensor, Tensor]


class _SyntheticDataModule(LightningDataModule):
    """Generates ``num_samples`` examples from ``seed`` and splits them into train/val.

    The first ``num_samples - num_val`` examples are the training set and the rest the validation
    set. Training batches are shuffled with a generator seeded from ``seed`` and the last
    incomplete batch is dropped (so BatchNorm never sees a batch of one); validation is in order.
    """

    def __init__(self, num_samples: int, batch_size: int, val_fraction: float, seed: int) -> None:
        super().__init__()
        self.num_samples = check_int("num_samples", num_samples, low=2)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.val_fraction = check_number("val_fraction", val_fraction, low=0, high=1,
                                         low_inclusive=False, high_inclusive=False)
        self.seed = check_int("seed", seed, low=0)
        self.num_val = min(max(1, round(self.num_samples * self.val_fraction)), num_samples - 1)
        self.num_train = self.num_samples - self.num_val
        if self.num_train < self.batch_size:
            raise ValueError(
                f"`batch_size` must be <= the number of training samples "
                f"({self.num_train} = num_samples * (1 - val_fraction)), got {batch_size!r}"
            )
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None

    @abstractmethod
    def generate(self, generator: torch.Generator) -> Batch:
        """Return all ``num_samples`` inputs and targets, drawing randomness from ``generator``."""

    def setup(self, stage: str | None = None) -> None:
        """Generate the data once (idempotent)."""
        if self.train_dataset is not None:
            return
        inputs, targets = self.generate(torch.Generator().manual_seed(self.seed))
        n = self.num_train
        self.train_dataset = TensorDataset(inputs[:n], targets[:n])
        self.val_dataset = TensorDataset(inputs[n:], targets[n:])

    def _datasets(self) -> tuple[TensorDataset, TensorDataset]:
        if self.train_dataset is None or self.val_dataset is None:
            self.setup()
        assert self.train_dataset is not None
        assert self.val_dataset is not None
        return self.train_dataset, self.val_dataset

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Shuffled training batches (seeded), last incomplete batch dropped."""
        return DataLoader(
            self._datasets()[0],
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=0,
            generator=torch.Generator().manual_seed(self.seed + 1),
        )

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Validation batches in a fixed order."""
        return DataLoader(self._datasets()[1], batch_size=self.batch_size, num_workers=0)


def _teacher(inputs: Tensor, outputs: int, hidden: int, generator: torch.Generator) -> Tensor:
    """A random one-hidden-layer tanh network applied to ``inputs``, outputs standardised."""
    w1 = torch.randn(inputs.shape[1], hidden, generator=generator) / inputs.shape[1] ** 0.5
    w2 = torch.randn(hidden, outputs, generator=generator) / hidden**0.5
    out = torch.tanh(inputs @ w1 * 2.0) @ w2
    standardised: Tensor = (out - out.mean(0)) / out.std(0)
    return standardised


class RegressionDataModule(_SyntheticDataModule):
    """Regression on ``x ~ N(0, I)`` with targets from a random "teacher" network plus noise.

    The teacher is ``tanh(2 * x @ W1) @ W2`` with Gaussian ``W1``, ``W2`` (``teacher_hidden``
    hidden units), standardised to zero mean and unit variance per output, so predicting zero
    gives an MSE of about ``1 + noise_std**2``.

    Args:
        in_features: Input dimension.
        out_features: Target dimension; targets have shape ``(out_features,)``.
        num_samples: Total number of examples (train + validation).
        batch_size: Batch size for both loaders.
        noise_std: Std of the Gaussian noise added to the standardised targets.
        teacher_hidden: Hidden width of the teacher network.
        val_fraction: Fraction of ``num_samples`` used for validation.
        seed: Seed of the data generator and of the training-set shuffling.

    Example:
        >>> dm = RegressionDataModule(in_features=8, num_samples=100, batch_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape), dm.num_train, dm.num_val
        ((16, 8), (16, 1), 80, 20)
    """

    def __init__(
        self,
        in_features: int = 32,
        out_features: int = 1,
        num_samples: int = 2048,
        batch_size: int = 64,
        noise_std: float = 0.1,
        teacher_hidden: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(num_samples, batch_size, val_fraction, seed)
        self.in_features = check_int("in_features", in_features, low=1)
        self.out_features = check_int("out_features", out_features, low=1)
        self.noise_std = check_number("noise_std", noise_std, low=0)
        self.teacher_hidden = check_int("teacher_hidden", teacher_hidden, low=1)
        self.save_hyperparameters()

    def generate(self, generator: torch.Generator) -> Batch:
        """Draw inputs, teacher targets and noise from ``generator``."""
        x = torch.randn(self.num_samples, self.in_features, generator=generator)
        y = _teacher(x, self.out_features, self.teacher_hidden, generator)
        y = y + self.noise_std * torch.randn(y.shape, generator=generator)
        return x, y


class ClassificationDataModule(_SyntheticDataModule):
    """Classification on ``x ~ N(0, I)``, labels = argmax of a random teacher's noisy logits.

    Uses the same teacher as :class:`RegressionDataModule` with ``num_classes`` outputs; Gaussian
    noise with std ``noise_std`` is added to the standardised logits before the argmax.

    Args:
        in_features: Input dimension.
        num_classes: Number of classes (``>= 2``); targets are ``int64`` class indices.
        num_samples: Total number of examples (train + validation).
        batch_size: Batch size for both loaders.
        noise_std: Std of the Gaussian noise added to the teacher logits (label noise).
        teacher_hidden: Hidden width of the teacher network.
        val_fraction: Fraction of ``num_samples`` used for validation.
        seed: Seed of the data generator and of the training-set shuffling.

    Example:
        >>> dm = ClassificationDataModule(in_features=8, num_classes=3, num_samples=100)
        >>> dm.setup("fit")
        >>> x, y = dm.val_dataset[:4]
        >>> tuple(x.shape), y.dtype, bool(((y >= 0) & (y < 3)).all())
        ((4, 8), torch.int64, True)
    """

    def __init__(
        self,
        in_features: int = 32,
        num_classes: int = 4,
        num_samples: int = 2048,
        batch_size: int = 64,
        noise_std: float = 0.1,
        teacher_hidden: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(num_samples, batch_size, val_fraction, seed)
        self.in_features = check_int("in_features", in_features, low=1)
        self.num_classes = check_int("num_classes", num_classes, low=2)
        self.noise_std = check_number("noise_std", noise_std, low=0)
        self.teacher_hidden = check_int("teacher_hidden", teacher_hidden, low=1)
        self.save_hyperparameters()

    def generate(self, generator: torch.Generator) -> Batch:
        """Draw inputs, teacher logits and label noise from ``generator``."""
        x = torch.randn(self.num_samples, self.in_features, generator=generator)
        logits = _teacher(x, self.num_classes, self.teacher_hidden, generator)
        logits = logits + self.noise_std * torch.randn(logits.shape, generator=generator)
        return x, logits.argmax(dim=1)


class AddingProblemDataModule(_SyntheticDataModule):
    """The adding problem (Hochreiter & Schmidhuber, 1997; Le et al., 2015).

    Each input is a sequence of ``seq_len`` pairs ``(value, marker)``: values are uniform in
    ``[0, 1)``, the marker is 1 at exactly two positions (one in each half of the sequence) and 0
    elsewhere. The target is the sum of the two marked values, shape ``(1,)``; always predicting
    the mean (1.0) gives an MSE of about 1/6.

    Args:
        seq_len: Sequence length, ``>= 2``. Longer sequences need longer memory.
        num_samples: Total number of sequences (train + validation).
        batch_size: Batch size for both loaders.
        val_fraction: Fraction of ``num_samples`` used for validation.
        seed: Seed of the data generator and of the training-set shuffling.

    Example:
        >>> dm = AddingProblemDataModule(seq_len=10, num_samples=64, batch_size=8)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape)
        ((8, 10, 2), (8, 1))
        >>> bool((x[..., 1].sum(dim=1) == 2).all())
        True
        >>> bool(torch.allclose((x[..., 0] * x[..., 1]).sum(dim=1, keepdim=True), y))
        True
    """

    def __init__(
        self,
        seq_len: int = 20,
        num_samples: int = 4096,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(num_samples, batch_size, val_fraction, seed)
        self.seq_len = check_int("seq_len", seq_len, low=2)
        self.save_hyperparameters()

    def generate(self, generator: torch.Generator) -> Batch:
        """Draw values and marker positions from ``generator``."""
        n, half = self.num_samples, self.seq_len // 2
        values = torch.rand(n, self.seq_len, generator=generator)
        first = torch.randint(0, half, (n,), generator=generator)
        second = torch.randint(half, self.seq_len, (n,), generator=generator)
        markers = torch.zeros(n, self.seq_len)
        rows = torch.arange(n)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        targets = (values[rows, first] + values[rows, second]).unsqueeze(1)
        return torch.stack([values, markers], dim=2), targets
