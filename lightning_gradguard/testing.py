"""Deterministic fault injection for your own tests: NaN / Inf / ×factor at given steps.

Put :class:`FaultInjector` in the Trainer's callbacks *before* the guard::

    faults = [Fault(step=10, kind="nan", target="grad"), Fault(step=20, kind="scale",
              factor=1e6, target="grad")]
    trainer = pl.Trainer(callbacks=[FaultInjector(faults), GradGuard()])

Targets:

* ``"grad"`` — the gradients right after backward (``on_after_backward``), i.e. what the
  optimizer would use. With accumulation, the fault is injected once, on the first
  micro-batch of the optimizer step.
* ``"loss"`` — the loss returned by ``training_step`` (automatic optimization): backward then
  produces the non-finite (or scaled) gradients naturally, as a real bad batch would.
* ``"param"`` — the parameters right after the optimizer step (``on_train_batch_end``).

``step`` is the Trainer's ``global_step`` when the fault is injected (0-based: step 0 is
the first optimizer step).
"""

from __future__ import annotations

import fnmatch
import functools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradguard.core._friendly import friendly_init, friendly_kwargs
from lightning_gradguard.core._validation import check_choice, check_int, check_number

__all__ = ["Fault", "FaultInjector"]

_KINDS = ("nan", "inf", "scale")
_TARGETS = ("grad", "loss", "param")


@friendly_kwargs
@dataclass(frozen=True)
class Fault:
    """One fault.

    Args:
        step: ``global_step`` at which to inject (>= 0).
        kind: ``"nan"``, ``"inf"`` or ``"scale"`` (multiply by ``factor``).
        target: ``"grad"``, ``"loss"`` or ``"param"``.
        factor: Multiplier for ``kind="scale"``.
        params: Glob pattern of parameter names to touch (``"*"``: all; for grads and
            params, NaN/Inf go into the first element of each matching tensor).
        ranks: Global ranks to inject on (``None``: all).

    Example:
        >>> Fault(step=3, kind="nan")
        Fault(step=3, kind='nan', target='grad', factor=1000000.0, params='*', ranks=None)
    """

    step: int
    kind: Literal["nan", "inf", "scale"] = "nan"
    target: Literal["grad", "loss", "param"] = "grad"
    factor: float = 1e6
    params: str = "*"
    ranks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_int("step", self.step, low=0)
        check_choice("kind", self.kind, _KINDS)
        check_choice("target", self.target, _TARGETS)
        check_number("factor", self.factor)
        if not isinstance(self.params, str):
            raise TypeError(f"`params` must be a glob pattern (str), got {self.params!r}")
        if self.ranks is not None:
            msg = ("`ranks` must be None or a sequence of global ranks (ints >= 0), "
                   f"got {self.ranks!r}")
            if isinstance(self.ranks, (str, bytes)) or not isinstance(self.ranks, Iterable):
                raise TypeError(msg)
            ranks = tuple(self.ranks)
            if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
                raise TypeError(msg)
            if any(r < 0 for r in ranks):
                raise ValueError(msg)
            object.__setattr__(self, "ranks", ranks)  # a list would make the Fault unhashable

    def applies(self, trainer: pl.Trainer, target: str) -> bool:
        """Whether this fault fires now for ``target``."""
        return (self.target == target and trainer.global_step == self.step
                and (self.ranks is None or trainer.global_rank in self.ranks))

    def corrupt_(self, t: torch.Tensor) -> None:
        """Corrupt ``t`` in place."""
        with torch.no_grad():
            if self.kind == "scale":
                t.mul_(self.factor)
            elif t.numel():
                # index, not ``view(-1)``: gradients/parameters may be non-contiguous
                t[(0,) * t.dim()] = float("nan") if self.kind == "nan" else float("inf")


