#!/usr/bin/env python
"""The stability grid with SGD + momentum 0.9: how the methods fare for momentum users.

The same models, seeds, methods, run protocol and report as ``stability.py`` (see its
docstring), with two changes: every model trains with ``optimizer="sgd_momentum"`` (momentum
0.9) instead of plain SGD, and every learning rate is 10x lower (momentum multiplies the
steady-state step by 1 / (1 - 0.9) = 10, so the grid again spans comfortable to far too
high). Runs are cached separately (``benchmarks/.cache/stability_momentum/``); the report goes
to ``benchmarks/results/stability_momentum.md`` and ``stability_momentum.png``.

Usage::

    python benchmarks/stability_momentum.py            # full grid (~11 min), resumable
    python benchmarks/stability_momentum.py --quick    # smoke run

Any other option of ``stability.py`` works the same way.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stability as st

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "stability_momentum.md"
DEFAULTS = {
    "--cache": ROOT / ".cache" / "stability_momentum",
    "--out": OUT,
    "--png": ROOT / "results" / "stability_momentum.png",
}


def use_momentum_grid() -> None:
    """Switch ``stability.MODELS`` to SGD + momentum 0.9 with 10x lower learning rates."""
    for key, spec in list(st.MODELS.items()):
        st.MODELS[key] = replace(
            spec,
            overrides={**spec.overrides, "optimizer": "sgd_momentum"},
            lrs=tuple(float(f"{lr / 10:.3g}") for lr in spec.lrs),
            note=re.sub(r" \(explodes at lr=[^)]*\)", "", spec.note).replace(
                "plain SGD", "SGD + momentum 0.9 (LRs 10x lower than the plain-SGD grid)"),
        )
    st.QUICK = {**st.QUICK, "lrs": tuple(float(f"{lr / 10:.3g}") for lr in st.QUICK["lrs"])}


def main(argv: Sequence[str] | None = None) -> int:
    use_momentum_grid()
    args = list(sys.argv[1:] if argv is None else argv)
    if "--quick" not in args:
        for flag, value in DEFAULTS.items():
            if flag not in args:
                args += [flag, str(value)]
    rc = st.main(args)
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    if out is not None and out.exists():
        text = out.read_text()
        text = text.replace("# Stability benchmark", "# Stability benchmark: SGD + momentum 0.9", 1)
        text = text.replace("`python benchmarks/stability.py`",
                            "`python benchmarks/stability_momentum.py`", 1)
        out.write_text(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
