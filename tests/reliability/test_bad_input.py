"""Bad input: every public constructor argument, out of range or of the wrong type, raises a
ValueError/TypeError that names the argument and shows the bad value; a closure-based
optimizer (LBFGS) is refused at fit start; degenerate models (no trainable parameters, all
frozen, empty param groups) do not crash the guard."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from support.modules import TinyModule
from support.state import all_finite
from support.trainer import fit

from lightning_gradguard import (
    AdaptiveGradClip,
    FixedNormClip,
    GuardSettings,
    PercentileClip,
    ZScoreClip,
)
from lightning_gradguard.callbacks import GradGuard, GradientMonitor
from lightning_gradguard.testing import Fault, FaultInjector

NAN, INF = math.nan, math.inf

# (argument, bad value, exception) shared by GradGuard and GuardSettings
_SETTINGS: list[tuple[str, Any, type[Exception]]] = [
    ("clip", "zscore", TypeError),
    ("clip", ZScoreClip, TypeError),  # the class, not an instance
    ("norm_type", 0.0, ValueError),
    ("norm_type", -2.0, ValueError),
    ("norm_type", NAN, ValueError),
    ("norm_type", "2", TypeError),
    ("skip_nonfinite", 1, TypeError),
    ("lr_backoff", "yes", TypeError),
    ("backoff_factor", 1.0, ValueError),
    ("backoff_factor", 0.0, ValueError),
    ("backoff_factor", None, TypeError),
    ("recovery_steps", 0, ValueError),
    ("recovery_steps", 1.5, TypeError),
    ("min_lr_scale", 0.0, ValueError),
    ("min_lr_scale", 2.0, ValueError),
    ("spike_patience", -1, ValueError),
    ("spike_patience", True, TypeError),
    ("spike_window", 0, ValueError),
    ("growth_patience", -1, ValueError),
    ("growth_min_rise", -0.1, ValueError),
    ("growth_min_rise", INF, ValueError),
    ("rollback", "no", TypeError),
    ("snapshot_every", 0, ValueError),
    ("rollback_after", 0, ValueError),
    ("halt_after", -1, ValueError),
    ("halt_after", 2.0, TypeError),
    ("max_update_ratio", 0.0, ValueError),
    ("max_update_ratio", "0.1", TypeError),
    ("amp_halt_after", 0, ValueError),
    ("amp_halt_after", 40.0, TypeError),
    ("nonfinite_window", -1, ValueError),
    ("nonfinite_window", 50.0, TypeError),
    ("diagnose", "yes", TypeError),
    ("preflight", 0, TypeError),
    ("verbose", 1, TypeError),
]

BAD: list[tuple[str, Callable[..., Any], str, Any, type[Exception]]] = [
    *[("GradGuard", GradGuard, a, v, e) for a, v, e in _SETTINGS],
    ("GradGuard", GradGuard, "on_halt", "explode", ValueError),
    ("GradGuard", GradGuard, "checkpoint_dir", 3, TypeError),
    ("GradGuard", GradGuard, "name", 3, TypeError),
    ("GradGuard", GradGuard, "progress_bar", "yes", TypeError),
    *[("GuardSettings", GuardSettings, a, v, e) for a, v, e in _SETTINGS],
    ("GradientMonitor", GradientMonitor, "norm_type", -1.0, ValueError),
    ("GradientMonitor", GradientMonitor, "norm_type", "l2", TypeError),
    ("GradientMonitor", GradientMonitor, "layer_depth", -1, ValueError),
    ("GradientMonitor", GradientMonitor, "layer_depth", 1.0, TypeError),
    ("GradientMonitor", GradientMonitor, "max_layers", 0, ValueError),
    ("GradientMonitor", GradientMonitor, "log_histograms", "yes", TypeError),
    ("ZScoreClip", ZScoreClip, "z_threshold", 0.0, ValueError),
    ("ZScoreClip", ZScoreClip, "z_threshold", INF, ValueError),
    ("ZScoreClip", ZScoreClip, "z_threshold", "3", TypeError),
    ("ZScoreClip", ZScoreClip, "ema_decay", 1.0, ValueError),
    ("ZScoreClip", ZScoreClip, "ema_decay", -0.1, ValueError),
    ("ZScoreClip", ZScoreClip, "warmup_steps", -1, ValueError),
    ("ZScoreClip", ZScoreClip, "warmup_steps", 2.5, TypeError),
    ("ZScoreClip", ZScoreClip, "warmup_factor", 0.5, ValueError),
    ("PercentileClip", PercentileClip, "percentile", 0.0, ValueError),
    ("PercentileClip", PercentileClip, "percentile", 100.5, ValueError),
    ("PercentileClip", PercentileClip, "percentile", NAN, ValueError),
    ("PercentileClip", PercentileClip, "history_size", 0, ValueError),
    ("PercentileClip", PercentileClip, "history_size", "10", TypeError),
    ("PercentileClip", PercentileClip, "min_history", 0, ValueError),
    ("PercentileClip", PercentileClip, "min_history", 2000, ValueError),  # > history_size
    ("FixedNormClip", FixedNormClip, "max_norm", 0.0, ValueError),
    ("FixedNormClip", FixedNormClip, "max_norm", -1.0, ValueError),
    ("FixedNormClip", FixedNormClip, "max_norm", INF, ValueError),
    ("FixedNormClip", FixedNormClip, "max_norm", "1", TypeError),
    ("AdaptiveGradClip", AdaptiveGradClip, "clipping", 0.0, ValueError),
    ("AdaptiveGradClip", AdaptiveGradClip, "clipping", None, TypeError),
    ("AdaptiveGradClip", AdaptiveGradClip, "eps", -1e-3, ValueError),
    ("AdaptiveGradClip", AdaptiveGradClip, "exclude", "head.*", TypeError),
    ("AdaptiveGradClip", AdaptiveGradClip, "exclude", [1], TypeError),
    ("Fault", lambda **kw: Fault(**{"step": 1, **kw}), "step", -1, ValueError),
    ("Fault", lambda **kw: Fault(**{"step": 1, **kw}), "step", 1.0, TypeError),
    ("Fault", lambda **kw: Fault(**{"step": 1, **kw}), "kind", "zero", ValueError),
    ("Fault", lambda **kw: Fault(**{"step": 1, **kw}), "target", "weights", ValueError),
    ("Fault", lambda **kw: Fault(**{"step": 1, **kw}), "factor", NAN, ValueError),
    ("Fault", lambda **kw: Fault(**{"step": 1, **kw}), "factor", "2", TypeError),
    ("Fault", lambda **kw: Fault(**{"step": 1, **kw}), "params", 3, TypeError),
    ("Fault", lambda **kw: Fault(**{"step": 1, **kw}), "ranks", 0, TypeError),
    ("Fault", lambda **kw: Fault(**{"step": 1, **kw}), "ranks", [-1], ValueError),
    ("Fault", lambda **kw: Fault(**{"step": 1, **kw}), "ranks", ["0"], TypeError),
    ("FaultInjector", FaultInjector, "faults", None, TypeError),
    ("FaultInjector", FaultInjector, "faults", Fault(1), TypeError),
    ("FaultInjector", FaultInjector, "faults", [1], TypeError),
]


@pytest.mark.parametrize(
    ("factory", "arg", "value", "exc"),
    [pytest.param(f, a, v, e, id=f"{name}-{a}={v!r}") for name, f, a, v, e in BAD],
)
def test_bad_constructor_argument(factory: Callable[..., Any], arg: str, value: Any,
                                  exc: type[Exception]) -> None:
    with pytest.raises(exc, match=f"`{arg}`") as info:
        factory(**{arg: value})
    assert repr(value) in str(info.value)


def test_every_public_constructor_argument_is_covered() -> None:
    """The table above names every parameter of every public constructor."""
    import inspect

    covered: dict[str, set[str]] = {}
    for name, _, arg, _, _ in BAD:
        covered.setdefault(name, set()).add(arg)
    for name, cls in [("GradGuard", GradGuard), ("GuardSettings", GuardSettings),
                      ("GradientMonitor", GradientMonitor), ("ZScoreClip", ZScoreClip),
                      ("PercentileClip", PercentileClip), ("FixedNormClip", FixedNormClip),
                      ("AdaptiveGradClip", AdaptiveGradClip), ("Fault", Fault),
                      ("FaultInjector", FaultInjector)]:
        params = set(inspect.signature(cls).parameters) - {"self"}
        assert params == covered[name], name


# ----------------------------------------------------------------------------- degenerate models
class NoParams(TinyModule):
    """No parameters at all; ``configure_optimizers`` returns None (Lightning then runs with
    its mock optimizer, which has no param groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Identity()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = self.batch_for_step(batch)
        return (x.sum() * 0.0).requires_grad_()

    def configure_optimizers(self) -> Any:
        return None


class Frozen(TinyModule):
    """Every parameter has ``requires_grad=False`` (the optimizer still holds them)."""

    def __init__(self) -> None:
        super().__init__()
        for p in self.parameters():
            p.requires_grad_(False)


class EmptyGroups(TinyModule):
    """The optimizer's only param group is empty: nothing is trained, nothing guarded."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([{"params": []}], lr=0.1)


class OneEmptyGroup(TinyModule):
    """An empty group next to a real one (legal; the guard must work as usual)."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([{"params": []}, {"params": list(self.parameters())}], lr=0.05)


def _guard_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "GradGuard" in str(w.message)]


