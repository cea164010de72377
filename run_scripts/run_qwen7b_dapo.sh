#!/usr/bin/env bash
# DAPO baseline on Qwen2.5-7B, one node x 8 GPUs: GRPO (run_qwen7b_grpo.sh) plus DAPO's four
# changes in verl 0.9.1 keys -- clip-higher (0.2 / 0.28), token-level loss, overlong reward shaping,
# dynamic sampling -- with the same data, sampling, batch, memory plan, evaluation and rollout.n = 8.
#
#   bash run_scripts/run_qwen7b_dapo.sh [hydra overrides...]
#   DRY_RUN=1 bash run_scripts/run_qwen7b_dapo.sh    # print the resolved config, no Ray / GPU
#
# Reads every variable of run_scripts/common.sh and:
#   EXPERIMENT_NAME        default ${MODEL_PROFILE}_dapo, i.e. qwen2.5-7b_dapo
#   OVERLONG_BUFFER_LEN    tokens before MAX_RESPONSE_LENGTH where the length penalty starts
#                          (default 1024 = a quarter of the 4096-token response: DAPO's 32B recipe
#                          uses 4096 of 20480, i.e. a fifth; decision)
#   OVERLONG_PENALTY       penalty at the maximum length (default 1.0, DAPO)
#
# verl 0.9.1 keys (the DAPO recipe scripts' reward_model.* / top-level keys are parsed but ignored):
#   - reward manager: reward.reward_manager.name=dapo; its settings are read from
#     reward.reward_kwargs (verl/experimental/reward_loop/reward_manager/dapo.py:
#     overlong_buffer_cfg.{enable,len,penalty_factor,log} and max_resp_len). The score itself is
#     still the recipe's checker (reward.custom_reward_function), binary 0/1 as for every method:
#     a group z-score is the same for 0/1 and -1/+1 rewards, only the overlong penalty's relative
#     size changes.
#   - dynamic sampling: algorithm.filter_groups.{enable,metric}; metric=acc (the checker returns
#     "acc"). verl 0.9.1's V1 replay buffer ignores max_num_gen_batches (it logs a warning when it
#     is > 0), so it stays 0; max_inflight_gen_batches bounds the extra generation instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${EXPERIMENT_NAME:=${MODEL_PROFILE}_dapo}"
: "${OVERLONG_BUFFER_LEN:=1024}"
: "${OVERLONG_PENALTY:=1.0}"
require_int OVERLONG_BUFFER_LEN "$OVERLONG_BUFFER_LEN" 1
(( OVERLONG_BUFFER_LEN <= MAX_RESPONSE_LENGTH )) \
  || die "OVERLONG_BUFFER_LEN=$OVERLONG_BUFFER_LEN exceeds MAX_RESPONSE_LENGTH=$MAX_RESPONSE_LENGTH"
require_number OVERLONG_PENALTY "$OVERLONG_PENALTY"

ALGO_OVERRIDES=(
  algorithm.adv_estimator=grpo
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent
  actor_rollout_ref.rollout.agent.agent_loop_manager_class=null
  actor_rollout_ref.actor.use_kl_loss=false
  # clip-higher and dual-clip bound
  actor_rollout_ref.actor.clip_ratio=0.2
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.28
  actor_rollout_ref.actor.clip_ratio_c=10.0
  # token-level policy-gradient loss
  actor_rollout_ref.actor.loss_agg_mode=token-mean
  actor_rollout_ref.actor.policy_loss.loss_mode=vanilla
  # overlong reward shaping
  reward.reward_manager.name=dapo
  +reward.reward_kwargs.overlong_buffer_cfg.enable=true
  "+reward.reward_kwargs.overlong_buffer_cfg.len=$OVERLONG_BUFFER_LEN"
  "+reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=$OVERLONG_PENALTY"
  +reward.reward_kwargs.overlong_buffer_cfg.log=true
  "+reward.reward_kwargs.max_resp_len=$MAX_RESPONSE_LENGTH"
  # dynamic sampling: drop groups whose trajectories are all right or all wrong, refill the batch
  algorithm.filter_groups.enable=true
  algorithm.filter_groups.metric=acc
  algorithm.filter_groups.max_num_gen_batches=0
  algorithm.filter_groups.max_inflight_gen_batches=1
)

launch_training "$@"
