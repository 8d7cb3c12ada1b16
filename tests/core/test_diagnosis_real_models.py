"""The diagnosis on standard models: structure and optimizers recognised by what they
do, no false cause on healthy runs, every batch read, evidence that agrees with itself, and no
side effects (a seeded run is bit-identical with a guard that takes no action; compiled models
work)."""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gradguard.core import GuardCore
from lightning_gradguard.core.diagnosis import Diagnostician
from lightning_gradguard.core.evidence import MicroBatches, batch_nonfinite, update_ratio
from lightning_gradguard.core.guard import Action
from lightning_gradguard.core.messages import end_of_fit_line
from lightning_gradguard.core.structure import ModelStructure, is_adaptive

from ._diagnosis_cases import Seq, _opt, healthy_cases, mlp, vec_data

# ----------------------------------------------------------------- the standard models
# transformers (nanoGPT-style, nn.TransformerEncoderLayer pre/post-LN), residual adds in the
# parent's loop, hand-written normalisation, a BatchNorm CNN, an LSTM language model, and
# stochastic layers: models the diagnosis must read right


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm, written by hand (no torch norm class)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class FunctionalLayerNorm(nn.Module):
    """A module that calls ``F.layer_norm`` with its own parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(dim))
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w, self.b)


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 2, manual_softmax: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads
        self.manual_softmax = manual_softmax

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(x).split(c, dim=2))
        if self.manual_softmax:  # a softmax by hand: a sum of exponentials, not a norm
            e = torch.exp(q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5)
            y = (e / e.sum(-1, keepdim=True)) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class GPTBlock(nn.Module):
    """nanoGPT's block: two residual adds in one forward."""

    def __init__(self, dim: int, norm: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.ln_1 = norm(dim)
        self.attn = CausalSelfAttention(dim)
        self.ln_2 = norm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16, layers: int = 4,
                 norm: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(16, dim)
        self.h = nn.ModuleList(GPTBlock(dim, norm) for _ in range(layers))
        self.ln_f = norm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))


class LoopBlock(nn.Module):
    """A branch only: the parent adds the residual in its loop."""

    def __init__(self, dim: int, norm: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x))


