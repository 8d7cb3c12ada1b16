#!/usr/bin/env python
"""Overhead of GradGuard: guard work per step, end-to-end step time, memory, host syncs.

Everything is measured in one process, with every baseline measured in the same run,
interleaved with the method under test (round-robin order rotated every repeat), after a
warm-up, over at least 5 repeats; tables report medians and ratios.

Sections (``--sections``, default all):

``micro``
    Per-step cost of the guard's work alone, ``GuardCore.step()`` (which also updates its
    statistics), against ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` (what
    ``Trainer(gradient_clip_val=1.0)`` runs), ZClip's ``ZClip.step(model)`` and Lightning's
    ``grad_norm(module, norm_type=2)``, on a grid of tensor counts x parameter counts. Every
    method sees the same gradients: they are re-set from a pristine copy before every call
    (outside the timed region), and stateful methods are reset to the same warmed-up state
    before every call, so each timed call does exactly the same work. Two variants: a clean
    step (total norm 0.5: nothing clips) and a spike step (gradients x10, total norm 5: every
    method clips). ``torch._foreach_norm`` (one fused read of the gradients, no decision) is
    reported as the floor.
``e2e``
    ``Trainer.fit`` time per optimizer step on three demo models (``--e2e-models``, run one
    after the other, each with its own warm-up, interleaved configurations and repeats):
    ``DeepMLP`` (width 1024, depth 6, 5.3 M parameters; ``--width/--depth/--batch`` apply to
    it only), ``ResidualMLP`` (width 1024, 3 blocks, 6.35 M) and ``AddingProblemRNN`` (LSTM,
    hidden 256, adding problem with 40 time steps, 0.27 M); the MLPs with BatchNorm and He
    init, all with SGD + momentum (lr 0.01), batch 64 (pinned: ``DEMO_KWARGS``,
    ``RESIDUAL_KWARGS``, ``LSTM_KWARGS``; ``--quick`` shrinks them). Configurations: no
    callback, a bare gradient read (the floor), ``gradient_clip_val=1.0``, ``GradGuard()``,
    ZClip's Lightning callback and ``GradientMonitor()`` (if importable); per-step times come
    from the clocks read at ``on_train_batch_end`` after ``--e2e-warmup`` steps. The time
    spent inside each method's hook is measured too (a direct, low-noise view of the same
    overhead), and the guard's work on each model's own gradients outside Lightning.

Clock: with ``--threads 1`` (default) the calling thread's CPU time (``time.thread_time``),
which all of the work runs on and which ignores time spent descheduled on a shared machine;
wall-clock (``time.perf_counter``) ratios are reported alongside as a cross-check.
``memory``
    Bytes of the guard's persistent state, bytes allocated during one ``step()`` (from
    ``torch.profiler`` with ``profile_memory=True``), a peak-RSS cross-check on the largest
    gradient set, and the opt-in rollback snapshot (``core.snapshot.nbytes``) separately.
``syncs``
    Host reads per optimizer step (``lightning_gradguard.core._host.host_reads``) and every
    tensor -> Python conversion (``Tensor.item/tolist/__bool__/__float__/...``) made during
    the guard's step.

Usage::

    python benchmarks/overhead.py            # full run (< 10 min on 2 cores), writes
                                             # benchmarks/results/overhead.md
    python benchmarks/overhead.py --quick    # smoke run, prints the report only
    python benchmarks/overhead.py --sections e2e --e2e-models lstm --out /tmp/lstm.md

Needs ``zclip==1.0.0`` for the ZClip baselines (skipped with a note when missing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_gradguard.core import _host
from lightning_gradguard.core.guard import Action, GuardCore

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "overhead.md"

CLEAN_NORM = 0.5  # total gradient norm of a clean step (below clip_grad_norm_'s max_norm=1)
SPIKE = 10.0  # a spike step multiplies the clean gradients by this (total norm 5)
WARM_NOISE = 0.1  # warm-up norms are CLEAN_NORM * (1 +- WARM_NOISE), uniform
WARM_STEPS = 40  # > the 25 warm-up steps of ZScoreClip and of ZClip


# ----------------------------------------------------------------------------- utilities
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _fmt_t(seconds: float) -> str:
    """Format a duration with a unit that keeps 3 significant digits."""
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _fmt_r(ratio: float) -> str:
    return "n/a" if not math.isfinite(ratio) else f"{ratio:.2f}×"


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _check(ok: bool) -> str:
    return "✅" if ok else "❌"


def machine_info(threads: int) -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            model = m.group(1).strip()
    mem = ""
    with contextlib.suppress(Exception):
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if m:
            mem = _fmt_bytes(int(m.group(1)) * 1024)
    versions = {"torch": str(torch.__version__)}
    for mod in ("lightning", "zclip"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:
            versions[mod] = "not installed"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory": mem,
        "torch_threads": threads,
        "python": platform.python_version(),
        "versions": versions,
        "load_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------- timing
@dataclass
class Method:
    """One timed thing: ``prepare()`` (untimed) then ``run()`` (timed), per call."""

    name: str
    run: Callable[[], Any]
    prepare: Callable[[], None] = lambda: None
    validate: Callable[[Any], str] | None = None  # called once on a warm-up result
    note: str = ""
    times: list[float] = field(default_factory=list)  # per-repeat medians, CPU time
    wall: list[float] = field(default_factory=list)  # per-repeat medians, wall clock
    calls: int = 1


def measure(methods: list[Method], repeats: int, warmup: int, block_s: float,
            max_calls: int = 50) -> None:
    """Warm up every method, then run ``repeats`` rounds, each method ``calls`` times per
    round in a rotated order; a round's value is the median of its calls. Records the
    calling thread's CPU time (``time.thread_time``) and the wall clock of every call."""
    for m in methods:
        t_warm = []
        for i in range(warmup):
            m.prepare()
            t0 = time.perf_counter()
            out = m.run()
            t_warm.append(time.perf_counter() - t0)
            if i == 0 and m.validate is not None:
                m.note = m.validate(out)
        m.calls = max(1, min(max_calls, round(block_s / max(min(t_warm), 1e-7))))
    for r in range(repeats):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            ts, ws = [], []
            for _ in range(m.calls):
                m.prepare()
                c0 = time.thread_time()
                t0 = time.perf_counter()
                m.run()
                t1 = time.perf_counter()
                ts.append(time.thread_time() - c0)
                ws.append(t1 - t0)
            m.times.append(_median(ts))
            m.wall.append(_median(ws))


