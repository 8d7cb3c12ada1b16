"""The zoo: training recipes drawn from real model definitions, the proving ground of defaults.

A seeded generator (:func:`draw`) turns a generator seed into a :class:`Recipe`: a model
family, an optimizer, an LR schedule, a batch size and the traits that break heuristics.
The models are real definitions, not models written for the purpose:

=============  ==================================================================  ==========
family         model                                                               task
=============  ==================================================================  ==========
``gpt2``       ``transformers.GPT2LMHeadModel`` (pre-LN, dropout, tied embeddings)  text LM
``llama``      ``transformers.LlamaForCausalLM`` (RMSNorm, SwiGLU, GQA, RoPE)       text LM
``bert``       ``transformers.BertForMaskedLM`` (post-LN, masked LM)               text MLM
``vit``        ``transformers.ViTForImageClassification``                          images
``resnet``     ``transformers.ResNetForImageClassification`` (BatchNorm)           images
``convnext``   ``transformers.ConvNextForImageClassification`` (DropPath, own LN)  images
``tf_pre``     ``nn.TransformerEncoder`` with ``norm_first=True``                   text LM
``tf_post``    ``nn.TransformerEncoder`` with ``norm_first=False``                  text LM
``lstm``       ``nn.LSTM`` language model (2 layers, dropout)                       text LM
``gru``        ``nn.GRU`` language model                                            text LM
``conv1d``     ``nn.Conv1d`` stack with BatchNorm, global pooling                   sequences
``mlp``        ``nn.Sequential`` MLP regression, targets of scale 0.1-10            regression
``linear``     a zero-initialised ``nn.Linear`` (logistic or linear regression)    linear
=============  ==================================================================  ==========

Traits (drawn where they apply): a zero-initialised head, tied input/output embeddings, a
frozen backbone (the first half of the parameters), heavy weight decay, batch sizes 8-256.
Optimizers: SGD, SGD + momentum, Nesterov, Adam, AdamW, RMSprop, Adagrad, a subclass of
``torch.optim.AdamW`` (named like a third-party 8-bit AdamW) and ``schedulefree``'s
``AdamWScheduleFree``; schedules: constant, linear warmup + cosine, OneCycle.

Each recipe has a healthy LR: the documented default of its optimizer family (Adam, AdamW,
RMSprop 1e-3, Adagrad 1e-2, schedule-free AdamW 2.5e-3), or, for the SGD family (which has
none), the best of a sweep without any guard (:data:`SGD_SWEEP`).

Text is the docstring corpus (:func:`gradbench.corpus.corpus`, shared with the rescue
benchmark); images and sequences are class templates plus noise; regression targets are a
random linear map of the inputs. Everything is generated from seeds; nothing is downloaded.

The split (:data:`TUNING_SEEDS`, :data:`VALIDATION_SEEDS`) is by generator seed and was fixed
before any zoo result was looked at.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .corpus import corpus

__all__ = [
    "FAMILIES", "OPTIMIZERS", "SGD_SWEEP", "TUNING_SEEDS", "VALIDATION_SEEDS", "Recipe",
    "ZooModule", "ZooWorkload", "draw", "recipes",
]

#: bump when a model, data or run definition changes: cached runs are then redone
ZOO_VERSION = 1

#: generator seeds of the tuning set (defaults may be chosen on these)
TUNING_SEEDS: tuple[int, ...] = tuple(range(0, 32))
#: generator seeds of the validation set (reported once, never tuned on)
VALIDATION_SEEDS: tuple[int, ...] = tuple(range(100, 132))

FAMILIES: tuple[str, ...] = ("gpt2", "llama", "bert", "vit", "resnet", "convnext", "tf_pre",
                             "tf_post", "lstm", "gru", "conv1d", "mlp", "linear")
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop",
                               "adagrad", "adamw_subclass", "schedulefree")
SCHEDULES: tuple[str, ...] = ("constant", "warmup_cosine", "onecycle")
#: the documented default LR of each adaptive optimizer family
DEFAULT_LR: dict[str, float] = {"adam": 1e-3, "adamw": 1e-3, "adamw_subclass": 1e-3,
                                "rmsprop": 1e-3, "adagrad": 1e-2, "schedulefree": 2.5e-3}
#: the SGD family's healthy LR is the best of these without a guard
SGD_SWEEP: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
SGD_FAMILY = ("sgd", "momentum", "nesterov")

TEXT = ("gpt2", "llama", "bert", "tf_pre", "tf_post", "lstm", "gru")
IMAGES = ("vit", "resnet", "convnext")
VOCAB = 1000
CTX = 16
#: families whose output head can be zero-initialised (not tied to an input embedding)
ZERO_HEAD = ("vit", "resnet", "convnext", "tf_pre", "tf_post", "lstm", "gru", "conv1d", "mlp")


@dataclass(frozen=True)
class Recipe:
    """One drawn training recipe (see the module docstring).

    Attributes:
        seed: The generator seed (also the training seed).
        family: Model family (:data:`FAMILIES`).
        optimizer: Optimizer (:data:`OPTIMIZERS`).
        schedule: LR schedule (:data:`SCHEDULES`).
        batch: Batch size.
        steps: Optimizer steps of one run.
        zero_head: The output head starts at zero.
        tied: Output weights tied to the input embedding (LMs).
        frozen: The first half of the parameters is frozen.
        weight_decay: Weight decay of the optimizer.
        target_scale: Scale of regression targets (``mlp``, ``linear``).
        linear_task: ``"logistic"`` or ``"regression"`` (``linear``).
    """

    seed: int
    family: str
    optimizer: str
    schedule: str
    batch: int
    steps: int = 80
    zero_head: bool = False
    tied: bool = False
    frozen: bool = False
    weight_decay: float = 0.0
    target_scale: float = 1.0
    linear_task: str = "logistic"

    @property
    def name(self) -> str:
        return f"z{self.seed:03d}_{self.family}_{self.optimizer}"

    @property
    def traits(self) -> str:
        """The drawn traits in a few words, for reports."""
        out = [self.schedule, f"batch {self.batch}"]
        if self.zero_head:
            out.append("zero head" if self.family != "linear" else "zero init")
        if self.tied:
            out.append("tied emb.")
        if self.frozen:
            out.append("frozen half")
        if self.weight_decay:
            out.append(f"wd {self.weight_decay:g}")
        if self.family in ("mlp", "linear"):
            out.append(f"targets x{self.target_scale:.2g}"
                       + (f" {self.linear_task}" if self.family == "linear" else ""))
        return ", ".join(out)

    @property
    def sgd_family(self) -> bool:
        return self.optimizer in SGD_FAMILY


def draw(seed: int, steps: int = 80) -> Recipe:
    """The recipe of generator seed ``seed`` (same seed, same recipe, on every machine).

    >>> draw(7) == draw(7)
    True
    >>> draw(3).family in FAMILIES
    True
    """
    rng = random.Random(1_000_003 * seed + 17)
    family = rng.choice(FAMILIES)
    optimizer = rng.choice(OPTIMIZERS)
    schedule = "constant" if optimizer == "schedulefree" else rng.choice(SCHEDULES)
    if family in TEXT:
        batch = rng.choice((8, 16, 32))
    elif family in IMAGES:
        batch = rng.choice((16, 32, 64))
    else:
        batch = rng.choice((8, 16, 32, 64, 128, 256))
    zero_head = family == "linear" or (family in ZERO_HEAD and rng.random() < 0.3)
    tied = family == "gpt2" or (family in ("lstm", "gru", "tf_pre", "tf_post")
                                and not zero_head and rng.random() < 0.3)
    frozen = family not in ("linear",) and rng.random() < 0.15
    heavy = optimizer in ("adamw", "adamw_subclass", "schedulefree", "sgd", "momentum") \
        and rng.random() < 0.25
    weight_decay = (0.1 if optimizer in ("adamw", "adamw_subclass", "schedulefree") else 5e-3) \
        if heavy else 0.0
    target_scale = float(f"{10 ** rng.uniform(-1.0, 1.0):.3g}")
    linear_task = rng.choice(("logistic", "regression"))
    return Recipe(seed, family, optimizer, schedule, batch, steps, zero_head, tied, frozen,
                  weight_decay, target_scale, linear_task)


def recipes(which: str, steps: int = 80) -> list[Recipe]:
    """The recipes of ``"tuning"``, ``"validation"`` or ``"all"``."""
    seeds = {"tuning": TUNING_SEEDS, "validation": VALIDATION_SEEDS,
             "all": TUNING_SEEDS + VALIDATION_SEEDS}[which]
    return [draw(s, steps) for s in seeds]


# ----------------------------------------------------------------------------- data
def _text() -> tuple[Tensor, Tensor]:
    c = corpus()  # the docstring corpus (built once, cached)
    return c.train, c.val


def _windows(tokens: Tensor, n: int, batch: int, g: torch.Generator) -> list[Tensor]:
    starts = torch.randint(0, len(tokens) - CTX - 1, (n, batch), generator=g)
    offs = torch.arange(CTX + 1)
    return [tokens[s[:, None] + offs] for s in starts]


def _templates(shape: tuple[int, ...], classes: int, g: torch.Generator) -> Tensor:
    t = torch.randn(classes, *shape, generator=g)
    if len(shape) == 3:  # smooth images: average-pool the noise
        t = nn.functional.avg_pool2d(t, 3, stride=1, padding=1) * 2.0
    return t


def _labelled(templates: Tensor, n: int, batch: int, g: torch.Generator,
              noise: float) -> list[tuple[Tensor, Tensor]]:
    out = []
    for _ in range(n):
        y = torch.randint(0, len(templates), (batch,), generator=g)
        x = templates[y] + noise * torch.randn(batch, *templates.shape[1:], generator=g)
        out.append((x, y))
    return out


@dataclass
class _Data:
    train: list[Any]
    val: list[Any]


def _make_data(r: Recipe) -> _Data:
    """Training batches for ``r.steps`` steps and a fixed validation set."""
    g = torch.Generator().manual_seed(10_000 + r.seed)
    n = r.steps + 2
    if r.family in TEXT:
        train, val = _text()
        gv = torch.Generator().manual_seed(99)
        return _Data(_windows(train, n, r.batch, g), _windows(val, 4, 32, gv))
    if r.family in IMAGES or r.family == "conv1d":
        shape = (3, 16, 16) if r.family in IMAGES else (4, 32)
        tpl = _templates(shape, 10, g)
        gv = torch.Generator().manual_seed(20_000 + r.seed)
        return _Data(_labelled(tpl, n, r.batch, g, 1.5), _labelled(tpl, 4, 64, gv, 1.5))
    d = 20 if r.family == "mlp" else 10
    w = torch.randn(d, 1, generator=g) * r.target_scale

    def make(k: int, bs: int, gen: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        out = []
        for _ in range(k):
            x = torch.randn(bs, d, generator=gen)
            y = x @ w
            if r.family == "linear" and r.linear_task == "logistic":
                y = (y + 0.5 * torch.randn(bs, 1, generator=gen) > 0).float()
            out.append((x, y))
        return out

    gv = torch.Generator().manual_seed(20_000 + r.seed)
    return _Data(make(n, r.batch, g), make(8, 256, gv))


class _ListData(Dataset[Any]):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class _DataModule(pl.LightningDataModule):
    def __init__(self, data: _Data) -> None:
        super().__init__()
        self.data = data

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(_ListData(self.data.train), batch_size=None, shuffle=False)


# ----------------------------------------------------------------------------- models
class _HF(nn.Module):
    """A Hugging Face model returning its logits (the user's ``forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits  # type: ignore[no-any-return]


class _TorchLM(nn.Module):
    """``nn.TransformerEncoder`` (causal) or an LSTM/GRU language model."""

    def __init__(self, kind: str, tied: bool, d: int = 48) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(VOCAB, d)
        if kind in ("tf_pre", "tf_post"):
            self.pos = nn.Parameter(torch.randn(CTX, d) * 0.02)
            layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True,
                                               norm_first=kind == "tf_pre")
            self.body: nn.Module = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            rnn = nn.LSTM if kind == "lstm" else nn.GRU
            self.body = rnn(d, d, num_layers=2, dropout=0.2, batch_first=True)
        self.head = nn.Linear(d, VOCAB)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        if self.kind in ("tf_pre", "tf_post"):
            h = h + self.pos[: x.shape[1]]
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            h = self.body(h, mask=mask, is_causal=True)
        else:
            h, _ = self.body(h)
        return self.head(h)  # type: ignore[no-any-return]