class LoopNet(nn.Module):
    def __init__(self, dim: int = 16, blocks: int = 6,
                 norm: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(LoopBlock(dim, norm) for _ in range(blocks))
        self.out = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (post-LN by default, pre-LN with ``norm_first``)."""

    def __init__(self, norm_first: bool, dim: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True,
                                       norm_first=norm_first), layers,
            enable_nested_tensor=False)
        self.out = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.enc(self.inp(x))[:, -1])


class AttentionNoNorm(nn.Module):
    """Plain stacked attention + MLP, no norm, no residual, a hand-written softmax."""

    def __init__(self, dim: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.layers = nn.ModuleList(nn.Sequential(CausalSelfAttention(dim, manual_softmax=True),
                                                  MLP(dim)) for _ in range(layers))
        self.out = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x[:, -1])


class SqueezeExcite(nn.Module):
    """Gating by a statistic of the input through weights: not a normalisation."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.fc = nn.Linear(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3)))).unsqueeze(-1).unsqueeze(-1)


class SECNN(nn.Module):
    def __init__(self, ch: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.ReLU(), SqueezeExcite(ch),
                                  nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), SqueezeExcite(ch),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class BNCNN(nn.Module):
    """4 conv + BatchNorm + ReLU, then one linear layer: a standard healthy CNN."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 1
        for out in (8, 16, 16, 32):
            layers += [nn.Conv2d(ch, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            ch = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(ch, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class LSTMLM(nn.Module):
    """The word-language-model layout: encoder, 2-layer LSTM, decoder."""

    def __init__(self, vocab: int = 50, dim: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, 2)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.encoder(x))
        return self.decoder(out)


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: a per-sample Bernoulli mask in training."""

    def __init__(self, p: float = 0.2) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class GaussianNoise(nn.Module):
    """Adds N(0, sigma^2) noise in training."""

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return x + self.sigma * torch.randn_like(x) if self.training else x


class StochasticNet(nn.Module):
    """Residual blocks with dropout, stochastic depth and a noise layer."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.noise = GaussianNoise()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Dropout(0.2),
                          DropPath(0.3)) for _ in range(3))
        self.out = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.noise(self.inp(x))
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(n)


def _tokens() -> Tensor:
    return torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))


def _seq() -> Tensor:
    return torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(0))


def _vec() -> Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def _img() -> Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _probed(model: nn.Module, x: Tensor) -> ModelStructure:
    """The structure the diagnostician knows after one training forward/backward."""
    doc = Diagnostician(model, torch.optim.SGD(model.parameters(), lr=0.01))
    doc.watch_forward()
    model(x).float().pow(2).mean().backward()
    doc.finish_probe()
    assert all(not m._forward_hooks for m in model.modules())
    return doc.structure


# ----------------------------------------------------------------- residuals by what they do
@pytest.mark.parametrize(("build", "data", "skips"), [
    pytest.param(lambda: Encoder(norm_first=False), _seq, 8, id="TransformerEncoder-post-LN"),
    pytest.param(lambda: Encoder(norm_first=True), _seq, 8, id="TransformerEncoder-pre-LN"),
    pytest.param(lambda: GPT(), _tokens, 8, id="nanoGPT-two-adds-per-block"),
    pytest.param(lambda: LoopNet(), _vec, 6, id="adds-in-the-parent-loop"),
])
def test_skip_connections_are_found_wherever_the_add_is_written(
        build: Callable[[], nn.Module], data: Callable[[], Tensor], skips: int) -> None:
    torch.manual_seed(0)
    s = _probed(build(), data())
    assert s.has_residual
    assert s.skips == skips  # one per add, every block's


@pytest.mark.parametrize(("build", "data"), [
    pytest.param(lambda: mlp(depth=6), lambda: torch.randn(4, 32), id="plain-mlp"),
    pytest.param(lambda: AttentionNoNorm(), _seq, id="attention-without-skips"),
    pytest.param(lambda: BNCNN(), _img, id="bn-cnn"),
    pytest.param(lambda: LSTMLM(), lambda: torch.randint(0, 50, (7, 4)), id="lstm-lm"),
    # a GRU cell's h + z * (h' - h) is a gated path through time, not a skip over depth
    pytest.param(lambda: Seq("gru"), lambda: torch.rand(4, 12, 2), id="gru"),
])
def test_no_skip_connection_where_there_is_none(build: Callable[[], nn.Module],
                                                data: Callable[[], Tensor]) -> None:
    torch.manual_seed(0)
    s = _probed(build(), data())
    assert s.residual == ()
    assert s.skips == 0


# ----------------------------------------------------------------- normalisation by behaviour
@pytest.mark.parametrize(("build", "data", "count"), [
    pytest.param(lambda: GPT(norm=RMSNorm), _tokens, 9, id="hand-written-RMSNorm"),
    pytest.param(lambda: GPT(norm=FunctionalLayerNorm), _tokens, 9,
                 id="module-calling-F.layer_norm"),
    pytest.param(lambda: LoopNet(norm=RMSNorm), _vec, 6, id="RMSNorm-in-loop-blocks"),
])
def test_normalisation_is_found_by_what_the_module_computes(
        build: Callable[[], nn.Module], data: Callable[[], Tensor], count: int) -> None:
    torch.manual_seed(0)
    s = _probed(build(), data())
    assert s.norm_layers == ()  # no torch norm class anywhere
    assert s.has_norm
    assert s.probed_norms is not None
    assert len(s.probed_norms) == count
    assert all("norm" in name or name.startswith(("h.", "ln_f")) for name in s.probed_norms)


@pytest.mark.parametrize(("build", "data"), [
    pytest.param(lambda: mlp(depth=6), lambda: torch.randn(4, 32), id="plain-mlp"),
    pytest.param(lambda: AttentionNoNorm(), _seq, id="hand-written-softmax"),
    pytest.param(lambda: SECNN(), _img, id="squeeze-excite-gating"),
])
def test_no_normalisation_where_there_is_none(build: Callable[[], nn.Module],
                                              data: Callable[[], Tensor]) -> None:
    torch.manual_seed(0)
    s = _probed(build(), data())
    assert s.probed_norms == ()
    assert not s.has_norm
    assert s.norm_known


def test_healthy_transformers_through_the_guard_name_no_cause() -> None:
    for build, data in ((lambda: GPT(norm=RMSNorm), _tokens), (lambda: Encoder(True), _seq),
                        (lambda: LoopNet(norm=RMSNorm), _vec)):
        torch.manual_seed(0)
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        guard = GuardCore(model, opt)
        x = data()
        for _ in range(20):
            loss = model(x).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            guard.step(loss.detach())
            opt.step()
        assert guard.summary()["diagnosis"] == []


# ----------------------------------------------------------------- optimizers by their state
class AdamW8bit(torch.optim.AdamW):
    """Named like bitsandbytes' 8-bit AdamW (its name ends with no known optimizer's)."""


class Tuned(torch.optim.Adam):
    """A project's own Adam subclass."""


