"""Why it exploded, and what to change: where a non-finite gradient comes from, and its cause.

Two layers of API:

* :func:`diagnose` / :class:`Diagnosis` (the guard's first-non-finite message): in
  backpropagation the gradient flows from the output back to the input, so a NaN/Inf born in
  one layer contaminates every layer before it. Of the parameters whose gradients are
  non-finite, the one registered *last* (closest to the output in the usual module order) is
  where the non-finite value most likely originates.
* :class:`Diagnostician`: ranked causes with stable ids (:data:`CAUSES`), each a
  :class:`Cause` with its evidence in numbers and a concrete remedy, from evidence gathered
  cheaply (see :mod:`~lightning_gradguard.core.evidence` and
  :mod:`~lightning_gradguard.core.structure`). Which evidence each cause rests on:

  ==================== ==========================================================================
  cause                evidence
  ==================== ==========================================================================
  data_nonfinite       NaN/Inf in the batch (read only on a non-finite step)
  loss_nonfinite       non-finite loss (or gradients) after steady finite losses and gradient
                       norms, with a finite batch: a log(0) / division by zero in the loss
  init_too_large       median weight std >= 2x the He std for the layers' fan-in, and a depth
                       profile at step 0 (activations forward, gradients backward) growing
                       geometrically (fitted factor >= 1.08 per layer and >= x10 overall)
  activation           an activation whose RMS derivative on N(0,1) times sqrt(2) is >= 1.3
                       (ReLU: 1.0), and the same depth growth with He-scaled weights
  recurrent_weights    largest singular value of a recurrent weight block (per gate) >= 1.5
  no_normalization     depth growth (or a residual stream growing >= x3 over its blocks) that
                       init and activations do not explain, and nothing that normalises
                       (found by what the code computes, see :mod:`.probe`)
  no_residual          depth growth in a deep normalised network with no skip connection
                       found by the step-0 forward probe
  lr_too_high          update-to-weight ratio lr·‖g‖/‖w‖ (adaptive: lr·√n/‖w‖) per step over
                       every parameter whose weights are not (near) zero (>= 5 % on an
                       explosion, >= 100 % on its own), the loss rising step over step before
                       the event, the schedule position (warmup just ended, peak LR)
  ==================== ==========================================================================

  Ranking: the batch, then a loss that broke on its own, then measured amplification inside
  the model (init, activation, recurrent weights, then the structural causes), then the LR
  (which exposes those). A cause is never suggested when its remedy is already in place
  (normalisation present, skip connections detected, an adaptive optimizer, weights at
  He/Xavier scale), and the structural causes never without measured growth through the
  depth. A ``spike`` or a ``backoff`` counts as an explosion only with growth
  (:meth:`Diagnostician._grew`): short of it, nothing is named beyond what the evidence shows
  on its own.
"""

from __future__ import annotations

import itertools
import math
import statistics
import textwrap  # noqa: F401  (used in doctests)
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import torch
from torch import Tensor, nn

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._host import to_host
from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core._validation import check_bool, check_choice, check_int, check_number
from lightning_gradguard.core.evidence import (
    LossTrend,
    batch_nonfinite,
    fit_growth,
    loss_trend,
    schedule_position,
    update_ratio,
)
from lightning_gradguard.core.optim import is_adaptive, learning_rate
from lightning_gradguard.core.structure import ForwardProbe, ModelStructure, inspect_model

__all__ = [
    "CAUSES",
    "EVENTS",
    "Cause",
    "DiagnosisThresholds",
    "Diagnosis",
    "Diagnostician",
    "diagnose",
]

_USUAL_CAUSES = (
    "one of the usual ones: a learning rate that is too high; initialisation that is too large for "
    "the depth (use Xavier/He init); a deep plain network without normalisation or skip "
    "connections; an activation with large derivatives; a loss with log(0) or division by "
    "zero; corrupt data (NaN/Inf in the batch)"
)


