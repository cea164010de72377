# Shared settings of every GPU launch script in run_scripts/ (sourced, never run directly).
#
# One place holds everything the runs have in common -- data, lengths, sampling, batch, evaluation,
# trajectories per prompt, model and memory plan, cluster size, logging, checkpoints -- so that
# I2B-LPO (run_qwen7b.sh) and every baseline (run_qwen7b_grpo.sh, ...) differ ONLY in the algorithm
# keys each script sets (tests/test_launch_scripts.py checks the resolved configs).
#
# Every setting is an environment variable with a default (`: "${VAR:=default}"`): export it, or
# put it in front of the command, e.g. `DATA_DIR=/data/iib MODEL_PATH=/models/Qwen2.5-7B bash
# run_scripts/run_qwen7b.sh`. Hydra overrides given to a script (`bash run_qwen7b.sh
# trainer.total_epochs=1`) are appended last and win.
#
# DRY_RUN=1: the training scripts print the fully resolved config (YAML, and nothing else, on
# stdout) and exit 0 without Ray or a GPU; nothing is checked on disk. run_cvae.sh and
# prepare_data.sh print the commands they would run.
#
# A script uses it as:
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#   : "${EXPERIMENT_NAME:=qwen2.5-7b_grpo}"
#   ALGO_OVERRIDES=(algorithm.adv_estimator=grpo ...)
#   launch_training "$@"

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
# Messages go to stderr: in DRY_RUN stdout carries only the config.
log() { printf '[%s] %s\n' "$(basename "${BASH_SOURCE[-1]:-$0}")" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$(basename "${BASH_SOURCE[-1]:-$0}")" "$*" >&2; exit 2; }
require_int() {  # name value [min]
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
  (( $2 >= ${3:-0} )) || die "$1 must be >= ${3:-0}, got $2"
}
require_number() { [[ "$2" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || die "$1 must be a number, got '$2'"; }
require_bool() { [[ "$2" == true || "$2" == false ]] || die "$1 must be true or false, got '$2'"; }
# hydra_list a b c -> ['a','b','c'] (quoted, so paths with '=' or ',' survive Hydra's parser)
hydra_list() {
  local out="" x
  for x in "$@"; do
    [[ "$x" == *"'"* ]] && die "a path contains a single quote, which Hydra cannot take here: $x"
    out+="${out:+,}'$x'"
  done
  printf '[%s]' "$out"
}
is_dry_run() { [[ "$DRY_RUN" == 1 ]]; }

# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"  # repository root (scripts run from here)
RUN_SCRIPTS_DIR="$ROOT/run_scripts"
# DRY_RUN=1: print the resolved config and exit (passed through to `python -m recipe.iib_lpo.main`)
: "${DRY_RUN:=0}"
[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
export DRY_RUN
# Python with verl 0.9.1 + the recipe: $IIB_LPO_PYTHON, else the repository's .venv
# (bash run_scripts/bootstrap_env.sh --stack gpu), else python3 on PATH.
if [[ -z "${IIB_LPO_PYTHON:-}" ]]; then
  if [[ -x "${IIB_LPO_VENV:-$ROOT/.venv}/bin/python" ]]; then
    IIB_LPO_PYTHON="${IIB_LPO_VENV:-$ROOT/.venv}/bin/python"
  else
    IIB_LPO_PYTHON="$(command -v python3 || true)"
  fi
fi
[[ -n "$IIB_LPO_PYTHON" && -x "$IIB_LPO_PYTHON" ]] \
  || die "no Python found: run 'bash run_scripts/bootstrap_env.sh --stack gpu' or set IIB_LPO_PYTHON"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"  # tokenizers' threads fight Ray's workers
export HYDRA_FULL_ERROR="${HYDRA_FULL_ERROR:-1}"                  # whole traceback on a config error
export PYTHONUNBUFFERED=1                                         # log lines appear as they happen

# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------
# Data: the parquet files written by run_scripts/prepare_data.sh (data_prep.prepare names them
# DIR/{dataset}_{split}.parquet).
: "${DATA_DIR:=$ROOT/data}"
# Everything a run writes: $OUTPUT_DIR/$EXPERIMENT_NAME/{ckpt,hydra,train.log,metrics.jsonl}
: "${OUTPUT_DIR:=$ROOT/outputs}"
# The policy (MODEL_PATH, a hub id or a local directory) and the CVAE checkpoint the I2B-LPO runs
# load (CVAE_CKPT, written by run_scripts/run_cvae.sh; its latent projector is as wide as the
# policy's hidden size, so one checkpoint per model) default per MODEL_PROFILE, below.
# Training sets (space-separated): MATH (the paper: 6,486 after filtering) + DAPO-Math-17k (13,583).
: "${TRAIN_FILES:=$DATA_DIR/math_train.parquet $DATA_DIR/dapo_math_train.parquet}"
# Validation during training: the five benchmarks of the paper's main table.
: "${VAL_FILES:=$DATA_DIR/math500_test.parquet $DATA_DIR/aime2024_test.parquet $DATA_DIR/aime2025_test.parquet $DATA_DIR/amc23_test.parquet $DATA_DIR/olympiadbench_test.parquet}"

# ---------------------------------------------------------------------------------------------
# cluster
# ---------------------------------------------------------------------------------------------
: "${NNODES:=1}"           # machines in the Ray cluster (run_qwen7b_multinode.sh for > 1)
: "${GPUS_PER_NODE:=8}"    # GPUs per machine used by the trainer
# Set by run_qwen7b_multinode.sh: submit the run as a Ray job to this dashboard address
# (http://HEAD:8265) instead of starting a local Ray instance.
: "${RAY_JOB_ADDRESS:=}"

# ---------------------------------------------------------------------------------------------
# the authors' defaults (METHOD.md "Defaults from the authors' code"); the same for every algorithm
# ---------------------------------------------------------------------------------------------
: "${MAX_PROMPT_LENGTH:=2048}"     # prompt tokens; longer prompts are dropped (filter_overlong_prompts)
: "${MAX_RESPONSE_LENGTH:=4096}"   # generated tokens per trajectory (branch prefix included)
: "${TEMPERATURE:=0.9}"            # rollout sampling temperature
: "${TOP_P:=0.9}"                  # rollout nucleus sampling
: "${TRAIN_BATCH_SIZE:=32}"        # prompts per training step
: "${LR:=1e-6}"                    # actor learning rate (AdamW, verl's defaults otherwise)
: "${TOTAL_EPOCHS:=2}"             # passes over the training prompts
# Trajectories per prompt. I2B-LPO: M initial rollouts, K latent branches each per IB round, so
# rollout.n = M x (1 + K x R) = 8 sessions per prompt (checked at start-up). Every baseline samples
# the same rollout.n = 8 independent responses, so all methods see the same number of trajectories.
: "${NUM_INITIAL_ROLLOUTS:=2}"     # M
: "${NUM_BRANCHES:=3}"             # K
: "${IB_ROUNDS:=1}"                # R: iterative IB rounds (run_qwen7b_ablation_rounds.sh)
# PPO mini-batch in prompts (decision, the paper is silent): 2 policy updates per step, so the
# clip ratios act (with one update per step the ratio is 1 and no clip would ever bind).
: "${PPO_MINI_BATCH_SIZE:=16}"
: "${SEED:=42}"                    # data order and rollout seed

# ---------------------------------------------------------------------------------------------
# evaluation during training (the paper's metrics come from run_scripts/run_eval.sh afterwards)
# ---------------------------------------------------------------------------------------------
: "${VAL_TEMPERATURE:=0.6}"        # the eval protocol's sampling (recipe/iib_lpo/eval defaults)
: "${VAL_TOP_P:=0.95}"
: "${VAL_N:=1}"                    # samples per validation prompt (1: a cheap P@1 curve)
: "${TEST_FREQ:=100}"              # validate every N steps (2 epochs of ~20k prompts = ~1,250 steps)
: "${VAL_BEFORE_TRAIN:=true}"      # the base model's score as step 0

# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
: "${SAVE_FREQ:=100}"              # save every N steps (7B: ~90 GB with optimizer state per save)
: "${MAX_CKPT_TO_KEEP:=2}"         # older checkpoints are deleted
: "${RESUME_MODE:=auto}"           # auto: resume from the latest checkpoint in the run's ckpt dir

# ---------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------
: "${WANDB_PROJECT:=iib_lpo}"      # trainer.project_name (the W&B project)
# USE_WANDB=1: logger [console, wandb]; 0: [console, file] (JSONL at $OUTPUT_DIR/$EXPERIMENT_NAME/
# metrics.jsonl). auto (default): wandb when WANDB_API_KEY is set, else file.
: "${USE_WANDB:=auto}"

# ---------------------------------------------------------------------------------------------
# model profile: the policy, its latent token and the memory plan for 8 x 80 GB GPUs. Shared by
# every algorithm (same engine, same memory), so a baseline runs on another model with e.g.
# `MODEL_PROFILE=qwen3-14b bash run_scripts/run_qwen7b_grpo.sh`. The arithmetic behind each plan is
# in run_qwen7b.sh (qwen2.5-7b) and run_qwen3_14b.sh (qwen3-14b); each value can be overridden.
# ---------------------------------------------------------------------------------------------
: "${MODEL_PROFILE:=qwen2.5-7b}"
require_int MAX_PROMPT_LENGTH "$MAX_PROMPT_LENGTH" 1
require_int MAX_RESPONSE_LENGTH "$MAX_RESPONSE_LENGTH" 1
_seq=$(( MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH ))
case "$MODEL_PROFILE" in
  qwen2.5-7b)
    : "${MODEL_PATH:=Qwen/Qwen2.5-7B}"               # the paper's main model (base, not instruct)
    : "${PLACEHOLDER_TOKEN_ID:=151665}"              # first unused embedding row of Qwen2.5
    : "${CVAE_CKPT:=$OUTPUT_DIR/cvae/cvae.pt}"
    : "${ROLLOUT_TP:=2}"                             # vLLM tensor parallel: 4 replicas per node
    : "${ROLLOUT_GPU_MEM_UTIL:=0.6}"                 # vLLM's share of each GPU (weights + KV cache)
    : "${ACTOR_PARAM_OFFLOAD:=false}"                # FSDP state (~15 GB / GPU) stays on the GPU
    : "${ACTOR_OPTIMIZER_OFFLOAD:=false}"
    : "${ACTOR_MAX_TOKENS_PER_GPU:=$(( 2 * _seq ))}" # update micro-batch: 2 full-length sequences
    : "${LOGPROB_MAX_TOKENS_PER_GPU:=$(( 4 * _seq ))}" # forward-only log-prob pass: 4
    : "${MODEL_EXTRA_OVERRIDES:=}"
    ;;
  qwen3-14b)
    : "${MODEL_PATH:=Qwen/Qwen3-14B}"
    : "${PLACEHOLDER_TOKEN_ID:=151669}"              # first unused embedding row of Qwen3
    : "${CVAE_CKPT:=$OUTPUT_DIR/cvae/cvae_qwen3-14b.pt}"  # P is as wide as the policy (5120)
    : "${ROLLOUT_TP:=2}"
    : "${ROLLOUT_GPU_MEM_UTIL:=0.5}"
    : "${ACTOR_PARAM_OFFLOAD:=false}"
    : "${ACTOR_OPTIMIZER_OFFLOAD:=true}"             # AdamW state (~15 GB / GPU) to host RAM
    : "${ACTOR_MAX_TOKENS_PER_GPU:=$(( 4 * _seq / 3 ))}"
    : "${LOGPROB_MAX_TOKENS_PER_GPU:=$(( 2 * _seq ))}"
    # Qwen3's chat template thinks by default; the paper's Qwen3-14B responses (1.4k-2.5k tokens
    # on average) and the 4096-token budget fit its non-thinking mode (decision).
    : "${MODEL_EXTRA_OVERRIDES:=+data.apply_chat_template_kwargs.enable_thinking=false}"
    ;;
  *) die "MODEL_PROFILE must be qwen2.5-7b or qwen3-14b, got '$MODEL_PROFILE'" ;;
esac
unset _seq
: "${ACTOR_STRATEGY:=fsdp2}"           # FSDP2: the path the CPU trainer tests exercise

# ---------------------------------------------------------------------------------------------
# validation of the settings
# ---------------------------------------------------------------------------------------------
for _v in NNODES GPUS_PER_NODE MAX_PROMPT_LENGTH MAX_RESPONSE_LENGTH TRAIN_BATCH_SIZE TOTAL_EPOCHS \
          NUM_INITIAL_ROLLOUTS NUM_BRANCHES IB_ROUNDS PPO_MINI_BATCH_SIZE VAL_N ROLLOUT_TP \
          ACTOR_MAX_TOKENS_PER_GPU LOGPROB_MAX_TOKENS_PER_GPU PLACEHOLDER_TOKEN_ID MAX_CKPT_TO_KEEP SEED; do
  require_int "$_v" "${!_v}" 1
done
for _v in TEST_FREQ SAVE_FREQ; do [[ "${!_v}" == -1 ]] || require_int "$_v" "${!_v}" 1; done
for _v in TEMPERATURE TOP_P LR VAL_TEMPERATURE VAL_TOP_P ROLLOUT_GPU_MEM_UTIL; do require_number "$_v" "${!_v}"; done
for _v in ACTOR_PARAM_OFFLOAD ACTOR_OPTIMIZER_OFFLOAD VAL_BEFORE_TRAIN; do require_bool "$_v" "${!_v}"; done
(( TRAIN_BATCH_SIZE % PPO_MINI_BATCH_SIZE == 0 )) \
  || die "TRAIN_BATCH_SIZE=$TRAIN_BATCH_SIZE must be a multiple of PPO_MINI_BATCH_SIZE=$PPO_MINI_BATCH_SIZE"
(( GPUS_PER_NODE % ROLLOUT_TP == 0 )) || die "GPUS_PER_NODE=$GPUS_PER_NODE must be a multiple of ROLLOUT_TP=$ROLLOUT_TP"
[[ "$USE_WANDB" =~ ^(0|1|auto)$ ]] || die "USE_WANDB must be 0, 1 or auto, got '$USE_WANDB'"
case "$RESUME_MODE" in auto|disable|resume_path) ;; *) die "RESUME_MODE must be auto, disable or resume_path";; esac
unset _v

