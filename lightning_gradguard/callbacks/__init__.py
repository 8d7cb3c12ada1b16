"""Lightning callbacks: thin adapters over :mod:`lightning_gradguard.core`."""

from lightning_gradguard.callbacks.guard import GradGuard, GradGuardHalt

__all__ = ["GradGuard", "GradGuardHalt"]
