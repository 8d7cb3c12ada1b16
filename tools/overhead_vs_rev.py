"""Per-step cost of ``GuardCore.step`` and ``GradGuard``'s hooks: this tree against a revision.

Answers "is the guard's overhead no worse than at revision REV?" on one machine, in one
process: the package of REV is exported with ``git archive`` into a temporary directory under
another import name (``gg_rev``), so both versions run interleaved, round after round, on the
same gradients. Timing differences between separate processes (memory layout, the neighbours
of a shared machine) are larger than the few microseconds in question; interleaving in one
process cancels them.

Three measurements, each the median over rounds of the median over ``--calls`` calls:

- **core**: ``GuardCore.step`` on a model's gradients (reset before every call), and the floor
  (one fused ``_foreach_norm`` read plus one host read), for a tiny model (4 x Linear(8, 8):
  Python overhead dominates) and ``DeepMLP`` (6 x 1024, 5.3 M parameters: the tensor work
  dominates);
- **hooks**: ``GradGuard``'s Lightning hooks of one step (``on_train_batch_start``,
  ``on_before_backward``, ``on_before_optimizer_step``, ``on_train_batch_end``) called in
  Lightning's order on a real ``Trainer`` set up as for ``fit``, for the tiny model.

Usage::

    python tools/overhead_vs_rev.py d472c44 --out benchmarks/results/overhead_vs_rev.md

The result is a ratio of this tree to REV measured in the same run (no stored baseline).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import itertools
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PKG = "lightning_gradguard"
ALIAS = "gg_rev"


def export_revision(rev: str, dest: Path) -> str:
    """Export ``rev``'s package into ``dest/gg_rev`` (imports renamed); return the full hash."""
    full = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    blob = subprocess.run(["git", "archive", full, PKG], cwd=ROOT, check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    (dest / PKG).rename(dest / ALIAS)
    word = re.compile(rf"\b{PKG}\b")
    for path in (dest / ALIAS).rglob("*.py"):
        path.write_text(word.sub(ALIAS, path.read_text()))
    return full


def tiny_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """4 x ``Linear(8, 8)`` and an input batch: Python overhead dominates."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)]), torch.randn(4, 8)


def deep_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """``DeepMLP`` 6 x 1024 (5.3 M parameters) and an input batch: tensor work dominates."""
    from lightning_gradguard import demos

    torch.manual_seed(0)
    model = demos.DeepMLP(width=1024, depth=6, in_features=32, init="he", batch_norm=True,
                          activation="relu", optimizer="sgd_momentum", lr=0.01)
    return model, torch.randn(64, 32)


def interleaved(fns: dict[str, Callable[[], int]], rounds: int, calls: int) -> dict[str, float]:
    """Median over rounds of the median per-call time, in microseconds.

    The rounds cycle through every order of the measurements (no position in a round is
    favoured).
    """
    for f in fns.values():
        for _ in range(max(10, calls // 4)):
            f()
    res: dict[str, list[float]] = {k: [] for k in fns}
    orders = list(itertools.permutations(fns))
    for r in range(rounds):
        for k in orders[r % len(orders)]:
            res[k].append(statistics.median(fns[k]() for _ in range(calls)))
    out = {k: statistics.median(v) / 1000 for k, v in res.items()}
    for k in res:  # paired with the revision within each round: the machine's drift cancels
        if "rev" in res and k.startswith("this"):
            d = [b - a for a, b in zip(res["rev"], res[k], strict=True)]
            lo, hi = _quartiles(d)
            out[f"diff:{k}"] = statistics.median(d) / 1000
            out[f"diff_lo:{k}"], out[f"diff_hi:{k}"] = lo / 1000, hi / 1000
    return out


def _quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def core_case(build: Callable[[], tuple[torch.nn.Module, torch.Tensor]],
              cores: dict[str, Callable[..., Any]],
              rounds: int, calls: int) -> dict[str, float]:
    """``GuardCore.step`` of each version in ``cores`` and the floor on ``build``'s gradients."""
    model, x = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = model(x).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    base = [g.clone() for g in grads]
    value = loss.detach()
    guards = {name: make(model, opt) for name, make in cores.items()}

    def step(guard: Any) -> Callable[[], int]:
        def run() -> int:
            torch._foreach_copy_(grads, base)
            t = time.perf_counter_ns()
            guard.step(value)
            return time.perf_counter_ns() - t
        return run

    def floor() -> int:
        torch._foreach_copy_(grads, base)
        t = time.perf_counter_ns()
        torch.stack(torch._foreach_norm(grads)).norm().item()
        return time.perf_counter_ns() - t

    return interleaved({**{n: step(g) for n, g in guards.items()}, "floor": floor},
                       rounds, calls)


def hooks_case(callbacks: dict[str, Any], rounds: int, calls: int) -> dict[str, float]:
    """The hooks of one optimizer step, called in Lightning's order on a real ``Trainer``.

    The ``Trainer`` is set up as for ``fit`` (not fitted); the model is the tiny one.
    """
    import warnings

    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.x = tiny_model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x)
            return out

    def run_for(cb: Any) -> Callable[[], int]:
        module = Tiny()
        opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False,
                                 enable_progress_bar=False, enable_checkpointing=False,
                                 enable_model_summary=False, callbacks=[cb])
        trainer.optimizers = [opt]
        trainer.strategy.connect(module)
        progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress
        for hook in ("setup", "on_fit_start", "on_train_start"):
            args = (trainer, module, "fit") if hook == "setup" else (trainer, module)
            getattr(cb, hook)(*args)
        loss = module(module.x).pow(2).mean()
        loss.backward()
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        base = [g.clone() for g in grads]
        batch = (module.x,)

        def run() -> int:
            torch._foreach_copy_(grads, base)
            t = time.perf_counter_ns()
            cb.on_train_batch_start(trainer, module, batch, 0)
            cb.on_before_backward(trainer, module, loss)
            cb.on_before_optimizer_step(trainer, module, opt)
            cb.on_train_batch_end(trainer, module, None, batch, 0)
            elapsed = time.perf_counter_ns() - t
            progress.optimizer.step.total.completed += 1  # the step Lightning would count
            return elapsed
        return run

    return interleaved({n: run_for(cb) for n, cb in callbacks.items()}, rounds, calls)


