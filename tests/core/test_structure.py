"""Model inspection by exact values: what ``inspect_model`` records for each kind of module,
``is_adaptive`` by state key and hyper-parameter, ``ModelStructure``'s properties and trunk,
``activation_gain``'s numbers, and what ``ForwardProbe`` reads from one forward pass."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from lightning_gradguard.core.structure import (
    ForwardProbe,
    LayerInfo,
    ModelStructure,
    activation_gain,
    inspect_model,
    is_adaptive,
    is_compiled,
)

# --- is_adaptive ----------------------------------------------------------------------------

SECOND_MOMENTS = ["exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf",
                  "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq_factored", "v", "nu",
                  "hessian", "state2"]
HPARAMS = ["betas", "eps", "beta2", "beta2_decay", "rho", "initial_accumulator_value"]


@pytest.mark.parametrize("key", SECOND_MOMENTS)
def test_is_adaptive_by_second_moment_state(key: str) -> None:
    # the state decides once there is any: its hyper-parameters say otherwise here
    opt = SimpleNamespace(state={0: {"step": 1, key: 0.0}}, param_groups=[{"lr": 0.1}])
    assert is_adaptive(opt) is True
    opt_sgd_state = SimpleNamespace(state={0: {"momentum_buffer": 0.0}},
                                    param_groups=[{"lr": 0.1, key: 1, "betas": (0.9, 0.99)}])
    assert is_adaptive(opt_sgd_state) is False


@pytest.mark.parametrize("key", HPARAMS)
def test_is_adaptive_by_hyper_parameter_before_the_first_step(key: str) -> None:
    opt = SimpleNamespace(state={}, param_groups=[{"lr": 0.1}, {"lr": 0.2, key: 0.9}])
    assert is_adaptive(opt) is True
    assert is_adaptive(SimpleNamespace(state={}, param_groups=[{"lr": 0.1, "momentum": 0.9}])) \
        is False


def test_is_adaptive_odd_optimizers() -> None:
    assert is_adaptive(None) is False
    assert is_adaptive(SimpleNamespace(state={}, param_groups=None)) is False
    # state entries that are not mappings are ignored: the hyper-parameters decide
    opt = SimpleNamespace(state={0: 1.0}, param_groups=[{"eps": 1e-8}])
    assert is_adaptive(opt) is True
    opt2 = SimpleNamespace(state={0: 1.0}, param_groups=[{"lr": 1.0}])
    assert is_adaptive(opt2) is False
    # a state that is not a mapping: the hyper-parameters decide
    assert is_adaptive(SimpleNamespace(state=[{"exp_avg_sq": 0}], param_groups=[{}])) is False
    # param groups that are not mappings are skipped
    assert is_adaptive(SimpleNamespace(state={}, param_groups=[["eps"], {"rho": 0.9}])) is True
    assert is_adaptive(SimpleNamespace(state={}, param_groups=[["eps"]])) is False
    p = [nn.Parameter(torch.ones(1))]
    assert is_adaptive(torch.optim.Adam(p)) is True
    assert is_adaptive(torch.optim.SGD(p, lr=0.1, momentum=0.9)) is False


# --- LayerInfo / ModelStructure -------------------------------------------------------------


def _layer(name: str, std: float = 1.0, he: float = 0.5, xavier: float = 0.25) -> LayerInfo:
    return LayerInfo(name=name, param=f"{name}.weight", kind="Linear", fan_in=8, fan_out=8,
                     std=std, he_std=he, xavier_std=xavier)


def test_init_ratio_over_the_larger_reference() -> None:
    assert _layer("a", std=1.0, he=0.5, xavier=0.25).init_ratio == 2.0
    assert _layer("a", std=1.0, he=0.25, xavier=0.5).init_ratio == 2.0


def test_structure_flags() -> None:
    s = ModelStructure()
    assert (s.has_norm, s.norm_known, s.has_residual) == (False, False, False)
    assert s.residual is None
    assert s.probed_norms is None
    assert s.skips == 0
    assert s.in_norm == {}
    assert s.batch_size == 0
    assert ModelStructure(norm_layers=("n",)).has_norm is True
    assert ModelStructure(norm_layers=("n",)).norm_known is True
    assert ModelStructure(probed_norms=()).has_norm is False
    assert ModelStructure(probed_norms=()).norm_known is True
    assert ModelStructure(probed_norms=("x",)).has_norm is True
    assert ModelStructure(residual=()).has_residual is False
    assert ModelStructure(residual=("b",)).has_residual is True
    assert ModelStructure().in_norm is not ModelStructure().in_norm


def test_trunk_order() -> None:
    a, b, c = _layer("a"), _layer("b"), _layer("c")
    assert ModelStructure(layers=(a, b, c)).trunk() == [a, b, c]
    s = ModelStructure(layers=(a, b, c), forward_order=("c", "x", "a", "c", "a"))
    assert s.trunk() == [c, a]


# --- inspect_model ---------------------------------------------------------------------------


def test_inspect_model_linear_and_conv_exact() -> None:
    net = nn.Sequential(nn.Linear(3, 5), nn.Conv2d(2, 4, kernel_size=(3, 2)))
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(15, dtype=torch.float32).reshape(5, 3))
    s = inspect_model(net)
    lin, conv = s.layers
    assert (lin.name, lin.param, lin.kind, lin.fan_in, lin.fan_out) == ("0", "0.weight",
                                                                        "Linear", 3, 5)
    assert lin.std == pytest.approx(float(torch.arange(15.0, dtype=torch.float64).std()),
                                    rel=1e-12)
    assert lin.he_std == pytest.approx(math.sqrt(2.0 / 3), rel=1e-12)
    assert lin.xavier_std == pytest.approx(math.sqrt(2.0 / 8), rel=1e-12)
    assert (conv.name, conv.kind, conv.fan_in, conv.fan_out) == ("1", "Conv2d", 12, 24)
    assert conv.he_std == pytest.approx(math.sqrt(2.0 / 12), rel=1e-12)
    assert conv.xavier_std == pytest.approx(math.sqrt(2.0 / 36), rel=1e-12)
    assert s.norm_layers == ()
    assert s.activations == ()
    assert s.recurrent == ()
    assert s.residual is None


def test_inspect_model_root_layer_and_skipped_weights() -> None:
    s = inspect_model(nn.Linear(4, 2))
    assert [(x.name, x.param) for x in s.layers] == [("", "weight")]
    # a 1x1 weight (numel 1) is no layer; nor is a 1-D weight
    assert inspect_model(nn.Linear(1, 1)).layers == ()
    conv1 = nn.Conv1d(1, 1, 1)
    assert inspect_model(conv1).layers == ()
    lin = nn.Linear(2, 2)
    lin.weight = None  # type: ignore[assignment]
    assert inspect_model(lin).layers == ()


def test_inspect_model_norms_and_activations_in_order() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4), nn.Tanh(),
                        nn.GroupNorm(2, 4), nn.Dropout(), nn.ReLU(), nn.BatchNorm1d(4),
                        nn.LocalResponseNorm(2), nn.InstanceNorm1d(4))
    s = inspect_model(net)
    assert s.norm_layers == ("2", "4", "7", "8", "9")
    assert [(a.name, a.kind) for a in s.activations] == [("1", "ReLU"), ("3", "Tanh"),
                                                          ("6", "ReLU")]
    relu = s.activations[0]
    assert relu.max_gain == 1.0
    assert s.activations[2].rms_gain == relu.rms_gain


def test_inspect_model_custom_activation_probed_per_instance() -> None:
    class Scale(nn.Module):
        def __init__(self, k: float) -> None:
            super().__init__()
            self.k = k

        def forward(self, x: Tensor) -> Tensor:
            return self.k * x

    s = inspect_model(nn.Sequential(Scale(2.0), Scale(3.0)))
    assert [a.max_gain for a in s.activations] == [2.0, 3.0]
    # rms of a constant derivative k over N(0, 1) on [-4, 4]: k * sqrt(P(|x| <= 4))
    for a, k in zip(s.activations, (2.0, 3.0), strict=True):
        assert a.rms_gain == pytest.approx(k, rel=1e-3)


def test_inspect_model_recurrent() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(3, 4, num_layers=2, nonlinearity="relu")
            self.gru = nn.GRU(3, 2)

    net = Net()
    with torch.no_grad():
        net.rnn.weight_hh_l0.copy_(torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.1])))
        net.rnn.weight_hh_l1.copy_(torch.eye(4) * 0.5)
        # GRU: 3 gate blocks of 2 rows; the largest singular value of any block
        w = torch.zeros(6, 2)
        w[0:2] = torch.eye(2) * 0.5
        w[2:4] = torch.eye(2) * 4.0
        w[4:6] = torch.eye(2) * 1.0
        net.gru.weight_hh_l0.copy_(w)
    s = inspect_model(net)
    got = [(r.module, r.param, r.kind, r.nonlinearity) for r in s.recurrent]
    assert got == [("rnn", "rnn.weight_hh_l0", "RNN", "relu"),
                   ("rnn", "rnn.weight_hh_l1", "RNN", "relu"),
                   ("gru", "gru.weight_hh_l0", "GRU", "gated")]
    assert [r.sigma_max for r in s.recurrent] == pytest.approx([3.0, 0.5, 4.0], rel=1e-9)
    lstm = nn.LSTM(2, 2)
    with torch.no_grad():
        lstm.weight_hh_l0.copy_(torch.cat([torch.eye(2) * k for k in (1.0, 2.0, 7.0, 3.0)]))
    (r,) = inspect_model(lstm).recurrent
    assert (r.module, r.param, r.kind, r.nonlinearity) == ("", "weight_hh_l0", "LSTM", "gated")
    assert r.sigma_max == pytest.approx(7.0, rel=1e-9)
    with torch.no_grad():
        lstm.weight_hh_l0[0, 0] = math.nan
    assert inspect_model(lstm).recurrent[0].sigma_max == math.inf


# --- activation_gain -------------------------------------------------------------------------


def test_activation_gain_exact_values() -> None:
    grid = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)
    pdf = torch.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    step = float(grid[1] - grid[0])
    relu = activation_gain(nn.ReLU())
    assert relu is not None
    # ReLU's derivative is 1 for x > 0, 0 else (torch: 0 at 0)
    expected = math.sqrt(float((pdf * (grid > 0)).sum()) * step)
    assert relu == (pytest.approx(expected, rel=1e-9), 1.0)
    leaky = activation_gain(nn.LeakyReLU(0.5))
    assert leaky is not None
    d2 = torch.where(grid > 0, 1.0, 0.25).double()
    assert leaky[0] == pytest.approx(math.sqrt(float((d2 * pdf).sum()) * step), rel=1e-6)
    assert leaky[1] == 1.0


class _Noisy(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * (1 + 0.1 * torch.rand_like(x))


class _Shape(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:-1]


class _NoGrad(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.detach()


class _Tuple(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (x,)


class _Fails(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("needs 2-D input")


class _Inf(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * math.inf  # an infinite derivative


class _NoCopy(nn.Module):
    def __deepcopy__(self, memo: object) -> None:
        raise TypeError("not copyable")

    def forward(self, x: Tensor) -> Tensor:
        return x


@pytest.mark.parametrize("module", [
    _Noisy(), _Shape(), _NoGrad(), _Tuple(), _Fails(), _Inf(), _NoCopy(), nn.Linear(1, 1),
    nn.PReLU(),  # element-wise, but learnable: a module with parameters is not probed
    nn.Identity(), nn.Dropout(0.0), nn.Softmax(dim=0), nn.Flatten(0),
])
def test_not_activations(module: nn.Module) -> None:
    assert activation_gain(module) is None


def test_activation_gain_leaves_rngs_and_module_alone() -> None:
    torch.manual_seed(3)
    random.seed(3)
    before_torch = torch.get_rng_state()
    before_py = random.getstate()
    calls: list[int] = []
    noisy = _Noisy()
    noisy.register_forward_hook(lambda *a: calls.append(1))
    assert activation_gain(noisy) is None
    assert torch.equal(torch.get_rng_state(), before_torch)
    assert random.getstate() == before_py
    assert calls == []


# --- is_compiled -----------------------------------------------------------------------------


def test_is_compiled_markers() -> None:
    assert is_compiled(nn.Sequential(nn.Linear(2, 2))) is False
    inner = nn.Linear(2, 2)
    inner._orig_mod = nn.Linear(2, 2)  # type: ignore[assignment]
    assert is_compiled(nn.Sequential(nn.ReLU(), inner)) is True
    a = nn.Linear(2, 2)
    a._compiled_call_impl = lambda *x: x  # type: ignore[assignment]
    assert is_compiled(nn.Sequential(a)) is True
    b = nn.Linear(2, 2)
    b._compiler_ctx = object()  # type: ignore[attr-defined]
    assert is_compiled(b) is True

    class OptimizedModule(nn.Module):
        pass

    assert is_compiled(nn.Sequential(OptimizedModule())) is True


def test_probe_of_a_compiled_model_reads_nothing() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    net._compiler_ctx = object()  # type: ignore[attr-defined]
    probe = ForwardProbe(net)
    assert (probe.readable, probe.done) == (False, True)
    net(torch.randn(1, 2))
    s = ModelStructure()
    probe.apply_to(s)
    assert s.residual is None
    assert s.forward_order == ()


# --- ForwardProbe ----------------------------------------------------------------------------


class _DataRes(nn.Module):
    """``x + f(x)`` on the model's data (no autograd node on the input)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


