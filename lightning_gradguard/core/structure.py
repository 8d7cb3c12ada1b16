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

Dynamic inspection (:class:`~lightning_gradguard.core.probe.ForwardProbe`, one forward
pass with hooks that remove themselves; re-exported here) finds **residual connections**
and the depth profile of activations, from the autograd graph of the first forward pass
(see :mod:`~lightning_gradguard.core.probe`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_gradguard.core.optim import is_adaptive  # re-exported (it lives in .optim)
from lightning_gradguard.core.probe import WEIGHT_TYPES as _WEIGHT_TYPES
from lightning_gradguard.core.probe import ForwardProbe, is_compiled  # re-exported

__all__ = [
    "ActivationInfo",
    "ForwardProbe",
    "LayerInfo",
    "ModelStructure",
    "RecurrentInfo",
    "activation_gain",
    "inspect_model",
    "is_adaptive",
    "is_compiled",
]

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
        nn.modules.instancenorm._InstanceNorm, getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    ) if t is not None
)
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
        >>> _ = torch.manual_seed(0)
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
