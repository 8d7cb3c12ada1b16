"""The overhead report (markdown) from the measured results; targets from
:mod:`gradbench.targets`."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

from ..targets import E2E_MAX_RATIO, MICRO_MAX_VS_CLIP, MICRO_MAX_VS_ZCLIP, MICRO_MIN_TENSORS
from .e2e import FLOOR_CFG
from .fixtures import CLEAN_NORM, SPIKE, WARM_NOISE
from .timing import fmt_bytes, fmt_t

__all__ = ["render", "render_e2e", "render_memory", "render_micro", "render_syncs"]


def fmt_r(ratio: float) -> str:
    """A ratio: ``1.07×`` (``n/a`` when not finite)."""
    return "n/a" if not math.isfinite(ratio) else f"{ratio:.2f}×"


def check(ok: bool) -> str:
    """✅ / ❌."""
    return "✅" if ok else "❌"


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
                    f"{fmt_t(c['hook_s'])} | {c['hook_s'] / base * 100:.1f} % | "
                    f"{fmt_t(c.get('hook_mean_s', math.nan))}")
            a(f"| {name} | {fmt_t(c['step_s'])} | {fmt_t(lo)} – {fmt_t(hi)} | "
              f"{fmt_r(c['step_s'] / base)} | {hook} | {fmt_t(c['step_wall_s'])} | "
              f"{fmt_r(c['step_wall_s'] / base_w)} |")
        for name, why in m["skipped"].items():
            a(f"| {name} | skipped: {why} | | | | | | | |")
        st = m.get("standalone")
        if st:
            a("")
            a(f"The same model's gradients outside Lightning ({_model_name(m)}, "
              "micro-benchmark method, clean step):\n")
            a("| | time | / step(none) |\n|---|---:|---:|")
            for k, v in st.items():
                a(f"| {k} | {fmt_t(v)} | {v / base * 100:.1f} % |")
        g = m["configs"].get("GradGuard()")
        if g and math.isfinite(g.get("core_s", math.nan)):
            a(f"\nInside the GradGuard hook ({fmt_t(g['hook_s'])}), `GuardCore.step` takes "
              f"{fmt_t(g['core_s'])}: the Lightning adapter adds "
              f"{fmt_t(max(0.0, g['hook_s'] - g['core_s']))} per step.")
        if g:
            q = g["step_s"] / base
            qh = 1 + g["hook_s"] / base
            a("")
            a(f"| target ({_model_name(m)}) | measured | |\n|---|---|:-:|")
            a(f"| step time with GradGuard() ≤ {E2E_MAX_RATIO:g}× no callback (ratio of medians) | "
              f"{fmt_r(q)} | {check(q <= E2E_MAX_RATIO)} |")
            a(f"| same, from the hook time (1 + hook / step(none)) | {qh:.3f}× | "
              f"{check(qh <= E2E_MAX_RATIO)} |")
            if math.isfinite(g.get("hook_mean_s", math.nan)):
                qm = 1 + g["hook_mean_s"] / base
                a(f"| same, from the mean hook time (includes the occasional costlier steps: "
                  f"logging, and with SGD the weight read for `max_update_ratio` every 8th "
                  f"step) | {qm:.3f}× | {check(qm <= E2E_MAX_RATIO)} |")
            fl = m["configs"].get(FLOOR_CFG)
            floor_cells = "– | –"
            if fl:
                qf = 1 + fl["hook_s"] / base
                beyond = g["hook_s"] - fl["hook_s"]
                a(f"| (reference: the in-step floor, one `_foreach_norm` read of the gradients "
                  f"and one host read, 1 + hook / step(none)) | {qf:.3f}× | |")
                a(f"| GradGuard's hook beyond that floor | {fmt_t(beyond)} "
                  f"({beyond / base * 100:.1f} % of the step) | |")
                floor_cells = f"{qf:.3f}× | {fmt_t(beyond)} ({beyond / base * 100:.1f} %)"
            if st:
                qs = 1 + st["floor"] / base
                a(f"| (for reference: the same read outside a training step, warm caches, "
                  f"1 + floor / step(none)) | {qs:.3f}× | |")
            summary.append(
                f"| {_model_name(m)} | {m['params'] / 1e6:.2f} M / {m['tensors']} | "
                f"{fmt_t(base)} | {fmt_r(q)} {check(q <= E2E_MAX_RATIO)} | "
                f"{qh:.3f}× {check(qh <= E2E_MAX_RATIO)} | {floor_cells} |")
        a("")
    if summary:
        a("### Targets (end to end), all models\n")
        a(f"Step time with `GradGuard()` ≤ {E2E_MAX_RATIO:g}× no callback, per model (the rows "
          "of each "
          "model's target table above):\n")
        a("| model | parameters / tensors | step (none) | GradGuard() / none, ratio of "
          "medians | 1 + hook / step(none) | floor: 1 + hook / step(none) | GradGuard's "
          "hook beyond the floor (% of the step) |")
        a("|---|---:|---:|---:|---:|---:|---:|")
        for row in summary:
            a(row)
        a("")


def render_micro(a: Callable[[str], None], m: dict[str, Any], cpu_clock: bool) -> None:
    """Section 1: the micro benchmark tables, scaling slopes and targets."""

    def pick(row: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = row["median_s"] if cpu_clock else row["wall_s"]
        return out

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
                     f"{r['grad_bytes'] / 2**20:.0f}", fmt_t(t(r, "floor")),
                     f"**{fmt_t(g)}**", fmt_t(c)]
            cells += [fmt_t(z)] if zc else []
            cells += [] if spike else [fmt_t(t(r, "lightning_grad_norm"))]
            cells += [fmt_r(g / c)] + ([fmt_r(g / z)] if zc else [])
            if cpu_clock:
                gw = t(r, "guard" + sfx, True)
                cells += [fmt_r(gw / t(r, "clip_grad_norm_" + sfx, True))]
                cells += [fmt_r(gw / t(r, "zclip" + sfx, True))] if zc else []
            a("| " + " | ".join(cells) + " |")
        a("")
    a("### Fixed cost: tiny tensors (16 elements each, bytes negligible)\n")
    keys = ["floor", "guard", "guard_spike", "clip_grad_norm_", "lightning_grad_norm"]
    keys += ["zclip", "zclip_spike"] if zc else []
    a("| tensors | " + " | ".join(keys) + " |")
    a("|---:|" + "---:|" * len(keys))
    for r in m["tiny"]:
        a(f"| {r['tensors']} | " + " | ".join(fmt_t(pick(r).get(k, math.nan))
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
            fmt_t(pick(lo).get(k, math.nan)) for k in keys) + " |")
    a("")
    a("### Targets (micro)\n")
    a("| target | measured | |\n|---|---|:-:|")
    for r in m["rows"]:
        if r["tensors"] < MICRO_MIN_TENSORS:
            continue
        for spike in (False, True):
            sfx = "_spike" if spike else ""
            q = t(r, "guard" + sfx) / t(r, "clip_grad_norm_" + sfx)
            kind = "spike" if spike else "clean"
            a(f"| guard ≤ {MICRO_MAX_VS_CLIP:g}× clip_grad_norm_, {kind}, "
              f"{r['tensors']} tensors × {r['params'] / 1e6:.0f} M | {fmt_r(q)} | "
              f"{check(q <= MICRO_MAX_VS_CLIP)} |")
    if zc:
        for spike in (False, True):
            sfx = "_spike" if spike else ""
            qs = [(t(r, "guard" + sfx) / t(r, "zclip" + sfx), r) for r in m["rows"]]
            ok = [r for q, r in qs if q <= MICRO_MAX_VS_ZCLIP]
            worst, wr = max(qs, key=lambda x: x[0])
            best, br = min(qs, key=lambda x: x[0])
            kind = "spike" if spike else "clean"
            a(f"| guard ≤ {MICRO_MAX_VS_ZCLIP:g}× ZClip.step, {kind} | met in "
              f"{len(ok)}/{len(qs)} grid cells; best {fmt_r(best)} ({br['tensors']} × "
              f"{br['params'] / 1e6:.0f} M), worst {fmt_r(worst)} ({wr['tensors']} × "
              f"{wr['params'] / 1e6:.0f} M) | {check(len(ok) == len(qs))} |")
    a("")



def render_memory(a: Callable[[str], None], mm: dict[str, Any],
                  args: argparse.Namespace) -> None:
    """Section 3: state, allocations, peak RSS and the rollback snapshot."""
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
        a(f"| {r['tensors']} | {r['params'] / 1e6:.1f} M | {fmt_bytes(r['grad_bytes'])} | "
          f"{fmt_bytes(r['state_bytes'])} | {fmt_bytes(r['alloc_clean'])} | "
          f"{fmt_bytes(r['alloc_spike'])} | {fmt_bytes(r['alloc_clip_grad_norm_'])} | "
          f"{fmt_bytes(r['alloc_zclip']) if 'alloc_zclip' in r else 'n/a'} |")
    a("")
    rss = mm["rss"]
    a(f"Peak RSS added by one call, {rss['tensors']} tensors × {rss['params'] / 1e6:.0f} M "
      f"params ({fmt_bytes(rss['grad_bytes'])} of gradients):\n")
    a("| call | peak RSS added |\n|---|---:|")
    for k, v in rss.items():
        if k in ("tensors", "params", "grad_bytes"):
            continue
        a(f"| {k} | {fmt_bytes(v) if v is not None else 'n/a'} |")
    a("")
    a("### Opt-in rollback snapshot (`rollback=True`), separately\n")
    a("A copy of `module.state_dict()` and of the optimizer's `state_dict()` on the "
      "host, taken every `snapshot_every` (100) steps; `core.snapshot.nbytes`. "
      f"`DeepMLP` width {args.width}, depth {args.depth}, BatchNorm.\n")
    a("| optimizer | parameter bytes | model state | optimizer state | "
      "snapshot.nbytes | snapshot / params | capture time |")
    a("|---|---:|---:|---:|---:|---:|---:|")
    for s in mm["snapshot"]:
        a(f"| {s['optimizer']} | {fmt_bytes(s['param_bytes'])} | "
          f"{fmt_bytes(s['model_state_bytes'])} | {fmt_bytes(s['optim_state_bytes'])} | "
          f"{fmt_bytes(s['snapshot_bytes'])} | "
          f"{s['snapshot_bytes'] / s['param_bytes']:.2f}× | {fmt_t(s['capture_s'])} |")
    sc = mm.get("snapshot_callback")
    if sc:
        a(f"\n`GradGuard(rollback=True, snapshot_every=2)` in `Trainer.fit` (optimizer "
          f"{sc['optimizer']}), snapshot of step {sc['step']}: `snapshot.nbytes` = "
          f"{fmt_bytes(sc['snapshot_bytes'])} = "
          f"{sc['snapshot_bytes'] / sc['param_bytes']:.2f}× the parameter bytes. (The "
          "snapshot of step 1 is taken before the first update, when the optimizer has "
          "no state yet: about 1× until the next snapshot.)")
    a("")



def render_syncs(a: Callable[[str], None], s: dict[str, Any]) -> None:
    """Section 4: host reads and conversions per step, with the baselines."""
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

    if "micro" in res:
        render_micro(a, res["micro"], cpu_clock)
    if "e2e" in res:
        render_e2e(a, res["e2e"], args)
    if "memory" in res:
        render_memory(a, res["memory"], args)
    if "syncs" in res:
        render_syncs(a, res["syncs"])
    return "\n".join(L) + "\n"
