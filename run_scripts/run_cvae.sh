#!/usr/bin/env bash
# The CVAE stage, before RL (METHOD.md "The CVAE stage"): train the condition encoder's CVAE prior
# and the latent projector P that the I2B-LPO runs load (python -m recipe.iib_lpo.train_cvae).
# Defaults: fork mode (the policy's own forks at its high-entropy tokens; prior, posterior and P
# trained through the frozen policy, P in the span of its top embedding directions), DeBERTa-v2-xlarge
# encoder (the paper code's), MATH + GSM8K training prompts. The latent is opt-in in the RL runs
# (LATENT_MODE=cvae): README "The latent" has the measurement behind that.
#
#   bash run_scripts/run_cvae.sh [extra train_cvae options, e.g. --epochs 10 --max-rows 5000]
#   DRY_RUN=1 bash run_scripts/run_cvae.sh    # print the command, run nothing
#   MODEL_PROFILE=qwen3-14b bash run_scripts/run_cvae.sh    # the Qwen3-14B policy's CVAE
#
# Environment (and common.sh's DATA_DIR, OUTPUT_DIR, MODEL_PROFILE):
#   MODEL_PATH          the policy (default per MODEL_PROFILE: Qwen/Qwen2.5-7B)
#   CVAE_CKPT           output checkpoint (default per MODEL_PROFILE: $OUTPUT_DIR/cvae/cvae.pt, the
#                       path run_qwen7b.sh reads)
#   CVAE_TRAIN_FILES    space-separated parquet files from prepare_data.sh
#                       (default $DATA_DIR/math_train.parquet $DATA_DIR/gsm8k_train.parquet)
#   CVAE_MODE           fork (default: prior, posterior and P through the frozen policy on its own
#                       forks, latent/fork_training.py) | prefix | lars (paper-code parity) | lm (also trains P through the
#                       frozen policy)
#   CVAE_ENCODER        HF id or local directory (default microsoft/deberta-v2-xlarge)
#   CVAE_ENCODER_DTYPE  default bfloat16 when an NVIDIA GPU is visible, else float32
# `python -m recipe.iib_lpo.train_cvae --help` lists every option.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${CVAE_TRAIN_FILES:=$DATA_DIR/math_train.parquet $DATA_DIR/gsm8k_train.parquet}"
: "${CVAE_MODE:=fork}"
: "${CVAE_ENCODER:=microsoft/deberta-v2-xlarge}"
if [[ -z "${CVAE_ENCODER_DTYPE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    CVAE_ENCODER_DTYPE=bfloat16
  else
    CVAE_ENCODER_DTYPE=float32
  fi
fi
case "$CVAE_MODE" in fork|prefix|lars|lm) ;; *) die "CVAE_MODE must be fork, prefix, lars or lm, got '$CVAE_MODE'";; esac
case "$CVAE_ENCODER_DTYPE" in float32|bfloat16|float16) ;; *) die "CVAE_ENCODER_DTYPE must be float32, bfloat16 or float16";; esac
read -r -a cvae_files <<< "$CVAE_TRAIN_FILES"
(( ${#cvae_files[@]} )) || die "CVAE_TRAIN_FILES is empty"

cmd=(
  "$IIB_LPO_PYTHON" -m recipe.iib_lpo.train_cvae
  --train-parquet "${cvae_files[@]}"
  --out "$CVAE_CKPT"
  --mode "$CVAE_MODE"
  --encoder "$CVAE_ENCODER"
  --encoder-dtype "$CVAE_ENCODER_DTYPE"
  --policy-model "$MODEL_PATH"
  "$@"
)
cd "$ROOT"
if is_dry_run; then
  printf '%q ' "${cmd[@]}"; printf '\n'
  exit 0
fi
missing=()
for f in "${cvae_files[@]}"; do [[ -f "$f" ]] || missing+=("$f"); done
(( ${#missing[@]} == 0 )) || die "missing CVAE training data:$(printf '\n  %s' "${missing[@]}")
  prepare it with: DATA_DIR=$DATA_DIR bash run_scripts/prepare_data.sh"
mkdir -p "$(dirname "$CVAE_CKPT")"
log "training the CVAE -> $CVAE_CKPT"
"${cmd[@]}"
