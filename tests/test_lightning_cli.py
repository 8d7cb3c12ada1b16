"""GradGuard and its clip policies configured from YAML through LightningCLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from lightning_gradguard import GradGuard, GradientMonitor, ZScoreClip

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "lightning_cli.yaml"


def _cli_main() -> Any:
    spec = importlib.util.spec_from_file_location("lightning_cli_example",
                                                  ROOT / "examples" / "lightning_cli.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def cli_main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.chdir(tmp_path)
    return _cli_main()


def _guard(cli: Any) -> GradGuard:
    guards = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradGuard)]
    assert len(guards) == 1
    return guards[0]


def test_example_config_parses_and_fits(cli_main: Any, tmp_path: Path) -> None:
    cli = cli_main(["fit", "--config", str(CONFIG), "--trainer.max_steps", "4",
                    f"--trainer.default_root_dir={tmp_path}"])
    guard = _guard(cli)
    assert isinstance(guard.settings.clip, ZScoreClip)
    assert guard.settings.clip.z_threshold == 2.5
    assert guard.settings.halt_after == 25
    assert any(isinstance(cb, GradientMonitor) for cb in cli.trainer.callbacks)
    assert cli.trainer.global_step == 4
    assert guard.summary()["steps"] == 4


def test_print_config_round_trips(cli_main: Any, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIG), "--print_config"])
    printed = capsys.readouterr().out
    assert "lightning_gradguard.GradGuard" in printed
    assert "lightning_gradguard.ZScoreClip" in printed
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(printed)
    cli = cli_main(["fit", "--config", str(dumped), "--trainer.max_steps", "2",
                    f"--trainer.default_root_dir={tmp_path}"])
    guard = _guard(cli)
    assert isinstance(guard.settings.clip, ZScoreClip)
    assert guard.settings.recovery_steps == 200
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(dumped), "--print_config"])
    assert capsys.readouterr().out == printed


def test_bad_value_in_yaml_is_rejected(cli_main: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("halt_after: 25", "halt_after: -1"))
    with pytest.raises((SystemExit, ValueError)):
        cli_main(["fit", "--config", str(bad), "--trainer.max_steps", "1"])