def test_probe_exact_scales_and_data_input_skip() -> None:
    lin = nn.Linear(2, 2, bias=False)
    net = nn.Sequential(_DataRes(), lin)
    with torch.no_grad():
        net[0].f.weight.copy_(torch.eye(2))
        net[0].f.bias.zero_()
        lin.weight.copy_(torch.eye(2) * 3.0)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])
    probe = ForwardProbe(net)
    net(x)
    assert probe.done
    assert probe.readable
    assert probe.residual == ("0",)
    assert probe.skips == 1
    assert probe.norms == ()
    assert probe.batch_size == 3
    assert probe.forward_order == ("0.f", "1")
    # 0.f outputs x (rms^2 = mean of x^2 = 31/6), 1 outputs 3 * 2x
    assert probe.out_rms == pytest.approx((math.sqrt(31 / 6), 6 * math.sqrt(31 / 6)), rel=1e-6)
    assert probe.in_norm == pytest.approx({"0.f": math.sqrt(31.0), "1": 2 * math.sqrt(31.0)},
                                          rel=1e-6)
    s = ModelStructure()
    probe.apply_to(s)
    assert (s.residual, s.skips, s.probed_norms, s.forward_order, s.batch_size) == (
        ("0",), 1, (), ("0.f", "1"), 3)
    assert s.out_rms == probe.out_rms
    assert s.stream_rms == probe.stream_rms
    assert s.in_norm == probe.in_norm
    assert s.in_norm is not probe.in_norm
    assert s.has_residual
    assert s.norm_known
    assert not s.has_norm


