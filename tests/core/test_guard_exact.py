"""Exact behaviour of :class:`GuardCore` itself: construction, the step's plumbing, ``stop``.

Each test pins a value, a text or a state the guard produces (issue 27: the guard's surviving
mutants); the decision table and the components have their own tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard.core.backoff import LRBackoff
from lightning_gradguard.core.guard import Action, GuardCore, GuardSettings, StepReport
from lightning_gradguard.core.notices import Notice, NoticeKind
from lightning_gradguard.core.policies import AdaptiveGradClip, NoClip
from lightning_gradguard.core.update_cap import NoUpdateControl

NAN = float("nan")


def _fill(params: list[nn.Parameter] | nn.Module, value: float) -> None:
    """Every parameter's gradient set to ``value`` (hand-made, no backward)."""
    ps = params.parameters() if isinstance(params, nn.Module) else params
    for p in ps:
        p.grad = torch.full_like(p, value)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1), nn.Linear(1, 1))


class _Reducer:
    """An identity all-reduce that records the ops it was called with."""

    def __init__(self) -> None:
        self.ops: list[str] = []

    def __call__(self, partial: torch.Tensor, op: str) -> torch.Tensor:
        self.ops.append(op)
        return partial


# ----------------------------------------------------------------------------- follow_optimizer
def test_follow_optimizer_watches_an_added_group_in_model_order() -> None:
    net = _net()
    opt = torch.optim.SGD(net[1].parameters(), lr=0.1)
    guard = GuardCore(net, opt, rollback=True, snapshot_every=1, norm_type=1.0, diagnose=False,
                      clip=NoClip())
    assert guard.follow_optimizer() is False  # nothing changed since the construction
    _fill(net, 1.0)
    guard.step()
    assert guard.snapshot is not None
    assert guard.snapshot.step == 1
    opt.add_param_group({"params": list(net[0].parameters())})
    assert guard.follow_optimizer() is True
    # model order, only the optimizer's parameters (net[2] is not in it)
    assert guard.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert guard.params == [net[0].weight, net[0].bias, net[1].weight, net[1].bias]
    assert guard.meter.params == guard.params
    assert guard.meter.norm_type == 1.0
    # the snapshot (whose optimizer state no longer matches) is dropped, taken again soon
    assert guard.snapshot.step is None
    assert guard.last_good is not None
    assert guard.last_good.due is True
    assert guard.follow_optimizer() is False  # the new layout is remembered
    _fill(net, 1.0)
    assert guard.step().grad_norm == 9.0  # L1 over 6 + 3 gradient elements


def test_follow_optimizer_without_a_module_keeps_the_known_names() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([a], lr=0.1)
    guard = GuardCore([("a", a), ("b", b)], opt, diagnose=False, clip=NoClip())
    assert guard.names == ["a"]
    opt.add_param_group({"params": [b]})
    assert guard.follow_optimizer() is True
    assert guard.names == ["a", "param_1"]
    assert guard.params == [a, b]
    _fill([a, b], 2.0)
    assert guard.step().grad_norm == pytest.approx(math.sqrt(5 * 4.0))


def test_follow_optimizer_builds_the_new_meter_with_the_reducer() -> None:
    net = _net()
    opt = torch.optim.SGD(net[1].parameters(), lr=0.1)
    reducer = _Reducer()
    guard = GuardCore(net, opt, reducer=reducer, diagnose=False, clip=NoClip())
    assert guard.reducer is reducer
    opt.add_param_group({"params": list(net[0].parameters())})
    _fill(net, 1.0)
    guard.step()
    assert guard.meter.reducer is reducer
    assert reducer.ops == ["sum", "sum"]  # the gradients, the weights (the SGD update cap)


# ----------------------------------------------------------------------------- __init__
def test_init_refuses_settings_and_keyword_settings_together() -> None:
    p = nn.Parameter(torch.ones(1))
    with pytest.raises(TypeError) as info:
        GuardCore([p], settings=GuardSettings(), halt_after=3)
    assert str(info.value) == "pass either `settings` or keyword settings, not both"


