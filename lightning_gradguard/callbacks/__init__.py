"""Lightning callbacks: thin adapters over :mod:`lightning_gradguard.core`."""

from lightning_gradguard.callbacks.guard import GradGuard, GradGuardHalt, GradGuardWarning
from lightning_gradguard.callbacks.monitor import GradientMonitor

__all__ = ["GradGuard", "GradGuardHalt", "GradGuardWarning", "GradientMonitor"]
