"""The explainer alone (``core/explain.py``): what it hands the diagnostician at each step and
event, the non-finite step's diagnosis, the halt's facts by their exact text, and its state."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard.core.causes import Cause
from lightning_gradguard.core.decide import Action, Decision
from lightning_gradguard.core.diagnosis import Diagnosis, Diagnostician
from lightning_gradguard.core.explain import Explained, Explainer
from lightning_gradguard.core.measure import Gradients, Measurement, Meter
from lightning_gradguard.core.report import GuardCounters
from lightning_gradguard.core.streaks import Streaks

_LR = Cause("lr_too_high", "40 % per step", "lower the LR", 2.0)
_DATA = Cause("data_nonfinite", "NaN in x", "clean the data", 1.0)


class _Recorder(Diagnostician):
    """A real diagnostician whose entry points record their arguments and return set causes."""

    def __init__(self, model: nn.Module, *, preflight: list[Cause] | None = None,
                 diagnosis: list[Cause] | None = None) -> None:
        super().__init__(model)
        self.calls: list[tuple[Any, ...]] = []
        self.preflight_causes = preflight or []
        self.diagnosis_causes = diagnosis or []

    def preflight(self, per_tensor_norms: Any, loss: float | None = None, *,
                  names: Any = None, step: int = 0, weight_norms: Any = None) -> list[Cause]:
        self.calls.append(("preflight", per_tensor_norms, loss, step, weight_norms))
        return list(self.preflight_causes)

    def observe(self, step: int, loss: float | None = None,
                grad_norm: float | None = None) -> None:
        self.calls.append(("observe", step, loss, grad_norm))
        super().observe(step, loss, grad_norm)

    def diagnose(self, event: Any, per_tensor_norms: Any = None, loss: float | None = None,
                 batch: Any = None, *, names: Any = None) -> list[Cause]:
        self.calls.append(("diagnose", event, per_tensor_norms, loss, batch))
        self.causes = [c.to_dict() for c in self.diagnosis_causes]
        return list(self.diagnosis_causes)


def _net() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(2, 1)


def _m(step: int = 1, grad_norm: float = 3.0, loss: float | None = 0.5) -> Measurement:
    return Measurement(step=step, grad_norm=grad_norm, threshold=10.0, clipped_norm=grad_norm,
                       loss=loss)


def _d(path: str = "finite", *, halt: bool = False, backoff: bool = False) -> Decision:
    return Decision(path, Action.NONE, Streaks(), (), 10.0, 3.0,  # type: ignore[arg-type]
                    halt=halt, backoff=backoff)


def _grads(host: dict[str, list[float]] | None = None,
           per_tensor: torch.Tensor | None = None) -> Gradients:
    return Gradients([], None, per_tensor, host=dict(host or {}))


class _Names:
    """The ``names`` callable, counting its calls."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.count = 0

    def __call__(self) -> list[str]:
        self.count += 1
        return list(self.names)


def _done(doc: _Recorder) -> Explainer:
    """An explainer past its first step (the pre-flight evidence read)."""
    ex = Explainer(doc)
    ex.preflight_done = True
    return ex


# ------------------------------------------------------------------ __init__
def test_an_explainer_without_a_diagnostician_starts_empty_and_says_nothing() -> None:
    ex = Explainer(None)
    assert ex.preflight_done is False
    assert ex.diagnosed_events == set()
    assert ex.causes == ()
    assert ex.first_nonfinite_step is None
    assert ex.first_diagnosis is None
    assert ex.requests() == {}
    assert ex.explain(_m(), _d(halt=True), None, None, _Names([]), None,
                      lr_backoffs=0) == (None, None)
    assert ex.state_dict() == {"first_nonfinite_step": None, "first_diagnosis": None}


