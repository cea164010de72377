#!/usr/bin/env bash
# KL-Cov baseline on Qwen2.5-7B, one node x 8 GPUs: GRPO (run_qwen7b_grpo.sh) with verl's kl_cov
# policy loss ("The Entropy Mechanism of RL for Reasoning LMs", Cui et al. 2025): a KL penalty on
# the small fraction of tokens with the largest covariance between log-prob and advantage, instead
# of clipping. Same data, sampling, batch, memory plan, evaluation, rollout.n = 8.
#
#   bash run_scripts/run_qwen7b_klcov.sh [hydra overrides...]
#   DRY_RUN=1 bash run_scripts/run_qwen7b_klcov.sh    # print the resolved config
#
# Reads every variable of run_scripts/common.sh and:
#   EXPERIMENT_NAME   default ${MODEL_PROFILE}_klcov, i.e. qwen2.5-7b_klcov
#   KL_COV_RATIO      fraction of tokens penalised (default 0.002: the KL-Cov authors' 7B scripts;
#                     verl's default is 0.0002)
#   PPO_KL_COEF       KL coefficient on those tokens (default 1.0, the KL-Cov authors')
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${EXPERIMENT_NAME:=${MODEL_PROFILE}_klcov}"
: "${KL_COV_RATIO:=0.002}"
: "${PPO_KL_COEF:=1.0}"
require_number KL_COV_RATIO "$KL_COV_RATIO"
require_number PPO_KL_COEF "$PPO_KL_COEF"

ALGO_OVERRIDES=(
  algorithm.adv_estimator=grpo
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent
  actor_rollout_ref.rollout.agent.agent_loop_manager_class=null
  actor_rollout_ref.actor.use_kl_loss=false
  actor_rollout_ref.actor.clip_ratio=0.2          # not read by kl_cov (no clip); kept equal to GRPO
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.2
  actor_rollout_ref.actor.loss_agg_mode=token-mean
  actor_rollout_ref.actor.policy_loss.loss_mode=kl_cov
  "actor_rollout_ref.actor.policy_loss.kl_cov_ratio=$KL_COV_RATIO"
  "actor_rollout_ref.actor.policy_loss.ppo_kl_coef=$PPO_KL_COEF"
)

launch_training "$@"
