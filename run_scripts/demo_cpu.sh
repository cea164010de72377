#!/usr/bin/env bash
# The main command: a tiny real end-to-end demo of the recipe code on CPU.
#   bash run_scripts/demo_cpu.sh [--out DIR] [--num-problems N] [--seed S]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run_scripts/bootstrap_env.sh"
source "$ROOT/run_scripts/cpu_env.sh"
cd "$ROOT"
exec "${IIB_LPO_VENV:-$ROOT/.venv}/bin/python" -m recipe.iib_lpo.demo "$@"
