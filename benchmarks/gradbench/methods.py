"""The registry of anti-explosion methods: :class:`Method` objects, looked up by name.

A method is what a user adds to a Lightning run: callbacks and ``Trainer`` kwargs, built fresh
for every run by :meth:`Method.build`. Register a new one with :func:`register`; build a
GradGuard variant in code with :func:`gradguard_variant`, or on the command line as
``"gradguard(<kwargs>)"`` (parsed by :func:`parse_variant`: keyword arguments whose values are
literals or calls of the library's clipping policies - no ``eval``).

==================  ==========================================================================
name                what runs
==================  ==========================================================================
``none``            plain Lightning, no clipping
``clip1``           ``Trainer(gradient_clip_val=1.0)`` (norm clipping, Lightning's default
                    algorithm); ``clip<v>`` any value (``clip0.25``: the LSTM recipe's own)
``zclip``           ``zclip.ZClipLightningCallback()`` with the package's defaults (``alpha=0.97,
                    z_thresh=2.5, max_grad_norm=1.0, warmup_steps=25, mode="zscore",
                    clip_option="adaptive_scaling"``)
``autoclip``        ``autoclip.torch.QuantileClip(model.parameters())`` with the package's
                    defaults (``quantile=0.9, history_length=1000``, per-parameter thresholds),
                    stepped right before ``optimizer.step()``
``autoclip_p10``    the AutoClip paper's setting: ``QuantileClip(..., quantile=0.1,
                    global_threshold=True)`` (10th percentile of the global norm history)
``agc``             unit-wise AGC, ``lightning_gradguard.core.AdaptiveGradClip(clipping=0.01,
                    exclude=[<output layer>.*])`` applied in ``on_before_optimizer_step``
``gradguard``       ``GradGuard()`` with its defaults
``gradguard(...)``  scratch variants: any ``GradGuard(...)`` keyword arguments, e.g.
                    ``"gradguard(recovery_steps=100)"`` or
                    ``"gradguard(clip=ZScoreClip(z_threshold=3.0))"``
``<m>+<fault>``     method ``m`` with injected faults (:func:`with_faults`)
``floor``           (overhead only) one fused read of the gradients and one host read
``monitor``         (overhead only) ``GradientMonitor()``
==================  ==========================================================================
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.core import (
    AdaptiveGradClip,
    FixedNormClip,
    NoClip,
    PercentileClip,
    ZScoreClip,
)
from lightning_gradguard.testing import Fault, FaultInjector

__all__ = [
    "REGISTRY", "AGCCallback", "AutoClipCallback", "FloorCallback", "Method", "MethodSetup",
    "get_method", "gradguard_variant", "method_slug", "output_layer", "parse_variant",
    "register", "with_faults",
]


@dataclass
class MethodSetup:
    """What one run of a method adds: callbacks and ``Trainer`` kwargs."""

    callbacks: list[Callback] = field(default_factory=list)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """An anti-explosion method as a user would configure it.

    Args:
        name: Registry key, cache key and report label.
        factory: Builds a fresh :class:`MethodSetup` (new callback objects) for every run.
        description: One line for docs and reports.
        library: The method runs ``lightning_gradguard`` code, so cached runs are valid only
            for the library sources they ran with.
        gradguard: A ``GradGuard`` (defaults or a variant).
    """

    name: str
    factory: Callable[[], MethodSetup]
    description: str = ""
    library: bool = False
    gradguard: bool = False

    def build(self) -> MethodSetup:
        """Fresh callbacks and ``Trainer`` kwargs for one run."""
        return self.factory()


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`REGISTRY` (its name must be new); returns it."""
    if method.name in REGISTRY:
        raise ValueError(f"method name must be unique; {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``, or the GradGuard variant ``"gradguard(...)"``.

    Raises:
        ValueError: ``name`` is neither registered nor a valid variant.
    """
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("gradguard(") and name.endswith(")"):
        return parse_variant(name)
    if re.fullmatch(r"clip[0-9]+(\.[0-9]*)?", name):
        value = float(name[len("clip"):])
        return register(Method(name, lambda: MethodSetup(
            trainer_kwargs={"gradient_clip_val": value}), f"Trainer(gradient_clip_val={value})"))
    raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}, 'clip<value>' or "
                     "'gradguard(<GradGuard kwargs>)'")


def with_faults(method: str, label: str, faults: Sequence[Fault]) -> str:
    """Register (once) and name ``method`` with ``faults`` injected (``"<method>+<label>"``).

    The :class:`~lightning_gradguard.testing.FaultInjector` comes before the method's
    callbacks, so the method sees the faulty step as it would see a real one.
    """
    name = f"{method}+{label}"
    if name not in REGISTRY:
        inner = get_method(method)

        def factory() -> MethodSetup:
            setup = inner.build()
            return MethodSetup([FaultInjector(list(faults)), *setup.callbacks],
                               setup.trainer_kwargs)

        register(Method(name, factory, f"{inner.description} + {label}",
                        library=inner.library, gradguard=inner.gradguard))
    return name


def method_slug(name: str) -> str:
    """A file-name-safe form of a method name (variants get a hash suffix).

    >>> method_slug("gradguard")
    'gradguard'
    >>> method_slug("gradguard(recovery_steps=100)")
    'gradguard_recovery_steps_100_a75afdaa'
    """
    if re.fullmatch(r"[A-Za-z0-9_]+", name):
        return name
    short = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:60]
    return f"{short}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------- callbacks
class AutoClipCallback(Callback):
    """``autoclip``'s raw-clipper pattern: ``clipper.step()`` right before ``optimizer.step()``.

    (``QuantileClip.as_optimizer`` cannot be used under Lightning's automatic optimization:
    the wrapper calls ``clipper.step()`` before ``optimizer.step(closure)``, i.e. before the
    closure has computed this step's gradients.)
    """

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.clipper: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from autoclip.torch import QuantileClip

        self.clipper = QuantileClip(pl_module.parameters(), **self.kwargs)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self.clipper.step()


def output_layer(model: torch.nn.Module) -> str:
    """Name of the last ``nn.Linear`` of ``model`` (the output layer AGC leaves alone)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return str(names[-1])


class AGCCallback(Callback):
    """Unit-wise AGC with :class:`AdaptiveGradClip` in ``on_before_optimizer_step``."""

    def __init__(self, clipping: float = 0.01) -> None:
        self.clipping = clipping
        self.policy: AdaptiveGradClip | None = None
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.policy = AdaptiveGradClip(clipping=self.clipping,
                                       exclude=[f"{output_layer(pl_module)}.*"])
        named = list(pl_module.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if self.policy is None:
            raise RuntimeError("AGCCallback: on_fit_start has not run")
        self.policy.clip_unitwise_(self.params, self.names)


class FloorCallback(Callback):
    """``on_before_optimizer_step``: ``_foreach_norm`` of the gradients, summed, read once."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        torch.stack(torch._foreach_norm(grads)).sum().item()


def _zclip() -> MethodSetup:
    from zclip import ZClipLightningCallback

    return MethodSetup([ZClipLightningCallback()])


def _monitor() -> MethodSetup:
    from lightning_gradguard import GradientMonitor

    return MethodSetup([GradientMonitor()])


for _m in (
    Method("none", MethodSetup, "plain Lightning, no clipping"),
    Method("clip1", lambda: MethodSetup(trainer_kwargs={"gradient_clip_val": 1.0}),
           "Trainer(gradient_clip_val=1.0)"),
    Method("zclip", _zclip, "zclip.ZClipLightningCallback() with the package defaults"),
    Method("autoclip", lambda: MethodSetup([AutoClipCallback()]),
           "autoclip QuantileClip with the package defaults"),
    Method("autoclip_p10",
           lambda: MethodSetup([AutoClipCallback(quantile=0.1, global_threshold=True)]),
           "autoclip QuantileClip(quantile=0.1, global_threshold=True) (the paper's setting)"),
    Method("agc", lambda: MethodSetup([AGCCallback(0.01)]),
           "unit-wise AGC, AdaptiveGradClip(clipping=0.01), output layer excluded",
           library=True),
    Method("gradguard", lambda: MethodSetup([GradGuard()]), "GradGuard() with its defaults",
           library=True, gradguard=True),
    Method("floor", lambda: MethodSetup([FloorCallback()]),
           "one fused read of the gradients and one host read (a reference, not a method)"),
    Method("monitor", _monitor, "GradientMonitor() (observes only)", library=True),
):
    register(_m)


# ----------------------------------------------------------------------------- variants
def gradguard_variant(name: str | None = None, **kwargs: Any) -> Method:
    """A GradGuard with ``kwargs``; named ``"gradguard(k=v, ...)"`` unless ``name`` is given.

    >>> gradguard_variant(recovery_steps=100).name
    'gradguard(recovery_steps=100)'
    """
    label = name or "gradguard(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    GradGuard(**kwargs)  # validate now, not in the middle of a grid
    return Method(label, lambda: MethodSetup([GradGuard(**kwargs)]),
                  f"GradGuard({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})",
                  library=True, gradguard=True)


#: Names a variant's arguments may call or use (the library's clipping policies).
VARIANT_NAMES: dict[str, Any] = {
    "ZScoreClip": ZScoreClip, "PercentileClip": PercentileClip, "FixedNormClip": FixedNormClip,
    "NoClip": NoClip, "AdaptiveGradClip": AdaptiveGradClip, "inf": math.inf,
    "True": True, "False": False, "None": None,
}


def _value(node: ast.expr, text: str) -> Any:
    """A literal, a name in :data:`VARIANT_NAMES`, or a call of one with such arguments."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand, text)
        if isinstance(v, (int, float)):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Name) and node.id in VARIANT_NAMES:
        return VARIANT_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(e, text) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        return {_value(k, text): _value(v, text)  # type: ignore[arg-type]
                for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and callable(VARIANT_NAMES.get(node.func.id)):
        args = [_value(a, text) for a in node.args]
        kwargs = {k.arg: _value(k.value, text) for k in node.keywords if k.arg is not None}
        return VARIANT_NAMES[node.func.id](*args, **kwargs)
    raise ValueError(f"method {text!r}: argument values must be literals, "
                     f"{', '.join(VARIANT_NAMES)} or calls of those; got {ast.unparse(node)!r}")


def parse_variant(text: str) -> Method:
    """The GradGuard variant ``"gradguard(k=v, ...)"``, named ``text``.

    Values may be literals (numbers, strings, lists, ...), ``inf``, or calls of the clipping
    policies in :data:`VARIANT_NAMES`; the string is parsed, never evaluated.

    Raises:
        ValueError: ``text`` is not of that form or ``GradGuard`` rejects the arguments.
    """
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"method {text!r}: not a call 'gradguard(<kwargs>)'") from exc
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)
            and tree.func.id == "gradguard" and not tree.args
            and all(k.arg is not None for k in tree.keywords)):
        raise ValueError(f"method {text!r}: expected 'gradguard(<keyword arguments>)'")
    kwargs = {k.arg: _value(k.value, text) for k in tree.keywords if k.arg is not None}
    try:
        return gradguard_variant(name=text, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"method {text!r}: {exc}") from exc