def _step(opt: torch.optim.Optimizer, p: nn.Parameter) -> None:
    p.grad = torch.ones_like(p)
    opt.step()


def test_adaptive_optimizers_are_recognised_by_their_state_not_their_name() -> None:
    for cls in (AdamW8bit, Tuned, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
                torch.optim.Adamax, torch.optim.NAdam):
        p = nn.Parameter(torch.ones(3))
        opt = cls([p], lr=0.01)
        assert is_adaptive(opt), cls.__name__  # before the first step: its hyper-parameters
        _step(opt, p)
        assert is_adaptive(opt), cls.__name__  # after it: a second moment in its state
    p = nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    assert not is_adaptive(sgd)
    _step(sgd, p)
    assert not is_adaptive(sgd)  # momentum_buffer is a first moment

    class Renamed(torch.optim.SGD):  # an SGD whose name sounds adaptive
        pass
    Renamed.__name__ = "AdamLike"
    assert not is_adaptive(Renamed([p], lr=0.1))


def test_an_adam_subclass_is_diagnosed_with_adams_update_not_sgds() -> None:
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(1.0)
    doc = Diagnostician(layer, AdamW8bit(layer.parameters(), lr=2.0))
    # |w| = 4 (16 weights) and 2 (4 biases): Adam moves each coordinate by ~lr
    causes = doc.preflight({"weight": 1e-3, "bias": 1e-3}, loss=1.0)
    assert [c.cause for c in causes] == ["lr_too_high"]
    assert "one Adam-like step moved the weights by" in causes[0].evidence
    assert "SGD" not in causes[0].evidence
    assert "adaptive optimizer" not in causes[0].remedy


# ----------------------------------------------------------------- zero / near-zero weights
@pytest.mark.parametrize("scale", [0.0, 1e-12])
def test_zero_initialised_logistic_regression_gets_no_lr_warning(scale: float) -> None:
    torch.manual_seed(0)
    model = nn.Linear(10, 1)
    with torch.no_grad():
        model.weight.normal_(std=scale) if scale else model.weight.zero_()
        model.bias.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    guard = GuardCore(model, opt)
    x = torch.randn(64, 10)
    y = (x[:, :1] > 0).float()
    reports = []
    for _ in range(30):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        reports.append(guard.step(loss.detach()))
        opt.step()
    assert reports[0].causes is None  # no pre-flight warning
    assert guard.summary()["diagnosis"] == []
    assert loss.item() < 0.3  # it converges
    doc = guard.diagnostician
    assert doc is not None
    for cause in doc.diagnose("on_demand"):
        assert "infinite" not in cause.evidence
        assert "~0:" not in cause.remedy
    assert doc.step0 is not None
    assert all(math.isfinite(v) for v in _floats(doc.step0.to_state()))


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []


def test_a_zero_initialised_layer_does_not_make_any_ratio_infinite() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    nn.init.zeros_(net[2].weight)
    doc = Diagnostician(net, torch.optim.SGD(net.parameters(), lr=100.0))
    grads = {n: 1.0 for n, _ in net.named_parameters()}
    causes = doc.preflight(grads, loss=1.0)
    assert [c.cause for c in causes] == ["lr_too_high"]
    assert "infinite" not in causes[0].evidence
    assert "2.weight" not in causes[0].evidence  # its ratio means nothing: left out
    target = float(causes[0].remedy.split("~")[1].split(":")[0])
    assert 0 < target < 100.0
    assert math.isnan(update_ratio(0.1, 1.0, 0.0))


