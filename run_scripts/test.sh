#!/usr/bin/env bash
# The test command: bootstrap the environment if needed, then run the whole test suite on CPU.
#   bash run_scripts/test.sh [pytest args...]     e.g. -m "not slow", -k reward, -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run_scripts/bootstrap_env.sh"
source "$ROOT/run_scripts/cpu_env.sh"
cd "$ROOT"
exec "${IIB_LPO_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
