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
  (:func:`~lightning_gradguard.core.causes.grew`): short of it, nothing is named beyond what
  the evidence shows on its own. The rules are pure functions of an evidence record, in
  :mod:`~lightning_gradguard.core.causes`; this module gathers the evidence.
"""

from __future__ import annotations

import math
import textwrap  # noqa: F401  (used in doctests)
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import torch
from torch import Tensor, nn

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._host import to_host
from lightning_gradguard.core._stateful import Stateful
from lightning_gradguard.core._validation import check_bool, check_choice, check_int
from lightning_gradguard.core.causes import (
    CAUSES,
    Cause,
    DiagnosisThresholds,
    Evidence,
    Step0Evidence,
    rank,
    step0_evidence,
)
from lightning_gradguard.core.evidence import batch_nonfinite
from lightning_gradguard.core.optim import is_adaptive, learning_rate
from lightning_gradguard.core.probe import ForwardProbe
from lightning_gradguard.core.structure import ModelStructure, inspect_model

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
        fact: What this step itself shows, behind ``likely_cause`` (the loss itself
            non-finite, or a total norm that overflowed from finite gradients); ``""`` when it
            shows nothing of its own. Stated alone where ranked causes follow
            (``message(ranked=True)``).
        finding: The same as data: ``"loss_nonfinite"``, ``"norm_overflow"``, ``"growth"``
            (the norm grew step over step before) or ``""``.
    """

    step: int
    nonfinite_params: tuple[str, ...]
    origin: str | None
    likely_cause: str
    weights_finite: bool | None = None
    first_step: bool = False
    fact: str = ""
    finding: str = ""

    def message(self, limit: int = 8, *, ranked: bool = False) -> str:
        """Human-readable summary (at most ``limit`` parameter names).

        Args:
            limit: Parameter names shown.
            ranked: Ranked causes follow this message: state only :attr:`fact` as the
                likely cause (nothing when it is empty), not the generic list.

        Example:
            >>> d = Diagnosis(7, ("a.weight", "b.weight"), "b.weight", "lr too high")
            >>> print(textwrap.fill(d.message(), 88))
            step 7: non-finite gradients in 2 parameter(s): a.weight, b.weight; most likely origin:
            b.weight (closest to the output). Likely cause: lr too high
            >>> d.message(ranked=True).endswith("(closest to the output)")
            True
        """
        names = ", ".join(self.nonfinite_params[:limit])
        if len(self.nonfinite_params) > limit:
            names += f", ... (+{len(self.nonfinite_params) - limit} more)"
        origin = (
            f"; most likely origin: {self.origin} (closest to the output)" if self.origin else ""
        )
        cause = self.fact if ranked else self.likely_cause
        return (
            f"step {self.step}: non-finite gradients in {len(self.nonfinite_params)} "
            f"parameter(s): {names}{origin}" + (f". Likely cause: {cause}" if cause or not ranked
                                                else "")
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
        >>> d.origin, d.fact, d.finding
        ('l1.weight', 'the loss itself is non-finite (nan)', 'loss_nonfinite')
    """
    bad = tuple(n for n, v in zip(names, per_tensor_norms, strict=False) if not math.isfinite(v))
    origin = bad[-1] if bad else None
    fact = finding = ""
    if loss is not None and not math.isfinite(loss):
        fact, finding = f"the loss itself is non-finite ({loss})", "loss_nonfinite"
        cause = f"{fact}; " + _USUAL_CAUSES
    elif growth_before:
        finding = "growth"
        cause = ("the gradient norm was growing step over step before this (an explosion): "
                 "the learning rate is most likely too high; " + _USUAL_CAUSES)
    elif not bad:
        fact = "the total norm overflowed although every gradient is finite"
        finding = "norm_overflow"
        cause = f"{fact}; " + _USUAL_CAUSES
    else:
        cause = _USUAL_CAUSES
    if lr_scale < 1.0:
        cause += f" (the guard had already reduced the LR to {lr_scale:.3g}x)"
    return Diagnosis(step=step, nonfinite_params=bad, origin=origin, likely_cause=cause,
                     fact=fact, finding=finding)


Event = Literal["preflight", "spike", "backoff", "nonfinite", "halt", "on_demand"]
EVENTS: Final[tuple[str, ...]] = ("preflight", "spike", "backoff", "nonfinite", "halt",
                                  "on_demand")
"""Why a diagnosis is asked for. ``nonfinite``/``halt`` are explosion events; a ``spike`` or a
``backoff`` is one only with growth behind it (see :meth:`Diagnostician.diagnose`: repeated
z-score alarms are the guard's caution, not an explosion); ``preflight`` and ``on_demand``
report only what the evidence already shows on its own."""

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
        #: the step-0 evidence (``None`` until the first step or diagnosis gathered it)
        self.step0: Step0Evidence | None = None
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

    def _collect(self, grads: Mapping[str, float],
                 weights: Mapping[str, tuple[float, int]] | None = None) -> Step0Evidence:
        """Step-0 evidence (plain values, saved in the state)."""
        self._sync_probe()
        return step0_evidence(self.structure, grads,
                              self._weight_norms() if weights is None else weights,
                              self._lr(), adaptive=is_adaptive(self.optimizer),
                              min_layers=self.thresholds.min_layers)

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
        if self.step0 is None:
            self.step0 = self._collect(grads if all(map(math.isfinite, grads.values())) else {})
        causes = self._rank(event, grads, loss, batch)
        self.causes = [c.to_dict() for c in causes]
        return causes

    def to_dicts(self) -> list[dict[str, str]]:
        """The last diagnosis as ``[{"cause", "evidence", "remedy"}, ...]``."""
        return [dict(c) for c in self.causes]

    # ------------------------------------------------------------------ ranking
    def evidence(self, event: str, grads: Mapping[str, float], loss: float | None,
                 batch: Any = None) -> Evidence:
        """The :class:`~lightning_gradguard.core.causes.Evidence` of a ranking for ``event``.

        The batch is read (for NaN/Inf) on a non-finite step or a halt only.
        """
        self._sync_probe()
        losses = list(self.losses)
        same = bool(losses) and (losses[-1] == loss or (
            loss is not None and math.isnan(losses[-1]) and math.isnan(loss)))
        if loss is not None and not same:
            losses.append(float(loss))
        read = event in ("nonfinite", "halt") and batch is not None
        return Evidence(
            event=event, grads=dict(grads), loss=loss, losses=tuple(losses),
            grad_norms=tuple(self.grad_norms), lrs=tuple(self.lrs), lr=self._lr(),
            adaptive=is_adaptive(self.optimizer), step0=self.step0 or Step0Evidence(),
            structure=self.structure, batch_bad=tuple(batch_nonfinite(batch)) if read else None)

    def _rank(self, event: str, grads: Mapping[str, float], loss: float | None,
              batch: Any) -> list[Cause]:
        """Every cause the evidence supports, most likely first (one entry per cause id)."""
        return rank(self.evidence(event, grads, loss, batch), self.thresholds)

    def state_dict(self) -> dict[str, Any]:
        """The declared state, the step-0 evidence as plain values (``None``: not yet)."""
        return {**super().state_dict(),
                "step0": self.step0.to_state() if self.step0 is not None else None}

    def reset(self) -> None:
        """Forget the history, the step-0 evidence and the last diagnosis."""
        super().reset()
        self.step0 = None

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load state from :meth:`state_dict` (the probe's findings included).

        A state saved before normalisation was probed loads with it unknown.
        """
        state = {"probed_norms": None, "skips": len(state_dict.get("residual") or ()),
                 **state_dict}
        super().load_state_dict(state)
        step0 = state_dict.get("step0")
        self.step0 = Step0Evidence.from_state(step0) if step0 else None
        self._restore_probe()
