"""The rescue benchmark's workloads (issue 14): realistic models and offline data.

Every workload builds a LightningModule (with its own optimizer recipe and validation data)
and a training dataloader from ``(lr, seed)``; nothing is downloaded. A
:class:`RescueWorkload` is a ``gradbench`` workload (``run_one`` and ``RunCache`` take it);
its metric is the module's ``val_loss()``.

==================  ===========================================================================
workload            what trains (tuned LR; the benchmark also runs x3, x10, x30)
==================  ===========================================================================
``lstm_lm``         word-level LSTM language model, 2 x 200 (the PyTorch word_language_model
                    recipe: SGD lr 20, dropout 0.2; the recipe itself clips at 0.25; truncated
                    BPTT 20, batch 10 to fit 2 CPU cores), 150 steps, on English docstrings
                    of torch, numpy and lightning (:mod:`gradbench.corpus`)
``tf_pre_warm``     decoder-only transformer LM (2 layers, d 64, 4 heads, context 32, batch 8,
                    200 steps), pre-LN,
                    AdamW (betas 0.9/0.95, weight decay 0.1), linear LR warmup over 40 steps
``tf_pre_nowarm``   the same without warmup
``tf_post_warm``    post-LN, with warmup
``tf_post_nowarm``  post-LN, without warmup
``resnet_bn``       residual CNN with BatchNorm (8-16-32 channels) on a synthetic 10-class
                    16 x 16 image task, batch 32, SGD momentum 0.9, weight decay 5e-4
``irnn``            identity-initialised ReLU RNN (64 units) on the adding problem (T = 30,
                    the demos' ``AddingProblemDataModule.generate``), plain SGD, 1,000 steps
``mlp_sgd``         a user's small healthy MLP (20-64-64-1, ReLU) on a synthetic regression,
                    plain SGD lr 0.05, 300 steps
``mlp_sgd_long``    the same, 2,000 steps (a long run)
``mlp_adam_fault``  the MLP with Adam (lr 1e-3), healthy, one injected fault at step 100 (or
                    three: NaN loss at 60, Inf gradient at 120, x1e6 loss at 180; ``FAULTS``)
``mlp_sgd_fault``   the MLP with SGD (lr 0.05), healthy, one injected fault
==================  ===========================================================================

The train / validation split (:data:`TUNING_WORKLOADS`, :data:`VALIDATION_ONLY_WORKLOADS`,
:data:`TUNING_SEEDS`, :data:`VALIDATION_SEEDS`) was fixed before any result; rules are chosen
on the tuning set only, the validation set is run once, at the end, with the rule set frozen
(the reasons: ``benchmarks/results/rescue_split.md``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_gradguard.demos import AddingProblemDataModule
from lightning_gradguard.testing import Fault

from .corpus import VOCAB, corpus

__all__ = [
    "FAULTS", "TUNING_SEEDS", "TUNING_WORKLOADS", "VALIDATION_ONLY_WORKLOADS",
    "VALIDATION_SEEDS", "WORKLOADS", "RescueWorkload", "source_hash",
]

TUNING_WORKLOADS = ("lstm_lm", "mlp_sgd", "mlp_adam_fault", "mlp_sgd_fault", "tf_pre_warm")
VALIDATION_ONLY_WORKLOADS = ("tf_pre_nowarm", "tf_post_warm", "tf_post_nowarm", "resnet_bn",
                             "irnn", "mlp_sgd_long")
TUNING_SEEDS = (0, 1, 2)
VALIDATION_SEEDS = (3, 4, 5)


# ----------------------------------------------------------------------------- LSTM LM
class _BPTTData(Dataset[tuple[Tensor, Tensor]]):
    """Consecutive ``bptt`` chunks of ``batch`` parallel streams (truncated BPTT order)."""

    def __init__(self, tokens: Tensor, batch: int, bptt: int) -> None:
        n = tokens.numel() // batch
        self.data = tokens[: n * batch].view(batch, n).t().contiguous()  # [T, B]
        self.bptt = bptt

    def __len__(self) -> int:
        return (self.data.size(0) - 1) // self.bptt

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        s = i * self.bptt
        return self.data[s:s + self.bptt], self.data[s + 1:s + 1 + self.bptt]


class LSTMLM(pl.LightningModule):
    """The word_language_model recipe: embedding, 2-layer LSTM, dropout, linear decoder."""

    def __init__(self, lr: float, vocab: int = VOCAB, size: int = 200, layers: int = 2,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.lr = lr
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, size)
        self.rnn = nn.LSTM(size, size, layers, dropout=dropout)
        self.decoder = nn.Linear(size, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        self.hidden: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, hidden: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if batch_idx == 0:
            self.hidden = None
        hidden = None if self.hidden is None else (self.hidden[0].detach(),
                                                    self.hidden[1].detach())
        logits, self.hidden = self(x, hidden)
        return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def val_loss(self) -> float:
        was = self.training
        self.eval()
        data = _BPTTData(corpus().val, 10, 20)
        total, n, hidden = 0.0, 0, None
        for i in range(min(len(data), 60)):
            x, y = data[i]
            logits, hidden = self(x, hidden)
            total += float(nn.functional.cross_entropy(logits.view(-1, logits.size(-1)),
                                                       y.reshape(-1), reduction="sum"))
            n += y.numel()
        self.train(was)
        return total / n


def _lstm_lm(lr: float, seed: int) -> tuple[pl.LightningModule, DataLoader[Any]]:
    torch.manual_seed(seed)
    model = LSTMLM(lr)
    data = _BPTTData(corpus().train, 10, 20)
    return model, DataLoader(data, batch_size=None, shuffle=False)


# ----------------------------------------------------------------------------- transformer
class _Windows(IterableDataset[tuple[Tensor, Tensor]]):
    """Endless random context windows of a token stream (seeded)."""

    def __init__(self, tokens: Tensor, batch: int, ctx: int, seed: int) -> None:
        self.tokens, self.batch, self.ctx, self.seed = tokens, batch, ctx, seed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(1000 + self.seed)
        hi = self.tokens.numel() - self.ctx - 1
        while True:
            starts = torch.randint(0, hi, (self.batch,), generator=g)
            idx = starts[:, None] + torch.arange(self.ctx + 1)
            w = self.tokens[idx]
            yield w[:, :-1], w[:, 1:]


class TransformerLM(pl.LightningModule):
    """Decoder-only transformer LM (causal self-attention), pre-LN or post-LN, AdamW."""

    def __init__(self, lr: float, pre_ln: bool, warmup: int, vocab: int = VOCAB, d: int = 64,
                 layers: int = 2, heads: int = 4, ctx: int = 32) -> None:
        super().__init__()
        self.lr, self.warmup, self.ctx = lr, warmup, ctx
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=pre_ln)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d) if pre_ln else nn.Identity()
        self.head = nn.Linear(d, vocab)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.mask: Tensor
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.size(1)
        h = self.embed(x) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        logits: Tensor = self.head(self.norm(h))
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and n != "pos"]
        rest = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and n != "pos")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": rest, "weight_decay": 0.0}],
                                lr=self.lr, betas=(0.9, 0.95))
        if self.warmup <= 0:
            return opt
        w = self.warmup
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / w))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def val_loss(self) -> float:
        was = self.training
        self.eval()
        val = corpus().val
        n = (val.numel() - 1) // self.ctx
        starts = torch.linspace(0, val.numel() - self.ctx - 2, min(n, 256)).long()
        idx = starts[:, None] + torch.arange(self.ctx + 1)
        w = val[idx]
        total = 0.0
        for chunk in torch.split(w, 64):
            logits = self(chunk[:, :-1])
            total += float(nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum"))
        self.train(was)
        return total / (w.size(0) * self.ctx)


def _transformer(pre_ln: bool, warmup: int) -> Callable[[float, int], Any]:
    def build(lr: float, seed: int) -> tuple[pl.LightningModule, DataLoader[Any]]:
        torch.manual_seed(seed)
        model = TransformerLM(lr, pre_ln, warmup)
        return model, DataLoader(_Windows(corpus().train, 8, 32, seed), batch_size=None)
    return build


# ----------------------------------------------------------------------------- ResNet-BN
def _images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A 10-class 3 x 16 x 16 task: smooth class templates, random shifts, noise."""
    g = torch.Generator().manual_seed(1234)  # the task is the same for every seed
    templates = nn.functional.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=16,
                                          mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y]
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2))
                     for xi, s in zip(x, shifts, strict=True)])
    return x + 1.5 * torch.randn(x.shape, generator=g), y


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.short(x))


