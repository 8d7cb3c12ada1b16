#!/usr/bin/env bash
# Mutation testing of the pure core (lightning_gradguard/core) with mutmut 3.
#
# Configuration: [tool.mutmut] in pyproject.toml (mutates lightning_gradguard/core/* only,
# runs the tests under tests/core, -m "not slow"). Not part of the default CI run: it takes
# about an hour on 2 shared CPU cores. Results and the surviving mutants are explained in
# docs/mutation.md.
#
# Usage (from anywhere, inside the project's virtual environment):
#   tools/mutation.sh            # fresh run: regenerate every mutant, run, summarise
#   JOBS=4 tools/mutation.sh     # more parallel workers (default 2)
#   KEEP=1 tools/mutation.sh     # reuse mutants/ and cached results (only changed code reruns)
#   mutmut show <mutant-name>    # the diff of one mutant; mutmut browse: interactive
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"  # this checkout's package, not an editable install elsewhere
if [[ "${KEEP:-0}" != "1" ]]; then
    rm -rf mutants
fi
start=$(date +%s)
mutmut run --max-children "${JOBS:-2}" || true  # exits non-zero when mutants survive
echo "wall time: $(( $(date +%s) - start )) s"
mutmut export-cicd-stats >/dev/null
python - <<'PY'
import json
s = json.load(open("mutants/mutmut-cicd-stats.json"))
done = s["killed"] + s["survived"] + s.get("timeout", 0) + s.get("suspicious", 0)
killed = s["killed"] + s.get("timeout", 0)
print(json.dumps(s, indent=1))
print(f"score: {killed}/{done} = {100.0 * killed / max(done, 1):.1f} % killed "
      "(timeouts count as killed; 'no tests' and skipped mutants are not in the denominator)")
PY
echo "survivors:"
mutmut results