def test_an_explainer_with_a_diagnostician_starts_before_its_preflight() -> None:
    ex = Explainer(Diagnostician(_net()))
    assert ex.preflight_done is False
    assert ex.diagnosed_events == set()
    assert ex.causes == ()
    state = ex.state_dict()
    assert (state["preflight_done"], state["diagnosed_events"], state["causes"]) == (
        False, [], [])
    ex.preflight_done = True
    ex.reset()
    assert ex.preflight_done is False


def test_the_diagnosed_events_are_saved_as_a_sorted_list_and_load_as_a_set() -> None:
    ex = Explainer(Diagnostician(_net()))
    ex.diagnosed_events = {"nonfinite", "backoff", "halt"}
    ex.causes = (_LR,)
    state = ex.state_dict()
    assert state["diagnosed_events"] == ["backoff", "halt", "nonfinite"]
    assert state["causes"] == [{"cause": "lr_too_high", "evidence": "40 % per step",
                                "remedy": "lower the LR", "score": 2.0}]
    back = Explainer(Diagnostician(_net()))
    back.load_state_dict(state)
    assert back.diagnosed_events == {"backoff", "halt", "nonfinite"}
    assert back.causes == (_LR,)


# ------------------------------------------------------------------ state: the first diagnosis
def test_a_saved_first_diagnosis_loads_with_its_parameters_as_a_tuple() -> None:
    ex = Explainer(None)
    ex.load_state_dict({"first_nonfinite_step": 4, "first_diagnosis": {
        "step": 4, "nonfinite_params": ["a.weight", "b.weight"], "origin": "b.weight",
        "likely_cause": "lr", "weights_finite": True, "first_step": False, "fact": "",
        "finding": ""}})
    assert ex.first_nonfinite_step == 4
    assert ex.first_diagnosis == Diagnosis(4, ("a.weight", "b.weight"), "b.weight", "lr",
                                           weights_finite=True)
    assert ex.first_diagnosis.nonfinite_params == ("a.weight", "b.weight")
    ex.load_state_dict({"first_nonfinite_step": None, "first_diagnosis": None})
    assert ex.first_diagnosis is None


# ------------------------------------------------------------------ Explained
def test_an_explained_attribute_answers_the_explainers_attribute_of_its_name() -> None:
    class Owner:
        causes: Explained[tuple[Cause, ...]] = Explained()
        first_nonfinite_step: Explained[int | None] = Explained()

        def __init__(self) -> None:
            self.explainer = Explainer(None)

    owner = Owner()
    owner.explainer.causes = (_DATA,)
    owner.explainer.first_nonfinite_step = 6
    assert owner.causes == (_DATA,)
    assert owner.first_nonfinite_step == 6
    assert isinstance(Owner.causes, Explained)


# ------------------------------------------------------------------ nonfinite
def _nonfinite(ex: Explainer, net: nn.Module, grads: Gradients | None, *,
               growth_before: bool = False, lr_scale: float = 1.0,
               first_step: bool = False, step: int = 5) -> tuple[Diagnosis, list[float] | None]:
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    return ex.nonfinite(_m(step=step, grad_norm=math.nan), grads, names, params,
                        Meter(params, 2.0), growth_before=growth_before, lr_scale=lr_scale,
                        first_step=first_step)


def _with_grads(net: nn.Module) -> nn.Module:
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    return net


def test_nonfinite_reads_the_norms_and_whether_the_weights_are_finite() -> None:
    net = _with_grads(_net())
    ex = Explainer(None)
    per = torch.tensor([math.nan, 1.0])
    d, norms = _nonfinite(ex, net, _grads(per_tensor=per), first_step=True)
    assert norms is not None
    assert math.isnan(norms[0])
    assert norms[1] == 1.0
    assert (d.step, d.nonfinite_params, d.origin) == (5, ("weight",), "weight")
    assert (d.weights_finite, d.first_step, d.finding) == (True, True, "")
    assert ex.first_nonfinite_step == 5
    assert ex.first_diagnosis == d


