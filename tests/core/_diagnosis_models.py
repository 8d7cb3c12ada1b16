"""Standard model definitions the diagnosis must read right: transformers (nanoGPT-style,
``nn.TransformerEncoderLayer`` pre/post-LN), residual adds in the parent's loop, hand-written
normalisation, a BatchNorm CNN, an LSTM language model, and stochastic layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
