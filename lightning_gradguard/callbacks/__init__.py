"""Lightning callbacks: thin adapters over :mod:`lightning_gradguard.core`."""

from lightning_gradguard.callbacks.guard import GradGuard, GradGuardHalt
from lightning_gradguard.callbacks.monitor import GradientMonitor

__all__ = ["GradGuard", "GradGuardHalt", "GradientMonitor"]
