"""``FaultInjector`` itself: the ``training_step`` wrapper for loss faults is removed after
the fit (also when it raises) so a later fit or a second injector behaves; NaN/Inf land in
non-contiguous tensors; ``Fault``/``FaultInjector`` arguments are validated up front (a
``params`` glob that matches no parameter is refused); a fault that touches nothing -- a
loss fault without a loss, a gradient fault on a frozen parameter -- warns and is not
recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support.modules import TinyModule, TwoNetManual
from support.trainer import fit

from lightning_gradguard.callbacks import GradGuard, GradGuardHalt
from lightning_gradguard.testing import Fault, FaultInjector

pytestmark = pytest.mark.filterwarnings("ignore:GradGuard:UserWarning")


def test_loss_wrapper_is_removed_after_fit_and_a_second_injector_fires(tmp_path: Path) -> None:
    module = TinyModule()
    first = FaultInjector([Fault(1, target="loss"), Fault(7, target="loss")])
    fit(module, 4, [first, GradGuard()], default_root_dir=tmp_path)
    assert first.injected == [(1, "loss", "nan")]
    assert "training_step" not in vars(module)  # the class method again

    second = FaultInjector([Fault(2, target="loss", kind="inf")])
    guard = GradGuard()
    fit(module, 4, [second, guard], default_root_dir=tmp_path)  # global_step restarts at 0
    assert second.injected == [(2, "loss", "inf")]
    assert first.injected == [(1, "loss", "nan")]  # the old injector is out of the loop
    assert guard.summary()["nonfinite_steps"] == 1


def test_loss_wrapper_is_removed_when_the_fit_raises(tmp_path: Path) -> None:
    module = TinyModule()
    faults = FaultInjector([Fault(s, target="loss") for s in range(2, 10)])
    with pytest.raises(GradGuardHalt):
        fit(module, 10, [faults, GradGuard(halt_after=2, on_halt="raise")],
            default_root_dir=tmp_path)
    assert "training_step" not in vars(module)


def test_instance_level_training_step_is_restored(tmp_path: Path) -> None:
    module = TinyModule()
    calls: list[int] = []
    original = module.training_step

    def training_step(batch: Any, batch_idx: int) -> torch.Tensor:
        calls.append(batch_idx)
        return original(batch, batch_idx)

    module.training_step = training_step  # type: ignore[method-assign]
    injector = FaultInjector([Fault(1, target="loss")])
    fit(module, 3, [injector, GradGuard()], default_root_dir=tmp_path)
    assert injector.injected == [(1, "loss", "nan")]
    assert vars(module)["training_step"] is training_step
    assert len(calls) == 3


class Transposed(TinyModule):
    """The first weight is a transposed (non-contiguous) tensor, and so is its gradient."""

    def __init__(self) -> None:
        super().__init__()
        w = self.net[0].weight.detach().t().contiguous().t()  # same values, column-major
        self.net[0].weight = torch.nn.Parameter(w)
        assert not self.net[0].weight.is_contiguous()


@pytest.mark.parametrize("target", ["grad", "param"])
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_injection_into_non_contiguous_tensors(kind: str, target: str,
                                                         tmp_path: Path) -> None:
    guard = GradGuard(halt_after=3)
    module = Transposed()
    injector = FaultInjector([Fault(2, kind=kind, target=target, params="net.0.weight")])
    fit(module, 8, [injector, guard], default_root_dir=tmp_path)
    assert injector.injected == [(2, target, kind)]
    if target == "grad":
        assert guard.summary()["nonfinite_steps"] == 1
    else:  # still there at the end (Inf behind tanh goes unnoticed: see test_fault_matrix)
        assert not bool(torch.isfinite(module.net[0].weight).all())


def test_fault_arguments_are_normalised() -> None:
    f = Fault(3, ranks=[0, 1])  # type: ignore[arg-type]
    assert f.ranks == (0, 1)
    assert hash(f) == hash(Fault(3, ranks=(0, 1)))
    assert FaultInjector((f,)).faults == [f]


def test_fault_for_another_rank_does_not_fire(tmp_path: Path) -> None:
    injector = FaultInjector([Fault(1, ranks=(1,)), Fault(2, target="loss", ranks=(1,)),
                              Fault(3, target="param", ranks=(1,))])
    guard = GradGuard()
    fit(TinyModule(), 5, [injector, guard], default_root_dir=tmp_path)
    assert injector.injected == []
    assert guard.summary()["nonfinite_steps"] == 0


def test_loss_fault_without_a_loss_warns_and_is_not_recorded(tmp_path: Path) -> None:
    # two optimizers: global_step counts both opt.step() calls (0, 2, 4, ...)
    injector = FaultInjector([Fault(2, target="loss")])
    with pytest.warns(UserWarning, match="cannot inject.*manual optimization use target='grad'"):
        fit(TwoNetManual(), 3, [injector], default_root_dir=tmp_path)
    assert injector.injected == []


def test_fault_whose_glob_matches_nothing_is_refused() -> None:
    injector = FaultInjector([Fault(2, kind="nan", params="net.O.*")])  # letter O, not 0
    with pytest.raises(ValueError, match=r"matches no parameter.*net\.0\.weight"):
        fit(TinyModule(), 4, [injector, GradGuard()])
    assert injector.injected == []


def test_fault_touching_no_gradient_is_not_recorded() -> None:
    module = TinyModule()
    module.net[0].weight.requires_grad_(False)
    injector = FaultInjector([Fault(1, kind="nan", params="net.0.weight")])
    with pytest.warns(UserWarning, match="touched no gradient"):
        fit(module, 3, [injector])
    assert injector.injected == []