def test_init_keeps_the_settings_object_it_is_given() -> None:
    s = GuardSettings(halt_after=7)
    guard = GuardCore([nn.Parameter(torch.ones(1))], settings=s)
    assert guard.settings is s


def test_init_hands_the_settings_to_the_components() -> None:
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = GuardCore(net, opt, min_lr_scale=0.25, growth_patience=1, growth_min_rise=0.2)
    assert isinstance(guard.backoff, LRBackoff)
    assert guard.backoff.min_scale == 0.25
    assert guard.growth.patience == 1
    assert guard.growth.min_rise == 0.2
    assert guard.diagnostician is not None
    assert guard.diagnostician.optimizer is opt


def test_init_without_parameters_gets_no_update_cap() -> None:
    opt = torch.optim.SGD([{"params": []}], lr=0.1)
    guard = GuardCore([], opt, max_update_ratio=0.1)
    assert guard.params == []
    assert type(guard.update_control) is NoUpdateControl


def test_init_starts_a_run_with_nothing_reported() -> None:
    guard = GuardCore([nn.Parameter(torch.ones(1))])
    assert guard.last_report is None
    assert guard.stopped is False
    assert guard.resumed is False
    state = guard.state_dict()
    assert state["spike_steps"] == []  # saved as a list, not as the tuple it is
    assert type(state["spike_steps"]) is list


# ----------------------------------------------------------------------------- stop / held steps
def test_stop_holds_every_further_step_with_a_nan_report() -> None:
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = GuardCore(net, opt, nonfinite_window=0, halt_after=2, diagnose=False)
    for _ in range(2):  # two non-finite steps: a backoff at each, the halt at the second
        _fill(net, NAN)
        last = guard.step()
    assert last.halt is True
    assert guard.lr_scale == 0.25
    guard.stop()
    assert guard.stopped is True
    _fill(net, 1.0)
    held = guard.step()
    assert net.weight.grad is None
    assert net.bias.grad is None
    assert held.step == 2  # nothing counted: the last guarded step
    assert math.isnan(held.grad_norm)
    assert math.isnan(held.grad_norm_clipped)
    assert math.isnan(held.threshold)
    assert held.finite is True
    assert held.action is Action.SKIP
    assert held.lr_scale == 0.25
    assert held.halt is True
    assert (held.spike, held.growth, held.backoff, held.rollback) == (False,) * 4
    assert held.params_finite is True
    assert held.diagnosis is None
    assert held.reason is None
    _fill(net, 1.0)
    assert guard.step(step=42).step == 42  # the caller's number
    assert guard.counters.steps == 2
    assert guard.last_report is last


def test_held_step_before_any_halt_reports_no_halt() -> None:
    p = nn.Parameter(torch.ones(2))
    guard = GuardCore([p], diagnose=False)
    guard.stop()
    p.grad = torch.ones(2)
    held = guard.step()
    assert isinstance(held, StepReport)
    assert (held.step, held.halt, held.lr_scale, held.action) == (0, False, 1.0, Action.SKIP)
    assert p.grad is None


def test_load_state_dict_ends_a_stop() -> None:
    p = nn.Parameter(torch.ones(2))
    guard = GuardCore([p], diagnose=False)
    state = guard.state_dict()
    guard.stop()
    guard.load_state_dict(state)
    assert guard.stopped is False
    assert guard.resumed is True
    p.grad = torch.ones(2)
    assert guard.step().grad_norm == pytest.approx(math.sqrt(2.0))


# ----------------------------------------------------------------------------- step numbers
def test_step_reports_the_callers_step_number_and_counts_its_own() -> None:
    p = nn.Parameter(torch.ones(2))
    guard = GuardCore([p], diagnose=False)
    p.grad = torch.ones(2)
    assert guard.step(step=42).step == 42
    p.grad = torch.ones(2)
    assert guard.step().step == 2
    assert guard.counters.steps == 2


