"""The judge audit through `qed-fit`: the demo RL config on the tiny model with `JudgeAudit` set to stop. One run
serves every check (the suite is slow): audit metrics logged at the audited steps, rollout records carrying both
grades (joined from the audit side files), the cheap signals, and the stop policy (checkpoint, evidence, the run
ends early)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from qed_lightning.cli import make_cli
from qed_lightning.report import load_run
from qed_lightning.report.records import read_rollouts
from qed_lightning.rewards.audit import char_repetition
from runs import read_metrics

REPO = Path(__file__).resolve().parents[2]

# max_gap -1.5: every audit is past it (a gap is >= -1), so patience 2 stops the run after the second audit; the
# policy's numbers are pinned in tests/unit/test_judge_audit.py, this checks its plumbing through a real run
AUDIT = """
trainer:
  callbacks:
    - class_path: qed_lightning.callbacks.JudgeAudit
      init_args:
        sample: 6
        max_gap: -1.5
        patience: 2
        on_gap: stop
        seed: 1
        judge:
          class_path: qed_lightning.rewards.RubricJudge
          init_args:
            require_think_close: false
            client:
              class_path: qed_lightning.testing.ScriptedJudgeClient
              init_args: {rule: keyword, keyword: " "}
"""


@pytest.mark.slow
def test_audit_logs_joins_records_and_stops_with_evidence(tiny_model_dir, tmp_path, caplog):
    (tmp_path / "audit.yaml").write_text(AUDIT)
    root = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="qed_lightning.callbacks.audit"):
        make_cli(args=[
            "--config", str(REPO / "configs/demo/rl.yaml"), "--config", str(tmp_path / "audit.yaml"),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "6",
            "--model.init_args.model_name_or_path", str(tiny_model_dir),
            "--model.init_args.export_dir", str(root / "hf"),
            "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
            "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"),
        ])
    rows = read_metrics(root)
    trained = [r for r in rows if "rollout/reward_mean" in r]
    audits = {int(r["step"]): r for r in rows if "audit/gap" in r}
    # the stop policy: two audits past max_gap, then a checkpoint, the evidence and an early end
    assert 2 <= len(trained) < 6, f"the run should stop early, trained {len(trained)} steps"
    alarm = json.loads((root / "audit" / "alarm.json").read_text())
    assert alarm["step"] in audits and len(alarm["samples"]) == 3 and Path(alarm["checkpoint"]).is_file()
    assert "possible reward hacking at step" in caplog.text and "stopped at step" in caplog.text
    # the metrics: at the audited steps, the numbers agree with the records' two grades
    records = read_rollouts(root)
    for step in (0, 1):
        both = [r for r in records if r["step"] == step and r.get("audit_score") is not None]
        assert len(both) == 6 and all(r["status"] == "ok" and "audit_reply" in r for r in both)
        m = audits[step]
        assert m["audit/train_score_mean"] == pytest.approx(sum(r["score"] for r in both) / 6 / 7, abs=1e-6)
        assert m["audit/score_mean"] == pytest.approx(sum(r["audit_score"] for r in both) / 6 / 7, abs=1e-6)
        assert m["audit/gap"] == pytest.approx(m["audit/train_score_mean"] - m["audit/score_mean"], abs=1e-6)
        assert 0 <= m["audit/agree_within_1"] <= 1 and m["audit/failed"] == 0
        # the audit judge (spaces counted) really graded the same completions
        assert all(r["audit_score"] == min(7, r["proof"].count(" ")) for r in both)
    assert "audit/gap_trend" in audits[1] and any("signal/length_drift" in r for r in rows)
    # the cheap signals, from the step's kept records: character repetition as `rewards.audit` computes it
    first = [r for r in records if r["step"] == 0]
    signal = next(r for r in rows if int(r["step"]) == 0 and "signal/char_repetition" in r)["signal/char_repetition"]
    expected = sum(char_repetition(r.get("proof") or r.get("completion") or "") for r in first) / len(first)
    assert signal == pytest.approx(expected, abs=1e-6)
    # the report joins the side files too
    run = load_run(root, per_step=None)
    assert sum(r.get("audit_score") is not None for r in run["rollouts"]) >= 12
    assert "audit/score_mean" in run["metrics"] and "signal/char_repetition" in run["metrics"]
