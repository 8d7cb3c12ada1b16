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
    # one source: the metadata's version is read from __version__ (tests/test_release.py
    # checks the built wheel's metadata against it)
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text
    assert 'version = { attr = "lightning_gradguard.__version__" }' in text
    assert not re.search(r'^version = "', text, flags=re.M)


def test_readme_quickstart_installs_and_runs_the_demo() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    quickstart = blocks[0]
    assert "pip install torch==2.13.0 && " in quickstart
    assert 'pip install -e ".[report]"' in quickstart
    assert quickstart.endswith("&& gradguard demo")
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme


def test_relative_links_in_the_docs_resolve() -> None:
    pages = [ROOT / "README.md", ROOT / "docs" / "guide.md",
             ROOT / "benchmarks" / "results" / "history.md"]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: {target}"
