"""Micro benchmark: the guard's work per optimizer step against ``clip_grad_norm_``, ZClip,
Lightning's ``grad_norm`` and the floor (one fused read), on synthetic parameter sets."""

from __future__ import annotations

import argparse
import copy
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_gradguard.core.guard import Action, GuardCore

from .fixtures import (
    CLEAN_NORM,
    SPIKE,
    ParamSet,
    grads_of,
    make_grads,
    total,
    warmed_guard_state,
    warmed_zclip,
)
from .timing import Timed, fmt_t, log, measure, median

__all__ = ["micro_methods", "run_micro"]


def micro_methods(ps: ParamSet, base: list[torch.Tensor], have_zclip: bool,
                  state0: dict[str, Any], zclip0: Any) -> list[Timed]:
    from lightning.pytorch.utilities import grad_norm

    params = list(ps.parameters())
    grads = grads_of(params)
    core = GuardCore(params, optimizer=None)

    def reset(spike: bool) -> Callable[[], None]:
        def f() -> None:
            torch._foreach_copy_(grads, base)
            if spike:
                torch._foreach_mul_(grads, SPIKE)
        return f

    def reset_guard(spike: bool) -> Callable[[], None]:
        r = reset(spike)

        def f() -> None:
            r()
            core.load_state_dict(state0)
        return f

    def check_guard(expected: Action) -> Callable[[Any], str]:
        def f(report: Any) -> str:
            if report.action is not expected:
                raise RuntimeError(f"guard took {report.action}, expected {expected}")
            return f"action={report.action.value}, threshold={report.threshold:.3g}"
        return f

    def check_clip(spike: bool) -> Callable[[Any], str]:
        def f(_: Any) -> str:
            after = total(grads)
            clipped = abs(after - CLEAN_NORM * (SPIKE if spike else 1.0)) > 1e-4
            if spike != clipped:
                raise RuntimeError(f"norm after call {after}, expected clipping={spike}")
            return f"norm after: {after:.3g}"
        return f

    ms = [
        Timed("floor", lambda: torch._foreach_norm(grads), reset(False)),
        Timed("guard", core.step, reset_guard(False), check_guard(Action.NONE)),
        Timed("clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
               reset(False), check_clip(False)),
        Timed("lightning_grad_norm", lambda: grad_norm(ps, norm_type=2), reset(False)),
        Timed("guard_spike", core.step, reset_guard(True), check_guard(Action.CLIP)),
        Timed("clip_grad_norm__spike", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
               reset(True), check_clip(True)),
    ]
    if have_zclip:
        holder: dict[str, Any] = {}

        def reset_z(spike: bool) -> Callable[[], None]:
            r = reset(spike)

            def f() -> None:
                r()
                holder["z"] = copy.deepcopy(zclip0)
            return f

        ms += [
            Timed("zclip", lambda: holder["z"].step(ps), reset_z(False), check_clip(False)),
            Timed("zclip_spike", lambda: holder["z"].step(ps), reset_z(True),
                   check_clip(True)),
        ]
    return ms


def run_micro(args: argparse.Namespace, have_zclip: bool) -> dict[str, Any]:
    state0 = warmed_guard_state()
    zclip0 = warmed_zclip() if have_zclip else None
    rows = []
    for n_tensors, n_params in args.grid:
        t0 = time.perf_counter()
        ps = ParamSet(n_tensors, n_params)
        params = list(ps.parameters())
        base = make_grads(params, CLEAN_NORM)
        methods = micro_methods(ps, base, have_zclip, state0, zclip0)
        measure(methods, args.repeats, warmup=2, block_s=args.block_s)
        res = {m.name: median(m.times) for m in methods}
        spread = {m.name: (min(m.times), max(m.times)) for m in methods}
        notes = {m.name: m.note for m in methods if m.note}
        rows.append({"tensors": len(params), "params": ps.numel,
                     "grad_bytes": sum(b.numel() * b.element_size() for b in base),
                     "median_s": res, "range_s": spread, "notes": notes,
                     "wall_s": {m.name: median(m.wall) for m in methods},
                     "calls": {m.name: m.calls for m in methods}})
        log(f"micro {len(params):>5} tensors {ps.numel / 1e6:6.1f}M params: "
             + ", ".join(f"{k}={fmt_t(v)}" for k, v in res.items())
             + f"  [{time.perf_counter() - t0:.1f}s]")
        del ps, params, base, methods
        gc.collect()
    # Per-tensor fixed cost: tiny tensors (16 elements), so bytes do not matter.
    tiny = []
    for n_tensors in args.tiny_tensors:
        ps = ParamSet(n_tensors, 16 * n_tensors // 2)
        params = list(ps.parameters())
        base = make_grads(params, CLEAN_NORM)
        methods = micro_methods(ps, base, have_zclip, state0, zclip0)
        measure(methods, args.repeats, warmup=2, block_s=args.block_s / 3)
        tiny.append({"tensors": len(params), "params": ps.numel,
                     "median_s": {m.name: median(m.times) for m in methods}})
    return {"rows": rows, "tiny": tiny}