def test_nonfinite_tells_non_finite_weights_apart() -> None:
    net = _with_grads(_net())
    with torch.no_grad():
        net.bias.fill_(math.inf)
    d, norms = _nonfinite(Explainer(None), net, _grads(per_tensor=torch.tensor([2.0, 1.0])))
    assert norms == [2.0, 1.0]
    assert (d.weights_finite, d.first_step) == (False, False)
    assert (d.nonfinite_params, d.finding) == ((), "norm_overflow")


def test_nonfinite_without_gradients_in_hand_reads_nothing() -> None:
    net = _with_grads(_net())
    d, norms = _nonfinite(Explainer(None), net, None, first_step=True)
    assert norms is None
    assert (d.weights_finite, d.first_step, d.nonfinite_params) == (None, False, ())
    d, norms = _nonfinite(Explainer(None), net, _grads(), first_step=True)
    assert norms is None
    assert (d.weights_finite, d.first_step) == (None, False)


def test_nonfinite_without_weights_still_reads_the_per_tensor_norms() -> None:
    ex = Explainer(None)
    p = nn.Parameter(torch.zeros(0))
    p.grad = torch.zeros(0)
    d, norms = ex.nonfinite(_m(step=2, grad_norm=math.nan), _grads(per_tensor=torch.tensor(
        [math.inf])), ["empty"], [p], Meter([p], 2.0), growth_before=False, lr_scale=1.0,
        first_step=True)
    assert norms == [math.inf]
    assert (d.nonfinite_params, d.weights_finite, d.first_step) == (("empty",), None, False)
    d, norms = ex.nonfinite(_m(step=3, grad_norm=math.nan), None, [], [], Meter([], 2.0),
                            growth_before=False, lr_scale=1.0, first_step=False)
    assert norms is None
    assert d.nonfinite_params == ()


def test_nonfinite_names_only_the_parameters_with_a_gradient() -> None:
    net = _net()
    net.bias.grad = torch.zeros(1)
    d, _ = _nonfinite(Explainer(None), net, _grads(per_tensor=torch.tensor([math.nan])))
    assert (d.nonfinite_params, d.origin) == (("bias",), "bias")


def test_nonfinite_refuses_names_that_do_not_match_the_parameters() -> None:
    net = _with_grads(_net())
    params = list(net.parameters())
    with pytest.raises(ValueError, match="zip"):
        Explainer(None).nonfinite(_m(grad_norm=math.nan), None, ["weight"], params,
                                  Meter(params, 2.0), growth_before=False, lr_scale=1.0,
                                  first_step=False)


def test_nonfinite_passes_the_growth_before_and_the_lr_scale_on() -> None:
    net = _with_grads(_net())
    per = torch.tensor([math.nan, 1.0])
    d, _ = _nonfinite(Explainer(None), net, _grads(per_tensor=per), growth_before=True,
                      lr_scale=0.25)
    assert d.finding == "growth"
    assert d.likely_cause.startswith("the gradient norm was growing step over step before")
    assert d.likely_cause.endswith(" (the guard had already reduced the LR to 0.25x)")


def test_only_the_first_nonfinite_step_is_kept() -> None:
    net = _with_grads(_net())
    ex = Explainer(None)
    first, _ = _nonfinite(ex, net, _grads(per_tensor=torch.tensor([math.nan, 1.0])), step=3)
    later, _ = _nonfinite(ex, net, _grads(per_tensor=torch.tensor([1.0, math.nan])), step=4)
    assert later.origin == "bias"
    assert (ex.first_nonfinite_step, ex.first_diagnosis) == (3, first)