def test_probe_removes_its_hooks_after_one_forward() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    probe = ForwardProbe(net)
    assert not probe.seen
    assert not probe.done
    net(torch.randn(4, 2))
    assert probe.done
    assert probe._handles == []
    first = probe.out_rms
    net(torch.randn(4, 2) * 100)
    assert probe.out_rms == first
    assert probe.batch_size == 4
    assert len(net._forward_hooks) == 0
    assert len(net[0]._forward_hooks) == 0


def test_probe_applies_nothing_before_a_forward() -> None:
    probe = ForwardProbe(nn.Linear(2, 2))
    s = ModelStructure()
    probe.apply_to(s)
    assert s == ModelStructure()
    probe.end()
    assert not probe.done
    assert probe._handles == []


def test_probe_finished_by_a_forward_of_a_submodule() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    probe = ForwardProbe(net)
    net[0](torch.ones(5, 2))  # a training_step that calls a submodule only
    assert probe.seen
    assert not probe.done
    s = ModelStructure()
    probe.apply_to(s)
    assert probe.done
    assert s.forward_order == ("0",)
    assert s.batch_size == 5
    assert s.residual == ()


def test_probe_end_reads_what_was_seen() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    probe = ForwardProbe(net)
    net[1](torch.ones(7, 3))
    probe.end()
    assert probe.done
    assert probe.forward_order == ("1",)
    assert probe.batch_size == 7