# ----------------------------------------------------------------- a spike is not an explosion
@pytest.fixture(scope="module")
def healthy_through_the_guard() -> list[tuple[str, dict[str, Any]]]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    for case in healthy_cases():
        torch.manual_seed(case.seed)
        model = case.model()
        opt = _opt(case.optimizer, model.parameters(), case.lr)
        guard = GuardCore(model, opt)
        for step in range(100):
            x, y = case.data(step)
            loss = case.loss(model(x), y)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            guard.step(loss.detach(), batch=(x, y))
            opt.step()
        out.append((case.name, guard.summary()))
    torch.set_num_threads(n)
    return out


def test_the_healthy_cases_through_the_guard_end_with_no_cause(
        healthy_through_the_guard: list[tuple[str, dict[str, Any]]]) -> None:
    """The labelled healthy set, 100 steps each through ``GuardCore`` with defaults: some spike
    and are clipped, none may end with a cause (6 of 26 did: no_normalization, no_residual,
    lr_too_high on a first z-score spike)."""
    named = [(name, [d["cause"] for d in s["diagnosis"]]) for name, s in healthy_through_the_guard
             if s["diagnosis"]]
    assert named == []
    assert sum(s["spikes"] > 0 for _, s in healthy_through_the_guard) >= 3  # spikes did happen
    for _, s in healthy_through_the_guard:
        assert "likely cause" not in end_of_fit_line(s)


def test_a_spike_without_growth_names_no_structural_cause() -> None:
    torch.manual_seed(0)
    net = mlp(depth=8)  # He init: no growth through the depth at step 0
    doc = Diagnostician(net, torch.optim.SGD(net.parameters(), lr=1e-3))
    doc.watch_forward()
    x = torch.randn(32, 32)
    net(x).pow(2).mean().backward()
    norms = {n: float(p.grad.norm()) for n, p in net.named_parameters()}  # type: ignore[union-attr]
    doc.preflight(norms, loss=1.0)
    for step in range(1, 12):
        doc.observe(step, loss=1.0 - 0.01 * step, grad_norm=1.0 + 0.05 * (step % 3))
    doc.observe(12, loss=0.9, grad_norm=1.4)  # a z-score alarm, 1.3x the usual
    assert doc.diagnose("spike", loss=0.9) == []
    # growth makes it an explosion; still no structural cause without growth through the depth
    for step in range(13, 17):
        doc.observe(step, loss=0.9 * 2 ** (step - 12), grad_norm=1.4 * 3 ** (step - 12))
    assert {c.cause for c in doc.diagnose("spike", loss=15.0)} <= {"lr_too_high"}


