#!/usr/bin/env bash
# I2B-LPO (or any single-node run script) on NNODES machines x GPUS_PER_NODE GPUs, as a Ray job.
#
# verl runs multi-node on one Ray cluster: one head node, the others join it, and the trainer is
# submitted as a Ray job whose driver (python -m recipe.iib_lpo.main ... trainer.nnodes=$NNODES)
# places the FSDP workers and the vLLM replicas on every node's GPUs. Steps:
#   1. on the head node:    bash run_scripts/run_qwen7b_multinode.sh head
#   2. on each other node:  HEAD_IP=<head ip> bash run_scripts/run_qwen7b_multinode.sh worker
#   3. on the head node:    NNODES=2 bash run_scripts/run_qwen7b_multinode.sh submit [hydra overrides...]
#      (waits until the cluster has NNODES x GPUS_PER_NODE GPUs, then
#       ray job submit --address http://$HEAD_IP:$RAY_DASHBOARD_PORT -- python -m recipe.iib_lpo.main
#       <the run script's overrides> trainer.nnodes=$NNODES trainer.n_gpus_per_node=$GPUS_PER_NODE)
#   4. when done, on every node: bash run_scripts/run_qwen7b_multinode.sh stop
#
# Requirements: the repository, its .venv (bootstrap_env.sh --stack gpu) and the data at the same
# paths on every node (a shared filesystem, or identical copies), since the recipe is imported and
# its verl / vLLM plugins are registered in every Ray process. OUTPUT_DIR (checkpoints) must be a
# shared filesystem. W&B: export WANDB_API_KEY before `ray start` on every node (the logger runs in
# a Ray actor, which sees the cluster's environment, not the submitting shell's).
#
# Environment (and everything common.sh reads):
#   NNODES             machines (default 2 here)
#   GPUS_PER_NODE      GPUs per machine (default 8)
#   HEAD_IP            the head node's address (head / submit default: this machine's first
#                      address; required for worker)
#   RAY_PORT           GCS port (default 6379)
#   RAY_DASHBOARD_PORT dashboard / job API port (default 8265)
#   RUN_SCRIPT         the single-node script whose run is submitted (default run_qwen7b.sh; any
#                      run_qwen7b_*.sh baseline or ablation, or run_qwen3_14b.sh)
#
# DRY_RUN=1 with `submit`: prints the resolved config (with trainer.nnodes=$NNODES) and the
# `ray job submit` line on stderr, without Ray; with head / worker / stop: prints the ray command.
set -euo pipefail
export NNODES="${NNODES:-2}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACTION="${1:-}"
[[ $# -gt 0 ]] && shift
HEAD_IP_GIVEN="${HEAD_IP:-}"
if [[ "$ACTION" == head || "$ACTION" == submit ]]; then  # run on the head node: its own address
  : "${HEAD_IP:=$(hostname -I 2>/dev/null | awk '{print $1}')}"
fi
: "${HEAD_IP:=}"
: "${RAY_PORT:=6379}"
: "${RAY_DASHBOARD_PORT:=8265}"
: "${RUN_SCRIPT:=run_qwen7b.sh}"
require_int RAY_PORT "$RAY_PORT" 1
require_int RAY_DASHBOARD_PORT "$RAY_DASHBOARD_PORT" 1
[[ "$RUN_SCRIPT" =~ ^run_qwen[a-z0-9_]*\.sh$ && -f "$RUN_SCRIPTS_DIR/$RUN_SCRIPT" \
   && "$RUN_SCRIPT" != run_qwen7b_multinode.sh ]] \
  || die "RUN_SCRIPT must name a single-node run script in run_scripts/, got '$RUN_SCRIPT'"

RAY_BIN="$(dirname "$IIB_LPO_PYTHON")/ray"
[[ -x "$RAY_BIN" ]] || RAY_BIN="$(command -v ray || echo ray)"

run_or_print() {  # in DRY_RUN, print the command instead of running it
  if is_dry_run; then printf '%q ' "$@" >&2; printf '\n' >&2; else "$@"; fi
}
need_head_ip() { [[ -n "$HEAD_IP" ]] || die "HEAD_IP is not set and this machine's address could not be found"; }

case "$ACTION" in
  head)
    need_head_ip
    run_or_print "$RAY_BIN" start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" \
      --dashboard-host=0.0.0.0 --dashboard-port="$RAY_DASHBOARD_PORT" --num-gpus="$GPUS_PER_NODE"
    ;;
  worker)
    [[ -n "$HEAD_IP_GIVEN" ]] || die "set HEAD_IP to the head node's address"
    run_or_print "$RAY_BIN" start --address="$HEAD_IP:$RAY_PORT" --num-gpus="$GPUS_PER_NODE"
    ;;
  stop)
    run_or_print "$RAY_BIN" stop
    ;;
  submit)
    need_head_ip
    export RAY_JOB_ADDRESS="http://$HEAD_IP:$RAY_DASHBOARD_PORT"
    if ! is_dry_run; then
      # the job would wait forever for placement groups on a cluster that is too small
      want=$(( NNODES * GPUS_PER_NODE ))
      have="$("$IIB_LPO_PYTHON" -c "import ray; ray.init(address='$HEAD_IP:$RAY_PORT', logging_level='ERROR'); print(int(ray.cluster_resources().get('GPU', 0)))" 2>/dev/null | tail -n 1)" \
        || die "no Ray cluster at $HEAD_IP:$RAY_PORT: start it with '$0 head' and '$0 worker'"
      (( have >= want )) || die "the Ray cluster has $have GPUs, NNODES x GPUS_PER_NODE = $want: start the workers first"
    fi
    exec bash "$RUN_SCRIPTS_DIR/$RUN_SCRIPT" "$@"
    ;;
  *)
    die "usage: $0 head|worker|submit|stop [hydra overrides... (submit)]"
    ;;
esac