def main(argv: list[str] | None = None) -> int:
    """Export ``rev``, measure both versions interleaved, print (and write) the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the git revision to compare with (e.g. d472c44)")
    p.add_argument("--rounds", type=int, default=30,
                   help="rounds (each cycles to the next order of the measurements)")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="markdown report (default: stdout)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        full = export_revision(args.rev, Path(tmp))
        sys.path.insert(0, tmp)
        rev_guard = importlib.import_module(f"{ALIAS}.core.guard")
        rev_pkg = importlib.import_module(ALIAS)
        from lightning_gradguard import GradGuard
        from lightning_gradguard.core.guard import GuardCore

        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", PKG], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        this = f"{head}{' (+ uncommitted changes)' if dirty else ''}"
        cores: dict[str, Callable[..., Any]] = {"rev": rev_guard.GuardCore, "this": GuardCore}
        rows: list[tuple[str, str, dict[str, float]]] = []
        # the tiny model also without the cause diagnosis (added after the redesign)
        tiny_cores: dict[str, Callable[..., Any]] = {
            **cores, "this_nodiag": functools.partial(GuardCore, diagnose=False)}
        r = core_case(tiny_model, tiny_cores, args.rounds, args.calls)
        rows += [("tiny model, GuardCore.step", "this", r),
                 ("tiny model, GuardCore.step, this tree with diagnose=False", "this_nodiag", r)]
        print(f"tiny: {r}", file=sys.stderr)
        r = core_case(deep_model, cores, args.rounds, args.calls)
        rows.append(("DeepMLP 6x1024, GuardCore.step", "this", r))
        print(f"DeepMLP: {r}", file=sys.stderr)
        cbs = {"rev": rev_pkg.GradGuard(**_quiet(rev_pkg.GradGuard)),
               "this": GradGuard(**_quiet(GradGuard))}
        r = hooks_case(cbs, args.rounds, args.calls)
        rows.append(("tiny model, GradGuard hooks of one step", "this", r))
        print(f"hooks: {r}", file=sys.stderr)
    lines = [
        "# Overhead against a revision: one process, interleaved",
        "",
        f"Generated by `python tools/overhead_vs_rev.py {args.rev}`: this tree ({this}) "
        f"against `{full[:10]}`, {args.rounds} rounds x {args.calls} calls, one thread, "
        f"torch {torch.__version__}. Medians in µs; the floor is one fused read of the "
        "gradients and one host read.",
        "",
        "| measurement | revision | this tree | this - revision, paired per round (quartiles) "
        "| this / revision | floor | beyond the floor: revision -> this |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, k, r in rows:
        floor = r.get("floor")
        beyond = (f"{r['rev'] - floor:.1f} -> {r[k] - floor:.1f}" if floor is not None
                  else "–")
        lines.append(f"| {label} | {r['rev']:.1f} | {r[k]:.1f} | "
                     f"{r[f'diff:{k}']:+.1f} ({r[f'diff_lo:{k}']:+.1f} .. "
                     f"{r[f'diff_hi:{k}']:+.1f}) | {r[k] / r['rev']:.3f} | "
                     f"{'–' if floor is None else f'{floor:.1f}'} | {beyond} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


def _quiet(cls: Any) -> dict[str, Any]:
    """``verbose=False`` / ``progress_bar=False`` where the version has them."""
    import inspect

    names = inspect.signature(cls).parameters
    return {k: False for k in ("verbose", "progress_bar") if k in names}


if __name__ == "__main__":
    raise SystemExit(main())
