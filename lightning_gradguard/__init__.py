"""lightning_gradguard: stop exploding gradients from wrecking training runs.

``Trainer(callbacks=[GradGuard()])`` watches every optimizer step. The framework-free core
(:mod:`lightning_gradguard.core`) imports only torch; the Lightning callbacks are loaded
lazily so ``import lightning_gradguard.core`` works without Lightning installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_gradguard.core import (
    AdaptiveGradClip,
    ClipPolicy,
    FixedNormClip,
    GuardCore,
    GuardSettings,
    NoClip,
    PercentileClip,
    StepReport,
    ZScoreClip,
)

if TYPE_CHECKING:
    from lightning_gradguard.callbacks import GradGuard, GradientMonitor

#: The one source of the version: pyproject.toml reads it ([tool.setuptools.dynamic]).
__version__ = "0.1.0"

__all__ = [
    "AdaptiveGradClip",
    "ClipPolicy",
    "FixedNormClip",
    "GradGuard",
    "GradientMonitor",
    "GuardCore",
    "GuardSettings",
    "NoClip",
    "PercentileClip",
    "StepReport",
    "ZScoreClip",
    "__version__",
]

_LAZY = {"GradGuard", "GradientMonitor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lightning_gradguard import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")
