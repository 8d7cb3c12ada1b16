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


# --- exact values of every helper (issue 27) ---

from types import SimpleNamespace  # noqa: E402

from lightning_gradguard.core.optim import named_params  # noqa: E402


def test_learning_rate_groups_without_lr_ints_and_empty() -> None:
    assert learning_rate(SimpleNamespace(param_groups=[])) is None
    assert learning_rate(SimpleNamespace()) is None
    assert learning_rate(SimpleNamespace(param_groups=[{}, {"lr": 2}])) == 2.0
    assert learning_rate(SimpleNamespace(param_groups=[{}])) == 0.0
    assert learning_rate(SimpleNamespace(param_groups=[{"lr": 0.3}, {"lr": 0.2}])) == 0.3
    assert learning_rate(SimpleNamespace(param_groups=[{"lr": -1.0}])) == 0.0
    # an unreadable group anywhere makes the LR unreadable, also after a readable one
    assert learning_rate(SimpleNamespace(param_groups=[{"lr": 0.3}, {"lr": None}])) is None


@pytest.mark.parametrize("key", ["exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum",
                                 "acc_delta", "exp_inf", "exp_avg_sq_row", "exp_avg_sq_col",
                                 "exp_avg_sq_factored", "v", "nu", "hessian", "state2"])
def test_is_adaptive_by_each_second_moment_state(key: str) -> None:
    # the state decides, whatever the hyper-parameters say
    opt = SimpleNamespace(state={"p": {"momentum_buffer": 0}, "q": {key: 0}},
                          param_groups=[{"lr": 0.1}])
    assert is_adaptive(opt)
    sgd = SimpleNamespace(state={"p": {"momentum_buffer": 0}}, param_groups=[{"betas": 0}])
    assert not is_adaptive(sgd)


@pytest.mark.parametrize("key", ["betas", "eps", "beta2", "beta2_decay", "rho",
                                 "initial_accumulator_value"])
def test_is_adaptive_by_each_hyperparameter_before_the_first_step(key: str) -> None:
    assert is_adaptive(SimpleNamespace(state={}, param_groups=[{"lr": 1}, {key: 0}]))
    # a state with no mapping entry says nothing: the hyper-parameters decide
    assert is_adaptive(SimpleNamespace(state={"p": 1}, param_groups=[{key: 0}]))
    assert not is_adaptive(SimpleNamespace(state={"p": 1}, param_groups=[{"lr": 1}]))
    assert not is_adaptive(SimpleNamespace(param_groups=["betas"]))
    assert not is_adaptive(SimpleNamespace(param_groups=None))
    assert not is_adaptive(object())


def test_named_params_of_a_module_an_iterable_and_pairs() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    names, params = named_params(net, None)
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [id(p) for p in params] == [id(p) for p in net.parameters()]
    wrapper = torch.nn.Module()
    wrapper._orig_mod = net  # what torch.compile's wrapper holds
    assert named_params(wrapper, None)[0] == names
    plist = list(net.parameters())
    assert named_params(plist, None)[0] == ["param_0", "param_1", "param_2", "param_3"]
    assert named_params(iter([(1, plist[0])]), None) == (["1"], [plist[0]])
    assert named_params([], None) == ([], [])


def test_named_params_keeps_model_order_and_names_the_optimizers_others() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    extra = torch.nn.Parameter(torch.ones(1))
    w0, b0, w1, _ = net.parameters()
    # groups list the output layer first and hold a parameter the model does not name
    opt = torch.optim.SGD([{"params": [w1, extra]}, {"params": [w0]}], lr=0.1)
    names, params = named_params(net, opt)
    assert names == ["0.weight", "1.weight", "param_1"]
    assert [id(p) for p in params] == [id(w0), id(w1), id(extra)]
    pairs = [("a", w0), ("b", b0)]
    opt2 = torch.optim.SGD([extra, b0], lr=0.1)
    assert named_params(pairs, opt2) == (["b", "param_0"], [b0, extra])


def test_is_adaptive_ignores_a_state_that_is_no_mapping() -> None:
    # an optimizer-like object whose state is a list: not read, the groups decide
    assert not is_adaptive(SimpleNamespace(state=[{"exp_avg_sq": 0}], param_groups=[{}]))
    assert is_adaptive(SimpleNamespace(state=[{"momentum_buffer": 0}],
                                       param_groups=[{"eps": 1e-8}]))
