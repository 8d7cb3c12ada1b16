"""End-to-end benchmark: ``Trainer.fit`` time per optimizer step on the demo models, every
configuration (a method of the registry) interleaved with the others, plus the time inside each
method's hook and the guard's work on the same model's gradients outside Lightning."""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.core.guard import GuardCore

from ..methods import get_method
from ..workloads import DemoSpec, build_demo, e2e_spec
from .fixtures import CLEAN_NORM, grads_of, total, warmed_guard_state
from .timing import Timed, fmt_t, log, measure, median, timed

__all__ = ["E2E_CONFIGS", "FLOOR_CFG", "demo_loss", "e2e_configs", "run_e2e", "run_fit"]

#: In-step reference: one fused read of the gradients and one host read, nothing decided.
FLOOR_CFG = "floor: one gradient read"

#: Report label -> registry method (:mod:`gradbench.methods`), in the order they run.
E2E_CONFIGS: dict[str, str] = {
    "none": "none", FLOOR_CFG: "floor", "gradient_clip_val=1.0": "clip1",
    "GradGuard()": "gradguard", "ZClipLightningCallback()": "zclip",
    "GradientMonitor()": "monitor",
}


def demo_loss(model: Any, dm: Any) -> torch.Tensor:
    """The loss of ``dm``'s first training batch, computed like ``DemoModule.training_step``
    (``compute_loss(model(inputs), target)``, without its ``self.log``, which needs a
    Trainer); the model is put in training mode."""
    dm.setup("fit")
    inputs, target = next(iter(dm.train_dataloader()))
    model.train()
    loss: torch.Tensor = model.compute_loss(model(inputs), target)
    return loss



def e2e_configs(have_zclip: bool) -> tuple[list[str], dict[str, str]]:
    """The configurations that can run here, and those skipped (with the reason)."""
    names = ["none", FLOOR_CFG, "gradient_clip_val=1.0", "GradGuard()"]
    skipped = {}
    if have_zclip:
        names.append("ZClipLightningCallback()")
    else:
        skipped["ZClipLightningCallback()"] = "zclip not installed"
    try:
        get_method("monitor").build()
        names.append("GradientMonitor()")
    except Exception as exc:  # not implemented yet / broken: report, do not fail
        skipped["GradientMonitor()"] = f"not importable: {type(exc).__name__}: {exc}"
    return names, skipped


