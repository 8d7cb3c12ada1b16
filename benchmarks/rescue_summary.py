"""Compact per-method summary of the cached rescue runs (for the ablation file).

For each GradGuard variant: at each workload's tuned LR (clean) the ratio of its mean final
loss to the better of ``none`` and ``clip1`` (do-no-harm target <= 1.005); at the other LRs the
ratio to the best peer (rescue target <= 1.02); on the fault runs the worst per-seed ratio of
the fault run to the same method's clean run (target <= 1.005) and the smallest final
``lr_scale``. Usage: ``python benchmarks/rescue_summary.py --methods gradguard proto:X ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rescue as rb
import rescue_workloads as rw
from rescue_split import TUNING_SEEDS, TUNING_WORKLOADS

PEERS = ("none", "clip1", "clip0.25", "zclip", "autoclip_p10", "agc")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--workloads", nargs="+", default=list(TUNING_WORKLOADS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(TUNING_SEEDS))
    args = p.parse_args()
    cache = rb.DEFAULT_CACHE

    def get(w: str, lr: float, s: int, f: str, m: str) -> dict | None:
        rec = rb.get(cache, w, lr, s, f, m, rw.WORKLOADS[w].steps, False)
        if rec is None and m.startswith("proto:"):
            # a prototype run cached under an earlier key scheme of the same code (see the
            # ablation file): the newest file of this configuration
            stem = rb.cache_file(cache, w, lr, s, f, m, rw.WORKLOADS[w].steps).name
            prefix = stem.rsplit("_", 1)[0] + "_"
            found = sorted((p for p in (cache / w).glob(prefix + "*.json")
                            if p.name[len(prefix):].count("_") == 0),
                           key=lambda p: p.stat().st_mtime)
            if found:
                rec = json.loads(found[-1].read_text())
                if rec.get("steps") != rw.WORKLOADS[w].steps:
                    rec = None
        return rec

    def mean(w: str, lr: float, f: str, m: str) -> float | None:
        recs = [get(w, lr, s, f, m) for s in args.seeds]
        if any(r is None for r in recs):
            return None
        return rb._mean([rb._loss(r) for r in recs])  # type: ignore[arg-type]

    print("| method | " + " | ".join(f"{w}" for w in args.workloads) + " |")
    print("|---|" + "---|" * len(args.workloads))
    for m in args.methods:
        cells = []
        for wname in args.workloads:
            w = rw.WORKLOADS[wname]
            parts = []
            for lr in w.lrs():
                if w.faults != ("clean",):
                    worst, scale, pairs = 1.0, 1.0, 0
                    for f in w.faults[1:]:
                        for s in args.seeds:
                            rf, rc = get(wname, lr, s, f, m), get(wname, lr, s, "clean", m)
                            if rf is None or rc is None:
                                continue
                            pairs += 1
                            worst = max(worst, rb._loss(rf) / rb._loss(rc))
                            scale = min(scale, float((rf.get("gradguard") or {}).get(
                                "lr_scale", 1.0)))
                    mc = mean(wname, lr, "clean", m)
                    if not pairs:
                        parts.append("?")
                        continue
                    parts.append(f"clean {rb.fmt(mc) if mc else '?'}; worst fault/clean "
                                 f"{worst:.4f}, min lr_scale {scale:.2f}")
                    continue
                mm = mean(wname, lr, "clean", m)
                if mm is None:
                    parts.append(f"{lr:g}: ?")
                    continue
                if lr == w.lrs()[0]:
                    base = [x for x in (mean(wname, lr, "clean", "none"),
                                        mean(wname, lr, "clean", "clip1")) if x is not None]
                    ref = min(base) if base else math.nan
                    tag = "harm"
                else:
                    peers = [x for x in (mean(wname, lr, "clean", q) for q in PEERS)
                             if x is not None]
                    ref = min(peers) if peers else math.nan
                    tag = "peer"
                ratio = mm / ref if math.isfinite(ref) and math.isfinite(mm) else math.nan
                parts.append(f"{lr:g}: {rb.fmt(mm)} ({tag} {ratio:.3f})")
            cells.append("<br>".join(parts))
        print(f"| `{m}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