@friendly_kwargs
@dataclass(frozen=True)
class Diagnosis:
    """What a non-finite step looked like.

    Attributes:
        step: The optimizer step.
        nonfinite_params: Names of the parameters with non-finite gradients (model order).
        origin: The one closest to the output (most likely origin), or ``None``.
        likely_cause: A one-line explanation (the generic one; see :class:`Diagnostician` for
            ranked causes).
        weights_finite: Whether the weights were finite at that step (``None``: not read).
        first_step: The step was the first of the run (or of the resumed run).
    """

    step: int
    nonfinite_params: tuple[str, ...]
    origin: str | None
    likely_cause: str
    weights_finite: bool | None = None
    first_step: bool = False

    def message(self, limit: int = 8) -> str:
        """Human-readable summary (at most ``limit`` parameter names).

        Example:
            >>> d = Diagnosis(7, ("a.weight", "b.weight"), "b.weight", "lr too high")
            >>> print(textwrap.fill(d.message(), 88))
            step 7: non-finite gradients in 2 parameter(s): a.weight, b.weight; most likely origin:
            b.weight (closest to the output). Likely cause: lr too high
        """
        names = ", ".join(self.nonfinite_params[:limit])
        if len(self.nonfinite_params) > limit:
            names += f", ... (+{len(self.nonfinite_params) - limit} more)"
        origin = (
            f"; most likely origin: {self.origin} (closest to the output)" if self.origin else ""
        )
        return (
            f"step {self.step}: non-finite gradients in {len(self.nonfinite_params)} "
            f"parameter(s): {names}{origin}. Likely cause: {self.likely_cause}"
        )


def diagnose(
    step: int,
    names: Sequence[str],
    per_tensor_norms: Sequence[float],
    *,
    loss: float | None = None,
    growth_before: bool = False,
    lr_scale: float = 1.0,
) -> Diagnosis:
    """Build a :class:`Diagnosis` from the per-tensor norms of a non-finite step.

    Args:
        step: The optimizer step.
        names: Parameter names, aligned with ``per_tensor_norms``.
        per_tensor_norms: Host floats of each gradient's norm.
        loss: The loss of the step, when known.
        growth_before: Whether the norm was growing step over step before this step.
        lr_scale: The LR scale in force.

    Example:
        >>> d = diagnose(3, ["l1.weight", "l2.weight"], [float("nan"), 1.0], loss=float("nan"))
        >>> d.origin, d.likely_cause.split(";")[0]
        ('l1.weight', 'the loss itself is non-finite (nan)')
    """
    bad = tuple(n for n, v in zip(names, per_tensor_norms, strict=False) if not math.isfinite(v))
    origin = bad[-1] if bad else None
    if loss is not None and not math.isfinite(loss):
        cause = f"the loss itself is non-finite ({loss}); " + _USUAL_CAUSES
    elif growth_before:
        cause = ("the gradient norm was growing step over step before this (an explosion): "
                 "the learning rate is most likely too high; " + _USUAL_CAUSES)
    elif not bad:
        cause = "the total norm overflowed although every gradient is finite; " + _USUAL_CAUSES
    else:
        cause = _USUAL_CAUSES
    if lr_scale < 1.0:
        cause += f" (the guard had already reduced the LR to {lr_scale:.3g}x)"
    return Diagnosis(step=step, nonfinite_params=bad, origin=origin, likely_cause=cause)


CAUSES: Final[tuple[str, ...]] = (
    "lr_too_high", "init_too_large", "no_normalization", "no_residual", "activation",
    "recurrent_weights", "loss_nonfinite", "data_nonfinite",
)
"""The stable cause ids (public contract: dashboards and tests rely on them)."""

Event = Literal["preflight", "spike", "backoff", "nonfinite", "halt", "on_demand"]
EVENTS: Final[tuple[str, ...]] = ("preflight", "spike", "backoff", "nonfinite", "halt",
                                  "on_demand")
"""Why a diagnosis is asked for. ``nonfinite``/``halt`` are explosion events; a ``spike`` or a
``backoff`` is one only with growth behind it (see :meth:`Diagnostician.diagnose`: repeated
z-score alarms are the guard's caution, not an explosion); ``preflight`` and ``on_demand``
report only what the evidence already shows on its own."""

_EXPLOSIONS = ("spike", "backoff", "nonfinite", "halt")


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


_MIN_WEIGHT_RMS = 1e-4


def _pct(ratio: float) -> str:
    return f"{100 * ratio:.0f} %" if ratio >= 1 else f"{100 * ratio:.2g} %"


def _weight_counts(norm: float, numel: int) -> bool:
    """Whether a ratio to a tensor's weights means something: an RMS of at least 1e-4.

    No init gives less, except zero / near-zero init.
    """
    return math.isfinite(norm) and numel > 0 and norm >= _MIN_WEIGHT_RMS * math.sqrt(numel)


def _round_lr(lr: float) -> str:
    if lr <= 0 or not math.isfinite(lr):
        return f"{lr:g}"
    return f"{float(f'{lr:.1g}'):g}"


