"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch


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
