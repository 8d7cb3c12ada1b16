from __future__ import annotations

import copy
import io

import pytest
import torch
from support.state import assert_state_equal, opt_tensors

from lightning_gradguard.core.snapshot import Snapshot


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                               torch.nn.Linear(4, 1))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(n):
        model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _module_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_module_state(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == ref.keys()
    for k in ref:
        assert torch.equal(now[k], ref[k]), k


@pytest.mark.parametrize("opt_name", ["adam", "sgd_momentum"])
def test_capture_and_restore_params_buffers_and_optimizer(opt_name: str) -> None:
    model = _model()
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=0.01) if opt_name == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    _train(model, opt, 3)
    ref_model = _module_state(model)
    ref_opt = opt_tensors(opt)
    snap = Snapshot()
    assert not snap.available
    snap.capture(model, [opt], step=3)
    assert snap.available
    assert snap.step == 3
    _train(model, opt, 2, seed=1)  # moves params, BN running stats, moments
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    assert snap.restore(model, [opt]) == 3
    _assert_module_state(model, ref_model)  # incl. BatchNorm running_mean/var/num_batches
    assert_state_equal(opt.state_dict()["state"], ref_opt["state"])
    # parameters are restored in place (the optimizer still holds the same objects)
    assert opt.param_groups[0]["params"][0] is model[0].weight


def test_restore_keeps_current_learning_rate() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 1)
    snap = Snapshot()
    snap.capture(model, [opt], step=1)
    for _ in range(3):
        _train(model, opt, 1)
        sched.step()
    lr = opt.param_groups[0]["lr"]
    assert lr == 0.1 * 0.5**3
    snap.restore(model, [opt])
    assert opt.param_groups[0]["lr"] == lr


def test_snapshot_is_a_copy() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 2)
    snap = Snapshot()
    snap.capture(model, [opt], step=2)
    sd = snap.state_dict()
    w = sd["model"]["0.weight"].clone()
    m = sd["optim"][0]["state"][0]["exp_avg"].clone()
    _train(model, opt, 2, seed=3)
    assert torch.equal(sd["model"]["0.weight"], w)
    assert torch.equal(sd["optim"][0]["state"][0]["exp_avg"], m)
    assert sd["model"]["0.weight"].device == torch.device("cpu")


@pytest.mark.parametrize("opt_name", ["adam", "sgd_momentum"])
def test_second_restore_gives_the_captured_state_again(opt_name: str) -> None:
    model = _model()
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=0.01) if opt_name == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    _train(model, opt, 2)
    ref_opt = opt_tensors(opt)
    snap = Snapshot()
    snap.capture(model, [opt], step=2)
    snap.restore(model, [opt])
    _train(model, opt, 3, seed=5)  # training continues after a rollback
    snap.restore(model, [opt])  # a second rollback to the same snapshot
    assert_state_equal(opt.state_dict()["state"], ref_opt["state"])


def test_restore_without_capture_raises() -> None:
    model = _model()
    with pytest.raises(RuntimeError, match="no snapshot"):
        Snapshot().restore(model, [])


def test_nbytes() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 1)
    snap = Snapshot()
    assert snap.nbytes == 0
    snap.capture(model, [opt], step=1)
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state_dict()["state"].values()
                    for v in s.values() if isinstance(v, torch.Tensor))
    assert snap.nbytes == model_bytes + opt_bytes


@pytest.mark.parametrize("through_disk", [False, True])
def test_state_dict_round_trip(through_disk: bool) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 2)
    ref_model = _module_state(model)
    ref_opt = opt_tensors(opt)
    snap = Snapshot()
    snap.capture(model, [opt], step=7)
    sd = snap.state_dict()
    if through_disk:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    else:
        sd = copy.deepcopy(sd)
    other = Snapshot()
    other.load_state_dict(sd)
    assert other.available
    assert other.step == 7
    _train(model, opt, 2, seed=9)
    assert other.restore(model, [opt]) == 7
    _assert_module_state(model, ref_model)
    assert_state_equal(opt.state_dict()["state"], ref_opt["state"])