# ------------------------------------------------------------------ explain: the first step
def test_the_first_step_hands_the_preflight_its_norms_loss_step_and_weights() -> None:
    doc = _Recorder(_net(), preflight=[_LR])
    ex = Explainer(doc)
    assert list(ex.requests()) == ["per_tensor", "weight_norms"]
    assert ex._weight_names == [("weight", 2), ("bias", 1)]
    host = {"per_tensor": [0.5, 0.25], "weight_norms": [3.0, 0.125]}
    named = _Names(["weight", "bias"])
    out = ex.explain(_m(step=1, grad_norm=0.75, loss=0.5), _d(), _grads(host), None, named,
                     "batch", lr_backoffs=0)
    assert out == ((_LR,), "preflight")
    assert doc.calls == [
        ("preflight", {"weight": 0.5, "bias": 0.25}, 0.5, 1,
         {"weight": (3.0, 2), "bias": (0.125, 1)}),
        ("observe", 1, 0.5, 0.75)]
    assert ex.causes == (_LR,)
    assert doc.causes == [_LR.to_dict()]
    assert ex.preflight_done is True
    assert ex.diagnosed_events == set()
    assert named.count == 1


def test_the_first_step_without_weight_norms_hands_the_preflight_none() -> None:
    doc = _Recorder(_net())
    ex = Explainer(doc)
    ex.requests()  # the weights' names are known, their norms were not read
    out = ex.explain(_m(), _d(), _grads({"per_tensor": [0.5, 0.25]}), None,
                     _Names(["weight", "bias"]), None, lr_backoffs=0)
    assert out == (None, None)
    assert doc.calls[0] == ("preflight", {"weight": 0.5, "bias": 0.25}, 0.5, 1, None)
    assert ex.causes == ()
    assert ex.preflight_done is True


def test_the_first_step_without_requests_pairs_no_weight_norms() -> None:
    doc = _Recorder(_net())
    ex = Explainer(doc)
    ex.explain(_m(), _d(), _grads({"per_tensor": [0.5, 0.25], "weight_norms": [3.0, 1.0]}),
               None, _Names(["weight", "bias"]), None, lr_backoffs=0)
    assert doc.calls[0] == ("preflight", {"weight": 0.5, "bias": 0.25}, 0.5, 1, None)


def test_a_first_step_without_per_tensor_norms_asks_no_names_and_no_preflight() -> None:
    doc = _Recorder(_net())
    ex = Explainer(doc)
    named = _Names(["weight", "bias"])
    assert ex.explain(_m(), _d(), None, None, named, None, lr_backoffs=0) == (None, None)
    assert named.count == 0
    assert doc.calls == [("observe", 1, 0.5, 3.0)]
    assert ex.preflight_done is True
    doc = _Recorder(_net())
    ex = Explainer(doc)
    assert ex.explain(_m(), _d(), _grads({"weight_norms": [1.0]}), None, named, None,
                      lr_backoffs=0) == (None, None)
    assert named.count == 0
    assert doc.calls == [("observe", 1, 0.5, 3.0)]


def test_a_first_step_whose_norms_do_not_match_the_names_has_no_preflight() -> None:
    doc = _Recorder(_net())
    ex = Explainer(doc)
    out = ex.explain(_m(), _d(), _grads({"per_tensor": [0.5]}), None,
                     _Names(["weight", "bias"]), None, lr_backoffs=0)
    assert out == (None, None)
    assert doc.calls == [("observe", 1, 0.5, 3.0)]


def test_a_non_finite_first_step_has_no_preflight() -> None:
    doc = _Recorder(_net(), diagnosis=[_DATA])
    ex = Explainer(doc)
    m = _m(grad_norm=math.inf)
    out = ex.explain(m, _d("nonfinite"), _grads({"per_tensor": [math.inf, 1.0]}),
                     [math.inf, 1.0], _Names(["weight", "bias"]), "batch", lr_backoffs=0)
    assert out == ((_DATA,), "nonfinite")
    assert [c[0] for c in doc.calls] == ["observe", "diagnose"]
    assert doc.calls[1] == ("diagnose", "nonfinite", {"weight": math.inf, "bias": 1.0}, 0.5,
                            "batch")


def test_a_first_step_with_no_gradient_is_not_explained() -> None:
    doc = _Recorder(_net())
    ex = Explainer(doc)
    m = Measurement(step=1, grad_norm=0.0, threshold=1.0, clipped_norm=0.0, empty=True)
    assert ex.explain(m, _d("empty", halt=True), None, None, _Names([]), None,
                      lr_backoffs=0) == (None, None)
    assert doc.calls == []
    assert ex.preflight_done is False


