"""``LastGood``: the snapshot schedule, its ``due`` flag, the weights' norm request, restore."""

from __future__ import annotations

import torch

from lightning_gradguard.core.measure import Meter
from lightning_gradguard.core.rollback import LastGood


def _net_and_opt() -> tuple[torch.nn.Linear, torch.optim.SGD]:
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    return net, torch.optim.SGD(net.parameters(), lr=0.1)


def test_due_starts_false_is_set_by_clear_and_cleared_by_capture() -> None:
    net, opt = _net_and_opt()
    last = LastGood(net, every=3)
    assert last.due is False
    assert [last.wanted(c) for c in (1, 2, 3, 4)] == [True, False, False, True]
    last.capture([opt], step=1)
    assert last.snapshot.available
    last.clear()
    assert last.due is True
    assert not last.snapshot.available
    assert [last.wanted(c) for c in (2, 3)] == [True, True]  # due: at the next step
    last.capture([opt], step=2)
    assert last.due is False
    assert last.snapshot.available
    assert [last.wanted(c) for c in (2, 3, 4)] == [False, False, True]


def test_capture_without_a_module_takes_nothing_and_keeps_due() -> None:
    _, opt = _net_and_opt()
    last = LastGood(None, every=1)
    last.clear()
    last.capture([opt], step=1)
    assert last.due is True
    assert not last.snapshot.available
    assert last.wanted(1) is False


def test_restore_without_a_snapshot_is_false_and_changes_nothing() -> None:
    net, opt = _net_and_opt()
    last = LastGood(net, every=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert last.restore([opt]) is False
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_restore_without_a_module_is_false_even_with_a_snapshot() -> None:
    net, opt = _net_and_opt()
    last = LastGood(None, every=1)
    last.snapshot.capture(net, [opt], 1)  # a snapshot the module-less schedule never takes
    assert last.snapshot.available
    assert last.restore([opt]) is False


def test_restore_puts_the_captured_weights_back() -> None:
    net, opt = _net_and_opt()
    last = LastGood(net, every=1)
    last.capture([opt], step=1)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert last.restore([opt]) is True
    for k, v in net.state_dict().items():
        assert torch.equal(v, saved[k])


def test_request_measures_the_weights_on_the_device_asked_for() -> None:
    net, _ = _net_and_opt()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 0.0]]))
        net.bias.fill_(4.0)
    meter = Meter(list(net.parameters()), 2.0)
    fn = LastGood(net, every=1).request(meter)
    cpu = fn(None, torch.device("cpu"))  # type: ignore[arg-type]
    assert cpu.item() == 5.0
    # a module without weights: the norm (zero) comes on the device asked for
    empty = LastGood(torch.nn.Sequential(), every=1).request(meter)
    meta = empty(None, torch.device("meta"))  # type: ignore[arg-type]
    assert meta.device.type == "meta"
    assert empty(None, torch.device("cpu")).item() == 0.0  # type: ignore[arg-type]
