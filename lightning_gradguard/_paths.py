"""Path checks shared by the command line and the report: a problem found before any work."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["writable_dir_problem"]


def writable_dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a directory could not be created or written at ``path`` (``None``: no problem seen).

    The path itself, or the nearest ancestor that exists, must be a directory this process
    may write in.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); (d / "f").write_text("x")
        1
        >>> writable_dir_problem(d / "new" / "sub") is None
        True
        >>> writable_dir_problem(d / "f" / "sub")  # doctest: +ELLIPSIS
        '.../f is a file, not a directory'
    """
    p = Path(path)
    for existing in (p, *p.parents):
        if existing.exists():
            break
    else:  # pragma: no cover - the root always exists
        return None
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None
