"""The forward probe by exact results: the autograd-graph reader (``_Graph``, ``_shortcut``,
``_branch_layers``, ``_skip_at``, ``_is_norm``, ``read_graph``) on hand-made graph nodes and on
real torch graphs, the small helpers (``_first_tensor``, ``_skip_with_data_input``,
``_reaches``, ``sequence_nr``, ``_compiling``) and what ``ForwardProbe`` records and names."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gradguard.core import probe as probe_mod
from lightning_gradguard.core.probe import (
    ForwardProbe,
    _branch_layers,
    _compiling,
    _first_tensor,
    _Graph,
    _is_norm,
    _reaches,
    _shortcut,
    _skip_at,
    _skip_with_data_input,
    read_graph,
    sequence_nr,
)
from lightning_gradguard.core.structure import ModelStructure

# --- hand-made graph nodes -----------------------------------------------------------------------

_KINDS: dict[str, type] = {}


def node(kind: str, *kids: Any) -> Any:
    """A stand-in autograd node of class ``kind`` whose ``next_functions`` are ``kids``."""
    cls = _KINDS.get(kind)
    if cls is None:
        cls = _KINDS[kind] = type(kind, (), {})
    n = cls()
    n.next_functions = tuple((k, 0) for k in kids)
    return n


def acc(variable: Any) -> Any:
    """An ``AccumulateGrad`` stand-in for ``variable``."""
    n = node("AccumulateGrad")
    n.variable = variable
    return n


def weight(*kids: Any) -> Any:
    """A matrix product of ``kids`` with a 2-d parameter (a weight layer)."""
    return node("MmBackward0", *kids, acc(nn.Parameter(torch.zeros(2, 2))))


class _Bare:
    """A node without ``next_functions`` at all."""


# --- _Graph: reading the nodes -------------------------------------------------------------------


def test_graph_reads_every_node_once_and_dedups_children() -> None:
    a, b = node("A"), node("B")
    c = node("C", b)
    root = node("R", a, None, b, c, a)
    g = _Graph([None, root], set(), 100)
    # the stack pops c (reaching b), then b again (already read), then a
    assert list(g.nodes.values()) == [root, c, b, a]
    assert g.children == {id(root): [a, b, c], id(c): [b], id(b): [], id(a): []}
    assert g.complete is True
    assert g.kids(root) is g.children[id(root)]


def test_graph_budget_marks_the_read_incomplete() -> None:
    chain = node("N0")
    for i in range(1, 4):
        chain = node(f"N{i}", chain)
    full = _Graph([chain], set(), 4)
    assert (len(full.nodes), full.complete) == (4, True)
    cut = _Graph([chain], set(), 2)
    assert (len(cut.nodes), cut.complete) == (2, False)


def test_graph_reads_a_node_without_next_functions() -> None:
    bare = _Bare()
    g = _Graph([bare], set(), 10)
    assert g.children == {id(bare): []}
    assert g.kids(bare) == []


def test_graph_kids_below_the_budget_read_on_demand() -> None:
    a, b = node("A"), node("B")
    mid = node("M", a, None, a, b)
    root = node("R", mid)
    g = _Graph([root], set(), 1)
    assert id(mid) not in g.children
    assert g.kids(mid) == [a, b]
    assert g.children[id(mid)] == [a, b]
    assert g.nodes[id(mid)] is mid
    bare = _Bare()
    assert g.kids(bare) == []
    assert g.nodes[id(bare)] is bare
    assert None not in g.nodes.values()


def test_graph_kids_are_read_once() -> None:
    a, b = node("A"), node("B")
    root = node("R", a)
    g = _Graph([root], set(), 10)
    root.next_functions = ((b, 0),)
    assert g.kids(root) == [a]


# --- _Graph.param_only / is_weight ---------------------------------------------------------------


def test_param_only_by_kind_of_leaf() -> None:
    # every node is held by a name: the memo is keyed by id
    plain = torch.zeros(3, 2, requires_grad=True)
    plain_leaf, cube_leaf = acc(plain), acc(nn.Parameter(torch.zeros(2, 2, 2)))
    g = _Graph([], {id(plain)}, 10)
    assert g.param_only(plain_leaf) == (True, 2)
    assert g.param_only(cube_leaf) == (True, 3)
    no_var, bare, leaf = node("AccumulateGrad"), _Bare(), node("LeafBackward")
    lookup = node("EmbeddingBackward0", acc(nn.Parameter(torch.zeros(2, 2))))
    p = acc(nn.Parameter(torch.zeros(2, 2)))
    with_const, params_only = node("MulBackward0", p, None), node("MulBackward0", p)
    other = _Graph([], set(), 10)
    assert other.param_only(plain_leaf) == (False, 0)
    assert other.param_only(no_var) == (False, 0)  # no variable
    assert other.param_only(lookup) == (False, 0)
    assert other.param_only(leaf) == (False, 0)  # no children
    assert other.param_only(bare) == (False, 0)
    # a constant input (no node) makes the op data
    assert other.param_only(with_const) == (False, 2)
    assert other.param_only(params_only) == (True, 2)


def test_param_only_looks_three_nodes_down() -> None:
    p = acc(nn.Parameter(torch.zeros(4, 4)))
    three = node("X1", node("X2", node("X3", p)))
    two, top = node("X0", node("X1", node("X2", p))), node("X0", three)
    g = _Graph([], set(), 10)
    assert g.param_only(two) == (True, 2)
    assert g.param_only(top) == (False, 0)
    assert g.param_only(three) == (True, 2)
    assert g.param_only(top, depth=4) == (True, 2)


def test_is_weight_and_data() -> None:
    x = node("X")
    g = _Graph([], set(), 10)
    w = weight(x)
    assert g.is_weight(w) is True
    assert g.data(w) == [x]
    bias = node("AddBackward0", x, acc(nn.Parameter(torch.zeros(2))))
    assert g.is_weight(bias) is False


def test_below_counts_hops_from_the_node_itself() -> None:
    x3 = node("X3")
    x2 = node("X2", x3)
    x1 = node("X1", x2)
    top = node("T", x1, x2)
    g = _Graph([top], set(), 10)
    assert g.below(top, 0) == {id(top)}
    assert g.below(top, 1) == {id(top), id(x1), id(x2)}
    assert g.below(top, 2) == {id(top), id(x1), id(x2), id(x3)}


# --- _shortcut -----------------------------------------------------------------------------------


def test_shortcut_walks_at_most_five_nodes() -> None:
    chain = [node("C9")]
    for i in range(8, -1, -1):
        chain.insert(0, node(f"C{i}", chain[0]))
    g = _Graph([chain[0]], set(), 100)
    assert _shortcut(g, chain[0]) == [(n, 0) for n in chain[:5]]


def test_shortcut_counts_one_weight_layer_and_stops_at_the_second() -> None:
    x = node("X")
    w1 = weight(x)
    g = _Graph([w1], set(), 100)
    assert _shortcut(g, w1) == [(w1, 0), (x, 1)]
    w2b = weight(node("Y"))
    w1b = weight(w2b)
    g2 = _Graph([w1b], set(), 100)
    assert _shortcut(g2, w1b) == [(w1b, 0), (w2b, 1)]


def test_shortcut_stops_at_a_fork() -> None:
    a, b = node("A"), node("B")
    top = node("T", a, b)
    g = _Graph([top], set(), 100)
    assert _shortcut(g, top) == [(top, 0)]


# --- _branch_layers ------------------------------------------------------------------------------


def test_branch_layers_counts_weight_layers_to_each_target() -> None:
    t1, t2 = node("T1"), node("T2")
    c = node("C", t2)
    w = weight(c)
    b = node("B", t1, w)
    g = _Graph([b], set(), 100)
    found = _branch_layers(g, b, {id(t1): 0, id(t2): 0})
    assert found == {id(t1): 0, id(t2): 1}
    assert _branch_layers(g, c, {id(t2): 0}) == {id(t2): 0}
    assert _branch_layers(g, b, {id(b): 0}) == {id(b): 0}


def test_branch_layers_does_not_walk_below_a_target() -> None:
    t2 = node("T2")
    t1 = node("T1", t2)
    b = node("B", t1)
    g = _Graph([b], set(), 100)
    assert _branch_layers(g, b, {id(t1): 0, id(t2): 0}) == {id(t1): 0}


def test_branch_layers_two_weight_layers() -> None:
    t = node("T")
    b = weight(weight(t))
    g = _Graph([b], set(), 100)
    assert _branch_layers(g, b, {id(t): 0}) == {id(t): 2}


def _diamond() -> tuple[Any, Any]:
    """b -> (x, y) two weight layers -> z (weight) -> t: t is the 5th node visited."""
    t = node("T")
    z = weight(t)
    x, y = weight(z), weight(z)
    return node("B", x, y), t


@pytest.mark.parametrize(("budget", "found"), [(5, True), (4, False)])
def test_branch_layers_node_budget(monkeypatch: pytest.MonkeyPatch, budget: int,
                                   found: bool) -> None:
    b, t = _diamond()
    g = _Graph([b], set(), 100)
    monkeypatch.setattr(probe_mod, "_BRANCH_BUDGET", budget)
    assert _branch_layers(g, b, {id(t): 0}) == ({id(t): 2} if found else {})


@pytest.mark.parametrize(("budget", "found"), [(4, True), (3, False)])
def test_branch_layers_node_budget_on_a_chain(monkeypatch: pytest.MonkeyPatch, budget: int,
                                              found: bool) -> None:
    t = node("T")
    b = node("B", node("C1", node("C2", t)))
    g = _Graph([b], set(), 100)
    monkeypatch.setattr(probe_mod, "_BRANCH_BUDGET", budget)
    assert _branch_layers(g, b, {id(t): 0}) == ({id(t): 0} if found else {})


# --- _skip_at / read_graph on real graphs --------------------------------------------------------


def _neg(t: Tensor, times: int) -> Tensor:
    """``t`` negated ``times`` times (one ``NegBackward`` node each)."""
    for _ in range(times):
        t = torch.neg(t)
    return t


def _lin(n_in: int = 4, n_out: int = 4) -> nn.Linear:
    return nn.Linear(n_in, n_out)


def test_skip_with_the_branch_as_first_operand() -> None:
    torch.manual_seed(0)
    a, f = _lin(), _lin()
    x = a(torch.randn(2, 4))
    y = f(x) + x
    g = _Graph([y.grad_fn], set(), 1000)
    skip = _skip_at(g, y.grad_fn)
    assert skip is not None
    assert skip.add is y.grad_fn
    assert skip.stream is x.grad_fn
    assert (skip.branch_layers, skip.shortcut_layers) == (1, 0)


def test_skip_projection_shortcut_over_two_layers() -> None:
    torch.manual_seed(0)
    a, p, f1, f2 = _lin(), _lin(), _lin(), _lin()
    x = a(torch.randn(2, 4))
    y = p(x) + f2(torch.relu(f1(x)))
    facts = read_graph([y.grad_fn])
    assert len(facts.skips) == 1
    skip = facts.skips[0]
    assert skip.stream is x.grad_fn
    assert (skip.branch_layers, skip.shortcut_layers) == (2, 1)


def test_two_parallel_layers_added_are_no_skip() -> None:
    torch.manual_seed(0)
    a, p, f = _lin(), _lin(), _lin()
    x = a(torch.randn(2, 4))
    y = p(x) + f(x)
    assert read_graph([y.grad_fn]).skips == []


def test_read_graph_skips_in_executed_order() -> None:
    torch.manual_seed(0)
    x = _lin()(torch.randn(2, 4))
    adds = []
    for depth in (1, 3, 2):
        h = x
        for _ in range(depth):
            h = torch.relu(_lin()(h))
        x = x + h
        adds.append(x.grad_fn)
    facts = read_graph([x.grad_fn])
    assert [s.add for s in facts.skips] == adds
    assert [s.branch_layers for s in facts.skips] == [1, 3, 2]
    assert facts.norms == []
    assert facts.opaque is False
    assert facts.complete is True


def test_read_graph_plain_tensor_params_are_weights() -> None:
    torch.manual_seed(0)
    w0 = torch.randn(4, 4, requires_grad=True)
    w1 = torch.randn(4, 4, requires_grad=True)
    h = torch.randn(2, 4) @ w0
    y = h + h @ w1
    with_params = read_graph([y.grad_fn], [w0, w1])
    assert [(s.stream, s.branch_layers) for s in with_params.skips] == [(h.grad_fn, 1)]
    assert read_graph([y.grad_fn]).skips == []


def test_read_graph_counts_nodes_and_budget() -> None:
    chain = node("N0")
    for i in range(1, 6):
        chain = node(f"N{i}", chain)
    facts = read_graph([chain])
    assert (facts.nodes, facts.complete) == (6, True)
    cut = read_graph([chain], budget=4)
    assert (cut.nodes, cut.complete) == (4, False)


def test_read_graph_compiled_region_is_opaque() -> None:
    facts = read_graph([node("CompiledFunctionBackward", node("X"))])
    assert facts.opaque is True
    assert facts.skips == []


# --- _is_norm ------------------------------------------------------------------------------------


def _norm_count(y: Tensor) -> int:
    return len(read_graph([y.grad_fn]).norms)


def _far_gain(x: Tensor) -> Tensor:
    """1 / RMS(x), the mean four nodes below the gain's output."""
    return _neg((x.pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt(), 2)


def test_norm_hand_written_forms() -> None:
    torch.manual_seed(0)
    x = _lin()(torch.randn(3, 4))
    assert _norm_count(x / x.norm(dim=-1, keepdim=True)) == 1
    assert _norm_count(x * x.pow(2).sum(-1, keepdim=True).rsqrt()) == 1  # sum of squares
    assert _norm_count(x * _far_gain(x)) == 1
    assert _norm_count(_far_gain(x) * x) == 1
    assert _norm_count(F.layer_norm(x, (4,))) == 1


def test_norm_softmax_and_gates_are_not_norms() -> None:
    torch.manual_seed(0)
    x = _lin()(torch.randn(3, 4))
    e = x.exp()
    assert _norm_count(e / e.sum(-1, keepdim=True)) == 0
    assert _norm_count(x * torch.sigmoid(_lin()(x))) == 0


def test_norm_of_a_sum_of_two_streams_with_the_gain_first() -> None:
    torch.manual_seed(0)
    inp = torch.randn(3, 4)
    s = _lin()(inp) + _lin()(inp)
    y = (s.pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt() * s
    g = _Graph([y.grad_fn], set(), 1000)
    assert _is_norm(g, y.grad_fn) is True


def test_norm_gain_first_on_a_weight_output() -> None:
    torch.manual_seed(0)
    x = _lin()(torch.randn(3, 4))
    y = x.pow(2).mean(-1, keepdim=True).rsqrt() * x
    g = _Graph([y.grad_fn], set(), 1000)
    assert _is_norm(g, y.grad_fn) is True


def test_norm_statistic_of_another_stream_is_no_norm() -> None:
    torch.manual_seed(0)
    x = _lin()(torch.randn(3, 4))
    y = _lin()(torch.randn(3, 4))
    assert _norm_count(y * x.pow(2).mean(-1, keepdim=True).rsqrt()) == 0


def test_norm_shared_node_must_be_near_both() -> None:
    torch.manual_seed(0)
    x = _lin()(torch.randn(3, 4))
    # the shared x is 4 nodes below the mean: too far
    far_stat = _neg(x, 3).mean(-1, keepdim=True).rsqrt()
    assert _norm_count(x * far_stat) == 0
    # the shared x is 3 nodes below the scaled operand: too far
    assert _norm_count(_neg(x, 3) * x.pow(2).mean(-1, keepdim=True).rsqrt()) == 0


def test_is_norm_leaves_the_node_table_to_graph_nodes() -> None:
    torch.manual_seed(0)
    x = _lin()(torch.randn(3, 4))
    cases = [x * torch.sigmoid(_lin()(x)),            # gate through weights
             x * (x + x.exp()).rsqrt(),               # a fork on the way to the statistic
             x * _neg(x.exp(), 6),                    # no statistic within six nodes
             x * x.exp()]                             # stat None once more
    for y in cases:
        g = _Graph([y.grad_fn], set(), 1000)
        before = dict(g.nodes)
        assert _is_norm(g, y.grad_fn) is False
        assert all(not isinstance(n, str) and n is not None for n in g.nodes.values())
        assert set(g.nodes) == set(before)


# --- small helpers -------------------------------------------------------------------------------


def test_first_tensor_searches_two_levels() -> None:
    t, u = torch.ones(1), torch.zeros(1)
    assert _first_tensor(t) is t
    assert _first_tensor([t]) is t
    assert _first_tensor([[t]]) is t
    assert _first_tensor([[[t]]]) is None
    assert _first_tensor({"a": 1, "b": u, "c": t}) is u
    assert _first_tensor(({"k": [t]},)) is None
    assert _first_tensor((1, [u])) is u
    assert _first_tensor(None) is None
    assert _first_tensor({t}) is None  # a set is not searched
    assert _first_tensor(3) is None


def test_skip_with_data_input_forms() -> None:
    torch.manual_seed(0)
    f, g = _lin(), _lin()
    inp = torch.randn(2, 4)
    assert _skip_with_data_input(inp + f(inp), inp) is True
    assert _skip_with_data_input(torch.relu(inp + f(inp)), inp) is True
    assert _skip_with_data_input(_neg(inp + f(inp), 2), inp) is True
    assert _skip_with_data_input(_neg(inp + f(inp), 3), inp) is False  # the add 4 nodes down
    assert _skip_with_data_input(f(inp) + g(inp), inp) is False
    assert _skip_with_data_input((inp + f(inp)).sum(-1), inp) is False  # another shape
    assert _skip_with_data_input(f(inp) * g(inp), inp) is False
    assert _skip_with_data_input(inp + 1.0, inp) is False  # no grad_fn
    leaf = torch.randn(2, 4, requires_grad=True)
    assert _skip_with_data_input(torch.ones(2, 4) + f(leaf), leaf) is False


def test_skip_with_data_input_add_without_any_node() -> None:
    add = node("AddBackward0", None, None)
    out = SimpleNamespace(shape=(2,), grad_fn=add)
    inp = SimpleNamespace(shape=(2,), requires_grad=False)
    assert _skip_with_data_input(out, inp) is False  # type: ignore[arg-type]


def test_reaches_up_to_three_hops() -> None:
    chain = [node("C4")]
    for i in range(3, -1, -1):
        chain.insert(0, node(f"C{i}", chain[0]))
    top = chain[0]
    assert _reaches(top, {id(chain[2])}) is chain[2]
    assert _reaches(top, {id(chain[3])}) is chain[3]
    assert _reaches(top, {id(chain[4])}) is None
    assert _reaches(top, {id(chain[1])}, hops=1) is chain[1]


def test_sequence_nr() -> None:
    a = torch.ones(2, requires_grad=True) * 2
    b = a * 3
    assert sequence_nr(b.grad_fn) == b.grad_fn._sequence_nr()
    assert sequence_nr(b.grad_fn) > sequence_nr(a.grad_fn)
    assert sequence_nr(object()) == 0


def test_compiling_without_torch_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _compiling() is False
    monkeypatch.delattr(torch, "compiler")
    assert _compiling() is False


# --- ForwardProbe: state before a forward --------------------------------------------------------


def test_probe_starts_with_nothing_read() -> None:
    probe = ForwardProbe(nn.Linear(2, 2))
    assert probe.residual is None
    assert probe.norms is None
    assert probe.skips == 0
    assert probe.forward_order == ()
    assert probe.out_rms == ()
    assert probe.in_norm == {}
    assert probe.stream_rms == ()
    assert probe.batch_size == 0
    assert probe.done is False
    assert probe.readable is True
    assert probe._res_rms == []
    assert probe._compiled_region is False
    compiled = nn.Linear(2, 2)
    compiled._compiler_ctx = object()  # type: ignore[attr-defined]
    gave_up = ForwardProbe(compiled)
    assert (gave_up.done, gave_up.readable) == (True, False)
    assert gave_up._recurrent == []
    assert gave_up._compiled_region is False


# --- ForwardProbe: what one forward records ------------------------------------------------------


def test_probe_root_called_with_keyword_input() -> None:
    lin = nn.Linear(2, 3)
    probe = ForwardProbe(lin)
    lin(input=torch.ones(4, 2))
    assert probe.done
    assert probe.forward_order == ("",)
    assert probe.batch_size == 4
    assert probe.in_norm == pytest.approx({"": math.sqrt(8.0)})


class _Side(nn.Module):
    """Returns nothing (a logging module)."""

    def forward(self, x: Tensor) -> None:
        return None


class _Const(nn.Module):
    """Called without any input."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self) -> Tensor:
        return self.w * 2


class _SideAndConst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.side, self.const, self.lin = _Side(), _Const(), nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.side(x)
        return self.lin(x) * self.const()


def test_probe_modules_without_output_or_without_input() -> None:
    net = _SideAndConst()
    probe = ForwardProbe(net)
    net(torch.ones(5, 2))
    assert probe.done
    assert probe.forward_order == ("lin",)
    assert probe.batch_size == 5
    assert (probe.residual, probe.skips, probe.norms) == ((), 0, ())


class _ScalarLinear(nn.Linear):
    """A weight layer fed a 0-d tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(1))


def test_probe_batch_size_of_a_scalar_input_is_one() -> None:
    lin = _ScalarLinear(1, 3)
    probe = ForwardProbe(lin)
    lin(torch.tensor(2.0))
    assert probe.batch_size == 1
    assert probe.forward_order == ("",)
    assert probe.in_norm == pytest.approx({"": 2.0})


class _Res(nn.Module):
    """``x + f(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


def test_probe_stream_rms_of_the_skipped_stream() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), _Res())
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4) * 2.0)
        net[0].bias.zero_()
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]])
    probe = ForwardProbe(net)
    net(x)
    assert probe.residual == ("1",)
    assert probe.skips == 1
    # the stream is 2x: its mean square is 4 * 32 / 8
    assert probe.stream_rms == pytest.approx((4.0,))
    s = ModelStructure()
    probe.apply_to(s)
    assert s.stream_rms == pytest.approx((4.0,))


class _Halves(nn.Module):
    """Both halves of one chunk share a node: the skip's stream is the first half."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.f, self.g = nn.Linear(4, 4), nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.stem(x).chunk(2, dim=-1)
        u = self.f(a)
        v = self.g(b)
        return (a + u) * v


def test_probe_stream_rms_is_of_the_first_input_with_that_node() -> None:
    torch.manual_seed(0)
    net = _Halves()
    with torch.no_grad():
        net.stem.weight.copy_(torch.eye(4))
        net.stem.bias.zero_()
    probe = ForwardProbe(net)
    net(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert probe.skips == 1
    # a = (1, 2): mean square 2.5 (b = (3, 4) would give 12.5)
    assert probe.stream_rms == pytest.approx((math.sqrt(2.5),))


class _ProjRes(nn.Module):
    """``p(x) + f2(relu(f1(x)))`` from width 4 to 3: the stream enters no same-shape module."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.f1, self.f2 = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.p(x) + self.f2(torch.relu(self.f1(x)))


def test_probe_no_stream_rms_for_a_stream_of_another_shape() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), _ProjRes())
    probe = ForwardProbe(net)
    net(torch.randn(2, 4))
    assert probe.residual == ("1",)
    assert probe.skips == 1
    assert probe.stream_rms == ()


class _LnBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.layer_norm(self.a(x), (4,)))


def test_probe_norm_outside_any_module_output_is_functional() -> None:
    torch.manual_seed(0)
    net = _LnBetween()
    probe = ForwardProbe(net)
    net(torch.randn(2, 4))
    assert probe.norms == ("(functional)",)


# --- ForwardProbe: which module a skip belongs to ------------------------------------------------


class _PreRes(nn.Module):
    """``h + f(h)`` with ``h = pre(x)``: the stream is not the block's input."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.f = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pre(x)
        return h + self.f(h)


def test_probe_skip_belongs_to_the_block_whose_output_is_the_add() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), _PreRes())
    probe = ForwardProbe(net)
    net(torch.randn(2, 4))
    assert probe.residual == ("1",)


