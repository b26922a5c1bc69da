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
# last: the judge audit (callbacks.JudgeAudit in configs/demo/rl.yaml), the number that says whether the reward is real
.venv/bin/python - <<'PY'
from qed_lightning.report import read_metrics

metrics = read_metrics("runs/demo-rl")
gaps, train, audit = (metrics.get(f"audit/{k}", []) for k in ("gap", "train_score_mean", "score_mean"))
if not gaps:
    print("[demo] audit: no audit/gap was logged (is JudgeAudit in configs/demo/rl.yaml?)")
else:
    q = max(len(gaps) // 4, 1)
    mean = lambda pts: sum(v for _, v in pts) / len(pts)
    print(f"[demo] audit: training judge {mean(train[:q]):.3f} -> {mean(train[-q:]):.3f}, audit judge "
          f"{mean(audit[:q]):.3f} -> {mean(audit[-q:]):.3f} on the same rollouts; gap (train - audit) "
          f"{mean(gaps[:q]):+.3f} -> {mean(gaps[-q:]):+.3f} (first and last {q} of {len(gaps)} audited steps)")
    print("[demo] audit: the training reward rose while a second judge's score of the same rollouts fell: the policy "
          "learned to please the training judge (strings of vowels), not to write proofs. That is reward hacking; "
          "read the disagreements in the report (rollouts, filter audit: disagree)."
          if mean(gaps[-q:]) > mean(gaps[:q]) + 0.3 else
          "[demo] audit: the gap did not open: the two judges still agree on these rollouts.")
PY
