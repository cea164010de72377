#!/usr/bin/env bash
# I2B-LPO on Qwen2.5-7B, one node x 8 GPUs (80 GB each), the authors' defaults where the paper is
# silent (METHOD.md "Defaults from the authors' code": M=2 initial rollouts x (1 + K=3 branches) = 8
# trajectories per prompt, batch 32 prompts, lr 1e-6, T=0.9, top-p 0.9, prompt 2048 / response
# 4096 tokens, no KL, clip 0.2/0.2, 2 epochs).
#
#   bash run_scripts/run_qwen7b.sh [hydra overrides...]
#   DRY_RUN=1 bash run_scripts/run_qwen7b.sh       # print the resolved config, no Ray / GPU
#
# Before: bash run_scripts/prepare_data.sh (data) and bash run_scripts/run_cvae.sh (the CVAE).
# Reads every variable of run_scripts/common.sh (DATA_DIR, OUTPUT_DIR, MODEL_PATH, NNODES,
# GPUS_PER_NODE, WANDB_PROJECT, USE_WANDB, MODEL_PROFILE, ...) and these I2B-LPO knobs:
#   CVAE_CKPT             CVAE checkpoint (default $OUTPUT_DIR/cvae/cvae.pt, written by run_cvae.sh)
#   PLACEHOLDER_TOKEN_ID  the latent token: an unused embedding row (Qwen2.5: 151665; the model
#                         profile sets it)
#   LATENT_MODE           none (default: fork and resample plainly, the recipe's default) | cvae (the
#                         latent, opt-in: README "The latent"; needs CVAE_CKPT from run_cvae.sh)
#   IB_TOP_N              branches kept per parent; null = ceil(K/2) (..._no_ib_filter.sh: K)
#   LAMBDA_IB             weight of the IB score in the advantage, 0.5 (..._no_ib_reward.sh: 0)
#   LATENT_SERVICE_DEVICE cuda (default) | cpu; LATENT_SERVICE_NUM_GPUS 0 (see the memory plan)
#   EXPERIMENT_NAME       default ${MODEL_PROFILE}_iib_lpo = qwen2.5-7b_iib_lpo; outputs go to
#                         $OUTPUT_DIR/$EXPERIMENT_NAME
# Any other setting: a Hydra override on the command line (appended last, so it wins), e.g.
#   bash run_scripts/run_qwen7b.sh trainer.save_freq=50 iib_lpo.branching.strategy=argmax
#
# run_qwen3_14b.sh (MODEL_PROFILE=qwen3-14b) and the three ablation scripts call this script with
# other values of the knobs above, so every I2B-LPO run shares the algorithm keys below.
#
# Memory plan, 8 x 80 GB (estimates from sizes, not measurements; the values live in common.sh
# because the baselines use the same engine and memory):
#   - Actor, FSDP2 sharded over 8 GPUs: 7.6 B params x (4 B fp32 weights + 4 B grads + 8 B AdamW)
#     = 122 GB in all, ~15 GB per GPU. It fits, so no offload (ACTOR_PARAM_OFFLOAD=false,
#     ACTOR_OPTIMIZER_OFFLOAD=false): offloading would copy ~15 GB per GPU to and from the CPU
#     every step for nothing.
#   - Update: gradient checkpointing, dynamic micro-batches of 2 x (2048 + 4096) = 12,288 tokens
#     per GPU; the peak is the fp32 logits (12,288 x 152k vocab ~ 7.5 GB). The forward-only
#     log-prob pass takes 24,576 tokens per GPU.
#   - vLLM (ROLLOUT_GPU_MEM_UTIL=0.6, 48 GB per GPU, TP=2 -> 4 replicas): 7.6 GB of bf16 weights
#     per GPU and ~40 GB of KV cache. Qwen2.5-7B's KV is 57 KB per token (28 layers x 4 KV heads
#     x 128 x K,V x bf16), so a replica holds ~1.4 M tokens; one step's 32 x 8 trajectories of at
#     most 6,144 tokens are <= 0.4 M tokens per replica, before prefix sharing.
#   - The latent service (condition encoder DeBERTa-v2-xlarge, 0.9 B params in bf16 ~ 1.8 GB, plus
#     a few GB of activations for a 64 x 512-token batch, and the small CVAE) runs on cuda:0 of
#     its node with iib_lpo.latent.service.num_gpus=0, not a Ray GPU fraction: verl's resource
#     pool reserves every GPU of the node in a Ray placement group, and an actor that asks Ray
#     for 0.1 GPU outside that group is never scheduled (Ray 2.60: it stays pending). With 0 GPUs
#     Ray schedules it and, since Ray no longer blanks CUDA_VISIBLE_DEVICES for zero-GPU actors,
#     it sees the node's GPUs; device=cuda puts it there explicitly.
#   - Rollout phase on GPU 0: 15 GB actor state + 48 GB vLLM + ~5 GB latent service + CUDA
#     contexts ~ 70 GB of 80. During the update vLLM sleeps and frees its KV cache (verl's
#     default free_cache_engine=true). If GPU 0 runs out of memory, lower ROLLOUT_GPU_MEM_UTIL
#     to 0.55 or set LATENT_SERVICE_DEVICE=cpu (slower fork points, no GPU memory).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${EXPERIMENT_NAME:=${MODEL_PROFILE}_iib_lpo}"
: "${LATENT_MODE:=none}"
: "${IB_TOP_N:=null}"
: "${LAMBDA_IB:=0.5}"
: "${LATENT_SERVICE_NUM_GPUS:=0}"      # see the memory plan above: not a Ray GPU fraction
: "${LATENT_SERVICE_DEVICE:=cuda}"     # cuda | cpu

