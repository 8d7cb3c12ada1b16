"""The demo tests' fixture: quiet Lightning's advice for tiny runs (helpers: ``tests/support``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _quiet_demo_warnings() -> Iterator[None]:
    """Lightning's advice about loader workers and short epochs is noise for these tiny runs
    (one thread and quiet banners come from ``tests/conftest.py``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        yield
