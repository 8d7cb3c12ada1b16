"""Fixtures for the reliability suite: one torch thread, quiet Lightning banners."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_quiet_lightning() -> Iterator[None]:
    """Tiny models run fastest on one thread; Lightning's info banners are noise here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lg = logging.getLogger("lightning.pytorch")
    level = lg.level
    lg.setLevel(logging.WARNING)
    yield
    lg.setLevel(level)
    torch.set_num_threads(threads)
