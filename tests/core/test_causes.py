"""core/causes.py: the cause rules as pure functions of hand-made evidence (no model, no step).

As ``decide.py``'s rules are tested in ``test_decide.py``: each rule gets an
:class:`Evidence` built from plain values, and its verdict (and its words) are checked.
"""

from __future__ import annotations

import math

import pytest

from lightning_gradguard.core.causes import (
    Evidence,
    InitScale,
    Step0Evidence,
    UpdateRatios,
    activation_cause,
    data_cause,
    depth_causes,
    grew,
    growth,
    is_explosion,
    loss_cause,
    lr_cause,
    rank,
    recurrent_cause,
    step0_evidence,
)
from lightning_gradguard.core.structure import (
    ActivationInfo,
    LayerInfo,
    ModelStructure,
    RecurrentInfo,
)

NAN = math.nan
STEADY = dict(losses=(1.0, 0.9, 0.95, 0.92, NAN), grad_norms=(1.0, 1.1, 0.9, 1.0))


def _layers(n: int) -> tuple[LayerInfo, ...]:
    return tuple(LayerInfo(f"l{i}", f"l{i}.weight", "Linear", 64, 64, 0.5, 0.177, 0.125)
                 for i in range(n))


GROWING = Step0Evidence(layers=8, growth_back=1.5, growth_fwd=None,
                        init_median=2.8, init_worst=InitScale("l0.weight", 0.5, 0.177, 64))


# --- the batch and the loss ------------------------------------------------------------------
def test_data_cause_names_the_bad_tensors_first() -> None:
    ev = Evidence("nonfinite", batch_bad=(("x", 3, 64), ("y", 1, 8)), loss=NAN, **STEADY)
    causes = rank(ev)
    assert [c.cause for c in causes][:1] == ["data_nonfinite"]
    assert causes[0].evidence == ("the batch of this step is not finite: x holds 3 NaN/Inf of "
                                  "64 values; y holds 1 NaN/Inf of 8 values")
    assert "loss_nonfinite" not in [c.cause for c in causes]  # the batch explains the loss
    assert data_cause(Evidence("nonfinite", batch_bad=())) == []


def test_loss_cause_needs_a_steady_run_up_and_says_whether_the_batch_was_read() -> None:
    ev = Evidence("nonfinite", loss=NAN, **STEADY)
    (cause,) = loss_cause(ev)
    assert cause.cause == "loss_nonfinite"
    assert cause.evidence.startswith("the loss became nan right after 0.92, with no run-up")
    assert not cause.evidence.endswith("and the batch is finite")
    (read,) = loss_cause(Evidence("nonfinite", loss=NAN, batch_bad=(), **STEADY))
    assert read.evidence.endswith("(0.9..1.1) and the batch is finite")
    # a run-up in the norms: not a loss that broke on its own
    assert loss_cause(Evidence("nonfinite", loss=NAN, losses=STEADY["losses"],
                               grad_norms=(1.0, 1.1, 0.9, 30.0))) == []
    # a finite loss with finite gradients: nothing to explain
    assert loss_cause(Evidence("nonfinite", loss=0.9, losses=(1.0, 0.9, 0.95, 0.92, 0.9),
                               grad_norms=STEADY["grad_norms"])) == []
    # only on a non-finite step (or a halt)
    assert rank(Evidence("spike", loss=NAN, **STEADY)) == []


# --- growth and explosions -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("norms", "expected"),
    [((1.0, 1.1, 0.9, 12.0), True),          # 10x the median before
     ((1.0, 1.5, 2.5, 3.5), True),           # 3 rises in a row to x3.5
     ((1.0, 1.5, 2.5, 2.9), False),          # x2.9 only
     ((1.0, 1.1, 1.3), False)],              # too short
)
def test_grew(norms: tuple[float, ...], expected: bool) -> None:
    assert grew(Evidence("spike", grad_norms=norms)) is expected
    assert is_explosion(Evidence("spike", grad_norms=norms)) is expected
    assert is_explosion(Evidence("nonfinite", grad_norms=norms))  # always one
    assert not is_explosion(Evidence("on_demand", grad_norms=norms))


def test_a_rising_loss_is_growth() -> None:
    assert grew(Evidence("backoff", losses=(1.0, 1.5, 3.0, 9.0, 40.0)))


def test_growth_needs_the_factor_and_the_amplification() -> None:
    assert growth(Evidence(step0=GROWING)) == (1.5, True)
    # x1.5 over 3 layers is only x2.25: no growth
    assert growth(Evidence(step0=Step0Evidence(layers=3, growth_back=1.5)))[1] is False
    assert growth(Evidence()) == (None, False)
    # the stream needs x3 over its blocks
    assert growth(Evidence(step0=Step0Evidence(blocks=4, growth_stream=1.5)))[1] is True


# --- depth -----------------------------------------------------------------------------------
def test_init_too_large_outranks_the_structure_and_words_the_numbers() -> None:
    s = ModelStructure(layers=_layers(8), probed_norms=(), residual=())
    causes = depth_causes(Evidence("backoff", step0=GROWING, structure=s))
    assert [c.cause for c in causes] == ["init_too_large"]
    assert causes[0].evidence == (
        "the weights are 2.8x the He std for their fan-in (median over 8 layers; l0.weight: "
        "std 0.5 vs 0.177 for fan_in 64); gradients x1.5 per layer from output to input "
        "(x17.1), fitted at step 0")
    assert causes[0].score == pytest.approx(20.0 + math.log(2.8))


