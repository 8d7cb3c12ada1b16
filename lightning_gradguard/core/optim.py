"""What the guard knows about an optimizer: one module, read by every stage that needs it.

* :func:`is_adaptive`: whether it scales each coordinate's step by its own gradient history
  (recognised by what it keeps, never by its class name);
* :func:`learning_rate`: "the LR" of an optimizer with several param groups: the **largest**
  group LR. The largest step any parameter can take is set by it, so an update cap or a "the
  LR is too high" verdict measured with it holds for every group, whatever order the groups
  were listed in (group 0 is an accident of that order);
* :func:`group_layout` / :func:`named_params`: which parameters it updates, in which order.

The optimizer-specific update control chosen from it lives in
:mod:`~lightning_gradguard.core.update_cap`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["group_layout", "is_adaptive", "learning_rate", "named_params"]

#: optimizer state that holds a per-coordinate second moment (or its running sum)
_SECOND_MOMENT_STATE = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta",
                        "exp_inf", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq_factored",
                        "v", "nu", "hessian", "state2")
#: hyper-parameters that only optimizers dividing by a gradient statistic take
_ADAPTIVE_HPARAMS = ("betas", "eps", "beta2", "beta2_decay", "rho", "initial_accumulator_value")


def is_adaptive(optimizer: Any) -> bool:
    """Whether ``optimizer`` scales each coordinate's step by its own gradient history.

    Recognised by what it keeps, not by its class name: after its first step, by a
    second-moment entry in its state (Adam's ``exp_avg_sq``, RMSprop's ``square_avg``,
    Adagrad's ``sum``, Adadelta's ``acc_delta``, Adamax's ``exp_inf``, Adafactor's factored
    rows and columns ...); before it, by the hyper-parameters only such optimizers take
    (``betas``, ``eps``, ``rho`` ...; plain SGD has none of them). A subclass of Adam, or an
    ``AdamW8bit``, is adaptive; SGD with momentum is not.

    Example:
        >>> p = [torch.nn.Parameter(torch.ones(1))]
        >>> is_adaptive(torch.optim.Adam(p)), is_adaptive(torch.optim.SGD(p, lr=0.1))
        (True, False)
        >>> class Mine(torch.optim.AdamW): ...
        >>> is_adaptive(Mine(p))
        True
    """
    state = getattr(optimizer, "state", None)
    if isinstance(state, Mapping) and state:
        entries = [v for v in state.values() if isinstance(v, Mapping)]
        if entries:
            return any(k in e for e in entries for k in _SECOND_MOMENT_STATE)
    groups = getattr(optimizer, "param_groups", None) or []
    return any(k in g for g in groups if isinstance(g, Mapping) for k in _ADAPTIVE_HPARAMS)


def learning_rate(optimizer: Any) -> float | None:
    """The optimizer's LR: the largest group LR (a group without ``"lr"`` counts as 0).

    ``None`` when it cannot be read for free: no optimizer, no param groups, an LR that is not
    a number, or a tensor LR on an accelerator (reading it would add a host synchronisation).

    Example:
        >>> w1, w2 = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
        >>> learning_rate(torch.optim.SGD([{"params": [w1], "lr": 0.01},
        ...                                {"params": [w2], "lr": 0.1}], lr=1.0))
        0.1
        >>> learning_rate(None) is None
        True
    """
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    lr = 0.0
    for g in groups:
        glr = g.get("lr", 0.0)
        if isinstance(glr, Tensor):
            if glr.device.type != "cpu":
                return None
        elif not isinstance(glr, (int, float)):
            return None
        lr = max(lr, float(glr))
    return lr


def group_layout(optimizer: Optimizer | None) -> tuple[int, ...]:
    """The sizes of the optimizer's param groups (a change means new parameters to watch)."""
    if optimizer is None:
        return ()
    return tuple([len(g["params"]) for g in optimizer.param_groups])


def named_params(
    model: torch.nn.Module | Iterable[Any], optimizer: Optimizer | None
) -> tuple[list[str], list[torch.nn.Parameter]]:
    """The watched parameters and their names: those the optimizer updates, in model order.

    Args:
        model: A module, or an iterable of parameters / ``(name, parameter)`` pairs.
        optimizer: When given, only its parameters are kept (model order, output layer last;
            the ones the model does not name follow as ``param_<i>``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> named_params(net, torch.optim.SGD(net[1].parameters(), lr=0.1))[0]
        ['1.weight', '1.bias']
    """
    if isinstance(model, torch.nn.Module):
        # torch.compile wraps modules as ``_orig_mod``: report the user's names
        named = [(n.replace("_orig_mod.", ""), p) for n, p in model.named_parameters()]
    else:
        items = list(model)
        if items and isinstance(items[0], tuple):
            named = [(str(n), p) for n, p in items]
        else:
            named = [(f"param_{i}", p) for i, p in enumerate(items)]
    if optimizer is not None:
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        ordered = [p for g in optimizer.param_groups for p in g["params"]]
        # keep model order (output layer last) for the parameters the optimizer updates
        named = [(n, p) for n, p in named if id(p) in in_opt]
        known = {id(p) for _, p in named}
        # the optimizer's parameters the model does not name (a named one is already known)
        named += [(f"param_{i}", p) for i, p in enumerate(ordered) if id(p) not in known]
    return [n for n, _ in named], [p for _, p in named]
