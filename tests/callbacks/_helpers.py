"""Tiny models, data and recording callbacks for the GradGuard tests (CPU, deterministic)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

BATCH = 16
#: Distinct batches; the batch of a step is ``global_step % N_BATCHES`` (see
#: :meth:`TinyModule.batch_for_step`).
N_BATCHES = 8


def make_data(n_batches: int = N_BATCHES, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * BATCH, 4, generator=g)
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n_batches * BATCH, 1, generator=g)
    return TensorDataset(x, y)


def make_net() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def build_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """Optimizers by short name: ``sgd``, ``sgdm``, ``adam``, ``adamw``, ``adamw_foreach``,
    ``adamw_fused``, ``adam_fused``, ``rmsprop``."""
    o = torch.optim
    table: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "sgd": lambda: o.SGD(params, lr=lr),
        "sgdm": lambda: o.SGD(params, lr=lr, momentum=0.9),
        "adam": lambda: o.Adam(params, lr=lr),
        "adam_fused": lambda: o.Adam(params, lr=lr, fused=True),
        "adamw": lambda: o.AdamW(params, lr=lr, foreach=False),
        "adamw_foreach": lambda: o.AdamW(params, lr=lr, foreach=True),
        "adamw_fused": lambda: o.AdamW(params, lr=lr, fused=True),
        "rmsprop": lambda: o.RMSprop(params, lr=lr),
    }
    return table[name]()


def build_scheduler(name: str | None, opt: torch.optim.Optimizer,
                    max_steps: int) -> Any:
    s = torch.optim.lr_scheduler
    if name is None:
        return None
    if name == "lambda":
        return s.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.1 * t))
    if name == "onecycle":
        return s.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                            total_steps=max_steps + 5, cycle_momentum=False)
    if name == "step":
        return s.StepLR(opt, step_size=3, gamma=0.7)
    if name == "cosine":
        return s.CosineAnnealingLR(opt, T_max=max_steps)
    if name == "plateau":
        # the monitored metric never improves: the LR is cut every `patience + 1` steps,
        # independently of the training trajectory
        return s.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2)
    raise ValueError(name)


class TinyModule(pl.LightningModule):
    """``Linear(4, 8) - Tanh - Linear(8, 1)`` regression on 16-sample batches."""

    def __init__(self, lr: float = 0.05, opt: str = "sgd", sched: str | None = None,
                 max_steps: int = 100, group_lrs: Sequence[float] | None = None,
                 n_batches: int = N_BATCHES) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = make_net()
        self._data = make_data(n_batches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.batch_for_step(batch)
        loss = torch.nn.functional.mse_loss(self(x), y)
        if self.hparams.sched == "plateau":
            self.log("plateau_metric", 1.0, on_step=True, on_epoch=False)
        return loss

    def batch_for_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch is a function of ``global_step`` only (the loader just drives the loop).

        On resume Lightning 2.6 restarts a non-resumable loader from its first batch (and a run
        that ``max_steps`` stopped at an epoch boundary first runs one extra batch of the
        unfinished epoch), so a loader-driven batch order would differ between a resumed and
        an uninterrupted run.
        """
        ds = self._data
        i = self.global_step % self.hparams.n_batches
        sl = slice(i * BATCH, (i + 1) * BATCH)
        return ds.tensors[0][sl], ds.tensors[1][sl]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.group_lrs is not None:
            params: Any = [{"params": self.net[0].parameters(), "lr": hp.group_lrs[0]},
                           {"params": self.net[2].parameters(), "lr": hp.group_lrs[1]}]
        else:
            params = self.parameters()
        opt = build_optimizer(hp.opt, params, hp.lr)
        sched = build_scheduler(hp.sched, opt, hp.max_steps)
        if sched is None:
            return opt
        cfg: dict[str, Any] = {"scheduler": sched, "interval": "step"}
        if hp.sched == "plateau":
            cfg["monitor"] = "plateau_metric"
        return {"optimizer": opt, "lr_scheduler": cfg}

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self._data, batch_size=BATCH, shuffle=False)


