"""Host synchronisations per optimizer step: ``host_reads()`` and every tensor -> Python
conversion made during the guard's step, against the baselines'."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_gradguard.core import _host
from lightning_gradguard.core.guard import GuardCore

from ..workloads import build_demo, deep_mlp_spec
from .fixtures import grads_of, warmed_zclip

__all__ = ["count_conversions", "run_syncs"]


_CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy",
                "__complex__")


@contextlib.contextmanager
def count_conversions() -> Iterator[dict[str, int]]:
    """Count tensor -> Python conversions made through the Python ``Tensor`` API.

    Conversions done inside C++ (e.g. ``torch.tensor([t0, t1])`` over 0-dim tensors) are
    invisible to this and are noted where they matter.
    """
    counts = dict.fromkeys(_CONVERSIONS, 0)
    saved = {}
    for name in _CONVERSIONS:
        orig = getattr(torch.Tensor, name)
        saved[name] = torch.Tensor.__dict__.get(name, None)

        def make(orig: Any, name: str) -> Any:
            def wrapper(self: torch.Tensor, *a: Any, **k: Any) -> Any:
                counts[name] += 1
                return orig(self, *a, **k)
            return wrapper

        setattr(torch.Tensor, name, make(orig, name))
    try:
        yield counts
    finally:
        for name in _CONVERSIONS:
            if saved[name] is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved[name])


def run_syncs(args: argparse.Namespace, have_zclip: bool) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import grad_norm

    from lightning_gradguard import GradGuard

    out: dict[str, Any] = {}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    core = GuardCore(model, opt)
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def backward(scale: float = 1.0) -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * scale
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    def one(label: str, loss: torch.Tensor | None, **kw: Any) -> None:
        _host.reset_host_reads()
        with count_conversions() as conv:
            report = core.step(loss, **kw)
        out[label] = {"host_reads": _host.host_reads(), "action": report.action.value,
                      "conversions": {k: v for k, v in conv.items() if v}}
        opt.step()

    for _ in range(30):  # warm the statistics
        core.step(backward())
        opt.step()
    backward()
    one("clean step, no loss", None)
    one("clean step, with loss", backward())
    one("spike step (clip)", backward(scale=1e3))
    loss = backward()
    first = model[0]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        grads_of([first.weight])[0].fill_(float("nan"))
    one("first non-finite step (skip + diagnosis)", loss)
    loss = backward()
    with torch.no_grad():
        grads_of([first.weight])[0].fill_(float("nan"))
    one("later non-finite step (skip)", loss)

    # baselines, for reference
    backward()
    with count_conversions() as conv:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    out["baseline clip_grad_norm_"] = {"conversions": {k: v for k, v in conv.items() if v}}
    with count_conversions() as conv:
        grad_norm(model, 2)
    out["baseline lightning grad_norm"] = {
        "conversions": {k: v for k, v in conv.items() if v},
        "note": f"{sum(1 for _ in model.parameters())} parameters: "
                "torch.tensor(list of 0-dim tensors) converts each one"}
    if have_zclip:
        zc = warmed_zclip()
        with count_conversions() as conv:
            zc.step(model)
        out["baseline ZClip.step"] = {"conversions": {k: v for k, v in conv.items() if v}}

    # GradGuard in Trainer.fit: host reads and conversions inside the hook, per step
    class Probe(pl.Callback):
        pass

    guard = GradGuard()
    per_step: list[tuple[int, dict[str, int]]] = []
    orig = guard.on_before_optimizer_step

    def hooked(*a: Any, **k: Any) -> None:
        _host.reset_host_reads()
        with count_conversions() as conv:
            orig(*a, **k)
        per_step.append((_host.host_reads(), dict(conv)))

    guard.on_before_optimizer_step = hooked  # type: ignore[method-assign]
    pl.seed_everything(0, verbose=False)
    demo, dm = build_demo(deep_mlp_spec(64, 3, 32), 20)
    with tempfile.TemporaryDirectory() as tmp:
        from lightning.pytorch.loggers import CSVLogger

        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=20, limit_val_batches=0,
                             num_sanity_val_steps=0, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             log_every_n_steps=5, logger=CSVLogger(tmp),
                             callbacks=[guard, Probe()])
        trainer.fit(demo, datamodule=dm)
    reads = [r for r, _ in per_step]
    conv_total: dict[str, int] = {}
    for _, c in per_step:
        for k, v in c.items():
            conv_total[k] = conv_total.get(k, 0) + v
    out["GradGuard in Trainer.fit"] = {
        "optimizer_steps": len(per_step), "host_reads_per_step": sorted(set(reads)),
        "conversions_total": {k: v for k, v in conv_total.items() if v},
        "note": "log_every_n_steps=5 so logging steps are included",
    }
    return out