def test_structural_causes_only_with_growth_and_only_what_was_looked_for() -> None:
    plain = Step0Evidence(layers=8, growth_back=1.5, init_median=1.0,
                          init_worst=InitScale("l0.weight", 0.18, 0.177, 64))
    s = ModelStructure(layers=_layers(8), probed_norms=(), residual=())
    assert [c.cause for c in depth_causes(Evidence(step0=plain, structure=s))] == [
        "no_normalization", "no_residual"]
    # not probed: normalisation and skips unknown, nothing named
    assert depth_causes(Evidence(step0=plain, structure=ModelStructure(layers=_layers(8)))) == []
    # no growth: nothing, even on an explosion
    flat = Step0Evidence(layers=8, growth_back=1.01)
    assert depth_causes(Evidence("nonfinite", step0=flat, structure=s)) == []


def test_activation_cause() -> None:
    act = ActivationInfo("a", "Amp", rms_gain=1.2, max_gain=2.0)
    s = ModelStructure(activations=(act, act))
    (cause,) = activation_cause(Evidence(structure=s))
    assert cause.evidence.startswith("Amp amplifies gradients: derivative up to 2, RMS 1.2 on "
                                     "N(0,1) inputs, i.e. x1.7 per layer with He-scaled "
                                     "weights (2 of them); no depth profile")
    assert activation_cause(Evidence(structure=ModelStructure(
        activations=(ActivationInfo("r", "ReLU", 0.71, 1.0),)))) == []


def test_recurrent_cause_takes_the_largest_sigma() -> None:
    rec = (RecurrentInfo("rnn", "rnn.weight_hh_l0", "LSTM", 1.6, "gated"),
           RecurrentInfo("rnn", "rnn.weight_hh_l1", "LSTM", 3.0, "gated"))
    (cause,) = recurrent_cause(Evidence(structure=ModelStructure(recurrent=rec)))
    assert "rnn.weight_hh_l1 is 3" in cause.evidence
    assert ".chunk(4)" in cause.remedy
    low = (RecurrentInfo("rnn", "rnn.weight_hh_l0", "RNN", 1.2, "tanh"),)
    assert recurrent_cause(Evidence(structure=ModelStructure(recurrent=low))) == []


# --- the LR ----------------------------------------------------------------------------------
def test_lr_cause_from_the_step0_ratio_alone_and_on_an_explosion() -> None:
    s0 = Step0Evidence(sgd=UpdateRatios(0.4, "w", 0.5), lr0=0.1, weight_norm=10.0, numel=100)
    assert lr_cause(Evidence("on_demand", step0=s0, lr=0.1)) == []  # 40 % < 100 % alone
    (cause,) = lr_cause(Evidence("nonfinite", step0=s0, lr=0.1))
    assert cause.evidence == ("at step 0 (lr 0.1) one SGD step moved the weights by 40 % of "
                              "their norm (most: w 50 %)")
    assert cause.remedy.startswith("lower the LR to ~0.002: the update moved the weights by "
                                   "40 % in one step")
    assert cause.remedy.endswith("; or an adaptive optimizer: torch.optim.Adam(params, lr=1e-3)")
    assert lr_cause(Evidence("nonfinite", step0=s0)) == []  # no LR known


def test_lr_cause_reads_the_ratio_of_the_optimizers_form() -> None:
    s0 = Step0Evidence(sgd=UpdateRatios(0.001), adaptive=UpdateRatios(2.0, "w", 2.0), lr0=1e-3)
    assert lr_cause(Evidence("on_demand", step0=s0, lr=1e-3, adaptive=False)) == []
    (cause,) = lr_cause(Evidence("on_demand", step0=s0, lr=1e-3, adaptive=True))
    assert "one Adam-like step moved the weights by 200 %" in cause.evidence
    assert "adaptive optimizer" not in cause.remedy


def test_rank_orders_by_score_one_entry_per_cause() -> None:
    s = ModelStructure(layers=_layers(8), probed_norms=(), residual=(),
                       recurrent=(RecurrentInfo("rnn", "rnn.weight_hh_l0", "GRU", 2.0, "gated"),))
    s0 = Step0Evidence(layers=8, growth_back=1.5, init_median=2.8,
                       init_worst=InitScale("l0.weight", 0.5, 0.177, 64),
                       sgd=UpdateRatios(0.4, "w", 0.5), lr0=0.1, weight_norm=10.0, numel=100)
    ev = Evidence("nonfinite", step0=s0, structure=s, lr=0.1, batch_bad=(("x", 1, 4),))
    assert [c.cause for c in rank(ev)] == ["data_nonfinite", "init_too_large",
                                           "recurrent_weights", "lr_too_high"]


# --- the record ------------------------------------------------------------------------------
def test_step0_evidence_from_host_values_and_its_state_round_trip() -> None:
    s = ModelStructure(layers=_layers(5))
    grads = {f"l{i}.weight": 2.0 ** i for i in range(5)}
    weights = {f"l{i}.weight": (8.0, 64 * 64) for i in range(5)}
    ev = step0_evidence(s, grads, weights, lr=0.1, adaptive=False)
    assert (ev.layers, ev.blocks) == (5, 0)
    assert ev.growth_back == pytest.approx(0.5)  # output -> input: the norms halve
    assert ev.init_median == pytest.approx(0.5 / 0.177)
    assert ev.sgd is not None
    assert ev.sgd.worst == "l4.weight"
    assert ev.sgd.worst_ratio == pytest.approx(0.1 * 16.0 / 8.0)
    assert ev.lr0 == 0.1
    assert Step0Evidence.from_state(ev.to_state()) == ev
    assert step0_evidence(s, grads, weights, lr=None, adaptive=False).lr0 is None
