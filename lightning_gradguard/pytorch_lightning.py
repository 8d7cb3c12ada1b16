"""The callbacks for projects on the standalone ``pytorch_lightning`` package.

``pytorch_lightning.Trainer`` only accepts ``pytorch_lightning.Callback`` subclasses, so
projects on that namespace import from here; the behaviour is the same code as
:mod:`lightning_gradguard.callbacks` (``lightning.pytorch``)::

    import pytorch_lightning as pl
    from lightning_gradguard.pytorch_lightning import GradGuard

    trainer = pl.Trainer(callbacks=[GradGuard()])
"""

from __future__ import annotations

from pytorch_lightning import Callback

from lightning_gradguard.callbacks.guard import GradGuardHalt, GradGuardLogic
from lightning_gradguard.callbacks.monitor import GradientMonitorLogic

__all__ = ["GradGuard", "GradGuardHalt", "GradientMonitor"]


class GradGuard(GradGuardLogic, Callback):  # type: ignore[misc]  # noqa: D101
    __doc__ = GradGuardLogic.__doc__


class GradientMonitor(GradientMonitorLogic, Callback):  # type: ignore[misc]  # noqa: D101
    __doc__ = GradientMonitorLogic.__doc__