def run_fit(config: str, spec: DemoSpec, args: argparse.Namespace,
            tmp: Path) -> dict[str, Any]:
    """One fit of ``spec`` with configuration ``config``: per-step and in-hook times."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    class StepClock(Callback):
        def __init__(self, guards: list[GradGuard], core_acc: list[tuple[float, float]]) -> None:
            self.t: list[float] = []
            self.c: list[float] = []
            self.guards, self.core_acc = guards, core_acc

        def on_train_start(self, *a: Any, **k: Any) -> None:
            # also time GuardCore.step inside the hook (adapter cost): each core built by the
            # guards' on_train_start gets its own bound method wrapped, nothing else
            for guard in self.guards:
                for core in guard.cores.values():
                    core.step = timed(core.step, self.core_acc)  # type: ignore[method-assign]

        def on_train_batch_end(self, *a: Any, **k: Any) -> None:
            self.t.append(time.perf_counter())
            self.c.append(time.thread_time())

    method = get_method(E2E_CONFIGS[config])
    steps = args.e2e_warmup + args.e2e_steps
    pl.seed_everything(0, verbose=False)
    model, dm = build_demo(spec, steps)
    hook: list[tuple[float, float]] = []
    core_acc: list[tuple[float, float]] = []
    setup = method.build()
    clock = StepClock([cb for cb in setup.callbacks if isinstance(cb, GradGuard)]
                      if method.gradguard else [], core_acc)
    if "gradient_clip_val" in setup.trainer_kwargs:
        model.configure_gradient_clipping = timed(model.configure_gradient_clipping, hook)
    for cb in setup.callbacks:
        cb.on_before_optimizer_step = timed(cb.on_before_optimizer_step,  # type: ignore[method-assign]
                                            hook)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0,
        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(tmp, name=re.sub(r"\W", "_", f"{spec.key}_{config}")),
        callbacks=[*setup.callbacks, clock], **setup.trainer_kwargs,
    )
    trainer.fit(model, datamodule=dm)
    if trainer.global_step != steps:
        raise RuntimeError(f"fit ran {trainer.global_step} steps, expected {steps}")
    w = args.e2e_warmup - 1
    wall = [b - a for a, b in zip(clock.t, clock.t[1:], strict=False)][w:]
    cpu = [b - a for a, b in zip(clock.c, clock.c[1:], strict=False)][w:]
    return {
        "step_s": median(cpu),
        "step_wall_s": median(wall),
        "hook_s": median([c for _, c in hook[args.e2e_warmup:]]) if hook else 0.0,
        "hook_mean_s": (statistics.fmean([c for _, c in hook[args.e2e_warmup:]]) if hook
                        else 0.0),
        "hook_wall_s": median([t for t, _ in hook[args.e2e_warmup:]]) if hook else 0.0,
        "core_s": (median([c for _, c in core_acc[args.e2e_warmup:]]) if core_acc
                   else float("nan")),
        "params": sum(p.numel() for p in model.parameters()),
        "tensors": sum(1 for _ in model.parameters()),
    }



def run_e2e(args: argparse.Namespace, have_zclip: bool) -> dict[str, Any]:
    """Every model of ``--e2e-models``, one after the other (see :func:`run_e2e_model`)."""
    models = {}
    for key in args.e2e_models:
        t0 = time.perf_counter()
        spec = e2e_spec(key, args.quick, args.width, args.depth, args.batch)
        models[key] = run_e2e_model(spec, args, have_zclip)
        log(f"e2e {key} done in {time.perf_counter() - t0:.1f}s")
    return {"models": models}


def run_e2e_model(spec: DemoSpec, args: argparse.Namespace,
                  have_zclip: bool) -> dict[str, Any]:
    """One model: a warm-up fit, then ``--e2e-repeats`` rounds over the configurations
    (order rotated every round), then the same model's gradients outside Lightning."""
    names, skipped = e2e_configs(have_zclip)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        run_fit("none", spec, args, Path(tmp))  # warm-up run (imports, allocator, caches)
        for r in range(args.e2e_repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                runs[name].append(run_fit(name, spec, args, Path(tmp)))
                x = runs[name][-1]
                log(f"e2e {spec.key} repeat {r + 1}/{args.e2e_repeats} {name:<26} "
                     f"step={fmt_t(x['step_s'])} (wall {fmt_t(x['step_wall_s'])}) "
                     f"hook={fmt_t(x['hook_s'])} [{time.perf_counter() - t0:.1f}s]")
    res = {}
    for name, rs in runs.items():
        res[name] = {
            "step_s": median([x["step_s"] for x in rs]),
            "step_range_s": (min(x["step_s"] for x in rs), max(x["step_s"] for x in rs)),
            "hook_s": median([x["hook_s"] for x in rs]),
            "hook_mean_s": median([x["hook_mean_s"] for x in rs]),
            "step_wall_s": median([x["step_wall_s"] for x in rs]),
            "hook_wall_s": median([x["hook_wall_s"] for x in rs]),
            "core_s": median([x["core_s"] for x in rs]),
        }
    first = runs[names[0]][0]
    return {"spec": asdict(spec), "configs": res, "skipped": skipped,
            "params": first["params"], "tensors": first["tensors"],
            "standalone": e2e_standalone(spec, args)}


def e2e_standalone(spec: DemoSpec, args: argparse.Namespace) -> dict[str, float]:
    """The guard's work and its floor on the e2e model's own gradients, outside Lightning
    (gradients of a real training batch, rescaled to total norm ``CLEAN_NORM``)."""
    torch.manual_seed(0)
    model, dm = build_demo(spec, 1)
    demo_loss(model, dm).backward()  # type: ignore[no-untyped-call]
    params = [p for p in model.parameters() if p.grad is not None]
    grads = grads_of(params)
    base = [g.clone() for g in grads]
    torch._foreach_mul_(base, CLEAN_NORM / total(base))
    state0 = warmed_guard_state()
    core = GuardCore(model, None)

    def reset() -> None:
        torch._foreach_copy_(grads, base)

    def reset_guard() -> None:
        reset()
        core.load_state_dict(state0)

    ms = [Timed("floor", lambda: torch._foreach_norm(grads), reset),
          Timed("guard", core.step, reset_guard),
          Timed("clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
                 reset)]
    measure(ms, args.repeats, warmup=3, block_s=args.block_s)
    return {m.name: float(median(m.times)) for m in ms}

