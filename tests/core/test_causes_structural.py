"""core/causes.py: the depth rules, the growth tests and the ratio helpers, pinned to exact values.

``test_causes.py`` walks each rule once; here every branch, threshold edge and text of
:func:`structural_causes`, :func:`depth_causes`, :func:`init_cause`, :func:`activation_cause`,
:func:`recurrent_cause`, :func:`grew`, :func:`growth`, :func:`growth_words`,
:func:`later_ratios`, :func:`update_ratios` and :func:`rank`'s wiring of the thresholds is
checked against hand-made evidence.
"""

from __future__ import annotations

import math

import pytest

from lightning_gradguard.core.causes import (
    Cause,
    DiagnosisThresholds,
    Evidence,
    InitScale,
    Step0Evidence,
    UpdateRatios,
    activation_cause,
    depth_causes,
    grew,
    growth,
    growth_words,
    init_cause,
    later_ratios,
    rank,
    recurrent_cause,
    structural_causes,
    update_ratios,
)
from lightning_gradguard.core.structure import (
    ActivationInfo,
    LayerInfo,
    ModelStructure,
    RecurrentInfo,
)

NAN = math.nan
STEADY = dict(losses=(1.0, 0.9, 0.95, 0.92, NAN), grad_norms=(1.0, 1.1, 0.9, 1.0))
GROWING = Step0Evidence(layers=8, growth_back=1.5)  # x17.1 over 8 layers
GROWING_WORDS = "gradients x1.5 per layer from output to input (x17.1), fitted at step 0"
BIG_INIT = InitScale("l0.weight", 0.5, 0.177, 64)
HE_REMEDY = ("He init for ReLU-family activations: for each nn.Linear/nn.Conv layer m, "
             "nn.init.kaiming_normal_(m.weight, nonlinearity='relu') and nn.init.zeros_(m.bias)")
XAVIER_REMEDY = ("Xavier init for tanh/sigmoid: for each nn.Linear/nn.Conv layer m, "
                 "nn.init.xavier_normal_(m.weight) and nn.init.zeros_(m.bias)")
LINEAR_NORM = "nn.BatchNorm1d after each Linear (nn.LayerNorm for sequences or small batches)"
SKIP_REMEDY = ("add skip connections: wrap each layer (or pair of layers) as "
               "x = x + block(x), the ResNet pattern")


def _layers(n: int, kind: str = "Linear") -> tuple[LayerInfo, ...]:
    return tuple(LayerInfo(f"l{i}", f"l{i}.weight", kind, 64, 64, 0.5, 0.177, 0.125)
                 for i in range(n))


def _plain(kind: str = "Linear", **kw: object) -> ModelStructure:
    """Probed, no norm, no skip."""
    return ModelStructure(layers=_layers(8, kind), probed_norms=(), residual=(), **kw)


# --- structural_causes -----------------------------------------------------------------------
def test_structural_causes_for_a_plain_linear_net_words_both_causes() -> None:
    causes = structural_causes(Evidence(step0=GROWING, structure=_plain()), 12.0)
    assert causes == [
        Cause("no_normalization",
              f"a deep plain network without normalisation layers: {GROWING_WORDS}",
              f"add {LINEAR_NORM}", 12.0),
        Cause("no_residual", f"a deep network without skip connections: {GROWING_WORDS}",
              SKIP_REMEDY, 11.5),
    ]


def test_structural_causes_for_a_plain_conv_net_asks_for_batchnorm2d() -> None:
    causes = structural_causes(Evidence(step0=GROWING, structure=_plain("Conv2d")), 12.0)
    assert causes[0] == Cause(
        "no_normalization", f"a deep plain network without normalisation layers: {GROWING_WORDS}",
        "add nn.BatchNorm2d after each Conv2d", 12.0)
    # one conv layer among linear ones is enough
    mixed = ModelStructure(layers=(*_layers(7), *_layers(1, "Conv1d")), probed_norms=(),
                           residual=())
    assert structural_causes(Evidence(structure=mixed), 12.0)[0].remedy == (
        "add nn.BatchNorm2d after each Conv2d")