class ResNetBN(pl.LightningModule):
    """A small ResNet (BasicBlocks 8-16-32, BatchNorm), SGD momentum 0.9, weight decay 5e-4."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.blocks = nn.Sequential(_Block(8, 8, 1), _Block(8, 16, 2), _Block(16, 32, 2))
        self.fc = nn.Linear(32, 10)
        self.val_x, self.val_y = _images(1024, 999)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)

    @torch.no_grad()
    def val_loss(self) -> float:
        was = self.training
        self.eval()
        loss = float(nn.functional.cross_entropy(self(self.val_x), self.val_y))
        self.train(was)
        return loss


def _resnet(lr: float, seed: int) -> tuple[pl.LightningModule, DataLoader[Any]]:
    torch.manual_seed(seed)
    model = ResNetBN(lr)
    x, y = _images(4096, 0)
    g = torch.Generator().manual_seed(seed)
    return model, DataLoader(list(zip(x, y, strict=True)),  # type: ignore[arg-type]
                             batch_size=32, shuffle=True, generator=g)


# ----------------------------------------------------------------------------- IRNN
def _adding(n: int, t: int) -> AddingProblemDataModule:
    """The demo adding problem (``AddingProblemDataModule.generate``): ``n`` sequences of ``t``."""
    return AddingProblemDataModule(seq_len=t, num_samples=n, batch_size=1)


class _AddingStream(IterableDataset[tuple[Tensor, Tensor]]):
    def __init__(self, batch: int, t: int, seed: int) -> None:
        self.batch, self.t, self.seed = batch, t, seed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(2000 + self.seed)
        data = _adding(self.batch, self.t)
        while True:
            yield data.generate(g)


class IRNN(pl.LightningModule):
    """Le et al. (2015): ReLU RNN, recurrent weights = identity, biases 0, plain SGD."""

    def __init__(self, lr: float, hidden: int = 64, t: int = 30) -> None:
        super().__init__()
        self.lr = lr
        self.rnn = nn.RNN(2, hidden, nonlinearity="relu", batch_first=True)
        p = dict(self.rnn.named_parameters())
        with torch.no_grad():
            p["weight_hh_l0"].copy_(torch.eye(hidden))
            p["weight_ih_l0"].normal_(0.0, 0.001)
            p["bias_hh_l0"].zero_()
            p["bias_ih_l0"].zero_()
        self.out = nn.Linear(hidden, 1)
        self.val_x, self.val_y = _adding(1000, t).generate(torch.Generator().manual_seed(77))

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        out: Tensor = self.out(h[:, -1])
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def val_loss(self) -> float:
        return float(nn.functional.mse_loss(self(self.val_x), self.val_y))


def _irnn(lr: float, seed: int) -> tuple[pl.LightningModule, DataLoader[Any]]:
    torch.manual_seed(seed)
    return IRNN(lr), DataLoader(_AddingStream(32, 30, seed), batch_size=None)


# ----------------------------------------------------------------------------- MLP
def _regression(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random teacher (tanh MLP) plus noise; inputs N(0, 1) in 20 dimensions."""
    g = torch.Generator().manual_seed(4321)
    w1, w2 = torch.randn(20, 32, generator=g) / 20 ** 0.5, torch.randn(32, 1, generator=g)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = torch.tanh(x @ w1) @ w2 / 32 ** 0.5 * 2.0
    return x, y + 0.1 * torch.randn(y.shape, generator=g)


