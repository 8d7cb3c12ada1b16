"""A misspelt constructor argument names the public class and the closest valid argument.

Python's own message names the function that was called (``GradientMonitorLogic.__init__()
got an unexpected keyword argument 'log_every'``): an internal name, and no suggestion.
:func:`friendly_init` wraps ``__init__`` so the message is::

    GradientMonitor got unexpected keyword argument(s) 'log_every' (did you mean
    'log_histograms'?); its arguments are: norm_type, layer_depth, ...

Standard library only (usable from the core and the callbacks alike).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["friendly_init", "friendly_kwargs", "unexpected_kwargs_message"]

_T = TypeVar("_T", bound=type)


def unexpected_kwargs_message(name: str, unknown: list[str], known: list[str],
                              hints: Mapping[str, str] | None = None) -> str:
    """The message for ``unknown`` keyword arguments of class ``name`` (arguments ``known``).

    Args:
        name: The public class.
        unknown: The keyword arguments it does not take.
        known: The arguments it takes.
        hints: A word for a name that is no misspelling but a different idea (e.g. a
            logging interval the Trainer owns); shown instead of the closest argument.

    Example:
        >>> unexpected_kwargs_message("GradientMonitor", ["norm_typ"], ["norm_type", "x"])
        "GradientMonitor got unexpected keyword argument(s) 'norm_typ' (did you mean \
'norm_type'?); its arguments are: norm_type, x"
    """
    parts = []
    for k in unknown:
        close = difflib.get_close_matches(k, known, n=1, cutoff=0.5)
        if hints and k in hints:
            parts.append(f"{k!r} ({hints[k]})")
        else:
            parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"{name} got unexpected keyword argument(s) {', '.join(parts)}; its arguments are: "
            f"{', '.join(known)}")


def friendly_init(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``__init__``: a wrong call names the class and the closest valid argument.

    The class is ``type(self)`` (the public subclass, not the class defining ``__init__``).
    A class attribute ``_ARGUMENT_HINTS`` (``{name: words}``) explains names that are no
    misspelling of an argument but a different idea.

    Example:
        >>> class Meter:
        ...     @friendly_init
        ...     def __init__(self, window: int = 3) -> None:
        ...         self.window = window
        >>> Meter(windw=4)
        Traceback (most recent call last):
        ...
        TypeError: Meter got unexpected keyword argument(s) 'windw' (did you mean 'window'?); \
its arguments are: window
    """
    sig = inspect.signature(init)
    known = [p.name for p in list(sig.parameters.values())[1:]
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            sig.bind(self, *args, **kwargs)
        except TypeError as err:
            name = type(self).__name__
            unknown = [k for k in kwargs if k not in known]
            if not unknown:
                raise TypeError(f"{name}: {err}") from None
            hints = getattr(type(self), "_ARGUMENT_HINTS", None)
            raise TypeError(unexpected_kwargs_message(name, unknown, known, hints)) from None
        init(self, *args, **kwargs)

    return wrapper


def friendly_kwargs(cls: _T) -> _T:
    """Class decorator: :func:`friendly_init` on ``cls.__init__`` (e.g. a dataclass's).

    Apply it above ``@dataclass`` so the generated ``__init__`` is the one wrapped.
    """
    cls.__init__ = friendly_init(cls.__init__)  # type: ignore[misc]
    return cls
