"""Framework-free core: gradient norms, robust statistics, clip policies, LR backoff, guard.

Imports only ``torch``; usable from a plain PyTorch loop, Fabric, or the Lightning callbacks.
"""

from lightning_gradguard.core.backoff import LRBackoff, LRScaler
from lightning_gradguard.core.clip import clip_coef, scale_grads_, skip_step_
from lightning_gradguard.core.diagnosis import Diagnosis, diagnose
from lightning_gradguard.core.growth import GrowthDetector
from lightning_gradguard.core.guard import Action, GuardCore, GuardSettings, StepReport
from lightning_gradguard.core.norms import (
    GradNorms,
    NormReducer,
    collect_grads,
    grad_norms,
    group_by_device_and_dtype,
)
from lightning_gradguard.core.policies import (
    AdaptiveGradClip,
    ClipPolicy,
    FixedNormClip,
    NoClip,
    PercentileClip,
    ZScoreClip,
    unitwise_norm,
)
from lightning_gradguard.core.snapshot import Snapshot
from lightning_gradguard.core.stats import RobustNormStats

__all__ = [
    "Action",
    "AdaptiveGradClip",
    "ClipPolicy",
    "Diagnosis",
    "FixedNormClip",
    "GradNorms",
    "GrowthDetector",
    "GuardCore",
    "GuardSettings",
    "LRBackoff",
    "LRScaler",
    "NoClip",
    "NormReducer",
    "PercentileClip",
    "RobustNormStats",
    "Snapshot",
    "StepReport",
    "ZScoreClip",
    "clip_coef",
    "collect_grads",
    "diagnose",
    "grad_norms",
    "group_by_device_and_dtype",
    "scale_grads_",
    "skip_step_",
    "unitwise_norm",
]