class FaultInjector(Callback):
    """Injects :class:`Fault` s deterministically (list it before the guard in callbacks).

    Args:
        faults: The faults to inject.

    Attributes:
        injected: ``(global_step, target, kind)`` of every fault injected so far.
    """

    @friendly_init
    def __init__(self, faults: Sequence[Fault]) -> None:
        if (isinstance(faults, (Fault, str, bytes)) or not isinstance(faults, Iterable)
                or not all(isinstance(f, Fault) for f in faults)):
            raise TypeError(f"`faults` must be a sequence of Fault, got {faults!r}")
        self.faults = list(faults)
        self.injected: list[tuple[int, str, str]] = []
        self._done: set[tuple[int, int]] = set()
        # (module, the wrapper we installed, the instance attribute it replaced, if any)
        self._wrapped: tuple[pl.LightningModule, Any, tuple[Any, ...]] | None = None

    def _matching(self, pl_module: pl.LightningModule, fault: Fault) -> list[torch.nn.Parameter]:
        return [p for n, p in pl_module.named_parameters()
                if fnmatch.fnmatchcase(n, fault.params)]

    def _fire(self, trainer: pl.Trainer, target: str) -> list[Fault]:
        out = []
        for i, f in enumerate(self.faults):
            key = (i, trainer.global_step)
            if f.applies(trainer, target) and key not in self._done:
                self._done.add(key)
                self.injected.append((trainer.global_step, target, f.kind))
                out.append(f)
        return out

    def _check_patterns(self, pl_module: pl.LightningModule) -> None:
        """Refuse a gradient/parameter fault whose ``params`` glob matches no parameter."""
        names = [n for n, _ in pl_module.named_parameters()]
        for f in self.faults:
            if f.target != "loss" and not any(fnmatch.fnmatchcase(n, f.params) for n in names):
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(
                    f"FaultInjector: `params` of {f!r} matches no parameter of "
                    f"{type(pl_module).__name__}, so nothing would be injected; parameter "
                    f"names are: {shown}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the ``params`` patterns; wrap ``training_step`` for loss faults.

        The wrapper is undone when the fit ends.

        Raises:
            ValueError: If a ``"grad"``/``"param"`` fault's ``params`` matches no parameter.
        """
        self._check_patterns(pl_module)
        self._unwrap()
        if not any(f.target == "loss" for f in self.faults):
            return
        original = pl_module.training_step
        missing = object()
        previous = vars(pl_module).get("training_step", missing)
        active = [True]

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if not active[0]:  # left behind under another wrapper: transparent
                return out
            for f in self._fire(trainer, "loss"):
                corrupted = _corrupt_loss(out, f)
                if corrupted is out:
                    self.injected.pop()
                    warnings.warn(
                        f"FaultInjector: cannot inject {f!r}: training_step returned "
                        f"{type(out).__name__}, not a loss tensor or a dict with 'loss' (under "
                        "manual optimization use target='grad')", stacklevel=2)
                out = corrupted
            return out

        training_step._gradguard_wrapped = True  # type: ignore[attr-defined]
        training_step._gradguard_active = active  # type: ignore[attr-defined]
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = (pl_module, training_step, () if previous is missing else (previous,))

    def _unwrap(self) -> None:
        """Remove the ``training_step`` wrapper, so later fits of the module see no faults."""
        if self._wrapped is None:
            return
        module, wrapper, previous = self._wrapped
        self._wrapped = None
        wrapper._gradguard_active[0] = False
        if vars(module).get("training_step") is wrapper:  # else another wrapper is on top
            if previous:
                module.training_step = previous[0]  # type: ignore[method-assign]
            else:
                del module.training_step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Undo the ``training_step`` wrapper."""
        self._unwrap()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Undo the ``training_step`` wrapper (the fit failed)."""
        self._unwrap()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Inject gradient faults (a fault that found no gradient is not recorded, and warns)."""
        for f in self._fire(trainer, "grad"):
            touched = 0
            for p in self._matching(pl_module, f):
                if p.grad is not None:
                    f.corrupt_(p.grad)
                    touched += 1
            if not touched:
                self.injected.remove((trainer.global_step, "grad", f.kind))
                warnings.warn(f"FaultInjector: {f!r} touched no gradient at step "
                              f"{trainer.global_step}: the matching parameters have none "
                              "(frozen or unused)", stacklevel=2)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Inject parameter faults (after the optimizer step)."""
        # global_step has already advanced past the step that just happened
        step = trainer.global_step - 1
        for i, f in enumerate(self.faults):
            key = (i, -1 - step)
            if (f.target == "param" and f.step == step and key not in self._done
                    and (f.ranks is None or trainer.global_rank in f.ranks)):
                self._done.add(key)
                self.injected.append((step, "param", f.kind))
                for p in self._matching(pl_module, f):
                    f.corrupt_(p.data)


def _corrupt_loss(out: Any, fault: Fault) -> Any:
    if fault.kind == "scale":
        factor = fault.factor
    else:
        factor = float("nan") if fault.kind == "nan" else float("inf")
    if isinstance(out, torch.Tensor):
        return out * factor
    if isinstance(out, dict) and "loss" in out:
        return {**out, "loss": out["loss"] * factor}
    return out