class _Glu(nn.Module):
    """``f1(x) * f2(x)``: the input enters two layers and the block."""

    def __init__(self) -> None:
        super().__init__()
        self.f1, self.f2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.f1(x) * self.f2(x)


class _Loop(nn.Module):
    """The adds in the root's loop over blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(_Glu() for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk(x)
        return x


def test_probe_skip_in_the_parents_loop_belongs_to_the_block_entered_last() -> None:
    torch.manual_seed(0)
    net = _Loop()
    probe = ForwardProbe(net)
    net(torch.randn(2, 4))
    assert probe.residual == ("blocks.0", "blocks.1")
    assert probe.skips == 2
    assert probe.norms == ()


class _Bare2(nn.Module):
    """``h + f(relu(h))`` in the root: the stream enters no module."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.f = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return h + self.f(torch.relu(h))


def test_probe_skip_of_no_module_is_functional() -> None:
    torch.manual_seed(0)
    net = _Bare2()
    probe = ForwardProbe(net)
    net(torch.randn(2, 4))
    assert probe.residual == ("(functional)",)
    assert probe.skips == 1


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, h: Tensor, g: Tensor) -> Tensor:
        return h + self.f(h)


class _Outer(nn.Module):
    def __init__(self, post: int) -> None:
        super().__init__()
        self.inner = _Inner()
        self.post = nn.Sequential(*(nn.Linear(4, 4) for _ in range(post)))

    def forward(self, g: Tensor, h: Tensor) -> Tensor:
        return self.post(self.inner(h, g))


