"""The cause rules: pure functions of an evidence record (host floats, no model needed).

:class:`Evidence` is everything a ranking looks at, as plain values: the event, this step's
per-tensor gradient norms and loss, the history (losses, total norms, LRs), the optimizer's
LR and form, the step-0 evidence (:class:`Step0Evidence`), the model's structure
(:class:`~lightning_gradguard.core.structure.ModelStructure`) and, on a non-finite step, what
the batch held. :class:`~lightning_gradguard.core.diagnosis.Diagnostician` gathers it; the
rules below turn it into ranked :class:`Cause` s, one function per cause (see the table in
:mod:`~lightning_gradguard.core.diagnosis`), so each is tested with hand-made values:

>>> ev = Evidence(event="nonfinite", batch_bad=(("x", 3, 64),))
>>> [c.cause for c in rank(ev)]
['data_nonfinite']

Ranking (:func:`rank`): the batch, then a loss that broke on its own, then measured
amplification inside the model (init, activation, recurrent weights, then the structural
causes), then the LR (which exposes those).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._validation import check_int, check_number
from lightning_gradguard.core.evidence import (
    LossTrend,
    fit_growth,
    loss_trend,
    schedule_position,
    update_ratio,
)
from lightning_gradguard.core.structure import ModelStructure

__all__ = [
    "CAUSES",
    "Cause",
    "DiagnosisThresholds",
    "Evidence",
    "InitScale",
    "Step0Evidence",
    "UpdateRatios",
    "activation_cause",
    "data_cause",
    "depth_causes",
    "init_cause",
    "is_explosion",
    "lr_cause",
    "loss_cause",
    "rank",
    "recurrent_cause",
    "structural_causes",
]

CAUSES: Final[tuple[str, ...]] = (
    "lr_too_high", "init_too_large", "no_normalization", "no_residual", "activation",
    "recurrent_weights", "loss_nonfinite", "data_nonfinite",
)
"""The stable cause ids (public contract: dashboards and tests rely on them)."""

_EXPLOSIONS = ("spike", "backoff", "nonfinite", "halt")
_MIN_WEIGHT_RMS = 1e-4


@friendly_kwargs
@dataclass(frozen=True)
class Cause:
    """One ranked cause: its id, the evidence in numbers, and the remedy.

    Attributes:
        cause: One of :data:`CAUSES`.
        evidence: What was measured, in words and numbers.
        remedy: What to change, at code level.
        score: Ranking score (higher first); comparable within one diagnosis only.

    Example:
        >>> c = Cause("lr_too_high", "one step moved the weights by 40 %", "lower the LR", 6.0)
        >>> c.to_dict()["cause"]
        'lr_too_high'
    """

    cause: str
    evidence: str
    remedy: str
    score: float = 0.0

    def to_dict(self) -> dict[str, str]:
        """``{"cause", "evidence", "remedy"}`` (the ``summary()["diagnosis"]`` entries)."""
        return {"cause": self.cause, "evidence": self.evidence, "remedy": self.remedy}


@friendly_kwargs
@dataclass(frozen=True)
class DiagnosisThresholds:
    """Where evidence starts to count.

    The defaults were set on the labelled set of ``tests/core/_diagnosis_cases.py`` (see the
    README, "Why did it explode?").

    Attributes:
        growth: Fitted per-layer factor of the depth profile that counts as growth.
        amplification: ... and the total amplification over the profile that must come with
            it (a factor of 1.15 over 8 layers is x2.7, over 32 layers it is x76).
        stream_amplification: The same for the residual stream over its blocks (a stream
            whose variance grows linearly, as with normalised branches, stays below it).
        min_layers: Weight layers needed for a depth profile.
        init_ratio: Median weight std over the He std that counts as too large.
        activation_gain: ``sqrt(2)`` times the activation's RMS derivative that counts as
            amplifying (ReLU gives 1.0).
        recurrent_sigma: Largest singular value of a recurrent block that counts as amplifying.
        update_ratio: Update-to-weight ratio per step that counts as a too-high LR on an
            explosion event.
        update_ratio_alone: The ratio that counts without an explosion (preflight, on demand).
        target_ratio: The ratio the suggested LR aims for.
    """

    growth: float = 1.08
    amplification: float = 10.0
    stream_amplification: float = 3.0
    min_layers: int = 4
    init_ratio: float = 2.0
    activation_gain: float = 1.3
    recurrent_sigma: float = 1.5
    update_ratio: float = 0.05
    update_ratio_alone: float = 1.0
    target_ratio: float = 0.01

    def __post_init__(self) -> None:
        for name in ("growth", "amplification", "stream_amplification", "init_ratio",
                     "activation_gain", "recurrent_sigma"):
            check_number(name, getattr(self, name), low=1.0, low_inclusive=False)
        for name in ("update_ratio", "update_ratio_alone", "target_ratio"):
            check_number(name, getattr(self, name), low=0.0, low_inclusive=False)
        check_int("min_layers", self.min_layers, low=3)


_DEFAULT = DiagnosisThresholds()


# ---------------------------------------------------------------------------- the records
@dataclass(frozen=True)
class UpdateRatios:
    """How far one step at step 0 moved the weights, for one optimizer form.

    Attributes:
        total: Over every tensor whose weights count (see :func:`update_ratios`).
        worst: The tensor moved most (``""``: none).
        worst_ratio: Its ratio.
    """

    total: float
    worst: str = ""
    worst_ratio: float = 0.0


@dataclass(frozen=True)
class InitScale:
    """The weight layer whose init is largest against its He std.

    Attributes:
        param: Its weight's name.
        std: The weight's standard deviation.
        he_std: :math:`\\sqrt{2/n_\\text{in}}`.
        fan_in: :math:`n_\\text{in}`.
    """

    param: str
    std: float
    he_std: float
    fan_in: int


@dataclass(frozen=True)
class Step0Evidence:
    """What the first step showed (host floats, saved in the state).

    Attributes:
        layers: Weight layers of the trunk (the depth profile's length).
        blocks: Residual blocks whose stream scale was probed.
        growth_back: Fitted per-layer factor of the gradients from output to input.
        growth_fwd: ... of the activations forward.
        growth_stream: ... of the residual stream per block.
        init_median: Median weight std over the He std of the trunk's layers.
        init_worst: The layer with the largest init (``None``: no weight layer).
        weight_norm: Norm of every weight tensor that counts (RMS >= 1e-4).
        numel: Their number of elements.
        sgd: The step-0 update ratios in SGD form (``None``: no LR or no finite gradient).
        adaptive: ... in adaptive form (each coordinate moves by about the LR).
        lr0: The LR at step 0 (``None`` without the ratios).
        adaptive_optimizer: The optimizer was adaptive at step 0 (which form is its own).
    """

    layers: int = 0
    blocks: int = 0
    growth_back: float | None = None
    growth_fwd: float | None = None
    growth_stream: float | None = None
    init_median: float | None = None
    init_worst: InitScale | None = None
    weight_norm: float = 0.0
    numel: int = 0
    sgd: UpdateRatios | None = None
    adaptive: UpdateRatios | None = None
    lr0: float | None = None
    adaptive_optimizer: bool = False

    def ratios(self, adaptive: bool) -> UpdateRatios | None:
        """The step-0 ratios in the optimizer's form."""
        return self.adaptive if adaptive else self.sgd

    def to_state(self) -> dict[str, Any]:
        """Plain values (dicts, floats, strings) for a state dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Step0Evidence:
        """The record saved by :meth:`to_state`."""
        values = dict(state)
        if values.get("init_worst") is not None:
            values["init_worst"] = InitScale(**values["init_worst"])
        for form in ("sgd", "adaptive"):
            if values.get(form) is not None:
                values[form] = UpdateRatios(**values[form])
        return cls(**values)


def _weight_counts(norm: float, numel: int) -> bool:
    """Whether a ratio to a tensor's weights means something: an RMS of at least 1e-4.

    No init gives less, except zero / near-zero init.
    """
    return math.isfinite(norm) and numel > 0 and norm >= _MIN_WEIGHT_RMS * math.sqrt(numel)


def update_ratios(grads: Mapping[str, float], weights: Mapping[str, tuple[float, int]],
                  lr: float, adaptive: bool) -> UpdateRatios | None:
    """The total ratio, the tensor with the largest ratio, and that ratio.

    Every parameter counts (``weight_ih_l0`` as much as ``decoder.weight``), except tensors
    whose weights are (near) zero: a ratio to a zero norm means nothing (a zero-initialised
    layer, a bias). The total is taken over the same tensors, so it never exceeds the largest
    per-tensor ratio. ``None``: no tensor counts.

    Example:
        >>> update_ratios({"w": 2.0}, {"w": (4.0, 16)}, lr=0.1, adaptive=False)
        UpdateRatios(total=0.05, worst='w', worst_ratio=0.05)
    """
    kept = {n: (w, k) for n, (w, k) in weights.items() if n in grads and _weight_counts(w, k)}
    if not kept:
        return None
    total_w = math.sqrt(sum(w * w for w, _ in kept.values()))
    n_total = sum(k for _, k in kept.values())
    g_total = math.sqrt(sum(grads[n] ** 2 for n in kept))
    total = update_ratio(lr, g_total, total_w, adaptive=adaptive, numel=n_total)
    worst, worst_r = "", 0.0
    for name, (w, k) in kept.items():
        r = update_ratio(lr, grads[name], w, adaptive=adaptive, numel=k)
        if r > worst_r:
            worst, worst_r = name, r
    return UpdateRatios(total, worst, worst_r)


def step0_evidence(structure: ModelStructure, grads: Mapping[str, float],
                   weights: Mapping[str, tuple[float, int]], lr: float | None, *,
                   adaptive: bool, min_layers: int = 4) -> Step0Evidence:
    """The step-0 record from host values: depth profile, init scale, update ratios.

    Args:
        structure: The model's structure (probed when a forward was read).
        grads: Per-tensor gradient norms by name.
        weights: ``{name: (norm, numel)}`` of the weights.
        lr: The optimizer's LR (``None``: no ratios).
        adaptive: Whether the optimizer is adaptive now.
        min_layers: Weight layers needed for a depth profile.
    """
    s = structure
    trunk = s.trunk()
    growth_stream = fit_growth(list(s.stream_rms)) if len(s.stream_rms) >= 3 else None
    growth_back = growth_fwd = None
    if len(trunk) >= min_layers:
        back: list[float] = []
        for layer in reversed(trunk):  # output -> input
            g = grads.get(layer.param, math.nan)
            inorm = s.in_norm.get(layer.name)
            if inorm is not None and inorm > 0 and math.isfinite(inorm):
                back.append(g / inorm)
            else:
                back.append(grads.get(f"{layer.name}.bias" if layer.name else "bias", g))
        growth_back = fit_growth(back)
        if len(s.out_rms) >= min_layers:
            growth_fwd = fit_growth(list(s.out_rms))
    ratios = [layer.init_ratio for layer in trunk if math.isfinite(layer.init_ratio)]
    init_worst = None
    if trunk:
        w = max(trunk, key=lambda layer: layer.init_ratio)
        init_worst = InitScale(w.param, w.std, w.he_std, w.fan_in)
    kept = [(w, n) for w, n in weights.values() if _weight_counts(w, n)]
    finite = {k: v for k, v in grads.items() if math.isfinite(v)}
    sgd = adapt = None
    if lr is not None and finite:
        # both forms: whether the optimizer is adaptive is known for sure from its state
        # after its first step (see is_adaptive)
        sgd = update_ratios(finite, weights, lr, False)
        adapt = update_ratios(finite, weights, lr, True)
    return Step0Evidence(
        layers=len(trunk), blocks=len(s.stream_rms), growth_back=growth_back,
        growth_fwd=growth_fwd, growth_stream=growth_stream,
        init_median=statistics.median(ratios) if ratios else None, init_worst=init_worst,
        weight_norm=math.sqrt(sum(w * w for w, _ in kept)), numel=sum(n for _, n in kept),
        sgd=sgd, adaptive=adapt, lr0=lr if sgd is not None or adapt is not None else None,
        adaptive_optimizer=adaptive)


@dataclass(frozen=True)
class Evidence:
    """Everything one ranking looks at, as host values (see the module docstring).

    Attributes:
        event: Why the diagnosis is asked for (see
            :data:`~lightning_gradguard.core.diagnosis.EVENTS`).
        grads: This step's per-tensor gradient norms by name (empty: not at hand).
        loss: This step's loss.
        losses: The loss history, oldest first, ending with this step's loss.
        grad_norms: The total gradient norms of the steps observed before (oldest first).
        lrs: The LR of each of those steps.
        lr: The optimizer's LR now (``None``: unknown).
        adaptive: The optimizer is adaptive.
        step0: The step-0 evidence.
        structure: The model's structure.
        batch_bad: ``(path, non-finite count, size)`` of the batch's tensors that are not
            finite; ``None``: the batch was not read.
    """

    event: str = "on_demand"
    grads: Mapping[str, float] = field(default_factory=dict)
    loss: float | None = None
    losses: Sequence[float] = ()
    grad_norms: Sequence[float] = ()
    lrs: Sequence[float] = ()
    lr: float | None = None
    adaptive: bool = False
    step0: Step0Evidence = field(default_factory=Step0Evidence)
    structure: ModelStructure = field(default_factory=ModelStructure)
    batch_bad: Sequence[tuple[str, int, int]] | None = None

    @cached_property
    def trend(self) -> LossTrend:
        """How the loss got where it is (:func:`~.evidence.loss_trend` of :attr:`losses`)."""
        return loss_trend(self.losses)


# ---------------------------------------------------------------------------- helpers
def _pct(ratio: float) -> str:
    return f"{100 * ratio:.0f} %" if ratio >= 1 else f"{100 * ratio:.2g} %"


def _round_lr(lr: float) -> str:
    if lr <= 0 or not math.isfinite(lr):
        return f"{lr:g}"
    return f"{float(f'{lr:.1g}'):g}"


def grew(ev: Evidence) -> bool:
    """Whether a spike (or a backoff) is an explosion: growth, not one large step.

    The loss rising step over step, the gradient norm rising 3 steps in a row to x3 or
    more, or a norm 10x the median of the steps before. A spike short of that (a
    z-score alarm 1.0-1.4x its threshold, the kind clipping contains) is not one.

    Example:
        >>> grew(Evidence("spike", grad_norms=[1.0, 1.1, 0.9, 12.0]))
        True
    """
    if ev.trend.kind == "rise":
        return True
    norms = [v for v in ev.grad_norms if math.isfinite(v)]
    if ev.grads and all(map(math.isfinite, ev.grads.values())):
        total = math.sqrt(sum(v * v for v in ev.grads.values()))
        if not norms or not math.isclose(norms[-1], total, rel_tol=1e-6):
            norms.append(total)
    if len(norms) < 4:
        return False
    cur, prior = norms[-1], norms[:-1]
    if cur >= 10 * statistics.median(prior):
        return True
    run = norms[-4:]
    return all(b > a for a, b in itertools.pairwise(run)) and run[-1] >= 3 * run[0]


def is_explosion(ev: Evidence) -> bool:
    """A non-finite step or a halt; a spike or backoff only with growth (:func:`grew`)."""
    return ev.event in _EXPLOSIONS and (ev.event not in ("spike", "backoff") or grew(ev))


def growth(ev: Evidence, t: DiagnosisThresholds = _DEFAULT) -> tuple[float | None, bool]:
    """The strongest fitted per-layer factor at step 0, and whether it counts as growth."""
    s0 = ev.step0
    n, blocks = s0.layers, s0.blocks
    cands = [(g, g ** span) if g is not None else (1.0, 1.0)
             for g, span in ((s0.growth_back, n - 1), (s0.growth_fwd, n - 1),
                             (s0.growth_stream, blocks - 1))]
    if s0.growth_back is None and s0.growth_fwd is None and s0.growth_stream is None:
        return None, False
    need = [t.amplification, t.amplification, t.stream_amplification]
    grows = any(g >= t.growth and amp >= need[i] for i, (g, amp) in enumerate(cands))
    return max(cands, key=lambda c: c[1])[0], grows


def growth_words(s0: Step0Evidence) -> str:
    """The depth profile at step 0, in words."""
    n, blocks = s0.layers, s0.blocks
    parts = []
    if s0.growth_fwd is not None:
        g = s0.growth_fwd
        parts.append(f"activations grow x{g:.3g} per layer forward (x{g ** (n - 1):.3g} "
                     f"over {n} weight layers)")
    if s0.growth_back is not None:
        g = s0.growth_back
        parts.append(f"gradients x{g:.3g} per layer from output to input "
                     f"(x{g ** (n - 1):.3g})")
    if s0.growth_stream is not None:
        g = s0.growth_stream
        parts.append(f"the residual stream grows x{g:.3g} per block (x{g ** (blocks - 1):.3g}"
                     f" over {blocks} blocks)")
    return (", ".join(parts) + ", fitted at step 0") if parts else "no depth profile"


# ---------------------------------------------------------------------------- the rules
def data_cause(ev: Evidence) -> list[Cause]:
    """``data_nonfinite``: the step's batch holds NaN/Inf (read on a non-finite step only)."""
    bad = ev.batch_bad
    if not bad:
        return []
    where = "; ".join(f"{p} holds {c} NaN/Inf of {n} values" for p, c, n in bad[:3])
    return [Cause(
        "data_nonfinite", f"the batch of this step is not finite: {where}",
        "clean the data: drop or repair those samples in the Dataset (e.g. keep "
        "rows with torch.isfinite(x).all(dim=1), or torch.nan_to_num(x)); "
        "GradGuard skips such steps meanwhile", 100.0)]


def loss_cause(ev: Evidence, t: DiagnosisThresholds = _DEFAULT) -> list[Cause]:
    """``loss_nonfinite``: a loss that broke by itself, with no run-up in the norms."""
    trend, loss = ev.trend, ev.loss
    norms_hist = [v for v in ev.grad_norms if math.isfinite(v)]
    grads_bad = [n for n, v in ev.grads.items() if not math.isfinite(v)]
    loss_bad = loss is not None and not math.isfinite(loss)
    growth_hist = (len(norms_hist) >= 3 and norms_hist[-1]
                   > 10 * statistics.median(norms_hist[:-1]))
    prior = [v for v in ev.losses[:-1] if math.isfinite(v)]
    steady = len(prior) >= 3 and prior[-1] <= 3 * statistics.median(prior)
    if not ((loss_bad or grads_bad) and trend.kind != "rise" and not growth_hist
            and steady and norms_hist and not growth(ev, t)[1]):
        return []
    lo, hi = min(norms_hist), max(norms_hist)
    before = (f"right after {trend.before:.4g}" if math.isfinite(trend.before)
              else f"after {prior[-1]:.4g}, its last finite value")
    what = (f"the loss became {loss} {before}" if loss_bad else
            f"the loss is finite ({loss}) but {len(grads_bad)} gradient(s) are not "
            f"(first: {grads_bad[0]})")
    return [Cause(
        "loss_nonfinite",
        f"{what}, with no run-up: the gradient norms before were finite and steady "
        f"({lo:.3g}..{hi:.3g})" + (" and the batch is finite" if ev.batch_bad is not None
                                   else ""),
        "make the loss numerically safe: clamp inside log/sqrt/division "
        "(torch.log(p.clamp_min(1e-12)), x / (d + 1e-8)), or use the fused stable "
        "forms (F.cross_entropy / F.binary_cross_entropy_with_logits on logits, "
        "torch.logsumexp)", 50.0)]


def init_cause(ev: Evidence, t: DiagnosisThresholds = _DEFAULT, *,
               base: float = 20.0) -> list[Cause]:
    """``init_too_large``: weights far above the He std (the caller checks the growth)."""
    s0, s = ev.step0, ev.structure
    init = s0.init_median
    if init is None or init < t.init_ratio or s0.init_worst is None:
        return []
    w = s0.init_worst
    relu_like = not any(a.kind in ("Tanh", "Sigmoid", "Hardtanh", "Softsign")
                        for a in s.activations)
    remedy = ("He init for ReLU-family activations: for each nn.Linear/nn.Conv layer m, "
              "nn.init.kaiming_normal_(m.weight, nonlinearity='relu') and "
              "nn.init.zeros_(m.bias)" if relu_like else
              "Xavier init for tanh/sigmoid: for each nn.Linear/nn.Conv layer m, "
              "nn.init.xavier_normal_(m.weight) and nn.init.zeros_(m.bias)")
    return [Cause(
        "init_too_large",
        f"the weights are {init:.2g}x the He std for their fan-in (median over "
        f"{len(s.trunk())} layers; {w.param}: std {w.std:.3g} vs {w.he_std:.3g} for fan_in "
        f"{w.fan_in}); {growth_words(s0)}",
        remedy, base + math.log(init))]


def activation_cause(ev: Evidence, t: DiagnosisThresholds = _DEFAULT, *,
                     base: float = 20.0) -> list[Cause]:
    """``activation``: an activation whose derivative amplifies (the caller checks growth)."""
    s = ev.structure
    acts = [a for a in s.activations if math.sqrt(2) * a.rms_gain >= t.activation_gain]
    if not acts:
        return []
    a = max(acts, key=lambda a: a.rms_gain)
    gain = math.sqrt(2) * a.rms_gain
    n = sum(1 for b in s.activations if b.kind == a.kind)
    return [Cause(
        "activation",
        f"{a.kind} amplifies gradients: derivative up to {a.max_gain:.3g}, RMS "
        f"{a.rms_gain:.3g} on N(0,1) inputs, i.e. x{gain:.2g} per layer with He-scaled "
        f"weights ({n} of them); {growth_words(ev.step0)}",
        f"replace {a.kind} with nn.ReLU() or nn.GELU() (derivative <= 1.1), or "
        f"divide its output by {a.max_gain:.2g}",
        base + math.log(gain))]


def structural_causes(ev: Evidence, score: float) -> list[Cause]:
    """``no_normalization`` / ``no_residual``: only what was looked for and not found.

    Normalisation by what the code computes, skip connections by the forward probe.
    """
    s = ev.structure
    out: list[Cause] = []
    words = growth_words(ev.step0)
    conv = any(layer.kind.startswith("Conv") for layer in s.layers)
    norm = ("nn.BatchNorm2d after each Conv2d" if conv else
            "nn.BatchNorm1d after each Linear (nn.LayerNorm for sequences or small batches)")
    if s.norm_known and not s.has_norm:
        if s.has_residual:
            remedy = (f"add a normalisation layer in each residual branch ({norm}), or "
                      "zero-init each branch's last layer (nn.init.zeros_(branch[-1].weight))"
                      " so every block starts as the identity")
            what = (f"residual blocks ({max(s.skips, len(s.residual or ()))}) without "
                    "normalisation add "
                    "their branch's variance to the stream at every block")
        else:
            remedy = f"add {norm}"
            what = "a deep plain network without normalisation layers"
        out.append(Cause("no_normalization", f"{what}: {words}", remedy, score))
    if s.residual is not None and not s.has_residual:
        what = ("a deep network with normalisation but no skip connections (normalised "
                "plain nets amplify gradients layer after layer)" if s.has_norm else
                "a deep network without skip connections")
        out.append(Cause(
            "no_residual", f"{what}: {words}",
            "add skip connections: wrap each layer (or pair of layers) as "
            "x = x + block(x), the ResNet pattern",
            score - (0.0 if s.has_norm else 0.5)))
    return out


def depth_causes(ev: Evidence, t: DiagnosisThresholds = _DEFAULT) -> list[Cause]:
    """Amplification through depth (step-0 evidence: init, norms, activations, skips).

    Init and activation need measured growth (or an explosion without a depth profile);
    a structural cause rests on measured growth, never on the explosion alone (a deep plain
    net that blew up may have had a too-high LR).
    """
    g, grows = growth(ev, t)
    if not grows and not (is_explosion(ev) and g is None):
        return []
    base = 20.0 if grows else 4.0
    causes = init_cause(ev, t, base=base) + activation_cause(ev, t, base=base)
    if grows and g is not None and not causes:
        causes += structural_causes(ev, 10.0 + math.log(g))
    return causes


def recurrent_cause(ev: Evidence, t: DiagnosisThresholds = _DEFAULT) -> list[Cause]:
    """``recurrent_weights``: the recurrent matrix with the largest singular value > 1."""
    for r in sorted(ev.structure.recurrent, key=lambda r: -r.sigma_max)[:1]:
        if r.sigma_max >= t.recurrent_sigma:
            gated = r.kind in ("LSTM", "GRU")
            remedy = ("orthogonal init of the recurrent weights, per gate block: "
                      f"for w in {r.module or 'rnn'}.{r.param.rsplit('.', 1)[-1]}.data"
                      f".chunk({ {'LSTM': 4, 'GRU': 3}.get(r.kind, 1) }): "
                      "nn.init.orthogonal_(w)")
            if not gated:
                remedy += "; or a gated cell (nn.LSTM / nn.GRU) instead of nn.RNN"
            return [Cause(
                "recurrent_weights",
                f"largest singular value of {r.param} is {r.sigma_max:.3g} (> 1): a "
                f"gradient through T time steps can grow like {r.sigma_max:.3g}^T",
                remedy, 15.0 + math.log(r.sigma_max))]
    return []


def later_ratios(ev: Evidence) -> list[float]:
    """The update ratio of each later step in the history, at the LR of that step."""
    w0, numel = ev.step0.weight_norm, ev.step0.numel
    if not w0:
        return []
    out = []
    for g, lr_t in zip(ev.grad_norms, ev.lrs, strict=False):
        if math.isfinite(g) and math.isfinite(lr_t):
            r = update_ratio(lr_t, g, w0, adaptive=ev.adaptive, numel=numel)
            if math.isfinite(r):
                out.append(r)
    return out


def lr_cause(ev: Evidence, t: DiagnosisThresholds = _DEFAULT) -> list[Cause]:
    """``lr_too_high``: updates large against the weights, or a loss that rose to it."""
    lr = ev.lr
    if lr is None:
        return []
    adaptive = ev.adaptive
    step0 = ev.step0.ratios(adaptive)
    if step0 is not None and math.isfinite(step0.total):
        ratio0: float | None = step0.total
        worst, worst0 = step0.worst, step0.worst_ratio
    else:
        ratio0, worst, worst0 = None, "", 0.0
    lr0 = float(ev.step0.lr0 or lr)
    ratio = max([*([ratio0] if ratio0 is not None else []), *later_ratios(ev)], default=0.0)
    trend = ev.trend
    explosion = is_explosion(ev)
    rising = explosion and trend.kind == "rise"
    limit = t.update_ratio if explosion else t.update_ratio_alone
    if ratio < limit and not rising:
        return []
    # below every measured cause inside the model (>= 10): the LR exposes those
    score = min(9.0, 5.0 + math.log10(max(ratio, 1e-12) / t.update_ratio)
                + (2.0 if rising else 0.0))
    if ratio < t.update_ratio:
        score = 3.0
    kind = "Adam-like" if adaptive else "SGD"
    moved = lr != lr0 and abs(lr / lr0 - 1) > 0.01
    words = []
    if ratio0:  # (0: nothing but zero-initialised tensors had a gradient at step 0)
        words.append(f"at step 0 (lr {lr0:.3g}) one {kind} step moved the weights by "
                     f"{_pct(ratio0)} of their norm"
                     + (f" (most: {worst} {_pct(worst0)})" if worst else ""))
        if moved:
            words.append(f"the same step at the current lr {lr:.3g} would move them by "
                         f"{_pct(ratio0 * lr / lr0)}")
    if ratio > 0 and (not ratio0 or ratio > 2 * ratio0):  # (0: no update was measured)
        words.append(f"{'later ' if ratio0 else ''}up to {_pct(ratio)} in one step")
    if rising:
        words.append(f"the loss rose {trend.steps} steps in a row from {trend.before:.3g}"
                     + (" to non-finite" if not math.isfinite(trend.factor)
                        else f" (x{trend.factor:.3g})"))
    sched = schedule_position(ev.lrs)
    if sched:
        words.append(sched)
    # the suggestion rests on the step before divergence, not on the diverging steps,
    # taken at the current LR
    now0 = ratio0 * lr / lr0 if ratio0 is not None else None
    base = now0 if now0 is not None and now0 >= t.target_ratio else ratio
    factor = t.target_ratio / base if base > 0 else 0.1
    if worst and worst0 > 0:
        factor = min(factor, 10 * t.target_ratio / (worst0 * lr / lr0))
    target = lr * factor if factor < 1 else lr / 10
    verb = "would move" if moved and base == now0 else "moved"
    aim = (f"aim for ~{_pct(t.target_ratio)}, and ~{_pct(10 * t.target_ratio)} for the "
           "most-moved tensor")
    remedy = (f"lower the LR to ~{_round_lr(target)}: the update {verb} the weights by "
              f"{_pct(base)} in one step ({aim})" if base > 0 else
              f"lower the LR to ~{_round_lr(target)} (a tenth: no update of the weights was "
              f"measured; {aim})")
    if sched and "warmup" in sched:
        remedy += "; or a longer warmup to a lower peak"
    if not adaptive:
        remedy += "; or an adaptive optimizer: torch.optim.Adam(params, lr=1e-3)"
    return [Cause("lr_too_high", "; ".join(words), remedy, score)]


def rank(ev: Evidence, t: DiagnosisThresholds = _DEFAULT) -> list[Cause]:
    """Every cause the evidence supports, most likely first (one entry per cause id).

    The batch and the loss are looked at on a non-finite step (or a halt) only; the loss
    only when the batch is clean.
    """
    causes: list[Cause] = []
    if ev.event in ("nonfinite", "halt"):
        causes += data_cause(ev)
        if not causes:
            causes += loss_cause(ev, t)
    causes += depth_causes(ev, t)
    causes += recurrent_cause(ev, t)
    causes += lr_cause(ev, t)
    causes.sort(key=lambda c: -c.score)
    seen: set[str] = set()
    out = []
    for c in causes:
        if c.cause not in seen:
            seen.add(c.cause)
            out.append(c)
    return out