def _conv1d() -> nn.Module:
    layers: list[nn.Module] = []
    c = 4
    for out in (16, 16, 32, 32):
        layers += [nn.Conv1d(c, out, 5, padding=2), nn.BatchNorm1d(out), nn.ReLU()]
        c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c, 10))


def _hf_model(family: str) -> nn.Module:
    import transformers

    tr: Any = transformers  # the configs take kwargs (num_labels) their stubs do not declare
    tr.logging.set_verbosity_error()
    if family == "gpt2":
        cfg = tr.GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=64, n_layer=2, n_head=4)
        return _HF(tr.GPT2LMHeadModel(cfg))
    if family == "llama":
        cfg = tr.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=CTX, tie_word_embeddings=False)
        return _HF(tr.LlamaForCausalLM(cfg))
    if family == "bert":
        cfg = tr.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=256,
                            max_position_embeddings=CTX + 1)
        return _HF(tr.BertForMaskedLM(cfg))
    if family == "vit":
        cfg = tr.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           num_labels=10)
        return _HF(tr.ViTForImageClassification(cfg))
    if family == "resnet":
        cfg = tr.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                              depths=[1, 1], layer_type="basic", num_labels=10)
        return _HF(tr.ResNetForImageClassification(cfg))
    if family == "convnext":
        cfg = tr.ConvNextConfig(num_channels=3, patch_size=4, num_stages=2,
                                hidden_sizes=[16, 32], depths=[1, 1], drop_path_rate=0.1,
                                num_labels=10, image_size=16)
        return _HF(tr.ConvNextForImageClassification(cfg))
    raise ValueError(f"not a transformers family: {family!r}")