class UserMLP(pl.LightningModule):
    """A user's small MLP (20-64-64-1, ReLU, PyTorch's default init), SGD or Adam."""

    def __init__(self, lr: float, optimizer: str = "sgd") -> None:
        super().__init__()
        self.lr, self.optimizer_name = lr, optimizer
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 1))
        self.val_x, self.val_y = _regression(1024, 999)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def val_loss(self) -> float:
        return float(nn.functional.mse_loss(self(self.val_x), self.val_y))


def _mlp(optimizer: str) -> Callable[[float, int], Any]:
    def build(lr: float, seed: int) -> tuple[pl.LightningModule, DataLoader[Any]]:
        torch.manual_seed(seed)
        model = UserMLP(lr, optimizer)
        x, y = _regression(2048, 0)
        g = torch.Generator().manual_seed(seed)
        return model, DataLoader(list(zip(x, y, strict=True)),  # type: ignore[arg-type]
                                 batch_size=32, shuffle=True, generator=g)
    return build


# ----------------------------------------------------------------------------- registry
#: Injected faults of the ``*_fault`` workloads (``FaultInjector`` steps are 0-based).
FAULTS: dict[str, tuple[Fault, ...]] = {
    "clean": (),
    "nan_loss": (Fault(step=100, kind="nan", target="loss"),),
    "inf_grad": (Fault(step=100, kind="inf", target="grad"),),
    "spike1e6": (Fault(step=100, kind="scale", factor=1e6, target="loss"),),
    "all3": (Fault(step=60, kind="nan", target="loss"), Fault(step=120, kind="inf",
                                                               target="grad"),
                   Fault(step=180, kind="scale", factor=1e6, target="loss")),
}