@pytest.mark.parametrize("pass_batch", [True, False])
def test_one_nan_batch_on_a_plain_mlp_is_the_data_and_nothing_else(pass_batch: bool) -> None:
    """A plain 4-layer MLP hit by one NaN batch: the data (when the batch is at hand), never
    'a deep plain network without normalisation layers'."""
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(32, 32), nn.ReLU())],
                        nn.Linear(32, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    guard = GuardCore(net, opt)
    data = vec_data(11, corrupt_at=2)  # early: too little history for a loss cause
    for step in range(4):
        x, y = data(step)
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        report = guard.step(loss.detach(), batch=(x, y) if pass_batch else None)
        opt.step()
        if step == 2:
            assert report.action == Action.SKIP
            causes = [c.cause for c in report.causes or ()]
            if pass_batch:
                assert causes == ["data_nonfinite"]
            assert not {"no_normalization", "no_residual"} & set(causes)


def test_end_of_fit_line_names_a_cause_only_when_the_run_needed_help() -> None:
    diagnosis = [{"cause": "no_residual", "evidence": "e", "remedy": "r"}]
    clipped = {"steps": 100, "clipped_steps": 3, "skipped_steps": 0, "lr_backoffs": 0,
               "lr_scale": 1.0, "rollbacks": 0, "diagnosis": diagnosis}
    line = end_of_fit_line(clipped)
    assert line.startswith("GradGuard: 100 steps, 3 clipped")
    assert "likely cause" not in line
    for helped in ({"skipped_steps": 1}, {"lr_backoffs": 1, "lr_scale": 0.5},
                   {"halted": True}, {"rollbacks": 1}):
        assert "likely cause: no_residual" in end_of_fit_line({**clipped, **helped})


# ----------------------------------------------------------------- every batch read
@dataclasses.dataclass
class Sample:
    x: Tensor
    y: Tensor


Pair = collections.namedtuple("Pair", ["x", "y"])


class Holder:
    def __init__(self, x: Tensor) -> None:
        self.inputs = {"x": x}
        self.name = "holder"


def _nan(n: int = 6, bad: int = 1) -> Tensor:
    t = torch.ones(n)
    t[:bad] = math.nan
    return t


def test_every_kind_of_batch_is_read_for_nan_without_a_crash() -> None:
    sparse_coo = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2]]), torch.tensor(
        [1.0, math.nan, math.inf]), (5,))
    dense = torch.eye(3)
    dense[1, 1] = math.nan
    csr = dense.to_sparse_csr()
    nested = torch.nested.nested_tensor([torch.ones(2), torch.tensor([1.0, math.nan, 2.0])])
    jagged = torch.nested.nested_tensor([torch.ones(2), torch.tensor([math.inf, 1.0])],
                                        layout=torch.jagged)
    y = torch.zeros(6)
    assert batch_nonfinite(Sample(_nan(), y)) == [("batch.x", 1, 6)]
    assert batch_nonfinite(Pair(y, _nan(bad=2))) == [("batch.y", 2, 6)]
    assert batch_nonfinite(Holder(_nan())) == [("batch.inputs['x']", 1, 6)]
    assert batch_nonfinite([sparse_coo]) == [("batch[0]", 2, 3)]
    assert batch_nonfinite({"m": csr}) == [("batch['m']", 1, 3)]
    assert batch_nonfinite((nested,)) == [("batch[0]", 1, 5)]
    assert batch_nonfinite((jagged,)) == [("batch[0]", 1, 4)]
    assert batch_nonfinite(MicroBatches([(y, y), (_nan(), y)])) == [
        ("micro-batch 2/2: batch[0]", 1, 6)]
    assert batch_nonfinite(Sample(y, y)) == []


def test_a_nan_in_a_dataclass_batch_is_the_data_not_the_loss() -> None:
    torch.manual_seed(0)
    net = mlp(depth=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    guard = GuardCore(net, opt)
    data = vec_data(1, corrupt_at=4)
    for step in range(5):
        x, y = data(step)
        batch = Sample(x, y)
        loss = F.mse_loss(net(batch.x), batch.y)
        opt.zero_grad()
        loss.backward()
        report = guard.step(loss.detach(), batch=batch)
        opt.step()
    assert report.action == Action.SKIP
    assert report.causes is not None
    assert report.causes[0].cause == "data_nonfinite"
    assert "batch.x holds 2 NaN/Inf" in report.causes[0].evidence


def test_loss_cause_says_the_batch_is_finite_only_when_it_was_read() -> None:
    torch.manual_seed(0)
    net = mlp(depth=3)
    doc = Diagnostician(net, torch.optim.SGD(net.parameters(), lr=1e-3))
    doc.preflight({n: 1.0 for n, _ in net.named_parameters()}, loss=1.0)
    for step in range(1, 6):
        doc.observe(step, loss=1.0, grad_norm=1.0)
    unread = doc.diagnose("nonfinite", loss=math.inf)
    assert unread[0].cause == "loss_nonfinite"
    assert "batch is finite" not in unread[0].evidence
    read = doc.diagnose("nonfinite", loss=math.inf, batch=Sample(torch.ones(3), torch.ones(3)))
    assert read[0].evidence.endswith("and the batch is finite")


# ----------------------------------------------------------------- evidence agrees with itself
def test_the_most_moved_tensor_is_chosen_among_all_parameters() -> None:
    torch.manual_seed(0)
    model = LSTMLM()
    doc = Diagnostician(model, torch.optim.SGD(model.parameters(), lr=20.0))
    grads = {n: 1e-3 for n, _ in model.named_parameters()}
    grads["rnn.weight_hh_l0"] = 5.0  # the recurrent matrix moves most
    causes = doc.preflight(grads, loss=4.0)
    assert causes[0].cause == "lr_too_high"
    assert "(most: rnn.weight_hh_l0 " in causes[0].evidence
    # real gradients: the chosen tensor is the one that moves most, and moves at least as
    # much as the whole model does
    model.zero_grad()
    x = torch.randint(0, 50, (12, 8))
    F.cross_entropy(model(x).reshape(-1, 50), x.reshape(-1)).backward()
    norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}  # type: ignore[union-attr]
    doc = Diagnostician(model, torch.optim.SGD(model.parameters(), lr=20.0))
    doc.preflight(norms, loss=4.0)
    ratios = {n: norms[n] / float(p.detach().norm()) for n, p in model.named_parameters()}
    assert doc.step0 is not None
    sgd = doc.step0.ratios(adaptive=False)
    assert sgd is not None
    worst, worst_r = sgd.worst, sgd.worst_ratio
    assert worst == max(ratios, key=ratios.__getitem__)
    assert worst_r >= sgd.total


