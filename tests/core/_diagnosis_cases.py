"""The labelled set of broken and healthy training configurations for the diagnosis.

Each case plants one cause (or none) in a small model trained with a plain PyTorch loop on
synthetic data (fixed seeds, no downloads). :func:`run_case` trains until an explosion event
(a non-finite loss/gradient, or a gradient norm above 10x the median of the previous steps),
then asks the :class:`~lightning_gradguard.core.diagnosis.Diagnostician` why; a run with no
event is diagnosed on demand at its last step. The step-0 preflight is recorded as well.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.core.diagnosis import Cause, Diagnostician

WIDTH = 32
BATCH = 32


class Steep(nn.Module):
    """``2 * leaky_relu(x, 0.1)``: derivative 2, a steep activation."""

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * nn.functional.leaky_relu(x, 0.1)


class ScaledTanh(nn.Module):
    """``3 * tanh(x)``: derivative up to 3."""

    def forward(self, x: Tensor) -> Tensor:
        return 3.0 * torch.tanh(x)


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "steep": Steep, "stanh": ScaledTanh,
            "gelu": nn.GELU}[name]()


@torch.no_grad()
def _init(model: nn.Module, scheme: str) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if scheme == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif scheme == "xavier":
                nn.init.xavier_normal_(m.weight)
            elif scheme.startswith("std"):
                nn.init.normal_(m.weight, std=float(scheme[3:]))
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def mlp(depth: int = 8, act: str = "relu", init: str = "he", bn: bool = False,
        out: int = 1, ln: bool = False) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers.append(nn.Linear(WIDTH, WIDTH))
        if bn:
            layers.append(nn.BatchNorm1d(WIDTH))
        if ln:
            layers.append(nn.LayerNorm(WIDTH))
        layers.append(_act(act))
    net = nn.Sequential(*layers, nn.Linear(WIDTH, out))
    _init(net, init)
    return net


class Block(nn.Module):
    def __init__(self, act: str, bn: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(2):
            if bn:
                layers.append(nn.BatchNorm1d(WIDTH))
            layers += [_act(act), nn.Linear(WIDTH, WIDTH)]
        self.branch = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


def resmlp(depth: int = 8, act: str = "relu", init: str = "he", bn: bool = False,
           zero_last: bool = False) -> nn.Module:
    net = nn.Sequential(nn.Linear(WIDTH, WIDTH), *(Block(act, bn) for _ in range(depth)),
                        _act(act), nn.Linear(WIDTH, 1))
    _init(net, init)
    if zero_last:  # the remedy suggested for "resmlp-he": each block starts as the identity
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, Block):
                    last = m.branch[-1]
                    assert isinstance(last, nn.Linear)
                    nn.init.zeros_(last.weight)
    return net


class ConvBlock(nn.Module):
    def __init__(self, ch: int, act: str, bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(ch) if bn else nn.Identity()
        self.act = _act(act)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(ch) if bn else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


def cnn(depth: int = 6, act: str = "relu", init: str = "he", bn: bool = False,
        residual: bool = False, ch: int = 8) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, ch, 3, padding=1), _act(act)]
    if residual:
        layers += [ConvBlock(ch, act, bn) for _ in range(depth // 2)]
    else:
        for _ in range(depth):
            layers.append(nn.Conv2d(ch, ch, 3, padding=1))
            if bn:
                layers.append(nn.BatchNorm2d(ch))
            layers.append(_act(act))
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 1))
    _init(net, init)
    return net


class Seq(nn.Module):
    def __init__(self, cell: str = "lstm", hidden: int = 32, hh_scale: float = 1.0,
                 nonlinearity: str = "tanh") -> None:
        super().__init__()
        if cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(2, hidden, batch_first=True)
        elif cell == "gru":
            self.rnn = nn.GRU(2, hidden, batch_first=True)
        else:
            self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity=nonlinearity)
        if hh_scale != 1.0:
            with torch.no_grad():
                for w in self.rnn.weight_hh_l0.data.chunk(self.rnn.weight_hh_l0.shape[0]
                                                          // hidden):
                    nn.init.orthogonal_(w, gain=hh_scale)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    """Pre-built ``nn.TransformerEncoder`` (post-norm, GELU): LayerNorm + residual inside."""

    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(2, WIDTH)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True,
                                       activation="gelu"), layers)
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.inp(x))[:, -1])


Data = Callable[[int], tuple[Tensor, Tensor]]


def vec_data(seed: int, corrupt_at: int | None = None, const_y_at: int | None = None,
             scale_at: int | None = None) -> Data:
    g = torch.Generator().manual_seed(1000 + seed)
    teacher = torch.randn(WIDTH, generator=g) / math.sqrt(WIDTH)
    xs = torch.randn(64, BATCH, WIDTH, generator=g)

    def get(step: int) -> tuple[Tensor, Tensor]:
        x = xs[step % 64].clone()
        y = torch.tanh(x @ teacher * 2).unsqueeze(1)
        if step == corrupt_at:
            x[3, 5] = float("nan")
            x[7, 1] = float("inf")
        if step == const_y_at:
            y = torch.full_like(y, 0.5)
        if step == scale_at:
            x = x * 400.0
        return x, y
    return get


def img_data(seed: int, corrupt_at: int | None = None, const_y_at: int | None = None) -> Data:
    g = torch.Generator().manual_seed(2000 + seed)
    xs = torch.randn(64, BATCH, 1, 8, 8, generator=g)

    def get(step: int) -> tuple[Tensor, Tensor]:
        x = xs[step % 64].clone()
        y = x[:, 0, 2:6, 2:6].mean(dim=(1, 2)).unsqueeze(1) * 4
        if step == corrupt_at:
            x[0, 0, 1, 1] = float("nan")
        if step == const_y_at:
            y = torch.full_like(y, 0.5)
        return x, y
    return get


def seq_data(seed: int, corrupt_at: int | None = None, const_y_at: int | None = None,
             seq_len: int = 20) -> Data:
    g = torch.Generator().manual_seed(3000 + seed)
    vals = torch.rand(64, BATCH, seq_len, generator=g)
    marks = torch.zeros(64, BATCH, seq_len)
    idx = torch.randint(0, seq_len, (64, BATCH, 2), generator=g)
    marks.scatter_(2, idx, 1.0)

    def get(step: int) -> tuple[Tensor, Tensor]:
        v, m = vals[step % 64], marks[step % 64]
        x = torch.stack([v, m], dim=2).clone()
        y = (v * m).sum(dim=1, keepdim=True)
        if step == corrupt_at:
            x[2, 4, 0] = float("nan")
        if step == const_y_at:
            y = torch.full_like(y, 0.5)
        return x, y
    return get


def mse(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(out, y)


def normalised_mse(out: Tensor, y: Tensor) -> Tensor:
    """MSE divided by the target variance: a division by zero on a constant batch."""
    return ((out - y) ** 2).mean() / y.var(unbiased=False)


def naive_softmax_ce(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy through a hand-written softmax: exp overflows on large logits."""
    labels = (y.squeeze(1) > 0).long()
    e = torch.exp(out)
    p = e / e.sum(dim=1, keepdim=True)
    return -torch.log(p[torch.arange(len(labels)), labels]).mean()


