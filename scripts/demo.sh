#!/usr/bin/env bash
# The main job on the embedded default, on CPU: demo SFT then demo rubric RL on the tiny offline model and the
# bundled samples (vLLM CPU engine, scripted stand-in judge over HTTP). Extra arguments go to both qed-fit calls.
# Metrics: runs/demo-{sft,rl}/csv/version_*/metrics.csv; trained models: runs/demo-{sft,rl}/hf.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/qed-fit --config configs/demo/sft.yaml "$@"
.venv/bin/qed-fit --config configs/demo/rl.yaml "$@"
.venv/bin/python - <<'PY'
import csv, glob
for stage, key in (("sft", "train/loss"), ("rl", "rollout/reward_mean")):
    run = sorted(glob.glob(f"runs/demo-{stage}/csv/version_*"), key=lambda p: int(p.rsplit("_", 1)[1]))[-1]
    values = [float(r[key]) for r in csv.DictReader(open(f"{run}/metrics.csv")) if r.get(key)]
    print(f"[demo] {stage}: {key} {values[0]:.3f} -> {values[-1]:.3f} over {len(values)} steps; metrics in {run}/metrics.csv")
PY
