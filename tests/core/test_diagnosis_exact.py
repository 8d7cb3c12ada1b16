"""Exact values, texts and state of ``core.diagnosis`` (issue 27: tests that can fail)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard.core._host import host_reads, reset_host_reads
from lightning_gradguard.core.diagnosis import (
    Diagnosis,
    DiagnosisThresholds,
    Diagnostician,
    diagnose,
)

NAN = float("nan")
USUAL = (
    "one of the usual ones: a learning rate that is too high; initialisation that is too large "
    "for the depth (use Xavier/He init); a deep plain network without normalisation or skip "
    "connections; an activation with large derivatives; a loss with log(0) or division by "
    "zero; corrupt data (NaN/Inf in the batch)"
)


class NormBlock(nn.Module):
    """``x + lin(norm(x))``: one skip connection and one normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(self.norm(x))


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), NormBlock(), NormBlock(), nn.Linear(4, 1))


def _probed(net: nn.Module) -> Diagnostician:
    doc = Diagnostician(net)
    doc.watch_forward()
    net(torch.randn(3, 4))
    doc.finish_probe()
    return doc


def _linear(lr: float = 0.1) -> Diagnostician:
    """A ``Linear(2, 2)`` (seed 0) under SGD at ``lr``."""
    torch.manual_seed(0)
    lin = nn.Linear(2, 2)
    return Diagnostician(lin, torch.optim.SGD(lin.parameters(), lr=lr))


# ---------------------------------------------------------------- diagnose (function)
def test_diagnose_growth_cause_text_is_exact() -> None:
    d = diagnose(4, ["a", "b"], [NAN, 1.0], loss=0.5, growth_before=True)
    assert d.likely_cause == (
        "the gradient norm was growing step over step before this (an explosion): "
        "the learning rate is most likely too high; " + USUAL)


def test_diagnose_lr_scale_note_is_appended_to_the_cause() -> None:
    d = diagnose(4, ["a", "b"], [NAN, 1.0], lr_scale=0.25)
    assert d.likely_cause == USUAL + " (the guard had already reduced the LR to 0.25x)"
    assert diagnose(4, ["a", "b"], [NAN, 1.0]).likely_cause == USUAL


def test_diagnose_ignores_names_beyond_the_norms() -> None:
    d = diagnose(2, ["a", "b", "c"], [NAN, 1.0])
    assert (d.nonfinite_params, d.origin) == (("a",), "a")


# ---------------------------------------------------------------- Diagnosis.message
def test_message_default_limit_is_eight_names() -> None:
    names = tuple(f"p{i}" for i in range(9))
    d = Diagnosis(1, names, "p8", "x")
    assert d.message() == (
        "step 1: non-finite gradients in 9 parameter(s): p0, p1, p2, p3, p4, p5, p6, p7, "
        "... (+1 more); most likely origin: p8 (closest to the output). Likely cause: x")


def test_message_exactly_limit_names_lists_them_all() -> None:
    d = Diagnosis(1, ("a", "b"), "b", "x")
    assert d.message(limit=2) == (
        "step 1: non-finite gradients in 2 parameter(s): a, b; most likely origin: b "
        "(closest to the output). Likely cause: x")


# ---------------------------------------------------------------- Diagnostician.__init__
def test_init_type_errors_name_the_argument_and_the_type() -> None:
    with pytest.raises(TypeError) as e:
        Diagnostician("net")  # type: ignore[arg-type]
    assert str(e.value) == "`model` must be a torch.nn.Module, got str"
    with pytest.raises(TypeError) as e:
        Diagnostician(nn.Linear(1, 1), "sgd")  # type: ignore[arg-type]
    assert str(e.value) == "`optimizer` must be a torch.optim.Optimizer or None, got str"
    with pytest.raises(TypeError) as e:
        Diagnostician(nn.Linear(1, 1), thresholds={})  # type: ignore[arg-type]
    assert str(e.value) == "`thresholds` must be a DiagnosisThresholds or None, got dict"


def test_init_accepts_thresholds_and_starts_with_empty_state() -> None:
    t = DiagnosisThresholds(min_layers=3)
    doc = Diagnostician(nn.Linear(1, 1), thresholds=t)
    assert doc.thresholds is t
    assert doc.history == 32
    assert doc.state_dict() == {"losses": [], "grad_norms": [], "lrs": [], "last_step": -1,
                                "residual": None, "probed_norms": None, "skips": 0,
                                "causes": [], "step0": None}