# ----------------------------------------------------------------------------- micro
class ParamSet(nn.Module):
    """``n_tensors`` parameters like a stack of Linear layers: pairs of a square weight
    ``(r, r)`` and a bias ``(r,)`` with about ``n_params`` parameters in total."""

    def __init__(self, n_tensors: int, n_params: int) -> None:
        super().__init__()
        pairs = max(1, n_tensors // 2)
        r = max(1, int(math.sqrt(n_params / pairs)))
        self.params = nn.ParameterList()
        for _ in range(pairs):
            self.params.append(nn.Parameter(torch.zeros(r, r)))
            self.params.append(nn.Parameter(torch.zeros(r)))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())


def make_grads(params: list[nn.Parameter], norm: float, seed: int = 0) -> list[torch.Tensor]:
    """Pristine gradients (standard normal, rescaled to total norm ``norm``); sets ``.grad``
    of every parameter to a separate buffer of the same shape."""
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(p.shape, generator=g) for p in params]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(base))).item()
    torch._foreach_mul_(base, norm / total)
    for p, b in zip(params, base, strict=True):
        p.grad = torch.empty_like(b)
    return base


def grads_of(params: list[nn.Parameter] | list[torch.Tensor]) -> list[torch.Tensor]:
    """The ``.grad`` of every parameter (all must be set)."""
    out = [p.grad for p in params if p.grad is not None]
    if len(out) != len(params):
        raise RuntimeError("every parameter needs a gradient")
    return out


