"""Project-level checks: the README's test command is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd.strip() in ci.splitlines()
    assert "pip install --quiet torch==2.13.0" in ci


def test_version_matches_pyproject() -> None:
    import lightning_gradguard

    text = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{lightning_gradguard.__version__}"' in text
