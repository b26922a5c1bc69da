#!/usr/bin/env bash
# One-GPU check of the scale-out presets (DeepSpeed ZeRO-3 and FSDP2, bf16): a few SFT and RL steps of a ~0.3B random
# Qwen3 through `qed-fit`, printing tokens/s, peak memory and the losses. Under 8 minutes on one H100.
# Sets itself up on a bare GPU machine: a venv in ${QED_GPU_VENV:-.venv-gpu} with torch 2.13.0 (PyPI's CUDA build),
# DeepSpeed and this package without vLLM; an environment that already imports them is used as it is.
#   bash scripts/gpu_check.sh [--only fsdp2|deepspeed_zero3] [--out runs/gpu_check]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi missing or failing); run this on a GPU machine." >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
probe='import torch, deepspeed, lightning, transformers, qed_lightning; assert torch.cuda.is_available()'
if "$PYTHON" -c "$probe" >/dev/null 2>&1; then
  PY="$PYTHON"
else
  VENV=${QED_GPU_VENV:-.venv-gpu}
  if ! "$VENV/bin/python" -c "$probe" >/dev/null 2>&1; then
    echo "[gpu_check] setting up $VENV (torch 2.13.0 CUDA build, deepspeed, qed-lightning without vllm)..."
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[deepspeed]"
  fi
  PY="$VENV/bin/python"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" scripts/gpu_check.py "$@"