def test_structural_causes_for_residual_blocks_without_norm_counts_the_blocks() -> None:
    s = ModelStructure(layers=_layers(8), probed_norms=(), residual=("b0", "b1"), skips=3)
    (cause,) = structural_causes(Evidence(step0=GROWING, structure=s), 11.0)
    assert cause == Cause(
        "no_normalization",
        "residual blocks (3) without normalisation add their branch's variance to the stream "
        f"at every block: {GROWING_WORDS}",
        f"add a normalisation layer in each residual branch ({LINEAR_NORM}), or zero-init "
        "each branch's last layer (nn.init.zeros_(branch[-1].weight)) so every block starts "
        "as the identity",
        11.0)
    conv = ModelStructure(layers=_layers(8, "Conv2d"), probed_norms=(), residual=("b0",))
    (cause,) = structural_causes(Evidence(structure=conv), 11.0)
    assert cause.remedy.startswith("add a normalisation layer in each residual branch "
                                   "(nn.BatchNorm2d after each Conv2d), or zero-init")
    assert cause.evidence == ("residual blocks (1) without normalisation add their branch's "
                              "variance to the stream at every block: no depth profile")


def test_structural_causes_with_norm_but_no_skips_names_only_the_skips_at_full_score() -> None:
    s = ModelStructure(layers=_layers(8), norm_layers=("bn0",), probed_norms=(), residual=())
    assert structural_causes(Evidence(step0=GROWING, structure=s), 12.0) == [Cause(
        "no_residual",
        "a deep network with normalisation but no skip connections (normalised plain nets "
        f"amplify gradients layer after layer): {GROWING_WORDS}",
        SKIP_REMEDY, 12.0)]
    # normalisation seen by the probe counts the same
    probed = ModelStructure(layers=_layers(8), probed_norms=("blk",), residual=())
    assert [c.score for c in structural_causes(Evidence(structure=probed), 12.0)] == [12.0]


def test_structural_causes_names_nothing_that_was_not_looked_for() -> None:
    assert structural_causes(Evidence(structure=ModelStructure(layers=_layers(8))), 12.0) == []
    normed_res = ModelStructure(layers=_layers(8), norm_layers=("bn",), residual=("b0",))
    assert structural_causes(Evidence(structure=normed_res), 12.0) == []


# --- depth_causes ----------------------------------------------------------------------------
def test_depth_causes_scores_the_structure_by_the_growth_factor() -> None:
    plain = Step0Evidence(layers=8, growth_back=1.5, init_median=1.0,
                          init_worst=InitScale("l0.weight", 0.18, 0.177, 64))
    causes = depth_causes(Evidence(step0=plain, structure=_plain()))
    assert [(c.cause, c.score) for c in causes] == [
        ("no_normalization", pytest.approx(10.0 + math.log(1.5))),
        ("no_residual", pytest.approx(9.5 + math.log(1.5)))]


def test_depth_causes_on_an_explosion_without_profile_scores_from_base_4() -> None:
    s0 = Step0Evidence(init_median=2.8, init_worst=BIG_INIT)
    act = ActivationInfo("a", "Amp", rms_gain=1.2, max_gain=2.0)
    ev = Evidence("nonfinite", step0=s0, structure=ModelStructure(layers=_layers(8),
                                                                  activations=(act,)))
    causes = depth_causes(ev)
    assert [(c.cause, c.score) for c in causes] == [
        ("init_too_large", pytest.approx(4.0 + math.log(2.8))),
        ("activation", pytest.approx(4.0 + math.log(math.sqrt(2) * 1.2)))]
    # no explosion (on demand) and no profile: nothing
    assert depth_causes(Evidence(step0=s0, structure=ev.structure)) == []


def test_depth_causes_without_growth_on_a_measured_profile_names_nothing() -> None:
    # a flat profile was measured: the explosion is not blamed on depth, init or not
    flat = Step0Evidence(layers=8, growth_back=1.01, init_median=2.8, init_worst=BIG_INIT)
    assert depth_causes(Evidence("nonfinite", step0=flat, structure=_plain())) == []