# ---------------------------------------------------------------- observe
def test_observe_rejects_a_non_int_step() -> None:
    doc = Diagnostician(nn.Linear(1, 1))
    with pytest.raises(TypeError) as e:
        doc.observe(1.5)  # type: ignore[arg-type]
    assert str(e.value) == "`step` must be an int, got 1.5 (float)"
    with pytest.raises(TypeError) as e:
        doc.observe(True)
    assert str(e.value) == "`step` must be an int, got True (bool)"
    assert doc.losses == []


def test_observe_keeps_the_last_history_steps() -> None:
    lin = nn.Linear(1, 1)
    doc = Diagnostician(lin, torch.optim.SGD(lin.parameters(), lr=0.5), history=4)
    for step in range(6):
        doc.observe(step, float(step), 10.0 + step)
    assert doc.losses == [2.0, 3.0, 4.0, 5.0]
    assert doc.grad_norms == [12.0, 13.0, 14.0, 15.0]
    assert doc.lrs == [0.5] * 4
    assert doc.last_step == 5
    doc.observe(6)
    assert doc.losses[:3] == [3.0, 4.0, 5.0]
    assert math.isnan(doc.losses[3])


# ---------------------------------------------------------------- _norm_map (via preflight)
def test_norm_map_length_mismatch_messages() -> None:
    doc = Diagnostician(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="one value per name") as e:
        doc.preflight([1.0, 2.0], names=["weight"])
    assert str(e.value) == ("`per_tensor_norms` must have one value per name (1 names: the "
                            "given `names`), got 2 values")
    with pytest.raises(ValueError, match="one value per name") as e:
        doc.preflight([1.0])
    assert str(e.value) == ("`per_tensor_norms` must have one value per name (0 names: "
                            "parameters with a grad), got 1 values")


def test_preflight_uses_the_given_names_for_a_sequence() -> None:
    doc = _linear()
    doc.preflight([3.0, 4.0], loss=1.0, names=["weight", "bias"])
    assert doc.grad_norms == [5.0]


def test_preflight_reads_a_tensor_of_norms_once() -> None:
    doc = _linear()
    weights = {n: (float(p.detach().norm()), p.numel()) for n, p in doc.model.named_parameters()}
    reset_host_reads()
    doc.preflight(torch.tensor(5.0), loss=1.0, names=["weight"], weight_norms=weights)
    assert host_reads() == 1
    assert doc.grad_norms == [5.0]


# ---------------------------------------------------------------- preflight
def test_preflight_records_step_zero_loss_and_total_norm() -> None:
    doc = _linear(lr=0.1)
    doc.preflight({"weight": 3.0, "bias": 4.0}, loss=1.5)
    assert (doc.last_step, doc.losses, doc.grad_norms, doc.lrs) == (0, [1.5], [5.0], [0.1])


def test_preflight_without_loss_records_no_step() -> None:
    doc = _linear()
    doc.preflight({"weight": 3.0, "bias": 4.0})
    assert (doc.last_step, doc.losses, doc.grad_norms) == (-1, [], [])
    assert doc.step0 is not None


def test_preflight_does_not_record_an_observed_step_again() -> None:
    doc = _linear()
    doc.observe(0, 1.0, 2.0)
    doc.preflight({"weight": 3.0, "bias": 4.0}, loss=9.0, step=0)
    assert (doc.losses, doc.grad_norms) == ([1.0], [2.0])


def test_preflight_ranks_with_the_given_thresholds() -> None:
    grads = {"weight": 0.1, "bias": 0.1}
    doc = _linear(lr=0.01)
    assert doc.preflight(grads, loss=1.0) == []
    torch.manual_seed(0)
    lin = nn.Linear(2, 2)
    doc = Diagnostician(lin, torch.optim.SGD(lin.parameters(), lr=0.01),
                        thresholds=DiagnosisThresholds(update_ratio_alone=1e-6))
    assert [c.cause for c in doc.preflight(grads, loss=1.0)] == ["lr_too_high"]


