#!/usr/bin/env bash
# The first job to run on a real cluster: 2 GPUs, torchrun, one colocated vLLM engine per rank, the memory hand-off
# (sleep level 2, wake weights -> reload -> wake KV cache), bf16 sampler-vs-trainer log-prob gap, generation
# tokens/s, and RL steps under FSDP2, through the real `qed-fit`. Prints one JSON (see scripts/cluster_check.py
# and README "The paper's layout" for the expected output); exit status 0 when every check passes.
# Not run here: vLLM's CUDA wheel does not fit on the single-GPU check machine this project is lent.
#   bash scripts/cluster_check.sh [OUT=runs/cluster_check] [STEPS=3]      # inside an allocation with >= 2 GPUs
#   srun --nodes 1 --gpus-per-node 2 --ntasks 1 bash scripts/cluster_check.sh
# Needs an environment with vLLM's CUDA build and this package: pip install torch==2.13.0 && pip install -e ".[vllm]"
# (or point PYTHON at one).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cluster_check}
STEPS=${2:-3}
PYTHON=${PYTHON:-.venv/bin/python}

CPU=()
if [ -n "${CLUSTER_CHECK_CPU:-}" ]; then   # dry run of this script on 2 CPU processes (tiny model, vLLM CPU build)
  CPU=(--cpu)
  export OMP_NUM_THREADS=1
else
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  if [ "${gpus:-0}" -lt 2 ]; then
    echo "cluster_check: needs 2 NVIDIA GPUs, found ${gpus:-0} (nvidia-smi -L)" >&2
    exit 2
  fi
  if ! "$PYTHON" -c 'import torch, vllm, qed_lightning; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    echo "cluster_check: $PYTHON cannot import torch (CUDA), vllm and qed_lightning; install them or set PYTHON" >&2
    exit 2
  fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"   # cluster_check.Probe, the per-rank probe callback
mkdir -p "$OUT"
rm -rf "$OUT/run"
"$PYTHON" scripts/cluster_check.py prepare "$OUT" "${CPU[@]}" >&2
mapfile -t FIT_ARGS < <("$PYTHON" scripts/cluster_check.py args "$OUT" --steps "$STEPS" "${CPU[@]}")
# torchrun starts both ranks (RANK, LOCAL_RANK, WORLD_SIZE); Lightning joins them (TorchElasticEnvironment), and
# each rank's VLLMEngine joins the same process group with vLLM's external_launcher executor on cuda:LOCAL_RANK.
if ! "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 -m qed_lightning.cli "${FIT_ARGS[@]}" \
    > "$OUT/fit.log" 2>&1; then
  echo "cluster_check: the 2-GPU run failed; last lines of $OUT/fit.log:" >&2
  tail -n 60 "$OUT/fit.log" >&2
  exit 1
fi
exec "$PYTHON" scripts/cluster_check.py report "$OUT" --steps "$STEPS" "${CPU[@]}"