def _fit_recording(module: TinyModule, guard: GradGuard, root: Path,
                   ) -> tuple[list[warnings.WarningMessage], BaseException | None]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            fit(module, 5, [guard], default_root_dir=root)
        except RuntimeError as e:  # only the frozen model gets here (torch's backward)
            return record, e
    return record, None


@pytest.mark.parametrize("cls", [NoParams, EmptyGroups])
def test_nothing_to_guard_does_not_crash(cls: type[TinyModule], tmp_path: Path) -> None:
    guard = GradGuard()
    _, error = _fit_recording(cls(), guard, tmp_path)
    assert error is None
    s = guard.summary()
    assert s["steps"] == 5  # every step seen, each an empty one
    assert (s["nonfinite_steps"], s["skipped_steps"], s["spikes"], s["halted"]) == (0, 0, 0,
                                                                                   False)


def test_frozen_model_fails_in_torch_backward_not_in_the_guard(tmp_path: Path) -> None:
    """Lightning does not refuse a fully frozen model: torch's backward raises (the loss has
    no grad_fn) before any optimizer hook runs. The guard is not involved."""
    guard = GradGuard()
    _, error = _fit_recording(Frozen(), guard, tmp_path)
    assert isinstance(error, RuntimeError)
    assert "does not require grad" in str(error)
    frames = [f.filename for f in _traceback_frames(error)]
    assert not any("lightning_gradguard" in f for f in frames)
    assert guard.summary()["steps"] == 0


