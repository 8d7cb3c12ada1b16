"""The diagnosis engine: labelled broken/healthy set, remedies in place, API, state."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lightning_gradguard.core._host import host_reads, reset_host_reads
from lightning_gradguard.core.diagnosis import (
    CAUSES,
    Cause,
    DiagnosisThresholds,
    Diagnostician,
)
from lightning_gradguard.core.structure import is_adaptive

from ._diagnosis_cases import (
    ADAM,
    BN,
    RES,
    Block,
    Result,
    Seq,
    broken_cases,
    healthy_cases,
    mlp,
    run_case,
)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def broken(one_thread: None) -> list[Result]:
    return [run_case(c) for c in broken_cases()]


@pytest.fixture(scope="module")
def healthy(one_thread: None) -> list[Result]:
    return [run_case(c) for c in healthy_cases()]


def test_labelled_set_covers_every_cause_twice_on_different_models() -> None:
    cases = broken_cases()
    for cause in CAUSES:
        models = {c.name.split("-")[0] for c in cases if c.planted == cause}
        assert len(models) >= 2, (cause, models)
    assert len(healthy_cases()) >= 26


def test_broken_runs_explode_and_the_planted_cause_ranks_first(broken: list[Result]) -> None:
    assert all(r.event in ("spike", "nonfinite") for r in broken), \
        [(r.case.name, r.event) for r in broken if r.event == "on_demand"]
    hits = [r for r in broken if r.top == r.case.planted]
    rate = len(hits) / len(broken)
    assert rate >= 0.9, [(r.case.name, r.case.planted, r.top) for r in broken
                         if r.top != r.case.planted]


def test_healthy_runs_report_no_cause(healthy: list[Result]) -> None:
    clean = [r for r in healthy if not r.causes and not r.preflight]
    assert len(clean) / len(healthy) >= 0.95, [(r.case.name, [c.cause for c in r.causes])
                                               for r in healthy if r not in clean]


def _in_place_violations(r: Result) -> list[str]:
    out = []
    for c in r.causes + r.preflight:
        assert c.cause in CAUSES
        out += [f"{r.case.name}: {c.cause} suggests {f!r}" for f in r.case.forbidden
                if f in c.remedy]
    return out


def test_no_remedy_already_in_place_is_suggested(broken: list[Result],
                                                 healthy: list[Result]) -> None:
    violations = [v for r in broken + healthy for v in _in_place_violations(r)]
    assert violations == []
    # the forbidden lists are not empty by accident: the in-place remedies exist in the set
    assert sum(1 for r in broken if set(r.case.forbidden) & set(BN)) >= 3
    assert sum(1 for r in broken if set(r.case.forbidden) & set(RES)) >= 2
    assert sum(1 for r in broken if set(r.case.forbidden) & set(ADAM)) >= 2


def test_structural_causes_respect_the_structure(broken: list[Result]) -> None:
    by_name = {r.case.name: r for r in broken}
    # normalised deep nets: "no_residual", never "no_normalization"
    for name in ("mlp-bn-deep", "cnn-bn-deep", "cnn-bn-lr"):
        assert "no_normalization" not in [c.cause for c in by_name[name].causes]
    # residual nets: "no_normalization", never "no_residual"
    for name in ("resmlp-he", "rescnn-he", "resmlp-std0.5"):
        assert "no_residual" not in [c.cause for c in by_name[name].causes]


def test_preflight_names_depth_causes_before_anything_explodes(broken: list[Result]) -> None:
    for r in broken:
        if r.case.planted in ("init_too_large", "activation", "no_normalization",
                              "no_residual", "recurrent_weights"):
            assert r.preflight, r.case.name
            assert r.preflight[0].cause == r.case.planted, r.case.name


def test_evidence_and_remedy_text(broken: list[Result]) -> None:
    by_name = {r.case.name: r for r in broken}
    init = by_name["mlp-relu-std1"].causes[0]
    assert init.evidence.startswith("the weights are 4x the He std for their fan-in")
    assert "per layer" in init.evidence
    assert "nn.init.kaiming_normal_(m.weight, nonlinearity='relu')" in init.remedy
    tanh = by_name["mlp-tanh-std1"].causes[0]
    assert "nn.init.xavier_normal_" in tanh.remedy
    act = by_name["mlp-steep"].causes[0]
    assert act.evidence.startswith("Steep amplifies gradients: derivative up to 2,")
    rec = by_name["rnn-relu-hh3"].causes[0]
    assert "largest singular value of rnn.weight_hh_l0 is 3 (> 1)" in rec.evidence
    assert "nn.LSTM / nn.GRU" in rec.remedy
    assert "nn.LSTM" not in by_name["lstm-hh4"].causes[0].remedy
    data = by_name["mlp-nan"].causes[0]
    assert data.evidence == ("the batch of this step is not finite: batch[0] holds 2 NaN/Inf "
                             "of 1024 values")
    loss = by_name["mlp-normmse"].causes[0]
    assert loss.evidence.startswith("the loss became inf right after")
    lr = by_name["mlp-he-lr"].causes[0]
    assert "the loss rose" in lr.evidence
    assert "torch.optim.Adam" in lr.remedy
    assert "torch.optim.Adam" not in by_name["mlp-adam-lr"].causes[0].remedy


def _linear_doc(lr: float = 0.1) -> tuple[nn.Linear, Diagnostician]:
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    return layer, Diagnostician(layer, torch.optim.SGD(layer.parameters(), lr=lr))


def test_lr_remedy_exact_numbers() -> None:
    _, doc = _linear_doc()
    # |w| = 4, |g| = 40, lr 0.1: the step moves the weights by 100 %
    causes = doc.preflight({"weight": 40.0, "bias": 0.0}, loss=1.0)
    assert [c.cause for c in causes] == ["lr_too_high"]
    assert causes[0].remedy.startswith(
        "lower the LR to ~0.001: the update moved the weights by 100 % in one step")
    assert doc.to_dicts() == []  # preflight does not replace the last diagnosis
    got = doc.diagnose("on_demand", {"weight": 40.0, "bias": 0.0})
    assert doc.to_dicts() == [c.to_dict() for c in got]
    assert set(doc.to_dicts()[0]) == {"cause", "evidence", "remedy"}
    _, quiet = _linear_doc()
    assert quiet.preflight({"weight": 1.0, "bias": 0.0}, loss=1.0) == []  # 2.5 %


def test_preflight_can_be_switched_off() -> None:
    layer = nn.Linear(4, 4)
    doc = Diagnostician(layer, torch.optim.SGD(layer.parameters(), lr=10.0), preflight=False)
    assert doc.preflight({"weight": 40.0, "bias": 0.0}) == []
    assert doc.step0 is not None  # the evidence is still recorded
    assert doc.step0.ratios(adaptive=False).total > 1
    assert doc.diagnose("spike")[0].cause == "lr_too_high"


def test_schedule_position_in_lr_evidence() -> None:
    _layer, doc = _linear_doc(lr=0.01)
    opt = doc.optimizer
    assert opt is not None
    doc.preflight({"weight": 1.0, "bias": 0.0}, loss=1.0)
    for step, lr in enumerate([0.02, 0.05, 0.1, 0.1], start=1):
        opt.param_groups[0]["lr"] = lr
        doc.observe(step, loss=1.0 * 2 ** step, grad_norm=4.0 * 2 ** step)
    cause = doc.diagnose("spike", loss=16.0)[0]
    assert cause.cause == "lr_too_high"
    assert "at the end of a warmup from 0.01" in cause.evidence
    assert "a longer warmup to a lower peak" in cause.remedy


def test_probe_detects_residual_connections_and_removes_its_hooks() -> None:
    plain = mlp(depth=3)
    doc = Diagnostician(plain)
    doc.watch_forward()
    plain(torch.randn(4, 32)).sum().backward()
    doc.preflight({n: 1.0 for n, _ in plain.named_parameters()})
    assert doc.structure.residual == ()
    assert all(not m._forward_hooks for m in plain.modules())

    res = nn.Sequential(Block("relu", False), Block("relu", True), nn.Linear(32, 1))
    doc = Diagnostician(res)
    doc.watch_forward()
    res(torch.randn(4, 32))  # data input: no autograd node for the shortcut
    doc.diagnose("on_demand")
    assert doc.structure.residual == ("0", "1")
    assert doc.structure.has_norm


def test_observe_reads_nothing_from_the_device() -> None:
    _layer, doc = _linear_doc()
    reset_host_reads()
    for step in range(10):
        doc.observe(step, loss=1.0, grad_norm=2.0)
    assert host_reads() == 0
    assert len(doc.losses) == 10
    doc.observe(10, None, None)
    assert math.isnan(doc.losses[-1])


def test_state_dict_round_trip() -> None:
    model = Seq("lstm")
    doc = Diagnostician(model, torch.optim.SGD(model.parameters(), lr=3.0))
    doc.watch_forward()
    x = torch.rand(8, 20, 2)
    model(x).pow(2).mean().backward()
    norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
    doc.preflight(norms, loss=1.0)
    for step in range(1, 5):
        doc.observe(step, loss=2.0**step, grad_norm=3.0**step)
    expected = doc.diagnose("spike", norms, loss=16.0)
    state = doc.state_dict()
    fresh = Diagnostician(model, torch.optim.SGD(model.parameters(), lr=3.0))
    fresh.load_state_dict(state)
    assert fresh.diagnose("spike", norms, loss=16.0) == expected
    assert fresh.state_dict() == doc.state_dict()
    fresh.reset()
    assert fresh.losses == []
    assert fresh.step0 is None
    assert fresh.causes == []


def test_validation() -> None:
    layer = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module"):
        Diagnostician([layer])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`optimizer` must be"):
        Diagnostician(layer, "sgd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`preflight` must be a bool"):
        Diagnostician(layer, preflight=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`history` must be an int >= 4, got 2"):
        Diagnostician(layer, history=2)
    with pytest.raises(ValueError, match=r"`growth` must be a finite number > 1, got 0\.9"):
        DiagnosisThresholds(growth=0.9)
    doc = Diagnostician(layer)
    with pytest.raises(ValueError, match=r"`event` must be one of .*got 'boom'"):
        doc.diagnose("boom")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`per_tensor_norms` must have one value per name"):
        doc.diagnose("on_demand", [1.0, 2.0, 3.0], names=["a", "b"])


def test_tensor_and_sequence_norms_are_accepted() -> None:
    layer, doc = _linear_doc()
    layer(torch.ones(1, 4)).sum().backward()
    a = doc.diagnose("on_demand", torch.tensor([40.0, 0.0]))
    b = doc.diagnose("on_demand", [40.0, 0.0], names=["weight", "bias"])
    assert a == b
    assert a[0].cause == "lr_too_high"


def test_cause_ids_and_adaptive_detection() -> None:
    assert len(set(CAUSES)) == 8
    c = Cause("activation", "e", "r", 1.0)
    assert c.to_dict() == {"cause": "activation", "evidence": "e", "remedy": "r"}
    p = [nn.Parameter(torch.ones(1))]
    assert is_adaptive(torch.optim.AdamW(p))
    assert is_adaptive(torch.optim.RMSprop(p))
    assert not is_adaptive(torch.optim.SGD(p, lr=0.1))
    assert not is_adaptive(None)


@pytest.mark.slow
def test_held_out_model_seeds(one_thread: None) -> None:
    """The same configurations with model seeds the thresholds were not set on.

    Measured when written: broken 74/78 first (94.9 %; misses: rescnn-he seed 1 did not
    explode, mlp-bn-tanh-deep seeds 1 and 3 named lr_too_high first, resmlp-std0.5 seed 3
    sits at the init threshold and named no_normalization first), healthy 39/39 clean.
    """
    from dataclasses import replace

    broken = [run_case(replace(c, seed=s)) for s in (1, 2, 3) for c in broken_cases()]
    assert sum(r.top == r.case.planted for r in broken) / len(broken) >= 0.9
    healthy = [run_case(replace(c, seed=s)) for s in (2, 3, 4) for c in healthy_cases()
               if c.name.endswith("-s0")]
    assert sum(not r.causes and not r.preflight for r in healthy) / len(healthy) >= 0.95


def test_observe_never_reads_a_tensor_lr_on_an_accelerator() -> None:
    # a CUDA tensor LR (fused/capturable optimizers) would cost a host sync every step; on CPU
    # a 'meta' tensor stands in for it: float() of it raises, so any read fails the test
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = Diagnostician(model, opt)
    opt.param_groups[0]["lr"] = torch.tensor(0.1, device="meta")
    for step in range(1, 4):
        diag.observe(step, loss=1.0, grad_norm=1.0)
    opt.param_groups[0]["lr"] = torch.tensor(0.1)
    assert diag._lr() == pytest.approx(0.1)
