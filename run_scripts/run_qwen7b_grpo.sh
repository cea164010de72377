#!/usr/bin/env bash
# GRPO baseline on Qwen2.5-7B, one node x 8 GPUs: verl's GRPO advantage, stock vLLM rollout and
# single-turn agent loop, through the same entry point, data, lengths, sampling, batch, memory
# plan, evaluation and rollout.n = 8 as I2B-LPO (run_qwen7b.sh). Only the algorithm keys below differ.
#
#   bash run_scripts/run_qwen7b_grpo.sh [hydra overrides...]
#   DRY_RUN=1 bash run_scripts/run_qwen7b_grpo.sh    # print the resolved config, no Ray / GPU
#
# Reads every variable of run_scripts/common.sh (DATA_DIR, OUTPUT_DIR, MODEL_PATH, NNODES,
# GPUS_PER_NODE, USE_WANDB, ...) and EXPERIMENT_NAME (default ${MODEL_PROFILE}_grpo, i.e. qwen2.5-7b_grpo).
# Kept from the entry config, as for I2B-LPO: algorithm.rollout_correction (token-level truncated
# importance weights, threshold 2), so every method corrects the same vLLM / FSDP mismatch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${EXPERIMENT_NAME:=${MODEL_PROFILE}_grpo}"

ALGO_OVERRIDES=(
  algorithm.adv_estimator=grpo                    # group-normalised outcome reward (std-normalised)
  actor_rollout_ref.rollout.name=vllm             # verl's stock vLLM server
  actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent
  actor_rollout_ref.rollout.agent.agent_loop_manager_class=null   # verl's own agent-loop manager
  actor_rollout_ref.actor.use_kl_loss=false       # as the authors' runs: no KL
  actor_rollout_ref.actor.clip_ratio=0.2
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.2
  actor_rollout_ref.actor.loss_agg_mode=token-mean
  actor_rollout_ref.actor.policy_loss.loss_mode=vanilla
)

launch_training "$@"
