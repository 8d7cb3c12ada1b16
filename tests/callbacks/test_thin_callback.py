"""The callback is a thin adapter: the per-optimizer guards behind a public,
read-only view; halt handling and Trainer checks in their own modules; no gradient work
in the callback itself."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support.modules import TinyModule, TwoNetManual
from support.trainer import fit

import lightning_gradguard.callbacks as callbacks_pkg
from lightning_gradguard.callbacks import GradGuard
from lightning_gradguard.callbacks._halt import checkpoint_path, min_keeps_running
from lightning_gradguard.core.guard import GuardCore

CALLBACKS = Path(callbacks_pkg.__file__).parent


def test_cores_is_a_read_only_live_view_of_each_optimizers_guard(tmp_path: Path) -> None:
    guard = GradGuard()
    view = guard.cores
    assert dict(view) == {}
    trainer = fit(TwoNetManual(), 6, [guard], default_root_dir=tmp_path)
    # the view taken before the fit shows the fit's guards, by optimizer index
    assert sorted(view) == [0, 1]
    for i, opt in enumerate(trainer.optimizers):
        assert isinstance(view[i], GuardCore)
        assert view[i].optimizer is getattr(opt, "_optimizer", opt)
        assert view[i].counters.steps == 3  # each optimizer's own steps
    with pytest.raises(TypeError):
        view[0] = view[1]  # type: ignore[index]
    with pytest.raises(AttributeError):
        guard.cores = {}  # type: ignore[misc]
    # a second fit replaces the guards; the same view shows the new ones
    first = view[0]
    fit(TinyModule(), 4, [guard], default_root_dir=tmp_path)
    assert sorted(view) == [0]
    assert view[0] is not first
    assert view[0].counters.steps == 4


def _names(path: Path) -> set[str]:
    """Every imported name, attribute and function name used in ``path``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
    return names


@pytest.mark.parametrize("module", ["guard.py", "_compat.py", "_halt.py"])
def test_the_callback_does_no_gradient_work_itself(module: str) -> None:
    """Skips, clipping, snapshots, restores and their counters are the core's apply (and
    ``GuardCore.restore_snapshot``); the callback only asks."""
    names = _names(CALLBACKS / module)
    forbidden = {"skip_step_", "scale_grads_", "clip_coef", "clip_grad_norm_",
                 "clip_grad_value_", "lightning_gradguard.core.clip",
                 "lightning_gradguard.core.snapshot", "snapshot", "streaks", "rollbacks",
                 "grad", "scale_lr_"}
    assert not names & forbidden


def test_guard_module_measures_nothing() -> None:
    """Norms are the core's (the halt's "weights finite?" check lives in ``_halt``)."""
    names = _names(CALLBACKS / "guard.py")
    assert not names & {"lightning_gradguard.core.norms", "grad_norms", "get_filesystem",
                        "save_checkpoint", "causes_text"}


def test_min_keeps_running_names_the_trainer_minimum() -> None:
    def trainer(step: int, epoch: int, min_steps: int | None,
                min_epochs: int | None) -> SimpleNamespace:
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(min_steps=min_steps),
                               min_epochs=min_epochs)
        return SimpleNamespace(fit_loop=loop, global_step=step, current_epoch=epoch)

    assert min_keeps_running(trainer(10, 0, 30, None)) == "min_steps=30"
    assert min_keeps_running(trainer(30, 0, 30, None)) == ""
    assert min_keeps_running(trainer(10, 1, None, 3)) == "min_epochs=3"
    assert min_keeps_running(trainer(10, 3, None, 3)) == ""
    assert min_keeps_running(trainer(10, 0, None, None)) == ""
    assert min_keeps_running(SimpleNamespace(global_step=1, current_epoch=0)) == ""


def test_checkpoint_path_local_or_url(tmp_path: Path) -> None:
    t = SimpleNamespace(log_dir=None, default_root_dir=str(tmp_path))
    assert checkpoint_path(None, t) == tmp_path / "gradguard_last_good.ckpt"
    assert checkpoint_path(tmp_path / "x", t) == tmp_path / "x" / "gradguard_last_good.ckpt"
    t.log_dir = str(tmp_path / "logs")
    assert checkpoint_path(None, t) == tmp_path / "logs" / "gradguard_last_good.ckpt"
    assert checkpoint_path("memory://run/", t) == "memory://run/gradguard_last_good.ckpt"


