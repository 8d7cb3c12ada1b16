r"""What one forward pass did, read from its autograd graph: skip connections and normalisation.

Structure is recognised by what the code computes, wherever it is written and whatever the
modules are called:

* a **skip connection** is an addition :math:`y = a + b` whose operand :math:`a` is the
  stream :math:`s` itself (or :math:`s` through at most one weight layer: a projection
  shortcut), while every path from :math:`b` back to :math:`s` goes through more weight
  layers than the shortcut does (the branch). The add may be written in the block's
  ``forward`` (``return x + f(x)``), twice in one block (a pre-LN transformer block), in a
  library layer (``nn.TransformerEncoderLayer``, post-LN: ``norm(x + f(x))``) or in the
  parent's loop (``for blk in self.blocks: x = x + blk(x)``);
* a **normalisation** is an op that divides activations by a statistic of their own
  magnitude: a fused norm kernel (layer/batch/group/RMS norm, whatever module calls it), or a
  product/quotient :math:`x \cdot g(\text{stat}(x))` where the statistic is a mean, variance,
  standard deviation, norm or sum of squares of :math:`x` (a hand-written RMSNorm,
  ``(x - mu) / sqrt(var + eps)``, ``F.normalize``). A softmax (a sum of exponentials) is not
  one.

A *weight layer* is an op fed by a parameter with two or more dimensions (a matrix product,
a convolution). The graph is only read (its nodes' ``next_functions``): nothing is run, no
random number is drawn. A graph built by ``torch.compile`` hides its inside in one node: it
is reported as ``opaque`` and nothing is concluded from it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["GraphFacts", "Skip", "read_graph", "sequence_nr"]

#: fused normalisation kernels, by the prefix of their backward node's name
_NORM_OPS = ("NativeLayerNormBackward", "NativeBatchNormBackward", "CudnnBatchNormBackward",
             "MiopenBatchNormBackward", "NativeGroupNormBackward", "FusedRmsNormBackward",
             "MkldnnBatchNormBackward", "MkldnnLayerNormBackward")
#: reductions that are a statistic of the values' scale whatever feeds them
_SCALE_STATS = ("MeanBackward", "VarBackward", "StdBackward", "NormBackward",
                "LinalgVectorNormBackward", "VarMeanBackward", "StdMeanBackward")
#: what feeds a sum that makes it a sum of magnitudes (a sum of exp is a softmax)
_MAGNITUDES = ("PowBackward", "MulBackward", "AbsBackward", "SqrtBackward")
_OPAQUE = ("CompiledFunction",)
#: lookups of parameter rows by (integer) data: their output is data, not a parameter
_LOOKUPS = ("EmbeddingBackward", "EmbeddingBagBackward", "EmbeddingDenseBackward",
            "IndexSelectBackward", "IndexBackward", "GatherBackward")

_SHORTCUT_HOPS = 4      # nodes on a shortcut (identity, or a projection conv + norm)
_BRANCH_BUDGET = 4000   # nodes visited looking for the stream below one add
_STAT_HOPS = 6          # nodes from a product/quotient to the statistic it divides by


@dataclass(frozen=True)
class Skip:
    """One skip connection: the add, the stream it adds back, and the layers it skips.

    Attributes:
        add: The ``AddBackward`` node of the addition.
        stream: The node of the stream that the shortcut carries (the block's input).
        branch_layers: Weight layers on the shortest path from the branch back to the stream.
        shortcut_layers: Weight layers on the shortcut (0: identity, 1: a projection).
    """

    add: Any
    stream: Any
    branch_layers: int
    shortcut_layers: int


@dataclass
class GraphFacts:
    """What :func:`read_graph` found.

    Attributes:
        skips: Skip connections, in the order the adds were executed.
        norms: Normalisation nodes (fused kernels and hand-written ones).
        opaque: The graph holds a compiled region (its inside cannot be read).
        complete: Every node was visited (``False``: the node budget ran out).
        nodes: Nodes visited.
    """

    skips: list[Skip] = field(default_factory=list)
    norms: list[Any] = field(default_factory=list)
    opaque: bool = False
    complete: bool = True
    nodes: int = 0


class _Graph:
    """The nodes below some roots, with memoised facts about each (ids as keys)."""

    def __init__(self, roots: Iterable[Any], params: set[int], budget: int) -> None:
        self.params = params
        self.children: dict[int, list[Any]] = {}
        self.nodes: dict[int, Any] = {}
        self._param_only: dict[tuple[int, int], tuple[bool, int]] = {}
        self.complete = True
        stack = [r for r in roots if r is not None]
        while stack:
            n = stack.pop()
            if id(n) in self.nodes:
                continue
            if len(self.nodes) >= budget:
                self.complete = False
                break
            self.nodes[id(n)] = n
            kids: list[Any] = []
            for f, _ in getattr(n, "next_functions", ()):
                if f is not None and all(f is not k for k in kids):
                    kids.append(f)
            self.children[id(n)] = kids
            stack.extend(kids)

    def kids(self, n: Any) -> list[Any]:
        got = self.children.get(id(n))
        if got is None:  # below the budget: read on demand
            got = []
            for f, _ in getattr(n, "next_functions", ()):
                if f is not None and all(f is not k for k in got):
                    got.append(f)
            self.children[id(n)] = got
            self.nodes[id(n)] = n
        return got

    def param_only(self, n: Any, depth: int = 3) -> tuple[bool, int]:
        """Whether ``n`` leads to parameters only, and their largest number of dimensions."""
        key = (id(n), depth)
        if key in self._param_only:
            return self._param_only[key]
        out: tuple[bool, int]
        name = type(n).__name__
        if name.startswith(_LOOKUPS):
            out = (False, 0)  # a lookup by the data's indices: the data entering the model
        elif name == "AccumulateGrad":
            var = getattr(n, "variable", None)
            is_param = isinstance(var, nn.Parameter) or id(var) in self.params
            out = (is_param, var.dim() if is_param and var is not None else 0)
        elif depth == 0:
            out = (False, 0)
        else:
            kids = self.kids(n)
            # an input without a node is data (a constant of the graph): not parameters only
            consts = any(f is None for f, _ in getattr(n, "next_functions", ()))
            facts = [self.param_only(k, depth - 1) for k in kids]
            out = (bool(kids) and not consts and all(f[0] for f in facts),
                   max((f[1] for f in facts), default=0))
        self._param_only[key] = out
        return out

    def data(self, n: Any) -> list[Any]:
        """The children of ``n`` that carry activations (not only parameters)."""
        return [k for k in self.kids(n) if not self.param_only(k)[0]]

    def is_weight(self, n: Any) -> bool:
        """Whether ``n`` applies a weight matrix (a parameter of two or more dimensions)."""
        return any(f[0] and f[1] >= 2 for f in (self.param_only(k) for k in self.kids(n)))

    def below(self, n: Any, hops: int) -> set[int]:
        """Ids of the activation nodes within ``hops`` steps below ``n`` (``n`` included)."""
        seen = {id(n)}
        frontier = [n]
        for _ in range(hops):
            nxt = []
            for m in frontier:
                for k in self.data(m):
                    if id(k) not in seen:
                        seen.add(id(k))
                        nxt.append(k)
            frontier = nxt
        return seen


def _shortcut(g: _Graph, a: Any) -> list[tuple[Any, int]]:
    """Candidate streams below operand ``a``: ``(node, weight layers from a to it)``."""
    out: list[tuple[Any, int]] = []
    cur, layers = a, 0
    for _ in range(_SHORTCUT_HOPS + 1):
        out.append((cur, layers))
        if g.is_weight(cur):
            layers += 1
            if layers > 1:
                break
        nxt = g.data(cur)
        if len(nxt) != 1:
            break
        cur = nxt[0]
    return out


def _branch_layers(g: _Graph, b: Any, targets: dict[int, int]) -> dict[int, int]:
    """Fewest weight layers from ``b`` down to each target reached (0-1 breadth-first)."""
    dist = {id(b): 0}
    found: dict[int, int] = {}
    todo: deque[Any] = deque([b])
    visited = 0
    while todo and visited < _BRANCH_BUDGET:
        n = todo.popleft()
        visited += 1
        d = dist[id(n)]
        if id(n) in targets:
            found[id(n)] = min(found.get(id(n), d), d)
            continue  # the stream: nothing below it belongs to this branch
        step = 1 if g.is_weight(n) else 0
        for k in g.data(n):
            nd = d + step
            if nd < dist.get(id(k), 1 << 30):
                dist[id(k)] = nd
                if step:
                    todo.append(k)
                else:
                    todo.appendleft(k)
    return found


def _skip_at(g: _Graph, add: Any) -> Skip | None:
    ops = g.data(add)
    if len(ops) != 2:
        return None
    for a, b in ((ops[0], ops[1]), (ops[1], ops[0])):
        short = _shortcut(g, a)
        targets = {id(n): w for n, w in short}
        reached = _branch_layers(g, b, targets)
        for n, w in short:
            layers = reached.get(id(n))
            if layers is not None and layers >= w + 1 and w <= 1:
                return Skip(add=add, stream=n, branch_layers=layers, shortcut_layers=w)
    return None


def _is_norm(g: _Graph, n: Any) -> bool:
    name = type(n).__name__
    if name.startswith(_NORM_OPS):
        return True
    if not name.startswith(("MulBackward", "DivBackward")):
        return False
    ops = g.data(n)
    if len(ops) != 2:
        return False
    for p, q in ((ops[0], ops[1]), (ops[1], ops[0])):
        stat = q
        for _ in range(_STAT_HOPS):
            if g.is_weight(stat):  # a gate computed through weights (squeeze-excite)
                stat = None
                break
            sname = type(stat).__name__
            if sname.startswith(_SCALE_STATS):
                break
            if sname.startswith("SumBackward"):
                fed = g.data(stat)
                if len(fed) == 1 and type(fed[0]).__name__.startswith(_MAGNITUDES):
                    break
            nxt = g.data(stat)
            if len(nxt) != 1:
                stat = None
                break
            stat = nxt[0]
        else:
            stat = None
        if stat is not None and g.below(stat, 3) & g.below(p, 2):
            return True
    return False


def read_graph(roots: Iterable[Any], params: Iterable[Any] = (), *,
               budget: int = 200_000) -> GraphFacts:
    """Skip connections and normalisations in the autograd graph below ``roots``.

    Args:
        roots: ``grad_fn`` nodes of the forward's outputs (``None`` entries are ignored).
        params: The model's parameters (any ``nn.Parameter`` counts as one anyway).
        budget: Most nodes read (a very large graph is read in part: ``complete=False``).

    Returns:
        A :class:`GraphFacts`.

    Example:
        >>> import torch
        >>> class Block(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__(); self.f = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return self.f(x)                     # the add is in the parent's loop
        >>> blocks = nn.ModuleList(Block() for _ in range(3))
        >>> x = nn.Linear(4, 4)(torch.randn(2, 4))
        >>> for blk in blocks:
        ...     x = x + blk(x)
        >>> facts = read_graph([x.grad_fn])
        >>> len(facts.skips), [s.branch_layers for s in facts.skips], facts.norms
        (3, [1, 1, 1], [])
        >>> y = torch.nn.functional.layer_norm(x, (4,))
        >>> len(read_graph([y.grad_fn]).norms)
        1
    """
    g = _Graph(roots, {id(p) for p in params}, budget)
    facts = GraphFacts(complete=g.complete, nodes=len(g.nodes))
    for n in list(g.nodes.values()):
        name = type(n).__name__
        if any(o in name for o in _OPAQUE):
            facts.opaque = True
        if name.startswith("AddBackward"):
            skip = _skip_at(g, n)
            if skip is not None:
                facts.skips.append(skip)
        elif _is_norm(g, n):
            facts.norms.append(n)
    facts.skips.sort(key=lambda s: sequence_nr(s.add))
    facts.norms.sort(key=sequence_nr)
    return facts


def sequence_nr(node: Any) -> int:
    """The order in which an autograd node was created (0 when it has none)."""
    try:
        return int(node._sequence_nr())
    except Exception:  # a node type without a sequence number
        return 0