# trajectories per prompt, the same for every algorithm
ROLLOUT_N=$(( NUM_INITIAL_ROLLOUTS * (1 + NUM_BRANCHES * IB_ROUNDS) ))
read -r -a TRAIN_FILE_LIST <<< "$TRAIN_FILES"
read -r -a VAL_FILE_LIST <<< "$VAL_FILES"
(( ${#TRAIN_FILE_LIST[@]} > 0 )) || die "TRAIN_FILES is empty"
(( ${#VAL_FILE_LIST[@]} > 0 )) || die "VAL_FILES is empty"

if [[ "$USE_WANDB" == auto ]]; then
  if [[ -n "${WANDB_API_KEY:-}" ]]; then USE_WANDB=1; else USE_WANDB=0; fi
fi
if [[ "$USE_WANDB" == 1 ]]; then LOGGER="['console','wandb']"; else LOGGER="['console','file']"; fi

# The overrides every run shares (verl 0.9.1 keys; the recipe's entry config is
# recipe/iib_lpo/config/iib_lpo_trainer.yaml). Algorithm keys are NOT here: each script sets them.
common_overrides() {
  COMMON_OVERRIDES=(
    # data
    "data.train_files=$(hydra_list "${TRAIN_FILE_LIST[@]}")"
    "data.val_files=$(hydra_list "${VAL_FILE_LIST[@]}")"
    "data.max_prompt_length=$MAX_PROMPT_LENGTH"
    "data.max_response_length=$MAX_RESPONSE_LENGTH"
    data.filter_overlong_prompts=true     # drop (not truncate) prompts over the limit
    data.truncation=error
    "data.train_batch_size=$TRAIN_BATCH_SIZE"
    data.shuffle=true
    "data.seed=$SEED"
    # model
    "actor_rollout_ref.model.path=$MODEL_PATH"
    actor_rollout_ref.model.use_remove_padding=true
    actor_rollout_ref.model.enable_gradient_checkpointing=true
    # actor: optimiser, batch, memory plan
    "actor_rollout_ref.actor.strategy=$ACTOR_STRATEGY"
    "actor_rollout_ref.actor.optim.lr=$LR"
    "actor_rollout_ref.actor.ppo_mini_batch_size=$PPO_MINI_BATCH_SIZE"
    actor_rollout_ref.actor.use_dynamic_bsz=true
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$ACTOR_MAX_TOKENS_PER_GPU"
    "actor_rollout_ref.actor.fsdp_config.param_offload=$ACTOR_PARAM_OFFLOAD"
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload=$ACTOR_OPTIMIZER_OFFLOAD"
    # rollout: sampling, trajectories per prompt, engine and memory plan
    "actor_rollout_ref.rollout.n=$ROLLOUT_N"
    "actor_rollout_ref.rollout.temperature=$TEMPERATURE"
    "actor_rollout_ref.rollout.top_p=$TOP_P"
    actor_rollout_ref.rollout.top_k=-1
    "actor_rollout_ref.rollout.seed=$SEED"
    "actor_rollout_ref.rollout.tensor_model_parallel_size=$ROLLOUT_TP"
    "actor_rollout_ref.rollout.gpu_memory_utilization=$ROLLOUT_GPU_MEM_UTIL"
    actor_rollout_ref.rollout.enable_prefix_caching=true   # branches read the parent's prefix from it
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$LOGPROB_MAX_TOKENS_PER_GPU"
    # validation sampling
    actor_rollout_ref.rollout.val_kwargs.do_sample=true
    "actor_rollout_ref.rollout.val_kwargs.temperature=$VAL_TEMPERATURE"
    "actor_rollout_ref.rollout.val_kwargs.top_p=$VAL_TOP_P"
    actor_rollout_ref.rollout.val_kwargs.top_k=-1
    "actor_rollout_ref.rollout.val_kwargs.n=$VAL_N"
    # I2B-LPO's group layout (read only when algorithm.adv_estimator=iib_lpo; the same M, K give
    # every baseline its rollout.n above)
    "iib_lpo.num_initial_rollouts=$NUM_INITIAL_ROLLOUTS"
    "iib_lpo.num_branches=$NUM_BRANCHES"
    "iib_lpo.ib.rounds=$IB_ROUNDS"
    # trainer: cluster, schedule, evaluation, checkpoints, logging
    "trainer.nnodes=$NNODES"
    "trainer.n_gpus_per_node=$GPUS_PER_NODE"
    "trainer.total_epochs=$TOTAL_EPOCHS"
    "trainer.test_freq=$TEST_FREQ"
    "trainer.val_before_train=$VAL_BEFORE_TRAIN"
    "trainer.save_freq=$SAVE_FREQ"
    "trainer.max_actor_ckpt_to_keep=$MAX_CKPT_TO_KEEP"
    "trainer.resume_mode=$RESUME_MODE"
    "trainer.project_name=$WANDB_PROJECT"
    "trainer.experiment_name=$EXPERIMENT_NAME"
    "trainer.default_local_dir=$RUN_DIR/ckpt"
    "trainer.logger=$LOGGER"
  )
  local extra
  read -r -a extra <<< "$MODEL_EXTRA_OVERRIDES"
  COMMON_OVERRIDES+=("${extra[@]}")
}

# Files a real run needs; DRY_RUN skips this (it reads nothing from disk).
check_run_inputs() {
  local f missing=()
  for f in "${TRAIN_FILE_LIST[@]}" "${VAL_FILE_LIST[@]}"; do [[ -f "$f" ]] || missing+=("$f"); done
  if (( ${#missing[@]} )); then
    die "missing data files (DATA_DIR=$DATA_DIR):$(printf '\n  %s' "${missing[@]}")
  prepare them with: DATA_DIR=$DATA_DIR bash run_scripts/prepare_data.sh"
  fi
  if [[ "$MODEL_PATH" == /* || "$MODEL_PATH" == .* || "$MODEL_PATH" == "~"* ]]; then
    [[ -f "$MODEL_PATH/config.json" ]] || die "MODEL_PATH=$MODEL_PATH is not a model directory (no config.json)"
  fi
}

# launch_training [hydra overrides...]
#   python -m recipe.iib_lpo.main <common overrides> <ALGO_OVERRIDES> <extra overrides "$@">
# ALGO_OVERRIDES (array) and EXPERIMENT_NAME come from the calling script. With RAY_JOB_ADDRESS set
# the command is submitted to that Ray cluster (`ray job submit ... -- python ...`).
launch_training() {
  [[ -n "${EXPERIMENT_NAME:-}" ]] || die "EXPERIMENT_NAME is not set (the script sets a default)"
  [[ "$EXPERIMENT_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "EXPERIMENT_NAME may use letters, digits, . _ - only: '$EXPERIMENT_NAME'"
  declare -p ALGO_OVERRIDES >/dev/null 2>&1 || die "the script did not set ALGO_OVERRIDES"
  RUN_DIR="$OUTPUT_DIR/$EXPERIMENT_NAME"
  common_overrides
  local hydra_dir cleanup=""
  if is_dry_run; then
    hydra_dir="$(mktemp -d)"; cleanup="$hydra_dir"
  else
    check_run_inputs
    hydra_dir="$RUN_DIR/hydra/$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$RUN_DIR" "$hydra_dir"
    # verl's FileLogger writes one JSON line per step here (trainer.logger includes 'file')
    export VERL_FILE_LOGGER_PATH="${VERL_FILE_LOGGER_PATH:-$RUN_DIR/metrics.jsonl}"
  fi
  local cmd=(
    "$IIB_LPO_PYTHON" -m recipe.iib_lpo.main
    "${COMMON_OVERRIDES[@]}" "${ALGO_OVERRIDES[@]}" "$@"
    "hydra.run.dir=$hydra_dir"
    # Hydra's log lines go to stderr, so stdout is the config alone under DRY_RUN
    "hydra.job_logging.handlers.console.stream=ext://sys.stderr"
  )
  cd "$ROOT"
  local rc=0
  if is_dry_run; then
    if [[ -n "$RAY_JOB_ADDRESS" ]]; then
      log "DRY_RUN: would submit to the Ray cluster at $RAY_JOB_ADDRESS: $(ray_job_prefix_text) ${cmd[*]}"
    fi
    log "DRY_RUN: printing the resolved config of $EXPERIMENT_NAME (no Ray, no GPU)"
    "${cmd[@]}" || rc=$?
    rm -rf "$cleanup"
    return "$rc"
  fi
  log "run $EXPERIMENT_NAME -> $RUN_DIR (log: $RUN_DIR/train.log)"
  if [[ -n "$RAY_JOB_ADDRESS" ]]; then
    local prefix
    ray_job_prefix prefix
    "${prefix[@]}" "${cmd[@]}" 2>&1 | tee -a "$RUN_DIR/train.log"
  else
    "${cmd[@]}" 2>&1 | tee -a "$RUN_DIR/train.log"
  fi
}

# `ray job submit` prefix for a multi-node run. The job's driver runs on the head node under the
# Ray cluster's environment, not this shell's: the variables the run needs travel in runtime_env.
# The repository and its .venv must exist at the same path on every node (the recipe is installed
# editable there, which also registers its verl/vLLM plugins).
ray_job_prefix() {
  local -n _out="$1"
  local ray_bin env_json
  ray_bin="$(dirname "$IIB_LPO_PYTHON")/ray"
  [[ -x "$ray_bin" ]] || ray_bin="$(command -v ray || true)"
  [[ -n "$ray_bin" ]] || die "no 'ray' executable next to $IIB_LPO_PYTHON or on PATH"
  env_json="$("$IIB_LPO_PYTHON" -c 'import json, os, sys
keys = ["VERL_FILE_LOGGER_PATH", "TOKENIZERS_PARALLELISM", "HYDRA_FULL_ERROR", "PYTHONUNBUFFERED", "WANDB_PROJECT"]
print(json.dumps({"env_vars": {k: os.environ[k] for k in keys if os.environ.get(k)}}))')"
  _out=("$ray_bin" job submit --address "$RAY_JOB_ADDRESS" --runtime-env-json "$env_json" --)
}
ray_job_prefix_text() { printf '%s' "ray job submit --address $RAY_JOB_ADDRESS --runtime-env-json {...} --"; }
