#!/usr/bin/env bash
# The main job on the embedded default: demo SFT on the tiny offline model and the bundled samples, on CPU.
# Metrics land in runs/demo-*/csv/version_*/metrics.csv; the trained model in runs/demo-*/csv/version_*/hf.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/qed-fit --config configs/demo/sft.yaml "$@"
echo "[demo] SFT metrics: $(ls -d runs/demo-sft/csv/version_* | tail -1)/metrics.csv"
