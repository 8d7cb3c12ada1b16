"""The guard's settings, defined once.

:class:`GuardSettings` is the single source of truth for every setting of
:class:`~lightning_gradguard.core.GuardCore`; the Lightning callback
:class:`~lightning_gradguard.GradGuard` repeats them as explicit keyword arguments (LightningCLI
builds its configuration from the signature), and a test checks that names, defaults and
documentation agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gradguard.core._friendly import friendly_kwargs
from lightning_gradguard.core._validation import check_bool, check_int, check_number
from lightning_gradguard.core.policies import ClipPolicy, ZScoreClip

__all__ = ["GuardSettings"]


@friendly_kwargs
@dataclass
class GuardSettings:
    """Validated settings shared by :class:`~lightning_gradguard.core.GuardCore` and the callbacks.

    Args:
        clip: Threshold policy (default :class:`~lightning_gradguard.core.policies.ZScoreClip`).
        norm_type: Norm used for detection and clipping (2 or ``inf``, or any p > 0).
        skip_nonfinite: Skip steps with non-finite gradients or loss.
        lr_backoff: Enable learning-rate backoff.
        backoff_factor: LR scale multiplier per backoff, in (0, 1).
        recovery_steps: Clean steps to undo one backoff.
        min_lr_scale: Floor of the LR scale.
        spike_patience: Spikes within ``spike_window`` steps that trigger a backoff (0: never).
            Steps clipped by the armed SGD update cap (``max_update_ratio``) count like spikes; the
            update control may also decide that a small spike does not count (with
            ``torch.optim.SGD``: see :class:`~lightning_gradguard.core.update_cap.SGDUpdateCap`).
            When the count (or ``growth_patience``) is reached, the LR backs off only with
            evidence that it is too high: this update was clipped by the update cap, at least
            5 of the last 10 steps were clipped, or the LR is already backed off; otherwise the
            clip has answered the spikes and the count restarts
            (:mod:`~lightning_gradguard.core.decide`).
        spike_window: Window (in optimizer steps) for ``spike_patience``.
        growth_patience: Consecutive rising norms that trigger a backoff (0: off; the backoff
            needs the same evidence as a spike-count one). Growth
            counts under the same condition as a spike; until it counts the detector stays
            armed (a rise that goes on counts at its first large update) and nothing is
            recorded (``growth_events``, ``StepReport.growth``).
        growth_min_rise: Minimum relative rise that counts for ``growth_patience``.
        rollback: Keep a last-good snapshot and restore it when training cannot recover.
        snapshot_every: Steps between snapshots (with ``rollback``).
        rollback_after: Consecutive non-finite steps that trigger a rollback.
        halt_after: Consecutive non-finite steps that halt training (0: never). Under a
            GradScaler, steps it skips (finite loss, non-finite gradients) are its
            calibration and do not count; ``amp_halt_after`` of them in a row halt training
            instead (unless ``halt_after`` is 0).
        max_update_ratio: Largest relative weight change ``lr * ||g|| / ||w||`` of one
            update, for optimizers whose update is a known function of the gradient (plain
            ``torch.optim.SGD``, momentum not counted; the LR is the largest group LR times
            the backoff scale). The cap is armed once the run shows the signature of an LR
            above SGD's stability limit (an update over the cap whose gradient grew 5-fold or
            more: in one step, or over consecutive rising steps against the largest norm of
            the up to 10 steps before them); from then on the gradient is clipped to it and a
            step clipped by it counts toward an LR backoff like a spike. A large update alone
            (early steps against large targets, small or zero-initialised weights) arms
            nothing. This protects the first steps, before any history exists, from a learning
            rate that is far too high. ``None`` disables it; other optimizers (Adam,
            RMSprop, ...) normalise their updates and are not affected. Details:
            :mod:`~lightning_gradguard.core.update_cap`.
        amp_halt_after: Consecutive steps a GradScaler skipped (finite loss, non-finite
            gradients) after which they are no longer its calibration: it halved its scale at
            each one, so gradients still non-finite are non-finite at any scale (e.g. sqrt or
            log at 0 in the backward). Training halts there, with the diagnosis (unless
            ``halt_after`` is 0).
        nonfinite_window: A non-finite step (gradients or loss) is skipped; it backs the LR
            off only if another non-finite step came within this many steps (the one
            ``nonfinite_window`` steps earlier does not count). One corrupt batch is the
            batch's fault and the skip left weights and optimizer state untouched, so it
            costs one skipped step; repeated ones mean the weights or the LR produce them.
            Rollback (``rollback_after``) and halt (``halt_after``) count consecutive
            non-finite steps as before. ``0``: every non-finite step backs the LR off (the
            behaviour before this setting existed).
        diagnose: Diagnose the cause of an explosion (ranked causes with evidence and
            remedy, see :class:`~lightning_gradguard.core.diagnosis.Diagnostician`): the model
            is inspected when the guard is built, the first forward pass is probed, the
            first step reads the per-layer gradient and weight norms in its one host read
            (a pre-flight finding when that evidence already shows an explosion), and the
            first LR backoff, the first non-finite step and the halt are diagnosed. A spike
            is not (clipping contains it), and a backoff counts as an explosion only with
            growth behind it (without, only causes the evidence shows on its own are named).
        preflight: Report the causes the first step's evidence already shows (a warning
            from the callbacks, ``StepReport.causes`` of the first step), before anything
            explodes (needs ``diagnose``; ``False``: the evidence is still recorded).
        verbose: Print what happened (the callbacks): a one-line summary at the end of fit
            when the guard did anything, a rate-limited notice at each LR backoff, the
            pre-flight and first-non-finite warnings. Warnings of a halt are always shown.

    Raises:
        TypeError, ValueError: Naming the argument, what is allowed and what was received.

    Example:
        >>> GuardSettings(halt_after=-1)
        Traceback (most recent call last):
        ...
        ValueError: `halt_after` must be an int >= 0, got -1
    """

    clip: ClipPolicy | None = None
    norm_type: float = 2.0
    skip_nonfinite: bool = True
    lr_backoff: bool = True
    backoff_factor: float = 0.5
    recovery_steps: int = 200
    min_lr_scale: float = 1e-3
    spike_patience: int = 3
    spike_window: int = 50
    growth_patience: int = 5
    growth_min_rise: float = 0.05
    rollback: bool = False
    snapshot_every: int = 100
    rollback_after: int = 3
    halt_after: int = 25
    max_update_ratio: float | None = 0.1
    amp_halt_after: int = 40
    nonfinite_window: int = 50
    diagnose: bool = True
    preflight: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.clip is None:
            self.clip = ZScoreClip()
        elif not isinstance(self.clip, ClipPolicy):
            raise TypeError(
                "`clip` must be a ClipPolicy (NoClip, FixedNormClip, ZScoreClip, "
                f"PercentileClip, AdaptiveGradClip) or None, got {self.clip!r}"
            )
        check_number("norm_type", self.norm_type, low=0.0, low_inclusive=False, allow_inf=True)
        check_bool("skip_nonfinite", self.skip_nonfinite)
        check_bool("lr_backoff", self.lr_backoff)
        check_number("backoff_factor", self.backoff_factor, low=0.0, high=1.0,
                     low_inclusive=False, high_inclusive=False)
        check_int("recovery_steps", self.recovery_steps, low=1)
        check_number("min_lr_scale", self.min_lr_scale, low=0.0, high=1.0, low_inclusive=False)
        check_int("spike_patience", self.spike_patience, low=0)
        check_int("spike_window", self.spike_window, low=1)
        check_int("growth_patience", self.growth_patience, low=0)
        check_number("growth_min_rise", self.growth_min_rise, low=0.0)
        check_bool("rollback", self.rollback)
        check_int("snapshot_every", self.snapshot_every, low=1)
        check_int("rollback_after", self.rollback_after, low=1)
        check_int("halt_after", self.halt_after, low=0)
        check_int("amp_halt_after", self.amp_halt_after, low=1)
        check_int("nonfinite_window", self.nonfinite_window, low=0)
        check_bool("diagnose", self.diagnose)
        check_bool("preflight", self.preflight)
        check_bool("verbose", self.verbose)
        if self.max_update_ratio is not None:
            check_number("max_update_ratio", self.max_update_ratio, low=0.0,
                         low_inclusive=False)

    @property
    def policy(self) -> ClipPolicy:
        """The clip policy (never ``None`` after construction)."""
        assert self.clip is not None  # set in __post_init__
        return self.clip
