"""core/_friendly.py: a wrong constructor call names the public class, the closest argument
(or a hint) and every valid argument; a correct call and a body's own TypeError pass through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import pytest

from lightning_gradguard.core._friendly import (
    friendly_init,
    friendly_kwargs,
    unexpected_kwargs_message,
)


def test_unexpected_kwargs_message_exact() -> None:
    known = ["norm_type", "window", "verbose"]
    assert unexpected_kwargs_message("M", ["norm_typ", "zzzz"], known) == (
        "M got unexpected keyword argument(s) 'norm_typ' (did you mean 'norm_type'?), 'zzzz'; "
        "its arguments are: norm_type, window, verbose")
    # a hint replaces the suggestion; a name without a hint still gets its suggestion
    assert unexpected_kwargs_message("M", ["log_every", "windw"], known,
                                      {"log_every": "the Trainer's"}) == (
        "M got unexpected keyword argument(s) 'log_every' (the Trainer's), 'windw' (did you "
        "mean 'window'?); its arguments are: norm_type, window, verbose")
    assert unexpected_kwargs_message("M", ["x"], [], None) == (
        "M got unexpected keyword argument(s) 'x'; its arguments are: ")


def test_unexpected_kwargs_message_cutoff_half() -> None:
    # difflib ratio of "ab" and "ax" is exactly 0.5: suggested at the cutoff; "ab"/"xy" is 0
    assert "(did you mean 'ax'?)" in unexpected_kwargs_message("M", ["ab"], ["ax"])
    assert "did you mean" not in unexpected_kwargs_message("M", ["abc"], ["axy"])


class _Base:
    @friendly_init
    def __init__(self, window: int = 3, *args: Any, scale: float = 1.0, **kw: Any) -> None:
        """The doc."""
        if window < 0:
            raise TypeError("negative window")
        self.window, self.scale = window, scale


class _Public(_Base):
    pass


class _Strict:
    @friendly_init
    def __init__(self, window: int, scale: float = 1.0) -> None:
        self.window = window


def test_friendly_init_correct_call_and_metadata() -> None:
    p = _Public(4, scale=2.0)
    assert (p.window, p.scale) == (4, 2.0)
    assert _Base.__init__.__name__ == "__init__"
    assert _Base.__init__.__doc__ == "The doc."


def test_friendly_init_unknown_keyword_names_the_subclass() -> None:
    with pytest.raises(TypeError) as err:
        _Strict(1, windw=2)  # type: ignore[call-arg]
    assert str(err.value) == ("_Strict got unexpected keyword argument(s) 'windw' (did you "
                              "mean 'window'?); its arguments are: window, scale")
    assert err.value.__cause__ is None
    assert err.value.__suppress_context__


def test_friendly_init_hints_of_the_class() -> None:
    class WithHints(_Strict):
        _ARGUMENT_HINTS: ClassVar[dict[str, str]] = {"every": "the Trainer owns logging intervals"}

    with pytest.raises(TypeError) as err:
        WithHints(1, every=3)  # type: ignore[call-arg]
    assert str(err.value) == ("WithHints got unexpected keyword argument(s) 'every' (the "
                              "Trainer owns logging intervals); its arguments are: window, "
                              "scale")


def test_friendly_init_other_wrong_calls_and_body_errors() -> None:
    with pytest.raises(TypeError) as err:
        _Strict()  # type: ignore[call-arg]
    assert str(err.value) == "_Strict: missing a required argument: 'window'"
    assert err.value.__suppress_context__
    with pytest.raises(TypeError) as err:
        _Strict(1, 2, 3)  # type: ignore[call-arg]
    assert str(err.value) == "_Strict: too many positional arguments"
    # a TypeError of a correct call's body passes unchanged
    with pytest.raises(TypeError) as err:
        _Public(-1)
    assert str(err.value) == "negative window"
    assert err.value.__suppress_context__


def test_friendly_kwargs_on_a_dataclass_with_more_arguments() -> None:
    @friendly_kwargs
    @dataclass
    class Limit:
        _MORE_ARGUMENTS = ("extra",)
        cap: float = 1.0
        far: float = 2.0

    assert Limit(3.0).cap == 3.0
    with pytest.raises(TypeError) as err:
        Limit(capp=2.0)  # type: ignore[call-arg]
    assert str(err.value) == ("Limit got unexpected keyword argument(s) 'capp' (did you mean "
                              "'cap'?); its arguments are: cap, far, extra")

    class Sub(Limit):
        pass

    with pytest.raises(TypeError, match=r"^Sub got unexpected keyword argument"):
        Sub(fa=1.0)  # type: ignore[call-arg]


def test_friendly_kwargs_on_a_namedtuple() -> None:
    @friendly_kwargs
    class Pair(NamedTuple):
        left: int
        right: int = 0

    assert Pair(1, right=2) == (1, 2)
    assert type(Pair(1)) is Pair
    with pytest.raises(TypeError) as err:
        Pair(1, rigth=2)  # type: ignore[call-arg]
    assert str(err.value) == ("Pair got unexpected keyword argument(s) 'rigth' (did you mean "
                              "'right'?); its arguments are: left, right")
    with pytest.raises(TypeError) as err:
        Pair()  # type: ignore[call-arg]
    assert str(err.value) == "Pair: missing a required argument: 'left'"


def test_friendly_kwargs_other_wrong_calls_name_the_class() -> None:
    @friendly_kwargs
    @dataclass
    class Limit:
        cap: float = 1.0

    with pytest.raises(TypeError) as err:
        Limit(1.0, 2.0)  # type: ignore[call-arg]
    assert str(err.value) == "Limit: too many positional arguments"


def test_friendly_init_applied_in_a_test() -> None:
    """The decorator run inside a test (the classes above are decorated at import)."""

    class Meter:
        @friendly_init
        def __init__(self, window: int, *, scale: float = 1.0) -> None:
            self.window, self.scale = window, scale

    class Public(Meter):
        pass

    assert Public(2, scale=3.0).window == 2
    with pytest.raises(TypeError) as err:
        Public(2, scal=3.0)  # type: ignore[call-arg]
    assert str(err.value) == ("Public got unexpected keyword argument(s) 'scal' (did you mean "
                              "'scale'?); its arguments are: window, scale")
    with pytest.raises(TypeError) as err:
        Public(1, 2)  # type: ignore[misc]
    assert str(err.value) == "Public: too many positional arguments"
