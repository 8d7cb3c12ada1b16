"""Scratch prototypes of candidate GradGuard rules (issue 14), tried without editing the package.

**Historical (round 1).** ``ProtoCore`` overrides ``GuardCore._nonfinite`` / ``_backoff`` of the
core at commit d472c44; the refactored core (measure / decide / apply) has neither, so against
today's package every prototype silently equals ``GradGuard()``. Round 2 implemented the
adopted rules in ``lightning_gradguard/core/decide.py`` (``nonfinite_window`` and the
evidence-gated spike/growth backoff); rerun these prototypes only at d472c44.

``build(name)`` returns the callbacks of prototype ``name`` (``rescue.py --methods proto:NAME``).
Each prototype is a :class:`GradGuard` whose :class:`GuardCore` is :class:`ProtoCore`, a
subclass that gates the LR backoff (the only thing it changes unless a recipe says otherwise);
the ablation (``benchmarks/results/rescue_ablation.md``) records every one with its numbers.

Rules (each with its mechanism):

``nf_window=W``
    A non-finite step is skipped; it backs the LR off only if another non-finite step happened
    within the last ``W`` steps. Mechanism: one corrupt batch is a property of the batch, not
    of the LR; skipping it leaves weights and optimizer state untouched, so nothing is left to
    repair. Repeated non-finite steps mean the weights/LR produce them.
``loss_evidence=(k, beta)``
    A backoff from spikes, capped updates or growth happens only when the loss is rising
    beyond its own running statistics: the median of the last 3 finite losses exceeds the
    running mean by ``k`` running standard deviations (EMA with ``beta``; the statistics
    ignore skipped steps and take each loss clamped at mean + 4 sd). Mechanism: a clipped
    spike that leaves the loss where it was has been contained by the clip; an LR that is
    too high shows as a loss that climbs over several steps (a median of 3 ignores one bad
    batch).
``rate=(R, W)``
    A backoff from spikes, capped updates or growth happens only when at least ``R`` of the
    last ``W`` steps were clipped. Mechanism: an isolated spike is contained by one clip; an LR
    that is too high makes clipping the rule rather than the exception (with SGD the update
    cap then sets every step's size and the run stalls at a fixed step length). With
    ``loss_evidence`` too, either evidence suffices.
``capfirst``
    A backoff from the spike count (or growth) happens only at a step whose update the SGD
    cap (``max_update_ratio``) clipped (or, with ``rate``, when clipping is the rule); the
    decision is taken with the step's report and applies from the next update. Mechanism: a
    capped update means the LR times this gradient would move the weights by more than
    ``max_update_ratio`` of their norm - a direct measure of the LR against the weights -
    while a z-score spike in a healthy run is a gradient a little above its own recent
    history, which the clip has already answered.
``armed``
    With ``capfirst``: while the LR scale is below 1 (the run has backed off and not yet
    recovered), the spike count backs off as before. Mechanism: the first backoff needed hard
    evidence that the LR is too high; spikes that recur while the LR climbs back are that
    instability returning, not a healthy run's noise.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.callbacks import guard as guard_module
from lightning_gradguard.core.guard import Action, GuardCore, StepReport

__all__ = ["PROTOTYPES", "LossStats", "ProtoCore", "ProtoGuard", "build"]


class LossStats:
    """EMA mean / variance of the finite loss, clamped at mean + 4 sd, and the last 3 losses."""

    def __init__(self, beta: float = 0.95, warmup: int = 5) -> None:
        self.beta, self.warmup = beta, warmup
        self.n = 0
        self.mean = 0.0
        self.var = 0.0
        self.recent: collections.deque[float] = collections.deque(maxlen=3)

    @property
    def sd(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def update(self, x: float) -> None:
        if not math.isfinite(x):
            return
        if self.n >= self.warmup:
            x = min(x, self.mean + 4.0 * self.sd)
        self.n += 1
        if self.n == 1:
            self.mean, self.var = x, 0.0
        else:
            b = self.beta if self.n > self.warmup else 1.0 - 1.0 / self.n
            d = x - self.mean
            self.mean += (1 - b) * d
            self.var = b * (self.var + (1 - b) * d * d)
        self.recent.append(x)

    def rising(self, x: float, k: float) -> bool:
        """Whether the median of the last 3 losses (this one included) is above mean + k sd."""
        if self.n < self.warmup or not math.isfinite(x):
            return False
        last = sorted([*list(self.recent)[-2:], x])
        return last[len(last) // 2] > self.mean + k * self.sd


class ProtoCore(GuardCore):
    """:class:`GuardCore` with the prototype rules of ``proto`` gating :meth:`_backoff`."""

    def __init__(self, *args: Any, proto: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proto = proto
        k_beta = proto.get("loss_evidence")
        self.loss_stats = LossStats(beta=k_beta[1]) if k_beta else None
        self._nf_steps: list[int] = []
        self._clip_steps: list[int] = []
        self._pending = False
        self._in_nonfinite = False
        self._evidence = True

    def step(self, loss: Tensor | float | None = None, **kwargs: Any) -> StepReport:
        lv = float(loss) if loss is not None else math.nan
        if self.loss_stats is not None:
            self._evidence = self.loss_stats.rising(lv, self.proto["loss_evidence"][0])
        before = self.policy.threshold_value()
        self._pending = False
        report = super().step(loss, **kwargs)
        if self._pending:
            # "capfirst": decided with the step's report; takes effect from the next update
            capped = report.action is Action.CLIP and (not report.spike
                                                       or report.threshold < before)
            rate = "rate" in self.proto and self._rate_evidence()
            # "armed": the run already backed off and has not recovered: the LR was shown to be
            # too high, and spikes while it climbs back are that instability returning
            armed = bool(self.proto.get("armed")) and self.backoff.scale < 1.0
            if capped or rate or armed:
                GuardCore._backoff(self)
                self.counters.spike_steps.clear()
        if self.loss_stats is not None and report.finite and report.action is not Action.SKIP:
            self.loss_stats.update(lv)
        if report.action is Action.CLIP:
            self._clip_steps.append(self.counters.steps)
        return report

    def _rate_evidence(self) -> bool:
        """Whether at least R of the last W steps (this one included) were clipped."""
        need, window = self.proto["rate"]
        step = self.counters.steps
        self._clip_steps = [t for t in self._clip_steps if t > step - window]
        return len(self._clip_steps) + 1 >= need

    def _nonfinite(self, *args: Any, **kwargs: Any) -> StepReport:
        self._in_nonfinite = True
        try:
            return super()._nonfinite(*args, **kwargs)
        finally:
            self._in_nonfinite = False

    def _backoff(self) -> None:
        step = self.counters.steps
        if self._in_nonfinite:
            window = self.proto.get("nf_window")
            if window:
                recent = [t for t in self._nf_steps if t > step - window]
                self._nf_steps = [*recent, step]
                if not recent:
                    return  # one non-finite step: skipped, no backoff
        elif self.proto.get("capfirst"):
            self._pending = True
            return
        else:
            gates = []
            if self.loss_stats is not None:
                gates.append(self._evidence)  # the loss is rising beyond its statistics
            if "rate" in self.proto:
                gates.append(self._rate_evidence())  # clipping has become the rule
            if gates and not any(gates):
                return  # clipped, contained: no backoff
        super()._backoff()


class AdamUpdateControl(Callback):
    """StableAdamW-style update control (Wortsman et al. 2023) for Adam/AdamW, per tensor.

    In ``on_before_optimizer_step`` (after the guard) it computes, for every tensor with Adam
    state, ``r = sqrt(mean(g^2 / max(v_hat, eps^2)))`` with ``v_hat`` the bias-corrected second
    moment *including* this gradient; for ``r > 1`` the tensor's update (``p_new - p_old``, the
    decoupled weight decay included) is divided by ``r`` in a step post-hook. Mechanism: Adam
    normalises by a second moment that lags a sudden gradient change (``v`` still small), so the
    update of a tensor whose gradient jumps is up to ``1 / sqrt(1 - beta2)`` times its usual
    size; scaling by ``1 / r`` bounds it by the size the moment estimate supports.
    Reading the state costs one more pass over ``exp_avg_sq`` (no host sync in principle; here
    one ``.item()`` per tensor, a prototype).
    """

    def __init__(self) -> None:
        self._saved: list[tuple[Any, Any, float]] = []
        self._handle: Any = None
        self.scaled = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = guard_module._raw(trainer.optimizers[0])
        self._handle = opt.register_step_post_hook(self._post)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        import torch

        opt = guard_module._raw(optimizer)
        self._saved = []
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            return
        for group in opt.param_groups:
            beta2, eps = group["betas"][1], group["eps"]
            for p in group["params"]:
                st = opt.state.get(p)
                if p.grad is None or not st or "exp_avg_sq" not in st:
                    continue
                t = float(st["step"]) + 1.0
                g2 = p.grad.detach().float().square()
                v = (beta2 * st["exp_avg_sq"].float() + (1 - beta2) * g2) / (1 - beta2 ** t)
                r = float(torch.sqrt((g2 / v.clamp_min(eps * eps)).mean()))
                if math.isfinite(r) and r > 1.0:
                    self._saved.append((p, p.detach().clone(), r))

    def _post(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        import torch

        with torch.no_grad():
            for p, old, r in self._saved:
                p.copy_(old + (p - old) / r)
                self.scaled += 1
        self._saved = []


class ProtoGuard(GradGuard):
    """:class:`GradGuard` whose cores are :class:`ProtoCore` with ``proto``."""

    def __init__(self, proto: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proto = proto

    def _core_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                  optimizer: Optimizer) -> tuple[int, GuardCore]:
        optimizers = [guard_module._raw(o) for o in trainer.optimizers]
        idx = next((i for i, o in enumerate(optimizers) if o is optimizer), 0)
        core = self._cores.get(idx)
        if core is None or core.optimizer is not optimizer:
            core = ProtoCore(pl_module, optimizer, self.settings,
                             reducer=guard_module.make_reducer(trainer), proto=self.proto)
            self._cores[idx] = core
        return idx, core


PROTOTYPES: dict[str, Any] = {
    "default": lambda: [GradGuard()],
    # a single non-finite step: skip, no backoff
    "nf50": lambda: [ProtoGuard({"nf_window": 50})],
    # spike / cap / growth backoffs only with loss evidence
    "ev2": lambda: [ProtoGuard({"loss_evidence": (2.0, 0.95)})],
    "ev1": lambda: [ProtoGuard({"loss_evidence": (1.0, 0.95)})],
    "nf50_ev2": lambda: [ProtoGuard({"nf_window": 50, "loss_evidence": (2.0, 0.95)})],
    "nf50_ev1": lambda: [ProtoGuard({"nf_window": 50, "loss_evidence": (1.0, 0.95)})],
    "nf50_ev2_rec50": lambda: [ProtoGuard({"nf_window": 50, "loss_evidence": (2.0, 0.95)},
                                          recovery_steps=50)],
    "nf50_rate10of20": lambda: [ProtoGuard({"nf_window": 50, "rate": (10, 20)})],
    "nf50_ev2_rate10of20": lambda: [ProtoGuard({"nf_window": 50, "loss_evidence": (2.0, 0.95),
                                                "rate": (10, 20)})],
    "nf50_rate3of5": lambda: [ProtoGuard({"nf_window": 50, "rate": (3, 5)})],
    "nf50_rate5of10": lambda: [ProtoGuard({"nf_window": 50, "rate": (5, 10)})],
    "nf50_rate5of10_adamupd": lambda: [ProtoGuard({"nf_window": 50, "rate": (5, 10)}),
                                       AdamUpdateControl()],
    "nf50_capfirst": lambda: [ProtoGuard({"nf_window": 50, "capfirst": True})],
    "nf50_capfirst_rate5of10": lambda: [ProtoGuard({"nf_window": 50, "capfirst": True,
                                                    "rate": (5, 10)})],
    "nf50_capfirst_armed_rate5of10": lambda: [ProtoGuard({"nf_window": 50, "capfirst": True,
                                                          "armed": True, "rate": (5, 10)})],
    "nobackoff": lambda: [GradGuard(lr_backoff=False)],
    "rec50": lambda: [GradGuard(recovery_steps=50)],
}


def build(name: str) -> list[Callback]:
    """The callbacks of prototype ``name``."""
    if name not in PROTOTYPES:
        raise ValueError(f"unknown prototype {name!r}; known: {', '.join(sorted(PROTOTYPES))}")
    out: list[Callback] = PROTOTYPES[name]()
    return out