def test_empty_state_dict_round_trip() -> None:
    other = Snapshot()
    other.load_state_dict(Snapshot().state_dict())
    assert not other.available
    assert other.step is None


def test_multiple_optimizers() -> None:
    model = _model()
    opt_a = torch.optim.Adam(list(model[0].parameters()), lr=0.01)
    opt_b = torch.optim.SGD(list(model[2].parameters()), lr=0.01, momentum=0.5)
    _train(model, opt_a, 1)
    _train(model, opt_b, 1)
    ref_a, ref_b = opt_tensors(opt_a), opt_tensors(opt_b)
    params = [p.detach().clone() for p in model.parameters()]
    snap = Snapshot()
    snap.capture(model, [opt_a, opt_b], step=1)
    _train(model, opt_a, 1, seed=2)
    _train(model, opt_b, 1, seed=3)
    snap.restore(model, [opt_a, opt_b])
    assert_state_equal(opt_a.state_dict()["state"], ref_a["state"])
    assert_state_equal(opt_b.state_dict()["state"], ref_b["state"])
    assert_state_equal([p.detach() for p in model.parameters()], params)


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_copies_are_kept_on_the_snapshot_device() -> None:
    # "meta": a second device on a CPU-only machine; every copy, model and optimizer state
    # (nested dicts of tensors), is made there, by capture and by load_state_dict alike
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 1)
    snap = Snapshot(device="meta")
    assert snap.device == torch.device("meta")
    snap.capture(model, [opt], step=1)
    held = _tensors(snap.state_dict())
    assert len(held) == len(model.state_dict()) + 3 * len(list(model.parameters()))
    assert {t.device.type for t in held} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # the model is untouched
    cpu = Snapshot()
    cpu.capture(model, [opt], step=1)
    other = Snapshot(device="meta")
    other.load_state_dict(cpu.state_dict())
    assert {t.device.type for t in _tensors(other.state_dict())} == {"meta"}


def test_a_state_with_a_step_but_no_model_is_no_snapshot() -> None:
    snap = Snapshot()
    snap.load_state_dict({"step": 5, "model": {}, "optim": []})
    assert not snap.available
    with pytest.raises(RuntimeError, match=r"^no snapshot to restore: none was captured yet$"):
        snap.restore(_model(), [])


def test_a_mismatch_is_refused_with_a_message_and_nothing_restored() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 1)
    snap = Snapshot()
    snap.capture(model, [opt], step=1)
    _train(model, opt, 1, seed=3)
    before = _module_state(model)
    with pytest.raises(RuntimeError, match=r"^the snapshot holds 1 optimizer states but 2 "
                                           r"optimizers were given; nothing was restored$"):
        snap.restore(model, [opt, opt])
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    with pytest.raises(RuntimeError, match=r"^the snapshot of optimizer 0 has param groups of "
                                           r"sizes \[6\] but the optimizer now has \[6, 1\] "
                                           r"\(param groups were added after it was taken\); "
                                           r"nothing was restored$"):
        snap.restore(model, [opt])
    _assert_module_state(model, before)


def test_tensors_inside_tuples_are_kept_on_the_snapshots_device() -> None:
    from lightning_gradguard.core.snapshot import _copy_to

    src = {"pair": (torch.ones(2), 0.9), "list": [torch.zeros(1)]}
    out = _copy_to(src, torch.device("meta"))
    assert isinstance(out["pair"], tuple)
    assert out["pair"][0].device.type == "meta"
    assert out["pair"][1] == 0.9
    assert out["list"][0].device.type == "meta"


def test_a_cleared_snapshot_saves_and_loads_as_empty() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = Snapshot()
    snap.capture(model, [opt], step=3)
    snap.clear()
    state = snap.state_dict()
    assert state == {"step": None, "model": None, "optim": []}
    fresh = Snapshot()
    fresh.load_state_dict(state)
    assert not fresh.available
    assert fresh.nbytes == 0