def test_a_step0_ratio_is_worded_at_its_own_lr_under_a_schedule() -> None:
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    doc = Diagnostician(layer, opt)
    doc.preflight({"weight": 40.0, "bias": 0.0}, loss=1.0)  # |w| = 4: 100 % at lr 0.1
    opt.step()
    sched.step()  # lr 0.01 now
    doc.observe(1, loss=1.0, grad_norm=1.0)
    cause = doc.diagnose("on_demand")[0]
    assert cause.cause == "lr_too_high"
    assert cause.evidence.startswith(
        "at step 0 (lr 0.1) one SGD step moved the weights by 100 % of their norm")
    assert "the same step at the current lr 0.01 would move them by 10 %" in cause.evidence
    assert cause.remedy.startswith("lower the LR to ~0.001: the update would move the weights "
                                   "by 10 % in one step")


def test_a_healthy_batchnorm_cnn_with_adam_ends_with_no_cause() -> None:
    """4 conv + BatchNorm + 1 linear, Adam 1e-3: it spikes once or twice and is clipped (was:
    'likely cause: no_residual')."""
    spiked = 0
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = BNCNN()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        guard = GuardCore(model, opt)
        g = torch.Generator().manual_seed(seed)
        xs = torch.randn(64, 32, 1, 12, 12, generator=g)
        ys = torch.randint(0, 10, (64, 32), generator=g)
        for step in range(100):
            loss = F.cross_entropy(model(xs[step % 64]), ys[step % 64])
            opt.zero_grad()
            loss.backward()
            guard.step(loss.detach())
            opt.step()
        summary = guard.summary()
        spiked += summary["spikes"]
        assert summary["diagnosis"] == []
        assert "likely cause" not in end_of_fit_line(summary)
    assert spiked > 0


# ----------------------------------------------------------------- no side effects
def _seeded_run(with_guard: bool, steps: int = 15) -> tuple[dict[str, Tensor], list[Action]]:
    torch.manual_seed(0)
    model = StochasticNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = GuardCore(model, opt) if with_guard else None
    actions = []
    for _ in range(steps):
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if guard is not None:
            actions.append(guard.step(loss.detach()).action)
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, actions


def test_a_guard_that_takes_no_action_leaves_a_seeded_run_bit_identical() -> None:
    """Dropout, stochastic depth and a noise layer draw from the global RNG: the guard (its
    forward probe and structure inspection included) must not draw from it."""
    plain, _ = _seeded_run(with_guard=False)
    guarded, actions = _seeded_run(with_guard=True)
    assert set(actions) == {Action.NONE}
    assert plain.keys() == guarded.keys()
    assert all(torch.equal(plain[k], guarded[k]) for k in plain)