def warm_norms(seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(WARM_STEPS, generator=g, dtype=torch.float64) * 2 - 1
    return [CLEAN_NORM * (1 + WARM_NOISE * float(x)) for x in u]


def warmed_guard_state() -> dict[str, Any]:
    """GuardCore state after WARM_STEPS clean steps with noisy norms around CLEAN_NORM.

    The state (clip statistics, growth detector, backoff, counters) does not depend on the
    parameter set, so it is produced on a one-element proxy and loaded into the real guard.
    """
    p = nn.Parameter(torch.zeros(1))
    proxy = GuardCore([p])
    for x in warm_norms():
        p.grad = torch.tensor([x])
        proxy.step()
    return proxy.state_dict()


def warmed_zclip() -> Any:
    from zclip import ZClip

    proxy = nn.Linear(1, 1, bias=False)
    zc = ZClip()  # defaults: alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, warmup_steps=25
    for x in warm_norms():
        proxy.weight.grad = torch.tensor([[x]])
        zc.step(proxy)
    assert zc.initialized
    return zc


def _total(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def micro_methods(ps: ParamSet, base: list[torch.Tensor], have_zclip: bool,
                  state0: dict[str, Any], zclip0: Any) -> list[Method]:
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
            after = _total(grads)
            clipped = abs(after - CLEAN_NORM * (SPIKE if spike else 1.0)) > 1e-4
            if spike != clipped:
                raise RuntimeError(f"norm after call {after}, expected clipping={spike}")
            return f"norm after: {after:.3g}"
        return f

    ms = [
        Method("floor", lambda: torch._foreach_norm(grads), reset(False)),
        Method("guard", core.step, reset_guard(False), check_guard(Action.NONE)),
        Method("clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
               reset(False), check_clip(False)),
        Method("lightning_grad_norm", lambda: grad_norm(ps, norm_type=2), reset(False)),
        Method("guard_spike", core.step, reset_guard(True), check_guard(Action.CLIP)),
        Method("clip_grad_norm__spike", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
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
            Method("zclip", lambda: holder["z"].step(ps), reset_z(False), check_clip(False)),
            Method("zclip_spike", lambda: holder["z"].step(ps), reset_z(True),
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
        res = {m.name: _median(m.times) for m in methods}
        spread = {m.name: (min(m.times), max(m.times)) for m in methods}
        notes = {m.name: m.note for m in methods if m.note}
        rows.append({"tensors": len(params), "params": ps.numel,
                     "grad_bytes": sum(b.numel() * b.element_size() for b in base),
                     "median_s": res, "range_s": spread, "notes": notes,
                     "wall_s": {m.name: _median(m.wall) for m in methods},
                     "calls": {m.name: m.calls for m in methods}})
        _log(f"micro {len(params):>5} tensors {ps.numel / 1e6:6.1f}M params: "
             + ", ".join(f"{k}={_fmt_t(v)}" for k, v in res.items())
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
                     "median_s": {m.name: _median(m.times) for m in methods}})
    return {"rows": rows, "tiny": tiny}


# ----------------------------------------------------------------------------- e2e
#: The end-to-end models (``--e2e-models`` keys), in the order they run.
E2E_MODELS: tuple[str, ...] = ("deep_mlp", "residual_mlp", "lstm")

#: The end-to-end models' settings are pinned here (not taken from the demo configs, which
#: may change) so that results stay comparable: healthy, stateful-optimizer setups.
#: ``DeepMLP`` (width and depth from ``--width``/``--depth``, batch from ``--batch``):
DEMO_KWARGS: dict[str, Any] = {"in_features": 32, "init": "he", "batch_norm": True,
                               "activation": "relu", "optimizer": "sgd_momentum", "lr": 0.01}
#: ``ResidualMLP``: DeepMLP's width and setup; 3 blocks of two square ``Linear`` (6.35 M
#: parameters, 30 tensors) is the depth closest to DeepMLP's 5.3 M at this width, by ratio
#: (2 blocks: 4.24 M); about 41 ms per step on one thread of the 2-core CI machine.
RESIDUAL_KWARGS: dict[str, Any] = {"in_features": 32, "width": 1024, "depth": 3, "init": "he",
                                   "batch_norm": True, "activation": "relu",
                                   "optimizer": "sgd_momentum", "lr": 0.01}
#: ``AddingProblemRNN``: one LSTM layer of 256 units (PyTorch's default init) on the adding
#: problem with 40 time steps (``AddingProblemDataModule(seq_len=LSTM_SEQ_LEN)``): 0.27 M
#: parameters in 6 tensors, about 54 ms per step (seq_len 50 would be about 70 ms).
LSTM_KWARGS: dict[str, Any] = {"cell": "lstm", "hidden_size": 256, "num_layers": 1,
                               "init": "default", "optimizer": "sgd_momentum", "lr": 0.01}
LSTM_SEQ_LEN = 40
#: Batch size of ``ResidualMLP`` and the LSTM (``--batch`` applies to ``DeepMLP`` only).
E2E_BATCH = 64
#: ``--quick``: smaller models (smoke run only; ``DeepMLP`` shrinks through its defaults).
QUICK_KWARGS: dict[str, dict[str, Any]] = {"residual_mlp": {"width": 256, "depth": 2},
                                           "lstm": {"hidden_size": 64}}
QUICK_SEQ_LEN = 20


@dataclass(frozen=True)
class DemoSpec:
    """One end-to-end model: a demo class and its datamodule, by name, with pinned kwargs."""

    key: str  # ``--e2e-models`` name
    model: str  # class in ``lightning_gradguard.demos``
    model_kwargs: dict[str, Any]
    data: str  # datamodule class in ``lightning_gradguard.demos``
    data_kwargs: dict[str, Any]
    batch: int
    label: str = ""  # name in the report (default: ``model``)
    note: str = ""  # why these settings, for the report


def deep_mlp_spec(width: int, depth: int, batch: int, **overrides: Any) -> DemoSpec:
    """``DeepMLP`` with ``DEMO_KWARGS`` (``overrides`` replace some, e.g. the optimizer)."""
    return DemoSpec(
        "deep_mlp", "DeepMLP", {"width": width, "depth": depth, **DEMO_KWARGS, **overrides},
        "RegressionDataModule", {"in_features": DEMO_KWARGS["in_features"]}, batch, "DeepMLP",
        "plain MLP, the settings of the earlier reports (`--width`, `--depth` and `--batch` "
        "apply to this model only)")


def e2e_spec(key: str, args: argparse.Namespace) -> DemoSpec:
    """The pinned settings of end-to-end model ``key`` (smaller ones with ``--quick``)."""
    quick = QUICK_KWARGS.get(key, {}) if args.quick else {}
    if key == "deep_mlp":
        return deep_mlp_spec(args.width, args.depth, args.batch)
    if key == "residual_mlp":
        return DemoSpec(
            key, "ResidualMLP", {**RESIDUAL_KWARGS, **quick}, "RegressionDataModule",
            {"in_features": RESIDUAL_KWARGS["in_features"]}, E2E_BATCH, "ResidualMLP",
            "pre-activation residual blocks of two square `Linear` with BatchNorm; DeepMLP's "
            "width and setup, and the number of blocks whose parameter count is closest to "
            "DeepMLP's (at width 1024: 2 blocks 4.24 M, 3 blocks 6.35 M)")
    if key == "lstm":
        seq_len = QUICK_SEQ_LEN if args.quick else LSTM_SEQ_LEN
        return DemoSpec(
            key, "AddingProblemRNN", {**LSTM_KWARGS, **quick}, "AddingProblemDataModule",
            {"seq_len": seq_len}, E2E_BATCH, "AddingProblemRNN (LSTM)",
            f"one LSTM layer on the adding problem, back-propagated through all {seq_len} "
            "time steps: few parameters in 6 tensors and a long step, so reading the "
            "gradients is a small part of it (the other end from the MLPs)")
    raise ValueError(f"unknown e2e model {key!r}")


def build_demo(spec: DemoSpec, steps: int) -> tuple[Any, Any]:
    """The model and a datamodule with enough training batches for ``steps`` steps."""
    from lightning_gradguard import demos

    model = getattr(demos, spec.model)(**spec.model_kwargs)
    val_fraction = 0.2
    dm = getattr(demos, spec.data)(
        **spec.data_kwargs, batch_size=spec.batch, val_fraction=val_fraction,
        num_samples=math.ceil((steps + 2) * spec.batch / (1 - val_fraction)) + spec.batch,
        seed=0)
    return model, dm


def demo_loss(model: Any, dm: Any) -> torch.Tensor:
    """The loss of ``dm``'s first training batch, computed like ``DemoModule.training_step``
    (``compute_loss(model(inputs), target)``, without its ``self.log``, which needs a
    Trainer); the model is put in training mode."""
    dm.setup("fit")
    inputs, target = next(iter(dm.train_dataloader()))
    model.train()
    loss: torch.Tensor = model.compute_loss(model(inputs), target)
    return loss


def _timed(fn: Callable[..., Any], acc: list[tuple[float, float]]) -> Callable[..., Any]:
    """Wrap ``fn`` to append (wall, thread CPU) seconds of every call to ``acc``."""
    def wrapper(*a: Any, **k: Any) -> Any:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc.append((time.perf_counter() - t0, time.thread_time() - c0))
    return wrapper


#: In-step reference: one fused read of the gradients and one host read, nothing decided.
FLOOR_CFG = "floor: one gradient read"


class _FloorCallback:
    """``on_before_optimizer_step``: ``_foreach_norm`` of the gradients, summed, read once."""

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        torch.stack(torch._foreach_norm(grads)).sum().item()


def e2e_configs(have_zclip: bool) -> tuple[list[str], dict[str, str]]:
    names = ["none", FLOOR_CFG, "gradient_clip_val=1.0", "GradGuard()"]
    skipped = {}
    if have_zclip:
        names.append("ZClipLightningCallback()")
    else:
        skipped["ZClipLightningCallback()"] = "zclip not installed"
    try:
        from lightning_gradguard import GradientMonitor  # noqa: F401

        names.append("GradientMonitor()")
    except Exception as exc:  # not implemented yet / broken: report, do not fail
        skipped["GradientMonitor()"] = f"not importable: {type(exc).__name__}: {exc}"
    return names, skipped


def run_fit(config: str, spec: DemoSpec, args: argparse.Namespace,
            tmp: Path) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    from lightning_gradguard import GradGuard

    class StepClock(Callback):
        def __init__(self) -> None:
            self.t: list[float] = []
            self.c: list[float] = []

        def on_train_batch_end(self, *a: Any, **k: Any) -> None:
            self.t.append(time.perf_counter())
            self.c.append(time.thread_time())

    steps = args.e2e_warmup + args.e2e_steps
    pl.seed_everything(0, verbose=False)
    model, dm = build_demo(spec, steps)
    clock = StepClock()
    hook: list[tuple[float, float]] = []
    callbacks: list[Any] = []
    kwargs: dict[str, Any] = {}
    if config == "gradient_clip_val=1.0":
        kwargs["gradient_clip_val"] = 1.0
        model.configure_gradient_clipping = _timed(model.configure_gradient_clipping, hook)
    elif config != "none":
        cb: Any
        if config == "GradGuard()":
            cb = GradGuard()
        elif config == "ZClipLightningCallback()":
            from zclip import ZClipLightningCallback

            cb = ZClipLightningCallback()
        elif config == "GradientMonitor()":
            from lightning_gradguard import GradientMonitor

            cb = GradientMonitor()
        elif config == FLOOR_CFG:
            cb = type("FloorCallback", (_FloorCallback, Callback), {})()
        else:
            raise ValueError(config)
        cb.on_before_optimizer_step = _timed(cb.on_before_optimizer_step, hook)
        callbacks.append(cb)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0,
        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(tmp, name=re.sub(r"\W", "_", f"{spec.key}_{config}")),
        callbacks=[*callbacks, clock], **kwargs,
    )
    core_acc: list[tuple[float, float]] = []
    orig_step = GuardCore.step
    if config == "GradGuard()":  # also time GuardCore.step inside the hook: adapter cost
        GuardCore.step = _timed(orig_step, core_acc)  # type: ignore[method-assign]
    try:
        trainer.fit(model, datamodule=dm)
    finally:
        GuardCore.step = orig_step  # type: ignore[method-assign]
    assert trainer.global_step == steps, (trainer.global_step, steps)
    w = args.e2e_warmup - 1
    wall = [b - a for a, b in zip(clock.t, clock.t[1:], strict=False)][w:]
    cpu = [b - a for a, b in zip(clock.c, clock.c[1:], strict=False)][w:]
    return {
        "step_s": _median(cpu),
        "step_wall_s": _median(wall),
        "hook_s": _median([c for _, c in hook[args.e2e_warmup:]]) if hook else 0.0,
        "hook_mean_s": (statistics.fmean([c for _, c in hook[args.e2e_warmup:]]) if hook
                        else 0.0),
        "hook_wall_s": _median([t for t, _ in hook[args.e2e_warmup:]]) if hook else 0.0,
        "core_s": (_median([c for _, c in core_acc[args.e2e_warmup:]]) if core_acc
                   else float("nan")),
        "params": sum(p.numel() for p in model.parameters()),
        "tensors": sum(1 for _ in model.parameters()),
    }


def run_e2e(args: argparse.Namespace, have_zclip: bool) -> dict[str, Any]:
    """Every model of ``--e2e-models``, one after the other (see :func:`run_e2e_model`)."""
    models = {}
    for key in args.e2e_models:
        t0 = time.perf_counter()
        models[key] = run_e2e_model(e2e_spec(key, args), args, have_zclip)
        _log(f"e2e {key} done in {time.perf_counter() - t0:.1f}s")
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
                _log(f"e2e {spec.key} repeat {r + 1}/{args.e2e_repeats} {name:<26} "
                     f"step={_fmt_t(x['step_s'])} (wall {_fmt_t(x['step_wall_s'])}) "
                     f"hook={_fmt_t(x['hook_s'])} [{time.perf_counter() - t0:.1f}s]")
    res = {}
    for name, rs in runs.items():
        res[name] = {
            "step_s": _median([x["step_s"] for x in rs]),
            "step_range_s": (min(x["step_s"] for x in rs), max(x["step_s"] for x in rs)),
            "hook_s": _median([x["hook_s"] for x in rs]),
            "hook_mean_s": _median([x["hook_mean_s"] for x in rs]),
            "step_wall_s": _median([x["step_wall_s"] for x in rs]),
            "hook_wall_s": _median([x["hook_wall_s"] for x in rs]),
            "core_s": _median([x["core_s"] for x in rs]),
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
    demo_loss(model, dm).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = grads_of(params)
    base = [g.clone() for g in grads]
    torch._foreach_mul_(base, CLEAN_NORM / _total(base))
    state0 = warmed_guard_state()
    core = GuardCore(model, None)

    def reset() -> None:
        torch._foreach_copy_(grads, base)

    def reset_guard() -> None:
        reset()
        core.load_state_dict(state0)

    ms = [Method("floor", lambda: torch._foreach_norm(grads), reset),
          Method("guard", core.step, reset_guard),
          Method("clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
                 reset)]
    measure(ms, args.repeats, warmup=3, block_s=args.block_s)
    return {m.name: float(_median(m.times)) for m in ms}


# ----------------------------------------------------------------------------- memory
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


def _memory_row(n_tensors: int, n_params: int, state0: dict[str, Any],
                zclip0: Any) -> dict[str, Any]:
    """Persistent state and bytes allocated during one call, for one parameter set."""
    ps = ParamSet(n_tensors, n_params)
    params = list(ps.parameters())
    base = make_grads(params, CLEAN_NORM)
    grads = grads_of(params)
    core = GuardCore(params)
    core.load_state_dict(state0)
    torch._foreach_copy_(grads, base)
    core.step()
    row: dict[str, Any] = {
        "tensors": len(params), "params": ps.numel,
        "grad_bytes": sum(b.numel() * b.element_size() for b in base),
        "state_bytes": _tensor_bytes(core.state_dict()),
    }
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
    ps = ParamSet(n_tensors, n_params)
    params = list(ps.parameters())
    base = make_grads(params, CLEAN_NORM)
    grads = grads_of(params)
    core = GuardCore(params)
    rss: dict[str, Any] = {"tensors": len(params), "params": ps.numel,
                           "grad_bytes": sum(b.numel() * b.element_size() for b in base)}
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
        demo_loss(model, dm).backward()
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
    core = guard._cores[0]
    assert core.snapshot is not None
    return {"snapshot_bytes": core.snapshot.nbytes,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "optimizer": model.optimizer_name, "step": core.snapshot.step}


# ----------------------------------------------------------------------------- syncs
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
        loss.backward()
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


# ----------------------------------------------------------------------------- report
def _model_name(m: dict[str, Any]) -> str:
    """``DeepMLP``, ``AddingProblemRNN`` (LSTM), ...: the model's name in the report."""
    sp = m["spec"]
    label: str = sp["label"] or sp["model"]
    return f"`{sp['model']}`{label[len(sp['model']):]}"


def _spec_call(spec: dict[str, Any]) -> str:
    kw = ", ".join(f"{k}={v!r}" for k, v in spec["model_kwargs"].items())
    return f"{spec['model']}({kw})"


def _data_call(spec: dict[str, Any]) -> str:
    kw = ", ".join(f"{k}={v!r}" for k, v in spec["data_kwargs"].items())
    return f"{spec['data']}({kw + ', ' if kw else ''}batch_size={spec['batch']})"


def render_e2e(a: Callable[[str], None], e: dict[str, Any], args: argparse.Namespace) -> None:
    """Section 2: the models, one table (and targets) per model, then a summary."""
    models: dict[str, dict[str, Any]] = e["models"]
    a("## 2. End-to-end `Trainer.fit` time per optimizer step\n")
    a(f"{len(models)} demo model{'s' if len(models) != 1 else ''} from "
      "`lightning_gradguard.demos`, run one after the other (`--e2e-models`), each with its "
      "own warm-up fit, interleaved configurations and repeats; settings pinned in the "
      "benchmark so that results stay comparable (healthy setups: the MLPs with BatchNorm "
      "and He init; all trained with SGD + momentum, a stateful optimizer)"
      + (" — `--quick`: smaller models than the full run, a smoke test only" if args.quick
         else "") + ":\n")
    a("| model | constructor | data | parameters | why |\n|---|---|---|---:|---|")
    for m in models.values():
        sp = m["spec"]
        a(f"| {_model_name(m)} | `{_spec_call(sp)}` | `{_data_call(sp)}` | "
          f"{m['params'] / 1e6:.2f} M in {m['tensors']} tensors | {sp['note']} |")
    a("")
    a(f"Trainer on CPU, one epoch covering all steps, default `log_every_n_steps` (50), "
      f"logger: `CSVLogger` to a temporary directory (writes a small CSV at flush), no "
      f"validation, no checkpointing, no progress bar. Per-step time = difference of the "
      f"clock at consecutive `on_train_batch_end` (a callback), first {args.e2e_warmup} "
      f"steps excluded, median over {args.e2e_steps} steps; then median over "
      f"{args.e2e_repeats} fresh runs per configuration, interleaved. *Hook* = time "
      f"inside the method's own hook per step (`on_before_optimizer_step`, or "
      f"`configure_gradient_clipping` for `gradient_clip_val`), median (and mean: the "
      f"mean includes the occasional costlier steps the median hides). When the range "
      f"over runs is wider than the differences between configurations (run-to-run "
      f"noise of the whole step), the hook time is the precise measure of what each "
      f"method adds. *Outside Lightning*: the guard's work on the same model's gradients "
      f"(one real training batch, `compute_loss(model(inputs), target)` as in "
      f"`training_step`, rescaled to total norm {CLEAN_NORM}), micro-benchmark method, "
      f"clean step.\n")
    summary: list[str] = []
    for i, m in enumerate(models.values(), start=1):
        sp = m["spec"]
        base = m["configs"]["none"]["step_s"]
        base_w = m["configs"]["none"]["step_wall_s"]
        a(f"### 2.{i} {_model_name(m)}\n")
        a(f"`{_spec_call(sp)}`: {m['params'] / 1e6:.2f} M parameters in {m['tensors']} "
          f"tensors; `{_data_call(sp)}`.\n")
        a("| configuration | step time | range over runs | ratio vs none | hook time | "
          "hook / step(none) | hook time, mean over steps | (wall) step | (wall) ratio |")
        a("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, c in m["configs"].items():
            lo, hi = c["step_range_s"]
            hook = ("– | – | –" if name == "none" else
                    f"{_fmt_t(c['hook_s'])} | {c['hook_s'] / base * 100:.1f} % | "
                    f"{_fmt_t(c.get('hook_mean_s', math.nan))}")
            a(f"| {name} | {_fmt_t(c['step_s'])} | {_fmt_t(lo)} – {_fmt_t(hi)} | "
              f"{_fmt_r(c['step_s'] / base)} | {hook} | {_fmt_t(c['step_wall_s'])} | "
              f"{_fmt_r(c['step_wall_s'] / base_w)} |")
        for name, why in m["skipped"].items():
            a(f"| {name} | skipped: {why} | | | | | | | |")
        st = m.get("standalone")
        if st:
            a("")
            a(f"The same model's gradients outside Lightning ({_model_name(m)}, "
              "micro-benchmark method, clean step):\n")
            a("| | time | / step(none) |\n|---|---:|---:|")
            for k, v in st.items():
                a(f"| {k} | {_fmt_t(v)} | {v / base * 100:.1f} % |")
        g = m["configs"].get("GradGuard()")
        if g and math.isfinite(g.get("core_s", math.nan)):
            a(f"\nInside the GradGuard hook ({_fmt_t(g['hook_s'])}), `GuardCore.step` takes "
              f"{_fmt_t(g['core_s'])}: the Lightning adapter adds "
              f"{_fmt_t(max(0.0, g['hook_s'] - g['core_s']))} per step.")
        if g:
            q = g["step_s"] / base
            qh = 1 + g["hook_s"] / base
            a("")
            a(f"| target ({_model_name(m)}) | measured | |\n|---|---|:-:|")
            a(f"| step time with GradGuard() ≤ 1.03× no callback (ratio of medians) | "
              f"{_fmt_r(q)} | {_check(q <= 1.03)} |")
            a(f"| same, from the hook time (1 + hook / step(none)) | {qh:.3f}× | "
              f"{_check(qh <= 1.03)} |")
            if math.isfinite(g.get("hook_mean_s", math.nan)):
                qm = 1 + g["hook_mean_s"] / base
                a(f"| same, from the mean hook time (includes the occasional costlier steps: "
                  f"logging, and with SGD the weight read for `max_update_ratio` every 8th "
                  f"step) | {qm:.3f}× | {_check(qm <= 1.03)} |")
            fl = m["configs"].get(FLOOR_CFG)
            floor_cells = "– | –"
            if fl:
                qf = 1 + fl["hook_s"] / base
                beyond = g["hook_s"] - fl["hook_s"]
                a(f"| (reference: the in-step floor, one `_foreach_norm` read of the gradients "
                  f"and one host read, 1 + hook / step(none)) | {qf:.3f}× | |")
                a(f"| GradGuard's hook beyond that floor | {_fmt_t(beyond)} "
                  f"({beyond / base * 100:.1f} % of the step) | |")
                floor_cells = f"{qf:.3f}× | {_fmt_t(beyond)} ({beyond / base * 100:.1f} %)"
            if st:
                qs = 1 + st["floor"] / base
                a(f"| (for reference: the same read outside a training step, warm caches, "
                  f"1 + floor / step(none)) | {qs:.3f}× | |")
            summary.append(
                f"| {_model_name(m)} | {m['params'] / 1e6:.2f} M / {m['tensors']} | "
                f"{_fmt_t(base)} | {_fmt_r(q)} {_check(q <= 1.03)} | "
                f"{qh:.3f}× {_check(qh <= 1.03)} | {floor_cells} |")
        a("")
    if summary:
        a("### Targets (end to end), all models\n")
        a("Step time with `GradGuard()` ≤ 1.03× no callback, per model (the rows of each "
          "model's target table above):\n")
        a("| model | parameters / tensors | step (none) | GradGuard() / none, ratio of "
          "medians | 1 + hook / step(none) | floor: 1 + hook / step(none) | GradGuard's "
          "hook beyond the floor (% of the step) |")
        a("|---|---:|---:|---:|---:|---:|---:|")
        for row in summary:
            a(row)
        a("")


def render(info: dict[str, Any], args: argparse.Namespace, res: dict[str, Any]) -> str:
    L: list[str] = []
    a = L.append
    cpu_clock = info["torch_threads"] == 1
    clock = ("CPU time of the calling thread (`time.thread_time`)" if cpu_clock
             else "wall clock (`time.perf_counter`)")
    a("# GradGuard overhead benchmark\n")
    a(f"Produced by `{args.command}` ({'quick smoke run' if args.quick else 'full run'}), "
      f"{time.strftime('%Y-%m-%d %H:%M %Z')}, total {res['elapsed_s']:.0f} s.\n")
    a("| machine | |\n|---|---|")
    a(f"| CPU (`lscpu` model name) | {info['cpu']} |")
    a(f"| cores (`os.cpu_count()`) | {info['cores']} |")
    a(f"| memory | {info['memory']} |")
    a(f"| torch threads | {info['torch_threads']} |")
    a(f"| python | {info['python']} |")
    a("| versions | " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + " |")
    ls, le = info["load_start"], info.get("load_end", (float("nan"),) * 3)
    a(f"| load average (1/5/15 min) at start / end | {ls[0]:.1f} {ls[1]:.1f} {ls[2]:.1f} / "
      f"{le[0]:.1f} {le[1]:.1f} {le[2]:.1f} |")
    a("")
    a("Method: every number is measured in this one process; baselines are measured in the "
      "same run, interleaved with the guard (round-robin, order rotated every repeat), after "
      f"a warm-up; {args.repeats} repeats in the micro benchmark, {args.e2e_repeats} in the "
      "end-to-end one"
      + (f" (per model; {len(res['e2e']['models'])} demo "
         f"model{'s' if len(res['e2e']['models']) != 1 else ''}: "
         + ", ".join(_model_name(m) for m in res["e2e"]["models"].values()) + ")"
         if "e2e" in res else "")
      + "; tables show the median over repeats (a repeat's value is itself the "
      "median of its calls/steps).")
    a(f"Times are {clock}. "
      + ("torch runs single-threaded, so all of the measured work runs on the calling "
         "thread and its CPU time is the cost of the work, unaffected by time the thread "
         "spends descheduled when other processes share the cores (a load average above "
         "the core count means they did). Wall-clock ratios are given as a cross-check "
         "(noisier on a shared machine)." if cpu_clock else
         "With several torch threads the calling thread's CPU time misses the work of the "
         "others, so wall clock is used; on a shared machine it is noisy.") + "\n")

    def pick(row: dict[str, Any]) -> dict[str, float]:
        return row["median_s"] if cpu_clock else row["wall_s"]

    if "micro" in res:
        m = res["micro"]
        a("## 1. Guard work per optimizer step (micro benchmark)\n")
        a("Parameter sets are pairs of a square weight `(r, r)` and a bias `(r,)` (float32, "
          "CPU). Gradients are re-set from a pristine copy before every call and every "
          "stateful method is reset to the same warmed-up state (40 steps with norms "
          f"{CLEAN_NORM} ± {WARM_NOISE:.0%}), untimed, so all methods see the same "
          "gradients and do the same work every call (the decision of every call is "
          "checked once: guard action, and whether the gradients were modified):\n")
        a("- **guard**: `GuardCore(params, optimizer=None).step()` — one fused norm pass, "
          "threshold, statistics update, growth detector, one host read, decision (and the "
          "clip pass on a spike); default `ZScoreClip`.")
        a("- **clip_grad_norm_**: `torch.nn.utils.clip_grad_norm_(params, 1.0)` (what "
          "`gradient_clip_val=1.0` runs; it always multiplies the gradients, by 1.0 when "
          "below the threshold, so it is two passes over the gradients every step).")
        a("- **ZClip**: `ZClip().step(model)` of `zclip` 1.0.0 with its defaults, after its "
          "warm-up (per-tensor Python loop of norms + `.item()`; clips with a per-tensor "
          "Python loop of `mul_`).")
        a("- **grad_norm**: `lightning.pytorch.utilities.grad_norm(module, norm_type=2)` "
          "(per-tensor norms + one host conversion per tensor; never clips).")
        a("- **floor**: `torch._foreach_norm(grads)` alone — one fused read of the "
          "gradients, no total, no decision: what any norm-based method must pay.\n")
        zc = any("zclip" in r["median_s"] for r in m["rows"])

        def t(r: dict[str, Any], k: str, wall: bool = False) -> float:
            d = r["wall_s"] if wall else pick(r)
            return float(d.get(k, float("nan")))

        for spike in (False, True):
            sfx = "_spike" if spike else ""
            if spike:
                a(f"### Spike step (gradients ×{SPIKE:g}, total norm {CLEAN_NORM * SPIKE:g}: "
                  "every method clips)\n")
            else:
                a(f"### Clean step (total norm {CLEAN_NORM}: nothing clips)\n")
            cols = ["tensors", "params", "grad MB", "floor", "**guard**", "clip_grad_norm_"]
            cols += ["ZClip"] if zc else []
            cols += [] if spike else ["grad_norm"]
            cols += ["guard / clip_grad_norm_"] + (["guard / ZClip"] if zc else [])
            if cpu_clock:
                cols += ["(wall) guard / clip_grad_norm_"] + (["(wall) guard / ZClip"]
                                                              if zc else [])
            a("| " + " | ".join(cols) + " |")
            a("|" + "---:|" * len(cols))
            for r in m["rows"]:
                g, c, z = t(r, "guard" + sfx), t(r, "clip_grad_norm_" + sfx), t(r, "zclip" + sfx)
                cells = [str(r["tensors"]), f"{r['params'] / 1e6:.1f} M",
                         f"{r['grad_bytes'] / 2**20:.0f}", _fmt_t(t(r, "floor")),
                         f"**{_fmt_t(g)}**", _fmt_t(c)]
                cells += [_fmt_t(z)] if zc else []
                cells += [] if spike else [_fmt_t(t(r, "lightning_grad_norm"))]
                cells += [_fmt_r(g / c)] + ([_fmt_r(g / z)] if zc else [])
                if cpu_clock:
                    gw = t(r, "guard" + sfx, True)
                    cells += [_fmt_r(gw / t(r, "clip_grad_norm_" + sfx, True))]
                    cells += [_fmt_r(gw / t(r, "zclip" + sfx, True))] if zc else []
                a("| " + " | ".join(cells) + " |")
            a("")
        a("### Fixed cost: tiny tensors (16 elements each, bytes negligible)\n")
        keys = ["floor", "guard", "guard_spike", "clip_grad_norm_", "lightning_grad_norm"]
        keys += ["zclip", "zclip_spike"] if zc else []
        a("| tensors | " + " | ".join(keys) + " |")
        a("|---:|" + "---:|" * len(keys))
        for r in m["tiny"]:
            a(f"| {r['tensors']} | " + " | ".join(_fmt_t(pick(r).get(k, math.nan))
                                                  for k in keys) + " |")
        if len(m["tiny"]) >= 2:
            lo, hi = m["tiny"][0], m["tiny"][-1]
            dn = hi["tensors"] - lo["tensors"]
            a("| **µs per extra tensor** | " + " | ".join(
                f"**{(pick(hi).get(k, math.nan) - pick(lo).get(k, math.nan)) / dn * 1e6:.2f}**"
                for k in keys) + " |")
        a("")
        a("### Scaling: cost per gradient byte and per tensor\n")
        a("Per MB: slope between the smallest and the largest parameter count at a fixed "
          "number of tensors (clean step; spike for the `_spike` columns). Per tensor: slope "
          "over the tiny-tensor rows above. Equal per-MB slopes to the floor mean the cost "
          "grows with the bytes read, plus a fixed per-step cost.\n")
        keys = ["floor", "guard", "clip_grad_norm_", "guard_spike", "clip_grad_norm__spike"]
        keys += ["zclip", "zclip_spike"] if zc else []
        a("| slope | " + " | ".join(keys) + " |")
        a("|---|" + "---:|" * len(keys))
        for n in sorted({r["tensors"] for r in m["rows"]}):
            rs = sorted((r for r in m["rows"] if r["tensors"] == n), key=lambda r: r["params"])
            if len(rs) < 2:
                continue
            lo, hi = rs[0], rs[-1]
            dmb = (hi["grad_bytes"] - lo["grad_bytes"]) / 2**20
            a(f"| ms per MB, {n} tensors ({lo['params'] / 1e6:.0f}–{hi['params'] / 1e6:.0f} M) | "
              + " | ".join(f"{(t(hi, k) - t(lo, k)) / dmb * 1e3:.3f}" for k in keys) + " |")
        if len(m["tiny"]) >= 2:
            lo, hi = m["tiny"][0], m["tiny"][-1]
            dn = hi["tensors"] - lo["tensors"]
            a(f"| µs per tensor ({lo['tensors']}–{hi['tensors']} tiny tensors) | " + " | ".join(
                f"{(pick(hi).get(k, math.nan) - pick(lo).get(k, math.nan)) / dn * 1e6:.2f}"
                for k in keys) + " |")
            a(f"| fixed cost per step ({lo['tensors']} tiny tensors) | " + " | ".join(
                _fmt_t(pick(lo).get(k, math.nan)) for k in keys) + " |")
        a("")
        a("### Targets (micro)\n")
        a("| target | measured | |\n|---|---|:-:|")
        for r in m["rows"]:
            if r["tensors"] < 200:
                continue
            for spike in (False, True):
                sfx = "_spike" if spike else ""
                q = t(r, "guard" + sfx) / t(r, "clip_grad_norm_" + sfx)
                a(f"| guard ≤ 1.2× clip_grad_norm_, {'spike' if spike else 'clean'}, "
                  f"{r['tensors']} tensors × {r['params'] / 1e6:.0f} M | {_fmt_r(q)} | "
                  f"{_check(q <= 1.2)} |")
        if zc:
            for spike in (False, True):
                sfx = "_spike" if spike else ""
                qs = [(t(r, "guard" + sfx) / t(r, "zclip" + sfx), r) for r in m["rows"]]
                ok = [r for q, r in qs if q <= 0.6]
                worst, wr = max(qs, key=lambda x: x[0])
                best, br = min(qs, key=lambda x: x[0])
                a(f"| guard ≤ 0.6× ZClip.step, {'spike' if spike else 'clean'} | met in "
                  f"{len(ok)}/{len(qs)} grid cells; best {_fmt_r(best)} ({br['tensors']} × "
                  f"{br['params'] / 1e6:.0f} M), worst {_fmt_r(worst)} ({wr['tensors']} × "
                  f"{wr['params'] / 1e6:.0f} M) | {_check(len(ok) == len(qs))} |")
        a("")

    if "e2e" in res:
        render_e2e(a, res["e2e"], args)

    if "memory" in res:
        mm = res["memory"]
        a("## 3. Memory added by the guard\n")
        a("Method: torch's CPU allocations are invisible to `tracemalloc`, so three views are "
          "used. (a) *state*: bytes of all tensors in `GuardCore.state_dict()` (the "
          "persistent state). (b) *allocated during step()*: sum of the bytes allocated by "
          "torch ops inside one `step()` (`torch.profiler` with `profile_memory=True`; "
          "an upper bound of the transient peak). (c) *peak RSS added*: "
          "`VmHWM` reset through `/proc/self/clear_refs` before the call, minus `VmRSS` "
          "before it (min of 3; a copy of the gradients would show up as about their "
          "size, see the `clone` reference row).\n")
        a("| tensors | params | grad bytes | guard state | allocated in step(), clean | "
          "allocated in step(), spike | clip_grad_norm_ allocs | ZClip allocs |")
        a("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in mm["rows"]:
            a(f"| {r['tensors']} | {r['params'] / 1e6:.1f} M | {_fmt_bytes(r['grad_bytes'])} | "
              f"{_fmt_bytes(r['state_bytes'])} | {_fmt_bytes(r['alloc_clean'])} | "
              f"{_fmt_bytes(r['alloc_spike'])} | {_fmt_bytes(r['alloc_clip_grad_norm_'])} | "
              f"{_fmt_bytes(r['alloc_zclip']) if 'alloc_zclip' in r else 'n/a'} |")
        a("")
        rss = mm["rss"]
        a(f"Peak RSS added by one call, {rss['tensors']} tensors × {rss['params'] / 1e6:.0f} M "
          f"params ({_fmt_bytes(rss['grad_bytes'])} of gradients):\n")
        a("| call | peak RSS added |\n|---|---:|")
        for k, v in rss.items():
            if k in ("tensors", "params", "grad_bytes"):
                continue
            a(f"| {k} | {_fmt_bytes(v) if v is not None else 'n/a'} |")
        a("")
        a("### Opt-in rollback snapshot (`rollback=True`), separately\n")
        a("A copy of `module.state_dict()` and of the optimizer's `state_dict()` on the "
          "host, taken every `snapshot_every` (100) steps; `core.snapshot.nbytes`. "
          f"`DeepMLP` width {args.width}, depth {args.depth}, BatchNorm.\n")
        a("| optimizer | parameter bytes | model state | optimizer state | "
          "snapshot.nbytes | snapshot / params | capture time |")
        a("|---|---:|---:|---:|---:|---:|---:|")
        for s in mm["snapshot"]:
            a(f"| {s['optimizer']} | {_fmt_bytes(s['param_bytes'])} | "
              f"{_fmt_bytes(s['model_state_bytes'])} | {_fmt_bytes(s['optim_state_bytes'])} | "
              f"{_fmt_bytes(s['snapshot_bytes'])} | "
              f"{s['snapshot_bytes'] / s['param_bytes']:.2f}× | {_fmt_t(s['capture_s'])} |")
        sc = mm.get("snapshot_callback")
        if sc:
            a(f"\n`GradGuard(rollback=True, snapshot_every=2)` in `Trainer.fit` (optimizer "
              f"{sc['optimizer']}), snapshot of step {sc['step']}: `snapshot.nbytes` = "
              f"{_fmt_bytes(sc['snapshot_bytes'])} = "
              f"{sc['snapshot_bytes'] / sc['param_bytes']:.2f}× the parameter bytes. (The "
              "snapshot of step 1 is taken before the first update, when the optimizer has "
              "no state yet: about 1× until the next snapshot.)")
        a("")

    if "syncs" in res:
        s = res["syncs"]
        a("## 4. Host synchronisations per optimizer step\n")
        a("*host reads*: `lightning_gradguard.core._host.host_reads()` (every tensor → "
          "Python conversion of the core goes through `to_host`). *conversions*: calls of "
          "`Tensor.item/tolist/__bool__/__float__/__int__/__index__/numpy/__complex__` "
          "made during the guard's step (counted by monkeypatching `torch.Tensor`; "
          "`to_host` itself is the one `tolist`).\n")
        a("| case | host reads | conversions | action |\n|---|---:|---|---|")
        for k, v in s.items():
            if k.startswith("baseline") or k.startswith("GradGuard in"):
                continue
            a(f"| `GuardCore.step()`, {k} | {v['host_reads']} | "
              f"{v['conversions'] or 'none'} | {v['action']} |")
        g = s.get("GradGuard in Trainer.fit")
        if g:
            a(f"| `GradGuard` hook in `Trainer.fit`, {g['optimizer_steps']} optimizer steps "
              f"({g['note']}) | {g['host_reads_per_step']} per step | "
              f"{g['conversions_total']} in total | – |")
        for k, v in s.items():
            if k.startswith("baseline"):
                note = f" ({v['note']})" if "note" in v else ""
                a(f"| {k[len('baseline '):]} (reference) | – | "
                  f"{v['conversions'] or 'none'}{note} | – |")
        a("")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (small grid and model, few steps); prints the report")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown report path (default: {DEFAULT_OUT.relative_to(ROOT.parent)} "
                        "for a full run, stdout only for --quick)")
    p.add_argument("--json", type=Path, default=None, help="also write raw results as JSON")
    p.add_argument("--sections", default="micro,e2e,memory,syncs",
                   help="comma-separated subset of micro,e2e,memory,syncs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: timings use the calling thread's "
                        "CPU time, robust on a shared machine; with more threads only the "
                        "wall-clock columns are meaningful)")
    p.add_argument("--repeats", type=int, default=None, help="micro repeats (default 5)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="default 5; quick 1")
    p.add_argument("--e2e-steps", type=int, default=None,
                   help="measured steps per fit (default 40; quick 8)")
    p.add_argument("--e2e-warmup", type=int, default=None,
                   help="excluded first steps per fit (default 10; quick 3)")
    p.add_argument("--e2e-models", nargs="+", choices=E2E_MODELS, default=list(E2E_MODELS),
                   metavar="MODEL",
                   help=f"end-to-end models, run in this order (choices: "
                        f"{', '.join(E2E_MODELS)}; default all three)")
    p.add_argument("--width", type=int, default=None,
                   help="DeepMLP width (default 1024; quick 256); e2e, memory snapshot")
    p.add_argument("--depth", type=int, default=None,
                   help="DeepMLP depth (default 6; quick 3); e2e, memory snapshot")
    p.add_argument("--batch", type=int, default=64,
                   help=f"DeepMLP batch size (default 64); ResidualMLP and the LSTM use "
                        f"{E2E_BATCH}, pinned")
    args = p.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or 5
    args.e2e_repeats = args.e2e_repeats or (1 if q else 5)
    args.e2e_steps = args.e2e_steps or (8 if q else 40)
    args.e2e_warmup = args.e2e_warmup or (3 if q else 10)
    args.width = args.width or (256 if q else 1024)
    args.depth = args.depth or (3 if q else 6)
    args.block_s = 0.02 if q else 0.12
    if q:
        args.grid = [(10, 1_000_000), (200, 1_000_000)]
        args.tiny_tensors = (10, 200)
        args.mem_tensors, args.mem_params = (10, 200), 1_000_000
        args.rss_tensors, args.rss_params = 10, 1_000_000
    else:
        # 2000 tensors x 1 M params (500 params per tensor) is no realistic model: skipped
        args.grid = [(n, m) for m in (1_000_000, 10_000_000, 50_000_000)
                     for n in (10, 200, 2000) if not (n == 2000 and m < 10_000_000)]
        args.tiny_tensors = (10, 200, 2000)
        args.mem_tensors, args.mem_params = (10, 200, 2000), 10_000_000
        args.rss_tensors, args.rss_params = 10, 50_000_000
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(args.sections) - {"micro", "e2e", "memory", "syncs"}
    if bad:
        p.error(f"unknown sections {sorted(bad)}")
    if args.e2e_warmup < 1:
        p.error("--e2e-warmup must be >= 1")
    args.e2e_models = list(dict.fromkeys(args.e2e_models))  # repeated names run once
    args.command = "python benchmarks/overhead.py" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:]) else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import lightning.pytorch  # noqa: F401 (sets its loggers to INFO on import: quiet them after)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.get_num_threads())
    try:
        import zclip  # noqa: F401

        have_zclip = True
    except ImportError:
        have_zclip = False
        _log("zclip not installed: ZClip baselines skipped (pip install zclip==1.0.0)")
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    for section, fn in (("micro", run_micro), ("e2e", run_e2e), ("memory", run_memory),
                        ("syncs", run_syncs)):
        if section in args.sections:
            ts = time.perf_counter()
            res[section] = fn(args, have_zclip)
            _log(f"== {section} done in {time.perf_counter() - ts:.1f}s")
    res["elapsed_s"] = time.perf_counter() - t0
    info["load_end"] = os.getloadavg()
    report = render(info, args, res)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        _log(f"wrote {out}")
    else:
        print(report)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "results": res}, indent=1,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
