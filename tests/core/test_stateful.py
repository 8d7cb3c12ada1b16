"""``Stateful``: declared state copied deeply by ``reset``, ``state_dict`` and
``load_state_dict``, children saved and restored with their parent, missing keys named."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_gradguard.core._stateful import Stateful


class _Nested(Stateful):
    rows: list[list[float]]
    n: int

    def __init__(self) -> None:
        super().__init__()
        self._add_state("rows", [[0.0, 0.0], [0.0]])
        self._add_state("n", 0)


class _Parent(Stateful):
    k: int

    def __init__(self) -> None:
        super().__init__()
        self.child = _Nested()
        self._add_child("child", self.child)
        self._add_state("k", 1)


def test_reset_restores_nested_defaults_even_after_in_place_changes() -> None:
    s = _Nested()
    s.rows[0][0] = 5.0
    s.reset()
    s.rows[0][1] = 6.0
    s.reset()
    assert s.rows == [[0.0, 0.0], [0.0]]
    assert _Nested().rows == [[0.0, 0.0], [0.0]]


def test_state_dict_is_a_deep_copy() -> None:
    s = _Nested()
    sd = s.state_dict()
    s.rows[1][0] = 3.0
    assert sd == {"rows": [[0.0, 0.0], [0.0]], "n": 0}
    sd["rows"][0][0] = 9.0
    assert s.rows == [[0.0, 0.0], [3.0]]


def test_load_state_dict_takes_a_deep_copy() -> None:
    sd: dict[str, Any] = {"rows": [[1.0, 2.0], [3.0]], "n": 4}
    s = _Nested()
    s.load_state_dict(sd)
    sd["rows"][0][0] = 99.0
    assert (s.rows, s.n) == ([[1.0, 2.0], [3.0]], 4)


def test_load_state_dict_missing_keys_names_class_and_keys() -> None:
    p = _Parent()
    with pytest.raises(KeyError, match=r"_Parent\.load_state_dict: missing keys \['child'\]"):
        p.load_state_dict({"k": 2})
    assert p.k == 1  # nothing loaded
    with pytest.raises(KeyError, match=r"_Nested\.load_state_dict: missing keys \['n'\]"):
        p.load_state_dict({"k": 2, "child": {"rows": []}})


def test_parent_round_trip_and_reset() -> None:
    a = _Parent()
    a.k = 7
    a.child.n = 2
    b = _Parent()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"k": 7, "child": {"rows": [[0.0, 0.0], [0.0]], "n": 2}}
    b.reset()
    assert b.state_dict() == _Parent().state_dict()


class _Coded(Stateful):
    """A set saved as a sorted list, a tuple as a list; an optional state and child."""

    seen: set[str]
    pair: tuple[int, ...]
    extra: int

    def __init__(self) -> None:
        super().__init__()
        self._add_state("seen", set(), save=sorted, load=set)
        self._add_state("pair", (), save=list, load=tuple)
        self._add_state("extra", 0, optional=True)
        self.child = _Nested()
        self._add_child("child", self.child, optional=True)


def test_a_coded_state_is_saved_as_plain_values_and_read_back() -> None:
    a = _Coded()
    a.seen.update({"b", "a"})
    a.pair = (3, 4)
    state = a.state_dict()
    assert (state["seen"], state["pair"]) == (["a", "b"], [3, 4])
    b = _Coded()
    b.load_state_dict(state)
    assert (b.seen, b.pair) == ({"a", "b"}, (3, 4))
    state["seen"].append("c")  # the loaded value is a copy
    assert b.seen == {"a", "b"}
    b.reset()
    assert (b.seen, b.pair) == (set(), ())


def test_an_optional_part_missing_from_a_state_is_reset() -> None:
    a = _Coded()
    a.extra = 5
    a.child.n = 3
    a.load_state_dict({"seen": [], "pair": []})
    assert (a.extra, a.child.n) == (0, 0)
    with pytest.raises(KeyError, match=r"_Coded\.load_state_dict: missing keys \['pair'\]"):
        a.load_state_dict({"seen": []})


class _OptionalFirst(Stateful):
    """An optional nested-list state declared before a required one."""

    rows: list[list[float]]
    k: int

    def __init__(self) -> None:
        super().__init__()
        self._add_state("rows", [[0.0]], optional=True)
        self._add_state("k", 1)


def test_a_missing_optional_state_does_not_stop_the_states_after_it() -> None:
    a = _OptionalFirst()
    a.rows[0].append(2.0)
    a.load_state_dict({"k": 5})
    assert (a.rows, a.k) == ([[0.0]], 5)


def test_a_missing_optional_state_is_a_deep_copy_of_its_default() -> None:
    a = _OptionalFirst()
    a.load_state_dict({"k": 5})
    a.rows[0].append(3.0)  # in place, inside the nested list
    a.reset()
    assert a.rows == [[0.0]]
    assert _OptionalFirst().rows == [[0.0]]