def test_structure_inspection_changes_no_module_and_runs_no_hook() -> None:
    hooks = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            return torch.relu(x)

    net = nn.Sequential(nn.Linear(4, 4), Counting(), nn.Linear(4, 1))
    net[1].register_forward_hook(lambda *_: hooks.append(1))
    state = torch.get_rng_state()
    doc = Diagnostician(net)
    assert net[1].calls == 0  # a copy was probed, not the module
    assert hooks == []
    assert torch.equal(state, torch.get_rng_state())
    assert [a.kind for a in doc.structure.activations] == ["Counting"]


@pytest.mark.parametrize("how", ["torch.compile", "module.compile", "compiled-region"])
def test_compiled_models_work_in_guardcore(how: str) -> None:
    # A region compiled by an earlier run of this test in the same process is cached, and the
    # cached eager-backend region then runs as plain eager ops, which the probe reads: start
    # from an empty cache (mutmut runs a test again in a fork of the process that ran it).
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = LoopNet(blocks=2)
    if how == "torch.compile":
        model: nn.Module = torch.compile(net, backend="aot_eager")  # type: ignore[assignment]
    elif how == "module.compile":
        net.compile(backend="aot_eager")
        model = net
    else:
        class Wrapper(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net
                self.fast = torch.compile(self.net.forward, backend="eager")

            def forward(self, x: Tensor) -> Tensor:
                return self.fast(x)
        model = Wrapper()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GuardCore(model, opt)
    for _ in range(3):
        loss = model(_vec()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        report = guard.step(loss.detach())
        opt.step()
    assert report.finite
    doc = guard.diagnostician
    assert doc is not None
    assert doc.structure.residual is None  # not read: unknown, so no structural cause
    assert doc.structure.probed_norms is None
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.slow
def test_compiled_models_work_with_the_default_backend() -> None:
    """``torch.compile`` with inductor (slow on CPU: it compiles C++)."""
    torch.manual_seed(0)
    model = torch.compile(LoopNet(blocks=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GuardCore(model, opt)  # type: ignore[arg-type]
    for _ in range(3):
        loss = model(_vec()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert guard.step(loss.detach()).finite
        opt.step()


def test_a_backoff_without_growth_names_no_lr_cause_and_a_later_event_keeps_a_finding() -> None:
    """Repeated z-score alarms back the LR off: the guard's caution, not an explosion. A
    7 % update ratio alone (under the 100 % that counts without one) names nothing then."""
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    doc = Diagnostician(layer, torch.optim.SGD(layer.parameters(), lr=0.1))
    doc.preflight({"weight": 2.8, "bias": 0.0}, loss=1.0)  # |w| = 4: 7 % per step
    for step in range(1, 10):
        doc.observe(step, loss=1.0 - 0.01 * step, grad_norm=2.8 + 0.3 * (step % 2))
    assert doc.diagnose("backoff", loss=0.9) == []
    for step in range(10, 14):  # now the loss and the norm grow
        doc.observe(step, loss=0.9 * 2 ** (step - 9), grad_norm=3.0 * 3 ** (step - 9))
    assert [c.cause for c in doc.diagnose("backoff", loss=14.4)] == ["lr_too_high"]


def test_a_later_event_without_evidence_does_not_erase_a_finding() -> None:
    """A NaN batch (data_nonfinite), then every step clipped by a tiny fixed threshold until
    the LR backs off: that backoff has no growth behind it and names nothing; the summary
    keeps the finding."""
    from lightning_gradguard.core import FixedNormClip

    torch.manual_seed(0)
    net = mlp(depth=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    # every step clipped, every spike counted (no update control): a backoff at step 6
    guard = GuardCore(net, opt, clip=FixedNormClip(1e-3), max_update_ratio=None)
    data = vec_data(3, corrupt_at=1)
    events = []
    for step in range(12):
        x, y = data(step)
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        report = guard.step(loss.detach(), batch=(x, y))
        events.append((report.diagnosis_event, [c.cause for c in report.causes or ()]))
        opt.step()
    assert events[1] == ("nonfinite", ["data_nonfinite"])
    assert ("backoff", []) in events
    assert guard.summary()["diagnosis"][0]["cause"] == "data_nonfinite"