def test_probe_scalar_and_kwargs_inputs() -> None:
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, *, x: Tensor) -> Tensor:
            return self.lin(x)

    net = KW()
    probe = ForwardProbe(net)
    net(x=torch.ones(6, 2))
    assert probe.done
    assert probe.forward_order == ("lin",)
    assert probe.batch_size == 6
    assert probe.in_norm == pytest.approx({"lin": math.sqrt(12.0)})


def test_probe_ignores_integer_outputs() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 2)
            self.lin = nn.Linear(2, 1)

        def forward(self, idx: Tensor) -> Tensor:
            return self.lin(self.emb(idx)).round().long()

    net = Net()
    probe = ForwardProbe(net)
    net(torch.tensor([1, 2, 3]))
    # the root's integer output is not recorded; the pass still ends at the root
    assert probe.done
    assert probe.forward_order == ("lin",)
    assert probe.batch_size == 3
    assert probe.residual == ()
    assert probe.skips == 0


def test_activation_gain_restores_every_rng_a_module_draws_from() -> None:
    np = pytest.importorskip("numpy")

    class DrawsEverywhere(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            k = 1.0 + random.random() + float(np.random.rand()) + float(torch.rand(()))
            return x * k

    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    np_state = np.random.get_state()
    assert activation_gain(DrawsEverywhere()) is None  # two different answers: stochastic
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0]
    assert (after[1] == np_state[1]).all()
    assert after[2:] == np_state[2:]


def test_activation_probed_with_float32_input_like_a_float32_model() -> None:
    class Float32Only(nn.Module):  # e.g. a fused kernel with a float32 signature
        def forward(self, x: Tensor) -> Tensor:
            if x.dtype != torch.float32:
                raise TypeError(f"expected float32, got {x.dtype}")
            return torch.relu(x)

    relu = activation_gain(nn.ReLU())
    assert relu is not None
    assert activation_gain(Float32Only()) == relu


def test_a_module_that_fails_is_called_once_and_one_that_fails_later_is_no_activation() -> None:
    class FailsFirst(nn.Module):
        calls = 0  # on the class: activation_gain calls a copy

        def forward(self, x: Tensor) -> Tensor:
            type(self).calls += 1
            raise RuntimeError("not an activation")

    assert activation_gain(FailsFirst()) is None
    assert FailsFirst.calls == 1

    class FailsSecond(nn.Module):
        calls = 0

        def forward(self, x: Tensor) -> Tensor:
            type(self).calls += 1
            if type(self).calls == 2:
                raise RuntimeError("state exhausted")
            return torch.relu(x)

    assert activation_gain(FailsSecond()) is None
    assert FailsSecond.calls == 2
