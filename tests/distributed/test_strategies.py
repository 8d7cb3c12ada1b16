"""GradGuard under DDP, FSDP2 (ModelParallelStrategy) and FSDP1 on CPU, two gloo processes.

Each strategy runs ``guard_script.py`` once (a few seconds); the tests compare what the two
ranks decided and measured with each other, with an independent unsharded norm, and across
strategies (FSDP must measure what DDP measures on the same model and data).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from ._launch import HERE, requires_gloo, run_procs

pytestmark = requires_gloo

STRATEGIES = ("ddp", "fsdp2", "fsdp1")
SKIP_STEPS = {2, 4, 6}  # see guard_script.FAULTS / the docstring there
CLIP_STEP = 8


def _run(strategy: str, out: Path) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    run_procs([[sys.executable, str(HERE / "guard_script.py"), strategy, str(out)]],
              cwd=out, timeout=180)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    base = tmp_path_factory.mktemp("dist")
    return {s: _run(s, base / s) for s in STRATEGIES}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ranks_take_identical_decisions(runs: dict[str, list[dict[str, Any]]],
                                        strategy: str) -> None:
    r0, r1 = runs[strategy]
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    actions0 = [s["action"] for s in r0["steps"]]
    actions1 = [s["action"] for s in r1["steps"]]
    assert actions0 == actions1
    expected = ["skip" if i in SKIP_STEPS else "clip" if i == CLIP_STEP else "none"
                for i in range(10)]
    assert actions0 == expected
    for a, b in zip(r0["steps"], r1["steps"], strict=True):
        # the loss too: the largest over the ranks, so the loss trend that gates backoffs
        # is the same on every rank (NaN on both where any rank's was non-finite)
        for key in ("grad_norm", "threshold", "lr_scale", "spike", "finite", "loss"):
            va, vb = a[key], b[key]
            assert va == vb or (isinstance(va, float) and math.isnan(va) and math.isnan(vb)), \
                (strategy, a["step"], key, va, vb)
    keys = ("steps", "skipped_steps", "clipped_steps", "spikes", "lr_backoffs",
            "nonfinite_steps", "lr_scale")
    assert {k: r0["summary"][k] for k in keys} == {k: r1["summary"][k] for k in keys}
    assert r0["summary"]["skipped_steps"] == len(SKIP_STEPS)
    assert r0["summary"]["clipped_steps"] == 1
    # step 8: rank 1's loss was multiplied by 1e4; both ranks report that one
    losses = [s["loss"] for s in r0["steps"]]
    assert losses[CLIP_STEP] > 100 * max(v for i, v in enumerate(losses)
                                         if i not in SKIP_STEPS and i != CLIP_STEP)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_on_one_rank_is_skipped_on_all(runs: dict[str, list[dict[str, Any]]],
                                           strategy: str) -> None:
    r0, r1 = runs[strategy]
    # step 4: NaN only in rank 1's gradients after the reduction; rank 0's were finite
    step4 = r0["steps"][4]
    assert step4["action"] == "skip"
    assert not step4["finite"]
    # step 6: only rank 1's loss is NaN, every gradient finite: both ranks skip
    assert r0["steps"][6]["loss"] is not None
    assert math.isfinite(r0["steps"][6]["grad_norm"])
    assert r0["steps"][6]["action"] == r1["steps"][6]["action"] == "skip"
    for r in (r0, r1):
        for step in SKIP_STEPS:  # a true skip: the parameters did not move
            assert r["params"][str(step)] == r["params"][str(step - 1)], (strategy, step)
            assert r["steps"][step]["grads_cleared"]
        assert all(math.isfinite(v) for v in r["params"]["9"])
    assert r0["params"] == r1["params"]  # no rank drifted


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_global_norm_equals_unsharded_norm(runs: dict[str, list[dict[str, Any]]],
                                           strategy: str) -> None:
    for r in runs[strategy]:
        for s in r["steps"]:
            if s["step"] in SKIP_STEPS:
                continue
            assert s["grad_norm"] == pytest.approx(s["ref_norm"], rel=1e-5), (strategy, s)
    # after the clip, the gradients the optimizer sees have the threshold's norm
    clip = runs[strategy][0]["steps"][CLIP_STEP]
    assert clip["grad_norm"] > clip["threshold"]
    assert clip["ref_norm_after"] == pytest.approx(clip["threshold"], rel=1e-4)
    assert clip["grad_norm_clipped"] == pytest.approx(clip["threshold"], rel=1e-4)


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_sharded_matches_ddp(runs: dict[str, list[dict[str, Any]]], strategy: str) -> None:
    ddp, sharded = runs["ddp"][0], runs[strategy][0]
    for a, b in zip(ddp["steps"], sharded["steps"], strict=True):
        assert a["action"] == b["action"]
        if a["step"] not in SKIP_STEPS:
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
            assert b["threshold"] == pytest.approx(a["threshold"], rel=1e-5)
    assert sharded["params"]["9"] == pytest.approx(ddp["params"]["9"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_logging_on_rank_zero_only(runs: dict[str, list[dict[str, Any]]],
                                   strategy: str) -> None:
    r0, r1 = runs[strategy]
    assert r0["logged"] >= 10  # log_every_n_steps=1: every step, events included
    assert r1["logged"] == 0


def test_rollback_agrees_on_every_rank(tmp_path: Path) -> None:
    """An Inf weight on rank 1 only (behind tanh: loss and gradients stay finite) is found
    at the next snapshot check by both ranks, which skip and restore the same snapshot."""
    r0, r1 = _run("ddp_rollback", tmp_path / "ddp_rollback")
    assert [s["action"] for s in r0["steps"]] == [s["action"] for s in r1["steps"]]
    assert r0["steps"][8]["action"] == "skip"  # count 9: the first check after step 4
    keys = ("skipped_steps", "rollbacks", "nonfinite_steps", "lr_backoffs")
    assert {k: r0["summary"][k] for k in keys} == {k: r1["summary"][k] for k in keys}
    assert r0["summary"]["rollbacks"] == 1
    assert any(not math.isfinite(v) for v in r1["params"]["7"])  # the fault was real
    for step in ("8", "9"):  # restored on both ranks: identical, finite weights again
        assert r0["params"][step] == r1["params"][step]
        assert all(math.isfinite(v) for v in r1["params"][step])
