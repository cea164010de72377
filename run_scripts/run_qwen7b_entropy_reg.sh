#!/usr/bin/env bash
# Entropy-Reg baseline on Qwen2.5-7B, one node x 8 GPUs: GRPO (run_qwen7b_grpo.sh) plus an entropy
# bonus in the actor loss (loss -= ENTROPY_COEFF x token-mean entropy; verl computes the entropy
# whenever entropy_coeff != 0). Same data, sampling, batch, memory plan, evaluation, rollout.n = 8.
#
#   bash run_scripts/run_qwen7b_entropy_reg.sh [hydra overrides...]
#   DRY_RUN=1 bash run_scripts/run_qwen7b_entropy_reg.sh    # print the resolved config
#
# Reads every variable of run_scripts/common.sh and:
#   EXPERIMENT_NAME   default ${MODEL_PROFILE}_entropy_reg, i.e. qwen2.5-7b_entropy_reg
#   ENTROPY_COEFF     default 0.001 (decision: the I2B-LPO paper does not give its value; 0.001 is
#                     verl's usual example value, and larger bonuses are reported to make the
#                     entropy explode on 7B models)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${EXPERIMENT_NAME:=${MODEL_PROFILE}_entropy_reg}"
: "${ENTROPY_COEFF:=0.001}"
require_number ENTROPY_COEFF "$ENTROPY_COEFF"

ALGO_OVERRIDES=(
  algorithm.adv_estimator=grpo
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent
  actor_rollout_ref.rollout.agent.agent_loop_manager_class=null
  actor_rollout_ref.actor.use_kl_loss=false
  actor_rollout_ref.actor.clip_ratio=0.2
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.2
  actor_rollout_ref.actor.loss_agg_mode=token-mean
  actor_rollout_ref.actor.policy_loss.loss_mode=vanilla
  "actor_rollout_ref.actor.entropy_coeff=$ENTROPY_COEFF"
)

launch_training "$@"