# ------------------------------------------------------------------ explain: the history
def test_a_step_the_preflight_already_recorded_is_not_observed_again() -> None:
    doc = Diagnostician(_net())
    ex = Explainer(doc)
    ex.explain(_m(step=1, grad_norm=0.75, loss=0.5), _d(),
               _grads({"per_tensor": [0.5, 0.25]}), None, _Names(["weight", "bias"]), None,
               lr_backoffs=0)
    assert (doc.last_step, doc.losses, doc.grad_norms) == (1, [0.5], [math.hypot(0.5, 0.25)])


def test_every_later_step_is_observed_with_its_loss_and_norm() -> None:
    doc = Diagnostician(_net())
    ex = Explainer(doc)
    ex.preflight_done = True
    for step, loss, norm in ((1, 0.5, 2.0), (2, 0.25, 4.0)):
        assert ex.explain(_m(step=step, grad_norm=norm, loss=loss), _d(), None, None,
                          _Names([]), None, lr_backoffs=0) == (None, None)
    ex.explain(_m(step=2, grad_norm=8.0, loss=1.0), _d(), None, None, _Names([]), None,
               lr_backoffs=0)  # the same step again: not recorded twice
    assert (doc.last_step, doc.losses, doc.grad_norms) == (2, [0.5, 0.25], [2.0, 4.0])


# ------------------------------------------------------------------ explain: the events
def test_a_halt_is_diagnosed_with_this_steps_norms_loss_and_batch() -> None:
    doc = _Recorder(_net(), diagnosis=[_LR, _DATA])
    ex = _done(doc)
    named = _Names(["weight", "bias"])
    out = ex.explain(_m(step=7, loss=2.5), _d(halt=True), None, [4.0, 1.0], named, "batch",
                     lr_backoffs=2)
    assert out == ((_LR, _DATA), "halt")
    assert doc.calls == [("observe", 7, 2.5, 3.0),
                         ("diagnose", "halt", {"weight": 4.0, "bias": 1.0}, 2.5, "batch")]
    assert ex.causes == (_LR, _DATA)
    assert ex.diagnosed_events == {"halt"}
    assert named.count == 1


def test_an_event_without_norms_asks_no_names() -> None:
    doc = _Recorder(_net(), diagnosis=[_LR])
    ex = _done(doc)
    named = _Names(["weight", "bias"])
    assert ex.explain(_m(), _d(halt=True), None, None, named, "batch",
                      lr_backoffs=0) == ((_LR,), "halt")
    assert named.count == 0
    assert doc.calls[-1] == ("diagnose", "halt", None, 0.5, "batch")


def test_norms_that_do_not_match_the_names_are_not_handed_on() -> None:
    doc = _Recorder(_net(), diagnosis=[_LR])
    ex = _done(doc)
    ex.explain(_m(), _d(halt=True), None, [4.0], _Names(["weight", "bias"]), "batch",
               lr_backoffs=0)
    assert doc.calls[-1] == ("diagnose", "halt", None, 0.5, "batch")


def test_the_first_nonfinite_step_is_diagnosed_once() -> None:
    doc = _Recorder(_net(), diagnosis=[_DATA])
    ex = _done(doc)
    m = _m(step=3, grad_norm=math.nan)
    assert ex.explain(m, _d("nonfinite"), None, None, _Names([]), "batch",
                      lr_backoffs=0) == ((_DATA,), "nonfinite")
    assert doc.calls[-1] == ("diagnose", "nonfinite", None, 0.5, "batch")
    assert ex.diagnosed_events == {"nonfinite"}
    assert ex.explain(_m(step=4, grad_norm=math.nan), _d("nonfinite"), None, None,
                      _Names([]), "batch", lr_backoffs=0) == (None, None)
    assert [c[0] for c in doc.calls].count("diagnose") == 1


