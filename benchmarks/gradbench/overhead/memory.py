"""Memory benchmark: the guard's persistent state, bytes allocated during one step, a peak-RSS
cross-check, and the opt-in rollback snapshot, separately."""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_gradguard.core.guard import Action, GuardCore

from ..workloads import build_demo, deep_mlp_spec
from .e2e import demo_loss
from .fixtures import (
    CLEAN_NORM,
    SPIKE,
    ParamSet,
    grads_of,
    make_grads,
    warmed_guard_state,
    warmed_zclip,
)

__all__ = ["allocated_during", "peak_rss_added", "run_memory", "snapshot_via_callback"]


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def allocated_during(fn: Callable[[], Any]) -> tuple[int, int]:
    """(bytes allocated, net bytes still held) by torch ops inside ``fn`` (CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with contextlib.redirect_stderr(open(os.devnull, "w")), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    alloc = net = 0
    for e in prof.events():
        mem = e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage
        net += mem
        alloc += max(0, mem)
    return alloc, net


def _rss_kib() -> tuple[int, int]:
    s = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", s).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", s).group(1))  # type: ignore[union-attr]
    return rss, hwm


def peak_rss_added(fn: Callable[[], Any]) -> int | None:
    """Peak RSS during ``fn`` minus RSS before it, in bytes (Linux; None if unavailable)."""
    try:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before, _ = _rss_kib()
        fn()
        _, peak = _rss_kib()
        return (peak - before) * 1024
    except Exception:
        return None


def _gradient_set(n_tensors: int, n_params: int) -> tuple[
        ParamSet, list[torch.nn.Parameter], list[torch.Tensor], list[torch.Tensor], GuardCore,
        dict[str, Any]]:
    """A parameter set with clean gradients (``base``, and the live ``grads`` to reset), a
    guard on it, and the row's size columns."""
    ps = ParamSet(n_tensors, n_params)
    params = list(ps.parameters())
    base = make_grads(params, CLEAN_NORM)
    row: dict[str, Any] = {"tensors": len(params), "params": ps.numel,
                           "grad_bytes": sum(b.numel() * b.element_size() for b in base)}
    return ps, params, base, grads_of(params), GuardCore(params), row


def _memory_row(n_tensors: int, n_params: int, state0: dict[str, Any],
                zclip0: Any) -> dict[str, Any]:
    """Persistent state and bytes allocated during one call, for one parameter set."""
    ps, params, base, grads, core, row = _gradient_set(n_tensors, n_params)
    core.load_state_dict(state0)
    torch._foreach_copy_(grads, base)
    core.step()
    row["state_bytes"] = _tensor_bytes(core.state_dict())
    for spike in (False, True):
        core.load_state_dict(state0)
        torch._foreach_copy_(grads, base)
        if spike:
            torch._foreach_mul_(grads, SPIKE)
        row["alloc_spike" if spike else "alloc_clean"] = allocated_during(core.step)[0]
        report = core.last_report
        if report is None or report.action is not (Action.CLIP if spike else Action.NONE):
            raise RuntimeError(f"unexpected guard action: {report}")
    torch._foreach_copy_(grads, base)
    row["alloc_clip_grad_norm_"] = allocated_during(
        lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))[0]
    if zclip0 is not None:
        z = copy.deepcopy(zclip0)
        torch._foreach_copy_(grads, base)
        row["alloc_zclip"] = allocated_during(lambda: z.step(ps))[0]
    return row


def _rss_check(n_tensors: int, n_params: int, state0: dict[str, Any],
               zclip0: Any) -> dict[str, Any]:
    """Peak RSS added by one call of each method on a large gradient set."""
    ps, params, base, grads, core, rss = _gradient_set(n_tensors, n_params)
    holder: dict[str, Any] = {}
    cases: list[tuple[str, Callable[[], Any], bool]] = [
        ("guard", core.step, False), ("guard_spike", core.step, True),
        ("clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), False),
        ("clone (reference: one copy of the grads)", lambda: [g.clone() for g in grads], False),
    ]
    if zclip0 is not None:
        cases.append(("zclip", lambda: holder["z"].step(ps), False))
    for name, fn, spike in cases:
        vals = []
        for _ in range(3):
            core.load_state_dict(state0)
            holder["z"] = copy.deepcopy(zclip0)
            torch._foreach_copy_(grads, base)
            if spike:
                torch._foreach_mul_(grads, SPIKE)
            v = peak_rss_added(fn)
            if v is not None:
                vals.append(v)
        rss[name] = min(vals) if vals else None
    return rss


def run_memory(args: argparse.Namespace, have_zclip: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    state0 = warmed_guard_state()
    zclip0 = warmed_zclip() if have_zclip else None
    out["rows"] = []
    for n_tensors in args.mem_tensors:
        out["rows"].append(_memory_row(n_tensors, args.mem_params, state0, zclip0))
        gc.collect()
    out["rss"] = _rss_check(args.rss_tensors, args.rss_params, state0, zclip0)
    gc.collect()

    # rollback snapshot (opt-in), reported separately
    snaps = []
    for opt_name in ("sgd_momentum", "adam"):
        from lightning_gradguard.demos import build_optimizer

        torch.manual_seed(0)
        spec = deep_mlp_spec(args.width, args.depth, args.batch, optimizer=opt_name)
        model, dm = build_demo(spec, 1)
        opt = build_optimizer(model.parameters(), opt_name, spec.model_kwargs["lr"])
        core = GuardCore(model, opt, rollback=True)
        demo_loss(model, dm).backward()  # type: ignore[no-untyped-call]
        t0 = time.perf_counter()
        core.step()  # step 1 captures the snapshot (before the optimizer step of step 1)
        t_capture_step = time.perf_counter() - t0
        opt.step()
        assert core.snapshot is not None
        assert core.snapshot.available
        t0 = time.perf_counter()
        core.snapshot.capture(model, [opt], 1)
        t_capture = time.perf_counter() - t0
        snaps.append({
            "optimizer": opt_name,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "model_state_bytes": _tensor_bytes(model.state_dict()),
            "optim_state_bytes": _tensor_bytes(opt.state_dict()),
            "snapshot_bytes": core.snapshot.nbytes,
            "capture_s": t_capture, "first_step_s": t_capture_step,
        })
    out["snapshot"] = snaps
    out["snapshot_callback"] = snapshot_via_callback(args)
    return out


def snapshot_via_callback(args: argparse.Namespace) -> dict[str, Any]:
    """``GradGuard(rollback=True)`` in a short fit: the callback's snapshot size.

    ``snapshot_every=2`` so that the snapshot of step 3 includes the optimizer state
    (the step-1 snapshot is taken before the first update, when SGD has no momentum yet).
    """
    import lightning.pytorch as pl

    from lightning_gradguard import GradGuard

    pl.seed_everything(0, verbose=False)
    model, dm = build_demo(deep_mlp_spec(args.width, args.depth, args.batch), 3)
    guard = GradGuard(rollback=True, snapshot_every=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, limit_val_batches=0,
                         num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[guard])
    trainer.fit(model, datamodule=dm)
    core = guard.cores[0]
    assert core.snapshot is not None
    return {"snapshot_bytes": core.snapshot.nbytes,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "optimizer": model.optimizer_name, "step": core.snapshot.step}

