"""Host synchronisations per optimizer step: exactly one per clean guarded step.

Counted two ways:

* the core's own counter, :func:`lightning_gradguard.core._host.host_reads` (every
  tensor -> Python conversion of the core is meant to go through ``to_host``);
* every host synchronisation made during the step, whoever makes it
  (:func:`support.syncs.count_syncs`): a dispatch mode sees every scalar read that
  torch's C++ makes (``item``, ``bool(t)``, ``float(t)``, ``torch.is_nonzero``, formatting,
  ``torch.equal``...), and wrapped ``torch.Tensor`` methods see the copies that never reach
  the dispatcher on CPU (``tolist``, ``numpy``, ``cpu()``, ``to("cpu")``). This catches
  conversions that bypass ``to_host``: each one is a hidden device -> host synchronisation
  on an accelerator.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from support.core import batches, loss_fn
from support.modules import make_net
from support.syncs import count_syncs, nonzero

from lightning_gradguard.core import (
    AdaptiveGradClip,
    ClipPolicy,
    FixedNormClip,
    GuardCore,
    NoClip,
    PercentileClip,
    ZScoreClip,
)
from lightning_gradguard.core._host import host_reads, reset_host_reads
from lightning_gradguard.core.guard import Action


def measured_step(guard: GuardCore, loss: torch.Tensor | None = None,
                  **kwargs: Any) -> tuple[Any, int, dict[str, int]]:
    """Run ``guard.step`` and return (report, host reads, non-zero conversion counts)."""
    reset_host_reads()
    with count_syncs() as conv:
        report = guard.step(loss, **kwargs)
    return report, host_reads(), nonzero(conv)


def test_sync_counter_sees_every_kind() -> None:
    t = torch.tensor(1.5)
    v = torch.tensor([1.0, 2.0])
    with count_syncs() as conv:
        bool(t)
        float(t)
        int(t)
        t.item()
        f"{t:.1f}"  # formatting a 0-dim tensor reads it
        if torch.tensor(True):
            pass
        torch.is_nonzero(torch.isfinite(t))  # made inside torch's C++: no Python method
        torch.equal(v, v)
    assert nonzero(conv) == {"scalar": 7, "equal": 1}
    with count_syncs() as conv:
        v.tolist()
        v.numpy()
        v.cpu()
        v.to("cpu")
        v.to(device="cpu", dtype=torch.float64)
        v.to(torch.float64)  # not a device move
    assert nonzero(conv) == {"tolist": 1, "numpy": 1, "cpu": 1, "to": 2}
    # restored afterwards
    assert "wrapper" not in repr(torch.Tensor.tolist)
    assert "to" not in torch.Tensor.__dict__
    with count_syncs() as conv:
        pass
    assert nonzero(conv) == {}


def _policies() -> list[Callable[[], ClipPolicy]]:
    return [ZScoreClip, lambda: ZScoreClip(warmup_steps=0), lambda: FixedNormClip(100.0),
            NoClip, lambda: PercentileClip(min_history=2, history_size=8),
            lambda: AdaptiveGradClip(clipping=10.0)]


@pytest.mark.parametrize("make_policy", _policies(),
                         ids=["zscore", "zscore-nowarmup", "fixed", "noclip", "percentile",
                              "agc"])
@pytest.mark.parametrize("with_loss", [False, True], ids=["no-loss", "loss"])
@pytest.mark.parametrize("growth_patience", [5, 0], ids=["growth", "no-growth"])
def test_clean_step_reads_host_exactly_once(
    make_policy: Callable[[], ClipPolicy], with_loss: bool, growth_patience: int
) -> None:
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GuardCore(model, opt, clip=make_policy(), growth_patience=growth_patience)
    for t, batch in enumerate(batches(12)):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        report, reads, conv = measured_step(guard, loss.detach() if with_loss else None)
        assert report.finite
        assert reads == 1, f"step {t}: {reads} host reads"
        assert conv == {"tolist": 1}, f"step {t}: conversions {conv}"
        opt.step()


def test_clipping_step_reads_host_exactly_once() -> None:
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GuardCore(model, opt, clip=FixedNormClip(1e-4))  # every step clips
    for t, batch in enumerate(batches(6)):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        report, reads, conv = measured_step(guard, loss.detach())
        assert report.action is Action.CLIP
        assert reads == 1, f"step {t}: {reads} host reads"
        assert conv == {"tolist": 1}, f"step {t}: conversions {conv}"
        opt.step()


def test_spike_with_lr_backoff_reads_host_exactly_once() -> None:
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # a fixed threshold far above the cap: the spikes' clipped updates are over the update
    # cap, the evidence a spike-count backoff needs
    guard = GuardCore(model, opt, clip=FixedNormClip(1000.0), spike_patience=1)
    data = batches(12)
    for t, batch in enumerate(data):
        opt.zero_grad()
        loss = loss_fn(model, batch) * (1e4 if t in (8, 10) else 1.0)
        loss.backward()
        report, reads, conv = measured_step(guard, loss.detach())
        if t in (8, 10):
            assert report.spike
            assert report.backoff
        assert reads == 1, f"step {t}: {reads} host reads"
        assert conv == {"tolist": 1}, f"step {t}: conversions {conv}"
        opt.step()


def test_snapshot_step_reads_host_exactly_once() -> None:
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = GuardCore(model, opt, rollback=True, snapshot_every=2)
    for t, batch in enumerate(batches(5)):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        _, reads, conv = measured_step(guard, loss.detach())
        assert reads == 1, f"step {t}: {reads} host reads"
        assert conv == {"tolist": 1}, f"step {t}: conversions {conv}"
        opt.step()
    assert guard.snapshot is not None
    assert guard.snapshot.available


def test_nonfinite_steps_convert_only_through_to_host() -> None:
    """Non-finite steps are the rare path (a diagnosis may read per-tensor norms once more),
    but every conversion still goes through ``to_host``."""
    model = make_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GuardCore(model, opt, halt_after=3)
    for t, batch in enumerate(batches(6)):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        nan = t >= 2
        if nan:
            with torch.no_grad():
                weight = model[0].weight
                assert isinstance(weight, torch.Tensor)
                assert weight.grad is not None
                weight.grad[0, 0] = float("nan")
        report, reads, conv = measured_step(guard, loss.detach())
        assert report.finite is not nan
        assert 1 <= reads <= 2, f"step {t}: {reads} host reads"
        assert conv == {"tolist": reads}, f"step {t}: conversions {conv}"
        if nan and report.diagnosis is None:
            assert reads == 1
        opt.step()


def test_gradguard_in_trainer_fit_reads_host_once_per_optimizer_step(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger
    from support.modules import TinyRegression
    from torch.utils.data import TensorDataset

    from lightning_gradguard import GradGuard

    data = batches(8)
    ds = TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    guard = GradGuard()
    per_step: list[tuple[int, dict[str, int]]] = []
    hook = guard.on_before_optimizer_step

    def counted(*args: Any, **kwargs: Any) -> None:
        reset_host_reads()
        with count_syncs() as conv:
            hook(*args, **kwargs)
        per_step.append((host_reads(), nonzero(conv)))

    guard.on_before_optimizer_step = counted  # type: ignore[method-assign]
    max_steps = 8
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, log_every_n_steps=2,
        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.callbacks.append(guard)
    # make_net(seed=0), SGD(lr=0.01, momentum=0.9), logs train_loss; batches(8) in order
    trainer.fit(TinyRegression(lr=0.01, opt="sgdm", data=ds))
    assert trainer.global_step == max_steps
    assert guard.summary()["steps"] == max_steps
    assert len(per_step) == max_steps
    for t, (reads, conv) in enumerate(per_step):
        assert reads == 1, f"optimizer step {t}: {reads} host reads"
        assert conv == {"tolist": 1}, f"optimizer step {t}: conversions {conv}"