class _Nest(nn.Module):
    """``outer(g, h)`` runs ``inner(h, g)``, where the add is; ``g = c(h)`` comes later than h."""

    def __init__(self, pre: int, post: int) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.c = nn.Sequential(*(nn.Linear(4, 4) for _ in range(pre)))
        self.outer = _Outer(post)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.outer(self.c(h), h)


@pytest.mark.parametrize(("pre", "post", "block"), [(4, 1, "outer"), (1, 4, "outer.inner")])
def test_probe_skip_belongs_to_the_shortest_forward_around_the_add(pre: int, post: int,
                                                                  block: str) -> None:
    torch.manual_seed(0)
    net = _Nest(pre, post)
    probe = ForwardProbe(net)
    net(torch.randn(2, 4))
    assert probe.residual == (block,)
    assert probe.skips == 1


# --- ForwardProbe: recurrent modules and compiled regions ----------------------------------------


class _LinGru(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.gru = nn.GRU(3, 3, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.gru(self.lin(x))[0]


class _GruRes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 3, batch_first=True)
        self.f = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gru(x)[0]
        return h + self.f(h)


def test_probe_adds_inside_a_recurrent_module_are_no_skips() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    assert len(read_graph([_LinGru()(x).grad_fn]).skips) > 0  # the gated cell's adds
    net = _LinGru()
    probe = ForwardProbe(net)
    net(x)
    assert (probe.residual, probe.skips) == ((), 0)
    net2 = _GruRes()
    probe2 = ForwardProbe(net2)
    net2(x)
    assert (probe2.residual, probe2.skips) == (("f",), 1)


def test_probe_recurrent_nodes_stop_at_parameters() -> None:
    torch.manual_seed(0)
    net = _LinGru()
    probe = ForwardProbe(net)
    out = net.gru(torch.randn(2, 5, 3))[0]  # the root is not run: nothing finished yet
    got = probe._recurrent_nodes()
    want: set[int] = set()
    todo = [out.grad_fn]
    while todo:
        n = todo.pop()
        if id(n) in want:
            continue
        want.add(id(n))
        todo += [f for f, _ in n.next_functions
                 if f is not None and type(f).__name__ != "AccumulateGrad"]
    assert got == want
    assert len(got) > 10
    assert len(probe._recurrent_nodes(budget=3)) == 3


class CompiledFunction(torch.autograd.Function):
    """An op whose backward node is named like a compiled region's."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * 2


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(CompiledFunction.apply(self.a(x)))


def test_probe_of_an_opaque_graph_is_unreadable_and_applies_nothing() -> None:
    torch.manual_seed(0)
    net = _Opaque()
    probe = ForwardProbe(net)
    net(torch.randn(3, 2))
    assert probe.done is True
    assert probe.readable is False
    assert (probe.residual, probe.norms) == (None, None)
    assert probe.forward_order == ("a", "b")
    s = ModelStructure()
    probe.apply_to(s)
    assert s == ModelStructure()
