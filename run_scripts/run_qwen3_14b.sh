#!/usr/bin/env bash
# I2B-LPO on Qwen3-14B, one node x 8 GPUs (80 GB each): run_qwen7b.sh (the same I2B-LPO algorithm
# keys, data, sampling, batch, evaluation, rollout.n = 8) with the qwen3-14b model profile of
# common.sh: model Qwen/Qwen3-14B, latent placeholder token 151669, the memory plan below, Qwen3's
# non-thinking chat template, and its own CVAE checkpoint.
#
#   bash run_scripts/run_qwen3_14b.sh [hydra overrides...]
#   DRY_RUN=1 bash run_scripts/run_qwen3_14b.sh    # print the resolved config, no Ray / GPU
#
# Before: the CVAE for this policy (its latent projector is 5120 wide, not 7B's 3584):
#   MODEL_PROFILE=qwen3-14b bash run_scripts/run_cvae.sh    # -> $OUTPUT_DIR/cvae/cvae_qwen3-14b.pt
# Reads every variable of run_qwen7b.sh and common.sh (MODEL_PATH, CVAE_CKPT, DATA_DIR, OUTPUT_DIR,
# ROLLOUT_GPU_MEM_UTIL, ...); EXPERIMENT_NAME defaults to qwen3-14b_iib_lpo. The baselines run on
# this model the same way: MODEL_PROFILE=qwen3-14b bash run_scripts/run_qwen7b_grpo.sh
#
# Memory plan, 8 x 80 GB (estimates from sizes, not measurements):
#   - Actor, FSDP2 over 8 GPUs: 14.8 B params x 16 B (fp32 weights, grads, AdamW) = 237 GB, ~30 GB
#     per GPU. The AdamW state (~15 GB per GPU) is offloaded to host RAM
#     (ACTOR_OPTIMIZER_OFFLOAD=true; ~118 GB pinned host memory per node), so the rollout phase
#     holds ~15 GB of actor state per GPU. Parameters stay on the GPU (ACTOR_PARAM_OFFLOAD=false).
#   - Update: micro-batches of 8,192 tokens per GPU (fp32 logits 8,192 x 152k ~ 5 GB); log-prob
#     pass 12,288.
#   - vLLM (ROLLOUT_GPU_MEM_UTIL=0.5, 40 GB per GPU, TP=2 -> 4 replicas): 14.8 GB bf16 weights per
#     GPU, ~25 GB KV cache. Qwen3-14B's KV is 160 KB per token (40 layers x 8 KV heads x 128 x K,V x
#     bf16): ~0.3 M tokens per replica, ~1.25 M per node; a step's 32 x 8 trajectories of at most
#     6,144 tokens (1.57 M, less with prefix sharing) partly queue. TP=4 holds about the same.
#   - The latent service (~5 GB on cuda:0, see run_qwen7b.sh) fits in the remaining ~25 GB of GPU 0.
#   - Qwen3's template thinks by default; the paper's Qwen3-14B responses (1.4k-2.5k tokens on
#     average) and the 4096-token budget point to its non-thinking mode, set through
#     data.apply_chat_template_kwargs.enable_thinking=false (decision; evaluate with the same
#     template).
set -euo pipefail
export MODEL_PROFILE=qwen3-14b
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

exec bash "$RUN_SCRIPTS_DIR/run_qwen7b.sh" "$@"