[[ "$LATENT_MODE" == cvae || "$LATENT_MODE" == none ]] || die "LATENT_MODE must be cvae or none, got '$LATENT_MODE'"
if [[ "$IB_TOP_N" != null ]]; then
  require_int IB_TOP_N "$IB_TOP_N" 1
  (( IB_TOP_N <= NUM_BRANCHES )) || die "IB_TOP_N=$IB_TOP_N exceeds NUM_BRANCHES=$NUM_BRANCHES"
fi
require_number LAMBDA_IB "$LAMBDA_IB"
require_number LATENT_SERVICE_NUM_GPUS "$LATENT_SERVICE_NUM_GPUS"
[[ "$LATENT_SERVICE_DEVICE" == cuda || "$LATENT_SERVICE_DEVICE" == cpu ]] \
  || die "LATENT_SERVICE_DEVICE must be cuda or cpu, got '$LATENT_SERVICE_DEVICE'"
if [[ "$LATENT_MODE" == cvae ]] && ! is_dry_run && [[ ! -f "$CVAE_CKPT" ]]; then
  die "CVAE checkpoint not found: CVAE_CKPT=$CVAE_CKPT
  train it first: MODEL_PATH=$MODEL_PATH CVAE_CKPT=$CVAE_CKPT bash run_scripts/run_cvae.sh
  (or run the fork-and-resample ablation: bash run_scripts/run_qwen7b_ablation_no_latent.sh)"
fi

ALGO_OVERRIDES=(
  # I2B-LPO's advantage (z(r_v) + lambda_ib * z(S_IB) over the kept group), registered by the recipe
  algorithm.adv_estimator=iib_lpo
  # rollout: the branching agent loop on the recipe's vLLM server (top-k log-probs, latent token)
  actor_rollout_ref.rollout.name=iib_lpo_vllm
  actor_rollout_ref.rollout.agent.default_agent_loop=iib_lpo_branching
  actor_rollout_ref.rollout.agent.agent_loop_manager_class=recipe.iib_lpo.rollout.manager.IibLpoAgentLoopManagerTQ
  # policy loss: verl's PPO clip, the authors' settings (no KL, clip 0.2 / 0.2, token mean)
  actor_rollout_ref.actor.use_kl_loss=false
  actor_rollout_ref.actor.clip_ratio=0.2
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.2
  actor_rollout_ref.actor.loss_agg_mode=token-mean
  actor_rollout_ref.actor.policy_loss.loss_mode=vanilla
  # latents (LATENT_MODE=cvae): v = P(z), z from the CVAE prior, added to the fork token's embedding
  "iib_lpo.latent.mode=$LATENT_MODE"
  "iib_lpo.latent.placeholder_token_id=$PLACEHOLDER_TOKEN_ID"
  "iib_lpo.latent.service.checkpoint_path=$CVAE_CKPT"
  "iib_lpo.latent.service.num_gpus=$LATENT_SERVICE_NUM_GPUS"
  "iib_lpo.latent.service.device=$LATENT_SERVICE_DEVICE"
  # IB filter and IB self-reward
  "iib_lpo.ib.top_n=$IB_TOP_N"
  "iib_lpo.advantage.lambda_ib=$LAMBDA_IB"
)

launch_training "$@"
