"""Tiny deterministic models and their data (CPU, a fraction of a second per fit)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

BATCH = 16
#: Distinct batches; the batch of a step is ``global_step % N_BATCHES`` (see
#: :meth:`TinyModule.batch_for_step`).
N_BATCHES = 8
#: The weights of the regression target ``tanh(x @ TARGET_W)``.
TARGET_W = ((1.0,), (-2.0,), (0.5,), (3.0,))


def make_data(n_batches: int = N_BATCHES, seed: int = 1, noise: float = 0.1) -> TensorDataset:
    """``n_batches * BATCH`` samples ``x ~ N(0, 1)^4``, ``y = tanh(x @ TARGET_W) + noise * N(0, 1)``
    from a generator seeded with ``seed`` (the global RNG is not touched). ``noise=0`` draws
    no noise at all."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * BATCH, 4, generator=g)
    y = torch.tanh(x @ torch.tensor(TARGET_W))
    if noise:
        y = y + noise * torch.randn(n_batches * BATCH, 1, generator=g)
    return TensorDataset(x, y)


def make_net(depth: int = 2, seed: int | None = None) -> torch.nn.Sequential:
    """``Linear(4, 8) - Tanh - [Linear(8, 8) - Tanh] * (depth - 2) - Linear(8, 1)``; with
    ``seed``, ``torch.manual_seed(seed)`` first."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(4, 8)]
    for _ in range(depth - 2):
        layers += [torch.nn.Tanh(), torch.nn.Linear(8, 8)]
    layers += [torch.nn.Tanh(), torch.nn.Linear(8, 1)]
    return torch.nn.Sequential(*layers)


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


def build_scheduler(name: str | None, opt: torch.optim.Optimizer, max_steps: int) -> Any:
    """Per-step schedulers by short name: ``lambda``, ``onecycle``, ``step``, ``cosine``,
    ``plateau``; ``None`` for none."""
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
    """``Linear(4, 8) - Tanh - Linear(8, 1)`` regression on 16-sample batches, the batch of a
    step chosen by ``global_step`` (so a resumed run sees the batches of an uninterrupted one).

    ``opt`` and ``sched`` are names for :func:`build_optimizer` / :func:`build_scheduler`;
    ``group_lrs`` puts the two linear layers in two param groups with these LRs.
    """

    def __init__(self, lr: float = 0.05, opt: str = "sgd", sched: str | None = None,
                 max_steps: int = 100, group_lrs: Sequence[float] | None = None,
                 n_batches: int = N_BATCHES) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net(seed=0)
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


class NaNFrom(TinyModule):
    """Loss (and so every gradient) NaN from ``global_step == start`` on."""

    def __init__(self, start: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start = start

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.start else loss


@functools.cache
def tiny_regression_class(base: type = pl.LightningModule) -> type:
    """:class:`TinyRegression` on another ``LightningModule`` base (``pytorch_lightning``'s:
    its Trainer takes only modules of its own namespace); one class per base."""

    class TinyRegression(base):  # type: ignore[valid-type,misc]
        """A plain regression whose loader drives the batches: ``make_net(depth)`` trained
        with ``build_optimizer(opt, lr)`` on ``data`` (default: ``make_data(seed=0,
        noise=0)``, 128 samples), 16 a batch, in order or shuffled by a generator seeded
        with ``shuffle_seed``. ``log_loss`` logs ``train_loss``; ``seed`` seeds the weights
        (``None``: the global RNG as it stands).
        """

        def __init__(self, lr: float = 0.1, opt: str = "sgd", depth: int = 2,
                     log_loss: bool = True, seed: int | None = 0,
                     shuffle_seed: int | None = None, data: TensorDataset | None = None) -> None:
            super().__init__()
            self.net = make_net(depth, seed=seed)
            self.lr, self.opt, self.log_loss = lr, opt, log_loss
            self.shuffle_seed = shuffle_seed
            self.data = make_data(seed=0, noise=0.0) if data is None else data

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if self.log_loss:
                self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return build_optimizer(self.opt, self.parameters(), self.lr)

        def train_dataloader(self) -> DataLoader[Any]:
            if self.shuffle_seed is None:
                return DataLoader(self.data, batch_size=BATCH)
            return DataLoader(self.data, batch_size=BATCH, shuffle=True,
                              generator=torch.Generator().manual_seed(self.shuffle_seed))

    return TinyRegression


TinyRegression = tiny_regression_class()


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
