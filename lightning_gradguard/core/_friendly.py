"""A misspelt constructor argument names the public class and the closest valid argument.

Python's own message names the function that was called (``GradientMonitorLogic.__init__()
got an unexpected keyword argument 'log_every'``): an internal name, and no suggestion.
:func:`friendly_init` wraps ``__init__`` so the message is::

    GradientMonitor got unexpected keyword argument(s) 'log_every' (did you mean
    'log_histograms'?); its arguments are: norm_type, layer_depth, ...

Standard library only (usable from the core and the callbacks alike). The value types the
guard builds at every step (``Decision``, ``GuardState``, ``Measurement``, ``StepReport``,
``UpdateLimit``, ``GradNorms``, ``HostValues``) are left unwrapped: the wrapper costs ~0.4 µs
a construction, and Python's own message names the class and the argument.
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


def _wrap(fn: Callable[..., Any], known: list[str], sig: inspect.Signature,
          owner: Callable[[Any], str]) -> Callable[..., Any]:
    """``fn`` (``__init__`` or ``__new__``), whose wrong calls name the class.

    The call goes straight through (one extra frame: value types built every step stay
    cheap); only a ``TypeError`` is looked at: a keyword argument that is not in ``known``
    gets :func:`unexpected_kwargs_message`, another wrong call (a missing or surplus
    positional argument) Python's message after the class name; a ``TypeError`` raised by
    the body of a correct call passes unchanged.
    """

    @functools.wraps(fn)
    def wrapper(first: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(first, *args, **kwargs)
        except TypeError as err:
            name = owner(first)
            unknown = [k for k in kwargs if k not in known]
            if unknown:
                hints = getattr(first, "_ARGUMENT_HINTS", None)
                raise TypeError(unexpected_kwargs_message(name, unknown, known, hints)) from None
            try:
                sig.bind(first, *args, **kwargs)
            except TypeError as wrong:
                raise TypeError(f"{name}: {wrong}") from None
            raise err from None

    return wrapper


def _known(sig: inspect.Signature, extra: tuple[str, ...]) -> list[str]:
    return [p.name for p in list(sig.parameters.values())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)] + list(extra)


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
    return _wrap(init, _known(sig, ()), sig, lambda self: type(self).__name__)


def friendly_kwargs(cls: _T) -> _T:
    """Class decorator: :func:`friendly_init` on ``cls.__init__`` (a NamedTuple's ``__new__``).

    Apply it above ``@dataclass`` so the generated ``__init__`` is the one wrapped. A class
    attribute ``_MORE_ARGUMENTS`` names keyword arguments that ``**kwargs`` passes on (e.g.
    :class:`~lightning_gradguard.core.GuardCore`'s settings).

    Example:
        >>> from dataclasses import dataclass
        >>> @friendly_kwargs
        ... @dataclass
        ... class Limit:
        ...     cap: float = 1.0
        >>> Limit(capp=2.0)
        Traceback (most recent call last):
        ...
        TypeError: Limit got unexpected keyword argument(s) 'capp' (did you mean 'cap'?); \
its arguments are: cap
    """
    extra = tuple(getattr(cls, "_MORE_ARGUMENTS", ()))
    if hasattr(cls, "_fields"):  # a NamedTuple: built by __new__
        new = vars(cls)["__new__"]
        sig = inspect.signature(new)
        wrapped = _wrap(new, _known(sig, extra), sig, lambda c: c.__name__)
        setattr(cls, "__new__", wrapped)  # noqa: B010  (mypy refuses the assignment)
    else:
        init = getattr(cls, "__init__")  # noqa: B009  (the class's, not an instance's)
        sig = inspect.signature(init)
        wrapped = _wrap(init, _known(sig, extra), sig, lambda self: type(self).__name__)
        setattr(cls, "__init__", wrapped)  # noqa: B010  (mypy refuses the assignment)
    return cls
