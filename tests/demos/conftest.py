"""Fixtures for the demo model / datamodule tests; helpers live in ``_helpers``."""

from __future__ import annotations

import logging
import warnings
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
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        yield
    lg.setLevel(level)
    torch.set_num_threads(threads)
