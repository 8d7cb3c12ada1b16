#!/usr/bin/env bash
# Mutation testing of the pure core (lightning_gradguard/core) with mutmut 3.
#
# Configuration: [tool.mutmut] in pyproject.toml (mutates lightning_gradguard/core/* only,
# runs the tests under tests/core, -m "not slow"). Not part of the default CI run: the whole
# core (~7100 mutants) takes 4-14 hours on 2 shared CPU cores; run it module by module.
# Results and the surviving mutants are explained in docs/mutation.md.
#
# Usage (from anywhere):
#   tools/mutation.sh                      # fresh run of every core module, 2 workers
#   tools/mutation.sh streaks update_cap   # only these core modules (mutant-name globs)
#   JOBS=1 tools/mutation.sh decide        # number of parallel workers (default 2)
#   KEEP=1 tools/mutation.sh decide        # keep mutants/ (generated mutants, test timings);
#                                          # every mutant of the modules named is run again
#   SURVIVORS=1 tools/mutation.sh decide   # keep mutants/ and run only the mutants of these
#                                          # modules that survived the last run (after adding
#                                          # tests); nothing to run: only the table
#   VENV=/path/to/venv tools/mutation.sh   # the virtual environment to use (default: the
#                                          # active one, else ./.venv, else python on PATH)
#   mutmut show <mutant-name>              # the diff of one mutant; mutmut browse: interactive
#
# Module arguments are core module names (``decide``, ``_stateful``) or any mutmut mutant-name
# glob (``lightning_gradguard.core.guard.xǁGuardCoreǁstep*``). mutmut reuses cached verdicts
# only when run without names: with KEEP=1 and module names, all of those modules' mutants are
# run again (only the mutants of changed functions are regenerated). The score printed at the
# end covers exactly the modules asked for.
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
targets=("${patterns[@]}")
if [[ "${SURVIVORS:-0}" == "1" ]]; then
    [[ -d mutants ]] || { echo "SURVIVORS=1 needs the mutants/ of an earlier run" >&2; exit 2; }
    mapfile -t targets < <(python tools/mutation_summary.py --names "${patterns[@]}" | grep .)
elif [[ "${KEEP:-0}" != "1" ]]; then
    rm -rf mutants
fi
start=$(date +%s)
if [[ "${SURVIVORS:-0}" != "1" || ${#targets[@]} -gt 0 ]]; then
    mutmut run --max-children "${JOBS:-2}" "${targets[@]}" || true  # non-zero when mutants survive
fi
echo "wall time: $(( $(date +%s) - start )) s"
python tools/mutation_summary.py --survivors "${patterns[@]}"  # per-module table (markdown)
