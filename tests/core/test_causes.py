"""core/causes.py: the cause rules as pure functions of hand-made evidence (no model, no step).

As ``decide.py``'s rules are tested in ``test_decide.py``: each rule gets an
:class:`Evidence` built from plain values, and its verdict (and its words) are checked.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from lightning_gradguard.core.causes import (
    Cause,
    DiagnosisThresholds,
    Evidence,
    InitScale,
    Step0Evidence,
    UpdateRatios,
    _pct,
    _round_lr,
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


# --- the thresholds (issue 27: pinned bounds and messages) -----------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"update_ratio": 0.0}, "`update_ratio` must be a finite number > 0, got 0.0"),
     ({"update_ratio_alone": 0.0}, "`update_ratio_alone` must be a finite number > 0, got 0.0"),
     ({"target_ratio": -1.0}, "`target_ratio` must be a finite number > 0, got -1.0"),
     ({"min_layers": 2}, "`min_layers` must be an int >= 3, got 2")],
)
def test_thresholds_reject_out_of_range_values_by_name(kwargs: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DiagnosisThresholds(**kwargs)


def test_thresholds_accept_the_bounds_they_name() -> None:
    assert DiagnosisThresholds(min_layers=3).min_layers == 3
    assert DiagnosisThresholds(target_ratio=1e-9).target_ratio == 1e-9


# --- the words for ratios and LRs ------------------------------------------------------------
@pytest.mark.parametrize(
    ("ratio", "words"),
    [(0.0123, "1.2 %"), (0.9, "90 %"), (0.4, "40 %"), (1.0, "100 %"), (2.5, "250 %")],
)
def test_pct_two_digits_below_100_percent_whole_percent_above(ratio: float, words: str) -> None:
    assert _pct(ratio) == words


@pytest.mark.parametrize(
    ("lr", "words"),
    [(0.00123, "0.001"), (0.0078, "0.008"), (-0.00123, "-0.00123"), (0.0, "0"),
     (math.inf, "inf")],
)
def test_round_lr_to_one_digit_only_for_a_positive_finite_lr(lr: float, words: str) -> None:
    assert _round_lr(lr) == words


# --- data_cause: the words, the remedy, the score --------------------------------------------
def test_data_cause_names_at_most_three_tensors_and_gives_the_remedy() -> None:
    bad = (("a", 1, 2), ("b", 3, 4), ("c", 5, 6), ("d", 7, 8))
    (cause,) = data_cause(Evidence("nonfinite", batch_bad=bad))
    assert cause == Cause(
        "data_nonfinite",
        "the batch of this step is not finite: a holds 1 NaN/Inf of 2 values; b holds 3 NaN/Inf "
        "of 4 values; c holds 5 NaN/Inf of 6 values",
        "clean the data: drop or repair those samples in the Dataset (e.g. keep rows with "
        "torch.isfinite(x).all(dim=1), or torch.nan_to_num(x)); GradGuard skips such steps "
        "meanwhile", 100.0)


# --- loss_cause: where a run-up starts, the words, the remedy --------------------------------
LOSS_REMEDY = ("make the loss numerically safe: clamp inside log/sqrt/division "
               "(torch.log(p.clamp_min(1e-12)), x / (d + 1e-8)), or use the fused stable forms "
               "(F.cross_entropy / F.binary_cross_entropy_with_logits on logits, "
               "torch.logsumexp)")


@pytest.mark.parametrize(
    ("norms", "fires"),
    [((1.0, 1.0, 20.0), False),            # 3 norms are enough to see a jump x20
     ((1.0, 1.0, 10.0), True),             # exactly 10x the median before: no run-up yet
     ((1.0, 1.0, 1.0, 10.5), False),       # 10.5x: a run-up
     ((2.0, 2.0, 2.0, 10.0), True),        # x5 of the median 2
     ((1.0, 5.0, 5.0, 20.0), True),        # x4 of the median of all the norms before
     ((1.0, 1.0, 5.0, 5.0, 20.0), True)],  # (median 3, not of the oldest ones only)
)
def test_loss_cause_a_run_up_in_the_norms_is_10x_their_median_before(
        norms: tuple[float, ...], fires: bool) -> None:
    ev = Evidence("nonfinite", loss=NAN, losses=STEADY["losses"], grad_norms=norms)
    assert bool(loss_cause(ev)) is fires


@pytest.mark.parametrize(
    ("losses", "fires"),
    [((1.0, 1.0, 1.0, NAN), True),                  # 3 finite losses before are enough
     ((1.0, 1.0, NAN), False),                      # 2 are not
     ((1.0, 1.0, 1.0, 5.0, NAN), False),            # the last one 5x the median: not steady
     ((1.0, 1.0, 1.0, 3.0, NAN), True),             # exactly 3x: still steady
     ((1.0, 1.0, 1.0, 3.5, NAN), False),            # 3.5x: not
     ((2.0, 2.0, 2.0, 5.0, NAN), True),             # 2.5x of the median 2
     ((1.0, 1.0, 1.0, 1.0, 1.5, 2.5, NAN), False)],  # a rise to NaN is the LR's, not the loss
)
def test_loss_cause_needs_three_steady_losses_before(losses: tuple[float, ...],
                                                     fires: bool) -> None:
    ev = Evidence("nonfinite", loss=NAN, losses=losses, grad_norms=(1.0, 1.0, 1.0))
    assert bool(loss_cause(ev)) is fires


def test_loss_cause_words_a_nan_loss_and_gives_the_remedy() -> None:
    ev = Evidence("nonfinite", loss=NAN, losses=STEADY["losses"],
                  grad_norms=STEADY["grad_norms"])
    assert loss_cause(ev) == [Cause(
        "loss_nonfinite",
        "the loss became nan right after 0.92, with no run-up: the gradient norms before were "
        "finite and steady (0.9..1.1)", LOSS_REMEDY, 50.0)]
    # the loss just before was not finite either: the last finite loss is quoted as such
    (cause,) = loss_cause(Evidence("nonfinite", loss=NAN, losses=(1.0, 1.0, 2.0, NAN, NAN),
                                   grad_norms=(1.0, 1.0, 1.0)))
    assert cause.evidence.startswith(
        "the loss became nan after 2, its last finite value, with no run-up")


def test_loss_cause_words_non_finite_gradients_under_a_finite_loss() -> None:
    ev = Evidence("nonfinite", loss=0.9, losses=(1.0, 0.9, 0.95, 0.9), grad_norms=(1.0, 1.1, 0.9),
                  grads={"b": 1.0, "w": NAN, "v": math.inf})
    assert loss_cause(ev) == [Cause(
        "loss_nonfinite",
        "the loss is finite (0.9) but 2 gradient(s) are not (first: w), with no run-up: the "
        "gradient norms before were finite and steady (0.9..1.1)", LOSS_REMEDY, 50.0)]


def test_loss_cause_uses_the_thresholds_it_is_given_for_the_depth_growth() -> None:
    ev = Evidence("nonfinite", loss=NAN, losses=STEADY["losses"], grad_norms=(1.0, 1.1, 0.9),
                  step0=Step0Evidence(layers=8, growth_back=1.5))
    assert loss_cause(ev) == []  # x1.5 per layer over 8 layers: the depth explains it
    (cause,) = loss_cause(ev, DiagnosisThresholds(growth=2.0))  # not growth for these
    assert cause.cause == "loss_nonfinite"


# --- lr_cause: the score, the words, the suggested LR ----------------------------------------
LR_TAIL = (" in one step (aim for ~1 %, and ~10 % for the most-moved tensor); or an adaptive "
           "optimizer: torch.optim.Adam(params, lr=1e-3)")
RISE = (1.0, 1.5, 3.0, 9.0, 40.0)


def _sgd0(total: float, worst: str = "", worst_ratio: float = 0.0, lr0: float = 0.1,
          weight_norm: float = 0.0) -> Step0Evidence:
    return Step0Evidence(sgd=UpdateRatios(total, worst, worst_ratio), lr0=lr0,
                         weight_norm=weight_norm, numel=4 if weight_norm else 0)


@pytest.mark.parametrize(
    ("total", "losses", "score"),
    [(0.4, (), 5.0 + math.log10(8.0)),          # 5 + log10(ratio / 5 %)
     (0.05, (), 5.0),                           # exactly at the threshold
     (0.4, RISE, 7.0 + math.log10(8.0)),        # +2 for a loss rising to it
     (5000.0, (), 9.0),                         # capped below the causes inside the model
     (50.0, RISE, 9.0)],
)
def test_lr_cause_score_grows_with_the_log_of_the_ratio_below_9(
        total: float, losses: tuple[float, ...], score: float) -> None:
    (cause,) = lr_cause(Evidence("nonfinite", step0=_sgd0(total), lr=0.1, losses=losses))
    assert cause.score == pytest.approx(score, abs=1e-12)


def test_lr_cause_words_the_step0_ratio_and_the_rising_loss() -> None:
    (cause,) = lr_cause(Evidence("nonfinite", step0=_sgd0(0.4), lr=0.1, losses=RISE))
    assert cause == Cause(
        "lr_too_high",
        "at step 0 (lr 0.1) one SGD step moved the weights by 40 % of their norm; the loss rose "
        "4 steps in a row from 1 (x40)",
        "lower the LR to ~0.002: the update moved the weights by 40 %" + LR_TAIL,
        7.0 + math.log10(8.0))


def test_lr_cause_a_loss_rising_to_nan_counts_without_any_ratio() -> None:
    # nothing measured: the LR is suggested 10x lower
    ev = Evidence("nonfinite", lr=1.0, losses=(1.0, 1.5, 3.0, NAN))
    assert lr_cause(ev) == [Cause(
        "lr_too_high",
        "the loss rose 3 steps in a row from 1 to non-finite",
        "lower the LR to ~0.1 (a tenth: no update of the weights was measured; aim for ~1 %, "
        "and ~10 % for the most-moved tensor); or an adaptive optimizer: "
        "torch.optim.Adam(params, lr=1e-3)", 3.0)]
    # lr * 0.1 (0.15000000000000002), not lr / 10 (0.15)
    (cause,) = lr_cause(Evidence("backoff", lr=1.5, losses=RISE))
    assert cause.remedy.startswith("lower the LR to ~0.2 (a tenth: ")
    # without the rise, 0 % is no cause
    assert lr_cause(Evidence("nonfinite", lr=1.0, losses=(1.0, 1.0, 1.0, NAN))) == []


def test_lr_cause_a_small_ratio_with_a_rising_loss_scores_3_and_suggests_a_tenth() -> None:
    # 0.8 % is below the 1 % aimed for: the LR is suggested 10x lower, not x1.25
    (cause,) = lr_cause(Evidence("backoff", step0=_sgd0(0.008, lr0=1.0), lr=1.0, losses=RISE))
    assert cause.score == 3.0
    assert cause.remedy == "lower the LR to ~0.1: the update moved the weights by 0.8 %" + LR_TAIL


def test_lr_cause_words_the_current_lr_only_when_it_moved_over_1_percent() -> None:
    (cause,) = lr_cause(Evidence("nonfinite", step0=_sgd0(0.4), lr=0.1005))
    assert cause.evidence == ("at step 0 (lr 0.1) one SGD step moved the weights by 40 % of "
                              "their norm")
    assert cause.remedy == "lower the LR to ~0.003: the update moved the weights by 40 %" + LR_TAIL
    (cause,) = lr_cause(Evidence("nonfinite", step0=_sgd0(0.4), lr=0.05))
    assert cause.evidence == ("at step 0 (lr 0.1) one SGD step moved the weights by 40 % of "
                              "their norm; the same step at the current lr 0.05 would move them "
                              "by 20 %")
    assert cause.remedy == ("lower the LR to ~0.002: the update would move the weights by 20 %"
                            + LR_TAIL)


def test_lr_cause_the_most_moved_tensor_caps_the_suggested_lr() -> None:
    # 0.1 * 1 % / 6 % would do for the total, but w moved 90 %: 0.1 * 10 % / 90 %
    (cause,) = lr_cause(Evidence("nonfinite", step0=_sgd0(0.06, "w", 0.9), lr=0.1))
    assert cause.evidence == ("at step 0 (lr 0.1) one SGD step moved the weights by 6 % of "
                              "their norm (most: w 90 %)")
    assert cause.remedy == "lower the LR to ~0.01: the update moved the weights by 6 %" + LR_TAIL
    # 10 % / 70 % = 0.14 (not 11 % / 70 % = 0.16)
    (cause,) = lr_cause(Evidence("nonfinite", step0=_sgd0(0.06, "w", 0.7, lr0=1.0), lr=1.0))
    assert cause.remedy.startswith("lower the LR to ~0.1: ")
    # without a named tensor its ratio is not read: 1 % / 40 % = 0.025, not 10 % / 800 %
    (cause,) = lr_cause(Evidence("nonfinite", step0=_sgd0(0.4, "", 8.0, lr0=1.0), lr=1.0))
    assert cause.remedy.startswith("lower the LR to ~0.02: ")
    # a named tensor that did not move: no cap (and no division by zero)
    (cause,) = lr_cause(Evidence("nonfinite", step0=_sgd0(0.4, "w", 0.0), lr=0.1))
    assert cause.remedy.startswith("lower the LR to ~0.002: ")


def test_lr_cause_words_later_steps_only_above_twice_the_step0_ratio() -> None:
    # later step: 0.5 * 1.0 / 1.0 = 50 %, exactly twice the 25 % of step 0
    ev = Evidence("nonfinite", step0=_sgd0(0.25, lr0=0.5, weight_norm=1.0), lr=0.5,
                  grad_norms=(1.0,), lrs=(0.5,))
    (cause,) = lr_cause(ev)
    assert cause.evidence == ("at step 0 (lr 0.5) one SGD step moved the weights by 25 % of "
                              "their norm")
    assert cause.score == pytest.approx(6.0)
    ev = Evidence("nonfinite", step0=_sgd0(0.25, lr0=0.5, weight_norm=1.0), lr=0.5,
                  grad_norms=(1.2,), lrs=(0.5,))
    (cause,) = lr_cause(ev)
    assert cause.evidence == ("at step 0 (lr 0.5) one SGD step moved the weights by 25 % of "
                              "their norm; later up to 60 % in one step")
    # no step-0 ratio: the later steps alone, and the suggestion rests on them
    ev = Evidence("nonfinite", step0=Step0Evidence(weight_norm=1.0, numel=4), lr=0.5,
                  grad_norms=(1.2,), lrs=(0.5,))
    assert lr_cause(ev) == [Cause(
        "lr_too_high", "up to 60 % in one step",
        "lower the LR to ~0.008: the update moved the weights by 60 %" + LR_TAIL,
        5.0 + math.log10(12.0))]


def test_lr_cause_suggests_from_step0_unless_its_ratio_is_below_the_target() -> None:
    # step 0 moved 0.5 %, below the 1 % aimed for: the 50 % of the later step counts
    ev = Evidence("nonfinite", step0=_sgd0(0.005, lr0=0.5, weight_norm=1.0), lr=0.5,
                  grad_norms=(1.0,), lrs=(0.5,))
    (cause,) = lr_cause(ev)
    assert cause.remedy == "lower the LR to ~0.01: the update moved the weights by 50 %" + LR_TAIL
    # step 0 moved exactly 1 %: it counts, and is already the target (a tenth of the LR)
    ev = Evidence("nonfinite", step0=_sgd0(0.01, lr0=0.5, weight_norm=1.0), lr=0.5,
                  grad_norms=(1.0,), lrs=(0.5,))
    (cause,) = lr_cause(ev)
    assert cause.remedy == "lower the LR to ~0.05: the update moved the weights by 1 %" + LR_TAIL


def test_lr_cause_suggests_a_longer_warmup_right_after_one() -> None:
    ev = Evidence("nonfinite", step0=_sgd0(0.4), lr=0.1, lrs=(0.025, 0.05, 0.075, 0.1))
    (cause,) = lr_cause(ev)
    assert cause.evidence == (
        "at step 0 (lr 0.1) one SGD step moved the weights by 40 % of their norm; the LR reached "
        "its peak 0.1 0 step(s) ago, at the end of a warmup from 0.025")
    assert cause.remedy == (
        "lower the LR to ~0.002: the update moved the weights by 40 % in one step (aim for ~1 %, "
        "and ~10 % for the most-moved tensor); or a longer warmup to a lower peak; or an "
        "adaptive optimizer: torch.optim.Adam(params, lr=1e-3)")


# --- step0_evidence: the depth profile, the init, the weights, the ratios --------------------
def _layer(name: str, param: str) -> LayerInfo:
    return LayerInfo(name, param, "Linear", 64, 64, 0.5, 0.177, 0.125)


def test_step0_evidence_reads_the_probe_input_norms_and_both_ratio_forms() -> None:
    s = ModelStructure(layers=tuple(_layer(f"l{i}", f"l{i}.weight") for i in range(4)),
                       in_norm={f"l{i}": 0.5 ** i for i in range(4)},
                       out_rms=(1.0, 2.0, 4.0, 8.0), stream_rms=(1.0, 3.0, 9.0))
    grads = {f"l{i}.weight": 1.0 for i in range(4)}
    # l2's weights are zero: left out of the norm and of the ratios
    weights = {"l0.weight": (8.0, 64), "l1.weight": (6.0, 36), "l2.weight": (0.0, 64)}
    ev = step0_evidence(s, grads, weights, 0.1, adaptive=True)  # 4 layers: enough by default
    assert (ev.layers, ev.blocks) == (4, 3)
    # gradient over input norm, output -> input: 8, 4, 2, 1
    assert ev.growth_back == pytest.approx(0.5)
    assert ev.growth_fwd == pytest.approx(2.0)
    assert ev.growth_stream == pytest.approx(3.0)
    assert ev.init_worst == InitScale("l0.weight", 0.5, 0.177, 64)
    assert (ev.weight_norm, ev.numel) == (10.0, 100)
    assert ev.sgd is not None
    assert ev.adaptive is not None
    # SGD: the LR times the gradient norm, sqrt(2) over the norm 10 of l0 and l1
    assert ev.sgd.total == pytest.approx(0.1 * math.sqrt(2) / 10)
    assert ev.sgd.worst == "l1.weight"
    assert ev.sgd.worst_ratio == pytest.approx(0.1 / 6)
    # adaptive: each coordinate moves by the LR, 0.1 * sqrt(100) / 10
    assert ev.adaptive.total == pytest.approx(0.1)
    assert ev.adaptive.worst == "l1.weight"
    assert ev.adaptive.worst_ratio == pytest.approx(0.1)
    assert ev.lr0 == 0.1
    assert ev.adaptive_optimizer is True


def test_step0_evidence_without_input_norms_reads_the_bias_gradients() -> None:
    # the root layer's bias is "bias"; an input norm of 0 is not divided by
    s = ModelStructure(layers=(_layer("", "weight"), _layer("b", "b.weight"),
                               _layer("c", "c.weight"), _layer("d", "d.weight")),
                       in_norm={"b": 0.0})
    grads = {"weight": 5.0, "bias": 1.0, "b.bias": 2.0, "c.bias": 4.0, "d.bias": 8.0}
    ev = step0_evidence(s, grads, {}, None, adaptive=False)
    assert ev.growth_back == pytest.approx(0.5)  # 8, 4, 2, 1 from output to input
    assert (ev.growth_fwd, ev.growth_stream) == (None, None)


def test_step0_evidence_needs_min_layers_for_a_profile_and_3_blocks_for_the_stream() -> None:
    s = ModelStructure(layers=tuple(_layer(f"l{i}", f"l{i}.weight") for i in range(4)),
                       out_rms=(1.0, 2.0, 4.0, 8.0), stream_rms=(1.0, 3.0))
    grads = {f"l{i}.weight": 2.0 ** i for i in range(4)}
    ev = step0_evidence(s, grads, {}, None, adaptive=False, min_layers=5)
    assert (ev.growth_back, ev.growth_fwd, ev.growth_stream, ev.blocks) == (None, None, None, 2)
    ev = step0_evidence(s, grads, {}, None, adaptive=False, min_layers=4)
    assert ev.growth_back == pytest.approx(0.5)
    assert ev.growth_fwd == pytest.approx(2.0)


def test_step0_evidence_of_nothing() -> None:
    # no layer, and no weight that counts: no init, no ratios, no LR at step 0
    ev = step0_evidence(ModelStructure(), {"w": 1.0}, {"w": (0.0, 4)}, 0.1, adaptive=False)
    assert ev == Step0Evidence()
    # no finite gradient: no ratios either
    ev = step0_evidence(ModelStructure(), {"w": NAN}, {"w": (1.0, 4)}, 0.1, adaptive=False)
    assert ev == Step0Evidence(weight_norm=1.0, numel=4)
