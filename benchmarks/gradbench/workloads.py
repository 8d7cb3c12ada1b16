"""Workloads (model + data + learning rates + run length) and the suites built from them.

A :class:`Workload` builds a fresh ``(LightningModule, LightningDataModule)`` pair for one
learning rate and seed, and evaluates a model on its validation data (a workload of another
kind of model overrides :meth:`Workload.build` and :meth:`Workload.evaluate`). A
:class:`Suite` is a grid (workloads x learning rates x seeds x methods) with its report paths.
The momentum grid is the stability grid with another optimizer
(:meth:`Suite.with_optimizer`), not a patched copy.

The overhead benchmark's end-to-end models (:class:`DemoSpec`) are pinned here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lightning_gradguard.demos import AddingProblemRNN, DeepMLP, DemoConfig, ResidualMLP

from .common import BENCH_ROOT

__all__ = [
    "E2E_BATCH", "E2E_MODELS", "STABILITY", "STABILITY_MOMENTUM", "DemoSpec", "QuickGrid",
    "Suite", "Workload", "build_demo", "deep_mlp_spec", "e2e_spec", "evaluate_demo",
    "half_decades",
]


# ----------------------------------------------------------------------------- stability
def half_decades(low: float, n: int = 6) -> tuple[float, ...]:
    """``n`` half-decade learning rates from ``low``: ``low, 3 low, 10 low, 30 low, ...``.

    >>> half_decades(0.01)
    (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    """
    return tuple(float(f"{low * (1, 3)[i % 2] * 10 ** (i // 2):.3g}") for i in range(n))


def _scaled(lrs: tuple[float, ...], factor: float) -> tuple[float, ...]:
    return tuple(float(f"{lr * factor:.3g}") for lr in lrs)


@torch.no_grad()
def evaluate_demo(model: Any, datamodule: Any) -> dict[str, float]:
    """Validation loss (sample-weighted mean) and the metrics of a demo model.

    Uses the demo modules' ``compute_loss`` and ``val_metrics`` over the whole validation set;
    the model is in eval mode meanwhile and gets its previous mode back.
    """
    was_training = model.training
    model.eval()
    metrics = model.val_metrics.clone()
    metrics.reset()
    total, n = 0.0, 0
    for inputs, target in datamodule.val_dataloader():
        preds = model(inputs)
        total += float(model.compute_loss(preds, target)) * len(target)
        n += len(target)
        metrics.update(preds, target)
    out = {"val_loss": total / n}
    out.update({k: float(v) for k, v in metrics.compute().items()})
    model.train(was_training)
    return out


@dataclass(frozen=True)
class Workload:
    """One model of a grid: a demo config, overrides, the LR range and the run length.

    Args:
        name: Key in the grid and in the cache path.
        config: The demo scenario (model and datamodule classes and kwargs).
        lrs: The learning rates of the grid.
        steps: Optimizer steps per run.
        setup: What the model is, for the report.
        optimizer: The optimizer, for the report (``"plain SGD"``).
        explodes_at: The LR at which the scenario explodes without any method, if known.
        overrides: Model kwargs that replace the config's (e.g. ``{"optimizer": ...}``).
        trainer_kwargs: Extra ``Trainer`` kwargs of every run of this workload (a method's
            own ``Trainer`` kwargs are applied after these).
    """

    name: str
    config: Callable[[], DemoConfig[Any, Any]]
    lrs: tuple[float, ...]
    steps: int
    setup: str
    optimizer: str = "plain SGD"
    explodes_at: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def note(self) -> str:
        """One line for the report: setup, optimizer and the explosion LR."""
        tail = f" (explodes at lr={self.explodes_at})" if self.explodes_at else ""
        return f"{self.setup}, {self.optimizer}{tail}"

    def model_kwargs(self, lr: float) -> dict[str, Any]:
        """The model's constructor kwargs at learning rate ``lr``."""
        return {**self.config().model_kwargs, **self.overrides, "lr": lr}

    def cache_key(self, lr: float, seed: int) -> dict[str, Any]:
        """What identifies a run of this workload besides method and steps (JSON-ready)."""
        return {"model_kwargs": self.model_kwargs(lr),
                "datamodule_kwargs": {**self.config().datamodule_kwargs, "seed": seed}}

    def build(self, lr: float, seed: int) -> tuple[Any, Any]:
        """A fresh model and datamodule (call after seeding: the weights use the global RNG)."""
        cfg = self.config()
        model = cfg.model_cls(**self.model_kwargs(lr))
        datamodule = cfg.datamodule_cls(**{**cfg.datamodule_kwargs, "seed": seed})
        return model, datamodule

    def evaluate(self, model: Any, datamodule: Any) -> dict[str, float]:
        """``val_loss`` and the model's validation metrics (override for other models)."""
        return evaluate_demo(model, datamodule)

    def with_optimizer(self, optimizer: str, label: str, lr_factor: float) -> Workload:
        """The same workload with model kwarg ``optimizer`` and every LR times ``lr_factor``."""
        return replace(self, overrides={**self.overrides, "optimizer": optimizer},
                       lrs=_scaled(self.lrs, lr_factor), optimizer=label, explodes_at=None)


@dataclass(frozen=True)
class QuickGrid:
    """The ``--quick`` smoke grid of a suite."""

    model: str
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    steps: int


@dataclass(frozen=True)
class Suite:
    """A benchmark grid with its defaults and report paths.

    Args:
        name: Stem of the default cache directory and result files.
        title: First heading of the report.
        script: The entry point that produces it (named in the report).
        workloads: The grid's workloads by name, in report order.
        methods: The ranked methods (registry names, :mod:`gradbench.methods`).
        seeds: Default seeds.
        optimizer: How the LR axis is labelled (``"plain SGD"``).
        quick: The ``--quick`` smoke grid.
        variants: Scratch GradGuard variants always shown in the report (when cached).
    """

    name: str
    title: str
    script: str
    workloads: Mapping[str, Workload]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    optimizer: str
    quick: QuickGrid
    variants: tuple[str, ...] = ()

    @property
    def cache_dir(self) -> Path:
        return BENCH_ROOT / ".cache" / self.name

    @property
    def md_path(self) -> Path:
        return BENCH_ROOT / "results" / f"{self.name}.md"

    @property
    def png_path(self) -> Path:
        return BENCH_ROOT / "results" / f"{self.name}.png"

    def with_optimizer(self, name: str, title: str, script: str, optimizer: str, label: str,
                       axis_label: str, lr_factor: float) -> Suite:
        """The same grid with another optimizer and every LR (also the quick ones) scaled.

        Args:
            name: The new suite's name (cache directory and result file stem).
            title: The new report's first heading.
            script: Its entry point.
            optimizer: The demo models' ``optimizer`` kwarg (e.g. ``"sgd_momentum"``).
            label: The optimizer as the workloads' notes name it.
            axis_label: The optimizer as the LR axis and column headers name it.
            lr_factor: Every learning rate is multiplied by this.
        """
        workloads = {k: w.with_optimizer(optimizer, label, lr_factor)
                     for k, w in self.workloads.items()}
        return replace(self, name=name, title=title, script=script, workloads=workloads,
                       optimizer=axis_label,
                       quick=replace(self.quick, lrs=_scaled(self.quick.lrs, lr_factor)))


# LR ranges (probed with no clipping, seed 0, 300 steps): the lowest two LRs train without
# clipping, the explode_config() LR is the third, the highest is ~100x the highest
# comfortable LR.
STABILITY_WORKLOADS: dict[str, Workload] = {
    "DeepMLP": Workload(
        "DeepMLP", DeepMLP.explode_config, half_decades(0.01), 300,
        setup="explode_config(): 8x64 ReLU MLP, He init, no BatchNorm", explodes_at="0.1"),
    "ResidualMLP": Workload(
        "ResidualMLP", ResidualMLP.explode_config, half_decades(1e-4), 300,
        setup="explode_config(): 8 residual blocks x 64, He init, no BatchNorm",
        explodes_at="0.01"),
    "LSTM": Workload(
        "LSTM", AddingProblemRNN.explode_config, half_decades(0.1), 300,
        setup="AddingProblemRNN.explode_config(): LSTM(32) on the adding problem (seq_len 20)",
        explodes_at="1.0"),
}

#: Plain SGD from comfortable to ~100x too high: the grid every default was chosen on.
STABILITY = Suite(
    name="stability",
    title="Stability benchmark",
    script="benchmarks/stability.py",
    workloads=STABILITY_WORKLOADS,
    methods=("none", "clip1", "zclip", "autoclip", "autoclip_p10", "agc", "gradguard"),
    seeds=(0, 1, 2, 3, 4),
    optimizer="plain SGD",
    quick=QuickGrid(model="DeepMLP", lrs=(0.003, 0.3), seeds=(0,),
                    methods=("none", "clip1", "gradguard"), steps=40),
)

#: The same grid with SGD + momentum 0.9 and 10x lower LRs (momentum multiplies the
#: steady-state step by 1 / (1 - 0.9) = 10, so the grid again spans comfortable to far too high).
STABILITY_MOMENTUM = STABILITY.with_optimizer(
    name="stability_momentum",
    title="Stability benchmark: SGD + momentum 0.9",
    script="benchmarks/stability_momentum.py",
    optimizer="sgd_momentum",
    label="SGD + momentum 0.9 (LRs 10x lower than the plain-SGD grid)",
    axis_label="SGD + momentum 0.9",
    lr_factor=0.1,
)


# ----------------------------------------------------------------------------- overhead
#: The end-to-end models (``--e2e-models`` keys), in the order they run.
E2E_MODELS: tuple[str, ...] = ("deep_mlp", "residual_mlp", "lstm")

#: The end-to-end models' settings are pinned here (not taken from the demo configs, which
#: may change) so that results stay comparable: healthy, stateful-optimizer setups.
#: ``DeepMLP`` (width and depth from ``--width``/``--depth``, batch from ``--batch``):
DEMO_KWARGS: dict[str, Any] = {"in_features": 32, "init": "he", "batch_norm": True,
                               "activation": "relu", "optimizer": "sgd_momentum", "lr": 0.01}
#: ``ResidualMLP``: DeepMLP's width and setup; 3 blocks of two square ``Linear`` (6.35 M
#: parameters, 30 tensors) is the depth closest to DeepMLP's 5.3 M at this width, by ratio
#: (2 blocks: 4.24 M); about 41 ms per step on one thread of the 2-core CI machine.
RESIDUAL_KWARGS: dict[str, Any] = {"in_features": 32, "width": 1024, "depth": 3, "init": "he",
                                   "batch_norm": True, "activation": "relu",
                                   "optimizer": "sgd_momentum", "lr": 0.01}
#: ``AddingProblemRNN``: one LSTM layer of 256 units (PyTorch's default init) on the adding
#: problem with 40 time steps (``AddingProblemDataModule(seq_len=LSTM_SEQ_LEN)``): 0.27 M
#: parameters in 6 tensors, about 54 ms per step (seq_len 50 would be about 70 ms).
LSTM_KWARGS: dict[str, Any] = {"cell": "lstm", "hidden_size": 256, "num_layers": 1,
                               "init": "default", "optimizer": "sgd_momentum", "lr": 0.01}
LSTM_SEQ_LEN = 40
#: Batch size of ``ResidualMLP`` and the LSTM (``--batch`` applies to ``DeepMLP`` only).
E2E_BATCH = 64
#: ``--quick``: smaller models (smoke run only; ``DeepMLP`` shrinks through its defaults).
QUICK_KWARGS: dict[str, dict[str, Any]] = {"residual_mlp": {"width": 256, "depth": 2},
                                           "lstm": {"hidden_size": 64}}
QUICK_SEQ_LEN = 20


@dataclass(frozen=True)
class DemoSpec:
    """One end-to-end model: a demo class and its datamodule, by name, with pinned kwargs."""

    key: str  # ``--e2e-models`` name
    model: str  # class in ``lightning_gradguard.demos``
    model_kwargs: dict[str, Any]
    data: str  # datamodule class in ``lightning_gradguard.demos``
    data_kwargs: dict[str, Any]
    batch: int
    label: str = ""  # name in the report (default: ``model``)
    note: str = ""  # why these settings, for the report


def deep_mlp_spec(width: int, depth: int, batch: int, **overrides: Any) -> DemoSpec:
    """``DeepMLP`` with ``DEMO_KWARGS`` (``overrides`` replace some, e.g. the optimizer)."""
    return DemoSpec(
        "deep_mlp", "DeepMLP", {"width": width, "depth": depth, **DEMO_KWARGS, **overrides},
        "RegressionDataModule", {"in_features": DEMO_KWARGS["in_features"]}, batch, "DeepMLP",
        "plain MLP, the settings of the earlier reports (`--width`, `--depth` and `--batch` "
        "apply to this model only)")


def e2e_spec(key: str, quick: bool, width: int, depth: int, batch: int) -> DemoSpec:
    """The pinned settings of end-to-end model ``key`` (smaller ones with ``quick``)."""
    small = QUICK_KWARGS.get(key, {}) if quick else {}
    if key == "deep_mlp":
        return deep_mlp_spec(width, depth, batch)
    if key == "residual_mlp":
        return DemoSpec(
            key, "ResidualMLP", {**RESIDUAL_KWARGS, **small}, "RegressionDataModule",
            {"in_features": RESIDUAL_KWARGS["in_features"]}, E2E_BATCH, "ResidualMLP",
            "pre-activation residual blocks of two square `Linear` with BatchNorm; DeepMLP's "
            "width and setup, and the number of blocks whose parameter count is closest to "
            "DeepMLP's (at width 1024: 2 blocks 4.24 M, 3 blocks 6.35 M)")
    if key == "lstm":
        seq_len = QUICK_SEQ_LEN if quick else LSTM_SEQ_LEN
        return DemoSpec(
            key, "AddingProblemRNN", {**LSTM_KWARGS, **small}, "AddingProblemDataModule",
            {"seq_len": seq_len}, E2E_BATCH, "AddingProblemRNN (LSTM)",
            f"one LSTM layer on the adding problem, back-propagated through all {seq_len} "
            "time steps: few parameters in 6 tensors and a long step, so reading the "
            "gradients is a small part of it (the other end from the MLPs)")
    raise ValueError(f"e2e model: expected one of {', '.join(E2E_MODELS)}, got {key!r}")


def build_demo(spec: DemoSpec, steps: int) -> tuple[Any, Any]:
    """The model and a datamodule with enough training batches for ``steps`` steps."""
    from lightning_gradguard import demos

    model = getattr(demos, spec.model)(**spec.model_kwargs)
    val_fraction = 0.2
    dm = getattr(demos, spec.data)(
        **spec.data_kwargs, batch_size=spec.batch, val_fraction=val_fraction,
        num_samples=math.ceil((steps + 2) * spec.batch / (1 - val_fraction)) + spec.batch,
        seed=0)
    return model, dm