def _head(net: nn.Module) -> nn.Linear:
    """The output layer: the last ``nn.Linear`` of the model."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


def build_net(r: Recipe) -> nn.Module:
    """The recipe's model (call after seeding: the weights use the global RNG)."""
    if r.family in ("gpt2", "llama", "bert", "vit", "resnet", "convnext"):
        net = _hf_model(r.family)
    elif r.family in ("tf_pre", "tf_post", "lstm", "gru"):
        net = _TorchLM(r.family, r.tied)
    elif r.family == "conv1d":
        net = _conv1d()
    elif r.family == "mlp":
        net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                            nn.Linear(64, 1))
    else:
        net = nn.Linear(10, 1)
    if r.zero_head:
        head = _head(net)
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    if r.frozen:
        params = list(net.parameters())
        for p in params[: len(params) // 2]:
            p.requires_grad_(False)
    return net


# ----------------------------------------------------------------------------- optimizers
class AdamW8bit(torch.optim.AdamW):
    """A subclass of ``torch.optim.AdamW`` named like a third-party one (same updates)."""


def build_optimizer(r: Recipe, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer at learning rate ``lr``."""
    wd = r.weight_decay
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if r.optimizer == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if r.optimizer == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd or 0.01)
    if r.optimizer == "adamw_subclass":
        return AdamW8bit(params, lr=lr, weight_decay=wd or 0.01)
    if r.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    if r.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    if r.optimizer == "schedulefree":
        from schedulefree import AdamWScheduleFree  # type: ignore[import-untyped]

        opt: torch.optim.Optimizer = AdamWScheduleFree(params, lr=lr, weight_decay=wd,
                                                       warmup_steps=r.steps // 10)
        return opt
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {r.optimizer!r}")


def build_schedule(r: Recipe, opt: torch.optim.Optimizer, lr: float) -> Any:
    """The recipe's step-interval scheduler (``None`` for a constant LR)."""
    if r.schedule == "constant":
        return None
    if r.schedule == "onecycle":
        d = opt.defaults  # cycle the momentum only where there is one (not plain SGD, Adagrad)
        cycle = "betas" in d or float(d.get("momentum", 0.0)) > 0.0
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=r.steps + 1,
                                                   cycle_momentum=cycle)
    warm = max(1, r.steps // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (r.steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------- the module
def _mask(x: Tensor, g: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's masking: 15 % of the tokens become ``<unk>`` (id 0), the labels the rest -100."""
    pick = torch.rand(x.shape, generator=g) < 0.15
    labels = torch.where(pick, x, torch.full_like(x, -100))
    return torch.where(pick, torch.zeros_like(x), x), labels


class ZooModule(pl.LightningModule):
    """A recipe as a LightningModule: its model, loss, optimizer and schedule."""

    def __init__(self, recipe: Recipe, lr: float) -> None:
        super().__init__()
        self.recipe = recipe
        self.lr = lr
        self.net = build_net(recipe)
        self.opt: torch.optim.Optimizer | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def loss(self, batch: Any, g: torch.Generator | None = None) -> Tensor:
        r = self.recipe
        if r.family == "bert":
            inputs, labels = _mask(batch[:, :-1], g)
            logits = self(inputs)
            return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1),
                                               ignore_index=-100)
        if r.family in TEXT:
            logits = self(batch[:, :-1])
            return nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                               batch[:, 1:].reshape(-1))
        x, y = batch
        out = self(x)
        if r.family in ("mlp", "linear"):
            if r.family == "linear" and r.linear_task == "logistic":
                return nn.functional.binary_cross_entropy_with_logits(out, y)
            return nn.functional.mse_loss(out, y)
        return nn.functional.cross_entropy(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        self.opt = build_optimizer(self.recipe, params, self.lr)
        sched = build_schedule(self.recipe, self.opt, self.lr)
        if sched is None:
            return self.opt
        return {"optimizer": self.opt,
                "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        opt: Any = self.opt
        if hasattr(opt, "train"):
            opt.train()  # schedule-free optimizers: the training weights

    @torch.no_grad()
    def evaluate(self, val: list[Any]) -> float:
        """Mean validation loss (eval mode; schedule-free: the averaged weights)."""
        was = self.training
        self.eval()
        opt: Any = self.opt  # schedule-free optimizers have train() / eval()
        if hasattr(opt, "eval"):
            opt.eval()
        g = torch.Generator().manual_seed(7)
        total = sum(float(self.loss(b, g)) for b in val) / len(val)
        if hasattr(opt, "train"):
            opt.train()
        self.train(was)
        return total


@dataclass(frozen=True)
class ZooWorkload:
    """A recipe as a ``gradbench`` workload (``run_one`` and ``RunCache`` take it)."""

    recipe: Recipe
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.recipe.name

    def cache_key(self, lr: float, seed: int) -> dict[str, Any]:
        return {"recipe": asdict(self.recipe), "zoo_version": ZOO_VERSION}

    def build(self, lr: float, seed: int) -> tuple[ZooModule, _DataModule]:
        model = ZooModule(self.recipe, lr)
        return model, _DataModule(_make_data(self.recipe))

    def evaluate(self, model: ZooModule, datamodule: _DataModule) -> dict[str, float]:
        return {"val_loss": model.evaluate(datamodule.data.val)}


def describe(which: str = "all") -> Iterator[str]:
    """One line per recipe (``python -m gradbench.zoo``)."""
    for r in recipes(which):
        yield f"{r.name:28s} {r.schedule:14s} {r.traits}"


if __name__ == "__main__":  # pragma: no cover
    for line in describe(sys.argv[1] if len(sys.argv) > 1 else "all"):
        print(line)

