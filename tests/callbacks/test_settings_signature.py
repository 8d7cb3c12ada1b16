"""Settings are defined once: ``GuardSettings``. The callback repeats them as explicit keyword
arguments (LightningCLI builds its configuration from the signature); this checks that
names, order, defaults, annotations and documentation agree."""

from __future__ import annotations

import dataclasses
import inspect
import re

from lightning_gradguard import GradGuard
from lightning_gradguard.callbacks.guard import GradGuardLogic
from lightning_gradguard.core.settings import GuardSettings

FIELDS = dataclasses.fields(GuardSettings)
PARAMS = list(inspect.signature(GradGuardLogic.__init__).parameters.values())[1:]


def _documented(doc: str | None) -> set[str]:
    return set(re.findall(r"^        (\w+):", doc or "", flags=re.MULTILINE))


def test_callback_signature_starts_with_every_setting_in_order() -> None:
    assert [p.name for p in PARAMS[:len(FIELDS)]] == [f.name for f in FIELDS]


def test_callback_defaults_equal_the_settings_defaults() -> None:
    for f, p in zip(FIELDS, PARAMS, strict=False):
        assert p.default == f.default, f.name
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def test_callback_annotations_equal_the_settings_annotations() -> None:
    for f, p in zip(FIELDS, PARAMS, strict=False):
        assert str(p.annotation) == str(f.type), f.name


def test_every_setting_is_documented_in_both_docstrings() -> None:
    names = {f.name for f in FIELDS}
    assert names <= _documented(GuardSettings.__doc__)
    assert {p.name for p in PARAMS} <= _documented(GradGuard.__doc__)


def test_the_callback_passes_every_argument_through() -> None:
    changed = {"norm_type": 1.0, "skip_nonfinite": False, "lr_backoff": False,
               "backoff_factor": 0.25, "recovery_steps": 7, "min_lr_scale": 0.01,
               "spike_patience": 2, "spike_window": 9, "growth_patience": 0,
               "growth_min_rise": 0.5, "rollback": True, "snapshot_every": 3,
               "rollback_after": 2, "halt_after": 4, "max_update_ratio": None,
               "amp_halt_after": 6, "nonfinite_window": 11, "diagnose": False,
               "preflight": False, "verbose": False}
    assert set(changed) == {f.name for f in FIELDS} - {"clip"}
    settings = GradGuard(**changed).settings  # type: ignore[arg-type]
    assert {k: getattr(settings, k) for k in changed} == changed
