"""The docstring corpus: English text from installed packages, no download.

The docstrings (module, class, function) of every ``.py`` file of the installed ``torch``,
``numpy`` and ``lightning`` packages, read with :mod:`ast` in sorted path order (no imports),
lower-cased and split into words and punctuation; the first ``_TOKENS_PER_PACKAGE`` tokens of
each package, 90 % / 10 % train / validation per package; a vocabulary of the ``VOCAB - 2``
most frequent training words (ties alphabetical) plus ``<unk>`` and ``<eos>``. It is cached
under ``benchmarks/.cache/rescue/`` keyed by the packages' versions. The rescue benchmark's
language models (:mod:`gradbench.rescue`) and the zoo's text recipes (:mod:`gradbench.zoo`)
train on it.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import importlib.metadata
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .common import BENCH_ROOT

__all__ = ["CACHE", "VOCAB", "Corpus", "corpus"]

CACHE = BENCH_ROOT / ".cache" / "rescue"

PACKAGES = ("torch", "numpy", "lightning")
VOCAB = 1000
_TOKENS_PER_PACKAGE = 300_000
_WORD = re.compile(r"[a-z]+|[0-9]+|[.,:;()=\[\]]")


@dataclass(frozen=True)
class Corpus:
    """Token ids of the training and validation text and the vocabulary."""

    train: Tensor
    val: Tensor
    vocab: list[str]


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _package_tokens(name: str, limit: int) -> list[str]:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    out: list[str] = []
    for f in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        for doc in _docstrings(f):
            words = ["N" if w.isdigit() else w for w in _WORD.findall(doc.lower())]
            out.extend(words)
            out.append("<eos>")
            if len(out) >= limit:
                return out[:limit]
    return out


def _versions() -> str:
    return ",".join(f"{p}={importlib.metadata.version(p)}" for p in PACKAGES)


_CORPUS: Corpus | None = None


def corpus() -> Corpus:
    """The docstring corpus (built once, then cached on disk and in memory)."""
    global _CORPUS
    if _CORPUS is not None:
        return _CORPUS
    key = hashlib.sha1(f"{_versions()}|{_TOKENS_PER_PACKAGE}|{_WORD.pattern}".encode())
    path = CACHE / f"words_{key.hexdigest()[:12]}.pt"
    if path.exists():
        d = torch.load(path)
        train_words, val_words = d["train"], d["val"]
    else:
        train_words, val_words = [], []
        for pkg in PACKAGES:
            words = _package_tokens(pkg, _TOKENS_PER_PACKAGE)
            cut = int(len(words) * 0.9)
            train_words += words[:cut]
            val_words += words[cut:]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"train": train_words, "val": val_words, "versions": _versions()}, path)
    counts = collections.Counter(train_words)
    counts.pop("<eos>", None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: VOCAB - 2]
    vocab = ["<unk>", "<eos>"] + [w for w, _ in ranked]
    index = {w: i for i, w in enumerate(vocab)}
    train = torch.tensor([index.get(w, 0) for w in train_words], dtype=torch.long)
    val = torch.tensor([index.get(w, 0) for w in val_words], dtype=torch.long)
    _CORPUS = Corpus(train, val, vocab)
    return _CORPUS
