"""GuardCore's cause diagnosis without Lightning: pre-flight in the first step's one host read,
explosion events diagnosed without extra reads, ranked causes in summary, halt message and
state."""

from __future__ import annotations

import math

import torch
from support.core import batches, loss_fn
from support.modules import make_net
from support.syncs import count_syncs, nonzero
from torch import nn

from lightning_gradguard.core import FixedNormClip, GuardCore
from lightning_gradguard.core._host import host_reads, reset_host_reads


def _too_large_init() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(64, 1))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.5)  # He: 0.18
    return net


def test_preflight_comes_with_the_first_steps_one_host_read() -> None:
    net = _too_large_init()
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)
    guard = GuardCore(net, opt)
    x = torch.randn(32, 64)
    loss = net(x).pow(2).mean()  # the forward probe ends with the root module's forward
    loss.backward()
    reset_host_reads()
    with count_syncs() as conv:
        report = guard.step(loss.detach())
    assert host_reads() == 1
    assert nonzero(conv) == {"tolist": 1}
    assert report.diagnosis_event == "preflight"
    assert report.causes is not None
    assert [c.cause for c in report.causes][:1] == ["init_too_large"]
    assert guard.summary()["diagnosis"][0]["cause"] == "init_too_large"
    assert guard.preflight_done
    # the next steps (this net does explode: spikes, a backoff): one read each, the spike
    # and backoff diagnoses included
    events = []
    for _ in range(4):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        reset_host_reads()
        events.append(guard.step().diagnosis_event)
        assert host_reads() == 1
        opt.step()
    assert "backoff" in events


def test_preflight_false_records_the_evidence_but_reports_nothing() -> None:
    net = _too_large_init()
    guard = GuardCore(net, torch.optim.SGD(net.parameters(), lr=1e-6), preflight=False)
    net(torch.randn(32, 64)).pow(2).mean().backward()
    report = guard.step()
    assert report.causes is None
    assert guard.summary()["diagnosis"] == []
    assert guard.diagnostician is not None
    assert guard.diagnostician.step0 is not None
    assert guard.diagnostician.step0.init_median > 2.0


def test_a_spike_that_clipping_contains_is_not_diagnosed() -> None:
    """Every step spikes over a tiny fixed threshold and is clipped; nothing else happens: the
    run never needed help, so no cause is named (and no extra read is made)."""
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GuardCore(model, opt, clip=FixedNormClip(1e-3), lr_backoff=False)
    events = []
    for batch in batches(4):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        reset_host_reads()
        report = guard.step()
        assert host_reads() == 1
        assert report.spike
        events.append(report.diagnosis_event)
        opt.step()
    assert events == [None, None, None, None]
    assert guard.counters.clipped_steps == 4
    assert guard.summary()["diagnosis"] == []


def test_no_module_or_diagnose_false_means_no_diagnostician() -> None:
    model = make_net(seed=0)
    assert GuardCore(list(model.parameters())).diagnostician is None
    assert GuardCore(model, diagnose=False).diagnostician is None
    assert GuardCore(model, diagnose=False).summary()["diagnosis"] == []


def _nan_batch_run(halt_after: int = 3) -> GuardCore:
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GuardCore(model, opt, halt_after=halt_after)
    for t, (x, y) in enumerate(batches(8)):
        if t >= 4:
            x = x.clone()
            x[0, 0] = math.nan  # corrupt data
        opt.zero_grad()
        loss = loss_fn(model, (x, y))
        loss.backward()
        report = guard.step(loss.detach(), batch=(x, y))
        if report.halt:
            break
        opt.step()
    return guard


def test_halt_message_names_the_ranked_causes_not_the_usual_list() -> None:
    guard = _nan_batch_run()
    assert guard.counters.halted
    msg = guard.halt_message
    assert "one of the usual ones" not in msg
    head, _, causes = msg.partition("\nLikely causes, most likely first:\n")
    assert "first non-finite step: step 5" in head
    assert causes.startswith("  1. data_nonfinite: the batch of this step is not finite")
    assert guard.summary()["diagnosis"][0]["cause"] == "data_nonfinite"


def test_diagnosis_state_round_trip_and_old_states() -> None:
    a = _nan_batch_run(halt_after=0)
    state = a.state_dict()
    model = make_net(seed=0)
    b = GuardCore(model, torch.optim.SGD(model.parameters(), lr=0.01), halt_after=0)
    b.load_state_dict(state)
    assert b.summary() == a.summary()
    assert b.causes == a.causes
    assert b.preflight_done
    # the first NaN is skipped (isolated); the next one within nonfinite_window backs off
    assert b.diagnosed_events == a.diagnosed_events == {"nonfinite", "backoff"}
    assert b.diagnostician is not None
    assert a.diagnostician is not None
    assert b.diagnostician.state_dict() == a.diagnostician.state_dict()
    # a state saved without a diagnostician (diagnose=False) loads: nothing diagnosed yet
    old = dict(state, explainer={k: state["explainer"][k]
                                 for k in ("first_nonfinite_step", "first_diagnosis")})
    c = GuardCore(model, torch.optim.SGD(model.parameters(), lr=0.01), halt_after=0)
    c.load_state_dict(old)
    assert c.summary()["diagnosis"] == []
    assert not c.preflight_done
    assert c.summary()["nonfinite_steps"] == a.summary()["nonfinite_steps"]
