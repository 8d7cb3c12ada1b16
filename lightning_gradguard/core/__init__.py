"""Framework-free core: gradient norms, robust statistics, clip policies, LR backoff, guard.

Imports only ``torch``; usable from a plain PyTorch loop, Fabric, or the Lightning callbacks.
"""

from lightning_gradguard.core.backoff import LRBackoff, LRScaler
from lightning_gradguard.core.clip import clip_coef, scale_grads_, skip_step_
from lightning_gradguard.core.decide import Decision, GuardState, decide
from lightning_gradguard.core.diagnosis import (
    CAUSES,
    EVENTS,
    Cause,
    Diagnosis,
    DiagnosisThresholds,
    Diagnostician,
    diagnose,
)
from lightning_gradguard.core.growth import GrowthDetector
from lightning_gradguard.core.guard import Action, GuardCore, GuardCounters, StepReport
from lightning_gradguard.core.measure import HostValues, Measurement
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
from lightning_gradguard.core.progress import LossTrend
from lightning_gradguard.core.settings import GuardSettings
from lightning_gradguard.core.snapshot import Snapshot
from lightning_gradguard.core.stats import RobustNormStats
from lightning_gradguard.core.streaks import Streaks
from lightning_gradguard.core.update_cap import (
    NormalisedUpdates,
    NoUpdateControl,
    SGDUpdateCap,
    UpdateControl,
    UpdateLimit,
    make_update_control,
)

__all__ = [
    "CAUSES",
    "EVENTS",
    "Action",
    "AdaptiveGradClip",
    "Cause",
    "ClipPolicy",
    "Decision",
    "Diagnosis",
    "DiagnosisThresholds",
    "Diagnostician",
    "FixedNormClip",
    "GradNorms",
    "GrowthDetector",
    "GuardCore",
    "GuardCounters",
    "GuardSettings",
    "GuardState",
    "HostValues",
    "LRBackoff",
    "LRScaler",
    "LossTrend",
    "Measurement",
    "NoClip",
    "NormalisedUpdates",
    "NoUpdateControl",
    "NormReducer",
    "PercentileClip",
    "RobustNormStats",
    "SGDUpdateCap",
    "Snapshot",
    "StepReport",
    "Streaks",
    "UpdateControl",
    "UpdateLimit",
    "ZScoreClip",
    "clip_coef",
    "collect_grads",
    "decide",
    "diagnose",
    "grad_norms",
    "group_by_device_and_dtype",
    "make_update_control",
    "scale_grads_",
    "skip_step_",
    "unitwise_norm",
]
