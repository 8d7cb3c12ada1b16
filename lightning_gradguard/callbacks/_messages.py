"""How the callbacks' warnings are shown: the message only, no ``file.py:NNN:`` prefix.

:class:`GradGuardWarning` is a ``UserWarning`` (filter it like any warning:
``warnings.filterwarnings("ignore", category=GradGuardWarning)``). Its messages are written
for the user, not for the code that emitted them, so the source location is left out:
``warnings.formatwarning`` is wrapped (as Lightning itself does for its own warnings) to
print only the message for this category, and to hand every other warning to the
formatter that was installed before.
"""

from __future__ import annotations

import warnings

__all__ = ["GradGuardWarning", "format_warning", "install_format"]


class GradGuardWarning(UserWarning):
    """A message from GradGuard about the run (shown without a source location)."""


_previous = warnings.formatwarning
_active = [False]


def format_warning(message: Warning | str, category: type[Warning], filename: str,
                   lineno: int, line: str | None = None) -> str:
    """``warnings.formatwarning`` that shows a :class:`GradGuardWarning` as its message only.

    Example:
        >>> format_warning(GradGuardWarning("GradGuard: hi"), GradGuardWarning, "guard.py", 3)
        'GradGuard: hi\\n'
    """
    if isinstance(category, type) and issubclass(category, GradGuardWarning):
        return f"{message}\n"
    if _active[0]:  # a formatter installed after this one wrapped it and called back
        return _stdlib(message, category, filename, lineno, line)
    _active[0] = True
    try:
        return _previous(message, category, filename, lineno, line)
    finally:
        _active[0] = False


def _stdlib(message: Warning | str, category: type[Warning], filename: str, lineno: int,
            line: str | None = None) -> str:
    original = getattr(warnings, "_formatwarning_orig", None)
    if original is not None:
        return original(message, category, filename, lineno, line)  # type: ignore[no-any-return]
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def install_format() -> None:
    """Install :func:`format_warning` (idempotent).

    Called again before each warning: a module imported later (e.g.
    ``lightning.fabric.utilities.warnings``) may have replaced ``warnings.formatwarning``.
    """
    if getattr(warnings.formatwarning, "__name__", "") != "format_warning":
        global _previous
        _previous = warnings.formatwarning
        warnings.formatwarning = format_warning


install_format()
