r"""The forward probe: what one forward pass did (skip connections, normalisation, scales).

:class:`ForwardProbe` installs one-shot forward hooks that read the first forward pass with
autograd: each weight layer's input norm and output RMS (the depth profile), then the
autograd graph that pass built (:func:`read_graph`). The diagnosis starts it when it is built
and ends it after the first step; nothing of it runs inside the guard's step.

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

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_gradguard.core._host import to_host

if TYPE_CHECKING:
    from lightning_gradguard.core.structure import ModelStructure

__all__ = ["WEIGHT_TYPES", "ForwardProbe", "GraphFacts", "Skip", "is_compiled", "read_graph",
           "sequence_nr"]

#: the modules whose input and output scale the probe records (the depth profile's layers)
WEIGHT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)

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


_ELEMENTWISE_HOPS = 3  # nodes walked back from a module's output to its add / its norm


def _first_tensor(value: Any, depth: int = 2) -> Tensor | None:
    """The first tensor in ``value`` (a tensor, or nested tuples/lists/mappings of them)."""
    if isinstance(value, Tensor):
        return value
    if depth == 0:
        return None
    items: Any = (value.values() if isinstance(value, Mapping) else
                  value if isinstance(value, (tuple, list)) else ())
    for item in items:
        found = _first_tensor(item, depth - 1)
        if found is not None:
            return found
    return None


def _skip_with_data_input(out: Tensor, inp: Tensor) -> bool:
    """``out = inp + f(inp)`` for an input without autograd node (the model's data).

    The add's shortcut operand is then a constant (no node): walking back from the output
    through a few element-wise nodes reaches an ``AddBackward`` one of whose operands has no
    node. (Inputs with an autograd node are read from the graph, see
    :mod:`~lightning_gradguard.core.probe`.)
    """
    if inp.requires_grad or out.shape != inp.shape or out.grad_fn is None:
        return False
    node: Any = out.grad_fn
    for _ in range(_ELEMENTWISE_HOPS):
        if node is None:
            return False
        ops = [f for f, _ in node.next_functions]
        if type(node).__name__.startswith("AddBackward"):
            return len(ops) == 2 and any(f is None for f in ops) and any(
                f is not None for f in ops)
        ops = [f for f in ops if f is not None]
        if len(ops) != 1:
            return False
        node = ops[0]
    return False


def _reaches(node: Any, targets: set[int], hops: int = _ELEMENTWISE_HOPS) -> Any:
    """The target node met walking back from ``node`` along single-input nodes, or ``None``."""
    for _ in range(hops + 1):
        if node is None:
            return None
        if id(node) in targets:
            return node
        nxt = [f for f, _ in node.next_functions if f is not None
               and type(f).__name__ != "AccumulateGrad"]
        if len(nxt) != 1:
            return None
        node = nxt[0]
    return None


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) runs through ``torch.compile``.

    Example:
        >>> is_compiled(nn.Linear(2, 2))
        False
    """
    for mod in model.modules():
        if (type(mod).__name__ == "OptimizedModule" or hasattr(mod, "_orig_mod")
                or getattr(mod, "_compiled_call_impl", None) is not None
                or getattr(mod, "_compiler_ctx", None) is not None):
            return True
    return False


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


class ForwardProbe:
    """One-shot forward hooks: residual connections, normalisation, per-layer scales.

    Installed on every submodule; the first forward pass with autograd enabled (forwards
    under ``torch.no_grad``, such as a validation sanity check, are ignored) is read: for each
    weight layer the norm of its input and the RMS of its output, and at the end of that pass
    the autograd graph it built (see :func:`read_graph`): the skip
    connections wherever their add is written, and the ops that normalise. The hooks remove
    themselves after that pass (or call :meth:`remove`), so later steps cost nothing.

    No side effects: the hooks only read the tensors they are given (no module is called,
    no random number drawn, no state changed). A compiled model (``torch.compile``) is not
    hooked (its graph cannot be read); a hook reached while compiling does nothing.

    Args:
        model: The module to watch.

    Attributes:
        residual: Names of the modules holding (or, for an add in the parent's loop, entering)
            a skip connection; ``None`` while nothing was read.
        skips: Skip connections found (one per add).
        norms: Names of the modules whose output is normalised (``"(functional)"`` for a
            norm outside any module's output path); ``None`` while nothing was read.
        readable: The graph could be read (``False`` for a compiled model).

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__(); self.f = nn.Linear(4, 4)
        ...     def forward(self, x: Tensor) -> Tensor:
        ...         return x + self.f(x)
        >>> net = nn.Sequential(nn.Linear(4, 4), Block(), nn.ReLU())
        >>> probe = ForwardProbe(net)
        >>> _ = net(torch.randn(2, 4))
        >>> probe.done, probe.residual, probe.forward_order, probe.norms
        (True, ('1',), ('0', '1.f'), ())
    """

    def __init__(self, model: nn.Module) -> None:
        self.residual: tuple[str, ...] | None = None
        self.norms: tuple[str, ...] | None = None
        self.skips = 0
        self.readable = True
        self.forward_order: tuple[str, ...] = ()
        self.out_rms: tuple[float, ...] = ()
        self.in_norm: dict[str, float] = {}
        self.stream_rms: tuple[float, ...] = ()
        self.batch_size = 0
        self.done = False
        self._data_res: list[str] = []
        self._calls: list[tuple[str, Any, Any]] = []  # (name, input node, output node)
        self._streams: dict[int, tuple[Any, Tensor]] = {}
        self._order: list[str] = []
        self._rms: list[Tensor] = []
        self._res_rms: list[Tensor] = []
        self._in: dict[str, Tensor] = {}
        self._root = model
        self._params = [p for p in model.parameters()]
        self._handles: list[Any] = []
        self._compiled_region = False
        self._recurrent: list[str] = []
        if is_compiled(model):
            self.readable = False
            self.done = True
            return
        names = {id(m): n for n, m in model.named_modules()}
        self._recurrent = [n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
        for mod in model.modules():
            self._handles.append(mod.register_forward_hook(
                self._hook_for(names[id(mod)]), with_kwargs=True))

    @property
    def seen(self) -> bool:
        """Whether a forward with autograd went through a hooked module."""
        return bool(self._calls)

    def _hook_for(self, name: str) -> Any:
        def hook(mod: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if _compiling():
                # inside a compiled region: do nothing (what this forward built is not read)
                self._compiled_region = True
                return
            if self.done or not torch.is_grad_enabled():
                return  # e.g. Lightning's sanity-check validation: wait for a training forward
            inp = _first_tensor(args)
            self._record(name, mod, inp if inp is not None else _first_tensor(kwargs),
                         _first_tensor(output))
            if mod is self._root:
                self._finish()
        return hook

    def _record(self, name: str, mod: nn.Module, inp: Tensor | None,
                out: Tensor | None) -> None:
        if out is None or not out.is_floating_point():
            return
        self._calls.append((name, None if inp is None else inp.grad_fn, out.grad_fn))
        if inp is None:
            return
        if inp.grad_fn is not None and inp.shape == out.shape and id(inp.grad_fn) not in \
                self._streams:
            self._streams[id(inp.grad_fn)] = (inp.grad_fn, inp.detach().float().pow(2).mean())
        if mod is not self._root and _skip_with_data_input(out, inp):
            self._data_res.append(name)
        if isinstance(mod, WEIGHT_TYPES):
            if not self._order:
                self.batch_size = int(inp.shape[0]) if inp.dim() else 1
            self._order.append(name)
            self._rms.append(out.detach().float().pow(2).mean())
            self._in[name] = inp.detach().float().norm()

    def _module_of(self, node: Any) -> str:
        """The innermost module whose output is ``node`` (after a few element-wise ops)."""
        for name, _, out in self._calls:
            if name and _reaches(out, {id(node)}) is not None:
                return name
        return "(functional)"

    def _block_of(self, skip: Any) -> str:
        """The innermost module whose forward ran the skip's add.

        Else (an add in the root's forward, e.g. its loop over blocks) the outermost module
        the stream entered.
        """
        at = sequence_nr(skip.add)
        inside = [(sequence_nr(out) - sequence_nr(inp), name) for name, inp, out in self._calls
                  if name and inp is not None and out is not None
                  and sequence_nr(inp) < at <= sequence_nr(out)]
        if inside:
            return min(inside)[1]
        entered = [name for name, inp, _ in self._calls if name and inp is skip.stream]
        return entered[-1] if entered else "(functional)"

    def _recurrent_nodes(self, budget: int = 100_000) -> set[int]:
        """Ids of the nodes a recurrent module's forward built (from its output to its input)."""
        out: set[int] = set()
        for name, inp, node in self._calls:
            if name not in self._recurrent or node is None:
                continue
            todo = [node]
            while todo and len(out) < budget:
                n = todo.pop()
                if n is inp or id(n) in out:
                    continue
                out.add(id(n))
                todo += [f for f, _ in n.next_functions
                         if f is not None and type(f).__name__ != "AccumulateGrad"]
        return out

    def _read_graph(self) -> None:
        facts = read_graph([out for _, _, out in self._calls], self._params)
        if facts.opaque or self._compiled_region:
            self.readable = False
            return
        residual = list(self._data_res)
        stream = []
        skips = 0
        inside_rnn = self._recurrent_nodes()
        for skip in facts.skips:
            if id(skip.add) in inside_rnn:
                continue  # a gated cell's path through time (nn.GRU), not a skip over depth
            name = self._block_of(skip)
            skips += 1
            if name not in residual:
                residual.append(name)
            if id(skip.stream) in self._streams:
                stream.append(self._streams[id(skip.stream)][1])
        norms: list[str] = []
        for node in facts.norms:
            name = self._module_of(node)
            if name not in norms:
                norms.append(name)
        self.residual = tuple(residual)
        self.skips = skips + len(self._data_res)
        self.norms = tuple(norms)
        self._res_rms = stream

    def _finish(self) -> None:
        self.done = True
        self.remove()
        self._res_rms = []
        self._read_graph()
        stats = [*self._rms, *self._res_rms, *(self._in[n] for n in self._in)]
        values = to_host(torch.stack(stats)) if stats else []
        k, r = len(self._rms), len(self._res_rms)
        self.out_rms = tuple(math.sqrt(v) for v in values[:k])
        self.stream_rms = tuple(math.sqrt(v) for v in values[k:k + r])
        self.in_norm = dict(zip(self._in, values[k + r:], strict=True))
        self.forward_order = tuple(self._order)
        self._rms, self._res_rms, self._in = [], [], {}
        self._calls, self._streams = [], {}

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def end(self) -> None:
        """End the probe now: read what the hooks saw (if anything) and remove them."""
        if not self.done and self.seen:
            self._finish()
        self.remove()

    def apply_to(self, structure: ModelStructure) -> None:
        """Copy what the probe saw into ``structure`` (no-op before the first forward).

        A forward that never went through the root module (e.g. a ``training_step`` that calls
        a submodule) is finished here: what the hooks saw so far is used.
        """
        if not self.done and self.seen:
            self._finish()
        if not self.done or not self.readable:
            return
        structure.residual = self.residual
        structure.skips = self.skips
        structure.probed_norms = self.norms
        structure.forward_order = self.forward_order
        structure.out_rms = self.out_rms
        structure.stream_rms = self.stream_rms
        structure.in_norm = dict(self.in_norm)
        structure.batch_size = self.batch_size
