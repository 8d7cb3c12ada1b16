"""Per-module mutation score from ``mutmut results --all true`` (run from the project root).

Usage: ``python tools/mutation_summary.py [--survivors | --names] [GLOB ...]``, with
mutant-name globs (fnmatch), e.g. ``'lightning_gradguard.core.decide.*'``; none: every mutant
mutmut knows. Mutants mutmut has not run yet ("not checked") are listed but not scored.
``--survivors``: also list the surviving mutants (``mutmut show NAME`` prints one's diff).
``--names``: print only the surviving mutants' names, one a line, nothing else (what
``SURVIVORS=1 tools/mutation.sh`` passes back to ``mutmut run``).
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys

PREFIX = "lightning_gradguard.core."


def main(patterns: list[str], survivors: bool = False, names_only: bool = False) -> None:
    """Print one row per core module and the total over the selection."""
    pats = patterns or ["*"]
    names: list[str] = []
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True,
                         text=True, check=False).stdout
    counts: dict[str, dict[str, int]] = {}
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if not name or not any(fnmatch.fnmatch(name, p) for p in pats):
            continue
        if status == "survived":
            names.append(name)
        module = name.removeprefix(PREFIX).split(".")[0]
        c = counts.setdefault(module, {})
        c[status] = c.get(status, 0) + 1
    if names_only:
        for name in sorted(names):
            print(name)
        return
    total: dict[str, int] = {}
    print("| module | killed | survived | no tests | not checked | score |")
    print("|---|---|---|---|---|---|")
    for module in sorted(counts):
        _row(module, counts[module])
        for k, v in counts[module].items():
            total[k] = total.get(k, 0) + v
    _row("**total**", total)
    if survivors:
        print("\nsurvivors:")
        print("\n".join(sorted(names)))


def _row(label: str, c: dict[str, int]) -> None:
    killed = c.get("killed", 0) + c.get("timeout", 0)  # a timeout is a detected mutant
    survived = c.get("survived", 0)
    score = f"{100.0 * killed / (killed + survived):.1f} %" if killed + survived else "-"
    print(f"| {label} | {killed} | {survived} | {c.get('no tests', 0)} | "
          f"{c.get('not checked', 0)} | {score} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main([a for a in args if a not in ("--survivors", "--names")],
         survivors="--survivors" in args, names_only="--names" in args)