class TwoNetManual(pl.LightningModule):
    """GAN-like manual optimization: two independent nets, two optimizers, two steps."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.gen = make_net()
        self.disc = make_net()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt1, opt2 = self.optimizers()  # type: ignore[misc]
        loss1 = torch.nn.functional.mse_loss(self.gen(x), y)
        opt1.zero_grad()
        self.manual_backward(loss1)
        opt1.step()
        loss2 = torch.nn.functional.mse_loss(self.disc(x), -y)
        opt2.zero_grad()
        self.manual_backward(loss2)
        opt2.step()

    def configure_optimizers(self) -> Any:
        return (torch.optim.SGD(self.gen.parameters(), lr=self.hparams.lr),
                torch.optim.SGD(self.disc.parameters(), lr=self.hparams.lr))

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(make_data(), batch_size=BATCH, shuffle=False)


def make_trainer(max_steps: int, callbacks: Sequence[Callback] = (),
                 root: Path | str | None = None, **kwargs: Any) -> pl.Trainer:
    opts: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "max_steps": max_steps,
        "num_sanity_val_steps": 0, "deterministic": True,
    }
    if root is not None:
        opts["default_root_dir"] = str(root)
    opts.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **opts)


def fit(module: pl.LightningModule, max_steps: int, callbacks: Sequence[Callback] = (),
        seed: int = 0, ckpt_path: str | None = None, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(seed, verbose=False)
    trainer = make_trainer(max_steps, callbacks, **kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def opt_tensors(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of the optimizer's ``state_dict()`` (state tensors and param groups)."""
    return copy.deepcopy(opt.state_dict())


def assert_state_equal(a: Any, b: Any, path: str = "") -> None:
    """Bit-identical nested structures (tensors with ``torch.equal``)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict), path
        assert a.keys() == b.keys(), path
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float), path
        assert math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def assert_state_close(a: Any, b: Any, path: str = "", rtol: float = 1e-5,
                       atol: float = 1e-7) -> None:
    """Like :func:`assert_state_equal`, tensors compared with ``allclose`` (NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol,
                              equal_nan=True), (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict), path
        assert a.keys() == b.keys(), path
        for k in a:
            assert_state_close(a[k], b[k], f"{path}/{k}", rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_close(x, y, f"{path}[{i}]", rtol, atol)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), (path, a, b)
    else:
        assert a == b, (path, a, b)


class Recorder(Callback):
    """Records per step: the LR the update used (``on_before_optimizer_step``; list it
    AFTER GradGuard), the scheduled LR after the step (``on_train_batch_end``) and,
    optionally, the guard's threshold after the step.

    Keys of ``used_lr`` / ``sched_lr`` / ``threshold`` are the 0-based ``global_step`` of the
    optimizer step.
    """

    def __init__(self, guard: Any = None) -> None:
        self.guard = guard
        self.used_lr: dict[int, list[float]] = {}
        self.sched_lr: dict[int, list[float]] = {}
        self.threshold: dict[int, float] = {}
        self.grad_none: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        self.used_lr[step] = [float(g["lr"]) for g in optimizer.param_groups]
        self.grad_none[step] = all(p.grad is None for p in pl_module.parameters())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step - 1
        opt = trainer.optimizers[0]
        self.sched_lr[step] = [float(g["lr"]) for g in opt.param_groups]
        if self.guard is not None and self.guard._cores:
            self.threshold[step] = float(self.guard._cores[0].policy.threshold())


class StateAround(Callback):
    """Captures params + optimizer state at the end of step ``k - 1`` and of step ``k``."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.before: tuple[list[torch.Tensor], dict[str, Any]] | None = None
        self.after: tuple[list[torch.Tensor], dict[str, Any]] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        done = trainer.global_step - 1  # the optimizer step that just finished
        snap = (params_of(pl_module), opt_tensors(trainer.optimizers[0]))
        if done == self.k - 1:
            self.before = snap
        elif done == self.k:
            self.after = snap


def policy_state(guard: Any, idx: int = 0) -> dict[str, Any]:
    return guard._cores[idx].state_dict()  # type: ignore[no-any-return]