def test_depth_causes_passes_its_thresholds_to_every_rule() -> None:
    s0 = Step0Evidence(layers=8, growth_back=1.5, init_median=2.8, init_worst=BIG_INIT)
    act = ActivationInfo("a", "Amp", rms_gain=1.2, max_gain=2.0)
    s = _plain(activations=(act,))
    assert [c.cause for c in depth_causes(Evidence(step0=s0, structure=s))] == [
        "init_too_large", "activation"]
    strict = DiagnosisThresholds(init_ratio=3.0, activation_gain=2.0)
    assert [c.cause for c in depth_causes(Evidence(step0=s0, structure=s), strict)] == [
        "no_normalization", "no_residual"]
    # a growth threshold above the measured factor: no growth, nothing
    assert depth_causes(Evidence(step0=s0, structure=s), DiagnosisThresholds(growth=2.0)) == []


# --- init_cause ------------------------------------------------------------------------------
def test_init_cause_for_relu_nets_suggests_he_init() -> None:
    s0 = Step0Evidence(layers=8, init_median=2.8, init_worst=BIG_INIT)
    relu = ActivationInfo("r", "ReLU", 0.71, 1.0)
    for s in (ModelStructure(layers=_layers(8)),
              ModelStructure(layers=_layers(8), activations=(relu,))):
        (cause,) = init_cause(Evidence(step0=s0, structure=s))
        assert cause == Cause(
            "init_too_large",
            "the weights are 2.8x the He std for their fan-in (median over 8 layers; "
            "l0.weight: std 0.5 vs 0.177 for fan_in 64); no depth profile",
            HE_REMEDY, pytest.approx(20.0 + math.log(2.8)))


@pytest.mark.parametrize("kind", ["Tanh", "Sigmoid", "Hardtanh", "Softsign"])
def test_init_cause_for_saturating_activations_suggests_xavier_init(kind: str) -> None:
    s0 = Step0Evidence(layers=8, init_median=2.8, init_worst=BIG_INIT)
    acts = (ActivationInfo("r", "ReLU", 0.71, 1.0), ActivationInfo("t", kind, 0.6, 1.0))
    (cause,) = init_cause(Evidence(step0=s0, structure=ModelStructure(activations=acts)))
    assert cause.remedy == XAVIER_REMEDY


def test_init_cause_counts_from_the_threshold_itself() -> None:
    at = Step0Evidence(init_median=2.0, init_worst=BIG_INIT)
    (cause,) = init_cause(Evidence(step0=at), base=4.0)
    assert cause.score == pytest.approx(4.0 + math.log(2.0))
    assert init_cause(Evidence(step0=Step0Evidence(init_median=1.99, init_worst=BIG_INIT))) == []


# --- activation_cause ------------------------------------------------------------------------
def test_activation_cause_words_and_scores_the_steepest_activation() -> None:
    act = ActivationInfo("a", "Amp", rms_gain=1.2, max_gain=2.0)
    (cause,) = activation_cause(Evidence(step0=GROWING, structure=ModelStructure(
        activations=(act,))))
    assert cause == Cause(
        "activation",
        "Amp amplifies gradients: derivative up to 2, RMS 1.2 on N(0,1) inputs, i.e. x1.7 per "
        f"layer with He-scaled weights (1 of them); {GROWING_WORDS}",
        "replace Amp with nn.ReLU() or nn.GELU() (derivative <= 1.1), or divide its output "
        "by 2",
        pytest.approx(20.0 + math.log(math.sqrt(2) * 1.2)))


def test_activation_cause_threshold_is_sqrt2_times_the_rms_gain_inclusive() -> None:
    # sqrt(2) * 0.85 = 1.20 < 1.3: not amplifying (sqrt(3) * 0.85 would be)
    mild = ActivationInfo("m", "Mild", rms_gain=0.85, max_gain=1.2)
    assert activation_cause(Evidence(structure=ModelStructure(activations=(mild,)))) == []
    edge = ActivationInfo("e", "Edge", rms_gain=1.0, max_gain=1.5)
    t = DiagnosisThresholds(activation_gain=math.sqrt(2))
    (cause,) = activation_cause(Evidence(structure=ModelStructure(activations=(edge,))), t)
    assert cause.cause == "activation"


