"""Scratch prototypes of candidate GradGuard rules (issue 14), tried without editing the package.

``build(name)`` returns the callbacks of prototype ``name`` (``rescue.py --methods proto:NAME``).
Each prototype is a :class:`GradGuard` whose :class:`GuardCore` is a subclass defined here; the
ablation (``benchmarks/results/rescue_ablation.md``) records every one with its numbers.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_gradguard.callbacks import GradGuard

__all__ = ["PROTOTYPES", "build"]

PROTOTYPES: dict[str, Any] = {
    "default": lambda: [GradGuard()],
}


def build(name: str) -> list[Callback]:
    """The callbacks of prototype ``name``."""
    if name not in PROTOTYPES:
        raise ValueError(f"unknown prototype {name!r}; known: {', '.join(sorted(PROTOTYPES))}")
    out: list[Callback] = PROTOTYPES[name]()
    return out
