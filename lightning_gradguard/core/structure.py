r"""What a model is made of, as far as exploding gradients are concerned.

Static inspection (:func:`inspect_model`, no forward pass) finds:

* **normalisation layers** (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm);
* **weight layers** (``nn.Linear``, ``nn.ConvNd``) with the standard deviation of their
  weights against the Xavier and He standard deviations for their fan-in/fan-out,
  :math:`\sigma_\text{Xavier} = \sqrt{2/(n_\text{in}+n_\text{out})}` and
  :math:`\sigma_\text{He} = \sqrt{2/n_\text{in}}`;
* **activations**, each probed once on a grid: its largest derivative and its RMS derivative
  under :math:`x \sim \mathcal N(0, 1)`, :math:`\sqrt{\mathbb E[f'(x)^2]}` (ReLU 0.71, tanh 0.6,
  a ``2 * leaky_relu`` 1.42). Together with He init (a factor :math:`\sqrt 2` in the weights)
  the per-layer gain of back-propagated gradients is about :math:`\sqrt 2 \cdot` RMS derivative;
* **recurrent modules** (``nn.RNN``/``nn.LSTM``/``nn.GRU``) with the largest singular value of
  each recurrent weight block :math:`W_{hh}`: a gradient through :math:`T` time steps can grow
  like :math:`\sigma_\text{max}^T` when :math:`\sigma_\text{max} > 1` (Pascanu et al., 2013,
  "On the difficulty of training recurrent neural networks").

Dynamic inspection (:class:`ForwardProbe`, one forward pass with hooks that remove
themselves) finds **residual connections** and the depth profile of activations: a module
whose output is ``input + f(input)`` shows it in the autograd graph: walking back from the
output's ``grad_fn`` through at most a few element-wise nodes reaches an ``AddBackward`` node
one of whose operands is the module's input itself (or a short path to it, such as a
projection shortcut).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.core.optim import is_adaptive  # re-exported (it lives in .optim)

__all__ = [
    "ActivationInfo",
    "ForwardProbe",
    "LayerInfo",
    "ModelStructure",
    "RecurrentInfo",
    "activation_gain",
    "inspect_model",
    "is_adaptive",
]

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
        nn.modules.instancenorm._InstanceNorm, getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    ) if t is not None
)
_WEIGHT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
#: parameter-free modules that are not element-wise activations (never probed)
_NOT_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Upsample, nn.ZeroPad2d,
    nn.modules.loss._Loss, nn.Embedding, nn.EmbeddingBag,
)
@dataclass(frozen=True)
class LayerInfo:
    """A weight layer and its initial scale.

    Attributes:
        name: Module name (``""`` for the root).
        param: Name of its weight parameter.
        kind: Class name (``"Linear"``, ``"Conv2d"``, ...).
        fan_in: Inputs per output unit (in-channels times kernel size for convolutions).
        fan_out: Outputs per input unit.
        std: Standard deviation of the weight.
        he_std: :math:`\\sqrt{2/n_\\text{in}}`.
        xavier_std: :math:`\\sqrt{2/(n_\\text{in}+n_\\text{out})}`.
    """

    name: str
    param: str
    kind: str
    fan_in: int
    fan_out: int
    std: float
    he_std: float
    xavier_std: float

    @property
    def init_ratio(self) -> float:
        """``std`` over the larger of the He and Xavier standard deviations."""
        return self.std / max(self.he_std, self.xavier_std)


@dataclass(frozen=True)
class ActivationInfo:
    """An activation module and how much it amplifies back-propagated gradients.

    Attributes:
        name: Module name.
        kind: Class name.
        rms_gain: :math:`\\sqrt{\\mathbb E[f'(x)^2]}`, :math:`x \\sim \\mathcal N(0, 1)`.
        max_gain: Largest :math:`|f'(x)|` on ``[-4, 4]``.
    """

    name: str
    kind: str
    rms_gain: float
    max_gain: float


@dataclass(frozen=True)
class RecurrentInfo:
    """A recurrent weight matrix and its largest singular value.

    Attributes:
        module: Module name of the ``nn.RNNBase``.
        param: Parameter name (e.g. ``"rnn.weight_hh_l0"``).
        kind: ``"LSTM"``, ``"GRU"`` or ``"RNN"``.
        sigma_max: Largest singular value over the gate blocks of the matrix.
        nonlinearity: ``"tanh"`` or ``"relu"`` for ``nn.RNN``; ``"gated"`` otherwise.
    """

    module: str
    param: str
    kind: str
    sigma_max: float
    nonlinearity: str


@dataclass
class ModelStructure:
    """Everything :func:`inspect_model` found (see the module docstring).

    Attributes:
        norm_layers: Names of the normalisation modules.
        layers: Weight layers in registration order.
        activations: Activation modules that were probed.
        recurrent: Recurrent weight matrices.
        residual: Names of the modules holding a skip connection (see
            :class:`ForwardProbe`), or ``None`` when no forward pass was read.
        skips: Skip connections found by the probe (one per add).
        probed_norms: Names of the modules found normalising their input by what they
            compute (whatever their class), or ``None`` when no forward pass was read.
        forward_order: Weight-layer module names in execution order (from the probe).
        out_rms: Output RMS of each weight layer in execution order (from the probe).
        stream_rms: Output RMS of each residual module in execution order (the residual
            stream's scale block after block).
        in_norm: Input norm of each weight layer (from the probe), by module name.
        batch_size: Leading dimension of the probed input (0 when not probed).
    """

    norm_layers: tuple[str, ...] = ()
    layers: tuple[LayerInfo, ...] = ()
    activations: tuple[ActivationInfo, ...] = ()
    recurrent: tuple[RecurrentInfo, ...] = ()
    residual: tuple[str, ...] | None = None
    skips: int = 0
    probed_norms: tuple[str, ...] | None = None
    forward_order: tuple[str, ...] = ()
    out_rms: tuple[float, ...] = ()
    stream_rms: tuple[float, ...] = ()
    in_norm: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0

    @property
    def has_norm(self) -> bool:
        """Whether anything normalises: a torch norm layer, or an op the probe saw."""
        return bool(self.norm_layers) or bool(self.probed_norms)

    @property
    def norm_known(self) -> bool:
        """Whether normalisation is known either way (a norm layer, or a forward was read)."""
        return bool(self.norm_layers) or self.probed_norms is not None

    @property
    def has_residual(self) -> bool:
        """Whether a residual connection was detected (``False`` when not probed)."""
        return bool(self.residual)

    def trunk(self) -> list[LayerInfo]:
        """Weight layers in forward execution order when probed, else registration order."""
        if not self.forward_order:
            return list(self.layers)
        by_name = {layer.name: layer for layer in self.layers}
        seen: list[LayerInfo] = []
        for name in self.forward_order:
            if name in by_name and by_name[name] not in seen:
                seen.append(by_name[name])
        return seen


_GRID = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)
_PDF = torch.exp(-0.5 * _GRID**2) / math.sqrt(2 * math.pi)


def activation_gain(module: nn.Module) -> tuple[float, float] | None:
    """Probe an element-wise activation: ``(rms_gain, max_gain)``, or ``None`` if not one.

    Without side effects: a copy of the module is called (the module itself never is, and
    no hook runs), twice on a 1-D grid over ``[-4, 4]``, with the random number generators
    (torch's CPU and current CUDA device, Python's ``random``, NumPy's) restored afterwards.
    Anything that fails, changes the shape, is not differentiable or gives two different
    answers (a stochastic module: dropout, stochastic depth, a noise layer) is not an
    activation.

    Example:
        >>> rms, top = activation_gain(nn.ReLU())
        >>> round(rms, 2), round(top, 2)
        (0.71, 1.0)
        >>> activation_gain(nn.Flatten(0)) is None
        True
    """
    if isinstance(module, _NOT_ACTIVATIONS) or any(True for _ in module.parameters()):
        return None
    try:
        clone = copy.deepcopy(module)
    except Exception:
        return None
    with _rng_untouched():
        d1 = _derivative(clone)
        d2 = _derivative(clone) if d1 is not None else None
    if d1 is None or d2 is None or not torch.equal(d1, d2):
        return None
    d = d1.double()
    if not bool(torch.isfinite(d).all()):
        return None
    step = float(_GRID[1] - _GRID[0])
    rms = math.sqrt(float((d**2 * _PDF).sum()) * step)
    return rms, float(d.abs().max())


def _derivative(module: nn.Module) -> Tensor | None:
    x = _GRID.to(torch.float32).clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            y = module.forward(x)  # not module(x): no hook of the user's runs
            if not isinstance(y, Tensor) or y.shape != x.shape or not y.requires_grad:
                return None
            (d,) = torch.autograd.grad(y.sum(), x)
    except Exception:
        return None
    return d.detach()


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Every random number generator a module might draw from is as it was afterwards."""
    devices = ([torch.cuda.current_device()] if torch.cuda.is_available()
               and torch.cuda.is_initialized() else [])  # type: ignore[no-untyped-call]
    py_state = random.getstate()
    np_mod = sys.modules.get("numpy")
    np_state = np_mod.random.get_state() if np_mod is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np_mod is not None:
            np_mod.random.set_state(np_state)


def _fans(weight: Tensor) -> tuple[int, int]:
    receptive = int(weight[0][0].numel()) if weight.dim() > 2 else 1
    return int(weight.shape[1]) * receptive, int(weight.shape[0]) * receptive


def _sigma_max(matrix: Tensor, blocks: int) -> float:
    w = matrix.detach().double()
    if not bool(torch.isfinite(w).all()):
        return math.inf
    return max(float(torch.linalg.matrix_norm(b, ord=2)) for b in w.chunk(blocks, dim=0))


@torch.no_grad()
def inspect_model(model: nn.Module) -> ModelStructure:
    """Static inspection: norm layers, weight scales, activations, recurrent weights.

    Args:
        model: Any ``nn.Module``.

    Returns:
        A :class:`ModelStructure` with ``residual=None`` (use :class:`ForwardProbe` for it).

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.BatchNorm1d(64))
        >>> _ = nn.init.normal_(net[0].weight, std=1.0)
        >>> s = inspect_model(net)
        >>> s.norm_layers, round(s.layers[0].init_ratio, 1), s.activations[0].kind
        (('2',), 5.7, 'ReLU')
    """
    norms: list[str] = []
    layers: list[LayerInfo] = []
    acts: list[ActivationInfo] = []
    rec: list[RecurrentInfo] = []
    gains: dict[type, tuple[float, float] | None] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, _NORM_TYPES):
            norms.append(name)
        elif isinstance(mod, _WEIGHT_TYPES):
            w = getattr(mod, "weight", None)
            if isinstance(w, Tensor) and w.dim() >= 2 and w.numel() > 1:
                fan_in, fan_out = _fans(w)
                std = float(w.detach().double().std())
                layers.append(LayerInfo(
                    name=name, param=f"{name}.weight" if name else "weight",
                    kind=type(mod).__name__, fan_in=fan_in, fan_out=fan_out, std=std,
                    he_std=math.sqrt(2.0 / fan_in),
                    xavier_std=math.sqrt(2.0 / (fan_in + fan_out))))
        elif isinstance(mod, nn.RNNBase):
            blocks = {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
            nonlin = getattr(mod, "nonlinearity", "gated") if mod.mode.startswith("RNN") \
                else "gated"
            for pname, p in mod.named_parameters(recurse=False):
                if pname.startswith("weight_hh"):
                    rec.append(RecurrentInfo(
                        module=name, param=f"{name}.{pname}" if name else pname,
                        kind=type(mod).__name__, sigma_max=_sigma_max(p, blocks),
                        nonlinearity=nonlin))
        elif not any(True for _ in mod.children()):
            key = type(mod)
            if key not in gains or key.__module__ != "torch.nn.modules.activation":
                gains[key] = activation_gain(mod)
            g = gains[key]
            if g is not None:
                acts.append(ActivationInfo(name=name, kind=type(mod).__name__,
                                           rms_gain=g[0], max_gain=g[1]))
    return ModelStructure(norm_layers=tuple(norms), layers=tuple(layers),
                          activations=tuple(acts), recurrent=tuple(rec))


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
    the autograd graph it built (see :mod:`~lightning_gradguard.core.probe`): the skip
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
        if isinstance(mod, _WEIGHT_TYPES):
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
        from lightning_gradguard.core.probe import sequence_nr

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
        from lightning_gradguard.core.probe import read_graph

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
        from lightning_gradguard.core._host import to_host

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
