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

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

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
_ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta",
             "Adafactor", "SparseAdam", "Lion", "LAMB", "Lamb", "Sophia")


def is_adaptive(optimizer: Any) -> bool:
    """Whether ``optimizer`` scales each coordinate's step by its own gradient history.

    Example:
        >>> p = [nn.Parameter(torch.ones(1))]
        >>> is_adaptive(torch.optim.Adam(p)), is_adaptive(torch.optim.SGD(p, lr=0.1))
        (True, False)
    """
    return any(type(optimizer).__name__ == n or type(optimizer).__name__.endswith(n)
               for n in _ADAPTIVE)


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
        residual: Names of modules found to add their input to their output, or ``None``
            when no forward pass was probed.
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
    forward_order: tuple[str, ...] = ()
    out_rms: tuple[float, ...] = ()
    stream_rms: tuple[float, ...] = ()
    in_norm: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0

    @property
    def has_norm(self) -> bool:
        """Whether any normalisation layer is present."""
        return bool(self.norm_layers)

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

    The module is called once on a 1-D grid over ``[-4, 4]`` (no parameters are changed);
    anything that fails, changes the shape or is not differentiable is not an activation.

    Example:
        >>> rms, top = activation_gain(nn.ReLU())
        >>> round(rms, 2), round(top, 2)
        (0.71, 1.0)
        >>> activation_gain(nn.Flatten(0)) is None
        True
    """
    if isinstance(module, _NOT_ACTIVATIONS) or any(True for _ in module.parameters()):
        return None
    x = _GRID.to(torch.float32).clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            y = module(x)
            if not isinstance(y, Tensor) or y.shape != x.shape or not y.requires_grad:
                return None
            (d,) = torch.autograd.grad(y.sum(), x)
    except Exception:
        return None
    d = d.detach().double()
    if not bool(torch.isfinite(d).all()):
        return None
    step = float(_GRID[1] - _GRID[0])
    rms = math.sqrt(float((d**2 * _PDF).sum()) * step)
    return rms, float(d.abs().max())


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


_ELEMENTWISE_HOPS = 3  # nodes walked back from a module's output to find the skip add
_SHORTCUT_HOPS = 4     # nodes allowed on the shortcut path (identity, projection + norm)


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def _is_target(node: Any, target: Any, target_tensor: Tensor) -> bool:
    if target is not None:
        return node is target
    return getattr(node, "variable", None) is target_tensor


def _param_only(node: Any, depth: int = 2) -> bool:
    """Whether ``node`` only leads to parameters (e.g. the transpose of a Linear's weight)."""
    if node is None or type(node).__name__ == "AccumulateGrad":
        return True
    if depth == 0:
        return False
    return all(_param_only(f, depth - 1) for f, _ in node.next_functions)


def _reaches(node: Any, target: Any, target_tensor: Tensor, hops: int) -> bool:
    """Whether ``node`` leads to the input's autograd node through a parameter-fed chain.

    The chain has at most ``hops`` nodes and nothing but parameters feeds it besides the
    input: the identity, or a projection such as conv + norm.
    """
    for _ in range(hops + 1):
        if node is None:
            return False
        if _is_target(node, target, target_tensor):
            return True
        preds = [f for f, _ in node.next_functions
                 if f is not None and (_is_target(f, target, target_tensor)
                                       or not _param_only(f))]
        if len(preds) != 1:
            return False
        node = preds[0]
    return False


def _is_skip_add(out: Tensor, inp: Tensor) -> bool:
    if out.shape != inp.shape or out.grad_fn is None:
        return False
    target = inp.grad_fn
    node = out.grad_fn
    for _ in range(_ELEMENTWISE_HOPS):
        if node is None:
            return False
        if type(node).__name__.startswith("AddBackward"):
            branches = [f for f, _ in node.next_functions]
            if not inp.requires_grad:
                # data input (no autograd node): the shortcut is the add's constant operand
                return any(f is None for f in branches) and any(f is not None for f in branches)
            return any(_reaches(f, target, inp, _SHORTCUT_HOPS) for f in branches
                       if f is not None) and len(branches) == 2
        nxt = [f for f, _ in node.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        node = nxt[0]
    return False


class ForwardProbe:
    """One-shot forward hooks: residual connections and per-layer activation scales.

    Installed on every submodule; the first forward pass with autograd enabled (forwards
    under ``torch.no_grad``, such as a validation sanity check, are ignored) records, for
    each module, whether its output adds its input (see the module docstring), and for each
    weight layer the norm of its input and the RMS of its output. The hooks remove
    themselves after that pass (or call :meth:`remove`), so later steps cost nothing.

    Args:
        model: The module to watch.

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__(); self.f = nn.Linear(4, 4)
        ...     def forward(self, x: Tensor) -> Tensor:
        ...         return x + self.f(x)
        >>> net = nn.Sequential(nn.Linear(4, 4), Block(), nn.ReLU())
        >>> probe = ForwardProbe(net)
        >>> _ = net(torch.randn(2, 4))
        >>> probe.done, probe.residual, probe.forward_order
        (True, ('1',), ('0', '1.f'))
    """

    def __init__(self, model: nn.Module) -> None:
        self.residual: tuple[str, ...] = ()
        self.forward_order: tuple[str, ...] = ()
        self.out_rms: tuple[float, ...] = ()
        self.in_norm: dict[str, float] = {}
        self.batch_size = 0
        self.done = False
        self._res: list[str] = []
        self._res_rms: list[Tensor] = []
        self.stream_rms: tuple[float, ...] = ()
        self._order: list[str] = []
        self._rms: list[Tensor] = []
        self._in: dict[str, Tensor] = {}
        self._root = model
        self._handles: list[Any] = []
        names = {id(m): n for n, m in model.named_modules()}
        for mod in model.modules():
            self._handles.append(mod.register_forward_hook(self._hook_for(names[id(mod)])))

    def _hook_for(self, name: str) -> Any:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if self.done or not torch.is_grad_enabled():
                return  # e.g. Lightning's sanity-check validation: wait for a training forward
            inp = _first_tensor(args)
            out = _first_tensor(output)
            if inp is None or out is None:
                if mod is self._root:
                    self._finish()
                return
            if mod is not self._root and _is_skip_add(out, inp):
                self._res.append(name)
                self._res_rms.append(out.detach().float().pow(2).mean())
            if isinstance(mod, _WEIGHT_TYPES) and out.is_floating_point():
                if not self._order:
                    self.batch_size = int(inp.shape[0]) if inp.dim() else 1
                self._order.append(name)
                self._rms.append(out.detach().float().pow(2).mean())
                self._in[name] = inp.detach().float().norm()
            if mod is self._root:
                self._finish()
        return hook

    def _finish(self) -> None:
        from lightning_gradguard.core._host import to_host

        self.done = True
        self.remove()
        names = list(self._in)
        stats = [*self._rms, *self._res_rms, *(self._in[n] for n in names)]
        values = to_host(torch.stack(stats)) if stats else []
        k, r = len(self._rms), len(self._res_rms)
        self.out_rms = tuple(math.sqrt(v) for v in values[:k])
        self.stream_rms = tuple(math.sqrt(v) for v in values[k:k + r])
        self.in_norm = dict(zip(names, values[k + r:], strict=True))
        self.residual = tuple(self._res)
        self.forward_order = tuple(self._order)
        self._rms, self._res_rms, self._in = [], [], {}

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def apply_to(self, structure: ModelStructure) -> None:
        """Copy what the probe saw into ``structure`` (no-op before the first forward).

        A forward that never went through the root module (e.g. a ``training_step`` that calls
        a submodule) is finished here: what the hooks saw so far is used.
        """
        if not self.done and (self._order or self._res):
            self._finish()
        if not self.done:
            return
        structure.residual = self.residual
        structure.forward_order = self.forward_order
        structure.out_rms = self.out_rms
        structure.stream_rms = self.stream_rms
        structure.in_norm = dict(self.in_norm)
        structure.batch_size = self.batch_size
