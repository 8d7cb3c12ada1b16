"""A misspelt constructor argument names the public class and the closest argument.

``GradientMonitor(log_every=5)`` must say "did you mean", like ``GradGuard``, not
``GradientMonitorLogic.__init__() got an unexpected keyword argument`` (an internal name, no
suggestion). Checked here for the public classes of the callbacks and
``lightning_gradguard.testing`` and for every class in ``lightning_gradguard.__all__`` and
``lightning_gradguard.core.__all__``.
"""

from __future__ import annotations

import enum
import inspect
import re
from typing import Any

import pytest
import torch

import lightning_gradguard
import lightning_gradguard.core
from lightning_gradguard.callbacks import GradGuard, GradientMonitor
from lightning_gradguard.testing import Fault, FaultInjector

#: (class, valid arguments to call it with, misspelt argument, closest valid argument)
OWN = [
    (GradientMonitor, {}, "norm_typ", "norm_type"),
    (GradientMonitor, {}, "layers_depth", "layer_depth"),
    (GradientMonitor, {}, "max_layer", "max_layers"),
    (GradientMonitor, {}, "log_histogram", "log_histograms"),
    (GradGuard, {}, "clip_val", "clip"),
    (Fault, {"step": 1}, "kinds", "kind"),
    (Fault, {}, "stpe", "step"),
    (FaultInjector, {}, "fault", "faults"),
]


@pytest.mark.parametrize(("cls", "valid", "bad", "closest"), OWN,
                         ids=[f"{c.__name__}-{b}" for c, _, b, _ in OWN])
def test_misspelt_argument_names_the_class_and_the_closest(
        cls: type, valid: dict[str, Any], bad: str, closest: str) -> None:
    with pytest.raises(TypeError) as err:
        cls(**valid, **{bad: 1})
    msg = str(err.value)
    assert msg.startswith(f"{cls.__name__} got unexpected keyword argument(s) {bad!r} "
                          f"(did you mean {closest!r}?); its arguments are: "), msg
    assert "Logic" not in msg
    assert "__init__" not in msg


def test_gradient_monitor_log_every_points_to_the_trainer() -> None:
    """The issue's example: no argument is close, and the interval is the Trainer's."""
    with pytest.raises(TypeError, match=re.escape(
            "GradientMonitor got unexpected keyword argument(s) 'log_every' (GradientMonitor "
            "logs at the Trainer's logging interval: Trainer(log_every_n_steps=...)); its "
            "arguments are: norm_type, layer_depth, max_layers, log_histograms")):
        GradientMonitor(log_every=5)  # type: ignore[call-arg]


def test_a_valid_call_is_unchanged() -> None:
    assert GradientMonitor(layer_depth=1).layer_depth == 1
    assert Fault(3, "inf").kind == "inf"
    assert FaultInjector([Fault(2)]).faults == [Fault(2)]
    with pytest.raises(TypeError, match=r"^GradientMonitor: .*positional"):
        GradientMonitor(2.0, 2, 32, False, 1)  # type: ignore[call-arg]


# ------------------------------------------------ every public class of the package
def _public_classes() -> list[tuple[str, type]]:
    out: dict[str, type] = {}
    for mod in (lightning_gradguard, lightning_gradguard.core):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) and not issubclass(obj, enum.Enum):
                out.setdefault(name, obj)
    return sorted(out.items())


def _keyword_params(cls: type) -> list[inspect.Parameter]:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


_CASES = [(name, cls) for name, cls in _public_classes() if _keyword_params(cls)]


#: the value types the guard builds at every step: a wrapper around their constructor would
#: cost ~0.4 µs a construction, seven times a step, on the path whose cost is the product;
#: they are the guard's outputs (and `decide`'s inputs in tests), rarely built by a user, and
#: Python's own message already names the class and the misspelt argument
HOT_PATH = {"Decision", "GradNorms", "GuardState", "HostValues", "Measurement", "StepReport",
            "UpdateLimit"}


def _typo(name: str) -> str:
    return name + name[-1]  # a doubled last letter: 'clip' -> 'clipp'


@pytest.mark.parametrize(("name", "cls"), [pytest.param(name, cls, id=name)
                                           for name, cls in _CASES])
def test_every_public_class(name: str, cls: type) -> None:
    params = _keyword_params(cls)
    args = [torch.nn.Linear(1, 1) if p.name == "model" else None for p in params
            if p.default is p.empty]
    first = params[0].name
    with pytest.raises(TypeError) as err:
        cls(*args, **{_typo(first): 1})
    msg = str(err.value)
    if name in HOT_PATH:  # Python's own message: it names the class and the argument
        assert msg.startswith(f"{name}."), msg
        assert repr(_typo(first)) in msg, msg
        return
    assert msg.startswith(f"{name} got unexpected keyword argument(s) {_typo(first)!r} "
                          f"(did you mean {first!r}?)"), msg


def test_the_public_class_list_is_not_empty() -> None:
    names = {n for n, _ in _CASES}
    assert {"GradGuard", "GradientMonitor", "GuardCore", "GuardSettings", "ZScoreClip"} <= names
