"""Fixtures shared by the whole test suite; shared helpers live in ``tests/support``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# ``import support`` from any test: pytest's default (prepend) import mode already puts this
# folder on sys.path, as it has no __init__.py; --import-mode=importlib does not.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(autouse=True)
def _one_thread_quiet_lightning() -> Iterator[None]:
    """Tiny models run fastest on one thread (intra-op threads cost ~3x on 2 busy cores);
    Lightning's info banners are noise in test output."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lg = logging.getLogger("lightning.pytorch")
    level = lg.level
    lg.setLevel(logging.WARNING)
    yield
    lg.setLevel(level)
    torch.set_num_threads(threads)
