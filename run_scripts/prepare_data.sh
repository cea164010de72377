#!/usr/bin/env bash
# Prepare every dataset the GPU runs read, as verl parquet in $DATA_DIR (python -m data_prep.prepare;
# data_prep/README.md describes layouts, filters and outputs):
#   eval (validation during training, and run_eval.sh):  math500 aime2024 aime2025 amc23 olympiadbench
#       -> $DATA_DIR/{name}_test.parquet
#   train (RL, common.sh TRAIN_FILES):                   math dapo_math
#       -> $DATA_DIR/{math,dapo_math}_train.parquet, decontaminated against the five eval sets
#   CVAE stage (run_cvae.sh, with MATH; the paper code's pairs): gsm8k -> $DATA_DIR/gsm8k_train.parquet
#
#   bash run_scripts/prepare_data.sh [extra data_prep.prepare options, given to every call]
#   DRY_RUN=1 bash run_scripts/prepare_data.sh     # print the commands, run nothing
#
# Environment:
#   DATA_DIR        output directory (default: the repository's data/, as common.sh)
#   RAW_DIR         where local copies of the sources live (default $DATA_DIR/raw): a dataset's
#                   source is $RAW_DIR/<name> (e.g. $RAW_DIR/math, $RAW_DIR/dapo_math) when it exists
#   <NAME>_SRC      explicit source per dataset, a local file / directory or a hub id:
#                   MATH_SRC DAPO_MATH_SRC GSM8K_SRC MATH500_SRC AIME2024_SRC AIME2025_SRC AMC23_SRC
#                   OLYMPIADBENCH_SRC. Neither set nor in RAW_DIR: the dataset's usual hub id, used
#                   only if the hub answers (data_prep --hub-timeout), otherwise the step fails.
#   TOKENIZER_DIR   local tokenizer directory: training prompts over MAX_PROMPT_LENGTH (2048) tokens
#                   under its chat template are dropped (default: MODEL_PATH when it is a local
#                   directory; otherwise no length filter here, and the trainer drops them:
#                   data.filter_overlong_prompts=true)
#   MATH_PASS_RATE_FILE / DAPO_MATH_PASS_RATE_FILE  base-model pass counts (jsonl from the eval
#                   runner) to drop prompts solved 0/n or n/n, as the paper's 6,486 / 13,583 sets
#                   (data_prep/README.md, "The paper's training sets")
#   DATASETS        which datasets, in order (default: the eval sets first, as decontamination
#                   reads them, then math dapo_math gsm8k)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

EVAL_SETS=(math500 aime2024 aime2025 amc23 olympiadbench)
: "${DATASETS:=${EVAL_SETS[*]} math dapo_math gsm8k}"
: "${RAW_DIR:=$DATA_DIR/raw}"
if [[ -z "${TOKENIZER_DIR:-}" && -f "$MODEL_PATH/tokenizer_config.json" ]]; then TOKENIZER_DIR="$MODEL_PATH"; fi
: "${TOKENIZER_DIR:=}"
if [[ -n "$TOKENIZER_DIR" ]] && ! is_dry_run; then
  [[ -d "$TOKENIZER_DIR" ]] || die "TOKENIZER_DIR=$TOKENIZER_DIR is not a directory"
fi

EVAL_FILES=()
for d in "${EVAL_SETS[@]}"; do EVAL_FILES+=("$DATA_DIR/${d}_test.parquet"); done

# source_args NAME: --source for NAME from <NAME>_SRC, else $RAW_DIR/NAME, else nothing (hub id)
source_args() {
  local var="${1^^}_SRC"
  if [[ -n "${!var:-}" ]]; then
    SRC_ARGS=(--source "${!var}")
  elif [[ -e "$RAW_DIR/$1" ]]; then
    SRC_ARGS=(--source "$RAW_DIR/$1")
  else
    SRC_ARGS=()
  fi
}

prepare() {  # prepare NAME [options...]
  local name="$1"; shift
  source_args "$name"
  local cmd=("$IIB_LPO_PYTHON" -m data_prep.prepare --dataset "$name" "${SRC_ARGS[@]}" --out "$DATA_DIR" "$@" "${EXTRA_ARGS[@]}")
  if is_dry_run; then
    printf '%q ' "${cmd[@]}"; printf '\n'
  else
    log "preparing $name"
    "${cmd[@]}" || die "data_prep.prepare failed for $name (see above)"
  fi
}

EXTRA_ARGS=("$@")
cd "$ROOT"
is_dry_run || mkdir -p "$DATA_DIR"
read -r -a _datasets <<< "$DATASETS"
for name in "${_datasets[@]}"; do
  case "$name" in
    math500|aime2024|aime2025|amc23|olympiadbench)
      prepare "$name"
      ;;
    math|dapo_math|gsm8k)
      train_opts=(--decontaminate-against "${EVAL_FILES[@]}")
      if ! is_dry_run; then
        for f in "${EVAL_FILES[@]}"; do
          [[ -f "$f" ]] || die "$f is missing: prepare the eval sets first (they are the decontamination reference)"
        done
      fi
      if [[ -n "$TOKENIZER_DIR" ]]; then
        train_opts+=(--max-prompt-tokens "$MAX_PROMPT_LENGTH" --tokenizer "$TOKENIZER_DIR")
      fi
      pass_var="${name^^}_PASS_RATE_FILE"
      if [[ -n "${!pass_var:-}" ]]; then
        is_dry_run || [[ -f "${!pass_var}" ]] || die "$pass_var=${!pass_var} does not exist"
        train_opts+=(--pass-rate-file "${!pass_var}")
      fi
      prepare "$name" "${train_opts[@]}"
      ;;
    *)
      die "unknown dataset '$name' in DATASETS (known: ${EVAL_SETS[*]} math dapo_math gsm8k)"
      ;;
  esac
done
is_dry_run || log "done: $DATA_DIR"
