"""The synthetic datamodules: seeded, shaped and split as documented."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradguard.demos import (
    AddingProblemDataModule,
    ClassificationDataModule,
    RegressionDataModule,
)

SMALL: dict[str, dict[str, Any]] = {
    "regression": {"in_features": 6, "num_samples": 200, "batch_size": 16},
    "classification": {"in_features": 6, "num_classes": 3, "num_samples": 200, "batch_size": 16},
    "adding": {"seq_len": 12, "num_samples": 200, "batch_size": 16},
}
CLASSES = {
    "regression": RegressionDataModule,
    "classification": ClassificationDataModule,
    "adding": AddingProblemDataModule,
}


def _make(kind: str, **overrides: Any) -> Any:
    dm = CLASSES[kind](**{**SMALL[kind], **overrides})
    dm.setup("fit")
    return dm


def _tensors(dm: Any) -> list[torch.Tensor]:
    return [*dm.train_dataset.tensors, *dm.val_dataset.tensors]


@pytest.mark.parametrize("kind", list(CLASSES))
def test_same_seed_same_data_and_batch_order(kind: str) -> None:
    torch.manual_seed(1)
    a = _make(kind, seed=7)
    torch.manual_seed(2)  # the global RNG must not matter
    b = _make(kind, seed=7)
    for x, y in zip(_tensors(a), _tensors(b), strict=True):
        assert torch.equal(x, y)
    for (xa, ya), (xb, yb) in zip(a.train_dataloader(), b.train_dataloader(), strict=True):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_different_seed_different_data(kind: str) -> None:
    a, b = _make(kind, seed=0), _make(kind, seed=1)
    assert not torch.equal(a.train_dataset.tensors[0], b.train_dataset.tensors[0])


@pytest.mark.parametrize("kind", list(CLASSES))
def test_split_sizes_and_loaders(kind: str) -> None:
    dm = _make(kind, val_fraction=0.25)
    assert (dm.num_train, dm.num_val) == (150, 50)
    assert len(dm.train_dataset) == 150
    assert len(dm.val_dataset) == 50
    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 150 // 16  # last incomplete batch dropped
    assert all(x.shape[0] == 16 for x, _ in train_batches)
    assert sum(x.shape[0] for x, _ in dm.val_dataloader()) == 50


def test_setup_is_idempotent() -> None:
    dm = _make("regression")
    first = dm.train_dataset
    dm.setup("validate")
    assert dm.train_dataset is first


def test_loaders_work_without_explicit_setup() -> None:
    dm = RegressionDataModule(**SMALL["regression"])
    x, y = next(iter(dm.val_dataloader()))
    assert tuple(x.shape) == (16, 6)
    assert tuple(y.shape) == (16, 1)


def test_regression_shapes_and_scale() -> None:
    dm = _make("regression", out_features=2, num_samples=2000, noise_std=0.0)
    x, y = dm.train_dataset.tensors
    assert tuple(x.shape) == (1600, 6)
    assert tuple(y.shape) == (1600, 2)
    assert x.dtype == y.dtype == torch.float32
    full = torch.cat([y, dm.val_dataset.tensors[1]])
    torch.testing.assert_close(full.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.std(0), torch.ones(2), atol=1e-5, rtol=0)


def test_classification_labels_use_every_class() -> None:
    dm = _make("classification", num_samples=1000)
    _, y = dm.train_dataset.tensors
    assert y.dtype == torch.int64
    assert tuple(y.shape) == (800,)
    assert set(y.tolist()) == {0, 1, 2}


@settings(max_examples=25, deadline=None)
@given(
    seq_len=st.integers(min_value=2, max_value=30),
    num_samples=st.integers(min_value=2, max_value=60),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_adding_problem_invariants(seq_len: int, num_samples: int, seed: int) -> None:
    dm = AddingProblemDataModule(seq_len=seq_len, num_samples=num_samples, batch_size=1, seed=seed)
    x, y = dm.generate(torch.Generator().manual_seed(seed))
    assert tuple(x.shape) == (num_samples, seq_len, 2)
    assert tuple(y.shape) == (num_samples, 1)
    values, markers = x[..., 0], x[..., 1]
    assert bool(((values >= 0) & (values < 1)).all())
    half = seq_len // 2
    assert bool((markers[:, :half].sum(1) == 1).all())
    assert bool((markers[:, half:].sum(1) == 1).all())
    torch.testing.assert_close((values * markers).sum(1, keepdim=True), y)


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragments"),
    [
        ({"seq_len": 1}, ValueError, ["`seq_len`", ">= 2", "got 1"]),
        ({"seq_len": 2.5}, TypeError, ["`seq_len`", "int", "2.5"]),
        ({"batch_size": 0}, ValueError, ["`batch_size`", ">= 1", "got 0"]),
        ({"num_samples": True}, TypeError, ["`num_samples`", "got True (bool)"]),
        ({"val_fraction": 1.0}, ValueError, ["`val_fraction`", "> 0 and < 1", "got 1.0"]),
        ({"val_fraction": "0.1"}, TypeError, ["`val_fraction`", "got '0.1' (str)"]),
        ({"seed": -1}, ValueError, ["`seed`", ">= 0", "got -1"]),
        (
            {"num_samples": 10, "batch_size": 64},
            ValueError,
            ["`batch_size`", "training samples (9", "got 64"],
        ),
    ],
)
def test_adding_problem_rejects_bad_args(
    kwargs: dict[str, Any], exc: type[Exception], fragments: list[str]
) -> None:
    with pytest.raises(exc) as info:
        AddingProblemDataModule(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("cls", "kwargs", "fragments"),
    [
        (RegressionDataModule, {"noise_std": -0.1}, ["`noise_std`", ">= 0", "got -0.1"]),
        (RegressionDataModule, {"in_features": 0}, ["`in_features`", ">= 1", "got 0"]),
        (ClassificationDataModule, {"num_classes": 1}, ["`num_classes`", ">= 2", "got 1"]),
    ],
)
def test_teacher_datamodules_reject_bad_args(
    cls: type[Any], kwargs: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(ValueError) as info:  # noqa: PT011 - message checked below
        cls(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_hyperparameters_are_saved() -> None:
    dm = AddingProblemDataModule(seq_len=8, num_samples=100)
    assert dm.hparams["seq_len"] == 8
    assert dm.hparams["num_samples"] == 100
