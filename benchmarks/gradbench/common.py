"""Small helpers shared by the benchmarks: quiet logging, library identity, formatting."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import warnings
from pathlib import Path

__all__ = ["BENCH_ROOT", "fmt", "json_float", "library_id", "quiet", "source_hash", "to_float"]

#: ``benchmarks/``: default cache (``.cache/``) and results (``results/``) live below it.
BENCH_ROOT = Path(__file__).resolve().parent.parent


def quiet() -> None:
    """Silence warnings and Lightning's info logging (benchmarks print their own progress)."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@functools.lru_cache(maxsize=1)
@functools.cache
def library_id() -> str:
    """Where ``lightning_gradguard`` was imported from and a hash of its sources.

    Computed once per process (``gradbench.run`` calls it when it is imported, right after
    the library): a process runs the sources it imported, so an edit made while it runs must
    not relabel its records with the new sources' hash.

    Returns:
        ``"<package dir> sha1:<12 hex digits>"``; the hash covers every ``*.py`` file of the
        package (relative path and bytes), so any source edit changes it.
    """
    import lightning_gradguard

    pkg = Path(lightning_gradguard.__file__).resolve().parent
    h = hashlib.sha1()
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode())
        h.update(f.read_bytes())
    return f"{pkg} sha1:{h.hexdigest()[:12]}"


def source_hash(library: str) -> str:
    """The hash part of a :func:`library_id` string (``"?"`` if there is none).

    >>> source_hash("/x/lightning_gradguard sha1:0123456789ab")
    '0123456789ab'
    >>> source_hash("")
    '?'
    """
    return library.rpartition("sha1:")[2] or "?"


def json_float(x: float) -> float | str:
    """JSON-safe float with 4 significant digits (non-finite values as strings).

    >>> json_float(0.123456), json_float(float("nan"))
    (0.1235, 'nan')
    """
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.4g}")


def to_float(x: float | str | None) -> float:
    """Inverse of :func:`json_float` (``None`` -> NaN)."""
    return math.nan if x is None else float(x)


def fmt(x: float, digits: int = 3) -> str:
    """A loss for a table: ``digits`` significant digits, scientific when tiny or huge.

    >>> fmt(0.31841), fmt(12.5), fmt(2e-5), fmt(float("nan"))
    ('0.318', '12.5', '2.00e-05', 'NaN')
    """
    if not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}f}"