def test_the_first_backoff_is_diagnosed_once_without_the_batch() -> None:
    doc = _Recorder(_net(), diagnosis=[_LR])
    ex = _done(doc)
    assert ex.explain(_m(step=2), _d(backoff=True), None, [1.0, 2.0],
                      _Names(["weight", "bias"]), "batch",
                      lr_backoffs=0) == ((_LR,), "backoff")
    assert doc.calls[-1] == ("diagnose", "backoff", {"weight": 1.0, "bias": 2.0}, 0.5, None)
    assert ex.diagnosed_events == {"backoff"}
    assert ex.explain(_m(step=3), _d(backoff=True), None, None, _Names([]), "batch",
                      lr_backoffs=0) == (None, None)
    assert [c[0] for c in doc.calls].count("diagnose") == 1


def test_a_backoff_after_an_earlier_one_is_not_diagnosed() -> None:
    doc = _Recorder(_net(), diagnosis=[_LR])
    ex = _done(doc)
    assert ex.explain(_m(step=2), _d(backoff=True), None, None, _Names([]), "batch",
                      lr_backoffs=1) == (None, None)
    assert ex.diagnosed_events == set()


def test_a_spike_alone_is_not_diagnosed() -> None:
    doc = _Recorder(_net(), diagnosis=[_LR])
    ex = _done(doc)
    assert ex.explain(_m(step=2), _d(), None, [1.0, 2.0], _Names(["weight", "bias"]),
                      "batch", lr_backoffs=0) == (None, None)
    assert [c[0] for c in doc.calls] == ["observe"]


def test_a_preflight_finding_is_not_diagnosed_again() -> None:
    doc = _Recorder(_net(), preflight=[_LR], diagnosis=[_DATA])
    ex = Explainer(doc)
    out = ex.explain(_m(), _d(), _grads({"per_tensor": [0.5, 0.25]}), [0.5, 0.25],
                     _Names(["weight", "bias"]), "batch", lr_backoffs=0)
    assert out == ((_LR,), "preflight")
    assert [c[0] for c in doc.calls] == ["preflight", "observe"]
    assert ex.diagnosed_events == set()


def test_a_later_event_without_evidence_keeps_the_earlier_finding() -> None:
    doc = _Recorder(_net(), diagnosis=[_LR])
    ex = _done(doc)
    ex.explain(_m(step=2), _d(backoff=True), None, None, _Names([]), None, lr_backoffs=0)
    doc.diagnosis_causes = []
    out = ex.explain(_m(step=3), _d(halt=True), None, None, _Names([]), None, lr_backoffs=1)
    assert out == ((), "halt")
    assert doc.causes == [_LR.to_dict()]
    assert ex.causes == (_LR,)


def test_a_later_event_with_evidence_replaces_the_earlier_finding() -> None:
    doc = _Recorder(_net(), diagnosis=[_LR])
    ex = _done(doc)
    ex.explain(_m(step=2), _d(backoff=True), None, None, _Names([]), None, lr_backoffs=0)
    doc.diagnosis_causes = [_DATA]
    out = ex.explain(_m(step=3), _d(halt=True), None, None, _Names([]), None, lr_backoffs=1)
    assert out == ((_DATA,), "halt")
    assert doc.causes == [_DATA.to_dict()]
    assert ex.causes == (_DATA,)


def test_an_event_with_no_finding_and_none_before_reports_no_causes() -> None:
    doc = _Recorder(_net())
    ex = _done(doc)
    assert ex.explain(_m(), _d(halt=True), None, None, _Names([]), None,
                      lr_backoffs=0) == ((), "halt")
    assert doc.causes == []
    assert ex.causes == ()


# ------------------------------------------------------------------ halt_facts
_DIAG = Diagnosis(3, ("l1.weight",), "l1.weight", "the generic causes",
                  fact="the loss itself is non-finite (nan)")