def _traceback_frames(e: BaseException) -> list[Any]:
    import traceback

    return list(traceback.extract_tb(e.__traceback__))


def test_one_empty_group_next_to_a_real_one_is_guarded_as_usual(tmp_path: Path) -> None:
    guard = GradGuard()
    module = OneEmptyGroup()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(module, 12, [FaultInjector([Fault(5)]), guard], default_root_dir=tmp_path)
    s = guard.summary()
    assert (s["steps"], s["nonfinite_steps"], s["skipped_steps"]) == (12, 1, 1)
    assert all_finite(module)
    # only the diagnosis of the NaN step; no warning about the (harmless) empty group
    assert len(_guard_warnings(record)) == 1


# The guard says once, at fit start (before a frozen model's backward fails), that it has
# nothing to watch; Lightning's mock optimizer for `configure_optimizers() -> None` has no
# param groups.
@pytest.mark.parametrize("cls", [NoParams, Frozen, EmptyGroups])
def test_nothing_to_guard_warns_once(cls: type[TinyModule], tmp_path: Path) -> None:
    record, _ = _fit_recording(cls(), GradGuard(), tmp_path)
    found = _guard_warnings(record)
    assert len(found) == 1, found
    assert "no trainable parameters" in found[0]
    assert "nothing to guard" in found[0]


class LBFGSModule(TinyModule):
    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)


def test_closure_based_optimizer_is_refused_at_setup() -> None:
    with pytest.raises(ValueError, match=r"optimizer 0 \(LBFGS\).*closure several times"):
        fit(LBFGSModule(), 3, [GradGuard()])
