"""Project-level checks: the README's test command is what CI runs; the README is a first page
whose links, and those of docs/, resolve; the reference tables under docs/ are complete."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from lightning_gradguard import GradGuard
from lightning_gradguard.core.settings import GuardSettings

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


def _pages() -> list[Path]:
    """Pages whose relative links (and anchors) must resolve: the README, every page under
    docs/, and the results history the README points to."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            ROOT / "benchmarks" / "results" / "history.md"]


def _without_code(text: str) -> str:
    """Markdown without fenced code blocks (a ``# comment`` there is no heading, a ``[i](j)``
    no link) and without inline code spans (link text in backticks stays a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped
    (backticks too), spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
    return anchors


def test_slug_is_githubs() -> None:
    assert _slug("How it decides (core)") == "how-it-decides-core"
    assert _slug("The zoo (`zoo.py`)") == "the-zoo-zoopy"
    assert _slug("`summary()`") == "summary"
    assert _slug("Why did it explode?") == "why-did-it-explode"
    assert _slug("Bounds: `halt_after` / `name`") == "bounds-halt_after--name"


def _dead_links(page: Path, text: str) -> list[str]:
    """The relative links of ``text`` (the content of ``page``) whose file does not exist, or
    whose ``#anchor`` is no heading of the markdown file it names."""
    dead = []
    for link in re.findall(r"\]\(([^)\s]+)\)", _without_code(text)):
        if "://" in link or link.startswith("mailto:"):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target) if target else page
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            dead.append(f"{page.relative_to(ROOT)}: {link}")
    return dead


def test_relative_links_in_the_docs_resolve() -> None:
    pages = _pages()
    assert {"guide.md", "configuration.md", "output.md", "diagnosis.md", "faq.md"} <= {
        p.name for p in pages}
    links = sum(len(re.findall(r"\]\(", _without_code(p.read_text()))) for p in pages)
    assert links > 50  # the pattern still finds the links
    assert [d for p in pages for d in _dead_links(p, p.read_text())] == []


def test_dead_links_are_found() -> None:
    readme = ROOT / "README.md"
    bad = ["[a](docs/guide.md#no-such-section)", "[b](#no-such-section)", "[c](docs/missing.md)"]
    good = ["[d](docs/guide.md#reliability)", "[e](#quickstart)", "[f](https://example.org/x)",
            "`[g](inside/code.md)`"]
    assert len(_dead_links(readme, "\n".join(bad + good))) == len(bad)


def test_readme_is_a_first_page() -> None:
    # detail lives under docs/, the README stays short enough to read through
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def _table_names(page: str) -> set[str]:
    """Every ``name`` in backticks in the first column of a table on ``docs/<page>``."""
    text = (ROOT / "docs" / page).read_text()
    return {name for cell in re.findall(r"^\| (.+?) \|", text, flags=re.M)
            for name in re.findall(r"`(\w+)`", cell)}


def test_every_argument_and_summary_key_is_documented() -> None:
    # the reference tables live in docs/, not the README: every setting has a row
    # in docs/configuration.md, every callback-only argument is named there, every summary()
    # key has a row in docs/output.md
    settings = {f.name for f in dataclasses.fields(GuardSettings)}
    assert settings <= _table_names("configuration.md")
    arguments = set(list(inspect.signature(GradGuard.__init__).parameters)[1:])
    config = (ROOT / "docs" / "configuration.md").read_text()
    assert all(f"`{name}`" in config for name in arguments - settings)
    assert set(GradGuard().summary()) <= _table_names("output.md")