def _facts(ex: Explainer, streaks: Streaks, *, nonfinite_steps: int, halted: bool = True,
           amp_halt_after: int = 5, last: Diagnosis | None = None) -> str:
    counters = GuardCounters(nonfinite_steps=nonfinite_steps, halted=halted)
    return ex.halt_facts(counters, streaks, end=9, lr_scale=0.125,
                         amp_halt_after=amp_halt_after, last_diagnosis=last)


_AMP = ("5 consecutive steps with finite loss and non-finite gradients under the GradScaler "
        "(steps 5..9); it skipped each one and halved its loss scale each time, so these are "
        "not fp16 overflows but gradients that are non-finite at any scale (sqrt or log at 0, "
        "division by zero in the backward, NaN reaching only the backward)")
_DATA_LIKELY = ("non-finite at every step since the first one while the skipped steps left "
                "the weights untouched: the data or the loss function (log(0), division by "
                "zero, corrupt batches) is the likely cause, unless the weights had already "
                "diverged")


def test_no_halt_has_no_facts() -> None:
    assert _facts(Explainer(None), Streaks(nonfinite=3, nonfinite_start=7),
                  nonfinite_steps=3, halted=False) == ""


def test_a_gradscaler_halt_names_its_streak_and_the_last_step() -> None:
    ex = Explainer(None)
    streaks = Streaks(amp=5, amp_start=5)
    assert _facts(ex, streaks, nonfinite_steps=0) == _AMP
    assert _facts(ex, streaks, nonfinite_steps=0, last=_DIAG) == (
        _AMP + "; last step: step 3: non-finite gradients in 1 parameter(s): l1.weight; most "
        "likely origin: l1.weight (closest to the output). Likely cause: the generic causes")
    ex.causes = (_LR,)  # ranked causes follow: the step states only its own fact
    assert _facts(ex, streaks, nonfinite_steps=0, last=_DIAG).endswith(
        "; last step: step 3: non-finite gradients in 1 parameter(s): l1.weight; most likely "
        "origin: l1.weight (closest to the output). Likely cause: the loss itself is "
        "non-finite (nan)")


def test_a_gradscaler_streak_short_of_its_limit_halts_on_the_nonfinite_streak() -> None:
    streaks = Streaks(nonfinite=2, nonfinite_start=8, amp=4, amp_start=5)
    assert _facts(Explainer(None), streaks, nonfinite_steps=5) == (
        "2 consecutive non-finite steps (steps 8..9); LR scale already reduced to 0.125")


def test_a_streak_of_every_nonfinite_step_points_at_the_data() -> None:
    ex = Explainer(None)
    ex.first_nonfinite_step = 2  # not the streak's start: the counts alone tell
    ex.first_diagnosis = _DIAG
    assert _facts(ex, Streaks(nonfinite=3, nonfinite_start=7), nonfinite_steps=3) == (
        "3 consecutive non-finite steps (steps 7..9); LR scale already reduced to 0.125; "
        + _DATA_LIKELY + "; first non-finite step: step 3: non-finite gradients in 1 "
        "parameter(s): l1.weight; most likely origin: l1.weight (closest to the output). "
        "Likely cause: the generic causes")


def test_a_streak_from_the_first_nonfinite_step_points_at_the_data() -> None:
    ex = Explainer(None)
    ex.first_nonfinite_step = 7  # a resumed run: the counts were not saved with it
    assert _facts(ex, Streaks(nonfinite=3, nonfinite_start=7), nonfinite_steps=4) == (
        "3 consecutive non-finite steps (steps 7..9); LR scale already reduced to 0.125; "
        + _DATA_LIKELY)


def test_a_streak_after_earlier_nonfinite_steps_does_not_blame_the_data() -> None:
    ex = Explainer(None)
    ex.first_nonfinite_step = 2
    assert _facts(ex, Streaks(nonfinite=3, nonfinite_start=7), nonfinite_steps=4) == (
        "3 consecutive non-finite steps (steps 7..9); LR scale already reduced to 0.125")