@dataclass
class Case:
    name: str
    planted: str | None
    model: Callable[[], nn.Module]
    data: Data
    optimizer: str = "sgd"
    lr: float = 0.01
    loss: Callable[[Tensor, Tensor], Tensor] = mse
    steps: int = 30
    seed: int = 0
    #: remedies in place: texts that must not appear in any suggested remedy
    forbidden: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Result:
    case: Case
    event: str
    step: int
    causes: list[Cause]
    preflight: list[Cause]

    @property
    def top(self) -> str | None:
        return self.causes[0].cause if self.causes else None


def _opt(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.RMSprop(params, lr=lr)


@dataclass
class Fed:
    """Where :func:`feed` stopped: the event (``"on_demand"``: none), its step, the pre-flight
    causes, and the last step's per-tensor gradient norms, loss and batch."""

    event: str
    step: int
    pre: list[Cause]
    norms: dict[str, float]
    loss: float
    batch: tuple[Tensor, Tensor] | None


def feed(doc: Diagnostician, model: nn.Module, opt: torch.optim.Optimizer,
         batches: Iterable[tuple[Tensor, Tensor]],
         loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Fed:
    """Train on ``batches`` feeding ``doc`` as the guard would (pre-flight at step 0, then the
    host floats of every step) until the first non-finite step or spike (> 10x the median
    total norm so far, from step 3 on); that step is not taken."""
    totals: list[float] = []
    pre: list[Cause] = []
    event, norms, loss_f, step, batch = "on_demand", {}, math.nan, 0, None
    for step, (x, y) in enumerate(batches):
        batch = (x, y)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        per = torch.stack([g.norm() for _, g in named]).tolist()
        norms = {n: v for (n, _), v in zip(named, per, strict=False)}
        total = math.sqrt(sum(v * v for v in per))
        loss_f = float(loss.detach())
        if step == 0:
            pre = doc.preflight(norms, loss_f)
        else:
            doc.observe(step, loss_f, total)
        if not (math.isfinite(total) and math.isfinite(loss_f)):
            event = "nonfinite"
        elif step >= 3 and total > 10 * statistics.median(totals):
            event = "spike"
        if event != "on_demand":
            break
        totals.append(total)
        opt.step()
    return Fed(event, step, pre, norms, loss_f, batch)


def run_case(case: Case) -> Result:
    torch.manual_seed(case.seed)
    model = case.model()
    opt = _opt(case.optimizer, model.parameters(), case.lr)
    doc = Diagnostician(model, opt)
    doc.watch_forward()
    fed = feed(doc, model, opt, (case.data(s) for s in range(case.steps)), case.loss)
    if fed.event != "on_demand":
        causes = doc.diagnose(fed.event, fed.norms, fed.loss,  # type: ignore[arg-type]
                              batch=fed.batch)
    else:
        causes = doc.diagnose("on_demand", fed.norms, fed.loss)
    return Result(case, fed.event, fed.step, causes, fed.pre)


BN = ("BatchNorm", "LayerNorm", "normalisation layer")
RES = ("skip connection",)
ADAM = ("adaptive optimizer",)


def broken_cases() -> list[Case]:
    v, im, sq = vec_data, img_data, seq_data
    return [
        # init_too_large
        Case("mlp-relu-std1", "init_too_large", lambda: mlp(init="std1.0"), v(0), lr=1e-3),
        Case("mlp-tanh-std1", "init_too_large", lambda: mlp(act="tanh", init="std1.0"), v(1),
             lr=0.5),
        Case("cnn-relu-std1", "init_too_large", lambda: cnn(init="std1.0"), im(0), lr=1e-3),
        Case("resmlp-std0.5", "init_too_large", lambda: resmlp(depth=4, init="std0.5"), v(2),
             lr=1e-3, forbidden=RES),
        # activation
        Case("mlp-steep", "activation", lambda: mlp(act="steep"), v(3), lr=1e-3),
        Case("mlp-scaledtanh", "activation", lambda: mlp(act="stanh", init="he"), v(4),
             lr=0.1),
        Case("cnn-steep", "activation", lambda: cnn(act="steep"), im(1), lr=1e-3),
        # no_normalization: residual blocks without norm (He init: variance doubles per block)
        Case("resmlp-he", "no_normalization", lambda: resmlp(depth=8), v(5), lr=0.01,
             forbidden=RES),
        Case("rescnn-he", "no_normalization", lambda: cnn(depth=12, residual=True), im(2),
             lr=0.01, forbidden=RES),
        # no_residual: deep normalised plain nets
        Case("mlp-bn-deep", "no_residual", lambda: mlp(depth=32, bn=True), v(6), lr=0.5,
             forbidden=BN),
        Case("mlp-bn-tanh-deep", "no_residual", lambda: mlp(depth=32, act="tanh", bn=True),
             v(13), lr=0.5, forbidden=BN),
        Case("cnn-bn-deep", "no_residual", lambda: cnn(depth=24, bn=True), im(3), lr=2.0,
             forbidden=BN),
        # recurrent_weights
        Case("rnn-relu-hh3", "recurrent_weights",
             lambda: Seq("rnn", hh_scale=3.0, nonlinearity="relu"), sq(0), lr=1e-3),
        Case("lstm-hh4", "recurrent_weights", lambda: Seq("lstm", hh_scale=4.0), sq(1), lr=0.5),
        Case("gru-hh4", "recurrent_weights", lambda: Seq("gru", hh_scale=4.0), sq(2), lr=0.1),
        # lr_too_high
        Case("mlp-he-lr", "lr_too_high", lambda: mlp(), v(7), lr=0.3),
        Case("lstm-sgd-lr", "lr_too_high", lambda: Seq("lstm"), sq(3), lr=3.0, steps=60),
        Case("cnn-bn-lr", "lr_too_high", lambda: cnn(depth=4, bn=True), im(4), lr=5.0,
             forbidden=BN),
        Case("mlp-adam-lr", "lr_too_high", lambda: mlp(depth=4), v(8), optimizer="adam",
             lr=1.0, forbidden=ADAM),
        # loss_nonfinite
        Case("mlp-normmse", "loss_nonfinite", lambda: mlp(depth=4), v(9, const_y_at=6),
             lr=0.01, loss=normalised_mse),
        Case("cnn-normmse", "loss_nonfinite", lambda: cnn(depth=4), im(5, const_y_at=5),
             lr=0.01, loss=normalised_mse),
        Case("mlp-softmax", "loss_nonfinite", lambda: mlp(depth=4, out=2), v(10, scale_at=7),
             lr=0.01, loss=naive_softmax_ce),
        Case("gru-normmse", "loss_nonfinite", lambda: Seq("gru"), sq(4, const_y_at=4),
             optimizer="adam", lr=1e-3, loss=normalised_mse, forbidden=ADAM),
        # data_nonfinite
        Case("mlp-nan", "data_nonfinite", lambda: mlp(depth=4), v(11, corrupt_at=5), lr=0.01),
        Case("cnn-nan", "data_nonfinite", lambda: cnn(depth=4, bn=True), im(6, corrupt_at=4),
             lr=0.01, forbidden=BN),
        Case("lstm-nan", "data_nonfinite", lambda: Seq("lstm"), sq(5, corrupt_at=3),
             optimizer="adam", lr=1e-3, forbidden=ADAM),
    ]


def healthy_cases() -> list[Case]:
    v, im, sq = vec_data, img_data, seq_data
    out: list[Case] = []
    steps = 20
    for seed in (0, 1):
        out += [
            Case(f"mlp-he-sgd-s{seed}", None, lambda: mlp(), v(20 + seed), lr=0.01, seed=seed,
                 steps=steps),
            Case(f"mlp-bn-sgd-s{seed}", None, lambda: mlp(bn=True), v(22 + seed), lr=0.1,
                 seed=seed, steps=steps, forbidden=BN),
            Case(f"mlp-tanh-xavier-s{seed}", None, lambda: mlp(act="tanh", init="xavier"),
                 v(24 + seed), lr=0.05, seed=seed, steps=steps),
            Case(f"mlp-default-adam-s{seed}", None, lambda: mlp(init="default"), v(26 + seed),
                 optimizer="adam", lr=1e-3, seed=seed, steps=steps, forbidden=ADAM),
            Case(f"resmlp-bn-s{seed}", None, lambda: resmlp(bn=True), v(28 + seed), lr=0.01,
                 seed=seed, steps=steps, forbidden=BN + RES),
            Case(f"resmlp-gelu-adam-s{seed}", None, lambda: resmlp(depth=4, act="gelu",
                                                                   init="default"),
                 v(30 + seed), optimizer="adam", lr=1e-3, seed=seed, steps=steps,
                 forbidden=RES + ADAM),
            Case(f"cnn-bn-s{seed}", None, lambda: cnn(bn=True), im(20 + seed), lr=0.05,
                 seed=seed, steps=steps, forbidden=BN),
            Case(f"rescnn-bn-s{seed}", None, lambda: cnn(depth=8, bn=True, residual=True),
                 im(22 + seed), lr=0.02, seed=seed, steps=steps, forbidden=BN + RES),
            Case(f"lstm-adam-s{seed}", None, lambda: Seq("lstm"), sq(20 + seed),
                 optimizer="adam", lr=0.01, seed=seed, steps=steps, forbidden=ADAM),
            Case(f"gru-momentum-s{seed}", None, lambda: Seq("gru"), sq(22 + seed),
                 optimizer="momentum", lr=0.01, seed=seed, steps=steps),
            Case(f"resmlp-zeroinit-s{seed}", None, lambda: resmlp(zero_last=True),
                 v(32 + seed), lr=0.01, seed=seed, steps=steps, forbidden=RES),
            Case(f"transformer-adam-s{seed}", None, lambda: TinyTransformer(), sq(26 + seed),
                 optimizer="adam", lr=1e-3, seed=seed, steps=steps, forbidden=BN + RES + ADAM),
            Case(f"rnn-tanh-adam-s{seed}", None, lambda: Seq("rnn"), sq(24 + seed),
                 optimizer="adam", lr=1e-3, seed=seed, steps=steps, forbidden=ADAM),
        ]
    return out