def test_preflight_step0_uses_min_layers_and_the_optimizer_kind() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                        nn.Linear(4, 1))
    grads = {n: 1.0 for n, _ in net.named_parameters()}
    doc = Diagnostician(net, torch.optim.Adam(net.parameters(), lr=1e-3),
                        thresholds=DiagnosisThresholds(min_layers=3))
    doc.preflight(grads)
    assert doc.step0 is not None
    assert doc.step0.layers == 3
    assert doc.step0.growth_back == pytest.approx(1.0)
    assert doc.step0.adaptive_optimizer is True
    plain = Diagnostician(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    plain.preflight(grads)
    assert plain.step0 is not None
    assert plain.step0.growth_back is None


# ---------------------------------------------------------------- diagnose (method)
def test_diagnose_uses_the_given_names_for_a_sequence() -> None:
    doc = _linear()
    doc.diagnose("on_demand", [3.0, 4.0], names=["weight", "bias"])
    assert doc.step0 is not None
    assert doc.step0.sgd is not None
    assert doc.step0.sgd.worst in ("weight", "bias")


def test_diagnose_collects_step0_without_gradients_when_one_is_not_finite() -> None:
    doc = _linear()
    doc.diagnose("nonfinite", {"weight": NAN, "bias": 1.0})
    assert doc.step0 is not None
    assert (doc.step0.sgd, doc.step0.adaptive, doc.step0.lr0) == (None, None, None)


# ---------------------------------------------------------------- evidence
def test_evidence_appends_this_loss_only_when_not_observed() -> None:
    doc = _linear(lr=0.1)
    doc.observe(0, 2.0, 1.0)
    ev = doc.evidence("on_demand", {"weight": 1.0}, 2.0)
    assert ev.losses == (2.0,)
    assert dict(ev.grads) == {"weight": 1.0}
    assert (ev.grad_norms, ev.lrs, ev.lr) == ((1.0,), (0.1,), 0.1)
    assert doc.evidence("on_demand", {}, 3.0).losses == (2.0, 3.0)
    assert doc.evidence("on_demand", {}, None).losses == (2.0,)
    doc.observe(1, NAN)
    assert len(doc.evidence("on_demand", {}, NAN).losses) == 2


# ---------------------------------------------------------------- probe and state
def test_finish_probe_without_a_probe_does_nothing() -> None:
    doc = Diagnostician(_resnet())
    doc.finish_probe()
    assert doc.structure.residual is None
    assert doc.state_dict()["residual"] is None


def test_finish_probe_keeps_what_the_probe_found_in_the_state() -> None:
    doc = _probed(_resnet())
    state = doc.state_dict()
    assert (state["residual"], state["probed_norms"], state["skips"]) == (
        ["1", "2"], ["1.norm", "2.norm"], 2)
    s = doc.structure
    assert (s.residual, s.probed_norms, s.skips) == (("1", "2"), ("1.norm", "2.norm"), 2)


def test_load_state_dict_restores_the_probe_findings_into_the_structure() -> None:
    state = _probed(_resnet()).state_dict()
    fresh = Diagnostician(_resnet())
    assert fresh.structure.residual is None
    fresh.load_state_dict(state)
    s = fresh.structure
    assert (s.residual, s.probed_norms, s.skips) == (("1", "2"), ("1.norm", "2.norm"), 2)


def test_load_state_dict_of_an_old_state_without_norms_and_skips() -> None:
    state = _probed(_resnet()).state_dict()
    del state["probed_norms"], state["skips"]
    fresh = Diagnostician(_resnet())
    fresh.load_state_dict(state)
    assert (fresh.probed_norms, fresh.skips) == (None, 2)
    s = fresh.structure
    assert (s.residual, s.probed_norms, s.skips) == (("1", "2"), None, 2)


def test_state_dict_holds_the_step0_evidence() -> None:
    doc = _linear()
    doc.preflight({"weight": 3.0, "bias": 4.0}, loss=1.0)
    assert doc.step0 is not None
    assert doc.state_dict()["step0"] == doc.step0.to_state()


# ---------------------------------------------------------------- weight_norm_request
def test_weight_norm_request_values() -> None:
    doc = _linear()
    lin = doc.model
    assert isinstance(lin, nn.Linear)
    names, norms = doc.weight_norm_request()
    assert names == [("weight", 4), ("bias", 2)]
    assert norms is not None
    assert norms.tolist() == [float(lin.weight.detach().norm()),
                              float(lin.bias.detach().norm())]


def test_weight_norm_request_gathers_on_the_first_parameter_device() -> None:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2))
    doc = Diagnostician(net)
    net[0].to("meta")  # the first parameter's device differs from the others'
    names, norms = doc.weight_norm_request()
    assert names == [("0.weight", 4), ("1.weight", 4), ("1.bias", 2)]
    assert norms is not None
    assert (norms.device.type, norms.shape) == ("meta", (3,))