class _Module(torch.nn.Module):
    pass


class _Clipping(torch.nn.Module):
    def configure_gradient_clipping(self, *args: object) -> None:
        pass


class DeepSpeedStrategy:
    pass


class _SingleDeviceStrategy:
    pass


def _trainer(**kw: object) -> SimpleNamespace:
    base: dict[str, object] = {"callbacks": [], "strategy": _SingleDeviceStrategy(),
                               "gradient_clip_val": None, "optimizers": [],
                               "is_global_zero": True, "loggers": []}
    return SimpleNamespace(**{**base, **kw})


CLIP_WARNING = (
    "GradGuard and Trainer(gradient_clip_val=0.5) are both active. GradGuard runs first (it "
    "skips non-finite steps and clips spikes to its adaptive threshold); Lightning then clips "
    "the result again to gradient_clip_val, so the effective threshold is the smaller of the "
    "two. Remove `gradient_clip_val` to let GradGuard adapt, or use "
    "GradGuard(clip=FixedNormClip(...)) for a fixed threshold with GradGuard's skipping and "
    "backoff.")
OVERRIDE_WARNING = (
    "_Clipping overrides `configure_gradient_clipping`. It still runs, after GradGuard, on "
    "every step GradGuard does not skip, and sees the gradients GradGuard already clipped; on "
    "skipped steps the gradients are None. If it clips too, the effective threshold is the "
    "smaller of the two: remove the override's clipping to let GradGuard adapt.")
EMPTY_WARNING = (
    "GradGuard: optimizer 0 (SGD) has no trainable parameters (its param groups are empty or "
    "every parameter has requires_grad=False): there is nothing to guard.")
DEEPSPEED_ERROR = (
    "GradGuard does not support DeepSpeed: its engine steps the optimizer itself, so a step "
    "cannot be skipped by clearing gradients. Use DeepSpeed's own `gradient_clipping` "
    "config, or a DDP/FSDP strategy with GradGuard.")
SAME_KEY_ERROR = (
    "Two GradGuard callbacks share state_key 'GradGuard[a]'; give each a distinct `name=` "
    "(e.g. GradGuard(name='a'), GradGuard(name='b'))")
LBFGS_ERROR = (
    "GradGuard does not support optimizer 0 (LBFGS): it evaluates the closure several times "
    "per step, so GradGuard would count function evaluations as steps and its LR backoff "
    "could not reach the update. Use GradientMonitor to watch the gradients, or a "
    "first-order optimizer (SGD, Adam, AdamW) with GradGuard.")


def _exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


def _frozen_sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(1), requires_grad=False)], lr=0.1)


def test_trainer_check_warnings_word_for_word() -> None:
    """The compatibility messages, exactly (moved to ``_compat``, not reworded)."""
    guard = GradGuard()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        guard.setup(_trainer(gradient_clip_val=0.5), _Module(), "fit")  # type: ignore[arg-type]
        guard.setup(_trainer(), _Clipping(), "fit")  # type: ignore[arg-type]
        guard.on_fit_start(_trainer(optimizers=[_frozen_sgd()]), _Module())  # type: ignore[arg-type]
    assert [str(w.message) for w in seen] == [CLIP_WARNING, OVERRIDE_WARNING, EMPTY_WARNING]


def test_trainer_check_errors_word_for_word() -> None:
    guard = GradGuard(name="a")
    with pytest.raises(ValueError, match=_exactly(DEEPSPEED_ERROR)):
        guard.setup(_trainer(strategy=DeepSpeedStrategy()), _Module(), "fit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=_exactly(SAME_KEY_ERROR)):
        guard.setup(_trainer(callbacks=[guard, GradGuard(name="a")]), _Module(), "fit")  # type: ignore[arg-type]
    guard.setup(_trainer(callbacks=[guard, GradGuard(name="b")]), _Module(), "fit")  # type: ignore[arg-type]
    lbfgs = torch.optim.LBFGS([torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match=_exactly(LBFGS_ERROR)):
        guard.on_fit_start(_trainer(optimizers=[lbfgs]), _Module())  # type: ignore[arg-type]
