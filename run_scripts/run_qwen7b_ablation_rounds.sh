#!/usr/bin/env bash
# I2B-LPO ablation on Qwen2.5-7B, one node x 8 GPUs: one IB round against two, at equal trajectories
# per prompt (rollout.n = 10; every parent keeps 2 branches with the default top_n = ceil(K/2)):
#   R = 1: M = 2 initial x (1 + K = 4 branches x 1 round)  = 10
#   R = 2: M = 2 initial x (1 + K = 2 branches x 2 rounds) = 10  (round 2 re-forks the best round-1 branch)
# (The default layout, n = 8, has no R = 2 counterpart.) The GRPO baseline of this pair is
# NUM_INITIAL_ROLLOUTS=2 NUM_BRANCHES=4 bash run_scripts/run_qwen7b_grpo.sh (n = 10).
#
#   bash run_scripts/run_qwen7b_ablation_rounds.sh 1|2 [hydra overrides...]
#   DRY_RUN=1 bash run_scripts/run_qwen7b_ablation_rounds.sh 2    # print the resolved config
#
# Reads every variable run_qwen7b.sh and run_scripts/common.sh read; EXPERIMENT_NAME defaults to
# ${MODEL_PROFILE}_iib_lpo_ablation_rounds<R>.
set -euo pipefail
rounds="${1:-}"
case "$rounds" in
  1) branches=4 ;;
  2) branches=2 ;;
  *) echo "usage: $0 1|2 [hydra overrides...]  (the number of IB rounds)" >&2; exit 2 ;;
esac
shift
export NUM_INITIAL_ROLLOUTS=2 NUM_BRANCHES=$branches IB_ROUNDS=$rounds
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export EXPERIMENT_NAME="${EXPERIMENT_NAME:-${MODEL_PROFILE}_iib_lpo_ablation_rounds${rounds}}"
exec bash "$RUN_SCRIPTS_DIR/run_qwen7b.sh" "$@"
