#!/usr/bin/env bash
# Mutation score of clipse's core (the losses, the metrics, the report's statistics, the samplers
# and the run folder; pyproject.toml [tool.mutmut] names them) against the fast unit tests of
# those modules. Every mutant is one small change to the code (a flipped comparison, a changed
# constant, a dropped argument); a mutant is killed when a test fails. Prints the score.
#
#     pip install -e '.[test,mutation]' && scripts/mutation_score.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf mutants
mutmut run > mutants.log 2>&1 || { tail -20 mutants.log; exit 1; }
mutmut export-cicd-stats > /dev/null
python - <<'PY'
import json
stats = json.load(open("mutants/mutmut-cicd-stats.json"))
detected = stats["killed"] + stats["timeout"]
print(f"mutants: {stats['total']}; killed {stats['killed']}, timed out {stats['timeout']}, survived {stats['survived']}, "
      f"not reached by any test {stats['no_tests']}")
print(f"mutation score: {detected}/{stats['total']} = {100 * detected / stats['total']:.1f}% "
      "(list the survivors with: mutmut results)")
PY
