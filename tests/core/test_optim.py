"""core/optim.py: one definition of "the LR" (the largest group LR) read by every stage."""

from __future__ import annotations

import pytest
import torch

from lightning_gradguard.core.diagnosis import Diagnostician
from lightning_gradguard.core.optim import group_layout, is_adaptive, learning_rate
from lightning_gradguard.core.structure import is_adaptive as is_adaptive_structure
from lightning_gradguard.core.update_cap import SGDUpdateCap


def _two_groups(first: float, second: float) -> tuple[torch.nn.Module, torch.optim.SGD]:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": first},
                           {"params": net[1].parameters(), "lr": second}], lr=1.0)
    return net, opt


@pytest.mark.parametrize(("first", "second"), [(0.01, 0.1), (0.1, 0.01)])
def test_the_lr_is_the_largest_group_lr_for_the_cap_and_the_diagnosis(first: float,
                                                                      second: float) -> None:
    net, opt = _two_groups(first, second)
    assert learning_rate(opt) == 0.1
    cap = SGDUpdateCap(opt, max_ratio=0.1)
    cap.observe_weight_norm(1.0)
    assert cap.lr(1.0) == 0.1
    assert Diagnostician(net, opt)._lr() == 0.1


def test_learning_rate_unreadable_cases() -> None:
    assert learning_rate(None) is None
    _, opt = _two_groups(0.1, 0.2)
    opt.param_groups[1]["lr"] = torch.tensor(0.5, device="meta")  # stands for an accelerator
    assert learning_rate(opt) is None
    opt.param_groups[1]["lr"] = "fast"
    assert learning_rate(opt) is None
    opt.param_groups[1]["lr"] = torch.tensor(0.5)
    assert learning_rate(opt) == 0.5


def test_is_adaptive_has_one_home() -> None:
    assert is_adaptive_structure is is_adaptive


def test_group_layout() -> None:
    _, opt = _two_groups(0.1, 0.2)
    assert group_layout(opt) == (2, 2)
    assert group_layout(None) == ()
