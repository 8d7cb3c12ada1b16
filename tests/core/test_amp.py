"""``unscale_once_``: unscale a GradScaler's gradients for one optimizer, at most once a step.

Runs the real ``torch.amp.GradScaler`` on CPU: the gradients are checked by value (divided by
the loss scale exactly once), per optimizer, and across steps.
"""

from __future__ import annotations

import torch

from lightning_gradguard.core.amp import unscale_once_


def _setup(init_scale: float = 8.0) -> tuple[torch.nn.Parameter, torch.optim.SGD,
                                             torch.amp.GradScaler]:
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([p], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return p, opt, scaler


def _backward(scaler: torch.amp.GradScaler, p: torch.nn.Parameter) -> None:
    # d/dp of sum(3 * p) = 3; scaled by the loss scale
    scaler.scale((3.0 * p).sum()).backward()


def test_first_call_unscales_and_second_call_does_nothing() -> None:
    p, opt, scaler = _setup()
    _backward(scaler, p)
    assert p.grad is not None
    assert p.grad.tolist() == [24.0, 24.0]  # scaled by 8
    assert unscale_once_(scaler, opt) is True
    assert p.grad.tolist() == [3.0, 3.0]
    assert unscale_once_(scaler, opt) is False
    assert p.grad.tolist() == [3.0, 3.0]  # not divided a second time


def test_gradients_the_scaler_already_unscaled_are_left_alone() -> None:
    p, opt, scaler = _setup()
    _backward(scaler, p)
    scaler.unscale_(opt)
    assert unscale_once_(scaler, opt) is False
    assert p.grad is not None
    assert p.grad.tolist() == [3.0, 3.0]
    # and the scaler can still step (it would raise had unscale_ run twice)
    scaler.step(opt)
    assert p.detach().tolist() == [1.0 - 0.5 * 3.0, 2.0 - 0.5 * 3.0]


def test_each_optimizer_is_unscaled_on_its_own() -> None:
    p1 = torch.nn.Parameter(torch.tensor([1.0]))
    p2 = torch.nn.Parameter(torch.tensor([1.0]))
    opt1 = torch.optim.SGD([p1], lr=0.1)
    opt2 = torch.optim.SGD([p2], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(2.0 * p1.sum() + 5.0 * p2.sum()).backward()
    assert unscale_once_(scaler, opt1) is True
    assert p1.grad is not None
    assert p2.grad is not None
    assert p1.grad.tolist() == [2.0]
    assert p2.grad.tolist() == [20.0]  # opt2's gradients are still scaled
    assert unscale_once_(scaler, opt2) is True
    assert p2.grad.tolist() == [5.0]
    assert unscale_once_(scaler, opt1) is False
    assert unscale_once_(scaler, opt2) is False
    assert p1.grad.tolist() == [2.0]
    assert p2.grad.tolist() == [5.0]


def test_after_step_and_update_the_next_step_is_unscaled_again() -> None:
    p, opt, scaler = _setup(init_scale=2.0)
    _backward(scaler, p)
    assert unscale_once_(scaler, opt) is True
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    _backward(scaler, p)  # scale unchanged: no inf was found
    assert p.grad is not None
    assert p.grad.tolist() == [6.0, 6.0]
    assert unscale_once_(scaler, opt) is True
    assert p.grad.tolist() == [3.0, 3.0]


def test_nonfinite_gradients_are_unscaled_and_the_step_is_skipped() -> None:
    p, opt, scaler = _setup(init_scale=4.0)
    _backward(scaler, p)  # the scaler has its scale from here on
    p.grad = torch.tensor([float("inf"), 8.0])
    assert unscale_once_(scaler, opt) is True
    assert p.grad[1].item() == 2.0
    scaler.step(opt)  # found inf: the scaler skips the step
    scaler.update()
    assert p.detach().tolist() == [1.0, 2.0]
    assert scaler.get_scale() == 2.0
