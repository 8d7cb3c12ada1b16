"""The ranks' consensus (``callbacks/_distributed.py``) asserted directly, in one process.

``torch.distributed.all_reduce`` is replaced by a simulated world (:class:`FakeWorld`): each
rank's program runs in turn, and is run again until every collective's inputs are known, so
each collective returns the reduction over all ranks. ``MAX`` is computed as gloo does it
(``std::max`` folded over the ranks in order): a NaN that comes after a number is dropped,
which is why the reducers turn NaN into ``inf`` (or a flag) before a ``MAX``. The real
multi-process runs are ``tests/distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest
import torch
import torch.distributed as dist

from lightning_gradguard.callbacks._distributed import ConsensusReducer, GroupReducer
from lightning_gradguard.core import GuardCore
from lightning_gradguard.core.guard import Action

T = TypeVar("T")
NAN = math.nan


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _reduce(op: Any, xs: Sequence[torch.Tensor]) -> torch.Tensor:
    if op == dist.ReduceOp.SUM:
        return torch.stack(list(xs)).sum(0)
    assert op == dist.ReduceOp.MAX, op
    acc = xs[0]
    for x in xs[1:]:
        acc = torch.where(acc < x, x, acc)  # std::max(acc, x): NaN second is dropped
    return acc


def _all_reduce(mine: list[torch.Tensor],
                known: list[list[torch.Tensor]]) -> Callable[..., None]:
    """One rank's ``all_reduce``: records its input (``mine``) and, once every rank's input
    to this collective is ``known`` (from the previous run), writes their reduction."""
    def all_reduce(t: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None) -> None:
        i = len(mine)
        mine.append(t.detach().clone())
        if all(i < len(k) for k in known):
            t.copy_(_reduce(op, [k[i] for k in known]))
    return all_reduce


class FakeWorld:
    """Runs one program per simulated rank with a shared ``all_reduce`` (see the module)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    def run(self, programs: Sequence[Callable[[], T]]) -> list[T]:
        known: list[list[torch.Tensor]] = [[] for _ in programs]
        for _ in range(8):
            seen: list[list[torch.Tensor]] = [[] for _ in programs]
            results = []
            for rank, program in enumerate(programs):
                self.monkeypatch.setattr(dist, "all_reduce", _all_reduce(seen[rank], known))
                results.append(program())
            settled = all(len(s) == len(k) and all(_same(a, b) for a, b in zip(s, k,
                                                                                strict=True))
                          for s, k in zip(seen, known, strict=True))
            if settled:
                assert any(seen), "no collective was called"
                return results
            known = seen
        raise AssertionError("the collectives' inputs never settled")


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> FakeWorld:
    return FakeWorld(monkeypatch)


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# --------------------------------------------------------------------------- GroupReducer
def test_group_reducer_max_keeps_a_nan_of_any_rank(world: FakeWorld) -> None:
    for values in ([1.0, NAN], [NAN, 1.0], [2.0, 3.0]):
        out = world.run([lambda v=v: GroupReducer()(_t(v), "max") for v in values])
        expected = max(values) if all(map(math.isfinite, values)) else math.inf
        assert [float(o) for o in out] == [expected, expected], values


def test_group_reducer_sums_partial_statistics(world: FakeWorld) -> None:
    partials = [_t(3.0), _t(4.0)]
    out = world.run([lambda p=p: GroupReducer()(p, "sum") for p in partials])
    assert [float(o) for o in out] == [7.0, 7.0]
    assert [float(p) for p in partials] == [3.0, 4.0]  # the inputs are not written to


# --------------------------------------------------------------------------- ConsensusReducer
def _consensus(stat: float, loss: float | None,
               shard: GroupReducer | None = None) -> Callable[[], tuple[float, float | None]]:
    def program() -> tuple[float, float | None]:
        reducer = ConsensusReducer(shard=shard)
        armed = reducer.arm(None if loss is None else _t(loss))
        out = reducer(_t(stat), "sum")
        reducer.disarm()
        return float(out), None if armed is None else float(armed)
    return program


def _nan_or(v: float | None) -> Any:
    return v if v is None or not math.isnan(v) else "nan"


def test_every_rank_sees_the_largest_statistic_and_loss(world: FakeWorld) -> None:
    out = world.run([_consensus(1.0, 0.5), _consensus(1.5, 0.7)])
    assert out == [(1.5, pytest.approx(0.7)), (1.5, pytest.approx(0.7))]


def test_nan_gradients_on_one_rank_make_every_rank_non_finite(world: FakeWorld) -> None:
    for ranks in ([(1.0, 0.5), (NAN, 0.5)], [(NAN, 0.5), (1.0, 0.5)]):
        out = world.run([_consensus(s, loss) for s, loss in ranks])
        # the statistic is NaN everywhere; the (finite) loss stays the loss
        assert [(_nan_or(s), loss) for s, loss in out] == [("nan", 0.5), ("nan", 0.5)]


def test_a_nan_loss_on_one_rank_is_nan_on_every_rank(world: FakeWorld) -> None:
    for ranks in ([(1.0, 0.5), (1.0, NAN)], [(1.0, math.inf), (1.0, 0.5)]):
        out = world.run([_consensus(s, loss) for s, loss in ranks])
        # the statistic stays finite (the gradients are); the loss marks the step
        assert [(s, _nan_or(loss)) for s, loss in out] == [(1.0, "nan"), (1.0, "nan")]


def test_a_rank_without_a_loss_follows_the_others(world: FakeWorld) -> None:
    out = world.run([_consensus(1.0, None), _consensus(1.0, NAN)])
    assert [(_nan_or(s), _nan_or(loss)) for s, loss in out] == [("nan", None),
                                                                 (1.0, "nan")]
    out = world.run([_consensus(1.0, None), _consensus(1.0, 0.5)])
    assert out == [(1.0, None), (1.0, 0.5)]


def test_shard_statistics_are_summed_before_the_consensus(world: FakeWorld) -> None:
    out = world.run([_consensus(3.0, 0.5, GroupReducer()), _consensus(4.0, 0.5,
                                                                       GroupReducer())])
    assert out == [(7.0, 0.5), (7.0, 0.5)]


# --------------------------------------------------------------------------- GuardCore
def _guarded_rank(rank: int, bad: str) -> Callable[[], tuple[list[Action], list[torch.Tensor]]]:
    """Six guarded SGD steps on identical replicas; at step 4 rank 1 alone has a NaN loss
    term without a gradient (``bad="loss"``) or a NaN gradient (``bad="grad"``)."""
    def program() -> tuple[list[Action], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        consensus = ConsensusReducer()
        core = GuardCore(model, opt, reducer=consensus)
        data = torch.Generator().manual_seed(1)
        actions = []
        for step in range(6):
            x = torch.randn(16, 4, generator=data)
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            if step == 4 and rank == 1:
                if bad == "loss":
                    loss = loss + NAN
                else:
                    model[0].weight.grad[0, 0] = NAN
            report = core.step(consensus.arm(loss.detach()), step=step)
            consensus.disarm()
            opt.step()
            actions.append(report.action)
        return actions, [p.detach().clone() for p in model.parameters()]
    return program


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_one_ranks_bad_step_is_skipped_on_every_rank(world: FakeWorld, bad: str) -> None:
    (a0, w0), (a1, w1) = world.run([_guarded_rank(0, bad), _guarded_rank(1, bad)])
    assert a0 == a1
    assert a0[4] is Action.SKIP
    assert Action.SKIP not in a0[:4] + a0[5:]
    assert all(torch.equal(x, y) for x, y in zip(w0, w1, strict=True))  # still replicas
