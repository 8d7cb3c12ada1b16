"""The package as users get it: the sdist and wheel built from this tree, the wheel installed
into a fresh virtual environment away from the source tree and run there.

Everything else in the suite runs against the editable install, where a module left out of
the wheel, or an import that only resolves from the checkout (``tests``, ``benchmarks``), goes
unnoticed. Offline and quick: the build runs without isolation (``build`` and ``setuptools``
come from the ``dev`` extra), the wheel is installed with ``--no-deps``, and the new
environment reaches the dependencies of this one through a ``.pth`` file listing this
environment's site-packages directories. A ``.pth`` line only adds a directory to
``sys.path``; the ``.pth`` files inside it, among them the editable install's finder, are not
run, so the source tree cannot shadow the installed wheel (asserted below).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from fnmatch import fnmatch
from pathlib import Path

import pytest

import lightning_gradguard

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_gradguard"
DISTRIBUTION = "lightning-gradguard"
VERSION = lightning_gradguard.__version__

#: what the sdist carries beside the package: the files a packager needs to rebuild the wheel
#: and run the test suite (the tests also read examples/, benchmarks/, docs/ and .ci/run)
SDIST_FILES = ("pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "CHANGELOG.md",
               ".ci/run", "PKG-INFO")
SDIST_DIRS = (PACKAGE, "tests", "examples", "benchmarks", "docs", "tools")
#: never in the wheel: it ships the package and its metadata only
NOT_IN_WHEEL = ("tests", "benchmarks", "examples", "docs", "tools")

#: the ignored paths of .gitignore (any depth), left out of the copy that is built
_IGNORED = (".git", ".venv", ".venv-ci", "__pycache__", "*.egg-info", ".mypy_cache",
            ".ruff_cache", ".pytest_cache", ".hypothesis", "lightning_logs", "gradguard_runs",
            ".cache", "build", "dist", "*.ckpt", "mutants")


@dataclass(frozen=True)
class Built:
    """The copy of the source tree that was built, its sdist and wheel, and the build log."""

    src: Path
    sdist: Path
    wheel: Path
    log: str


@dataclass(frozen=True)
class Venv:
    """A virtual environment with the wheel installed; ``run`` executes in it, from ``cwd``."""

    root: Path
    python: Path
    bin: Path
    purelib: Path
    cwd: Path
    env: dict[str, str]

    def run(self, *args: str | Path, timeout: float = 120) -> str:
        proc = subprocess.run([str(a) for a in args], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names
            if any(fnmatch(n, pattern) for pattern in _IGNORED)
            or (Path(directory, n) / "pyvenv.cfg").exists()}  # a virtual environment


def _source_files(src: Path, top: str) -> set[str]:
    return {p.relative_to(src).as_posix() for p in (src / top).rglob("*") if p.is_file()}


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``python -m build`` (sdist, then the wheel from the unpacked sdist) on a copy of the
    tree, so that nothing (``*.egg-info``, ``build/``) is written into the checkout."""
    pytest.importorskip("build", reason="the `build` package (dev extra) builds the wheel")
    tmp = tmp_path_factory.mktemp("release")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    # PYTHONDONTWRITEBYTECODE makes setuptools print "byte-compiling is disabled": a
    # property of the environment, not of the project
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"),
                 str(src)], env=env)
    (sdist,) = (tmp / "dist").glob("*.tar.gz")
    (wheel,) = (tmp / "dist").glob("*.whl")
    return Built(src, sdist, wheel, proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh virtual environment with only the wheel installed in it (no pip, no deps);
    then a ``.pth`` file that lists this environment's site-packages for the dependencies."""
    tmp = tmp_path_factory.mktemp("installed")
    root = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    bindir = root / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    # installed before the .pth exists, so pip sees an empty environment
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "--no-cache-dir", "--disable-pip-version-check", str(built.wheel)])
    purelib = Path(_run([str(python), "-c", "import sysconfig; "
                         "print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    sites = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE
                                        else [])]
    deps = [p for p in dict.fromkeys(sites) if Path(p).is_dir()]
    (purelib / "_outer_environment.pth").write_text("".join(f"{p}\n" for p in deps))
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(root),
               PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cwd = tmp / "work"
    cwd.mkdir()
    return Venv(root, python, bindir, purelib, cwd, env)


def test_build_prints_no_warning(built: Built) -> None:
    assert "Successfully built" in built.log
    noisy = [line for line in built.log.splitlines()
             if re.search(r"warn|deprecat", line, flags=re.I)]
    assert noisy == [], "\n".join(noisy)
    assert built.wheel.name == f"{PACKAGE}-{VERSION}-py3-none-any.whl"
    assert built.sdist.name == f"{PACKAGE}-{VERSION}.tar.gz"


def test_wheel_ships_the_package_and_nothing_else(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as whl:
        names = set(whl.namelist())
    dist_info = f"{PACKAGE}-{VERSION}.dist-info"
    assert {n.split("/")[0] for n in names} == {PACKAGE, dist_info}
    assert not [n for n in names if n.split("/")[0] in NOT_IN_WHEEL]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # every module and subpackage of the source package, and the typing marker
    package = _source_files(built.src, PACKAGE)
    assert f"{PACKAGE}/py.typed" in package
    assert {f"{PACKAGE}/{sub}/__init__.py" for sub in ("core", "callbacks", "demos")} <= package
    assert package <= names, sorted(package - names)
    assert {f"{dist_info}/licenses/LICENSE", f"{dist_info}/entry_points.txt"} <= names


def test_wheel_metadata_one_version_spdx_license(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as whl:
        meta = HeaderParser().parsestr(whl.read(f"{PACKAGE}-{VERSION}.dist-info/METADATA")
                                       .decode())
        license_text = whl.read(f"{PACKAGE}-{VERSION}.dist-info/licenses/LICENSE").decode()
        entry_points = whl.read(f"{PACKAGE}-{VERSION}.dist-info/entry_points.txt").decode()
    assert meta["Name"] == DISTRIBUTION
    assert meta["Version"] == VERSION  # read from lightning_gradguard.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None
    assert not [c for c in meta.get_all("Classifier", []) if c.startswith("License ::")]
    assert "Apache License" in license_text
    assert "Version 2.0, January 2004" in license_text
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "gradguard = lightning_gradguard.cli:main" in entry_points


def test_sdist_has_what_a_packager_needs(built: Built) -> None:
    top = f"{PACKAGE}-{VERSION}"
    with tarfile.open(built.sdist) as tar:
        names = {m.name.removeprefix(f"{top}/") for m in tar.getmembers() if m.isfile()}
    assert set(SDIST_FILES) <= names, sorted(set(SDIST_FILES) - names)
    for top_dir in SDIST_DIRS:
        files = _source_files(built.src, top_dir)
        assert files, top_dir
        # a new kind of file under one of them needs a line in MANIFEST.in
        assert files <= names, sorted(files - names)
    assert "tests/test_release.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_installed_wheel_imports_from_its_own_site_packages(venv: Venv) -> None:
    """The public API and every module import from the new environment's site-packages;
    nothing on ``sys.path`` points into the source tree; the metadata's version is
    ``__version__``; ``--version`` prints both names (the console script itself runs in the
    next test: one Lightning import less here)."""
    script = f"""
import contextlib, importlib, importlib.metadata as md, importlib.util, io, json, pkgutil, sys
import lightning_gradguard as lg
from lightning_gradguard import GradGuard, GradientMonitor, GuardCore, __version__
from lightning_gradguard.demos import DeepMLP
api = {{name: type(getattr(lg, name)).__name__ for name in lg.__all__}}
modules = [m.name for m in pkgutil.walk_packages(lg.__path__, "lightning_gradguard.")
           if not m.name.endswith("__main__")]
files = [importlib.import_module(m).__file__ for m in modules]
others = {{n: getattr(importlib.util.find_spec(n), "origin", None)
          for n in ("tests", "benchmarks", "examples")}}
from lightning_gradguard.cli import main
with contextlib.redirect_stdout(io.StringIO()) as version:
    main(["--version"])
print(json.dumps({{"file": lg.__file__, "files": files, "version": __version__,
                  "metadata": md.version("{DISTRIBUTION}"),
                  "dist": str(md.distribution("{DISTRIBUTION}")._path),
                  "api": api, "path": sys.path, "others": others,
                  "version_line": version.getvalue().strip(),
                  "meta_path": [repr(f) for f in sys.meta_path]}}))
"""
    out = json.loads(venv.run(venv.python, "-c", script))
    purelib = venv.purelib.resolve()
    assert Path(out["file"]).resolve().is_relative_to(purelib), out["file"]
    assert Path(out["dist"]).resolve().is_relative_to(purelib), out["dist"]
    assert len(out["files"]) >= 30
    assert all(Path(f).resolve().is_relative_to(purelib) for f in out["files"]), out["files"]
    # (a virtual environment inside the checkout, like CI's .venv-ci, is no source tree)
    assert not [p for p in out["path"] if p and Path(p).resolve() in (ROOT, ROOT / "tests")]
    assert not [o for o in out["others"].values() if o and Path(o).resolve().is_relative_to(ROOT)]
    assert not [f for f in out["meta_path"] if "editable" in f.lower()]
    assert out["version"] == out["metadata"] == VERSION
    assert set(out["api"]) == set(lightning_gradguard.__all__)
    assert out["api"]["GradGuard"] == out["api"]["GuardCore"] == "type"
    assert out["version_line"] == f"{DISTRIBUTION} {VERSION}"


def test_installed_wheel_runs_demo_and_report(venv: Venv) -> None:
    logdir = venv.cwd / "runs"
    demo = venv.run(venv.bin / "gradguard", "demo", "--steps", "3", "--logdir", logdir,
                    "--no-progress")
    assert "GradGuard()" in demo
    assert re.search(r"^steps +3 +3$", demo, flags=re.M), demo
    version_dir = logdir / "mlp" / "version_0"
    assert f"Logs: {version_dir}" in demo
    report = venv.run(venv.bin / "gradguard", "report", version_dir)
    assert "gradguard: GradGuard, counters as of step 2" in report
    assert "no_guard: not guarded (GradientMonitor), counters as of step 2" in report
    png = version_dir / "gradguard_report.png"
    assert f"wrote {png}" in report
    assert png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in venv.cwd.iterdir()) == ["runs"]  # nothing else written
