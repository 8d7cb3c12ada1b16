#!/usr/bin/env bash
# Re-check named mutants against chosen test files, without mutmut's scheduler.
#
#   tools/mutation_recheck.sh NAMES_FILE TEST_FILE [TEST_FILE ...]
#
# NAMES_FILE: mutant names, one a line (e.g. `python tools/mutation_summary.py --names
# 'lightning_gradguard.core.causes.*' > names.txt`). For each one, the given test files run
# once in the mutants tree of an earlier `tools/mutation.sh` run (MUTANTS=..., default
# ./mutants; the current tests/ are copied into it first) with that mutant active; prints
# `killed NAME` or `SURVIVED NAME`. A mutant a test file kills here is killed by mutmut too
# (mutmut runs every test that reaches the mutated function); use it after adding tests to
# re-check a long survivor list quickly, then record the result as such (docs/mutation.md).
# Several checks may run at once on separate copies of the mutants tree (cp -r mutants X;
# MUTANTS=X) — never in a mutants/ that mutmut is running in. Python: the active one, or
# VENV=/path/to/venv.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { echo "usage: $0 NAMES_FILE TEST_FILE [TEST_FILE ...]" >&2; exit 2; }
names=$(realpath "$1")
shift
root=$PWD
tree=$(realpath "${MUTANTS:-mutants}")
[[ -d "$tree/lightning_gradguard" ]] || { echo "no mutants tree at $tree" >&2; exit 2; }
if [[ -n "${VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
rm -rf "$tree/tests" && cp -r "$root/tests" "$tree/tests"
cd "$tree"
run() {
    MUTANT_UNDER_TEST="$1" PYTHONPATH="$tree" timeout 300 python -m pytest -q -x \
        -p no:randomly -p no:cacheprovider -m "not slow" "${@:2}" >/dev/null 2>&1
}
# the test files must pass without a mutant (a missing torch or a broken test kills all)
run "" "$@" || { echo "the test files fail without a mutant (python: $(command -v python))" >&2
                 exit 2; }
while read -r name; do
    [[ -z "$name" ]] && continue
    if run "$name" "$@"; then
        echo "SURVIVED $name"
    else
        echo "killed $name"
    fi
done < "$names"