# --- recurrent_cause -------------------------------------------------------------------------
def test_recurrent_cause_for_an_lstm_names_its_weight_and_four_gate_blocks() -> None:
    rec = (RecurrentInfo("enc.rnn", "enc.rnn.weight_hh_l0", "LSTM", 2.0, "gated"),)
    assert recurrent_cause(Evidence(structure=ModelStructure(recurrent=rec))) == [Cause(
        "recurrent_weights",
        "largest singular value of enc.rnn.weight_hh_l0 is 2 (> 1): a gradient through T time "
        "steps can grow like 2^T",
        "orthogonal init of the recurrent weights, per gate block: for w in "
        "enc.rnn.weight_hh_l0.data.chunk(4): nn.init.orthogonal_(w)",
        pytest.approx(15.0 + math.log(2.0)))]


def test_recurrent_cause_for_a_gru_takes_three_gate_blocks() -> None:
    rec = (RecurrentInfo("gru", "gru.weight_hh_l1", "GRU", 1.5, "gated"),)
    (cause,) = recurrent_cause(Evidence(structure=ModelStructure(recurrent=rec)))
    assert cause.remedy == ("orthogonal init of the recurrent weights, per gate block: for w in "
                            "gru.weight_hh_l1.data.chunk(3): nn.init.orthogonal_(w)")
    assert cause.score == pytest.approx(15.0 + math.log(1.5))  # from the threshold itself


def test_recurrent_cause_for_a_plain_rnn_at_the_root_suggests_a_gated_cell() -> None:
    rec = (RecurrentInfo("", "weight_hh_l0", "RNN", 3.0, "tanh"),)
    (cause,) = recurrent_cause(Evidence(structure=ModelStructure(recurrent=rec)))
    assert cause.remedy == ("orthogonal init of the recurrent weights, per gate block: for w in "
                            "rnn.weight_hh_l0.data.chunk(1): nn.init.orthogonal_(w); or a gated "
                            "cell (nn.LSTM / nn.GRU) instead of nn.RNN")


# --- grew ------------------------------------------------------------------------------------
def _grew(norms: tuple[float, ...], **grads: float) -> bool:
    return grew(Evidence("spike", grad_norms=norms, grads=grads))


def test_grew_adds_this_steps_norm_from_its_gradients() -> None:
    # 12 = 10x the median of the history: only from this step's gradients
    assert _grew((1.0, 1.1, 0.9), a=12.0) is True
    assert _grew((1.0, 1.1, 0.9), a=1.0) is False
    # a = 3, b = 4: the step's total norm is 5
    assert _grew((0.4, 0.5, 0.45), a=3.0, b=4.0) is True
    assert _grew((0.6, 0.5, 0.55), a=3.0, b=4.0) is False
    # a non-finite gradient: the history alone
    assert _grew((1.0, 1.1, 0.9), a=12.0, b=NAN) is False


def test_grew_does_not_count_this_step_twice_when_the_history_holds_it() -> None:
    # the last norm already is this step's (up to 1e-6): 3 rises in a row to x3.5
    assert _grew((1.0, 1.5, 2.5, 3.5), a=3.5) is True
    assert _grew((1.0, 1.5, 2.5, 3.5), a=3.5 * (1 + 1e-7)) is True
    # a different norm is a new step: 3.5 again is no rise
    assert _grew((1.0, 1.5, 2.5, 3.5), a=3.5 * (1 + 1e-5)) is False


def test_grew_compares_with_10x_the_median_of_every_step_before() -> None:
    assert _grew((1.0, 1.0, 1.0, 10.0)) is True    # exactly 10x
    assert _grew((1.0, 1.0, 1.0, 9.99)) is False
    assert _grew((1.0, 1.0, 1.0, 10.5)) is True
    assert _grew((2.0, 2.0, 2.0, 15.0)) is False   # 7.5x
    # the median is of all the steps before: 2, not the first (0.5) nor the first two (1.25)
    assert _grew((0.5, 2.0, 2.0, 15.0)) is False


def test_grew_needs_the_last_three_rises_strict_and_to_3x() -> None:
    assert _grew((5.0, 1.0, 1.5, 2.5, 3.5)) is True   # the last 4 only
    assert _grew((1.0, 1.0, 2.0, 3.5)) is False       # a flat step is no rise
    assert _grew((1.0, 1.5, 2.5, 3.0)) is True        # exactly x3
    assert _grew((2.0, 3.0, 4.0, 5.0)) is False       # x2.5