@friendly_kwargs
class Diagnostician(Stateful):
    """Gathers cheap evidence about a run and turns it into ranked :class:`Cause` s.

    The weights are inspected at construction (initial scales, norm layers, activations,
    recurrent weights). Cost on a healthy step: :meth:`observe` appends host floats the guard
    already has. Extra reads happen only at :meth:`preflight` (step 0/1: the per-tensor
    gradient norms and the weight norms, one read each), on an explosion event and on demand
    (:meth:`diagnose`: the same, plus the batch on a non-finite step).

    Args:
        model: The module being trained.
        optimizer: Its optimizer (for the learning rate and whether it is adaptive).
        preflight: Whether :meth:`preflight` reports causes (``False``: it still records the
            step-0 evidence for later diagnoses, and returns ``[]``).
        history: Steps of loss / gradient norm / LR history kept.
        thresholds: A :class:`DiagnosisThresholds`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layers = []
        >>> for _ in range(8):
        ...     layers += [nn.Linear(64, 64), nn.ReLU()]
        >>> net = nn.Sequential(*layers, nn.Linear(64, 1))
        >>> for m in net:
        ...     if isinstance(m, nn.Linear):
        ...         _ = nn.init.normal_(m.weight, std=0.5)  # He would be 0.18
        >>> opt = torch.optim.SGD(net.parameters(), lr=1e-4)
        >>> doc = Diagnostician(net, opt)
        >>> probe = doc.watch_forward()
        >>> loss = net(torch.randn(32, 64)).pow(2).mean()
        >>> loss.backward()
        >>> norms = [float(p.grad.norm()) for p in net.parameters()]
        >>> causes = doc.preflight(norms, loss=loss.item())
        >>> [c.cause for c in causes], doc.structure.residual
        (['init_too_large', 'lr_too_high'], ())
        >>> print(textwrap.fill(causes[0].remedy, 88))
        He init for ReLU-family activations: for each nn.Linear/nn.Conv layer m,
        nn.init.kaiming_normal_(m.weight, nonlinearity='relu') and nn.init.zeros_(m.bias)
    """

    losses: list[float]
    grad_norms: list[float]
    lrs: list[float]
    last_step: int
    step0: dict[str, Any]
    residual: list[str] | None
    probed_norms: list[str] | None
    skips: int
    causes: list[dict[str, str]]

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 preflight: bool = True, history: int = 32,
                 thresholds: DiagnosisThresholds | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("`optimizer` must be a torch.optim.Optimizer or None, got "
                            f"{type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.report_preflight = check_bool("preflight", preflight)
        self.history = check_int("history", history, low=4)
        if thresholds is not None and not isinstance(thresholds, DiagnosisThresholds):
            raise TypeError("`thresholds` must be a DiagnosisThresholds or None, got "
                            f"{type(thresholds).__name__}")
        self.thresholds = thresholds or DiagnosisThresholds()
        self.structure: ModelStructure = inspect_model(model)
        self._probe: ForwardProbe | None = None
        self._add_state("losses", [])
        self._add_state("grad_norms", [])
        self._add_state("lrs", [])
        self._add_state("last_step", -1)
        self._add_state("step0", {})
        self._add_state("residual", None)
        self._add_state("probed_norms", None)
        self._add_state("skips", 0)
        self._add_state("causes", [])

    # ------------------------------------------------------------------ gathering
    def watch_forward(self) -> ForwardProbe:
        """Install one-shot forward hooks (call before the first forward pass).

        They read the first forward pass with autograd (skip connections and normalisation
        from its autograd graph, the activation scale of each weight layer), then remove
        themselves. They call nothing and draw no random number; a compiled model is not
        hooked (its structure is then unknown, and no structural cause is named).
        """
        if self._probe is not None:
            self._probe.remove()
        self._probe = ForwardProbe(self.model)
        return self._probe

    def finish_probe(self) -> None:
        """End the forward probe after the first forward pass (a no-op once it has ended).

        The probe ends by itself when the root module's forward returns; a training step that
        calls a submodule instead (``self.net(x)`` in a ``LightningModule``) ends it here.
        """
        if self._probe is not None:
            self._probe.end()
        self._sync_probe()

    def weight_norm_request(self) -> tuple[list[tuple[str, int]], Tensor | None]:
        """The names and sizes of the weights, and their norms on the device (not read).

        For a caller that reads the step-0 evidence together with its own values in one
        transfer: pass the read values to :meth:`preflight` as ``weight_norms``.
        """
        named = [(n, p) for n, p in self.model.named_parameters() if p.numel()]
        if not named:
            return [], None
        device = named[0][1].device
        norms = torch.stack([p.detach().float().norm().to(device) for _, p in named])
        return [(n, p.numel()) for n, p in named], norms

    def _sync_probe(self) -> None:
        probe = self._probe
        if probe is not None:
            probe.apply_to(self.structure)
            if probe.done and probe.readable and probe.residual is not None:
                self.residual = list(probe.residual)
                self.probed_norms = list(probe.norms or ())
                self.skips = probe.skips
        self._restore_probe()

    def _restore_probe(self) -> None:
        """What a probe found (possibly in a run this state was saved from) into the structure."""
        s = self.structure
        if self.residual is not None and s.residual is None:
            s.residual = tuple(self.residual)
            s.skips = self.skips
        if self.probed_norms is not None and s.probed_norms is None:
            s.probed_norms = tuple(self.probed_norms)

    def _lr(self) -> float | None:
        """The optimizer's LR (:func:`~lightning_gradguard.core.optim.learning_rate`)."""
        return learning_rate(self.optimizer)

    def observe(self, step: int, loss: float | None = None,
                grad_norm: float | None = None) -> None:
        """Record one step's host floats (the guard has them anyway): no device work.

        Args:
            step: The optimizer step.
            loss: The step's loss, if known.
            grad_norm: The step's total gradient norm, if known.
        """
        if type(step) is not int:
            check_int("step", step)
        self.last_step = step
        lr = self._lr()
        keep = self.history
        for seq, value in ((self.losses, loss), (self.grad_norms, grad_norm), (self.lrs, lr)):
            seq.append(math.nan if value is None else float(value))
            if len(seq) > keep:
                del seq[:-keep]

    def _names_with_grad(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.grad is not None]

    def _norm_map(self, per_tensor_norms: Mapping[str, float] | Sequence[float] | Tensor | None,
                  names: Sequence[str] | None) -> dict[str, float]:
        if per_tensor_norms is None:
            return {}
        if isinstance(per_tensor_norms, Mapping):
            return {str(k): float(v) for k, v in per_tensor_norms.items()}
        values = (to_host(per_tensor_norms) if isinstance(per_tensor_norms, Tensor)
                  else [float(v) for v in per_tensor_norms])
        keys = list(names) if names is not None else self._names_with_grad()
        if len(keys) != len(values):
            raise ValueError(
                f"`per_tensor_norms` must have one value per name ({len(keys)} names: "
                f"{'the given `names`' if names is not None else 'parameters with a grad'}), "
                f"got {len(values)} values")
        return dict(zip(keys, values, strict=True))

    @torch.no_grad()
    def _weight_norms(self) -> dict[str, tuple[float, int]]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.numel()]
        if not named:
            return {}
        device = named[0][1].device
        values = to_host(torch.stack([p.detach().float().norm().to(device) for _, p in named]))
        return {n: (v, p.numel()) for (n, p), v in zip(named, values, strict=True)}

    def _depth_profile(self, grads: dict[str, float]) -> dict[str, Any]:
        s = self.structure
        trunk = s.trunk()
        out: dict[str, Any] = {"layers": len(trunk), "growth_back": None, "growth_fwd": None,
                               "growth_stream": None, "blocks": len(s.stream_rms)}
        if len(s.stream_rms) >= 3:
            out["growth_stream"] = fit_growth(list(s.stream_rms))
        if len(trunk) < self.thresholds.min_layers:
            return out
        back: list[float] = []
        for layer in reversed(trunk):  # output -> input
            g = grads.get(layer.param, math.nan)
            inorm = s.in_norm.get(layer.name)
            if inorm is not None and inorm > 0 and math.isfinite(inorm):
                back.append(g / inorm)
            else:
                back.append(grads.get(f"{layer.name}.bias" if layer.name else "bias", g))
        out["growth_back"] = fit_growth(back)
        if len(s.out_rms) >= self.thresholds.min_layers:
            out["growth_fwd"] = fit_growth(list(s.out_rms))
        return out

    def _update_ratios(self, grads: dict[str, float], weights: dict[str, tuple[float, int]],
                       lr: float, adaptive: bool) -> tuple[float | None, str, float]:
        """Total ratio, the tensor with the largest ratio, and that ratio.

        Every parameter counts (``weight_ih_l0`` as much as ``decoder.weight``), except
        tensors whose weights are (near) zero: a ratio to a zero norm means nothing (a
        zero-initialised layer, a bias). The total is taken over the same tensors, so it
        never exceeds the largest per-tensor ratio. ``None``: no tensor counts.
        """
        kept = {n: (w, k) for n, (w, k) in weights.items()
                if n in grads and _weight_counts(w, k)}
        if not kept:
            return None, "", 0.0
        total_w = math.sqrt(sum(w * w for w, _ in kept.values()))
        n_total = sum(k for _, k in kept.values())
        g_total = math.sqrt(sum(grads[n] ** 2 for n in kept))
        total = update_ratio(lr, g_total, total_w, adaptive=adaptive, numel=n_total)
        worst, worst_r = "", 0.0
        for name, (w, k) in kept.items():
            r = update_ratio(lr, grads[name], w, adaptive=adaptive, numel=k)
            if r > worst_r:
                worst, worst_r = name, r
        return total, worst, worst_r

    def _collect(self, grads: dict[str, float],
                 weights: dict[str, tuple[float, int]] | None = None) -> dict[str, Any]:
        """Step-0 evidence (plain values, saved in the state)."""
        self._sync_probe()
        s = self.structure
        ev: dict[str, Any] = self._depth_profile(grads)
        trunk = s.trunk()
        ratios = [layer.init_ratio for layer in trunk if math.isfinite(layer.init_ratio)]
        ev["init_median"] = statistics.median(ratios) if ratios else None
        if trunk:
            worst = max(trunk, key=lambda layer: layer.init_ratio)
            ev["init_worst"] = [worst.param, worst.std, worst.he_std, worst.fan_in]
        lr = self._lr()
        if weights is None:
            weights = self._weight_norms()
        kept = [(w, n) for w, n in weights.values() if _weight_counts(w, n)]
        ev["weight_norm"] = math.sqrt(sum(w * w for w, _ in kept))
        ev["numel"] = sum(n for _, n in kept)
        finite = {k: v for k, v in grads.items() if math.isfinite(v)}
        if lr is not None and finite:
            # both forms: whether the optimizer is adaptive is known for sure from its
            # state after its first step (see is_adaptive)
            forms: dict[str, list[Any]] = {}
            for form, adaptive in (("sgd", False), ("adaptive", True)):
                total, worst_t, worst_r = self._update_ratios(finite, weights, lr, adaptive)
                if total is not None:
                    forms[form] = [total, worst_t, worst_r]
            if forms:
                form = "adaptive" if is_adaptive(self.optimizer) else "sgd"
                ev["ratios"] = forms
                ev["update_ratio"] = forms[form][0]
                ev["update_worst"] = forms[form][1:]
                ev["lr0"] = lr
        return ev

    # ------------------------------------------------------------------ entry points
    def preflight(self, per_tensor_norms: Mapping[str, float] | Sequence[float] | Tensor,
                  loss: float | None = None, *, names: Sequence[str] | None = None,
                  step: int = 0,
                  weight_norms: Mapping[str, tuple[float, int]] | None = None) -> list[Cause]:
        """Record the step-0 evidence and return the causes it already shows.

        Call once after the first backward (before the update). Reads the per-tensor norms
        and the weight norms once each.

        Args:
            per_tensor_norms: Per-parameter gradient norms: a mapping name -> norm, a tensor
                or a sequence aligned with ``names``.
            loss: The step's loss.
            names: Names aligned with a sequence/tensor of norms (default: the model's
                parameters that have a gradient, in registration order).
            step: The step (0 normally).
            weight_norms: ``{name: (norm, numel)}`` of the weights, already read (see
                :meth:`weight_norm_request`); default: read here.

        Returns:
            Ranked causes (empty when nothing is wrong, or when built with
            ``preflight=False``).
        """
        grads = self._norm_map(per_tensor_norms, names)
        self.step0 = self._collect(grads, None if weight_norms is None else dict(weight_norms))
        if loss is not None and step > self.last_step:
            self.observe(step, loss, math.sqrt(sum(v * v for v in grads.values())))
        if not self.report_preflight:
            return []
        return self._rank("preflight", grads, loss, None)

    def diagnose(self, event: Event,
                 per_tensor_norms: Mapping[str, float] | Sequence[float] | Tensor | None = None,
                 loss: float | None = None, batch: Any = None, *,
                 names: Sequence[str] | None = None) -> list[Cause]:
        """Rank the causes for ``event`` (see :data:`EVENTS`).

        Args:
            event: ``"spike"``, ``"backoff"``, ``"nonfinite"``, ``"halt"``, ``"on_demand"``
                or ``"preflight"``. A ``"spike"`` or ``"backoff"`` is treated as an explosion
                only with growth behind it (the loss rising step over step, the gradient norm
                rising x3 over 3 steps, or 10x its median); short of that it is an
                ``"on_demand"``.
            per_tensor_norms: This step's per-parameter gradient norms (as in
                :meth:`preflight`), if at hand.
            loss: This step's loss (also taken as the last entry of the loss history when
                :meth:`observe` has not recorded it).
            batch: The step's batch; read for NaN/Inf only on ``"nonfinite"``/``"halt"``.
            names: Names aligned with a sequence/tensor of norms.

        Returns:
            Ranked causes, most likely first (also kept for :meth:`to_dicts`).
        """
        check_choice("event", event, EVENTS)
        grads = self._norm_map(per_tensor_norms, names)
        if not self.step0:
            self.step0 = self._collect(grads if all(map(math.isfinite, grads.values())) else {})
        causes = self._rank(event, grads, loss, batch)
        self.causes = [c.to_dict() for c in causes]
        return causes

    def to_dicts(self) -> list[dict[str, str]]:
        """The last diagnosis as ``[{"cause", "evidence", "remedy"}, ...]``."""
        return [dict(c) for c in self.causes]

    # ------------------------------------------------------------------ ranking
    def _rank(self, event: str, grads: dict[str, float], loss: float | None,
              batch: Any) -> list[Cause]:
        """Every cause the evidence supports, most likely first (one entry per cause id)."""
        self._sync_probe()
        losses = list(self.losses)
        same = bool(losses) and (losses[-1] == loss or (
            loss is not None and math.isnan(losses[-1]) and math.isnan(loss)))
        if loss is not None and not same:
            losses.append(float(loss))
        trend = loss_trend(losses)
        explosion = event in _EXPLOSIONS and (event not in ("spike", "backoff")
                                              or self._grew(grads, trend))
        causes: list[Cause] = []
        bad: list[tuple[str, int, int]] | None = None
        if event in ("nonfinite", "halt") and batch is not None:
            bad = batch_nonfinite(batch)
            causes += self._data_cause(bad)
        if event in ("nonfinite", "halt") and not causes:
            causes += self._loss_cause(grads, loss, losses, trend, batch_read=bad is not None)
        causes += self._depth_causes(explosion)
        causes += self._recurrent_cause()
        lr_cause = self._lr_cause(event, explosion, grads, trend)
        if lr_cause is not None:
            causes.append(lr_cause)
        causes.sort(key=lambda c: -c.score)
        seen: set[str] = set()
        out = []
        for c in causes:
            if c.cause not in seen:
                seen.add(c.cause)
                out.append(c)
        return out

    def _grew(self, grads: dict[str, float], trend: LossTrend) -> bool:
        """Whether a spike (or a backoff) is an explosion: growth, not one large step.

        The loss rising step over step, the gradient norm rising 3 steps in a row to x3 or
        more, or a norm 10x the median of the steps before. A spike short of that (a
        z-score alarm 1.0-1.4x its threshold, the kind clipping contains) is not one.
        """
        if trend.kind == "rise":
            return True
        norms = [v for v in self.grad_norms if math.isfinite(v)]
        if grads and all(map(math.isfinite, grads.values())):
            total = math.sqrt(sum(v * v for v in grads.values()))
            if not norms or not math.isclose(norms[-1], total, rel_tol=1e-6):
                norms.append(total)
        if len(norms) < 4:
            return False
        cur, prior = norms[-1], norms[:-1]
        if cur >= 10 * statistics.median(prior):
            return True
        run = norms[-4:]
        return all(b > a for a, b in itertools.pairwise(run)) and run[-1] >= 3 * run[0]

    @staticmethod
    def _data_cause(bad: list[tuple[str, int, int]] | None) -> list[Cause]:
        """``data_nonfinite``: the step's batch holds NaN/Inf (read on a non-finite step only)."""
        if not bad:
            return []
        where = "; ".join(f"{p} holds {c} NaN/Inf of {n} values" for p, c, n in bad[:3])
        return [Cause(
            "data_nonfinite", f"the batch of this step is not finite: {where}",
            "clean the data: drop or repair those samples in the Dataset (e.g. keep "
            "rows with torch.isfinite(x).all(dim=1), or torch.nan_to_num(x)); "
            "GradGuard skips such steps meanwhile", 100.0)]

    def _loss_cause(self, grads: dict[str, float], loss: float | None, losses: list[float],
                    trend: LossTrend, *, batch_read: bool = False) -> list[Cause]:
        """``loss_nonfinite``: a loss that broke by itself, with no run-up in the norms."""
        norms_hist = [v for v in self.grad_norms if math.isfinite(v)]
        grads_bad = [n for n, v in grads.items() if not math.isfinite(v)]
        loss_bad = loss is not None and not math.isfinite(loss)
        growth_hist = (len(norms_hist) >= 3 and norms_hist[-1]
                       > 10 * statistics.median(norms_hist[:-1]))
        prior = [v for v in losses[:-1] if math.isfinite(v)]
        steady = len(prior) >= 3 and prior[-1] <= 3 * statistics.median(prior)
        if not ((loss_bad or grads_bad) and trend.kind != "rise" and not growth_hist
                and steady and norms_hist and not self._growth(self.step0)[1]):
            return []
        lo, hi = min(norms_hist), max(norms_hist)
        before = f"{trend.before:.4g}" if math.isfinite(trend.before) else "finite"
        what = (f"the loss became {loss} right after {before}" if loss_bad else
                f"the loss is finite ({loss}) but {len(grads_bad)} gradient(s) are not "
                f"(first: {grads_bad[0]})")
        return [Cause(
            "loss_nonfinite",
            f"{what}, with no run-up: the gradient norms before were finite and steady "
            f"({lo:.3g}..{hi:.3g})" + (" and the batch is finite" if batch_read else ""),
            "make the loss numerically safe: clamp inside log/sqrt/division "
            "(torch.log(p.clamp_min(1e-12)), x / (d + 1e-8)), or use the fused stable "
            "forms (F.cross_entropy / F.binary_cross_entropy_with_logits on logits, "
            "torch.logsumexp)", 50.0)]

    def _depth_causes(self, explosion: bool) -> list[Cause]:
        """Amplification through depth (step-0 evidence: init, norms, activations, skips)."""
        ev = self.step0
        growth, grows = self._growth(ev)
        n_layers = int(ev.get("layers", 0))
        causes = self._amplification(ev, growth, grows, explosion)
        # a structural cause rests on measured growth through the depth, never on the
        # explosion alone (a deep plain net that blew up may have had a too-high LR)
        if grows and growth is not None and not causes:
            causes += self._structural(growth, n_layers, 10.0 + math.log(growth))
        return causes

    def _recurrent_cause(self) -> list[Cause]:
        """``recurrent_weights``: the recurrent matrix with the largest singular value > 1."""
        for r in sorted(self.structure.recurrent, key=lambda r: -r.sigma_max)[:1]:
            if r.sigma_max >= self.thresholds.recurrent_sigma:
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

    def _growth(self, ev: Mapping[str, Any]) -> tuple[float | None, bool]:
        """The strongest fitted per-layer factor, and whether it counts as growth."""
        t = self.thresholds
        n, blocks = int(ev.get("layers", 0)), int(ev.get("blocks", 0))
        cands = [(float(ev[k]), float(ev[k]) ** span) if ev.get(k) is not None else (1.0, 1.0)
                 for k, span in (("growth_back", n - 1), ("growth_fwd", n - 1),
                                 ("growth_stream", blocks - 1))]
        if all(ev.get(k) is None for k in ("growth_back", "growth_fwd", "growth_stream")):
            return None, False
        need = [t.amplification, t.amplification, t.stream_amplification]
        grows = any(g >= t.growth and amp >= need[i] for i, (g, amp) in enumerate(cands))
        return max(cands, key=lambda c: c[1])[0], grows

    def _growth_words(self, ev: Mapping[str, Any]) -> str:
        n, blocks = int(ev.get("layers", 0)), int(ev.get("blocks", 0))
        parts = []
        if ev.get("growth_fwd") is not None:
            g = ev["growth_fwd"]
            parts.append(f"activations grow x{g:.3g} per layer forward (x{g ** (n - 1):.3g} "
                         f"over {n} weight layers)")
        if ev.get("growth_back") is not None:
            g = ev["growth_back"]
            parts.append(f"gradients x{g:.3g} per layer from output to input "
                         f"(x{g ** (n - 1):.3g})")
        if ev.get("growth_stream") is not None:
            g = ev["growth_stream"]
            parts.append(f"the residual stream grows x{g:.3g} per block (x{g ** (blocks - 1):.3g}"
                         f" over {blocks} blocks)")
        return (", ".join(parts) + ", fitted at step 0") if parts else "no depth profile"

    def _amplification(self, ev: Mapping[str, Any], growth: float | None, grows: bool,
                       explosion: bool) -> list[Cause]:
        t = self.thresholds
        s = self.structure
        out: list[Cause] = []
        if not grows and not (explosion and growth is None):
            return out
        base = 20.0 if grows else 4.0
        init = ev.get("init_median")
        relu_like = not any(a.kind in ("Tanh", "Sigmoid", "Hardtanh", "Softsign")
                            for a in s.activations)
        if init is not None and init >= t.init_ratio:
            name, std, he, fan_in = ev["init_worst"]
            remedy = ("He init for ReLU-family activations: for each nn.Linear/nn.Conv layer m, "
                      "nn.init.kaiming_normal_(m.weight, nonlinearity='relu') and "
                      "nn.init.zeros_(m.bias)" if relu_like else
                      "Xavier init for tanh/sigmoid: for each nn.Linear/nn.Conv layer m, "
                      "nn.init.xavier_normal_(m.weight) and nn.init.zeros_(m.bias)")
            out.append(Cause(
                "init_too_large",
                f"the weights are {init:.2g}x the He std for their fan-in (median over "
                f"{len(s.trunk())} layers; {name}: std {std:.3g} vs {he:.3g} for fan_in "
                f"{fan_in}); {self._growth_words(ev)}",
                remedy, base + math.log(init)))
        acts = [a for a in s.activations if math.sqrt(2) * a.rms_gain >= t.activation_gain]
        if acts:
            a = max(acts, key=lambda a: a.rms_gain)
            gain = math.sqrt(2) * a.rms_gain
            n = sum(1 for b in s.activations if b.kind == a.kind)
            out.append(Cause(
                "activation",
                f"{a.kind} amplifies gradients: derivative up to {a.max_gain:.3g}, RMS "
                f"{a.rms_gain:.3g} on N(0,1) inputs, i.e. x{gain:.2g} per layer with He-scaled "
                f"weights ({n} of them); {self._growth_words(ev)}",
                f"replace {a.kind} with nn.ReLU() or nn.GELU() (derivative <= 1.1), or "
                f"divide its output by {a.max_gain:.2g}",
                base + math.log(gain)))
        return out

    def _structural(self, growth: float, n_layers: int, score: float) -> list[Cause]:
        """``no_normalization`` / ``no_residual``: only what was looked for and not found.

        Normalisation by what the code computes, skip connections by the forward probe.
        """
        s = self.structure
        out: list[Cause] = []
        words = self._growth_words(self.step0)
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

    def _step0_ratio(self, adaptive: bool) -> tuple[float | None, str, float]:
        """The step-0 update ratio for the optimizer's form, at the step-0 LR (not rescaled).

        Returns ``(total, most-moved tensor, its ratio)``.
        """
        ev = self.step0
        saved = (ev.get("ratios") or {}).get("adaptive" if adaptive else "sgd")
        if saved is None and ev.get("update_ratio") is not None:  # a state of an earlier version
            saved = [ev["update_ratio"], *(ev.get("update_worst") or ["", 0.0])]
        if not saved or not math.isfinite(float(saved[0])):
            return None, "", 0.0
        return float(saved[0]), str(saved[1]), float(saved[2])

    def _later_ratios(self, adaptive: bool) -> list[float]:
        """The update ratio of each later step in the history, at the LR of that step."""
        w0, numel = self.step0.get("weight_norm"), int(self.step0.get("numel", 1))
        if not w0:
            return []
        out = []
        for g, lr_t in zip(self.grad_norms, self.lrs, strict=False):
            if math.isfinite(g) and math.isfinite(lr_t):
                r = update_ratio(lr_t, g, w0, adaptive=adaptive, numel=numel)
                if math.isfinite(r):
                    out.append(r)
        return out

    def _lr_cause(self, event: str, explosion: bool, grads: dict[str, float],
                  trend: Any) -> Cause | None:
        t = self.thresholds
        lr = self._lr()
        if lr is None:
            return None
        adaptive = is_adaptive(self.optimizer)
        ratio0, worst, worst0 = self._step0_ratio(adaptive)
        lr0 = float(self.step0.get("lr0") or lr)
        ratio = max([*([ratio0] if ratio0 is not None else []), *self._later_ratios(adaptive)],
                    default=0.0)
        rising = explosion and trend.kind == "rise"
        limit = t.update_ratio if explosion else t.update_ratio_alone
        if ratio < limit and not rising:
            return None
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
        if not ratio0 or ratio > 2 * ratio0:
            words.append(f"{'later ' if ratio0 else ''}up to {_pct(ratio)} in one step")
        if rising:
            words.append(f"the loss rose {trend.steps} steps in a row from {trend.before:.3g}"
                         + (" to non-finite" if not math.isfinite(trend.factor)
                            else f" (x{trend.factor:.3g})"))
        sched = schedule_position(self.lrs)
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
        remedy = (f"lower the LR to ~{_round_lr(target)}: the update {verb} the weights by "
                  f"{_pct(base)} in one step (aim for ~{_pct(t.target_ratio)}, and "
                  f"~{_pct(10 * t.target_ratio)} for the most-moved tensor)")
        if sched and "warmup" in sched:
            remedy += "; or a longer warmup to a lower peak"
        if not adaptive:
            remedy += "; or an adaptive optimizer: torch.optim.Adam(params, lr=1e-3)"
        return Cause("lr_too_high", "; ".join(words), remedy, score)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load state from :meth:`state_dict` (the probe's findings included).

        A state saved before normalisation was probed loads with it unknown.
        """
        state = {"probed_norms": None, "skips": len(state_dict.get("residual") or ()),
                 **state_dict}
        super().load_state_dict(state)
        self._restore_probe()