def test_nonfinite_window_counts_guarded_steps_not_the_callers_numbers() -> None:
    p = nn.Parameter(torch.ones(2))
    guard = GuardCore([p], nonfinite_window=5, diagnose=False)
    p.grad = torch.full((2,), NAN)
    assert guard.step(step=10).backoff is False
    p.grad = torch.full((2,), NAN)
    assert guard.step(step=20).backoff is True  # guarded steps 1 and 2: within the window
    p.grad = torch.ones(2)
    m, _ = guard.measure(step=30)
    assert guard.state(m).clock == 2


# ----------------------------------------------------------------------------- snapshots
def test_step_snapshots_and_restores_the_extra_optimizers() -> None:
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    q = nn.Parameter(torch.ones(2))
    extra = torch.optim.Adam([q], lr=0.1)
    q.grad = torch.ones(2)
    extra.step()
    guard = GuardCore(net, opt, rollback=True, snapshot_every=1, rollback_after=1,
                      diagnose=False)
    _fill(net, 1.0)
    guard.step(snapshot_extra=[extra])
    saved = extra.state_dict()["state"][0]["exp_avg"].clone()
    q.grad = torch.full((2,), 5.0)
    extra.step()
    assert not torch.equal(extra.state_dict()["state"][0]["exp_avg"], saved)
    _fill(net, NAN)
    report = guard.step(snapshot_extra=[extra])
    assert report.rollback is True
    assert torch.equal(extra.state_dict()["state"][0]["exp_avg"], saved)
    assert guard.counters.rollbacks == 1


def test_rollback_without_an_optimizer_snapshots_the_module_alone() -> None:
    net = nn.Linear(2, 1)
    guard = GuardCore(net, None, rollback=True, snapshot_every=1, diagnose=False)
    _fill(net, 1.0)
    guard.step()
    assert guard.snapshot is not None
    assert guard.snapshot.step == 1


def test_restore_snapshot_without_one_restores_nothing() -> None:
    net = nn.Linear(2, 1)
    assert GuardCore(net, diagnose=False).restore_snapshot() is False
    guard = GuardCore(net, rollback=True, diagnose=False)
    assert guard.restore_snapshot() is False
    assert guard.counters.rollbacks == 0


# ----------------------------------------------------------------------------- end_forward
def test_end_forward_without_a_diagnostician_does_nothing() -> None:
    guard = GuardCore([nn.Parameter(torch.ones(1))], diagnose=True)
    assert guard.diagnostician is None
    guard.end_forward()
    assert guard.preflight_done is False


# ----------------------------------------------------------------------------- growth statistics
@pytest.mark.parametrize(("patience", "fed"), [(0, False), (1, True)])
def test_growth_detector_is_fed_only_with_growth_patience(patience: int, fed: bool) -> None:
    p = nn.Parameter(torch.ones(4))
    guard = GuardCore([p], growth_patience=patience, diagnose=False)
    p.grad = torch.ones(4)
    guard.step()
    assert (guard.growth.prev == 2.0) is fed
    assert math.isnan(guard.growth.prev) is not fed


