#!/usr/bin/env bash
# Mutation testing of the pure core (lightning_gradguard/core) with mutmut 3.
#
# Configuration: [tool.mutmut] in pyproject.toml (mutates lightning_gradguard/core/* only,
# runs the tests under tests/core, -m "not slow"). Not part of the default CI run: a full run
# takes hours on 2 shared CPU cores. Results and the surviving mutants are explained in
# docs/mutation.md.
#
# Usage (from anywhere):
#   tools/mutation.sh                      # fresh run of every core module, 2 workers
#   tools/mutation.sh streaks update_cap   # only these core modules (mutant-name globs)
#   JOBS=1 tools/mutation.sh               # parallel workers (default 2)
#   KEEP=1 tools/mutation.sh decide        # reuse mutants/ and cached results
#   VENV=/path/to/venv tools/mutation.sh   # the virtual environment to use (default: the
#                                          # active one, else ./.venv, else python on PATH)
#   mutmut show <mutant-name>              # the diff of one mutant; mutmut browse: interactive
#
# Module arguments are core module names (``decide``, ``_stateful``) or any mutmut mutant-name
# glob (``lightning_gradguard.core.guard.xǁGuardCoreǁstep*``). The score printed at the end
# covers exactly the modules asked for.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VENV:-${VIRTUAL_ENV:-}}"
if [[ -z "$venv" && -d .venv ]]; then
    venv=.venv
fi
if [[ -n "$venv" ]]; then
    if [[ ! -f "$venv/bin/activate" ]]; then
        echo "VENV=$venv has no bin/activate" >&2
        exit 2
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
fi
command -v mutmut >/dev/null || { echo "mutmut not found (pip install 'mutmut>=3')" >&2; exit 2; }

export PYTHONPATH="$PWD"  # this checkout's package, not an editable install elsewhere
patterns=()
for m in "$@"; do
    if [[ "$m" == *.* || "$m" == *"*"* ]]; then
        patterns+=("$m")
    else
        patterns+=("lightning_gradguard.core.$m.*")
    fi
done
if [[ "${KEEP:-0}" != "1" ]]; then
    rm -rf mutants
fi
start=$(date +%s)
mutmut run --max-children "${JOBS:-2}" "${patterns[@]}" || true  # non-zero when mutants survive
echo "wall time: $(( $(date +%s) - start )) s"
python - "${patterns[@]}" <<'PY'
import fnmatch
import json
import subprocess
import sys

pats = sys.argv[1:] or ["lightning_gradguard.core.*"]
out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True,
                     check=False).stdout
counts: dict[str, dict[str, int]] = {}
for line in out.splitlines():
    name, _, status = line.strip().rpartition(": ")
    if not name or not any(fnmatch.fnmatch(name, p) for p in pats):
        continue
    module = name.split(".x")[0].rsplit(".", 1)[-1] if ".x" in name else name
    module = name.removeprefix("lightning_gradguard.core.").split(".")[0]
    c = counts.setdefault(module, {})
    c[status] = c.get(status, 0) + 1
total: dict[str, int] = {}
print(f"{'module':<14} {'killed':>7} {'survived':>9} {'no tests':>9} {'other':>6} {'score':>7}")
for module in sorted(counts):
    c = counts[module]
    for k, v in c.items():
        total[k] = total.get(k, 0) + v
    rows = [("    " + module, c)]
    for label, c in rows:
        k = c.get("killed", 0) + c.get("timeout", 0)
        s = c.get("survived", 0)
        other = sum(v for key, v in c.items()
                    if key not in {"killed", "timeout", "survived", "no tests"})
        print(f"{label:<14} {k:>7} {s:>9} {c.get('no tests', 0):>9} {other:>6} "
              f"{100.0 * k / max(k + s, 1):>6.1f}%")
k = total.get("killed", 0) + total.get("timeout", 0)
s = total.get("survived", 0)
print(f"total: killed {k}, survived {s}, no tests {total.get('no tests', 0)}, "
      f"all statuses {json.dumps(total)}")
print(f"score: {k}/{k + s} = {100.0 * k / max(k + s, 1):.1f} % of covered mutants killed "
      "(timeouts count as killed; 'no tests' and skipped mutants are not in the denominator)")
PY
echo "survivors:"
mutmut results | grep -F -f <(printf '%s\n' "${patterns[@]:-lightning_gradguard.core.}" \
    | sed 's/\*.*//') || true