# --- growth ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["growth_back", "growth_fwd"])
def test_growth_of_a_layer_profile_spans_layers_minus_one(field: str) -> None:
    # 1.3 ** 7 = 6.3 < 10 (1.3 ** 9 would count); 1.4 ** 7 = 10.5 >= 10 (1.4 ** 6 would not)
    assert growth(Evidence(step0=Step0Evidence(layers=8, **{field: 1.3}))) == (1.3, False)
    assert growth(Evidence(step0=Step0Evidence(layers=8, **{field: 1.4}))) == (1.4, True)
    # a power, not a product: 1.2 * 9 = 10.8 but 1.2 ** 9 = 5.2
    assert growth(Evidence(step0=Step0Evidence(layers=10, **{field: 1.2}))) == (1.2, False)


def test_growth_of_the_stream_spans_blocks_minus_one() -> None:
    # 1.3 ** 3 = 2.2 < 3 (1.3 ** 5 would count)
    assert growth(Evidence(step0=Step0Evidence(blocks=4, growth_stream=1.3))) == (1.3, False)
    assert growth(Evidence(step0=Step0Evidence(blocks=4, growth_stream=1.5))) == (1.5, True)


def test_growth_thresholds_are_inclusive() -> None:
    # 1.08 ** 39 = 20: the factor itself at the threshold
    assert growth(Evidence(step0=Step0Evidence(layers=40, growth_back=1.08))) == (1.08, True)
    # 2 ** 4 = 16 exactly at the amplification needed
    t = DiagnosisThresholds(amplification=16.0)
    assert growth(Evidence(step0=Step0Evidence(layers=5, growth_back=2.0)), t) == (2.0, True)


def test_growth_reports_the_factor_of_the_largest_amplification() -> None:
    # the stream's 1.6 is the larger factor, but over 2 blocks it amplifies x1.6 only
    s0 = Step0Evidence(layers=8, blocks=2, growth_back=1.5, growth_stream=1.6)
    assert growth(Evidence(step0=s0)) == (1.5, True)
    # x1.2 over 4 layers (x1.73) beats the unmeasured profiles (x1)
    assert growth(Evidence(step0=Step0Evidence(layers=4, growth_back=1.2))) == (1.2, False)
    # a shrinking profile: the unmeasured ones (factor 1, x1) amplify most
    assert growth(Evidence(step0=Step0Evidence(layers=8, growth_back=0.5))) == (1.0, False)


# --- growth_words ----------------------------------------------------------------------------
def test_growth_words_joins_every_profile_measured() -> None:
    s0 = Step0Evidence(layers=8, blocks=4, growth_back=1.5, growth_fwd=1.2, growth_stream=1.5)
    assert growth_words(s0) == (
        "activations grow x1.2 per layer forward (x3.58 over 8 weight layers), gradients x1.5 "
        "per layer from output to input (x17.1), the residual stream grows x1.5 per block "
        "(x3.38 over 4 blocks), fitted at step 0")
    assert growth_words(Step0Evidence(blocks=6, growth_stream=2.0)) == (
        "the residual stream grows x2 per block (x32 over 6 blocks), fitted at step 0")
    assert growth_words(Step0Evidence(layers=5, growth_fwd=2.0)) == (
        "activations grow x2 per layer forward (x16 over 5 weight layers), fitted at step 0")
    assert growth_words(Step0Evidence()) == "no depth profile"


# --- later_ratios ----------------------------------------------------------------------------
def test_later_ratios_sgd_form_at_each_steps_lr() -> None:
    ev = Evidence(grad_norms=(1.0, 2.0, NAN, 4.0), lrs=(0.1, 0.2, 0.1, NAN),
                  step0=Step0Evidence(weight_norm=10.0, numel=100))
    assert later_ratios(ev) == pytest.approx([0.01, 0.04])
    # the shorter of the two histories
    short = Evidence(grad_norms=(1.0, 2.0, 3.0), lrs=(0.1, 0.2),
                     step0=Step0Evidence(weight_norm=10.0, numel=100))
    assert later_ratios(short) == pytest.approx([0.01, 0.04])
    assert later_ratios(Evidence(grad_norms=(1.0,), lrs=(0.1,))) == []  # no weights at step 0