# ----------------------------------------------------------------------------- the LR
def _backed_off(net: nn.Module, **settings: object) -> tuple[GuardCore, torch.optim.Optimizer]:
    """A guard whose LR was backed off to x0.5, applied by the finite step after it."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = GuardCore(net, opt, nonfinite_window=0, diagnose=False, **settings)
    _fill(net, NAN)
    assert guard.step().backoff is True
    opt.step()  # no gradients: no update, the scheduled LR is back
    _fill(net, 1.0)
    guard.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # until the next opt.step()
    return guard, opt


def test_nonfinite_step_puts_the_scheduled_lr_back() -> None:
    net = nn.Linear(2, 1)
    guard, opt = _backed_off(net)
    _fill(net, NAN)
    guard.step()
    assert opt.param_groups[0]["lr"] == 0.1


def test_amp_overflow_step_puts_the_scheduled_lr_back() -> None:
    net = nn.Linear(2, 1)
    guard, opt = _backed_off(net)
    _fill(net, NAN)
    assert guard.step(amp_overflow=True).action is Action.AMP_SKIP
    assert opt.param_groups[0]["lr"] == 0.1


def test_step_without_gradients_leaves_the_lr_alone() -> None:
    net = nn.Linear(2, 1)
    guard, opt = _backed_off(net)
    net.zero_grad(set_to_none=True)
    assert guard.step().action is Action.NONE
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_nonfinite_weights_step_puts_the_scheduled_lr_back() -> None:
    net = nn.Linear(2, 1)
    # snapshot steps 1 and 3: step 1 was non-finite, so step 3 has no snapshot to restore
    guard, opt = _backed_off(net, rollback=True, snapshot_every=2)
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    _fill(net, 1.0)
    report = guard.step()
    assert (report.params_finite, report.rollback) == (False, False)
    assert opt.param_groups[0]["lr"] == 0.1


# ----------------------------------------------------------------------------- measure
def test_unitwise_clip_leaves_the_excluded_names_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    guard = GuardCore(net, opt, clip=AdaptiveGradClip(clipping=0.01, exclude=["1.*"]),
                      diagnose=False)
    _fill(net, 100.0)
    assert guard.step().action is Action.CLIP
    assert torch.equal(net[1].weight.grad, torch.full((1, 2), 100.0))
    assert torch.equal(net[1].bias.grad, torch.full((1,), 100.0))
    assert bool((net[0].weight.grad < 1.0).all())


def test_weight_norm_schedule_leaves_out_amp_overflow_steps() -> None:
    p = nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    guard = GuardCore([p], opt, max_update_ratio=0.1, diagnose=False)
    p.grad = torch.full((4,), NAN)
    guard.step(amp_overflow=True)  # the GradScaler's step: not one of the schedule
    for t in range(2, 26):
        with torch.no_grad():
            p.fill_(float(t))  # the weights' norm tells the step it was read at: 2 t
        p.grad = torch.ones(4)
        guard.step()
    # finite steps 1..16 read it, then every 8th: the 24th finite step is guarded step 25
    assert guard.update_control.weight_norm == 50.0


# ----------------------------------------------------------------------------- the diagnosis
def _notices(guard: GuardCore) -> list[Notice]:
    said: list[Notice] = []
    guard.speaker.sink = said.append
    return said


def test_nonfinite_weights_at_the_first_step_were_there_at_the_start() -> None:
    net = nn.Linear(2, 1)
    guard = GuardCore(net, torch.optim.SGD(net.parameters(), lr=0.1), diagnose=False)
    said = _notices(guard)
    with torch.no_grad():
        net.weight[0, 0] = NAN
    _fill(net, NAN)
    report = guard.step()
    assert report.diagnosis is not None
    assert (report.diagnosis.weights_finite, report.diagnosis.first_step) == (False, True)
    assert [n.kind for n in said] == [NoticeKind.NONFINITE]
    assert said[0].text.splitlines()[0] == (
        "GradGuard: step 1: the weights were already non-finite (NaN/Inf) when training "
        "started.")


def test_nonfinite_weights_at_the_first_resumed_step_came_from_the_checkpoint() -> None:
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    first = GuardCore(net, opt, diagnose=False)
    for _ in range(2):
        _fill(net, 1.0)
        first.step()
    guard = GuardCore(net, opt, diagnose=False)
    guard.load_state_dict(first.state_dict())
    said = _notices(guard)
    with torch.no_grad():
        net.weight[0, 0] = NAN
    _fill(net, NAN)
    report = guard.step()
    assert report.step == 3
    assert report.diagnosis is not None
    assert (report.diagnosis.weights_finite, report.diagnosis.first_step) == (False, True)
    assert [n.kind for n in said] == [NoticeKind.NONFINITE]
    assert said[0].text.splitlines()[0] == (
        "GradGuard: step 3: the weights loaded from the checkpoint are non-finite (NaN/Inf).")


def test_nonfinite_step_after_growth_is_diagnosed_as_growth() -> None:
    p = nn.Parameter(torch.ones(4))
    guard = GuardCore([p], torch.optim.Adam([p], lr=0.1), growth_patience=2, diagnose=False)
    for v in (1.0, 2.0, 4.0):
        p.grad = torch.full((4,), v)
        guard.step()
    assert guard.counters.growth_events == 1
    p.grad = torch.full((4,), NAN)
    diagnosis = guard.step().diagnosis
    assert diagnosis is not None
    assert diagnosis.finding == "growth"


def test_nonfinite_step_without_growth_before_has_no_finding() -> None:
    p = nn.Parameter(torch.ones(4))
    guard = GuardCore([p], torch.optim.Adam([p], lr=0.1), diagnose=False)
    p.grad = torch.full((4,), NAN)
    diagnosis = guard.step().diagnosis
    assert diagnosis is not None
    assert (diagnosis.finding, diagnosis.nonfinite_params) == ("", ("param_0",))


def test_causes_of_a_nonfinite_step_name_its_nonfinite_gradient() -> None:
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    guard = GuardCore(net, opt)
    x = torch.ones(4, 2)
    for step in range(1, 7):
        loss = net(x).pow(2).mean()
        loss.backward()
        if step == 6:
            net.weight.grad[0, 0] = NAN  # type: ignore[index]
        report = guard.step(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert report.diagnosis_event == "nonfinite"
    assert report.causes is not None
    ids = [c.cause for c in report.causes]
    assert "loss_nonfinite" in ids
    evidence = report.causes[ids.index("loss_nonfinite")].evidence
    assert "but 1 gradient(s) are not (first: weight)" in evidence


def test_backoff_notice_names_the_cause_diagnosed_so_far() -> None:
    net = nn.Linear(2, 1)
    guard = GuardCore(net, torch.optim.SGD(net.parameters(), lr=0.1))
    said = _notices(guard)
    bad = torch.full((2,), NAN)
    _fill(net, NAN)
    assert guard.step(batch=bad).causes is not None
    assert guard.causes[0].cause == "data_nonfinite"
    _fill(net, NAN)
    report = guard.step(batch=bad)  # a repeat within the window: backed off
    assert report.backoff is True
    (notice,) = [n for n in said if n.kind is NoticeKind.BACKOFF]
    assert notice.text.endswith(f"; likely cause: {guard.causes[0].cause}")


def test_halt_step_repeats_no_first_nonfinite_notice() -> None:
    net = nn.Linear(2, 1)
    guard = GuardCore(net, torch.optim.SGD(net.parameters(), lr=0.1), halt_after=2,
                      diagnose=False)
    said = _notices(guard)
    for _ in range(2):
        _fill(net, NAN)
        report = guard.step()
    assert report.halt is True
    assert report.diagnosis is not None  # the halt is diagnosed again ...
    kinds = [(n.step, n.kind) for n in said]
    # ... but only step 1 was the first non-finite one
    assert kinds == [(1, NoticeKind.NONFINITE), (2, NoticeKind.BACKOFF), (2, NoticeKind.HALT)]
    assert said[-1].text.startswith("GradGuard halted training: 2 consecutive non-finite steps")


def test_listeners_get_the_measurement_decision_and_report() -> None:
    p = nn.Parameter(torch.ones(4))
    guard = GuardCore([p], diagnose=False)
    heard: list[tuple[float, str, StepReport]] = []
    guard.listeners.append(lambda m, d, r: heard.append((m.grad_norm, d.path, r)))
    p.grad = torch.ones(4)
    report = guard.step()
    assert heard == [(2.0, "finite", report)]


def test_rollback_puts_the_scheduled_lr_back_into_the_restored_groups() -> None:
    # A backed-off LR still applied when the weights turn non-finite (a loop that skipped
    # ``optimizer.step()``): the rollback replaces the optimizer's group dicts, so the LR must
    # be put back before, or the scale stays on the live groups for good.
    net = nn.Linear(2, 1)
    guard, opt = _backed_off(net, rollback=True, snapshot_every=1)
    assert guard.snapshot is not None
    assert guard.snapshot.step == 2
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    _fill(net, 1.0)
    report = guard.step()
    assert (report.params_finite, report.rollback) == (False, True)
    assert opt.param_groups[0]["lr"] == 0.1
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.1
    _fill(net, 1.0)
    scaled = guard.step()  # the backoff scale applies to the live groups again, once
    assert scaled.lr_scale < 1.0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * scaled.lr_scale)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.1
