#!/usr/bin/env bash
# The main job on the embedded default, on CPU: demo SFT then demo rubric RL on the tiny offline model and the
# bundled samples (vLLM CPU engine, scripted stand-in judge over HTTP), then one HTML report of both runs.
# Extra arguments go to both qed-fit calls (e.g. -v for every library's log lines).
# Metrics: runs/demo-{sft,rl}/csv/version_*/metrics.csv; rollouts: runs/demo-rl/rollouts; models: runs/demo-{sft,rl}/hf.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the demo starts afresh each time (qed-fit refuses a run folder that already holds a run; see qed_lightning.runfolder)
rm -rf runs/demo-sft runs/demo-rl
.venv/bin/qed-fit --config configs/demo/sft.yaml "$@"
.venv/bin/qed-fit --config configs/demo/rl.yaml "$@"
.venv/bin/python - <<'PY'
from qed_lightning.report import read_metrics

for stage, key in (("sft", "train/loss"), ("rl", "rollout/reward_mean")):
    values = [v for _, v in read_metrics(f"runs/demo-{stage}")[key]]
    q = max(len(values) // 4, 1)
    first, last = sum(values[:q]) / q, sum(values[-q:]) / q
    print(f"[demo] {stage}: {key} {first:.3f} -> {last:.3f} (mean of the first and of the last {q} of {len(values)} steps)")
PY
report=$(.venv/bin/qed-report runs/demo-sft runs/demo-rl --out runs/demo-report.html)
echo "[demo] report of both runs (curves, every rollout with its judge reply): $report"
echo "[demo] open it in a browser: file://$(realpath "$report")"