def test_later_ratios_adaptive_form_uses_the_number_of_weights() -> None:
    # lr * sqrt(100) / 10 = lr; a non-finite gradient norm still skips the step
    ev = Evidence(grad_norms=(1.0, NAN, 4.0), lrs=(0.1, 0.2, 0.3), adaptive=True,
                  step0=Step0Evidence(weight_norm=10.0, numel=100))
    assert later_ratios(ev) == pytest.approx([0.1, 0.3])


# --- update_ratios ---------------------------------------------------------------------------
def test_update_ratios_adaptive_form_over_the_tensors_that_count() -> None:
    grads = {"a": 2.0, "b": 4.0, "c": 1.0}
    weights = {"a": (4.0, 16), "b": (8.0, 100), "c": (1.0, 4)}
    # total: 0.1 * sqrt(120) / sqrt(81); per tensor: a 0.1, b 0.125, c 0.2
    r = update_ratios(grads, weights, 0.1, True)
    assert r is not None
    assert (r.total, r.worst, r.worst_ratio) == (
        pytest.approx(0.1 * math.sqrt(120) / 9.0), "c", pytest.approx(0.2))
    sgd = update_ratios(grads, weights, 0.1, False)
    assert sgd is not None
    assert (sgd.total, sgd.worst, sgd.worst_ratio) == (
        pytest.approx(0.1 * math.sqrt(21) / 9.0), "c", pytest.approx(0.1))


def test_update_ratios_ties_and_zero_gradients_keep_the_first_or_none() -> None:
    r = update_ratios({"a": 1.0, "b": 2.0}, {"a": (4.0, 16), "b": (8.0, 64)}, 0.1, False)
    assert r == UpdateRatios(pytest.approx(0.025), "a", pytest.approx(0.025))
    assert update_ratios({"w": 0.0}, {"w": (4.0, 16)}, 0.1, False) == UpdateRatios(0.0, "", 0.0)


def test_update_ratios_counts_weights_with_an_rms_of_at_least_1e_minus_4() -> None:
    one = {"w": 2.0}
    assert update_ratios(one, {"w": (1.0, 0)}, 0.1, False) is None          # no element
    assert update_ratios(one, {"w": (4.0, 1)}, 0.1, False) == UpdateRatios(0.05, "w", 0.05)
    assert update_ratios(one, {"w": (1e-4, 1)}, 0.1, False) == UpdateRatios(
        pytest.approx(2000.0), "w", pytest.approx(2000.0))                  # RMS exactly 1e-4
    assert update_ratios(one, {"w": (0.005, 10_000)}, 0.1, False) is None   # RMS 5e-5
    assert update_ratios(one, {"w": (math.inf, 4)}, 0.1, False) is None


# --- rank: the thresholds reach every rule ---------------------------------------------------
def test_rank_on_a_halt_reads_the_batch() -> None:
    ev = Evidence("halt", batch_bad=(("x", 1, 4),), loss=NAN, **STEADY)
    assert [c.cause for c in rank(ev)] == ["data_nonfinite"]


def test_rank_passes_its_thresholds_to_every_rule() -> None:
    s = _plain(recurrent=(RecurrentInfo("rnn", "rnn.weight_hh_l0", "GRU", 2.0, "gated"),))
    s0 = Step0Evidence(layers=8, growth_back=1.5, sgd=UpdateRatios(0.4, "w", 0.5), lr0=0.1,
                       weight_norm=10.0, numel=100)
    ev = Evidence("nonfinite", step0=s0, structure=s, lr=0.1, loss=NAN, **STEADY)
    assert [c.cause for c in rank(ev)] == [
        "recurrent_weights", "no_normalization", "no_residual", "lr_too_high"]
    # no growth, a recurrent matrix under the bar, a step under the ratio: the loss alone
    t = DiagnosisThresholds(growth=2.0, recurrent_sigma=2.5, update_ratio=0.6)
    assert [c.cause for c in rank(ev, t)] == ["loss_nonfinite"]
