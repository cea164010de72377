#!/usr/bin/env bash
# The main command: the CPU end-to-end demo. Warm-starts a tiny Qwen2 on the offline demo problems,
# runs the CVAE stage, trains I2B-LPO and GRPO with verl's real trainer (same warm start, prompts,
# steps and seed), evaluates all three on held-out problems and writes a report with plots.
#   bash run_scripts/demo_cpu.sh [--algo iib_lpo|grpo|both] [--steps N] [--seed S] [--out DIR] [--smoke] [--fresh]
# Stages are cached under --out (default outputs/demo): the same command run twice reuses them.
# Engine / Ray output: <out>/runs/<algo>/train.log and <out>/logs/; the terminal shows one line per step.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run_scripts/bootstrap_env.sh"
source "$ROOT/run_scripts/cpu_env.sh"
cd "$ROOT"
exec "${IIB_LPO_VENV:-$ROOT/.venv}/bin/python" -m recipe.iib_lpo.demo "$@"