def source_hash() -> str:
    """Hash of this file (the workloads' definitions): part of every run's cache key."""
    return hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]


class _Loader(pl.LightningDataModule):
    """A datamodule around a workload's training loader (built with the model)."""

    def __init__(self, loader: DataLoader[Any]) -> None:
        super().__init__()
        self.loader = loader

    def train_dataloader(self) -> DataLoader[Any]:
        return self.loader


Builder = Callable[[float, int], tuple[pl.LightningModule, DataLoader[Any]]]


@dataclass(frozen=True)
class RescueWorkload:
    """One workload: a builder ``(lr, seed) -> (module, train loader)`` and its protocol.

    ``lr_mults`` multiply ``tuned_lr``; ``faults`` names entries of :data:`FAULTS` (each one
    a separate run at every LR); the module's ``val_loss()`` is the metric;
    ``extra_methods`` are the recipe's own methods (the LSTM's ``clip0.25``).
    """

    name: str
    builder: Builder
    tuned_lr: float
    steps: int
    note: str
    lr_mults: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    faults: tuple[str, ...] = ("clean",)
    extra_methods: tuple[str, ...] = field(default=())
    #: a fixed number of optimizer steps, however many epochs that takes
    trainer_kwargs: dict[str, Any] = field(default_factory=lambda: {"max_epochs": -1})

    def lrs(self) -> list[float]:
        return [float(f"{self.tuned_lr * m:.4g}") for m in self.lr_mults]

    def cache_key(self, lr: float, seed: int) -> dict[str, Any]:
        """The workloads' source: a changed workload reruns (gradbench ``RunCache``)."""
        return {"rescue_workloads": source_hash()}

    def build(self, lr: float, seed: int) -> tuple[pl.LightningModule, _Loader]:
        model, loader = self.builder(lr, seed)
        return model, _Loader(loader)

    def evaluate(self, model: Any, datamodule: Any) -> dict[str, float]:
        return {"val_loss": float(model.val_loss())}


WORKLOADS: dict[str, RescueWorkload] = {w.name: w for w in (
    RescueWorkload("lstm_lm", _lstm_lm, 20.0, 150,
                   "word LSTM LM 2x200 on docstrings, SGD (recipe lr 20, recipe clip 0.25), "
                   "truncated BPTT 20, batch 10", extra_methods=("clip0.25",)),
    RescueWorkload("tf_pre_warm", _transformer(True, 40), 3e-3, 200,
                   "transformer LM, pre-LN, AdamW(0.9, 0.95, wd 0.1), warmup 40 steps"),
    RescueWorkload("tf_pre_nowarm", _transformer(True, 0), 3e-3, 200,
                   "transformer LM, pre-LN, AdamW, no warmup"),
    RescueWorkload("tf_post_warm", _transformer(False, 40), 3e-3, 200,
                   "transformer LM, post-LN, AdamW, warmup 40 steps"),
    RescueWorkload("tf_post_nowarm", _transformer(False, 0), 3e-3, 200,
                   "transformer LM, post-LN, AdamW, no warmup"),
    RescueWorkload("resnet_bn", _resnet, 0.1, 300,
                   "ResNet (BatchNorm) on synthetic 16x16 images, SGD momentum 0.9"),
    RescueWorkload("irnn", _irnn, 0.01, 1000,
                   "IRNN(64) adding problem T=30, plain SGD, 1000 steps"),
    RescueWorkload("mlp_sgd", _mlp("sgd"), 0.05, 300, "user MLP, plain SGD"),
    RescueWorkload("mlp_sgd_long", _mlp("sgd"), 0.05, 2000, "user MLP, plain SGD, 2000 steps"),
    RescueWorkload("mlp_adam_fault", _mlp("adam"), 1e-3, 300,
                   "user MLP, Adam, one injected fault", lr_mults=(1.0,),
                   faults=("clean", "nan_loss", "inf_grad", "spike1e6", "all3")),
    RescueWorkload("mlp_sgd_fault", _mlp("sgd"), 0.05, 300,
                   "user MLP, SGD, one injected fault", lr_mults=(1.0,),
                   faults=("clean", "nan_loss", "inf_grad", "spike1e6", "all3")),
)}

